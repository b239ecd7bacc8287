"""``python -m benchmarks.async_rollout --quick``: the benchmark runs end to end and prints both tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_async_rollout_benchmark_quick():
    result = subprocess.run([sys.executable, "-m", "benchmarks.async_rollout", "--quick"], cwd=ROOT, text=True,
                            capture_output=True, timeout=900, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert result.returncode == 0, result.stderr[-3000:]
    rates = re.findall(r"^\| rloop/tiny-llama \| hf \| (sync, \d+ thread\(s\)|async[^|]*) \| ([\d.]+) \| ([\d.]+) \|",
                       result.stdout, re.MULTILINE)
    assert len(rates) == 3 and any(setting.startswith("async") for setting, _, _ in rates), result.stdout
    assert all(float(rate) > 0 for _, rate, _ in rates)
    assert max(float(ratio) for setting, _, ratio in rates if setting.startswith("sync")) == 1.0
    quality = re.findall(r"^\| (sync|async) \| 1 \| 256 \| ([\d.]+) \|", result.stdout, re.MULTILINE)
    assert [mode for mode, _ in quality] == ["sync", "async"], result.stdout
    assert all(0.0 <= float(value) <= 1.0 for _, value in quality)
    profiles = re.findall(r"^\| rloop/tiny-llama \| hf \| (sync|async)[^|]* \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \| "
                          r"(-?[\d.]+) \| (-|[\d.]+) \|", result.stdout, re.MULTILINE)
    assert len(profiles) == 3, result.stdout  # step = rollout + update; only the async sampler has a busy time
    for mode, step, rollout, update, sampler in profiles:
        assert abs(float(step) - float(rollout) - float(update)) <= 0.011 and float(step) > 0
        assert (sampler == "-") == (mode == "sync")
