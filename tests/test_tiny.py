"""Built-in tiny models: the character tokenizer and materialisation in Hugging Face format."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rloop_lightning import tiny

COUNTDOWN_TEXT = "3 5 7 -> 22\n<think>3*5 = 15, 15+7 = 22</think>\n<answer>3*5+7</answer>\n"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.build_tokenizer()


def test_tokenizer_has_one_token_per_character_and_round_trips(tokenizer):
    ids = tokenizer(tiny.CHARACTERS, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(tiny.CHARACTERS)
    assert len(set(ids)) == len(tiny.CHARACTERS)
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == tiny.CHARACTERS
    for character in tiny.CHARACTERS:  # each on its own, whitespace included
        (token,) = tokenizer(character, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode([token]) == character


def test_tokenizer_keeps_spaces_and_newlines_of_countdown_text(tokenizer):
    ids = tokenizer(COUNTDOWN_TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(COUNTDOWN_TEXT)
    assert tokenizer.decode(ids) == COUNTDOWN_TEXT
    assert ids[1] == tokenizer.convert_tokens_to_ids(" ")
    assert ids[11] == tokenizer.convert_tokens_to_ids("\n")


def test_tokenizer_special_tokens(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        0, 1, 2, 3]
    assert len(tokenizer) == 4 + len(tiny.CHARACTERS)
    assert tokenizer.padding_side == "left"
    assert tokenizer("é", add_special_tokens=False)["input_ids"] == [tokenizer.unk_token_id]
    ids = tokenizer("12", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True) == "12"


def test_materialize_writes_hugging_face_files(tmp_path):
    target = tiny.materialize("rloop/micro-llama", tmp_path / "micro")
    assert target == tmp_path / "micro"
    names = {path.name for path in target.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert [path.name for path in tmp_path.iterdir()] == ["micro"]  # no staging directory left


def test_materialize_is_idempotent(tmp_path, monkeypatch):
    target = tiny.materialize("rloop/micro-llama", tmp_path / "micro")
    weights = target / "model.safetensors"
    before = weights.stat().st_mtime_ns

    def must_not_build(*args, **kwargs):
        raise AssertionError("materialize rebuilt a model that was already there")

    monkeypatch.setattr(tiny, "build_model", must_not_build)
    assert tiny.materialize("rloop/micro-llama", tmp_path / "micro") == target
    assert weights.stat().st_mtime_ns == before


def test_materialize_defaults_to_the_cache(isolated_model_cache):
    assert tiny.cache_dir() == isolated_model_cache
    target = tiny.materialize("rloop/micro-llama")
    assert target == isolated_model_cache / "rloop--micro-llama"
    assert (target / "config.json").exists()


def test_materialize_tolerates_a_concurrent_writer(tmp_path, monkeypatch):
    """A second process (DDP rank) that finishes first wins; the loser keeps its copy and cleans up."""
    target = tmp_path / "micro"
    build = tiny.build_model
    calls = []

    def build_while_another_process_finishes(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the other process renames its staging dir into place meanwhile
            tiny.materialize("rloop/micro-llama", target)
        return build(*args, **kwargs)

    monkeypatch.setattr(tiny, "build_model", build_while_another_process_finishes)
    assert tiny.materialize("rloop/micro-llama", target) == target
    assert len(calls) == 2
    assert [path.name for path in tmp_path.iterdir()] == ["micro"]
    assert (target / "model.safetensors").exists()


def test_materialized_model_loads_with_auto_classes(tmp_path, tokenizer):
    target = tiny.materialize("rloop/micro-llama", tmp_path / "micro")
    model = AutoModelForCausalLM.from_pretrained(target)
    spec = tiny.BUILTIN_MODELS["rloop/micro-llama"]
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (spec.hidden_size, spec.num_hidden_layers)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) < 25_000

    loaded = AutoTokenizer.from_pretrained(target)
    assert loaded(COUNTDOWN_TEXT)["input_ids"] == tokenizer(COUNTDOWN_TEXT)["input_ids"]
    assert loaded.decode(loaded(COUNTDOWN_TEXT)["input_ids"]) == COUNTDOWN_TEXT
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.padding_side) == (0, 2, "left")


def test_materialize_is_deterministic(tmp_path):
    first = AutoModelForCausalLM.from_pretrained(tiny.materialize("rloop/micro-llama", tmp_path / "a"))
    second = AutoModelForCausalLM.from_pretrained(tiny.materialize("rloop/micro-llama", tmp_path / "b"))
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_qwen3_builtin_keeps_the_character_tokenizer(tmp_path, tokenizer):
    target = tiny.materialize("rloop/tiny-qwen3", tmp_path / "qwen3")
    loaded = AutoTokenizer.from_pretrained(target)
    assert loaded(COUNTDOWN_TEXT)["input_ids"] == tokenizer(COUNTDOWN_TEXT)["input_ids"]
    assert AutoModelForCausalLM.from_pretrained(target).config.model_type == "qwen3"


def test_unknown_builtin_name_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown built-in model 'rloop/huge-llama'"):
        tiny.materialize("rloop/huge-llama", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not tiny.is_builtin("rloop/huge-llama") and tiny.is_builtin("rloop/tiny-llama")


def test_unknown_architecture_errors():
    with pytest.raises(ValueError, match="unknown tiny architecture 'mamba'"):
        tiny.build_model(tiny.TinyModelSpec(architecture="mamba"), 100, 0, 1, 2)
