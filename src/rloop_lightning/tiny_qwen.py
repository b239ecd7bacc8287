"""Qwen2.5 stand-ins: tiny ``model_type: qwen2`` models with a Qwen2.5-shaped tokenizer, built here.

``rloop/tiny-qwen2.5`` stands in for Qwen2.5-1.5B-Instruct (the QLoRA recipes' model) and
``rloop/tiny-qwen2.5-math`` for the base Qwen2.5-Math-7B (the DAPO recipes'): randomly initialised
weights (4 layers, width 128) with everything around them shaped like the real files, so the paths
a real Qwen model takes (byte-level BPE, special tokens, chat template, a ``generation_config`` with
two end tokens and a repetition penalty) run on a CPU with nothing downloaded:

- the tokenizer is a byte-level BPE trained with ``tokenizers`` on text the package ships (the
  GSM8K sample in ``assets/``, with the math tasks' instruction), with Qwen2's pre-tokenizer regex,
  NFC normaliser and byte-level decoder, then Qwen2.5's 22 added tokens after the learned vocabulary
  in Qwen2.5's order (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``, ...; ``<tool_call>`` and
  the FIM tokens not special), saved through ``transformers.Qwen2Tokenizer`` as Qwen2.5 saves its
  own (``tokenizer.json``, ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` with
  ``tokenizer_class: Qwen2Tokenizer``), so ``AutoTokenizer`` loads it through the same class;
- the chat template is Qwen2.5's (tools, system default, ``<|im_start|>role\\n...<|im_end|>\\n``
  turns); the Instruct one's default system message is "You are Qwen, created by Alibaba Cloud. You
  are a helpful assistant.", the Math one's "Please reason step by step, and put your final answer
  within \\boxed{}.";
- Instruct: ``eos_token`` ``<|im_end|>``, ``pad_token`` ``<|endoftext|>``, no BOS; config
  ``bos_token_id`` = ``<|endoftext|>``, ``eos_token_id`` = ``<|im_end|>``, tied embeddings,
  ``rope_theta`` 1e6; ``generation_config``: ``eos_token_id [<|im_end|>, <|endoftext|>]``,
  ``pad_token_id``/``bos_token_id`` ``<|endoftext|>``, ``do_sample`` true, ``repetition_penalty``
  1.1 (the 1.5B's; the 7B-Instruct ships 1.05), ``temperature`` 0.7, ``top_p`` 0.8, ``top_k`` 20;
- Math base: ``eos_token`` and ``pad_token`` ``<|endoftext|>``, config ``eos_token_id``
  ``<|endoftext|>``, untied embeddings, ``rope_theta`` 1e4; ``generation_config``:
  ``eos_token_id`` ``<|endoftext|>`` alone, ``do_sample`` false, ``max_new_tokens`` 2048. Its chat
  turns still end with ``<|im_end|>``, which its ``generation_config`` does not name: the policy adds
  the chat template's turn end to the end tokens (``Policy.end_token_ids``).

Sources (the published files of each model on the Hugging Face hub): ``tokenizer_config.json``
(added tokens and their ids 151643-151664, special flags, ``chat_template``, eos/pad/bos),
``config.json`` and ``generation_config.json`` of ``Qwen/Qwen2.5-1.5B-Instruct``,
``Qwen/Qwen2.5-7B-Instruct`` and ``Qwen/Qwen2.5-Math-7B``; the pre-tokenizer is
``transformers.models.qwen2.tokenization_qwen2``. Ids differ (the stand-in's vocabulary is 1,024
learned tokens, not 151,643); names, order, roles and fields are the same. Context: 1,024 positions
(Qwen2.5-1.5B-Instruct 32k, Qwen2.5-Math-7B 4k): rehearsals size their lengths to it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
CORPUS = ASSETS / "gsm8k_sample.jsonl"
BPE_VOCAB_SIZE = 1024  # 256 byte symbols + 768 merges
INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# Qwen2.5's added tokens in id order (151643...151664), with their ``special`` flag
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True), (IM_START, True), (IM_END, True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
INSTRUCT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
MATH_SYSTEM = "Please reason step by step, and put your final answer within \\\\boxed{}."

# Qwen2.5's chat template (tokenizer_config.json), the default system message left as a slot
CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- '@SYSTEM@' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\n@SYSTEM@<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


@dataclass(frozen=True)
class QwenStandIn:
    """What distinguishes a Qwen2.5 stand-in: the instruct or the base (Math) files."""

    instruct: bool
    """Qwen2.5-Instruct's files (``<|im_end|>`` EOS, sampling defaults) or the base Math model's."""
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    seed: int = 0


STAND_INS: dict[str, QwenStandIn] = {
    "rloop/tiny-qwen2.5": QwenStandIn(instruct=True),
    "rloop/tiny-qwen2.5-math": QwenStandIn(instruct=False),
}


def corpus() -> list[str]:
    """The tokenizer's training text: each GSM8K sample question with the math instruction, and its answer."""
    texts = []
    for line in CORPUS.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts += [record["question"] + INSTRUCTION, record["answer"]]
    return texts


def train_bpe(texts: list[str], vocab_size: int = BPE_VOCAB_SIZE) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE (vocabulary, merges) with Qwen2's normaliser and pre-tokenizer; deterministic."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    state = json.loads(backend.to_str())["model"]
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in state["merges"]]
    return state["vocab"], merges


def build_tokenizer(instruct: bool):
    """A ``Qwen2Tokenizer`` with the learned vocabulary, Qwen2.5's added tokens and chat template."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(corpus())
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None, eos_token=ENDOFTEXT,
                               pad_token=ENDOFTEXT, clean_up_tokenization_spaces=False, errors="replace",
                               split_special_tokens=False, model_max_length=131072)
    tokenizer.add_tokens([AddedToken(token, special=special, normalized=False)
                          for token, special in ADDED_TOKENS[1:]])
    tokenizer.add_special_tokens({"additional_special_tokens": [token for token, special in ADDED_TOKENS[1:14]]})
    if instruct:
        tokenizer.eos_token = IM_END
    system = INSTRUCT_SYSTEM if instruct else MATH_SYSTEM
    tokenizer.chat_template = CHAT_TEMPLATE.replace("@SYSTEM@", system)
    expected = {token: len(vocab) + offset for offset, (token, _) in enumerate(ADDED_TOKENS)}
    actual = {token: tokenizer.convert_tokens_to_ids(token) for token in expected}
    if actual != expected:  # Qwen's ids follow the learned vocabulary in this order
        raise RuntimeError(f"added tokens got ids {actual}, expected {expected}")
    return tokenizer


def build(spec: QwenStandIn, target: Path) -> None:
    """Write the stand-in (weights, tokenizer, generation config) into ``target``."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer(spec.instruct)
    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size, max_position_embeddings=spec.max_position_embeddings,
        hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1e6 if spec.instruct else 1e4,
        tie_word_embeddings=spec.instruct, use_sliding_window=False, bos_token_id=endoftext,
        eos_token_id=im_end if spec.instruct else endoftext,
    )
    if spec.instruct:
        generation = GenerationConfig(bos_token_id=endoftext, pad_token_id=endoftext, do_sample=True,
                                      eos_token_id=[im_end, endoftext], repetition_penalty=1.1,
                                      temperature=0.7, top_p=0.8, top_k=20)
    else:
        generation = GenerationConfig(bos_token_id=endoftext, eos_token_id=endoftext, do_sample=False,
                                      max_new_tokens=2048)
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(spec.seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = generation
    model.save_pretrained(target)
    generation.save_pretrained(target)
    tokenizer.save_pretrained(target)
