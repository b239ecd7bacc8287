"""``python -m benchmarks.update_memory --quick``: the benchmark runs and the chunked update grows less."""

from __future__ import annotations

import re

import pytest
from script_modules import run_benchmark


@pytest.mark.slow
def test_update_memory_benchmark_quick():
    output = run_benchmark("update_memory", "--quick", timeout=600)
    rows = {match[0]: float(match[1]) for match in re.findall(r"^\| (full logits|chunks of 32) \| 2 x 65 \| (\d+) \|",
                                                                 output, re.MULTILINE)}
    assert set(rows) == {"full logits", "chunks of 32"}, output
    # 2 x 65 tokens x 151,936 x ~18 B = 340 MiB with the full logits; 32 tokens x ~12 B x 151,936 = 56 MiB in chunks
    assert rows["full logits"] > 200 and rows["chunks of 32"] < rows["full logits"] / 2.5, output
