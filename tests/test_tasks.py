"""Synthetic tasks (Countdown, MultiStepArithmetic) and the answer-extraction helpers."""

from __future__ import annotations

import hashlib
import json

import pytest

from rloop_lightning.tasks import Countdown, MultiStepArithmetic, Task
from rloop_lightning.rewards.answers import after_marker, final_integer, last_boxed, last_tagged
from rloop_lightning.tasks.arithmetic import evaluate, write_solution
from rloop_lightning.tasks.countdown import extract_expression, problem_key, solve, verify_expression


@pytest.fixture(scope="module")
def countdown() -> Countdown:
    return Countdown(seed=3, num_train=2000, num_test=100, num_ood=40)


def keys(problems):
    return {problem_key(p["numbers"], p["target"]) for p in problems}


# --------------------------------------------------------------------------- Countdown


def test_countdown_is_a_task_with_the_documented_columns(countdown):
    assert isinstance(countdown, Task)
    problem = countdown.load("train")[17]
    assert problem["id"] == "countdown-train-17"
    assert set(problem) == {"id", "prompt", "answer", "numbers", "target"}
    assert problem["prompt"] == " ".join(map(str, problem["numbers"])) + f" -> {problem['target']}\n"
    assert problem["answer"] == str(problem["target"])
    assert len(problem["numbers"]) == 3 and all(1 <= n <= 9 for n in problem["numbers"])
    assert all(len(p["numbers"]) == 3 for p in countdown.load("ood"))


def test_countdown_is_deterministic_by_seed(countdown):
    again = Countdown(seed=3, num_train=2000, num_test=100, num_ood=40)
    for split in ("train", "test", "ood"):
        assert again.load(split) == countdown.load(split)
    assert Countdown(seed=4, num_train=2000, num_test=100, num_ood=40).load("test") != countdown.load("test")


def test_countdown_splits_are_disjoint_and_held_out_splits_distinct(countdown):
    train, test, ood = (countdown.load(split) for split in ("train", "test", "ood"))
    assert (len(train), len(test), len(ood)) == (2000, 100, 40)
    assert not keys(train) & keys(test) and not keys(train) & keys(ood) and not keys(test) & keys(ood)
    assert len(keys(test)) == len(test) and len(keys(ood)) == len(ood)
    same_size = Countdown(seed=3, num_train=2000, num_test=100, num_ood=40, ood_max_target=100)
    assert not keys(same_size.load("train")) & keys(same_size.load("ood"))
    assert not keys(same_size.load("test")) & keys(same_size.load("ood"))


def test_countdown_targets_respect_the_range(countdown):
    assert all(0 <= p["target"] <= 100 for p in countdown.load("train"))
    assert all(0 <= p["target"] <= 100 for p in countdown.load("test"))


def test_countdown_ood_split_has_targets_beyond_the_training_range():
    task = Countdown(seed=5, num_train=1000, num_test=200)  # the default OOD split: 100 problems
    train, test, ood = (task.load(split) for split in ("train", "test", "ood"))
    assert len(ood) == 100 and len(keys(ood)) == 100
    assert all(len(p["numbers"]) == 3 and all(1 <= n <= 9 for n in p["numbers"]) for p in ood)
    assert all(101 <= p["target"] <= 999 for p in ood)  # never an in-distribution problem
    assert max(p["target"] for p in ood) == 9 * 9 * 9
    assert not keys(ood) & keys(test) and not keys(ood) & keys(train)
    for problem in ood:
        solutions = solve(problem["numbers"], problem["target"])
        assert solutions and verify_expression(solutions[0], problem["numbers"], problem["target"]), problem
    assert Countdown(seed=5, num_train=1000, num_test=200).load("ood") == ood


def test_countdown_ood_can_still_be_the_older_four_number_split():
    ood = Countdown(seed=3, num_train=100, num_test=20, num_ood=40, ood_num_numbers=4, ood_max_target=100).load("ood")
    assert all(len(p["numbers"]) == 4 and all(1 <= n <= 9 for n in p["numbers"]) for p in ood)
    assert all(0 <= p["target"] <= 100 and solve(p["numbers"], p["target"]) for p in ood)


def test_countdown_ood_larger_than_its_problem_space_names_the_range():
    with pytest.raises(ValueError, match="targets in 101..999"):
        Countdown(num_ood=150).load("ood")


def test_every_problem_is_solvable_and_demonstrations_verify(countdown):
    problems = countdown.load("test") + countdown.load("train")[:300] + countdown.load("ood")[:15]
    for problem in problems:
        demonstration = countdown.demonstration(problem)
        assert demonstration in solve(problem["numbers"], problem["target"])
        assert verify_expression(demonstration, problem["numbers"], problem["target"]), problem
        assert countdown.reward(
            [problem["prompt"]], [demonstration], **{k: [v] for k, v in problem.items()}
        ) == [1.0]


def test_solver_finds_all_solutions_with_minimal_parentheses():
    assert solve([3, 5, 7], 22) == ["3*5+7", "5*3+7", "7+3*5", "7+5*3"]
    assert "(7-3)*5" in solve([7, 3, 5], 20) and "5*(7-3)" in solve([7, 3, 5], 20)
    assert "6/(1-3/4)" in solve([1, 3, 4, 6], 24)  # exact fractional intermediate
    assert solve([1, 1], 5) == []
    for text in solve([2, 3, 4], 10):
        assert verify_expression(text, [2, 3, 4], 10)


def test_problems_usually_have_several_solutions(countdown):
    counts = sorted(len(solve(p["numbers"], p["target"])) for p in countdown.load("test"))
    assert counts[0] >= 1 and counts[len(counts) // 2] >= 4


def test_demonstrations_are_diverse_yet_deterministic(countdown):
    train = countdown.load("train")
    by_key: dict = {}
    for problem in train:
        by_key.setdefault(problem_key(problem["numbers"], problem["target"]), []).append(problem)
    repeated = max(by_key.values(), key=len)
    assert len({countdown.demonstration(p) for p in repeated}) > 1
    assert countdown.demonstration(train[5]) == countdown.demonstration(dict(train[5]))


@pytest.mark.parametrize(
    "text, numbers, target, expected",
    [
        ("(7-3)*5", [7, 3, 5], 20, True),
        (" 5 * ( 7 - 3 ) ", [3, 5, 7], 20, True),
        ("(7-3)*5", [7, 3, 5], 21, False),  # wrong target
        ("7*3-1", [7, 3, 5], 20, False),  # 1 is not a given number, 5 missing
        ("7+7+5+1", [7, 5, 1], 20, False),  # 7 reused
        ("7+5", [7, 3, 5], 12, False),  # 3 missing
        ("8/4+3", [8, 4, 3], 5, True),
        ("8/3+3", [8, 3, 3], 5, False),  # exact division: 8/3+3 is 17/3
        ("6/(3-3)", [6, 3, 3], 0, False),  # division by zero
        ("6/4*2", [6, 4, 2], 3, True),  # fractional intermediate, exact result
        ("-3+8+5", [3, 8, 5], 10, False),  # unary minus is not allowed
        ("2**99", [2, 99], 2**99, False),
        ("__import__('os')", [], 0, False),
        ("(1).real+2", [1, 2], 3, False),  # attribute access
        ("abs(1)+2", [1, 2], 3, False),  # call
        ("x+1", [1], 1, False),
        ("1.5*2", [2], 3, False),  # float literal
        ("True+2", [2], 3, False),  # bool is not a number here
        ("1000000+1", [1000000, 1], 1000001, False),  # more than 6 digits
        ("+".join(["1"] * 150), [1] * 150, 150, False),  # over 200 characters
        ("1+" * 5 + "(", [1], 1, False),  # syntax error
        ("7\x00", [7], 7, False),  # null byte
    ],
)
def test_verify_expression(text, numbers, target, expected):
    assert verify_expression(text, numbers, target) is expected


def test_extract_expression():
    assert extract_expression("(7-3)*5\nsome more text") == "(7-3)*5"
    assert extract_expression("  3*5+7 = 22") == "3*5+7"
    assert extract_expression("think <answer>1+2</answer> no <answer> 7-3 </answer>\n9") == "7-3"


def test_countdown_reward_scores_and_aligns():
    numbers, target = [[7, 3, 5], [7, 3, 5], [7, 3, 5]], [20, 20, 20]
    completions = ["(7-3)*5", "(7-3)*5=20", "7*3-1"]
    rewards = Countdown().reward(["p"] * 3, completions, numbers=numbers, target=target, id=["a", "b", "c"])
    assert rewards == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        Countdown().reward(["p"], ["1+2"], numbers=[[1, 2], [1, 2]], target=[3])


# --------------------------------------------------------------------------- MultiStepArithmetic


def test_arithmetic_solution_respects_precedence():
    assert write_solution("3+4*2-5") == "4*2=8 3+8=11 11-5=6 #### 6"
    assert write_solution("2*3*4-9-9") == "2*3=6 6*4=24 24-9=15 15-9=6 #### 6"
    assert write_solution("1-8+2") == "1-8=-7 -7+2=-5 #### -5"
    for expression in ("3+4*2-5", "9-2*3*4+1", "1-8+2", "7*7"):
        assert evaluate(expression) == eval(expression)  # trusted literals; checks the step order


def test_arithmetic_splits_and_demonstrations():
    task = MultiStepArithmetic(seed=1, num_train=1000, num_test=100, num_ood=50)
    train, test, ood = (task.load(split) for split in ("train", "test", "ood"))
    assert train[0]["prompt"] == train[0]["expression"] + "=\n"
    assert train[0]["id"] == "arithmetic-train-0"
    assert all(
        p["expression"].count("+") + p["expression"].count("-") + p["expression"].count("*") == 3 for p in ood
    )
    expressions = [{p["expression"] for p in split} for split in (train, test, ood)]
    assert not expressions[0] & expressions[1] and not expressions[0] & expressions[2]
    assert len(expressions[1]) == len(test)
    assert MultiStepArithmetic(seed=1, num_train=1000, num_test=100, num_ood=50).load("test") == test
    problems = train[:200] + test + ood
    demonstrations = [task.demonstration(p) for p in problems]
    answers = [p["answer"] for p in problems]
    assert task.reward(["p"] * len(problems), demonstrations, answer=answers) == [1.0] * len(problems)


def test_arithmetic_reward_reads_the_final_answer():
    rewards = MultiStepArithmetic().reward(
        ["p"] * 5,
        ["4*2=8 #### 6", "4*2=8 3+8=11 11-5=6", "#### 7", "nothing", "#### -6"],
        answer=["6"] * 4 + ["-6"],
    )
    assert rewards == [1.0, 1.0, 0.0, 0.0, 1.0]


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed {x^{2}+1}", "x^{2}+1"),
        ("$\\boxed 5$", "5"),
        ("\\fbox{7}", "7"),
        ("\\boxed{unclosed", None),
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_marker_tag_and_integer_helpers():
    assert after_marker("a\n#### 1,234") == "1,234" and after_marker("none") is None
    assert last_tagged("<answer>1</answer><answer>2</answer>") == "2" and last_tagged("x") is None
    assert final_integer("steps 3 #### 1,234 later 5") == 1234
    assert final_integer("x=3, y=-12") == -12
    assert final_integer("#### " + "9" * 5000) is None and final_integer("none") is None


def test_a_split_larger_than_the_problem_space_fails_clearly():
    with pytest.raises(ValueError, match="could only draw"):
        Countdown(num_numbers=2, max_number=3, num_test=50).load("test")
    with pytest.raises(ValueError, match="could only draw"):
        MultiStepArithmetic(num_operations=1, max_operand=3, num_test=50).load("test")


def test_countdown_draws_cover_several_solutions_of_one_problem():
    countdown = Countdown(num_train=200, num_test=10, num_ood=10)
    problem = max(countdown.load("train"), key=lambda p: len(solve(p["numbers"], p["target"])))
    drawn = {countdown.demonstration(problem, draw=d) for d in range(20)}
    assert len(drawn) > 1
    assert all(verify_expression(e, problem["numbers"], problem["target"]) for e in drawn)
    assert countdown.demonstration(problem, draw=3) == countdown.demonstration(problem, draw=3)


# --------------------------------------------------------------------------- validation split

# sha256 (first 16 hex digits) of json.dumps(task.load(split)) for the default tasks (seed 0),
# computed before the validation split existed: adding it must leave every other split as it was
SPLIT_DIGESTS = {
    "countdown": {"train": "cdc01a2f2e217ee9", "test": "1a107e0a6d78dedd", "ood": "f1da8e3f1cebb46a"},
    "arithmetic": {"train": "bb0e0c5d9618e258", "test": "ce524be1c285c12d", "ood": "62bfe8225975e193"},
}


def split_digest(problems: list[dict]) -> str:
    return hashlib.sha256(json.dumps(problems).encode()).hexdigest()[:16]


@pytest.mark.parametrize("task_class", [Countdown, MultiStepArithmetic])
def test_validation_split_leaves_the_other_splits_byte_identical(task_class):
    task = task_class()
    for split, digest in SPLIT_DIGESTS[task.name].items():
        assert split_digest(task.load(split)) == digest, split
    assert "validation" not in task._problems  # drawn only when asked for
    if task_class is MultiStepArithmetic:  # the default train split leaves ~260 expressions: room for 200
        task.load("validation")
    for split, digest in SPLIT_DIGESTS[task.name].items():
        assert split_digest(task.load(split)) == digest, split


def problem_keys(task, problems: list[dict]) -> set:
    if isinstance(task, Countdown):
        return keys(problems)
    return {p["expression"] for p in problems}


@pytest.mark.parametrize("task_class", [Countdown, MultiStepArithmetic])
def test_validation_split_is_in_distribution_disjoint_distinct_and_deterministic(task_class):
    task = task_class(seed=2, num_train=512, num_validation=150)
    validation = task.load("validation")  # first, before the other splits were drawn
    assert len(validation) == 150 and validation[0]["id"] == f"{task.name}-validation-0"
    assert len(problem_keys(task, validation)) == 150
    for split in ("train", "test", "ood"):
        assert not problem_keys(task, validation) & problem_keys(task, task.load(split)), split
    assert task_class(seed=2, num_train=512, num_validation=150).load("validation") == validation
    assert task_class(seed=3, num_train=512, num_validation=150).load("validation") != validation
    if task_class is Countdown:  # the training distribution: train/test's numbers and target range
        assert all(len(p["numbers"]) == 3 and 0 <= p["target"] <= 100 for p in validation)
    else:
        assert all(sum(p["expression"].count(op) for op in "+-*") == 2 for p in validation)


def test_a_validation_split_the_train_split_leaves_no_room_for_names_the_settings():
    with pytest.raises(ValueError, match=r"num_train=20000.*num_validation=200"):
        Countdown().load("validation")  # the default train split covers all but ~40 keys
