"""Sanity check of ``math_accuracy`` on GSM8K test: gold solutions must score as correct, others' not.

Each full gold solution (reasoning ending in ``#### N``) is scored as the *completion*
    * against its own ``answer``                        -> should be 1319/1319;
    * against another problem's answer (a derangement) -> should be correct only where the two gold
      numbers happen to be equal (GSM8K has many small answers: 5, 10, 20... so about 1% of random
      pairs share a value); among pairs with different gold numbers, 0 correct.

    python scripts/check_gsm8k_golds.py [--data /work/shared/data/gsm8k/test.jsonl] [--num-workers 2]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from rloop_lightning.rewards import RewardRunner, math_accuracy
from rloop_lightning.rewards.math import after_gsm8k_marker, normalize_answer

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k/test.jsonl"


def derangement(size: int, seed: int) -> list[int]:
    """A random permutation with no fixed point (Sattolo's algorithm: one cycle through all items)."""
    order = list(range(size))
    rng = random.Random(seed)
    for i in range(size - 1, 0, -1):
        j = rng.randrange(i)
        order[i], order[j] = order[j], order[i]
    return order


def measure(rows: list[dict], num_workers: int = 0, seed: int = 0) -> dict:
    """Score own and deranged golds; returns counts and the seconds each pass took."""
    solutions = [row["answer"] for row in rows]
    prompts = [row["question"] for row in rows]
    other = derangement(len(rows), seed)
    others = [solutions[j] for j in other]
    gold_values = [normalize_answer(after_gsm8k_marker(s) or "") for s in solutions]
    same_value = [gold_values[i] == gold_values[j] for i, j in enumerate(other)]
    with RewardRunner([math_accuracy], num_workers=num_workers, timeout=10.0) as runner:
        started = time.perf_counter()
        own = runner(prompts, solutions, {"answer": solutions})
        own_seconds = time.perf_counter() - started
        started = time.perf_counter()
        deranged = runner(prompts, solutions, {"answer": others})
        deranged_seconds = time.perf_counter() - started
    deranged_correct = [score == 1.0 for score in deranged.per_function["math_accuracy"]]
    return {
        "total": len(rows),
        "own_correct": int(own.rewards.sum().item()),
        "own_seconds": own_seconds,
        "deranged_correct": sum(deranged_correct),
        "deranged_seconds": deranged_seconds,
        "same_value_pairs": sum(same_value),
        "same_value_correct": sum(c and s for c, s in zip(deranged_correct, same_value)),
        "distinct_value_correct": sum(c and not s for c, s in zip(deranged_correct, same_value)),
        "timeouts_and_errors": own.num_timeouts
        + own.num_errors
        + deranged.num_timeouts
        + deranged.num_errors,
    }


def format_table(result: dict, seed: int) -> str:
    total, same = result["total"], result["same_value_pairs"]
    lines = [
        f"{'check':<40} {'correct':>8} {'of':>6} {'rate':>8} {'seconds':>8}",
        ("own gold solution vs own answer", result["own_correct"], total, result["own_seconds"]),
        (f"vs deranged answer (seed {seed})", result["deranged_correct"], total, result["deranged_seconds"]),
        ("  pairs whose gold numbers are equal", result["same_value_correct"], same, None),
        ("  pairs whose gold numbers differ", result["distinct_value_correct"], total - same, None),
    ]
    rows = [lines[0]]
    for name, correct, of, seconds in lines[1:]:
        rate = f"{100 * correct / of:.2f}%" if of else "-"
        rows.append(
            f"{name:<40} {correct:>8} {of:>6} {rate:>8} {'' if seconds is None else f'{seconds:.1f}':>8}"
        )
    rows.append(f"timeouts + errors: {result['timeouts_and_errors']}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--num-workers", type=int, default=0, help="0 scores in-process")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    result = measure(rows, num_workers=args.num_workers, seed=args.seed)
    print(format_table(result, args.seed))
    return result


if __name__ == "__main__":
    main()
