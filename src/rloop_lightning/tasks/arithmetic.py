"""Multi-step arithmetic: evaluate ``3+4*2-5`` respecting precedence, showing the steps.

Problems are generated from a seed (no download): ``num_operations`` random operators from
``+ - *`` between operands in ``1..max_operand`` (no division, so every answer is an integer).
The demonstration does the products first, then the sums left to right, one step per ``a op b=c``
and ends with ``#### answer``: ``4*2=8 3+8=11 11-5=6 #### 6``.

The verifier reads the integer after the last ``####`` (else the last integer of the completion)
and compares it with the gold answer. As in Countdown, the test and OOD splits are drawn first
(distinct expressions), the train split is an i.i.d. sample that excludes their expressions, and the
validation split is drawn last, excluding every other split's expressions.
"""

from __future__ import annotations

import operator
import random

from rloop_lightning.rewards.inputs import completion_text
from rloop_lightning.rewards.answers import final_integer
from rloop_lightning.tasks.base import GeneratedTask

_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def random_expression(rng: random.Random, num_operations: int, max_operand: int) -> str:
    """An expression such as ``3+4*2-5`` with ``num_operations`` operators and operands in 1..max_operand."""
    text = str(rng.randint(1, max_operand))
    for _ in range(num_operations):
        text += rng.choice("+-*") + str(rng.randint(1, max_operand))
    return text


def _tokens(expression: str) -> list:
    """``"3+4*2"`` -> ``[3, "+", 4, "*", 2]`` (operands are non-negative integers)."""
    tokens: list = []
    number = ""
    for char in expression:
        if char.isdigit():
            number += char
        else:
            tokens += [int(number), char]
            number = ""
    return tokens + [int(number)]


def solution_steps(expression: str) -> list[tuple[int, str, int, int]]:
    """The steps ``(left, operator, right, result)`` evaluating ``expression``: products, then sums."""
    tokens = _tokens(expression)
    steps = []
    for wanted in ("*", "+-"):
        index = 1
        while index < len(tokens):
            if tokens[index] in wanted:
                left, symbol, right = tokens[index - 1 : index + 2]
                result = _APPLY[symbol](left, right)
                steps.append((left, symbol, right, result))
                tokens[index - 1 : index + 2] = [result]
            else:
                index += 2
    return steps


def evaluate(expression: str) -> int:
    """The value of ``expression`` under the usual precedence."""
    steps = solution_steps(expression)
    return steps[-1][3] if steps else _tokens(expression)[0]


def write_solution(expression: str) -> str:
    """``"3+4*2-5"`` -> ``"4*2=8 3+8=11 11-5=6 #### 6"``."""
    steps = [f"{left}{symbol}{right}={result}" for left, symbol, right, result in solution_steps(expression)]
    return " ".join(steps + [f"#### {evaluate(expression)}"])


def arithmetic_reward(
    prompts: list[str], completions: list[str], *, answer: list[str], **columns
) -> list[float | None]:
    """TRL-signature reward: 1.0 when the completion's final integer equals the gold answer, else 0.0."""
    if len(completions) != len(answer):
        raise ValueError(f"arithmetic reward: {len(completions)} completions but {len(answer)} answers")
    return [1.0 if final_integer(completion_text(completion)) == int(gold) else 0.0
            for completion, gold in zip(completions, answer)]


MAX_CONSECUTIVE_MISSES = 10_000  # rejected draws in a row before the space is deemed exhausted


def draw_expressions(
    rng: random.Random, count: int, num_operations: int, max_operand: int, exclude: set, distinct: bool
) -> list[str]:
    """``count`` expressions not in ``exclude`` (and pairwise distinct if ``distinct``)."""
    drawn, seen = [], set()
    misses = 0
    while len(drawn) < count:
        if misses > MAX_CONSECUTIVE_MISSES:
            raise ValueError(
                f"arithmetic: could only draw {len(drawn)} of {count} expressions with {num_operations} "
                f"operations and operands <= {max_operand}; lower the split size or widen the space"
            )
        expression = random_expression(rng, num_operations, max_operand)
        if expression in exclude or (distinct and expression in seen):
            misses += 1
            continue
        misses = 0
        seen.add(expression)
        drawn.append(expression)
    return drawn


class MultiStepArithmetic(GeneratedTask):
    """Integer expressions with ``+ - *`` to evaluate step by step, generated from a seed.

    Args:
        seed: Seed of the generator; the same seed always yields the same splits.
        num_train: Problems in the train split (i.i.d.; may repeat, never a test/OOD expression).
        num_test: Problems in the test split (distinct, same difficulty as train).
        num_ood: Problems in the OOD split (distinct, ``ood_num_operations`` operators).
        num_validation: Problems in the validation split (distinct, same difficulty as train, none of
            them a train, test or OOD expression; drawn only when asked for). The default 20000-problem
            train split leaves about 260 of the 6,561 two-operator expressions over 1..9.
        num_operations: Operators per train/test expression (the difficulty knob).
        ood_num_operations: Operators per OOD expression.
        max_operand: Operands are drawn from ``1..max_operand``.
        template: Prompt format with the field ``expression``.
    """

    name = "arithmetic"

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 20000,
        num_test: int = 200,
        num_ood: int = 200,
        num_validation: int = 200,
        num_operations: int = 2,
        ood_num_operations: int = 3,
        max_operand: int = 9,
        template: str = "{expression}=\n",
    ):
        if num_operations < 1 or ood_num_operations < 1:
            raise ValueError("arithmetic needs at least 1 operation per expression")
        if max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {max_operand}")
        super().__init__(seed, {"train": num_train, "test": num_test, "ood": num_ood,
                                "validation": num_validation})
        self.num_operations, self.ood_num_operations = num_operations, ood_num_operations
        self.max_operand = max_operand
        self.template = template

    def draw(self, split: str, rng: random.Random, count: int, exclude: set) -> list[tuple[object, dict]]:
        operations = self.ood_num_operations if split == "ood" else self.num_operations
        drawn = draw_expressions(rng, count, operations, self.max_operand, exclude=exclude, distinct=split != "train")
        return [(expression, {"prompt": self.template.format(expression=expression),
                              "answer": str(evaluate(expression)), "expression": expression})
                for expression in drawn]

    def reward(self, prompts, completions, **columns) -> list[float | None]:
        return arithmetic_reward(prompts, completions, **columns)

    def demonstration(self, problem: dict, draw: int = 0) -> str:
        return write_solution(problem["expression"])
