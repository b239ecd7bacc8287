"""RLoop's filter step (``build_expert_set``) and the per-prompt statistics it reads (``PromptStats``),
on hand-made trajectories with hand-computed answers."""

from __future__ import annotations

import random

import pytest

from rloop_lightning.loop.expert_set import ExpertSetSettings, build_expert_set
from rloop_lightning.prompt_stats import PromptRecord, PromptStats


def record(prompt_id: str, completion: str, step: int = 0) -> dict:
    return {"prompt_id": prompt_id, "prompt": f"{prompt_id}?", "completion": completion, "answer": "1",
            "step": step, "reward": 1.0, "logprob": -1.0, "num_tokens": len(completion)}


def stats_from(solves: dict[str, list[tuple[int, int, int]]]) -> PromptStats:
    """``{prompt: [(step, correct, samples), ...]}`` -> statistics updated step by step."""
    stats = PromptStats()
    for step in sorted({s for visits in solves.values() for s, _, _ in visits}):
        visits = [(pid, c, n) for pid, vs in solves.items() for s, c, n in vs if s == step]
        stats.update(step, [v[0] for v in visits], [v[1] for v in visits], [v[2] for v in visits])
    return stats


def keys(records: list[dict]) -> list[tuple]:
    return [(r["prompt_id"], r["step"], r["completion"]) for r in records]


# ---------------------------------------------------------------------------- filters


def test_success_rate_filter_keeps_prompts_at_or_below_the_threshold():
    stats = stats_from({
        "at": [(0, 2, 4)],  # 0.5: exactly the threshold -> kept
        "above": [(0, 3, 4)],  # 0.75 -> dropped
        "below": [(0, 1, 4), (1, 0, 4)],  # 1/8 -> kept
    })
    trajectories = [record("at", "a"), record("above", "b"), record("below", "c")]
    settings = ExpertSetSettings(filter="success_rate", hard_threshold=0.5, max_per_prompt=0)
    kept, summary = build_expert_set(trajectories, stats, settings)
    assert keys(kept) == [("at", 0, "a"), ("below", 0, "c")]
    assert summary["prompts_kept"] == 2
    stricter = ExpertSetSettings(filter="success_rate", hard_threshold=0.49, max_per_prompt=0)
    assert keys(build_expert_set(trajectories, stats, stricter)[0]) == [("below", 0, "c")]


def test_failed_by_start_keeps_prompts_the_starting_policy_failed_on_first_visit():
    stats = stats_from({
        "solved_first": [(0, 1, 4), (1, 0, 4)],  # solved on its first visit -> dropped
        "learned": [(0, 0, 4), (1, 3, 4)],  # failed first, solved later -> kept despite 3/8
        "late_first_visit": [(2, 4, 4)],  # first seen at step 2 and solved there -> dropped
    })
    trajectories = [record("solved_first", "x"), record("learned", "y", step=1),
                    record("late_first_visit", "z", step=2), record("never_seen", "w")]
    kept, summary = build_expert_set(trajectories, stats, ExpertSetSettings(filter="failed_by_start"))
    assert keys(kept) == [("learned", 1, "y")]  # a prompt missing from the statistics is not "failed"
    assert summary["prompts_solved"] == 4 and summary["prompts_kept"] == 1


def test_none_filter_keeps_every_solved_prompt():
    stats = stats_from({"easy": [(0, 4, 4)], "hard": [(0, 1, 4)]})
    kept, summary = build_expert_set([record("easy", "e"), record("hard", "h")], stats,
                                     ExpertSetSettings(filter="none"))
    assert keys(kept) == [("easy", 0, "e"), ("hard", 0, "h")]
    assert summary["hard_share"] == 1.0


# ---------------------------------------------------------------------------- dedup and cap


def test_dedup_normalises_whitespace_and_keeps_the_earliest_copy():
    trajectories = [record("p", "1 + 2", step=3), record("p", " 1  +\n2 ", step=1), record("p", "1+2", step=2),
                    record("p", "1 + 2", step=1)]
    settings = ExpertSetSettings(filter="none", max_per_prompt=0)
    kept, summary = build_expert_set(trajectories, PromptStats(), settings)
    # "1 + 2" (three spellings) and "1+2" differ; the kept copy of a spelling is its earliest one
    assert keys(kept) == [("p", 1, " 1  +\n2 "), ("p", 2, "1+2")]
    assert summary["duplicates_removed"] == 2
    without = build_expert_set(trajectories, PromptStats(), ExpertSetSettings(filter="none", dedup=False,
                                                                               max_per_prompt=0))
    assert len(without[0]) == 4 and without[1]["duplicates_removed"] == 0


def test_cap_picks_a_seeded_subset_sorted_and_independent_of_input_order():
    trajectories = [record("p", f"c{i}", step=i % 3) for i in range(6)] + [record("q", "only")]
    settings = ExpertSetSettings(filter="none", max_per_prompt=2, seed=7)
    kept, summary = build_expert_set(trajectories, PromptStats(), settings)
    assert summary["size"] == 3 and len(kept) == 3
    picked = [r for r in kept if r["prompt_id"] == "p"]
    assert len(picked) == 2 and all(r in trajectories for r in picked)
    assert keys(kept) == sorted(keys(kept))  # sorted by (prompt, step, completion)
    for shuffle_seed in range(5):
        shuffled = list(trajectories)
        random.Random(shuffle_seed).shuffle(shuffled)
        assert build_expert_set(shuffled, PromptStats(), settings) == (kept, summary)
    subsets = {tuple(keys(build_expert_set(trajectories, PromptStats(),
                                           ExpertSetSettings(filter="none", max_per_prompt=2, seed=s))[0]))
               for s in range(10)}
    assert len(subsets) > 1  # a random pick, not always the first two


def test_summary_numbers_are_exact():
    stats = stats_from({"a": [(0, 1, 4)], "b": [(0, 4, 4)], "c": [(0, 2, 4)]})
    trajectories = ([record("a", t) for t in ("1", "1 ", "2", "3", "4")]  # 1 duplicate, 4 distinct -> cap 3
                    + [record("b", "5")]  # easy: dropped
                    + [record("c", "6"), record("c", "6")])  # 1 duplicate
    settings = ExpertSetSettings(filter="success_rate", hard_threshold=0.5, max_per_prompt=3)
    kept, summary = build_expert_set(trajectories, stats, settings)
    assert summary == {"harvested": 8, "prompts_solved": 3, "prompts_kept": 2, "hard_share": pytest.approx(2 / 3),
                       "duplicates_removed": 2, "size": 4, "easy_records": 0}
    assert [r["prompt_id"] for r in kept] == ["a", "a", "a", "c"]


def test_easy_prompts_keep_fewer_completions_when_asked():
    stats = stats_from({"hard": [(0, 1, 4)], "easy": [(0, 4, 4)], "easy2": [(0, 3, 4)]})
    trajectories = ([record("hard", t) for t in ("1", "2", "3")] + [record("easy", t) for t in ("4", "5", "6")]
                    + [record("easy2", "7")])
    settings = ExpertSetSettings(filter="success_rate", hard_threshold=0.5, max_per_prompt=2, easy_per_prompt=1)
    kept, summary = build_expert_set(trajectories, stats, settings)
    assert [r["prompt_id"] for r in kept] == ["easy", "easy2", "hard", "hard"]  # sorted by prompt id
    assert summary["prompts_kept"] == 1 and summary["easy_records"] == 2 and summary["size"] == 4
    hard_only = build_expert_set(trajectories, stats, ExpertSetSettings(hard_threshold=0.5, max_per_prompt=2))[0]
    assert [r["prompt_id"] for r in hard_only] == ["hard", "hard"]


def test_empty_harvest_gives_an_empty_set():
    kept, summary = build_expert_set([], PromptStats(), ExpertSetSettings())
    assert kept == []
    assert summary == {"harvested": 0, "prompts_solved": 0, "prompts_kept": 0, "hard_share": 0.0,
                       "duplicates_removed": 0, "size": 0, "easy_records": 0}


# ---------------------------------------------------------------------------- PromptStats


def test_update_counts_attempts_successes_and_solve_steps():
    stats = PromptStats()
    assert stats.update(0, ["a", "b"], [2, 0], [4, 4]) is None  # nothing solved before
    assert stats.update(1, ["a"], [0], [4]) == 1.0
    assert stats.records["a"] == PromptRecord(attempts=8, successes=2, first_solved_step=0, last_solved_step=0,
                                              first_seen_step=0, last_seen_step=1)
    assert stats.records["b"] == PromptRecord(attempts=4, successes=0, first_seen_step=0, last_seen_step=0)
    assert stats.success_rate("a") == 0.25 and stats.success_rate("unseen") == 0.0


def test_forgetting_rate_on_a_hand_case():
    stats = PromptStats()
    assert stats.update(0, ["a", "b"], [1, 3], [4, 4]) is None
    assert stats.update(1, ["c"], [0], [4]) is None  # c was never solved: nothing to forget
    assert stats.update(2, ["a"], [0], [4]) == 1.0  # a solved at step 0, failed now
    assert stats.update(3, ["a", "b", "c"], [0, 2, 0], [4, 4, 4]) == 0.5  # a forgotten, b kept; c not at risk


def test_merge_of_two_ranks():
    rank0, rank1 = PromptStats(), PromptStats()
    rank0.update(0, ["a"], [0], [4])
    rank0.update(2, ["b"], [1], [4])
    rank1.update(1, ["a"], [3], [4])
    rank1.update(3, ["c"], [0], [4])
    rank0.merge(rank1)
    assert rank0.records["a"] == PromptRecord(attempts=8, successes=3, first_solved_step=1, last_solved_step=1,
                                              first_seen_step=0, last_seen_step=1)
    assert rank0.records["b"] == PromptRecord(4, 1, 2, 2, 2, 2)
    assert rank0.records["c"] == PromptRecord(4, 0, None, None, 3, 3)
    assert rank0.failed_at_first_visit("a") and not rank0.failed_at_first_visit("b")


def test_to_dict_from_dict_round_trip():
    stats = PromptStats()
    stats.update(0, ["a", "b"], [1, 0], [4, 4])
    stats.update(5, ["a"], [0], [4])
    restored = PromptStats.from_dict(stats.to_dict())
    assert restored.records == stats.records
    assert restored.to_dict() == stats.to_dict() == {
        "a": {"attempts": 8, "successes": 1, "first_solved_step": 0, "last_solved_step": 0,
              "first_seen_step": 0, "last_seen_step": 5},
        "b": {"attempts": 4, "successes": 0, "first_solved_step": None, "last_solved_step": None,
              "first_seen_step": 0, "last_seen_step": 0}}
