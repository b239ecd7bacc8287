"""scripts/interpolate_policies.py: alpha * A + (1 - alpha) * B, tensor by tensor, loadable as a Policy."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rloop_lightning.policy import LoraSettings, Policy

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "interpolate_policies.py"
spec = importlib.util.spec_from_file_location("interpolate_policies", SCRIPT)
interpolate_policies = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interpolate_policies)


def saved_policy(directory: Path, seed: int, lora: bool = False) -> Path:
    torch.manual_seed(seed)
    policy = Policy("rloop/micro-llama", lora=LoraSettings(r=2) if lora else None)
    policy.load_model()
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)  # two different weight sets
    return policy.save(directory)


def test_interpolation_is_the_weighted_sum_and_loads(tmp_path):
    a, b = saved_policy(tmp_path / "a", 0), saved_policy(tmp_path / "b", 1)
    out = interpolate_policies.interpolate(a, b, 0.25, tmp_path / "mix")
    weights_a, weights_b, mixed = (load_file(str(p / "model.safetensors")) for p in (a, b, out))
    assert mixed.keys() == weights_a.keys()
    for key in weights_a:
        torch.testing.assert_close(mixed[key], 0.25 * weights_a[key] + 0.75 * weights_b[key], atol=1e-7, rtol=0)
    assert any(not torch.equal(weights_a[key], weights_b[key]) for key in weights_a)
    policy = Policy(str(out))
    policy.load_model()
    loaded = dict(policy.model.named_parameters())
    torch.testing.assert_close(loaded["model.norm.weight"], mixed["model.norm.weight"], atol=0, rtol=0)


def test_adapters_and_bad_alpha_are_refused(tmp_path):
    full = saved_policy(tmp_path / "full", 0)
    adapter = saved_policy(tmp_path / "adapter", 1, lora=True)
    with pytest.raises(SystemExit, match="LoRA adapter: export it merged first"):
        interpolate_policies.interpolate(adapter, full, 0.5, tmp_path / "out")
    with pytest.raises(SystemExit, match="alpha must be in"):
        interpolate_policies.interpolate(full, full, 1.5, tmp_path / "out")
