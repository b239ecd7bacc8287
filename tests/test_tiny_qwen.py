"""The Qwen2.5 stand-ins: Qwen2.5's tokenizer class, special tokens, chat template and generation config."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen2Tokenizer

from rloop_lightning import tiny, tiny_qwen

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
            "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
            "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    return tiny.materialize("rloop/tiny-qwen2.5", tmp_path_factory.mktemp("qwen") / "instruct")


@pytest.fixture(scope="module")
def math_base(tmp_path_factory):
    return tiny.materialize("rloop/tiny-qwen2.5-math", tmp_path_factory.mktemp("qwen") / "math")


def test_tokenizer_loads_through_qwen2_tokenizer_with_qwen_added_tokens(instruct):
    tokenizer = AutoTokenizer.from_pretrained(instruct)
    assert isinstance(tokenizer, Qwen2Tokenizer)
    saved = json.loads((instruct / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "Qwen2Tokenizer"
    assert len(tokenizer) == tiny_qwen.BPE_VOCAB_SIZE + 22 == 1046
    # Qwen2.5: 151643 <|endoftext|> ... 151664 <|file_sep|>; here 1024 ... 1045
    assert tokenizer.convert_tokens_to_ids(SPECIALS) == list(range(1024, 1046))
    added = tokenizer.added_tokens_decoder
    assert [added[1024 + i].special for i in range(22)] == [True] * 14 + [False] * 8
    assert (tokenizer.eos_token, tokenizer.pad_token, tokenizer.bos_token) == ("<|im_end|>", "<|endoftext|>", None)
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (1026, 1024)


def test_byte_level_bpe_round_trips_any_text_and_merges_the_corpus(instruct):
    tokenizer = AutoTokenizer.from_pretrained(instruct)
    for text in ["Janet\u2019s ducks lay 16 eggs: 16 - 3 - 4 = <<16-3-4=9>>9.\n#### 18", "é \u00fc \u4e2d\u6587 \U0001F600",
                 "\\boxed{\\frac{1}{2}}  two  spaces\n\n"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    # Qwen2's pre-tokenizer splits digits one by one; words of the corpus are single tokens
    assert len(tokenizer("2024", add_special_tokens=False)["input_ids"]) == 4
    assert len(tokenizer(" reason", add_special_tokens=False)["input_ids"]) == 1
    # specials in text are single tokens, and decoding skips them on request
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 1025 and ids[-1] == 1026
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template_is_qwen_2_5s(instruct, math_base):
    messages = [{"role": "user", "content": "What is 2+3?"}]
    text = AutoTokenizer.from_pretrained(instruct).apply_chat_template(messages, tokenize=False,
                                                                       add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    text = AutoTokenizer.from_pretrained(math_base).apply_chat_template(
        [{"role": "system", "content": "S"}, *messages, {"role": "assistant", "content": "5"}], tokenize=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n" \
                   "<|im_start|>assistant\n5<|im_end|>\n"
    text = AutoTokenizer.from_pretrained(math_base).apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_start|>system\nPlease reason step by step, and put your final answer within "
                           "\\boxed{}.<|im_end|>\n")


def test_instruct_generation_config_and_model_config(instruct):
    generation = GenerationConfig.from_pretrained(instruct)
    assert generation.eos_token_id == [1026, 1024]  # Qwen2.5-Instruct: [151645, 151643]
    assert (generation.bos_token_id, generation.pad_token_id, generation.do_sample) == (1024, 1024, True)
    assert (generation.repetition_penalty, generation.temperature, generation.top_p, generation.top_k) == (
        1.1, 0.7, 0.8, 20)
    config = AutoConfig.from_pretrained(instruct)
    assert config.model_type == "qwen2"
    assert (config.bos_token_id, config.eos_token_id, config.vocab_size) == (1024, 1026, 1046)
    assert config.tie_word_embeddings and config.max_position_embeddings == 1024
    model = AutoModelForCausalLM.from_pretrained(instruct)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # Qwen2's q/k/v biases
    assert model.generation_config.repetition_penalty == 1.1


def test_math_base_ends_with_endoftext_alone(math_base):
    tokenizer = AutoTokenizer.from_pretrained(math_base)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    generation = GenerationConfig.from_pretrained(math_base)
    assert generation.eos_token_id == 1024 and generation.do_sample is False and generation.max_new_tokens == 2048
    assert generation.repetition_penalty in (None, 1.0)
    config = AutoConfig.from_pretrained(math_base)
    assert (config.eos_token_id, config.tie_word_embeddings) == (1024, False)


def test_stand_in_is_deterministic(instruct, tmp_path):
    again = tiny.materialize("rloop/tiny-qwen2.5", tmp_path / "again")
    assert (again / "tokenizer.json").read_text() == (instruct / "tokenizer.json").read_text()
    first = AutoModelForCausalLM.from_pretrained(instruct).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
