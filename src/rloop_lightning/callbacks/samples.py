"""Log a few sampled completions per N rollout steps as a W&B table (prompt, completion, reward).

Reads the trajectories ``GRPOModule.training_step`` returns (as ``ExpertHarvester`` does) and logs
through every ``WandbLogger`` of the trainer; with no W&B logger it does nothing, so a config can
keep it when switching loggers. Rank 0 logs its own rank's samples.
"""

from __future__ import annotations

import json

import lightning as L

# reward_columns: what reward functions passed to ``log_extra`` for the completion (TRL's extra columns)
COLUMNS = ["step", "prompt_id", "prompt", "completion", "reward", "correct", "num_tokens", "truncated",
           "reward_columns"]


def pick_rows(records: list[dict], count: int, max_chars: int) -> list[list]:
    """``count`` records spread evenly over the step's (prompt, completion) records, as table rows."""
    stride = max(1, len(records) // max(count, 1))
    chosen = records[::stride][:count]
    return [[r["step"], r["prompt_id"], r["prompt"][:max_chars], r["completion"][:max_chars], float(r["reward"]),
             bool(r["correct"]), int(r["num_tokens"]), bool(r["truncated"]), json.dumps(r.get("reward_columns", {}))]
            for r in chosen]


class SampleCompletionsTable(L.Callback):
    """Every ``every_n_steps`` rollout steps, log ``num_rows`` completions as a ``wandb.Table``.

    Args:
        every_n_steps: logging period in rollout steps (step 0 included).
        num_rows: completions per table, spread over the step's prompts.
        key: W&B key of the table.
        max_chars: prompts and completions are cut to this many characters.
    """

    def __init__(self, every_n_steps: int = 10, num_rows: int = 8, key: str = "samples/completions",
                 max_chars: int = 4000):
        if every_n_steps < 1 or num_rows < 1:
            raise ValueError(f"every_n_steps and num_rows must be >= 1, got {every_n_steps}, {num_rows}")
        self.every_n_steps = every_n_steps
        self.num_rows = num_rows
        self.key = key
        self.max_chars = max_chars
        self.num_tables = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        from lightning.pytorch.loggers import WandbLogger

        records = (outputs or {}).get("trajectories", [])
        if not records or not trainer.is_global_zero or records[0]["step"] % self.every_n_steps:
            return
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        rows = pick_rows(records, self.num_rows, self.max_chars)
        for logger in loggers:
            logger.log_table(key=self.key, columns=COLUMNS, data=rows, step=trainer.global_step)
        self.num_tables += 1
