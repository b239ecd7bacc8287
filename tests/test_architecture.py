"""The package's import graph: dependencies run one way, from the command line down to the maths.

    cli -> loop -> {grpo, rft, data, evaluation, callbacks} -> {rollout, policy, tasks} -> rewards -> algorithms

Every import counts, including the ones inside functions: a lazy import back up the layers is still a
circle that a refactoring can turn into an import error.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "rloop_lightning"

# A module may import from its own top-level package/module and from lower layers only.
LAYERS = [
    {"algorithms", "agreement", "forwards", "micro_batches", "tiny_qwen", "prompt_stats", "records",
     "child_processes"},
    {"tiny"},
    {"strategies", "rewards"},
    {"policy", "tasks"},
    {"rollout", "policy_module"},
    {"evaluation", "grpo", "rft", "data"},
    {"callbacks"},
    {"loop"},
    {"cli"},
    {"__main__"},
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("rloop_lightning"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rloop_lightning"):
            for alias in node.names:  # ``from rloop_lightning import tiny`` imports a module
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) - {name} for name, path in paths.items()}


def top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_module_is_in_a_layer():
    tops = {top(module) for module in import_graph()} - {"rloop_lightning"}
    assert tops <= set(LAYER), f"modules without a layer: {sorted(tops - set(LAYER))}"


def test_no_module_imports_up_the_layers():
    upward = [f"{module} -> {target}" for module, targets in import_graph().items() for target in targets
              if top(target) != top(module) and top(target) in LAYER and top(module) in LAYER
              and LAYER[top(target)] > LAYER[top(module)]]
    assert not upward, "imports against the layers:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    graph = import_graph()
    state: dict[str, str] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target in graph and target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_every_module_imports_top_down():
    """Every module imported in a fresh interpreter, the command line first: a circle that the graph above
    misses (an import by a computed name) fails here."""
    modules = sorted((m for m in import_graph() if not m.endswith("__main__")), reverse=True)
    code = "import importlib\nfor m in %r: importlib.import_module(m)" % modules
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
