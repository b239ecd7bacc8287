"""Per-prompt solve statistics across the steps of an RL phase, and the forgetting rate they give.

RLoop's diagnosis of plain RL is forgetting: prompts the policy solved earlier in the phase are
failed later. For every prompt seen we keep attempts, successes and the first/last step solved;
the forgetting rate of a step is the share of its revisited, previously solved prompts that the
policy now fails on every sample.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence


@dataclass
class PromptRecord:
    attempts: int = 0
    successes: int = 0
    first_solved_step: Optional[int] = None
    last_solved_step: Optional[int] = None
    first_seen_step: Optional[int] = None
    last_seen_step: Optional[int] = None

    @property
    def success_rate(self) -> float:
        return self.successes / self.attempts if self.attempts else 0.0


class PromptStats:
    """Solve statistics keyed by prompt id."""

    def __init__(self):
        self.records: dict[str, PromptRecord] = {}

    def forgetting_counts(self, prompt_ids: Sequence[str], correct_counts: Sequence[int]) -> tuple[int, int]:
        """(forgotten, previously solved) among ``prompt_ids``, before this step is recorded."""
        previously_solved = {pid for pid in prompt_ids if pid in self.records and self.records[pid].successes > 0}
        solved_now = {pid for pid, c in zip(prompt_ids, correct_counts) if c > 0}
        return len(previously_solved - solved_now), len(previously_solved)

    def update(self, step: int, prompt_ids: Sequence[str], correct_counts: Sequence[int],
               samples: Sequence[int]) -> Optional[float]:
        """Record one step; return its forgetting rate (``None`` when no solved prompt was revisited)."""
        forgotten, previously_solved = self.forgetting_counts(prompt_ids, correct_counts)
        for pid, count, n in zip(prompt_ids, correct_counts, samples):
            record = self.records.setdefault(pid, PromptRecord())
            record.attempts += n
            record.successes += count
            record.last_seen_step = step
            if record.first_seen_step is None:
                record.first_seen_step = step
            if count > 0:
                record.last_solved_step = step
                if record.first_solved_step is None:
                    record.first_solved_step = step
        return forgotten / previously_solved if previously_solved else None

    def failed_at_first_visit(self, prompt_id: str) -> bool:
        """Whether the phase's starting policy failed the prompt on every sample of its first visit."""
        record = self.records.get(prompt_id)
        return record is not None and record.first_solved_step != record.first_seen_step

    def success_rate(self, prompt_id: str) -> float:
        record = self.records.get(prompt_id)
        return record.success_rate if record else 0.0

    def to_dict(self) -> dict:
        return {pid: asdict(record) for pid, record in self.records.items()}

    @classmethod
    def from_dict(cls, data: dict) -> "PromptStats":
        stats = cls()
        stats.records = {pid: PromptRecord(**fields) for pid, fields in data.items()}
        return stats

    def merge(self, other: "PromptStats") -> None:
        """Fold in another rank's statistics (ranks see disjoint prompts within a step)."""
        for pid, theirs in other.records.items():
            mine = self.records.setdefault(pid, PromptRecord())
            mine.attempts += theirs.attempts
            mine.successes += theirs.successes
            for name, pick in (("first_solved_step", min), ("last_solved_step", max), ("first_seen_step", min),
                               ("last_seen_step", max)):
                values = [v for v in (getattr(mine, name), getattr(theirs, name)) if v is not None]
                setattr(mine, name, pick(values) if values else None)
