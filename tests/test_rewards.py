"""math_accuracy and the format rewards, plus the GSM8K gold-solution sanity check."""

from __future__ import annotations

import importlib.util
import json
import signal
import threading
from pathlib import Path

import pytest

from rloop_lightning.rewards import boxed_format, math_accuracy, think_answer_format
from rloop_lightning.rewards.math import after_gsm8k_marker, normalize_answer
from rloop_lightning.rewards.answers import last_boxed

GSM8K = Path(__file__).resolve().parent / "fixtures/gsm8k"  # 20 + 20 rows of GSM8K (MIT)
SCRIPT = Path(__file__).resolve().parents[1] / "scripts/check_gsm8k_golds.py"


def score(completion: str, gold: str) -> float:
    return math_accuracy(["prompt"], [completion], answer=[gold])[0]


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("First \\boxed{3}, no wait: \\boxed{\\frac{1}{2}}", "0.5"),  # last boxed wins
        ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}"),  # nested braces
        ("She makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "Janet...\n#### 18"),  # GSM8K style
        ("#### 1,000", "1000"),
        ("So the total is 1,000 dollars.\n#### $1,000.", "Work.\n#### 1,000"),
        ("The answer is -3.", "-3"),  # math-verify's own extraction
        ("\\boxed{2} and later #### 5", "2"),  # boxed preferred over ####
        ("\\boxed{x^2 + 2x + 1}", "(x+1)^2"),
    ],
)
def test_math_accuracy_correct(completion, gold):
    assert score(completion, gold) == 1.0


@pytest.mark.parametrize(
    "completion, gold",
    [
        ("\\boxed{3} then \\boxed{4}", "3"),
        ("#### 17", "Work.\n#### 18"),
        ("I have no idea.", "5"),
        ("", "5"),
        ("\\boxed{5", "5"),  # truncated box: math-verify finds no answer either
        ("__import__('os').system('echo pwned') \\boxed{1}", "2"),
        ("\\boxed{1}", ""),  # empty gold never matches
    ],
)
def test_math_accuracy_incorrect(completion, gold):
    assert score(completion, gold) == 0.0


def test_answer_extraction_helpers():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{2}{3}} c") == "\\frac{2}{3}"
    assert last_boxed("\\boxed{1} then \\boxed{2") is None  # a truncated final box is no answer
    assert last_boxed("no box") is None
    assert after_gsm8k_marker("work\n#### 42\n") == "42"
    assert after_gsm8k_marker("#### ") is None
    assert normalize_answer("$1,234,567.5.") == "1234567.5"
    assert normalize_answer("(1,2)") == "(1,2)"


def test_math_accuracy_off_the_main_thread_and_under_an_outer_timer():
    results = []
    thread = threading.Thread(target=lambda: results.append(score("\\boxed{7}", "7")))
    thread.start()
    thread.join()
    assert results == [1.0]  # math-verify's signal timeouts would raise ValueError here
    previous = signal.signal(signal.SIGALRM, signal.SIG_IGN)
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert score("\\boxed{7}", "7") == 1.0
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert remaining > 90.0  # math-verify's signal.alarm(0) would have cancelled it


def test_boxed_format():
    completions = [
        "Thus \\boxed{42}.",
        "\\boxed{1} or \\boxed{2}",
        "\\boxed{}",
        "\\boxed{\\frac{1}{2}",
        "no box",
        "\\boxed{\\frac{1}{2}}",
    ]
    assert boxed_format(["p"] * 6, completions) == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_think_answer_format():
    completions = [
        "<think>add them</think>\n<answer>5</answer>",
        "<think>a</think><answer> </answer>",
        "<answer>5</answer>",
        "<think>a</think><answer>5</answer> trailing",
        "<think>a<think>b</think><answer>5</answer>",
    ]
    assert think_answer_format(["p"] * 5, completions) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_gsm8k_gold_solutions_score_as_their_own_answers_only():
    spec = importlib.util.spec_from_file_location("check_gsm8k_golds", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines() if line.strip()]
    # seed 8 pairs test rows 0 and 13, whose gold numbers are both 18: the one pair that may score
    result = script.measure(rows, num_workers=0, seed=8)
    assert result["total"] == 20
    assert result["own_correct"] == 20
    assert result["timeouts_and_errors"] == 0
    # Deranged answers are "correct" exactly where two problems share a gold number, never otherwise.
    assert result["same_value_pairs"] == 1
    assert result["same_value_correct"] == 1
    assert result["distinct_value_correct"] == 0
    assert result["deranged_correct"] == 1
