"""Real-data adapters (GSM8K, MATH, DAPOMath) on local files; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rloop_lightning.records import RecordError
from rloop_lightning.tasks import GSM8K, MATH, DAPOMath
from rloop_lightning.tasks.hub import DEFAULT_INSTRUCTION, strip_dapo_wrapper

GSM8K_DIR = Path(__file__).resolve().parent / "fixtures/gsm8k"  # 20 + 20 rows of GSM8K (MIT)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_gsm8k_loads_the_real_files():
    task = GSM8K(path=str(GSM8K_DIR))
    train, test = task.load("train"), task.load("test")
    assert (len(train), len(test)) == (20, 20)
    first = test[0]
    assert first["answer"] == "18" and first["id"] == "gsm8k-test-0"
    assert first["prompt"].startswith("Janet") and first["prompt"].endswith(DEFAULT_INSTRUCTION)
    assert first["solution"].endswith("#### 18")
    assert all(p["answer"].lstrip("-").isdigit() for p in train + test)
    assert len(GSM8K(test_path=str(GSM8K_DIR / "test.jsonl"), limit=5).load("test")) == 5
    with pytest.raises(ValueError, match="ood_path"):
        task.load("ood")


def test_gsm8k_strips_thousands_commas_and_rejects_missing_final_line(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"question": "q", "answer": "work\n#### 1,200"}])
    assert GSM8K(test_path=str(good)).load("test")[0]["answer"] == "1200"
    bad = write_jsonl(
        tmp_path / "bad.jsonl", [{"question": "q", "answer": "#### 1"}, {"question": "q", "answer": "2"}]
    )
    with pytest.raises(RecordError, match=r"bad\.jsonl:2: .*####"):
        GSM8K(test_path=str(bad)).load("test")


def test_single_file_path_is_refused_and_directory_is_split_by_name(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"question": "a", "answer": "#### 1"}])
    write_jsonl(
        tmp_path / "test.jsonl",
        [{"question": "b", "answer": "#### 2"}, {"question": "c", "answer": "#### 3"}],
    )
    task = GSM8K(path=str(tmp_path))
    assert [p["answer"] for p in task.load("train")] == ["1"]
    assert [p["answer"] for p in task.load("test")] == ["2", "3"]
    with pytest.raises(ValueError, match="single file"):
        GSM8K(path=str(tmp_path / "train.jsonl")).load("test")


MATH_RECORDS = [
    {"problem": "1+1?", "solution": "It is $\\boxed{2}$.", "answer": "2"},
    {"problem": "Half?", "solution": "So $\\boxed{\\frac{1}{2}}$."},  # gold from the last box
    {"problem": "Set?", "solution": "\\boxed{0} no, \\boxed{\\{1,2\\}}", "answer": ""},
]


def test_math_reads_answer_or_last_boxed(tmp_path):
    path = write_jsonl(tmp_path / "math.jsonl", MATH_RECORDS)
    problems = MATH(test_path=str(path), instruction="").load("test")
    assert [p["answer"] for p in problems] == ["2", "\\frac{1}{2}", "\\{1,2\\}"]
    assert problems[0]["prompt"] == "1+1?" and problems[1]["solution"].startswith("So")


def test_math_reads_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    from pyarrow import parquet

    path = tmp_path / "test-00000-of-00001.parquet"
    parquet.write_table(pyarrow.Table.from_pylist(MATH_RECORDS[:2]), path)
    assert [p["answer"] for p in MATH(path=str(tmp_path)).load("test")] == ["2", "\\frac{1}{2}"]
    broken = tmp_path / "broken.parquet"
    parquet.write_table(pyarrow.Table.from_pylist([{"problem": "p", "solution": "no box"}]), broken)
    with pytest.raises(RecordError, match=r"broken\.parquet: row 1: .*'answer'"):
        MATH(test_path=str(broken)).load("test")


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [MATH_RECORDS[0], "", '{"problem": "x", oops'])
    with pytest.raises(RecordError, match=r"bad\.jsonl:3: malformed JSON"):
        MATH(test_path=str(path)).load("test")


def test_missing_answer_names_field_file_and_line(tmp_path):
    path = write_jsonl(
        tmp_path / "noanswer.jsonl", [MATH_RECORDS[0], "", {"problem": "p", "solution": "none"}]
    )
    with pytest.raises(RecordError, match=r"noanswer\.jsonl:3: missing field 'answer'"):
        MATH(test_path=str(path)).load("test")
    path = write_jsonl(tmp_path / "noproblem.jsonl", [{"question": "p", "answer": "1"}])
    with pytest.raises(RecordError, match=r"noproblem\.jsonl:1: missing field 'problem'"):
        MATH(test_path=str(path)).load("test")


def test_empty_split_raises_naming_the_source(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(ValueError, match="empty.*empty\\.jsonl"):
        MATH(test_path=str(path)).load("test")


def dapo_record(problem: str, truth: str) -> dict:
    wrapped = (
        "Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
        f'{problem}\n\nRemember to put your answer on its own line after "Answer:".'
    )
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": wrapped}],
        "reward_model": {"ground_truth": truth, "style": "rule"},
    }


def test_dapo_maps_chat_prompt_and_ground_truth_and_drops_repeats(tmp_path):
    records = [
        dapo_record("What is 2+3?", "5"),
        dapo_record("What is 2+3?", "5"),
        dapo_record("Find x.", "34"),
    ]
    path = write_jsonl(tmp_path / "dapo.jsonl", records)
    problems = DAPOMath(train_path=str(path)).load("train")
    assert [p["answer"] for p in problems] == ["5", "34"]
    assert problems[0]["prompt"] == "What is 2+3?" + DEFAULT_INSTRUCTION
    assert [p["id"] for p in problems] == ["dapo_math-train-0", "dapo_math-train-1"]
    assert strip_dapo_wrapper("plain question") == "plain question"
    with pytest.raises(ValueError, match="test_path"):
        DAPOMath(train_path=str(path)).load("test")


def test_dapo_missing_ground_truth_names_field_and_file(tmp_path):
    record = dapo_record("p", "1")
    record["reward_model"] = {"style": "rule"}
    path = write_jsonl(tmp_path / "dapo_bad.jsonl", [dapo_record("q", "2"), record])
    with pytest.raises(RecordError, match=r"dapo_bad\.jsonl:2: missing field 'reward_model.ground_truth'"):
        DAPOMath(train_path=str(path)).load("train")


def test_limit_must_be_positive():
    with pytest.raises(ValueError, match="limit"):
        GSM8K(limit=0)
