"""The docs keep their promises: every benchmark module, script, config, test, linked file and figure that
README.md or a page under docs/ names exists in the repository, and the results page carries the
blocks that scripts/reproduce_tiny.py rewrites."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]


def named_paths(text: str) -> set[str]:
    """Repository paths a page names: ``python -m benchmarks.X``, ``scripts/X.py``, ``configs/....yaml``,
    ``tests/X.py`` (with an optional ``::test``)."""
    paths = {f"benchmarks/{name}.py" for name in re.findall(r"python -m benchmarks\.(\w+)", text)}
    paths |= set(re.findall(r"(?<![\w/.])((?:scripts|tests)/\w+\.py(?:::\w+)?)", text))
    paths |= set(re.findall(r"(?<![\w/.])(configs/[\w./-]+\.yaml)", text))
    return paths


def links(page: Path) -> set[Path]:
    """Local files a page links or embeds (``[text](path)``, ``![alt](path)``), anchors dropped."""
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text())
    return {page.parent / target.split("#")[0] for target in targets
            if not target.startswith(("http://", "https://", "#"))}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_named_module_script_config_and_test_exists(page):
    missing = []
    for path in sorted(named_paths(page.read_text())):
        file, _, test = path.partition("::")
        if not (REPO / file).is_file():
            missing.append(path)
        elif test and not re.search(rf"^def {test}\(", (REPO / file).read_text(), re.MULTILINE):
            missing.append(path)
    assert not missing, f"{page.name} names what the repository does not have: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_linked_file_exists(page):
    missing = sorted(str(target) for target in links(page) if not target.exists())
    assert not missing, f"{page.name} links to missing files: {missing}"


def test_results_page_has_the_blocks_reproduce_tiny_and_the_study_rewrite():
    text = (REPO / "docs" / "results.md").read_text()
    blocks = [("reproduce_tiny", stem) for stem in ("tiny_cpu", "tiny_cpu_arithmetic")]
    blocks += [("study", name) for name in ("countdown", "arithmetic", "countdown_pool512", "arithmetic_pool512",
                                            "countdown_small")]
    for marker, name in blocks:
        config = f"study/{name.split('_pool')[0]}" if marker == "study" else name
        assert (REPO / "configs" / f"{config}.yaml").is_file()
        begin, end = f"<!-- {marker}: {name} -->", f"<!-- end {marker}: {name} -->"
        assert text.count(begin) == 1 and text.count(end) == 1 and text.index(begin) < text.index(end), name
    # the page opens with the study: its final comparison and curves come before the earlier studies
    assert text.index("<!-- study: countdown -->") < text.index("<!-- reproduce_tiny: tiny_cpu -->")
    for task in ("countdown", "arithmetic"):
        assert text.index(f"results/study_{task}_curves.png") < text.index("## The study on Countdown")


def test_named_paths_finds_each_kind():
    text = ("`python -m benchmarks.grpo_step --quick`, `python scripts/trl_arm.py`, "
            "`--config configs/loop/ddp_cpu.yaml`, `tests/test_loop.py::test_x`, runs/study/scripts/x.py")
    assert named_paths(text) == {"benchmarks/grpo_step.py", "scripts/trl_arm.py", "configs/loop/ddp_cpu.yaml",
                                 "tests/test_loop.py::test_x"}


def test_ci_runs_the_readme_test_command():
    """README: "`.ci/run` runs exactly the second command" (the fresh-machine install and test run)."""
    readme = (REPO / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme, flags=re.S)
    test_command = commands[1]
    assert "pytest" in test_command and "\n" not in test_command
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert ci[-1] == test_command
