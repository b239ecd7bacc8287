"""The embedded default policy: tiny causal LMs built from a config, with a project-made tokenizer.

Nothing is downloaded. A built-in model id such as ``rloop/tiny-llama`` resolves to a directory in
the local cache holding a randomly initialised model and a character-level tokenizer, both saved
in Hugging Face format (safetensors), so the exact ``from_pretrained`` path that serves real hub
models serves these too. The warm-up that makes the model useful is an RFT run on solver
demonstrations (``configs/base/tiny_countdown.yaml``).
"""

from __future__ import annotations

import os
import shutil
import string
from dataclasses import dataclass
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
# digits, operators, whitespace, letters and ASCII punctuation: enough for the built-in tasks
CHARACTERS = string.digits + "+-*/()=<>" + " \n" + string.ascii_letters + ".,:;?!#'\"_[]{}\\$%&@|~^"


@dataclass(frozen=True)
class TinyModelSpec:
    """Architecture of a built-in tiny model (Hugging Face config fields)."""

    architecture: str = "llama"  # "llama" or "qwen3"
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    seed: int = 0
    vocab_size: int | None = None  # None: the character tokenizer's own size


# No character-tokenizer Qwen2: transformers 5 forces ``Qwen2Tokenizer`` (byte-level BPE) on any
# ``model_type: qwen2`` directory, which would discard our character tokenizer. Qwen3 is the same
# family (GQA, RoPE, SwiGLU, plus q/k norms) and respects the saved tokenizer class. The Qwen2.5
# stand-ins (``rloop/tiny-qwen2.5``, ``rloop/tiny-qwen2.5-math``) carry a BPE tokenizer: ``tiny_qwen``.
BUILTIN_MODELS: dict[str, TinyModelSpec] = {
    "rloop/tiny-llama": TinyModelSpec(),
    "rloop/tiny-qwen3": TinyModelSpec(architecture="qwen3"),
    "rloop/micro-llama": TinyModelSpec(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=64),
    # ~36M parameters, 32k vocabulary: big enough that matrix multiplies, not Python, dominate
    # (benchmarks). Prompts still encode character by character; sampled ids above the characters
    # decode to placeholder tokens "<t12345>".
    "rloop/small-llama-32k": TinyModelSpec(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                                           num_key_value_heads=4, intermediate_size=1536, vocab_size=32768),
}


def cache_dir() -> Path:
    """Where built-in models are materialised (``$RLOOP_CACHE`` or ``~/.cache/rloop_lightning``)."""
    return Path(os.environ.get("RLOOP_CACHE", Path.home() / ".cache" / "rloop_lightning"))


def build_tokenizer(vocab_size: int | None = None):
    """A character-level ``PreTrainedTokenizerFast``: one token per character, plus specials.

    ``vocab_size`` above the characters' count adds placeholder tokens ``<t{id}>`` up to that size:
    text never encodes to them (one token per character), sampled ids decode to them.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [PAD, BOS, EOS, UNK, *CHARACTERS]
    tokens += [f"<t{index}>" for index in range(len(tokens), vocab_size or 0)]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
        padding_side="left", clean_up_tokenization_spaces=False,
    )


def build_model(spec: TinyModelSpec, vocab_size: int, pad_token_id: int, bos_token_id: int, eos_token_id: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}
    if spec.architecture not in classes:
        raise ValueError(f"unknown tiny architecture {spec.architecture!r}; choose from {sorted(classes)}")
    config_class, model_class = classes[spec.architecture]
    config = config_class(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(spec.seed)
        return model_class(config)


def materialize(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Build the built-in model ``name`` into ``directory`` (default: the cache) unless present."""
    from rloop_lightning import tiny_qwen

    if not is_builtin(name):
        builtins = sorted([*BUILTIN_MODELS, *tiny_qwen.STAND_INS])
        raise ValueError(f"unknown built-in model {name!r}; built-ins: {builtins}")
    target = Path(directory) if directory else cache_dir() / name.replace("/", "--")
    if (target / "config.json").exists():
        return target
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    if name in tiny_qwen.STAND_INS:  # Qwen2.5 stand-ins: their own tokenizer and generation config
        tiny_qwen.build(tiny_qwen.STAND_INS[name], staging)
    else:
        tokenizer = build_tokenizer(BUILTIN_MODELS[name].vocab_size)
        model = build_model(
            BUILTIN_MODELS[name], len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id,
            tokenizer.eos_token_id,
        )
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a half-built model is never picked up
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
        # another process (a DDP rank) materialised it first: same seed, same model; keep theirs
    return target


def is_builtin(name: str) -> bool:
    from rloop_lightning.tiny_qwen import STAND_INS

    return name in BUILTIN_MODELS or name in STAND_INS
