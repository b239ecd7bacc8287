"""Countdown: combine the given numbers with + - * / to hit a target, each number used exactly once.

Problems are generated from a seed (no download). Each target comes from a random expression over
the drawn numbers, so every problem is solvable. The held-out splits are drawn first and the train
split is drawn excluding their ``(sorted numbers, target)`` keys, so train never contains a test or
OOD problem. With 3 numbers in 1..9 there are only ~2,200 distinct keys, so train is an i.i.d.
sample that repeats keys (like any RL prompt distribution); test and OOD keys are distinct. The
validation split is drawn last, excluding the keys of every other split (``GeneratedTask``).

The OOD split asks for the same skill on targets beyond the training range: 3 numbers in 1..9 and a
target in 101..999 (which needs multiplication; about 110 such keys exist), so no OOD problem is an
in-distribution one. ``ood_num_numbers=4, ood_max_target=100`` gives the older 4-number split. A tiny
character-level policy scores exactly 0 on that one, and on two-digit numbers.

The model answers with a bare expression such as ``(7-3)*5``. The verifier parses it with ``ast``
(never ``eval``), allows only integer literals and binary ``+ - * /`` (no unary minus: the given
numbers are positive and the game has no negation), evaluates exactly with ``Fraction`` and checks
that the literals are the given numbers as a multiset.
"""

from __future__ import annotations

import ast
import itertools
import operator
import random
from collections import Counter
from collections.abc import Iterable
from fractions import Fraction
from functools import lru_cache

from rloop_lightning.rewards.inputs import completion_text
from rloop_lightning.rewards.answers import last_tagged
from rloop_lightning.tasks.base import GeneratedTask

MAX_EXPRESSION_CHARS = 200
MAX_LITERAL = 999_999  # literals with more than 6 digits are rejected

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_SYMBOLS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_ATOM, _PRODUCT, _SUM = 3, 2, 1  # precedence used to print minimal parentheses
_PRECEDENCE = {"+": _SUM, "-": _SUM, "*": _PRODUCT, "/": _PRODUCT}


# --------------------------------------------------------------------------- verifying


class _Rejected(Exception):
    """The expression uses something other than integer literals and binary + - * /."""


def _evaluate(node: ast.AST, literals: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if not 0 <= node.value <= MAX_LITERAL:
            raise _Rejected
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left = _evaluate(node.left, literals)
        right = _evaluate(node.right, literals)
        if isinstance(node.op, ast.Div) and right == 0:
            raise _Rejected
        return _OPERATORS[type(node.op)](left, right)
    raise _Rejected


def verify_expression(text: str, numbers: Iterable[int], target: int) -> bool:
    """True iff ``text`` is an arithmetic expression using each of ``numbers`` once and equal to ``target``.

    Safe on adversarial input: no ``eval``, only int literals and binary ``+ - * /`` are accepted,
    ``**`` and unary minus are rejected, text over ``MAX_EXPRESSION_CHARS`` characters is rejected.
    """
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION_CHARS:
        return False
    try:
        tree = ast.parse(text.strip(), mode="eval")
        literals: list[int] = []
        value = _evaluate(tree.body, literals)
    except (_Rejected, SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return value == target and Counter(literals) == Counter(numbers)


def extract_expression(completion: str) -> str:
    """The expression a completion answers with.

    The content of the last ``<answer>...</answer>`` if present, else the first line; stripped, and
    cut before the first ``=`` (so ``3*5+7=22`` counts as ``3*5+7``).
    """
    tagged = last_tagged(completion)
    text = tagged if tagged is not None else completion.split("\n", 1)[0]
    return text.split("=", 1)[0].strip()


def countdown_reward(
    prompts: list[str], completions: list[str], *, numbers: list[list[int]], target: list[int], **columns
) -> list[float | None]:
    """TRL-signature reward: 1.0 when the completion's expression hits the target, else 0.0."""
    if not len(completions) == len(numbers) == len(target):
        raise ValueError(
            f"countdown reward: {len(completions)} completions but {len(numbers)} numbers, {len(target)} targets"
        )
    return [
        1.0 if verify_expression(extract_expression(completion_text(completion)), given, goal) else 0.0
        for completion, given, goal in zip(completions, numbers, target)
    ]


# --------------------------------------------------------------------------- solving


@lru_cache(maxsize=4096)
def _expressions(numbers: tuple[int, ...]) -> tuple[tuple[Fraction, str, int], ...]:
    """Every expression tree over ``numbers`` in this order, as (value, text, precedence)."""
    if len(numbers) == 1:
        return ((Fraction(numbers[0]), str(numbers[0]), _ATOM),)
    return tuple(
        combined
        for split in range(1, len(numbers))
        for combined in _combinations(_expressions(numbers[:split]), _expressions(numbers[split:]))
    )


def _combinations(lefts, rights) -> Iterable[tuple[Fraction, str, int]]:
    for (left_value, left_text, left_rank), (right_value, right_text, right_rank) in itertools.product(
        lefts, rights
    ):
        for symbol, apply in _SYMBOLS.items():
            if symbol == "/" and right_value == 0:
                continue
            rank = _PRECEDENCE[symbol]
            left = f"({left_text})" if left_rank < rank else left_text
            right_needs = right_rank < rank or (right_rank == rank and symbol in "-/")
            right = f"({right_text})" if right_needs else right_text
            yield apply(left_value, right_value), f"{left}{symbol}{right}", rank


@lru_cache(maxsize=4096)
def _solve_sorted(numbers: tuple[int, ...], target: int) -> tuple[str, ...]:
    solutions = set()
    for order in set(itertools.permutations(numbers)):
        solutions.update(text for value, text, _ in _expressions(order) if value == target)
    return tuple(sorted(solutions))


def solve(numbers: Iterable[int], target: int) -> list[str]:
    """All distinct expressions (minimal parentheses, no spaces) using each number once that equal ``target``."""
    return list(_solve_sorted(tuple(sorted(numbers)), target))


# --------------------------------------------------------------------------- generating


def random_problem(rng: random.Random, num_numbers: int, max_number: int) -> tuple[list[int], int]:
    """Draw numbers in ``1..max_number`` and the value of a random integer expression over them."""
    numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
    values = rng.sample(numbers, len(numbers))
    while len(values) > 1:
        index = rng.randrange(len(values) - 1)
        left, right = values[index], values[index + 1]
        symbols = ["+", "-", "*"] + (["/"] if right != 0 and left % right == 0 else [])
        symbol = rng.choice(symbols)
        values[index : index + 2] = [left // right if symbol == "/" else _SYMBOLS[symbol](left, right)]
    return numbers, values[0]


def problem_key(numbers: Iterable[int], target: int) -> tuple[tuple[int, ...], int]:
    """Identity of a problem for split disjointness: the numbers as a multiset and the target."""
    return tuple(sorted(numbers)), target


MAX_CONSECUTIVE_MISSES = 10_000  # rejected draws in a row before the space is deemed exhausted


def draw_problems(
    rng: random.Random,
    count: int,
    num_numbers: int,
    max_number: int,
    max_target: int,
    exclude: set = frozenset(),
    distinct: bool = True,
    min_target: int = 0,
) -> list[tuple[list[int], int]]:
    """``count`` problems with targets in ``min_target..max_target`` whose keys are not in ``exclude``.

    With ``distinct`` no key repeats. Raises ``ValueError`` when the space is too small to fill.
    """
    drawn, seen = [], set()
    misses = 0
    while len(drawn) < count:
        if misses > MAX_CONSECUTIVE_MISSES:
            raise ValueError(
                f"countdown: could only draw {len(drawn)} of {count} problems with {num_numbers} numbers in "
                f"1..{max_number} and targets in {min_target}..{max_target}; lower the split size or widen the space"
            )
        numbers, target = random_problem(rng, num_numbers, max_number)
        key = problem_key(numbers, target)
        if not min_target <= target <= max_target or key in exclude or (distinct and key in seen):
            misses += 1
            continue
        misses = 0
        seen.add(key)
        drawn.append((numbers, target))
    return drawn


class Countdown(GeneratedTask):
    """Countdown problems generated from a seed.

    Args:
        seed: Seed of the generator; the same seed always yields the same splits.
        num_train: Problems in the train split (i.i.d.; keys may repeat, never a test/OOD key).
        num_test: Problems in the test split (distinct keys, same difficulty as train).
        num_ood: Problems in the OOD split (distinct keys; with 3 numbers there are only about 110
            keys with a target above 100).
        num_validation: Problems in the validation split (distinct keys, same difficulty as train,
            none of them a train, test or OOD key; drawn only when asked for). With 3 numbers in
            1..9 the default 20000-problem train split covers all but about 40 of the ~2,240 keys,
            so a validation split needs a smaller ``num_train`` (the first N train problems are the
            same for every ``num_train`` >= N): ``num_train: 512`` leaves about 1,600 keys.
        num_numbers: How many numbers each train/test problem gives (the difficulty knob).
        ood_num_numbers: How many numbers each OOD problem gives (harder when larger).
        max_number: Numbers are drawn from ``1..max_number``.
        max_target: Train/test targets lie in ``0..max_target``.
        ood_max_target: OOD targets lie in ``max_target + 1..ood_max_target``, beyond every target
            seen in training; at ``ood_max_target <= max_target`` they lie in ``0..max_target``
            like the others.
        template: Prompt format with fields ``numbers`` (space-joined) and ``target``.
    """

    name = "countdown"

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 20000,
        num_test: int = 200,
        num_ood: int = 100,
        num_validation: int = 200,
        num_numbers: int = 3,
        ood_num_numbers: int = 3,
        max_number: int = 9,
        max_target: int = 100,
        ood_max_target: int = 999,
        template: str = "{numbers} -> {target}\n",
    ):
        if num_numbers < 2 or ood_num_numbers < 2:
            raise ValueError("countdown needs at least 2 numbers per problem")
        if max_number < 1:
            raise ValueError(f"max_number must be >= 1, got {max_number}")
        super().__init__(seed, {"train": num_train, "test": num_test, "ood": num_ood,
                                "validation": num_validation})
        self.num_numbers, self.ood_num_numbers = num_numbers, ood_num_numbers
        self.max_number = max_number
        self.max_target, self.ood_max_target = max_target, ood_max_target
        self.template = template

    def draw(self, split: str, rng: random.Random, count: int, exclude: set) -> list[tuple[object, dict]]:
        num_numbers, min_target, max_target = self.num_numbers, 0, self.max_target
        if split == "ood":
            num_numbers = self.ood_num_numbers
            if self.ood_max_target > self.max_target:  # targets beyond every training target
                min_target, max_target = self.max_target + 1, self.ood_max_target
        drawn = draw_problems(rng, count, num_numbers, self.max_number, max_target, exclude=exclude,
                              distinct=split != "train", min_target=min_target)
        return [(problem_key(numbers, target), {
            "prompt": self.template.format(numbers=" ".join(map(str, numbers)), target=target),
            "answer": str(target), "numbers": list(numbers), "target": target,
        }) for numbers, target in drawn]

    def reward(self, prompts, completions, **columns) -> list[float | None]:
        return countdown_reward(prompts, completions, **columns)

    def demonstration(self, problem: dict, draw: int = 0) -> str:
        """One solution, picked at random (seeded by the problem id and ``draw``) among all solutions."""
        solutions = solve(problem["numbers"], problem["target"])
        if not solutions:
            raise ValueError(f"countdown problem {problem['id']!r} has no solution")
        return random.Random(f"{problem['id']}:{draw}").choice(solutions)
