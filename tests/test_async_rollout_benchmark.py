"""``python -m benchmarks.async_rollout --quick``: the benchmark runs end to end and prints both tables."""

from __future__ import annotations

import re

import pytest
from script_modules import run_benchmark


@pytest.mark.slow
def test_async_rollout_benchmark_quick():
    output = run_benchmark("async_rollout", "--quick", timeout=900)
    rates = re.findall(r"^\| rloop/tiny-llama \| hf \| (sync, \d+ thread\(s\)|async[^|]*) \| ([\d.]+) \| ([\d.]+) \|",
                       output, re.MULTILINE)
    assert len(rates) == 3 and any(setting.startswith("async") for setting, _, _ in rates), output
    assert all(float(rate) > 0 for _, rate, _ in rates)
    assert max(float(ratio) for setting, _, ratio in rates if setting.startswith("sync")) == 1.0
    quality = re.findall(r"^\| (sync|async) \| 1 \| 256 \| ([\d.]+) \|", output, re.MULTILINE)
    assert [mode for mode, _ in quality] == ["sync", "async"], output
    assert all(0.0 <= float(value) <= 1.0 for _, value in quality)
    profiles = re.findall(r"^\| rloop/tiny-llama \| hf \| (sync|async)[^|]* \| [\d.]+ \| [\d.]+ \| ([\d.]+) \| ([\d.]+) \| "
                          r"(-?[\d.]+) \| (-|[\d.]+) \|", output, re.MULTILINE)
    assert len(profiles) == 3, output  # step = rollout + update; only the async sampler has a busy time
    for mode, step, rollout, update, sampler in profiles:
        assert abs(float(step) - float(rollout) - float(update)) <= 0.011 and float(step) > 0
        assert (sampler == "-") == (mode == "sync")
