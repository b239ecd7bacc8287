"""scripts/trl_arm.py takes its numbers from the GRPO phase YAML (and the loop's overrides), and
stops on a setting TRL's side cannot follow, so the TRL arm cannot drift from the phase it mirrors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from script_modules import load_script

PHASE = Path(__file__).resolve().parents[1] / "configs" / "grpo" / "tiny_countdown.yaml"


@pytest.fixture(scope="module")
def trl_arm():
    return load_script("trl_arm")


def phase_file(tmp_path: Path, **changes) -> Path:
    """The shipped GRPO phase YAML with dotted ``changes`` (``__`` for ``.``) written to ``tmp_path``."""
    config = yaml.safe_load(PHASE.read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "phase.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_settings_follow_the_phase_yaml_and_the_loop_overrides(trl_arm, tmp_path):
    path = phase_file(tmp_path, model__num_generations=4, model__sampling__max_new_tokens=24,
                      model__loss__clip_eps_high=0.3, data__init_args__batch_size=12, data__init_args__limit=300)
    settings = trl_arm.grpo_phase_settings(path, {"trainer.max_steps": 7, "model.optimizer.init_args.lr": 1e-4})
    assert settings == {"steps": 7, "lr": 1e-4, "prompts_per_step": 12, "num_prompts": 300, "num_generations": 4,
                        "max_completion_length": 24, "epsilon_high": 0.3}


@pytest.mark.parametrize("change", [{"model__sampling__temperature": 0.7}, {"model__loss__aggregation": "seq_mean"},
                                    {"model__optimizer__init_args__weight_decay": 0.1}])
def test_a_setting_trl_reference_fixes_otherwise_stops_the_arm(trl_arm, tmp_path, change):
    with pytest.raises(ValueError, match="differ from what benchmarks/trl_reference.py sets"):
        trl_arm.grpo_phase_settings(phase_file(tmp_path, **change), {})
