"""Shared fixtures: an isolated model cache and the 21k-parameter built-in policy."""

from __future__ import annotations

import os

import pytest
import torch

from rloop_lightning.policy import Policy

# The processes the tests start (ranks, CLI runs, samplers) inherit this: with 2 pytest-xdist workers on 2
# cores, a second intra-op thread per process only contends (measured: the QLoRA rehearsals on 2 workers
# take 89 s with torch's default threads, 71 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def single_torch_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they lose up to 10x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def isolated_model_cache(tmp_path_factory):
    """Built-in tiny models are materialised in a temporary directory, never in the home directory."""
    cache = tmp_path_factory.mktemp("rloop_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RLOOP_CACHE", str(cache))
        yield cache


@pytest.fixture
def micro_policy() -> Policy:
    """A freshly loaded ``rloop/micro-llama`` (2 layers, width 32): loading takes milliseconds once cached.

    Too narrow for bitsandbytes 4-bit (linear dims must be >= its 64 blocksize): QLoRA tests use
    ``rloop/tiny-llama``.
    """
    policy = Policy("rloop/micro-llama")
    policy.load_model()
    return policy
