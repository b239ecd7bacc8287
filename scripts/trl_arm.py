"""The TRL arm of the study: plain GRPO in TRL's GRPOTrainer at the main job's settings.

Same base policy, training prompts, total rollouts (K x the GRPO phase's steps), reward
(``countdown_reward``), learning rate, clip range, prompts per step, G, completion length,
token-mean loss, no KL; then the same held-out evaluation as ``rloop fit`` (``evaluate_policy``
with the run's seed). Every number is read from the loop config and the GRPO phase YAML it names
(``grpo.config`` with ``grpo.overrides`` on top), and a setting TRL's side cannot follow stops the
run. Results land in ``runs/study/tiny_cpu/trl_seed{S}/`` in the layout ``rloop fit`` uses, so
``scripts/reproduce_tiny.py --report-only`` tabulates them beside RLoop and our GRPO.

    pip install trl            # optional benchmark dependency (the `bench` extra)
    python scripts/trl_arm.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def with_overrides(config: dict, overrides: dict) -> dict:
    """``config`` (nested YAML) with dotted ``overrides`` (``model.optimizer.init_args.lr``) applied."""
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config


def grpo_phase_settings(phase_config: Path, overrides: dict) -> dict:
    """What TRL's GRPOTrainer must match, read from the GRPO phase YAML plus the loop's overrides.

    Raises ``ValueError`` where the YAML sets something ``benchmarks.trl_reference`` fixes otherwise
    (temperature, loss aggregation, advantage, lower clip, weight decay), so the arm cannot drift
    silently from the phase it stands beside.
    """
    import yaml

    config = with_overrides(yaml.safe_load(phase_config.read_text()), overrides)
    model, data = config["model"], config["data"]["init_args"]
    loss, sampling = model.get("loss", {}), model.get("sampling", {})
    optimizer = model["optimizer"]["init_args"]
    fixed = {"sampling.temperature": (sampling.get("temperature", 1.0), 1.0),
             "loss.aggregation": (loss.get("aggregation", "token_mean"), "token_mean"),
             "loss.advantage": (loss.get("advantage", "grpo"), "grpo"),
             "loss.clip_eps_low": (loss.get("clip_eps_low", 0.2), 0.2),
             "optimizer weight_decay": (optimizer.get("weight_decay", 0.0), 0.0)}
    differ = {name: ours for name, (ours, trl) in fixed.items() if ours != trl}
    if differ:
        raise ValueError(f"{phase_config}: {differ} differ from what benchmarks/trl_reference.py sets")
    return {"steps": int(config["trainer"]["max_steps"]), "lr": float(optimizer["lr"]),
            "prompts_per_step": int(data["batch_size"]), "num_prompts": int(data["limit"]),
            "num_generations": int(model["num_generations"]),
            "max_completion_length": int(sampling["max_new_tokens"]),
            "epsilon_high": float(loss.get("clip_eps_high", 0.2))}


def loop_settings(config_path: Path) -> dict:
    """The pieces of the loop config (and of its GRPO phase) the TRL arm must match."""
    from rloop_lightning.cli import fit_parser

    parser = fit_parser()
    config = parser.instantiate_classes(parser.parse_args(["--config", str(config_path)]))
    return {"base": config.base.policy, "iterations": config.iterations, "evaluators": config.evaluators,
            **grpo_phase_settings(ROOT / config.grpo.config, dict(config.grpo.overrides))}


def run_seed(seed: int, settings: dict, out: Path) -> Path:
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    from benchmarks.trl_reference import countdown_dataset, grpo_config
    from rloop_lightning.records import write_json_atomic
    from rloop_lightning.evaluation import evaluate_policy
    from rloop_lightning.loop.layout import RunLayout
    from rloop_lightning.policy import Policy
    from rloop_lightning.tasks import Countdown
    from rloop_lightning.tasks.countdown import countdown_reward

    layout = RunLayout(out / f"trl_seed{seed}")
    policy_dir = layout.root / "policy"
    # PromptDataModule(limit=N) trains on the first N problems
    dataset = countdown_dataset(Countdown().load("train")[:settings["num_prompts"]])
    steps = settings["iterations"] * settings["steps"]
    with tempfile.TemporaryDirectory() as scratch:
        args = grpo_config(scratch, seed=seed, max_steps=steps, learning_rate=settings["lr"],
                           prompts_per_step=settings["prompts_per_step"],
                           num_generations=settings["num_generations"],
                           max_completion_length=settings["max_completion_length"],
                           epsilon_high=settings["epsilon_high"], logging_steps=10)
        trainer = GRPOTrainer(model=settings["base"], reward_funcs=[countdown_reward], args=args,
                              train_dataset=dataset)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
        trainer.save_model(str(policy_dir))
    metrics = evaluate_policy(Policy(str(policy_dir)), settings["evaluators"], seed=seed)
    last_evaluation = layout.evaluation(layout.phase("eval", settings["iterations"] - 1))
    write_json_atomic(last_evaluation, {"policy": str(policy_dir), "metrics": metrics})
    write_json_atomic(layout.root / "trl_rewards.json", {"logged_every_10_steps": rewards})
    layout.manifest.write_text(json.dumps({"trl": True, "steps": steps, "seed": seed}))
    print(f"trl seed {seed}: {metrics}", flush=True)
    return layout.root


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny_cpu.yaml")
    parser.add_argument("--out", type=Path, default=None, help="default: runs/study/<config stem>")
    args = parser.parse_args(argv)
    out = args.out or ROOT / "runs" / "study" / args.config.stem
    settings = loop_settings(args.config)
    for seed in args.seeds:
        run_seed(seed, settings, out)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a file: the repository root, for benchmarks.trl_reference
    main()
