"""Every recipe, strategy/logger fragment and sweep under configs/ parses against the code, offline.

Parsing validates every class path and argument type but instantiates nothing (``instantiate_classes``
is a no-op here), so no model, tokenizer or dataset is loaded and no GPU is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from lightning.pytorch.cli import LightningCLI

from rloop_lightning.cli import evaluate, fit_parser
from rloop_lightning.loop.phases import PhaseCLI, phase_cli
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.rft import RFTModule

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODULES = {"grpo": GRPOModule, "rft": RFTModule}
RECIPES = sorted((CONFIGS / "recipes").glob("*.yaml"))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Anything that tried to reach the hub would fail loudly; nothing is instantiated."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(LightningCLI, "instantiate_classes", lambda self: None)
    monkeypatch.setattr(PhaseCLI, "before_instantiate_classes", lambda self: None)  # GPU checks: tested apart


def parse(command: str, args: list[str]):
    """The validated config namespace of ``rloop <command> fit`` (or ``rloop eval``) with ``args``."""
    if command == "fit":  # an RLoop loop recipe
        return fit_parser().parse_args(args)
    if command == "eval":
        parser = ArgumentParser(exit_on_error=False)
        parser.add_argument("--config", action=ActionConfigFile)
        parser.add_function_arguments(evaluate, as_positional=False)
        return parser.parse_args(args)
    return phase_cli(MODULES[command], args, run=False).config


def command_of(path: Path) -> str:
    """The ``rloop`` command a recipe's header documents (``rloop grpo fit --config ...``)."""
    match = re.search(r"rloop (grpo|rft|eval|fit)\b", path.read_text())
    assert match, f"{path.name}: the header should show the rloop command that runs it"
    return match.group(1)


def test_there_are_recipes():
    assert {p.stem for p in RECIPES} >= {"qlora_gsm8k_grpo", "qlora_gsm8k_rft", "qlora_gsm8k_rloop",
                                         "dapo_qwen2.5_math_7b_grpo", "dapo_qwen2.5_math_7b_rft",
                                         "dapo_qwen2.5_math_7b_rloop"}


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem.endswith("_rloop")], ids=lambda p: p.stem)
def test_loop_recipes_name_phase_recipes_that_exist(path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    config = parse("fit", ["--config", str(path)])
    for phase in (config.grpo.config, config.rft.config):
        assert (CONFIGS.parent / phase).exists(), phase
        parse(command_of(CONFIGS.parent / phase), ["--config", phase])


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(path):
    config = parse(command_of(path), ["--config", str(path)])
    assert config is not None


def test_dapo_recipe_settings():
    config = parse("grpo", ["--config", str(CONFIGS / "recipes/dapo_qwen2.5_math_7b_grpo.yaml")])
    model = config.model
    assert (model.loss.clip_eps_high, model.loss.aggregation, model.dynamic_sampling) == (0.28, "token_mean", True)
    assert model.overlong.mode == "soft_penalty" and model.num_generations == 16
    assert model.engine.class_path == "rloop_lightning.rollout.vllm.VLLMEngine"
    strategy = config.trainer.strategy
    assert strategy.class_path == "lightning.pytorch.strategies.ModelParallelStrategy"  # FSDP2
    assert strategy.init_args.save_distributed_checkpoint is False and config.trainer.devices == 8
    assert config.data.init_args.task.class_path == "rloop_lightning.tasks.DAPOMath"


@pytest.mark.parametrize("fragment", sorted((CONFIGS / "strategies").glob("*.yaml")), ids=lambda p: p.stem)
def test_strategy_fragments_compose_with_a_tiny_config(fragment):
    base = CONFIGS / "grpo/tiny_countdown.yaml"
    config = parse("grpo", ["--config", str(base), "--config", str(fragment)])
    expected = yaml.safe_load(fragment.read_text())["trainer"]
    assert config.trainer.accelerator == expected["accelerator"] and config.trainer.devices == expected["devices"]


def test_fsdp_fragment_wraps_decoder_layers_and_the_causal_lm():
    config = parse("rft", ["--config", str(CONFIGS / "rft/tiny_countdown.yaml"),
                           "--config", str(CONFIGS / "strategies/fsdp.yaml")])
    init = config.trainer.strategy.init_args
    assert {cls.__name__ for cls in init.auto_wrap_policy} == {"Qwen2DecoderLayer", "Qwen2ForCausalLM"}
    assert str(init.sharding_strategy).endswith("FULL_SHARD") and config.trainer.precision == "bf16-mixed"


def test_qlora_fragment_sets_a_4bit_policy():
    config = parse("grpo", ["--config", str(CONFIGS / "grpo/tiny_countdown.yaml"),
                            "--config", str(CONFIGS / "strategies/qlora_single_gpu.yaml")])
    policy = config.model.policy.init_args
    assert policy.load_in_4bit and policy.lora.r == 16


def test_wandb_logger_fragment():
    config = parse("grpo", ["--config", str(CONFIGS / "grpo/tiny_countdown.yaml"),
                            "--config", str(CONFIGS / "loggers/wandb.yaml")])
    assert config.trainer.logger.class_path == "lightning.pytorch.loggers.WandbLogger"
    assert config.trainer.logger.init_args.log_model is False
    callbacks = [c.class_path for c in config.trainer.callbacks]
    assert callbacks[-1] == "rloop_lightning.callbacks.samples.SampleCompletionsTable"
    assert "rloop_lightning.callbacks.ExpertHarvester" in callbacks  # appended, not replaced


def sample_value(spec: dict):
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return spec["values"][-1]
    return spec["min"]


@pytest.mark.parametrize("path", sorted((CONFIGS / "sweeps").glob("*.yaml")), ids=lambda p: p.stem)
def test_sweep_command_parses_with_sampled_values(path, monkeypatch):
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["goal"] in ("maximize", "minimize")
    values = {name: sample_value(spec) for name, spec in sweep["parameters"].items()}
    command = [part for part in sweep["command"] if part not in ("${program}", "${args}")]
    assert sweep["program"] == "rloop" and "${args}" in sweep["command"]
    monkeypatch.chdir(CONFIGS.parent)  # the agent runs from the repository root
    flags = [f"--{name}={value}" for name, value in values.items()]  # how W&B expands ${args}
    if command[0] == "fit":  # the RLoop loop
        config = fit_parser().parse_args(command[1:] + flags)
    else:
        assert command[:2] == ["grpo", "fit"]
        config = parse("grpo", command[2:] + flags)
    for name, value in values.items():
        parsed = config
        for part in name.split("."):
            parsed = getattr(parsed, part)
        assert parsed == pytest.approx(value) if isinstance(value, float) else parsed == value


FSDP1_GRPO = ["--config", str(CONFIGS / "grpo/tiny_countdown.yaml"), "--config", str(CONFIGS / "strategies/fsdp.yaml")]


def test_fsdp_on_this_cpu_machine_is_refused_naming_cuda(monkeypatch):
    monkeypatch.undo()  # the real pre-instantiation checks
    with pytest.raises(RuntimeError, match="needs CUDA"):
        phase_cli(GRPOModule, FSDP1_GRPO, run=False)


def test_grpo_under_fsdp1_is_refused_even_with_cuda_pointing_to_fsdp2(monkeypatch):
    monkeypatch.undo()
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(NotImplementedError, match="fsdp2.yaml"):
        phase_cli(GRPOModule, FSDP1_GRPO, run=False)


def test_grpo_refuses_the_fsdp_shorthand_too(monkeypatch):
    monkeypatch.undo()
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    with pytest.raises(NotImplementedError, match="fsdp2.yaml"):
        phase_cli(GRPOModule, ["--config", str(CONFIGS / "grpo/tiny_countdown.yaml"), "--trainer.accelerator",
                                   "gpu", "--trainer.strategy", "fsdp"], run=False)


def test_8gb_recipes_hold_the_settings_their_memory_table_adds_up():
    """docs/scale_out.md's 8 GB column: chunks of 256, engine and evaluation batches of 64, micro-batches of 8
    full-length sequences' tokens (GRPO 8 x 712, RFT 8 x 713); the 24 GB recipe's update at 64 x 712 tokens with
    the default chunk (512), its RFT a step of 16 x 713. RFT steps are 16 records, without accumulation."""
    grpo = parse("grpo", ["--config", str(CONFIGS / "recipes/qlora_gsm8k_grpo_8gb.yaml")]).model
    assert (grpo.policy.init_args.logprob_chunk_size, grpo.engine.init_args.batch_size,
            grpo.micro_batch_tokens) == (256, 64, 8 * 712)
    rft = parse("rft", ["--config", str(CONFIGS / "recipes/qlora_gsm8k_rft_8gb.yaml")])
    assert (rft.model.policy.init_args.logprob_chunk_size, rft.model.micro_batch_tokens) == (256, 8 * 713)
    big_rft = parse("rft", ["--config", str(CONFIGS / "recipes/qlora_gsm8k_rft.yaml")])
    assert big_rft.model.micro_batch_tokens == 16 * 713
    for phase in (rft, big_rft):
        assert (phase.data.init_args.batch_size, phase.trainer.accumulate_grad_batches) == (16, 1)
    evaluation = next(c for c in rft.trainer.callbacks if c.class_path.endswith("PassAtKEvaluation"))
    assert evaluation.init_args.engine.init_args.batch_size == 64
    loop = parse("fit", ["--config", str(CONFIGS / "recipes/qlora_gsm8k_rloop_8gb.yaml")])
    assert loop.eval_engine.init_args.batch_size == 64
    assert (loop.grpo.config, loop.rft.config) == ("configs/recipes/qlora_gsm8k_grpo_8gb.yaml",
                                                   "configs/recipes/qlora_gsm8k_rft_8gb.yaml")
    big = parse("grpo", ["--config", str(CONFIGS / "recipes/qlora_gsm8k_grpo.yaml")]).model
    assert (big.policy.init_args.logprob_chunk_size, big.micro_batch_tokens) == (512, 64 * 712)
