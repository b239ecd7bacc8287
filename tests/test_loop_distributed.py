"""The whole loop on 2 CPU processes (gloo), as a user starts it: ``rloop fit --config LOOP --config
configs/loop/{ddp,fsdp2}_cpu.yaml`` (Lightning's launcher starts the second rank before theta_0's
evaluation), with vLLM for rollouts and evaluation, and under ``torchrun`` on two "nodes". The expert
set, evaluations and report are written once; killing the main process ends the other rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_loop import COMPLETIONS_PER_STEP, manifest, read_jsonl, write_loop_config

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
STEPS = 3  # the loop test config's GRPO override


def run_command(arguments: list[str], log_path: Path, launcher: tuple[str, ...] = ("-m", "rloop_lightning"),
                timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m rloop_lightning ARGUMENTS`` (or another launcher module) from the repository root."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    with open(log_path, "w") as log:
        return subprocess.run([sys.executable, *launcher, *arguments], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)


def run_loop(config: Path, strategy: str, log_path: Path) -> subprocess.CompletedProcess:
    return run_command(["fit", "--config", str(config), "--config", str(REPO / "configs" / "loop" / f"{strategy}.yaml")],
                       log_path)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp_cpu", "fsdp2_cpu"])
def test_loop_on_two_processes(tmp_path, strategy):
    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    log_path = tmp_path / "loop.log"
    result = run_loop(config, strategy, log_path)
    log = log_path.read_text()
    assert result.returncode == 0, log[-4000:]
    run_dir = tmp_path / "run"
    assert set(manifest(run_dir)["completed"]) == {"eval/theta_0"} | {
        f"iter_{k:02d}/{phase}" for k in (0, 1) for phase in ("grpo", "expert_set", "rft", "eval")}
    for k in (0, 1):
        experts = run_dir / f"iter_{k:02d}" / "grpo" / "experts"
        # both ranks explored: each wrote its own shards and prompt statistics, every step
        harvested = 0
        for rank in ("rank00", "rank01"):
            stats = json.loads((experts / f"prompt_stats.{rank}.json").read_text())
            assert sum(s["attempts"] for s in stats.values()) == STEPS * COMPLETIONS_PER_STEP
            records = [r for shard in sorted((experts / rank).glob("*.jsonl")) for r in read_jsonl(shard)]
            assert len(records) == sum(s["successes"] for s in stats.values()) > 0
            harvested += len(records)
        # one expert set, built once from both ranks' harvest
        summary = json.loads((run_dir / f"iter_{k:02d}" / "expert_set" / "summary.json").read_text())
        assert summary["harvested"] == harvested
        assert log.count(f"iteration {k} expert set:") == 1
        assert (run_dir / f"iter_{k:02d}" / "rft" / "policy" / "model.safetensors").exists()
    assert log.count("evaluation of ") == 3  # theta_0, theta_1, theta_2: once each
    assert log.count("RLoop finished") == 1
    assert "theta_2" in (run_dir / "report.md").read_text()


EVAL_PROBLEMS, EVAL_SAMPLES = 8, 16  # per split: 128 samples


def shrunk_main_job(run_dir: Path) -> dict:
    """What the test puts after the user's ``--config`` files: ``configs/tiny_cpu.yaml``'s phases and K, shrunk.

    theta_0 is the built-in ``rloop/tiny-llama`` (random weights: vLLM's CPU attention needs its head size;
    no base build), rewarded for any digit (``loop_helpers.has_digit``: a random model earns it often, so
    every iteration has an expert set, an RFT phase and a theta_{k+1} to evaluate), 2 GRPO steps of 4
    prompts x 4 samples per rank, 1 RFT epoch, and 8 held-out problems x 16 samples per split."""
    evaluator = {"task": {"class_path": "loop_helpers.DigitCountdown"}, "num_samples": EVAL_SAMPLES,
                 "ks": [1, 4, 16], "limit": EVAL_PROBLEMS, "sampling": {"temperature": 1.0, "max_new_tokens": 8}}
    return {
        "run_dir": str(run_dir),
        "base": {"policy": "rloop/tiny-llama", "build_config": None},
        "grpo": {"overrides": {
            "trainer.max_steps": 2, "trainer.enable_progress_bar": False,
            "trainer.callbacks": [{"class_path": "rloop_lightning.callbacks.ExpertHarvester",
                                   "init_args": {"keep_truncated": True}}],
            "model.reward_functions": ["loop_helpers.has_digit"], "model.correctness_function": "has_digit",
            "model.num_generations": 4, "model.sampling.max_new_tokens": 8,
            "data.init_args.batch_size": 4, "data.init_args.limit": 16}},
        "rft": {"overrides": {"trainer.max_epochs": 1, "trainer.enable_progress_bar": False,
                              "data.init_args.batch_size": 8}},
        "evaluators": [{**evaluator, "split": "test"}, {**evaluator, "split": "ood", "greedy": False}],
        "output": "theta_K",  # no validation evaluator here (the shipped best_validation chooses on one)
    }


def held_out(run_dir: Path, phase: str) -> dict:
    return json.loads((run_dir / phase / "eval.json").read_text())["metrics"]


# avg@16 over 8 problems x 16 samples: the mean of 128 Bernoulli draws, 16 per problem with success
# probability p_i; over the same 8 problems its variance is sum_i p_i (1 - p_i) / (16 * 8^2) <= 1 / (4 * 128),
# so the difference of two independent runs' avg@16 has a standard error of at most sqrt(2 / (4 * 128)) = 0.0625.
# 4 standard errors: a false alarm once in ~16,000 comparisons (normal approximation).
AVG_NOISE = 4 * (2 / (4 * EVAL_PROBLEMS * EVAL_SAMPLES)) ** 0.5


@pytest.mark.slow
@pytest.mark.vllm
def test_the_main_job_with_vllm_on_two_processes_reports_what_one_process_reports(tmp_path):
    """``rloop fit --config configs/tiny_cpu.yaml --config configs/loop/ddp_cpu.yaml --config
    configs/engines/vllm_cpu_loop.yaml`` (shrunk), K = 2: every rank starts before theta_0's evaluation,
    every vLLM engine (evaluation and rollouts) joins the one 2-process group, both ranks explore in every
    iteration, and the held-out numbers of theta_0, theta_1 and theta_2 are one process's within sampling
    noise. (FSDP2 with vLLM on 2 processes, K = 2: the DAPO RLoop rehearsal, tests/test_rehearsal_runs.py.)"""
    runs = {}
    for processes in (1, 2):
        run_dir = tmp_path / f"run{processes}"
        shrink = tmp_path / f"shrink{processes}.yaml"
        shrink.write_text(yaml.safe_dump(shrunk_main_job(run_dir)))
        configs = ["configs/tiny_cpu.yaml"] + (["configs/loop/ddp_cpu.yaml"] if processes == 2 else []) + [
            "configs/engines/vllm_cpu_loop.yaml", str(shrink)]
        log_path = tmp_path / f"loop{processes}.log"
        result = run_command(["fit", *(a for c in configs for a in ("--config", c))], log_path, timeout=900)
        log = log_path.read_text()
        assert result.returncode == 0, log[-4000:]
        runs[processes] = run_dir
        phases = [f"iter_{k:02d}/{phase}" for k in (0, 1) for phase in ("grpo", "expert_set", "rft", "eval")]
        assert set(manifest(run_dir)["completed"]) == {"eval/theta_0", *phases}
        assert log.count("evaluation of ") == 3  # theta_0, theta_1, theta_2: written once each
        assert "theta_2" in (run_dir / "report.md").read_text()
    log = (tmp_path / "loop2.log").read_text()
    assert "(rank 0 of 1)" not in log  # no engine made a world of its own
    # per rank: the evaluation engine for theta_0, then per iteration the GRPO phase's engine and the
    # evaluation engine for theta_{k+1} (closed after every evaluation on the CPU: no memory held while training)
    assert log.count("(rank 0 of 2)") == 5 and log.count("(rank 1 of 2)") == 5
    assert (tmp_path / "loop1.log").read_text().count("(rank 0 of 1)") == 5
    for k in (0, 1):
        experts = runs[2] / f"iter_{k:02d}" / "grpo" / "experts"
        for rank in ("rank00", "rank01"):  # both ranks explored: 2 steps of 4 prompts x 4 samples each
            stats = json.loads((experts / f"prompt_stats.{rank}.json").read_text())
            assert sum(s["attempts"] for s in stats.values()) == 2 * 4 * 4
    # theta_0 is the same policy: greedy decoding gives the same answers however the problems are split
    one, two = held_out(runs[1], "eval/theta_0"), held_out(runs[2], "eval/theta_0")
    test_split = next(key for key in one if key.endswith("/test"))
    assert two[test_split]["greedy_accuracy"] == one[test_split]["greedy_accuracy"]
    for phase in ("eval/theta_0", "iter_00/eval", "iter_01/eval"):
        one, two = held_out(runs[1], phase), held_out(runs[2], phase)
        assert one.keys() == two.keys() and len(one) == 2
        for split, metrics in one.items():
            assert abs(two[split][f"avg@{EVAL_SAMPLES}"] - metrics[f"avg@{EVAL_SAMPLES}"]) <= AVG_NOISE, (
                phase, split, one, two)


@pytest.mark.slow
def test_a_loop_started_by_torchrun_on_two_nodes_runs_every_phase_on_both(tmp_path):
    """``torchrun --nnodes 2 --nproc-per-node 1`` twice on localhost (two "nodes" sharing the run
    directory): Lightning's TorchElasticEnvironment takes the ranks torchrun started; nothing is launched
    again, and the loop runs as under Lightning's own launcher."""
    from test_strategies import free_port

    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    loop = yaml.safe_load(config.read_text())
    loop.update(iterations=1, trainer={"accelerator": "cpu", "devices": 1, "num_nodes": 2, "strategy": "ddp"})
    config.write_text(yaml.safe_dump(loop))
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    nodes = []
    for node in (0, 1):
        log = open(tmp_path / f"node{node}.log", "w")
        nodes.append((subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
             "-m", "rloop_lightning", "fit", "--config", str(config)],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log))
    try:
        codes = [process.wait(timeout=600) for process, _ in nodes]
    finally:
        for process, log in nodes:
            if process.poll() is None:
                os.killpg(process.pid, 9)
            log.close()
    logs = [(tmp_path / f"node{node}.log").read_text() for node in (0, 1)]
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "rank 0 of 2 started (TorchElasticEnvironment)" in logs[0]
    assert "rank 1 of 2 started (TorchElasticEnvironment)" in logs[1]
    run_dir = tmp_path / "run"
    assert set(manifest(run_dir)["completed"]) == {"eval/theta_0"} | {
        f"iter_00/{phase}" for phase in ("grpo", "expert_set", "rft", "eval")}
    experts = run_dir / "iter_00" / "grpo" / "experts"
    for rank in ("rank00", "rank01"):
        stats = json.loads((experts / f"prompt_stats.{rank}.json").read_text())
        assert sum(s["attempts"] for s in stats.values()) == STEPS * COMPLETIONS_PER_STEP
    assert logs[0].count("evaluation of ") == 2 and logs[1].count("evaluation of ") == 0  # written by rank 0


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal: Linux")
def test_killing_the_main_process_ends_its_ranks_and_a_rerun_finishes(tmp_path):
    """SIGKILL ``rloop fit``'s main process in the middle of a 2-process GRPO phase, while the ranks sit
    in a 20 s pause between steps (no collective to notice the loss): the rank Lightning's launcher
    started dies with it at once (nothing left running), and a rerun of the same command finishes."""
    import time

    from loop_helpers import STEP_DELAY_ENV

    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    loop = yaml.safe_load(config.read_text())
    loop.update(iterations=1)
    config.write_text(yaml.safe_dump(loop))
    env = dict(os.environ, OMP_NUM_THREADS="1", **{STEP_DELAY_ENV: "20"},
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "rloop_lightning", "fit", "--config", str(config),
               "--config", str(REPO / "configs" / "loop" / "ddp_cpu.yaml")]
    with open(tmp_path / "killed.log", "w") as log:
        main = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        shards = tmp_path / "run" / "iter_00" / "grpo" / "experts" / "rank01"
        while not (shards.exists() and list(shards.glob("*.jsonl")) and children(main.pid)):  # a step ended
            assert main.poll() is None and time.monotonic() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
            time.sleep(0.2)
        ranks = [pid for pid in children(main.pid) if "rloop_lightning" in Path(f"/proc/{pid}/cmdline").read_text()]
        assert ranks, "no rank process found"
        main.kill()
        main.wait(timeout=30)
        deadline = time.monotonic() + 10  # well inside the 20 s pause
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(alive(pid) for pid in ranks), "a rank outlived the main process"
    finally:
        try:
            os.killpg(main.pid, 9)
        except ProcessLookupError:
            pass
    result = run_command(["fit", "--config", str(config), "--config", str(REPO / "configs" / "loop" / "ddp_cpu.yaml")],
                         tmp_path / "rerun.log")
    assert result.returncode == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    assert set(manifest(tmp_path / "run")["completed"]) == {"eval/theta_0"} | {
        f"iter_00/{phase}" for phase in ("grpo", "expert_set", "rft", "eval")}
