"""``scripts/gpu_acceptance.sh`` runs end to end on a machine without CUDA and its report says that every
GPU check was skipped, naming each one (on a GPU machine the script is the real run: not tested here)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script runs the GPU checks for real")
def test_acceptance_script_runs_here_and_its_report_says_every_gpu_check_was_skipped(tmp_path):
    result = subprocess.run(["bash", "scripts/gpu_acceptance.sh", str(tmp_path)], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    checks = re.findall(r"^def (test_\w+)\(", (ROOT / "tests" / "test_gpu.py").read_text(), re.MULTILINE)
    report = (tmp_path / "report.md").read_text()
    assert f"**every GPU check was skipped ({len(checks)} of {len(checks)}): no CUDA device**" in report
    for check in checks:
        assert re.search(rf"^\| {check} \| skipped \| [\d.]+ \| no CUDA device: torch.cuda.is_available\(\) is False",
                         report, re.MULTILINE), check
    assert (tmp_path / "junit-gpu.xml").is_file() and (tmp_path / "junit-true-size.xml").is_file()
