"""Scripts under ``scripts/`` imported as modules by the tests (scripts are files, not a package), and
benchmarks run as the user runs them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up by name
    spec.loader.exec_module(module)
    return module


def run_benchmark(name: str, *arguments: str, timeout: float) -> str:
    """``python -m benchmarks.<name> <arguments>`` from the repository root; its standard output (the
    tables), after asserting it succeeded."""
    result = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *arguments], cwd=ROOT, text=True,
                            capture_output=True, timeout=timeout, env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
