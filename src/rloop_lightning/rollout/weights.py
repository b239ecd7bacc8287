"""The policy's full weights as a sampler loads them: unsharded, named as the plain Hugging Face model
names them, a chunk at a time so that at most about one FSDP unit or layer is gathered at once.

Every rank calls ``full_weight_chunks`` in step: under FSDP the gathers are collectives.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from torch import Tensor, nn

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def clean_parameter_name(name: str) -> str:
    """A parameter name as the unwrapped Hugging Face model spells it (no FSDP/checkpoint wrappers)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_weight_chunks(model: nn.Module) -> Iterator[list[tuple[str, Tensor]]]:
    """The model's full (unsharded) parameters in chunks that may be loaded one after another.

    - no sharding: one chunk of every parameter;
    - FSDP2 (``fully_shard``, DTensor parameters): one chunk per parameter, gathered with
      ``full_tensor()`` (a collective: every rank syncs, in the same order);
    - FSDP1 units: one chunk per unit, gathered with ``summon_full_params(recurse=False)``, outermost
      unit first. FSDP1 allows this only outside forward/backward, after the first forward (before
      it FSDP has no root yet) and not after a backward run *inside* the root's forward, as manual
      optimisation under Lightning's ``FSDPStrategy`` does (FSDP then raises an AssertionError).
    A chunk is valid only until the next is requested.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    parameters = list(model.named_parameters())
    if any(isinstance(parameter, DTensor) for _, parameter in parameters):
        for name, parameter in parameters:
            tensor = parameter.detach()
            yield [(clean_parameter_name(name), tensor.full_tensor() if isinstance(tensor, DTensor) else tensor)]
        return

    if not any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        yield [(clean_parameter_name(name), parameter.detach()) for name, parameter in parameters]
        return
    if not isinstance(model, FullyShardedDataParallel):
        raise TypeError(
            "under FSDP the policy's model must be an FSDP unit itself, or its embeddings and LM head stay "
            "out of reach of the weight sync: add its causal-LM class to auto_wrap_policy "
            "(rloop_lightning.strategies.fsdp_wrap_classes; configs/strategies/fsdp.yaml does)")
    if getattr(model, "_is_root", None) is None:
        log.warning("FSDP has not run a forward pass yet: weight sync skipped (vLLM keeps the checkpoint's "
                    "weights, which differ from the policy's only in a resumed run)")
        return

    def visit(module: nn.Module, prefix: str) -> Iterator[list[tuple[str, Tensor]]]:
        if isinstance(module, FullyShardedDataParallel):
            nested = tuple(clean_parameter_name(name) + "." for name, sub in module.named_modules()
                           if sub is not module and isinstance(sub, FullyShardedDataParallel))
            with FullyShardedDataParallel.summon_full_params(module, recurse=False, writeback=False):
                yield [(clean_parameter_name(prefix + name), parameter.detach().clone())  # outlives the unit
                       for name, parameter in module.named_parameters()
                       if not clean_parameter_name(name).startswith(nested)]  # nested units: their own chunk
        for child_name, child in module.named_children():
            yield from visit(child, f"{prefix}{child_name}.")

    yield from visit(model, "")
