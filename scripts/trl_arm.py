"""The TRL arm of the study: plain GRPO in TRL's GRPOTrainer at the main job's settings.

Same base policy, the same 512 training prompts, the same total rollouts (K x 40 steps of 16 prompts
x 8 samples), the same reward (``countdown_reward``), learning rate, clip range (0.2 / 0.28),
token-mean loss, no KL; then the same held-out evaluation as ``rloop fit`` (our ``Evaluator``, same
seed). Results land in ``runs/study/tiny_cpu/trl_seed{S}/`` in the layout ``rloop fit`` uses, so
``scripts/reproduce_tiny.py --report-only`` tabulates them beside RLoop and our GRPO.

    pip install trl            # optional benchmark dependency (the `bench` extra)
    python scripts/trl_arm.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def loop_settings(config_path: Path) -> dict:
    """The pieces of the loop config the TRL arm must match."""
    from rloop_lightning.cli import fit_parser

    parser = fit_parser()
    config = parser.instantiate_classes(parser.parse_args(["--config", str(config_path)]))
    return {"base": config.base.policy, "iterations": config.iterations,
            "steps": int(config.grpo.overrides.get("trainer.max_steps", 100)),
            "lr": float(config.grpo.overrides.get("model.optimizer.init_args.lr", 5e-4)),
            "evaluators": config.evaluators}


def run_seed(seed: int, settings: dict, out: Path) -> Path:
    import torch
    from transformers import PrinterCallback
    from trl import GRPOTrainer

    from rloop_lightning.data.records import write_json_atomic
    from rloop_lightning.policy import Policy
    from rloop_lightning.rollout.hf import HFGenerateEngine
    from rloop_lightning.tasks import Countdown
    from rloop_lightning.tasks.countdown import countdown_reward
    from trl_reference import countdown_dataset, grpo_config

    run_dir = out / f"trl_seed{seed}"
    dataset = countdown_dataset(Countdown().load("train")[:512])  # PromptDataModule(limit=512) trains on these
    steps = settings["iterations"] * settings["steps"]
    with tempfile.TemporaryDirectory() as scratch:
        args = grpo_config(scratch, seed=seed, max_steps=steps, learning_rate=settings["lr"], prompts_per_step=16,
                           num_generations=8, max_completion_length=16, epsilon_high=0.28, logging_steps=10)
        trainer = GRPOTrainer(model=settings["base"], reward_funcs=[countdown_reward], args=args,
                              train_dataset=dataset)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        rewards = [entry["reward"] for entry in trainer.state.log_history if "reward" in entry]
        trainer.save_model(str(run_dir / "policy"))
    policy = Policy(str(run_dir / "policy"))
    policy.load_model()
    metrics = {}
    for evaluator in settings["evaluators"]:
        torch.manual_seed(seed)  # what RLoop.evaluate does: the run's seed
        result = evaluator.evaluate(policy, HFGenerateEngine())
        metrics[f"{result.task}/{result.split}"] = result.metrics
    write_json_atomic(run_dir / f"iter_{settings['iterations'] - 1:02d}" / "eval" / "eval.json",
                      {"policy": str(run_dir / "policy"), "metrics": metrics})
    write_json_atomic(run_dir / "trl_rewards.json", {"logged_every_10_steps": rewards})
    (run_dir / "manifest.json").write_text(json.dumps({"trl": True, "steps": steps, "seed": seed}))
    print(f"trl seed {seed}: {metrics}", flush=True)
    return run_dir


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
    main()
