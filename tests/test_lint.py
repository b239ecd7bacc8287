"""The code passes ruff with the rule set pinned in pyproject.toml (unused imports, undefined names...)."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_passes():
    pytest.importorskip("ruff", reason="ruff not installed (the dev extra installs it)")
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "src", "tests", "scripts", "benchmarks"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
