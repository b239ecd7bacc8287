"""W&B offline: a 2-step GRPO run with the logger fragment and the sample table; no key leaks to disk."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from rloop_lightning.callbacks.samples import COLUMNS, SampleCompletionsTable, pick_rows
from rloop_lightning.cli import grpo

wandb = pytest.importorskip("wandb")

ROOT = Path(__file__).resolve().parents[1]
FAKE_KEY = "rloopfakekey" + "0123456789abcdef" * 2  # looks like a key; must never be written anywhere

RUN_CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: 2
  log_every_n_steps: 1
  enable_checkpointing: false
  enable_progress_bar: false
  default_root_dir: {root}
model:
  policy: {{model_name_or_path: rloop/micro-llama}}
  sampling: {{max_new_tokens: 8}}
  num_generations: 2
  micro_batch_size: 8
data:
  class_path: rloop_lightning.data.datamodules.PromptDataModule
  init_args:
    task: {{class_path: rloop_lightning.tasks.Countdown, init_args: {{num_train: 16, num_test: 4, num_ood: 4}}}}
    batch_size: 2
"""


def test_pick_rows_spreads_over_prompts():
    records = [{"step": 3, "prompt_id": f"p{i // 2}", "prompt": "x" * 10, "completion": "y" * 10, "reward": 1,
                "correct": True, "num_tokens": 10, "truncated": False} for i in range(8)]
    rows = pick_rows(records, 4, max_chars=5)
    assert [row[1] for row in rows] == ["p0", "p1", "p2", "p3"]
    assert len(rows[0]) == len(COLUMNS) and rows[0][2] == "xxxxx"
    with pytest.raises(ValueError):
        SampleCompletionsTable(every_n_steps=0)


def test_offline_grpo_run_logs_a_sample_table_and_no_api_key(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tmp_path / "run.yaml"
    config.write_text(RUN_CONFIG.format(root=tmp_path / "run"))
    save_dir = tmp_path / "wandb_save"
    try:
        cli = grpo(["fit", "--config", str(config), "--config", str(ROOT / "configs/loggers/wandb.yaml"),
                        "--trainer.logger.init_args.save_dir", str(save_dir)])
    finally:
        wandb.finish()
    assert cli.trainer.global_step == 2
    tables = [c for c in cli.trainer.callbacks if isinstance(c, SampleCompletionsTable)]
    assert len(tables) == 1 and tables[0].num_tables == 1  # step 0 of every_n_steps=10
    runs = list(save_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))
    assert list(runs[0].rglob("*.table.json")), "the sample table was not written"
    leaked = [path for path in tmp_path.rglob("*") if path.is_file() and FAKE_KEY.encode() in path.read_bytes()]
    assert leaked == []


def test_loop_logs_final_held_out_metrics_to_an_offline_wandb_run(tmp_path, monkeypatch):
    from rloop_lightning.cli import cli_main
    from test_loop import write_loop_config

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    cli_main(["fit", "--config", str(config), "--iterations", "1", "--wandb_project", "rloop-test"])
    records = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1  # offline runs keep history and summary in this record file
    deadline = time.monotonic() + 30  # wandb's service process may still be flushing after finish()
    while b"final/" not in (data := records[0].read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"final/countdown/test/pass@4" in data and b"eval/countdown/test/avg@4" in data
    assert b"expert_set/size" in data
    leaked = [p for p in (tmp_path / "run").rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert not leaked
