"""RLoop's *filter* step: build the expert set from the trajectories harvested during exploration.

From every verified-correct trajectory of every RL step of iteration k:
1. keep prompts that are hard for the policy: success rate over the phase <= ``hard_threshold``
   (``filter="success_rate"``), or failed by theta_k on its first visit (``filter="failed_by_start"``),
   or every solved prompt (``filter="none"``); ``easy_per_prompt > 0`` keeps the other solved
   prompts too, with fewer completions each (favouring hard prompts instead of keeping only them);
2. drop duplicate completions of a prompt (after whitespace normalisation);
3. keep at most ``max_per_prompt`` completions per hard prompt (``easy_per_prompt`` per easy one),
   chosen at random (seeded) so that solutions found early and late in the phase are equally likely;
4. optionally replay the expert sets of earlier iterations.
The paper favours hard prompts because easy ones are already solved reliably by theta_k: fitting
them again adds little and crowds out the rare solutions exploration found.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Literal, Optional

from rloop_lightning.prompt_stats import PromptStats


@dataclass
class ExpertSetSettings:
    """How harvested trajectories become the RFT training set."""

    filter: Literal["success_rate", "failed_by_start", "none"] = "success_rate"
    """Which solved prompts count as hard: solved at most ``hard_threshold`` of the time over the phase
    (``success_rate``), failed by theta_k at their first visit (``failed_by_start``), or all (``none``)."""
    hard_threshold: float = 0.5
    """With ``filter: success_rate``: keep prompts solved at most this often."""
    dedup: bool = True
    """Drop duplicate completions of a prompt (after whitespace normalisation)."""
    max_per_prompt: int = 4
    """Completions kept per hard prompt, drawn at random (seeded); 0 keeps every distinct one."""
    easy_per_prompt: Optional[int] = None
    """Completions kept per solved prompt the filter rejects; None (or 0): hard prompts only. None rather
    than 0 by default, so that run directories made before this setting existed still resume."""
    replay: bool = False
    """Add the expert sets of earlier iterations to this one."""
    seed: int = 0
    """Seed of the per-prompt draws."""

    def __post_init__(self) -> None:
        if not 0 <= self.hard_threshold <= 1:
            raise ValueError(f"expert_set.hard_threshold is a success rate, in [0, 1]; got {self.hard_threshold}")
        for name in ("max_per_prompt", "easy_per_prompt"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"expert_set.{name} must be >= 0, got {value}")


def is_hard(prompt_id: str, stats: PromptStats, settings: ExpertSetSettings) -> bool:
    if settings.filter == "none":
        return True
    if settings.filter == "failed_by_start":
        return stats.failed_at_first_visit(prompt_id)
    return stats.success_rate(prompt_id) <= settings.hard_threshold


def build_expert_set(trajectories: Iterable[dict], stats: PromptStats,
                     settings: ExpertSetSettings) -> tuple[list[dict], dict]:
    """Filter, deduplicate and cap correct trajectories; return (records, summary).

    Records are returned sorted by (prompt id, step, completion) so the set does not depend on the
    order shards were read in.
    """
    by_prompt: dict[str, list[dict]] = defaultdict(list)
    total = 0
    for record in trajectories:
        total += 1
        by_prompt[record["prompt_id"]].append(record)
    rng = random.Random(settings.seed)
    kept: list[dict] = []
    hard_prompts = duplicates = easy_records = 0
    for prompt_id in sorted(by_prompt):
        hard = is_hard(prompt_id, stats, settings)
        cap = settings.max_per_prompt if hard else (settings.easy_per_prompt or 0)
        if not hard and cap == 0:
            continue
        hard_prompts += hard
        candidates = sorted(by_prompt[prompt_id], key=lambda r: (r["step"], r["completion"]))
        if settings.dedup:
            seen: dict[str, dict] = {}
            for record in candidates:
                seen.setdefault(" ".join(record["completion"].split()), record)
            duplicates += len(candidates) - len(seen)
            candidates = list(seen.values())
        if cap and len(candidates) > cap:
            candidates = sorted(rng.sample(candidates, cap), key=lambda r: (r["step"], r["completion"]))
        kept.extend(candidates)
        easy_records += 0 if hard else len(candidates)
    summary = {
        "harvested": total, "prompts_solved": len(by_prompt), "prompts_kept": hard_prompts,
        "hard_share": hard_prompts / len(by_prompt) if by_prompt else 0.0,
        "duplicates_removed": duplicates, "size": len(kept), "easy_records": easy_records,
    }
    return kept, summary
