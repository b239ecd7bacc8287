"""``python -m benchmarks.update_memory --quick``: the benchmark runs and the chunked update grows less."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_update_memory_benchmark_quick():
    result = subprocess.run([sys.executable, "-m", "benchmarks.update_memory", "--quick"], cwd=ROOT, text=True,
                            capture_output=True, timeout=600, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {match[0]: float(match[1]) for match in re.findall(r"^\| (full logits|chunks of 32) \| 2 x 65 \| (\d+) \|",
                                                                 result.stdout, re.MULTILINE)}
    assert set(rows) == {"full logits", "chunks of 32"}, result.stdout
    # 2 x 65 tokens x 151,936 x ~18 B = 340 MiB with the full logits; 32 tokens x ~12 B x 151,936 = 56 MiB in chunks
    assert rows["full logits"] > 200 and rows["chunks of 32"] < rows["full logits"] / 2.5, result.stdout
