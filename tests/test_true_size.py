"""``benchmarks.true_size``: the small-size mode runs and its tensor bytes are the hand-computed sizes; the
fits recover hand-made lines; a recipe without an architecture config in the repository, or a size the
machine cannot hold, is refused before anything is allocated."""

from __future__ import annotations

import json

import pytest

from benchmarks import true_size
from benchmarks.true_size_measure import fit_line, fit_rollout

RECIPE_8GB = "configs/recipes/qlora_gsm8k_grpo_8gb.yaml"
QWEN_15B = true_size.architecture(true_size.read_recipe(RECIPE_8GB), {})


def test_parameter_counts_of_qwen2_5_1_5b_are_the_docs_numbers():
    """docs/scale_out.md: 1.31 B in decoder linears, 0.233 B embedding (tied), LoRA r=32 36.9 M."""
    counts = true_size.parameter_counts(QWEN_15B)
    assert counts["linears"] == 28 * (1536 * 1536 * 2 + 1536 * 256 * 2 + 1536 * 8960 * 3)
    assert round(counts["linears"] / 1e9, 2) == 1.31
    assert counts["embeddings"] == 151_936 * 1536
    assert counts["lora_per_rank"] * 32 == 28 * 32 * (3072 + 1792 + 1792 + 3072 + 3 * 10496)


def test_fits_recover_hand_made_lines():
    assert fit_line([1, 2, 4], [13, 16, 22]) == pytest.approx((10, 3))
    # growth = 5 + b (2 + 0.5 L): (8, 8) -> 53, (16, 8) -> 101, (8, 24) -> 117
    assert fit_rollout([(8, 8, 53.0), (16, 8, 101.0), (8, 24, 117.0)]) == pytest.approx((5, 2, 0.5))


def test_small_size_mode_measures_the_recipe_set_up_with_the_hand_computed_tensor_bytes(tmp_path):
    out = tmp_path / "quick.json"
    text = true_size.main(["--quick", "--json", str(out)])
    saved = json.loads(out.read_text())
    result, config = saved["result"], {**QWEN_15B, **saved["plan"]["shape"]}
    counts = true_size.parameter_counts(config)
    adapter = counts["lora_per_rank"] * 32 * 4  # r = 32, fp32 after prepare_model_for_kbit_training
    inventory = result["load"]["inventory"]
    assert inventory["adapter"] == adapter
    assert result["optimizer"]["moments"] == 2 * adapter  # AdamW: exp_avg, exp_avg_sq
    assert all(u["gradients"] == adapter for u in result["updates"])
    # nf4: half a byte per weight, plus per 64-weight block an 8-bit scale and, per tensor, the codebooks
    tensors = 7 * config["num_hidden_layers"]
    assert counts["linears"] / 2 < inventory["linears_4bit"] < counts["linears"] * (1 / 2 + 1 / 32) + tensors * 4096
    norms = (2 * config["num_hidden_layers"] + 1) * config["hidden_size"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    biases = config["num_hidden_layers"] * (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim
    assert inventory["other"] == (counts["embeddings"] + norms + biases) * 4  # Qwen2: q, k, v biases
    assert [u["micro_batch"] for u in result["updates"]] == [1, 2]
    assert [u["tokens"] for u in result["updates"]] == [1 * (16 + 33), 2 * (16 + 33)]
    assert [r["batch"] for r in result["rollouts"]] == [2, 4, 2]
    assert [r["completion_tokens"] for r in result["rollouts"]] == [2 * 4, 4 * 4, 2 * 4]  # random weights: no early end
    assert 70 < result["rollouts"][0]["prompt_tokens"] <= 80 < 110 < result["rollouts"][2]["prompt_tokens"] <= 120
    assert "update peak growth at the recipe's m = 8" in text and "measured (CPU, shrunk)" in text


@pytest.fixture
def nothing_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(true_size, "build_model_dir", refuse)


def test_a_recipe_whose_model_config_is_not_in_the_repository_is_refused_naming_it(tmp_path, nothing_built):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model:\n  policy: {model_name_or_path: Org/Unknown-3B}\n  micro_batch_size: 4\n")
    with pytest.raises(FileNotFoundError, match=r"recipe.yaml: model.policy.model_name_or_path 'Org/Unknown-3B' "
                                                r"has no architecture config in the repository \(benchmarks/"
                                                r"model_configs/Org/Unknown-3B.json is missing"):
        true_size.main(["--recipe", str(recipe)])


def test_a_recipe_that_is_not_grpo_is_refused_naming_the_fields(nothing_built):
    with pytest.raises(ValueError, match=r"dapo_qwen2.5_math_7b_rft.yaml: not a GRPO recipe, nor an RFT recipe with a "
                                         r"token budget \(needs model.policy.model_name_or_path and "
                                         r"model.micro_batch_size or model.micro_batch_tokens\)"):
        true_size.main(["--recipe", "configs/recipes/dapo_qwen2.5_math_7b_rft.yaml"])


def test_an_rft_recipe_is_read_with_its_token_budget_and_evaluation_engine():
    """The 8 GB RFT recipe: 5704 tokens hold 8 sequences of 200 + 512 (+ EOS); its PassAtK engine samples 64."""
    sizes = true_size.read_recipe("configs/recipes/qlora_gsm8k_rft_8gb.yaml")
    assert (sizes.micro_batch_size, sizes.engine_batch, sizes.max_new_tokens, sizes.logprob_chunk_size) == (8, 64, 512,
                                                                                                           256)
    assert true_size.read_recipe("configs/recipes/qlora_gsm8k_rft.yaml").micro_batch_size == 16


def test_a_size_beyond_the_machines_memory_is_refused_before_allocating(nothing_built):
    with pytest.raises(MemoryError, match=r"Qwen2.5-Math-7B at true size needs ~\d+\.\d GiB .* more than the 14.0 GiB "
                                          r"this machine can give .* nothing was allocated"):
        true_size.main(["--recipe", "configs/recipes/dapo_qwen2.5_math_7b_lora_grpo.yaml", "--memory-limit-gib", "14"])
    with pytest.raises(MemoryError, match="more than the 2.0 GiB"):
        true_size.main(["--recipe", RECIPE_8GB, "--memory-limit-gib", "2"])
    sizes = true_size.read_recipe(RECIPE_8GB)  # the 8 GB recipe's measurement itself fits 14 GiB
    true_size.check_memory(sizes, QWEN_15B, true_size.Plan([[1, 513], [2, 513]], [[32, 700], [64, 700], [32, 350]]), 14 * 2**30)
