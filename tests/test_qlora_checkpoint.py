"""A QLoRA phase restores from its checkpoint: bitsandbytes' quantisation state saved beside each frozen
4-bit weight is not taken back by the freshly loaded policy (it has the same), the rest loads strictly."""

from __future__ import annotations

import pytest
import torch

from rloop_lightning.policy import LoraSettings, Policy
from rloop_lightning.policy_module import QUANT_STATE_SUFFIXES
from rloop_lightning.rft import RFTModule

pytest.importorskip("bitsandbytes")


def qlora_module() -> RFTModule:
    module = RFTModule(Policy("rloop/tiny-llama", load_in_4bit=True, lora=LoraSettings(r=4, alpha=8)),
                       optimizer=torch.optim.AdamW)
    module.configure_model()
    return module


def test_qlora_state_dict_restores_into_a_fresh_module():
    saved = qlora_module()
    with torch.no_grad():
        for name, parameter in saved.named_parameters():
            if "lora_" in name:
                parameter.add_(0.5)  # a trained adapter
    state = saved.state_dict()
    assert any(key.endswith(QUANT_STATE_SUFFIXES) for key in state)  # what made strict loading fail
    fresh = qlora_module()
    with pytest.raises(RuntimeError, match="Unexpected key"):
        torch.nn.Module.load_state_dict(fresh, state)  # plain strict loading
    fresh.load_state_dict(state)  # strict on everything else
    restored = dict(fresh.named_parameters())
    for name, parameter in saved.named_parameters():
        assert torch.equal(restored[name], parameter), name
    with pytest.raises(RuntimeError, match="Missing key"):  # still strict about what it does load
        fresh.load_state_dict({key: value for key, value in state.items() if "lora_A" not in key})
