"""TRL's ``accuracy_reward`` (it reads chat messages) through ``rloop grpo fit`` on the Qwen2.5 stand-in,
after a short RFT warm-up on the MATH-format fixture's solutions (as the Countdown base is built): the
chat path runs end to end and some completions are right (non-zero rewards)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from rloop_lightning.cli import cli_main
from rloop_lightning.tasks import MATH

pytest.importorskip("trl.rewards")

MATH_FILES = Path(__file__).parent / "data" / "math_format"
TASK = {"class_path": "rloop_lightning.tasks.MATH", "init_args": {"path": str(MATH_FILES), "train_path": None}}
QUIET = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
         "enable_progress_bar": False, "enable_model_summary": False}


def write_yaml(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.mark.slow
def test_trl_accuracy_reward_scores_right_answers_of_the_warmed_up_stand_in(tmp_path):
    problems = MATH(path=str(MATH_FILES), train_path=None).load("train")
    demonstrations = tmp_path / "demonstrations.jsonl"
    demonstrations.write_text("".join(json.dumps({"prompt": p["prompt"], "completion": p["solution"]}) + "\n"
                                      for p in problems))
    rft = {"seed_everything": 0,
           "trainer": {**QUIET, "max_steps": 100, "default_root_dir": str(tmp_path / "base"),
                       "callbacks": [{"class_path": "rloop_lightning.callbacks.ExportPolicy"}]},
           "model": {"policy": {"model_name_or_path": "rloop/tiny-qwen2.5"},
                     "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 0.0}}},
           "data": {"class_path": "rloop_lightning.data.datamodules.ExpertDataModule",
                    "init_args": {"paths": [str(demonstrations)], "batch_size": 8}}}
    cli_main(["rft", "fit", "--config", write_yaml(tmp_path / "rft.yaml", rft)])
    metrics = tmp_path / "metrics.jsonl"
    grpo = {"seed_everything": 0,
            "trainer": {**QUIET, "max_steps": 2, "default_root_dir": str(tmp_path / "grpo"),
                        "callbacks": [{"class_path": "rloop_lightning.callbacks.MetricsRecorder",
                                       "init_args": {"path": str(metrics)}}]},
            "model": {"policy": {"model_name_or_path": str(tmp_path / "base" / "policy")},
                      "sampling": {"max_new_tokens": 32}, "num_generations": 4,
                      "reward_functions": ["trl.rewards.accuracy_reward"]},
            "data": {"class_path": "rloop_lightning.data.datamodules.PromptDataModule",
                     "init_args": {"task": TASK, "batch_size": 4}}}
    cli_main(["grpo", "fit", "--config", write_yaml(tmp_path / "grpo.yaml", grpo)])
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 2
    assert all(row["rewards/errors"] == 0 and row["rewards/timeouts"] == 0 for row in rows)
    assert sum(row["train/reward_mean"] for row in rows) > 0  # measured: 0.25 and 0.0625
