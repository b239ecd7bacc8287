"""Countdown: combine the given numbers with + - * / to hit a target, each number used exactly once.

Problems are generated from a seed (no download). Each target comes from a random expression over
the drawn numbers, so every problem is solvable. The held-out splits are drawn first and the train
split is drawn excluding their ``(sorted numbers, target)`` keys, so train never contains a test or
OOD problem. With 3 numbers in 1..9 there are only ~2,200 distinct keys, so train is an i.i.d.
sample that repeats keys (like any RL prompt distribution); test and OOD keys are distinct.

The OOD split asks for the same skill on larger numbers: by default 3 numbers in 1..15 with at least
one of them in 10..15, so no OOD problem is an in-distribution one (several thousand keys, targets
still in 0..100). ``ood_num_numbers=4, ood_max_number=9`` gives the older, much harder 4-number split.

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

from rloop_lightning.tasks.answers import last_tagged
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
        1.0 if verify_expression(extract_expression(completion), given, goal) else 0.0
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


def random_problem(
    rng: random.Random, num_numbers: int, max_number: int, larger_than: int = 0
) -> tuple[list[int], int]:
    """Draw numbers in ``1..max_number`` and the value of a random integer expression over them.

    With ``larger_than`` > 0 at least one number is greater than ``larger_than`` (uniform among such
    draws, by redrawing the numbers); ``larger_than`` must be below ``max_number``.
    """
    if not 0 <= larger_than < max_number:
        raise ValueError(f"countdown: larger_than must be in 0..{max_number - 1}, got {larger_than}")
    numbers = [rng.randint(1, max_number) for _ in range(num_numbers)]
    while max(numbers) <= larger_than:
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
    larger_than: int = 0,
) -> list[tuple[list[int], int]]:
    """``count`` problems with targets in ``0..max_target`` whose keys are not in ``exclude``.

    With ``distinct`` no key repeats. With ``larger_than`` > 0 every problem has a number greater
    than ``larger_than``. Raises ``ValueError`` when the space is too small to fill.
    """
    drawn, seen = [], set()
    misses = 0
    while len(drawn) < count:
        if misses > MAX_CONSECUTIVE_MISSES:
            larger = f" (at least one > {larger_than})" if larger_than else ""
            raise ValueError(
                f"countdown: could only draw {len(drawn)} of {count} problems with {num_numbers} numbers "
                f"in 1..{max_number}{larger} and targets <= {max_target}; lower the split size or widen the space"
            )
        numbers, target = random_problem(rng, num_numbers, max_number, larger_than)
        key = problem_key(numbers, target)
        if not 0 <= target <= max_target or key in exclude or (distinct and key in seen):
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
        num_ood: Problems in the OOD split (distinct keys, ``ood_num_numbers`` numbers in
            ``1..ood_max_number``).
        num_numbers: How many numbers each train/test problem gives (the difficulty knob).
        ood_num_numbers: How many numbers each OOD problem gives (harder when larger).
        max_number: Train/test numbers are drawn from ``1..max_number``.
        max_target: Targets lie in ``0..max_target``.
        ood_max_number: OOD numbers are drawn from ``1..ood_max_number`` (at least ``max_number``).
            When larger than ``max_number``, every OOD problem has a number above ``max_number``, so
            none is an in-distribution problem.
        template: Prompt format with fields ``numbers`` (space-joined) and ``target``.
    """

    name = "countdown"

    def __init__(
        self,
        seed: int = 0,
        num_train: int = 20000,
        num_test: int = 200,
        num_ood: int = 200,
        num_numbers: int = 3,
        ood_num_numbers: int = 3,
        max_number: int = 9,
        max_target: int = 100,
        ood_max_number: int = 15,
        template: str = "{numbers} -> {target}\n",
    ):
        if num_numbers < 2 or ood_num_numbers < 2:
            raise ValueError("countdown needs at least 2 numbers per problem")
        if max_number < 1:
            raise ValueError(f"max_number must be >= 1, got {max_number}")
        if ood_max_number < max_number:
            raise ValueError(f"ood_max_number must be >= max_number ({max_number}), got {ood_max_number}")
        super().__init__(seed, {"train": num_train, "test": num_test, "ood": num_ood})
        self.num_numbers, self.ood_num_numbers = num_numbers, ood_num_numbers
        self.max_number, self.ood_max_number = max_number, ood_max_number
        self.max_target = max_target
        self.template = template

    def draw(self, split: str, rng: random.Random, count: int, exclude: set) -> list[tuple[object, dict]]:
        if split == "ood":  # larger numbers, and at least one beyond the in-distribution range
            num_numbers, max_number = self.ood_num_numbers, self.ood_max_number
            larger_than = self.max_number if max_number > self.max_number else 0
        else:
            num_numbers, max_number, larger_than = self.num_numbers, self.max_number, 0
        drawn = draw_problems(rng, count, num_numbers, max_number, self.max_target, exclude=exclude,
                              distinct=split != "train", larger_than=larger_than)
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
