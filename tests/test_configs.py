"""Every shipped phase, evaluation and loop config parses against the code (nothing is instantiated)."""

from __future__ import annotations

from pathlib import Path

import pytest
from lightning.pytorch.cli import LightningCLI

from rloop_lightning.cli import fit_parser
from rloop_lightning.loop.phases import PhaseCLI, phase_cli
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.rft import RFTModule
from test_recipes import parse

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LOOP_CONFIGS = [CONFIGS / "tiny_cpu.yaml", CONFIGS / "tiny_cpu_arithmetic.yaml",
                *sorted(p for p in (CONFIGS / "study").glob("*.yaml") if not p.name.startswith("eval_"))]
STUDY_EVAL_CONFIGS = sorted((CONFIGS / "study").glob("eval_*.yaml"))
PHASES = {"base": RFTModule, "rft": RFTModule, "grpo": GRPOModule}


@pytest.fixture(autouse=True)
def no_instantiation(monkeypatch):
    monkeypatch.setattr(LightningCLI, "instantiate_classes", lambda self: None)
    monkeypatch.setattr(PhaseCLI, "before_instantiate_classes", lambda self: None)  # GPU checks: tested apart


@pytest.mark.parametrize("path", sorted(p for d in PHASES for p in (CONFIGS / d).glob("*.yaml")), ids=str)
def test_phase_config_parses(path):
    config = phase_cli(PHASES[path.parent.name], ["--config", str(path)], run=False).config
    assert config.model.policy.init_args.model_name_or_path


@pytest.mark.parametrize("path", sorted((CONFIGS / "eval").glob("*.yaml")) + STUDY_EVAL_CONFIGS, ids=str)
def test_eval_config_parses(path):
    config = parse("eval", ["--config", str(path)])
    assert config.evaluators


@pytest.mark.parametrize("path", LOOP_CONFIGS, ids=str)
def test_loop_config_parses_and_names_existing_phase_files(path):
    config = fit_parser().parse_args(["--config", str(path)])
    assert config.iterations >= 2
    root = Path(__file__).resolve().parents[1]
    for phase_file in (config.base.build_config, config.grpo.config, config.rft.config):
        assert (root / phase_file).exists(), phase_file
    for evaluator in config.evaluators:
        assert max(evaluator.init_args.ks) <= evaluator.init_args.num_samples
    if config.output == "best_validation":  # what the loop refuses before anything loads (curves.check_curve)
        assert any(evaluator.init_args.split == "validation" for evaluator in config.evaluators)


def test_the_main_jobs_hand_over_the_policy_best_on_validation():
    """The study's choice at the main job's pool and expert set (docs/results.md, "The map")."""
    for path in LOOP_CONFIGS[:2]:
        config = fit_parser().parse_args(["--config", str(path)])
        assert (config.output, config.iterations, config.expert_set.filter) == ("best_validation", 2, "success_rate")


@pytest.mark.parametrize("path", sorted((CONFIGS / "loop").glob("*.yaml")), ids=str)
def test_loop_fragment_parses_on_top_of_the_main_job(path):
    config = fit_parser().parse_args(["--config", str(CONFIGS / "tiny_cpu.yaml"), "--config", str(path)])
    assert config.trainer["devices"] == 2 and config.trainer["accelerator"] == "cpu"
    assert config.grpo.overrides == fit_parser().parse_args(["--config", str(CONFIGS / "tiny_cpu.yaml")]).grpo.overrides


def test_every_shipped_yaml_is_covered():
    covered = {p for d in PHASES for p in (CONFIGS / d).glob("*.yaml")}
    covered |= set((CONFIGS / "eval").glob("*.yaml")) | set(LOOP_CONFIGS) | set(STUDY_EVAL_CONFIGS) | set((CONFIGS / "loop").glob("*.yaml"))
    covered |= {p for d in ("recipes", "strategies", "sweeps", "loggers", "engines", "rehearsal")
                for p in (CONFIGS / d).glob("*.yaml")}
    # recipes/fragments/sweeps: test_recipes.py; engines: test_vllm_engine.py; rehearsal: test_rehearsal.py
    assert set(CONFIGS.rglob("*.yaml")) == covered
