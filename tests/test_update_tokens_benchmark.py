"""``python -m benchmarks.update_tokens --quick``: the benchmark runs and the token budget pads less (times are
printed, not asserted: the quick run's updates take milliseconds on a shared machine)."""

from __future__ import annotations

import re

import pytest
from script_modules import run_benchmark


@pytest.mark.slow
def test_update_tokens_benchmark_quick():
    output = run_benchmark("update_tokens", "--quick", timeout=600)
    rows = {match[0]: (int(match[1]), float(match[2]))
            for match in re.findall(r"^\| (padded|tokens|tokens/2|packed) \| [^|]+ \| (\d+) \| ([\d.]+) \|", output,
                                    re.MULTILINE)}
    assert set(rows) == {"padded", "tokens", "tokens/2", "packed"}, output
    # 8 completions, lengths 1..30 of 64 columns: 2-row padded micro-batches are half padding; sorted ones are not
    assert rows["padded"][1] > 0.4 and rows["tokens"][1] < rows["padded"][1] - 0.1, output
    assert rows["tokens"][0] < rows["padded"][0], output  # fewer, fuller micro-batches under the same bound
    assert rows["tokens/2"][1] < rows["tokens"][1], output  # a smaller budget: narrower micro-batches
    assert rows["packed"] == (1, 0.0), output  # 8 x (8 + lengths up to 30) real tokens fit one packed row of 144
    imbalance = re.search(r"as sampled ([\d.]+), with balance_ranks ([\d.]+)", output)
    assert imbalance and 1.0 <= float(imbalance[2]) < float(imbalance[1]), output  # balancing evens the 2 ranks out
