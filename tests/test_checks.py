"""Every value checked before any model loads: ``rloop fit`` refuses a bad value in seconds, naming the phase
and the field, before the run directory is created (``loop.checks``, and each class's own ``__init__`` /
``__post_init__``, so the standalone commands refuse it too).

Each case failed before: ``num_generations: 1``, ``batch_size: 0``, ``max_new_tokens: 0``, a negative
temperature or top_k, ``reward_timeout: 0``, ``devices: 0`` and ``checkpoint_every_n_steps: 0`` after theta_0's
evaluation or a whole GRPO phase; ``hard_threshold: 1.5`` as no filter; ``-0.5`` and ``max_steps: 0`` as
"empty expert set"; ``limit: 0`` evaluated every problem; a 1 MB prompt failed at the first rollout.
Round 3: a broken or empty chat template, an EOS the model lacks, ``seed: -7``, a ``run_dir`` that is a file
and a prompt that fills the context on its own gave raw errors naming none of them.
"""

from __future__ import annotations

import json
import shutil

import pytest

from rloop_lightning import tiny
from rloop_lightning.cli import cli_main
from rloop_lightning.data.datamodules import ExpertDataModule, PromptDataModule
from rloop_lightning.evaluation import Evaluator
from rloop_lightning.loop.expert_set import ExpertSetSettings
from rloop_lightning.policy import Policy
from rloop_lightning.rollout.base import SamplingParams
from rloop_lightning.rollout.hf import HFGenerateEngine
from rloop_lightning.strategies import check_trainer_values
from rloop_lightning.tasks import Countdown
from test_loop import REPO, write_loop_config

GRPO, RFT = "grpo phase .*grpo.yaml", "rft phase .*rft.yaml"
GRPO_PARSE = "phase config .*grpo.yaml"


def grpo(**overrides) -> list[str]:
    return ["--grpo.overrides", json.dumps({"trainer.max_steps": 3, **overrides})]


def rft(**overrides) -> list[str]:
    return ["--rft.overrides", json.dumps({"trainer.max_epochs": 1, **overrides})]


CASES = {
    "num_generations_1": (grpo(**{"model.num_generations": 1}), f"{GRPO}.*num_generations must be >= 2"),
    "grpo_batch_size_0": (grpo(**{"data.init_args.batch_size": 0}), f"{GRPO}.*batch_size must be >= 1, got 0"),
    "max_new_tokens_0": (grpo(**{"model.sampling.max_new_tokens": 0}), f"{GRPO}.*max_new_tokens must be >= 1, got 0"),
    "temperature_-1": (grpo(**{"model.sampling.temperature": -1}), f"{GRPO}.*temperature must be >= 0, got -1"),
    "top_k_-1": (grpo(**{"model.sampling.top_k": -1}), f"{GRPO}.*top_k must be >= 0"),
    "reward_timeout_0": (grpo(**{"model.reward_timeout": 0}), f"{GRPO}.*reward_timeout > 0"),
    "grpo_limit_0": (grpo(**{"data.init_args.limit": 0}), f"{GRPO}.*limit must be >= 1 or null"),
    "grpo_max_steps_0": (grpo(**{"trainer.max_steps": 0}), f"{GRPO_PARSE}.*trainer.max_steps must be >= 1"),
    "rft_max_epochs_0": (rft(**{"trainer.max_epochs": 0}), "phase config .*rft.yaml.*trainer.max_epochs must be >= 1"),
    "rft_batch_size_0": (rft(**{"data.init_args.batch_size": 0}), f"{RFT}.*batch_size must be >= 1, got 0"),
    "rft_max_length_0": (rft(**{"model.max_length": 0}), f"{RFT}.*max_length must be >= 1 or null"),
    "devices_0": (["--trainer", json.dumps({"devices": 0})], f"{GRPO_PARSE}.*trainer.devices must be >= 1"),
    "hard_threshold_1.5": (["--expert_set.hard_threshold", "1.5"], r"expert_set.hard_threshold is a success rate, "
                                                                    r"in \[0, 1\]; got 1.5"),
    "hard_threshold_-0.5": (["--expert_set.hard_threshold", "-0.5"], "expert_set.hard_threshold .* got -0.5"),
    "max_per_prompt_-1": (["--expert_set.max_per_prompt", "-1"], "expert_set.max_per_prompt must be >= 0, got -1"),
    "checkpoint_every_n_steps_0": (["--checkpoint_every_n_steps", "0"], "checkpoint_every_n_steps must be >= 1 or null"),
    "checkpoint_every_seconds_0": (["--checkpoint_every_seconds", "0"], "checkpoint_every_seconds must be > 0 or null"),
    "curve_every_n_steps_0": (["--curve_every_n_steps", "0"], "curve_every_n_steps must be >= 1 .*got 0"),
    "curve_past_a_phase": (["--curve_every_n_steps", "4"], "curve_every_n_steps=4 exceeds the 3 RL steps of a GRPO phase"),
    "curve_without_evaluators": (["--curve_every_n_steps", "2", "--evaluators", "[]"],
                                 "curve_every_n_steps is set but evaluators is empty"),
    "best_validation_without_validation": (["--output", "best_validation"], "no evaluator has split: validation"),
    "grpo_prompt_past_the_context": (grpo(**{"model.sampling.max_new_tokens": 250}),
                                     r"grpo phase, task 'countdown' split 'train' \(model.sampling.max_new_tokens\): "
                                     r"prompt 0 has \d+ tokens; with max_new_tokens=250 it exceeds the model context "
                                     "of 256 tokens"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_value_fails_before_anything_is_written_naming_phase_and_field(case, tmp_path):
    arguments, message = CASES[case]
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    with pytest.raises(ValueError, match=message):
        cli_main(["fit", "--config", str(config), *arguments])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value, message", [
    ("limit", 0, "limit must be >= 1 or null"),
    ("num_samples", 0, "num_samples must be >= 1"),
    ("ks", [1, 8], r"pass@k needs 1 <= k <= num_samples=4; got ks=\[1, 8\]"),
    ("reward_timeout", 0, "need num_workers >= 0 and timeout > 0"),
    ("split", "validation", r"num_train=20000\) leaves too few problems for num_validation=200"),
], ids=["limit", "num_samples", "ks", "reward_timeout", "validation_split_without_room"])
def test_an_evaluator_value_fails_before_anything_is_written(field, value, message, tmp_path):
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    evaluator = {"task": {"class_path": "rloop_lightning.tasks.Countdown", "init_args": {"num_test": 4}},
                 "num_samples": 4, "ks": [1, 4], field: value}
    with pytest.raises(ValueError, match=message):
        cli_main(["fit", "--config", str(config), "--evaluators", json.dumps([evaluator])])
    assert not (tmp_path / "run").exists()


def test_a_one_megabyte_prompt_in_an_evaluation_fails_before_anything_is_written(tmp_path):
    data = tmp_path / "test.jsonl"
    rows = [{"question": "1+1?", "answer": "#### 2"}, {"question": "x " * 500_000, "answer": "#### 1"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    evaluator = {"task": {"class_path": "rloop_lightning.tasks.GSM8K", "init_args": {"test_path": str(data)}},
                 "num_samples": 1, "ks": [1], "sampling": {"max_new_tokens": 8}}
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    with pytest.raises(ValueError, match=r"evaluators.0 \(task 'gsm8k' split 'test', sampling.max_new_tokens\): "
                                         r"prompt 1 has \d{6,} tokens; with max_new_tokens=8 it exceeds the model "
                                         "context of 256 tokens"):
        cli_main(["fit", "--config", str(config), "--evaluators", json.dumps([evaluator])])
    assert not (tmp_path / "run").exists()


MICRO = ["--model.policy.model_name_or_path", "rloop/micro-llama"]


def test_the_standalone_commands_check_the_same_values(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ValueError, match=r"top_k must be >= 0 \(0 disables top-k\), got -1"):
        cli_main(["grpo", "fit", "--config", "configs/grpo/tiny_countdown.yaml", *MICRO, "--model.sampling.top_k", "-1"])
    with pytest.raises(ValueError, match="trainer.max_steps must be >= 1"):
        cli_main(["rft", "fit", "--config", "configs/rft/tiny_countdown.yaml", *MICRO, "--trainer.max_steps", "0"])
    with pytest.raises(ValueError, match="limit must be >= 1 or null"):
        cli_main(["eval", "--policy.model_name_or_path", "rloop/micro-llama", "--evaluators",
                  json.dumps([{"task": "rloop_lightning.tasks.Countdown", "limit": 0}])])


def test_boundaries_are_accepted():
    """The edge of each range is valid: threshold 0 and 1, caps 0, limit 1, top_k 0, temperature 0, -1 steps."""
    ExpertSetSettings(hard_threshold=0.0, max_per_prompt=0, easy_per_prompt=0)
    ExpertSetSettings(hard_threshold=1.0)
    SamplingParams(temperature=0.0, top_k=0, max_new_tokens=1)
    PromptDataModule(Countdown(num_train=4), batch_size=1, limit=1)
    ExpertDataModule(["x.jsonl"], batch_size=1)
    Evaluator(Countdown(num_test=4), num_samples=1, ks=[1], limit=1)
    for trainer in ({"max_steps": -1, "max_epochs": None, "devices": "auto"}, {"max_steps": 1, "max_epochs": 1,
                                                                              "devices": 1}, {"devices": -1}):
        check_trainer_values(trainer)
    with pytest.raises(ValueError, match="max_epochs"):
        check_trainer_values({"max_epochs": 0})


# ---------------------------------------------------------------------------- round 3: named, not raw


@pytest.mark.parametrize("tokenizer, message", [
    ({"chat_template": "{% for m in messages %}{{ m.content }"},
     "the chat template of '.*broken' .* fails on a prompt: TemplateSyntaxError: unexpected '}'"),
    ({"chat_template": "{{ raise_exception('no system role') }}"},
     "the chat template of '.*broken' .* fails on a prompt: TemplateError: no system role"),
    ({"chat_template": "{% if false %}x{% endif %}"},
     r"the chat template \(the tokenizer's chat_template\) of '.*broken' turns prompt 0 .* into no tokens"),
    ({"eos_token": "<|im_end|>"}, "the tokenizer of '.*broken' has eos_token '<|im_end|>' with id 99, but the "
                                  r"model's embedding has 99 tokens \(ids 0..98\)"),
], ids=["template_syntax", "template_raises", "template_renders_nothing", "eos_past_the_embedding"])
def test_a_broken_tokenizer_is_named_before_any_weights_load(tokenizer, message, tmp_path):
    """Before: jinja2's TemplateSyntaxError/TemplateError naming no model, ``IndexError: index -1 is out of
    bounds`` at the first rollout, ``IndexError: index out of range in self`` in RFT's embedding lookup."""
    directory = tmp_path / "broken"
    shutil.copytree(tiny.materialize("rloop/micro-llama"), directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, **tokenizer}))
    with pytest.raises(ValueError, match=message):
        Policy(str(directory))


@pytest.mark.parametrize("command, message", [
    (["fit", "--seed", "-7"], r"seed must be in \[0, 4294966294\] \(the phases are seeded up to seed \+ 1001\), "
                              r"as NumPy takes seeds in \[0, 2\*\*32 - 1\]; got -7"),
    (["fit", "--seed", str(2**32 - 1)], "seed must be in .*; got 4294967295"),
    (["grpo", "fit", "--config", "configs/grpo/tiny_countdown.yaml", "--seed_everything", "-7"],
     r"seed_everything must be in \[0, 4294967295\], as NumPy takes seeds .*; got -7"),
], ids=["loop_seed_negative", "loop_seed_past_the_last_phase", "phase_seed_everything"])
def test_a_seed_numpy_cannot_take_is_named(command, message, tmp_path, monkeypatch):
    """Before: Lightning's "-7 is not in bounds, numpy accepts from 0 to 4294967295", naming no setting (and
    a loop seed near 2**32 failed only at iteration 1's RFT phase)."""
    monkeypatch.chdir(REPO)
    if command[0] == "fit":
        command = ["fit", "--config", str(write_loop_config(tmp_path / "configs", tmp_path / "run")), *command[1:]]
    with pytest.raises(ValueError, match=message):
        cli_main(command)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["file", "under_a_file"])
def test_a_run_dir_that_is_a_file_is_named_before_anything_is_written(where, tmp_path):
    """Before: a bare ``FileExistsError: [Errno 17] File exists`` from the lock's ``mkdir``."""
    (tmp_path / "taken").write_text("notes\n")
    run_dir = tmp_path / "taken" if where == "file" else tmp_path / "taken" / "run"
    config = write_loop_config(tmp_path / "configs", run_dir)
    kind = "is a file" if where == "file" else "lies under '.*taken', a file"
    with pytest.raises(NotADirectoryError, match=f"run_dir '.*' {kind}, not a directory"):
        cli_main(["fit", "--config", str(config)])
    assert (tmp_path / "taken").read_text() == "notes\n"


def test_a_prompt_that_fills_the_context_on_its_own_is_told_so():
    """Before: "lower max_new_tokens to -44 or less" (-1048404 for a 1 MB prompt)."""
    policy = Policy("rloop/micro-llama")
    prompts = policy.encode_prompts(["1 2 -> 3", "7 " * 150])
    with pytest.raises(ValueError, match=r"prompt 'long' has 300 tokens; .* the longest prompt fills the context on "
                                         "its own, so no max_new_tokens fits: shorten or drop the prompts of 256 "
                                         "tokens or more") as error:
        HFGenerateEngine().check_prompt_lengths(policy, prompts, SamplingParams(max_new_tokens=8), 256,
                                                ["short", "long"])
    assert "lower max_new_tokens" not in str(error.value)
    with pytest.raises(ValueError, match="lower max_new_tokens to 6 or less"):  # one that fits on its own
        HFGenerateEngine().check_prompt_lengths(policy, [prompts[0], [5] * 250], SamplingParams(max_new_tokens=8),
                                                256, ["short", "long"])
