"""Bad data names its file and row: type errors in task files (a number, list, bool or null where text
belongs), a parquet column of the wrong type, a corrupt parquet file, a hub dataset row, RFT records
with a non-text prompt or completion; RFT records longer than the context are truncated and counted.

Each case failed before: raw ``TypeError``s / ``ArrowInvalid``s with no file or row, ``"prompt": null``
trained on the text "None", a completion past the context trained past it with no word.
"""

from __future__ import annotations

import json
import logging
import sys
import types

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rloop_lightning.data.datamodules import ExpertDataModule
from rloop_lightning.policy import Policy
from rloop_lightning.records import RecordError
from rloop_lightning.rft import RFTModule, count_truncated
from rloop_lightning.tasks import GSM8K, MATH, DAPOMath

GOOD = {"question": "1+1?", "answer": "#### 2"}


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.mark.parametrize("value, kind", [(42, "int"), (["a", "b"], "list"), (True, "bool"), ({"x": 1}, "dict")],
                         ids=["int", "list", "bool", "dict"])
def test_a_gsm8k_row_with_a_non_text_question_names_file_line_and_type(tmp_path, value, kind):
    path = write_jsonl(tmp_path / "test.jsonl", [GOOD, {"question": value, "answer": "#### 3"}])
    with pytest.raises(RecordError, match=rf"{path}:2: field 'question' is {kind} \(.*\), expected text"):
        GSM8K(test_path=path).load("test")


def test_a_gsm8k_answer_that_is_a_number_names_the_row(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [GOOD, GOOD, {"question": "2+2?", "answer": 4}])
    with pytest.raises(RecordError, match=rf"{path}:3: field 'answer' is int \('4'\), expected text"):
        GSM8K(test_path=path).load("test")


def test_a_parquet_column_of_the_wrong_type_names_file_and_row(tmp_path):
    path = tmp_path / "test.parquet"
    pq.write_table(pa.table({"problem": [1, 2], "answer": ["1", "2"]}), path)
    with pytest.raises(RecordError, match=rf"{path}: row 1: field 'problem' is int \('1'\), expected text"):
        MATH(test_path=str(path)).load("test")


def test_a_numeric_math_answer_is_an_answer(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [{"problem": "2+3?", "answer": 5}, {"problem": "1/2?", "answer": 0.5}])
    assert [p["answer"] for p in MATH(test_path=path).load("test")] == ["5", "0.5"]


@pytest.mark.parametrize("row, message", [
    ({"prompt": 7, "reward_model": {"ground_truth": "1"}}, "field 'prompt' is int, expected text or a list of messages"),
    ({"prompt": [{"role": "user", "content": ["x"]}], "reward_model": {"ground_truth": "1"}},
     "field 'content' is list"),
    ({"prompt": "q", "reward_model": "1"}, "field 'reward_model' is str, expected an object"),
    ({"prompt": "q", "reward_model": {"ground_truth": [1]}}, "field 'ground_truth' is list"),
], ids=["int_prompt", "list_content", "str_reward_model", "list_ground_truth"])
def test_dapo_rows_of_the_wrong_type_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [row])
    with pytest.raises(RecordError, match=rf"{path}:1: {message}"):
        DAPOMath(train_path=path).load("train")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_parquet_file_is_named(tmp_path, damage):
    path = tmp_path / "test.parquet"
    pq.write_table(pa.table({"question": ["1+1?"] * 100, "answer": ["#### 2"] * 100}), path)
    data = path.read_bytes()
    path.write_bytes(b"not a parquet file at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(RecordError, match=rf"{path}: not a readable parquet file"):
        GSM8K(test_path=str(path)).load("test")


def test_a_hub_row_of_the_wrong_type_names_dataset_split_and_row(monkeypatch):
    """The hub cannot be reached here: ``datasets.load_dataset`` returns rows as the hub would."""
    rows = [GOOD, {"question": None, "answer": "#### 1"}, {"question": 3.5, "answer": "#### 1"}]
    fake = types.SimpleNamespace(load_dataset=lambda hub_id, config, split: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(RecordError, match=r"org/gsm \[train\] row 2: missing field 'question'"):
        GSM8K(path="org/gsm").load("train")
    rows.pop(1)
    with pytest.raises(RecordError, match=r"org/gsm \[train\] row 2: field 'question' is float"):
        GSM8K(path="org/gsm").load("train")


@pytest.mark.parametrize("row, message", [
    ({"prompt": None, "completion": "x"}, "field 'prompt' is NoneType"),
    ({"prompt": "p", "completion": 12}, r"field 'completion' is int \('12'\), expected text"),
    ({"prompt": ["p"], "completion": "x"}, "field 'prompt' is list"),
], ids=["null_prompt", "int_completion", "list_prompt"])
def test_an_rft_record_of_the_wrong_type_names_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "experts.jsonl", [{"prompt": "a", "completion": "b"}, row])
    with pytest.raises(RecordError, match=rf"{path}:2: {message}"):
        ExpertDataModule([path]).setup("fit")


def test_an_rft_parquet_column_of_the_wrong_type_names_the_row(tmp_path):
    path = tmp_path / "experts.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"], "completion": [1.5, 2.5]}), path)
    with pytest.raises(RecordError, match=rf"{path}: row 1: field 'completion' is float"):
        ExpertDataModule([str(path)]).setup("fit")


def test_rft_records_that_are_all_empty_completions_are_refused_naming_the_file(tmp_path):
    path = write_jsonl(tmp_path / "experts.jsonl", [{"prompt": f"{i} ->", "completion": c}
                                                    for i, c in enumerate(["", " ", "\n"])])
    with pytest.raises(ValueError, match=rf"every one of the 3 records in \[{path!r}\] has an empty completion"):
        ExpertDataModule([path]).setup("fit")


def test_an_empty_rft_completion_among_others_is_left_out_with_a_warning_naming_its_row(tmp_path, caplog):
    rows = [{"prompt": f"{i} ->", "completion": "" if i == 2 else f"{i}"} for i in range(5)]
    path = write_jsonl(tmp_path / "experts.jsonl", rows)
    table = tmp_path / "more.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "  "}, {"prompt": "q", "completion": "x"}]), table)
    data = ExpertDataModule([path, str(table)])
    with caplog.at_level(logging.WARNING, logger="rloop_lightning.data.datamodules"):
        data.setup("fit")
    assert [r["completion"] for r in data.dataset.records] == ["0", "1", "3", "4", "x"]
    assert (f"2 of 7 records have an empty completion (\"\" or whitespace only) and are left out of training: "
            f"{path}:3; {table}: row 1") in caplog.text


def test_records_past_the_length_limit_are_counted_and_a_prompt_past_it_is_refused():
    policy = Policy("rloop/micro-llama")
    short = {"prompt": "1 2 -> 3\n", "completion": "1+2"}
    prompt_tokens = len(policy.encode_prompts([short["prompt"]])[0])
    completion_tokens = len(policy.encode_completions([short["completion"]])[0])
    exact = prompt_tokens + completion_tokens  # a record of exactly the limit is not truncated
    assert count_truncated(policy, [short], limit=exact) == 0
    assert count_truncated(policy, [short, short], limit=exact - 1) == 2
    assert count_truncated(policy, [short], limit=prompt_tokens + 1) == 1  # one completion token kept
    with pytest.raises(ValueError, match=rf"record 1 \('1 2 -> 3\\n'...\): its prompt has {prompt_tokens} tokens, "
                                         rf"not below the length limit of {prompt_tokens}"):
        count_truncated(policy, [{"prompt": "1", "completion": ""}, short], limit=prompt_tokens)


def test_an_rft_phase_truncates_records_past_the_context_and_warns(tmp_path, caplog):
    path = write_jsonl(tmp_path / "experts.jsonl", [{"prompt": "1 2 -> 3\n", "completion": "1+2"},
                                                    {"prompt": "1 2 -> 3\n", "completion": "1+2" * 400}])
    module = RFTModule(Policy("rloop/micro-llama"), optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    with caplog.at_level(logging.WARNING, logger="rloop_lightning.rft"):
        trainer.fit(module, ExpertDataModule([path], batch_size=2))
    assert module.length_limit == 256  # the micro model's context
    assert "1 of 2 records are longer than 256 tokens (max_length=None, model context 256): their completions " \
           "are truncated to fit" in caplog.text


@pytest.mark.parametrize("field, value", [("path", "data/gsm8k"), ("test_path", "data/gsm8k/test"),
                                          ("test_path", "./gsm8k_test")],
                         ids=["under_a_local_directory", "not_a_hub_id", "dot_relative"])
def test_a_missing_relative_data_path_is_no_such_file_never_a_hub_request(field, value, tmp_path, monkeypatch):
    """Before: ``data/gsm8k`` (``./data`` exists) was sent to the Hub and failed after 35 s with "Couldn't
    reach 'data/gsm8k' on the Hub"; a missing ``path`` read as "a single file and would serve every split"."""
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)

    def load_dataset(*args, **kwargs):
        raise AssertionError(f"sent to the Hub: {args}")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    task = GSM8K(**{"path": None, field: value})
    with pytest.raises(FileNotFoundError, match=f"gsm8k: {field} '{value}' does not exist \\(no such file or "
                                                f"directory, relative to {tmp_path}\\); it is a local path"):
        task.load("test")


def test_a_hub_dataset_that_cannot_be_loaded_names_the_source_and_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'my-org/gsm8k-copy' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(OSError, match=f"'my-org/gsm8k-copy' is no local path \\(relative to {tmp_path}\\) and "
                                      "could not be loaded from the Hugging Face Hub as dataset 'my-org/gsm8k-copy', "
                                      "split 'test': Couldn't reach"):
        GSM8K(path="my-org/gsm8k-copy").load("test")
