"""Rehearsal fragments (configs/rehearsal/): one per recipe, each changing only what a CPU cannot hold.

A fragment is applied as a second ``--config`` on top of its recipe. It may change the model id and
dtype, data paths, GPU -> CPU settings (accelerator, devices, precision, strategy, vLLM's memory and
compile settings), sizes (steps, batches, lengths, samples) and output paths; everything else (losses,
callbacks and their classes, engines, LoRA, evaluator tasks, expert-set settings) stays the recipe's.
The ``rehearsal`` tests run each recipe end to end under its fragment.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from test_recipes import command_of, parse

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
FRAGMENTS = ROOT / "configs" / "rehearsal"

ALLOWED = {
    # the model
    "model_name_or_path", "policy", "dtype",
    # data
    "path", "paths",
    # GPU -> CPU
    "accelerator", "devices", "num_nodes", "precision", "strategy", "data_parallel_size", "max_model_len",
    "kv_cache_gib", "enforce_eager", "enable_sleep_mode", "reward_workers",
    # sizes
    "max_steps", "max_epochs", "max_time", "every_n_train_steps", "every_n_steps", "num_samples", "ks", "limit",
    "max_new_tokens", "num_generations", "batch_size", "micro_batch_size", "micro_batch_tokens", "num_mini_batches",
    "max_sampling_rounds", "buffer_length", "max_length", "iterations", "trainer.max_steps",
    # outputs, and the loop's phase fragments
    "default_root_dir", "run_dir", "output", "extra_configs",
}


def merged(recipe, fragment):
    """``fragment`` applied on ``recipe`` as a second config file: mappings merge, other values replace."""
    if isinstance(recipe, dict) and isinstance(fragment, dict):
        return {**recipe, **{key: merged(recipe.get(key), value) for key, value in fragment.items()}}
    return fragment


def changed_keys(before, after, path=()) -> list[tuple[str, ...]]:
    """Paths (keys and list indexes) where ``after`` differs from ``before``."""
    if isinstance(after, dict) and isinstance(before, (dict, type(None))):
        before = before or {}
        return [change for key in sorted(set(before) | set(after), key=str)
                for change in changed_keys(before.get(key), after.get(key), (*path, key))]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [change for index, (b, a) in enumerate(zip(before, after))
                for change in changed_keys(b, a, (*path, index))]
    return [] if before == after else [path]


def disallowed(recipe: dict, fragment: dict) -> list[str]:
    """Changed paths whose last key is not an allowed one (anything under ``trainer.strategy`` counts as it)."""
    def allowed(path) -> bool:
        keys = [key for key in path if isinstance(key, str)]
        return keys[-1] in ALLOWED or keys[:2] == ["trainer", "strategy"]

    return [".".join(map(str, path)) for path in changed_keys(recipe, merged(recipe, fragment)) if not allowed(path)]


def test_every_recipe_has_a_fragment_and_every_fragment_a_recipe():
    assert {p.name for p in FRAGMENTS.glob("*.yaml")} == {p.name for p in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_fragment_touches_only_what_a_cpu_cannot_hold(recipe):
    fragment = yaml.safe_load((FRAGMENTS / recipe.name).read_text())
    assert disallowed(yaml.safe_load(recipe.read_text()), fragment) == []
    header = (FRAGMENTS / recipe.name).read_text()
    assert f"--config configs/recipes/{recipe.name} --config configs/rehearsal/{recipe.name}" in header


def test_the_key_check_catches_a_changed_loss_or_callback():
    recipe = yaml.safe_load((ROOT / "configs/recipes/qlora_gsm8k_grpo.yaml").read_text())
    assert disallowed(recipe, {"model": {"loss": {"clip_eps_high": 0.2}}}) == ["model.loss.clip_eps_high"]
    assert disallowed(recipe, {"trainer": {"callbacks": recipe["trainer"]["callbacks"][:1]}}) == ["trainer.callbacks"]
    assert disallowed(recipe, {"model": {"policy": {"lora": {"r": 8}}}}) == ["model.policy.lora.r"]
    assert disallowed(recipe, {"model": {"policy": {"model_name_or_path": "rloop/tiny-qwen2.5"}}}) == []


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_with_its_fragment_parses(recipe, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    from rloop_lightning.loop.phases import PhaseCLI

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(LightningCLI, "instantiate_classes", lambda self: None)
    monkeypatch.setattr(PhaseCLI, "before_instantiate_classes", lambda self: None)
    config = parse(command_of(recipe), ["--config", str(recipe), "--config", str(FRAGMENTS / recipe.name)])
    assert config is not None
