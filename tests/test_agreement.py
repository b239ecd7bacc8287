"""Decisions taken together: ``agreement`` on 1 and 2 processes, and every per-step decision of the GRPO
and RFT phases with a fault injected on ONE of 2 gloo ranks (``rank_faults``). Each fault must give the
same outcome on both ranks (the same skip, or the same clear error) within a time limit: a rank left
behind in a collective would hang, and the limit turns the hang into a failure.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rloop_lightning.agreement import any_rank, on_main_process, raise_together, ranks_with, values_of_ranks
from test_strategies import free_port

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
PHASE_TIMEOUT_S = int(os.environ.get("RLOOP_TEST_PHASE_TIMEOUT", 300))  # a 2-process phase of the micro model takes ~20-60 s on a loaded 2-core machine


def test_without_a_process_group_the_answers_are_local():
    assert not dist.is_initialized()
    assert ranks_with(True) == [0] and ranks_with(False) == []
    assert any_rank(True) and not any_rank(False)
    assert values_of_ranks(3) == [3.0]
    raise_together(None, "a step")
    with pytest.raises(KeyError, match="gold"):
        raise_together(KeyError("gold"), "a step")
    assert on_main_process("a step", lambda: 7) == 7
    from rloop_lightning.loop.distributed import share_from_main

    assert share_from_main("runs/x") == "runs/x"


GROUP_TIMEOUT_S = 30  # the group's timeout in these tests: a rank left at a barrier fails after it


class FullDisk:
    """A checkpoint writer (``CheckpointIO``) or policy whose write fails on the main process only."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if dist.get_rank() == 0:
            raise OSError(28, "No space left on device", str(path))

    def save(self, dirpath, merged=False, state_dict=None):
        self.save_checkpoint({}, dirpath)
        return dirpath


def failure_of(step) -> str:
    started = time.monotonic()
    try:
        step()
    except Exception as error:  # noqa: BLE001 -- recorded for the test
        return f"{type(error).__name__}: {error} [{time.monotonic() - started:.0f} s]"
    return "no error"


def main_process_failures(rank: int, output: str) -> dict:
    """Three steps only the main process does, each failing there: the expert set of iteration 1 with
    ``replay`` and iteration 0's set missing (its designed error), the policy export, the checkpoint write
    (``Trainer.save_checkpoint`` under DDP: rank 0 writes, then every rank passes a barrier)."""
    from types import SimpleNamespace

    from rloop_lightning.callbacks import ExportPolicy, PhaseCheckpoint
    from rloop_lightning.loop.controller import BasePolicySettings, RLoop
    from rloop_lightning.loop.expert_set import ExpertSetSettings
    from rloop_lightning.loop.phases import PhaseSettings

    loop = RLoop(str(Path(output, "run")), BasePolicySettings("rloop/micro-llama"), PhaseSettings("grpo.yaml"),
                 PhaseSettings("rft.yaml"), evaluators=[], expert_set=ExpertSetSettings(replay=True))
    disk = FullDisk()

    def write_checkpoint(path, weights_only=False) -> None:
        if dist.get_rank() == 0:
            trainer.strategy.checkpoint_io.save_checkpoint({}, path)
        dist.barrier()

    trainer = SimpleNamespace(global_step=1, is_global_zero=rank == 0, default_root_dir=output,
                              strategy=SimpleNamespace(checkpoint_io=disk, barrier=lambda name=None: dist.barrier()),
                              save_checkpoint=write_checkpoint)
    return {
        "expert_set": failure_of(lambda: loop.phase("iter_01/expert_set", lambda d: loop.build_experts(1),
                                                     every_rank=False)),
        "export": failure_of(lambda: ExportPolicy().on_fit_end(trainer, SimpleNamespace(policy=disk))),
        "checkpoint": failure_of(lambda: PhaseCheckpoint(str(Path(output, "checkpoints"))).save(trainer)),
    }


def agreement_worker(rank: int, port: int, output: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    from rloop_lightning.loop.distributed import share_from_main

    result = {"shared": share_from_main(f"runs/sweep/{rank}"), "rank_one": ranks_with(rank == 1), "both": ranks_with(True), "none": ranks_with(False),
              "any_rank_one": any_rank(rank == 1), "any_none": any_rank(False),
              "values": values_of_ranks(2 * rank + 0.5), "infinite": values_of_ranks(float("inf") if rank else 4),
              "no_failure": failure_of(lambda: raise_together(None, "a step")),
              "main_result": on_main_process("a step", lambda: "written")}
    unpicklable = ValueError("bad lock") if rank == 1 else None
    if unpicklable is not None:
        unpicklable.lock = threading.Lock()  # cannot travel: its text does
    result["uncopyable"] = failure_of(lambda: raise_together(unpicklable, "a step"))
    result["main_process_failures"] = main_process_failures(rank, output)
    Path(output, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.timeout(4 * GROUP_TIMEOUT_S)
def test_every_rank_gets_the_same_answers_and_errors_on_two_processes(tmp_path):
    """Decisions, and failures: a step only the main process does fails there (``main_process_failures``),
    and every rank raises its error at once; with a barrier after the step, rank 1 would wait there until
    the group's timeout, or fail on rank 0's closed connection."""
    torch.multiprocessing.spawn(agreement_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    mine = ("main_result", "uncopyable")
    common = [{key: value for key, value in r.items() if key not in mine} for r in results]
    missing = tmp_path / "run" / "iter_00" / "expert_set" / "experts.jsonl"
    failures = {"expert_set": f"FileNotFoundError: replay: the expert set of iteration 0, {missing}, is missing [0 s]",
                "export": f"OSError: [Errno 28] No space left on device: '{tmp_path / 'policy'}' [0 s]",
                "checkpoint": f"OSError: [Errno 28] No space left on device: "
                              f"'{tmp_path / 'checkpoints' / '.step0000001.ckpt.tmp-save'}' [0 s]"}
    assert common[0] == common[1]
    assert common[0] == {"shared": "runs/sweep/0", "rank_one": [1], "both": [0, 1], "none": [], "any_rank_one": True,
                         "any_none": False, "values": [0.5, 2.5], "infinite": [4.0, float("inf")],
                         "no_failure": "no error", "main_process_failures": failures}
    assert results[0]["main_result"] == "written" and results[1]["main_result"] is None
    assert results[0]["uncopyable"] == "PeerFailure: ValueError: bad lock (raised on rank 1 in a step; rank 0 stops with it) [0 s]"
    assert results[1]["uncopyable"] == "ValueError: bad lock [0 s]"


# --------------------------------------------------------------------------- faults on one rank of a phase

GRPO_CONFIG = """
seed_everything: 0
trainer:
  max_steps: {max_steps}
  max_epochs: {max_epochs}
  log_every_n_steps: 1
  enable_checkpointing: false
  enable_progress_bar: false
  logger: false
  default_root_dir: {root}
  callbacks:
{callbacks}
    - class_path: rank_faults.RankRecord
      init_args: {{directory: {root}/ranks}}
model:
  policy: {{model_name_or_path: rloop/micro-llama}}
  sampling: {{max_new_tokens: 6}}
  num_generations: 2
  micro_batch_size: 4
  max_bad_steps: {max_bad_steps}
  optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 0.01}}}}
{model_extra}
data:
  class_path: {datamodule}
  init_args:
    task: {{class_path: rloop_lightning.tasks.Countdown, init_args: {{num_train: 32, num_test: 4, num_ood: 4}}}}
    batch_size: 2
"""


def fault(kind: str, batches: list[int]) -> str:
    return (f"    - class_path: rank_faults.RankFault\n"
            f"      init_args: {{kind: {kind}, batches: {batches}}}")


def run_phase(tmp_path: Path, command: str, config: str, strategy: str = "ddp_cpu") -> tuple[int, str, list[dict]]:
    """Run ``rloop {command} fit`` on 2 CPU processes; (exit code, output, each rank's record)."""
    path = tmp_path / "phase.yaml"
    path.write_text(config)
    environment = {**os.environ, "OMP_NUM_THREADS": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    run = [sys.executable, "-m", "rloop_lightning", command, "fit", "--config", str(path),
           "--config", str(ROOT / "configs" / "strategies" / f"{strategy}.yaml")]
    process = subprocess.Popen(run, cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=PHASE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # rank 0 and the ranks its launcher started
        output, _ = process.communicate()
        pytest.fail(f"the 2-process phase did not end within {PHASE_TIMEOUT_S} s (a rank hangs in a collective):\n"
                    + output[-3000:])
    records = [json.loads(p.read_text()) if p.exists() else {} for p in
               (tmp_path / "run" / "ranks" / f"rank{r}.json" for r in (0, 1))]
    return process.returncode, output, records


def grpo_config(tmp_path: Path, callbacks: list[str], max_steps: int = 2, max_bad_steps: int = 3,
                max_epochs: int = -1, model_extra: str = "",
                datamodule: str = "rloop_lightning.data.datamodules.PromptDataModule") -> str:
    return GRPO_CONFIG.format(root=tmp_path / "run", callbacks="\n".join(callbacks), max_steps=max_steps,
                              max_bad_steps=max_bad_steps, max_epochs=max_epochs, model_extra=model_extra,
                              datamodule=datamodule)


@pytest.mark.slow
def test_a_nonfinite_loss_or_gradient_on_one_rank_skips_the_update_on_every_rank(tmp_path):
    """Rank 1's loss is NaN in batch 0 (it would leave the micro-batch loop before backward, rank 0 would
    wait in DDP's gradient all-reduce) and its gradient norm in batch 1: both ranks skip both updates."""
    code, output, records = run_phase(tmp_path, "grpo", grpo_config(
        tmp_path, [fault("loss", [0]), fault("grad", [1])], max_steps=2))
    assert code == 0, output[-3000:]
    for record in records:
        assert record["batches"] == 4 and record["global_step"] == 2  # 2 updates skipped, 2 made
    assert records[0]["checksum"] == records[1]["checksum"]  # the same updates: the same weights
    assert output.count("non-finite loss or gradient on rank(s) [1]: update skipped (1 in a row)") == 2
    assert output.count("non-finite loss or gradient on rank(s) [1]: update skipped (2 in a row)") == 2


@pytest.mark.slow
def test_consecutive_nonfinite_updates_on_one_rank_stop_every_rank_with_the_same_error(tmp_path):
    code, output, records = run_phase(tmp_path, "grpo", grpo_config(tmp_path, [fault("loss", [0])], max_bad_steps=1))
    assert code != 0
    for record in records:
        assert record.get("error") == ("RuntimeError: 1 consecutive non-finite updates on rank(s) [1] "
                                       "(max_bad_steps=1); lower the learning rate or check the rewards"), output[-3000:]


@pytest.mark.slow
def test_failed_rewards_on_one_rank_stop_every_rank_with_a_clear_error(tmp_path):
    code, output, records = run_phase(tmp_path, "grpo", grpo_config(
        tmp_path, [], max_steps=4, max_bad_steps=2,
        model_extra="  reward_functions: [rank_faults.fails_on_rank_one]"))
    assert code != 0
    errors = [record.get("error", "") for record in records]
    for error in errors:
        assert error.startswith("RuntimeError: every reward of the last 2 steps failed on rank(s) [1] "
                                "(max_bad_steps=2): "), output[-3000:]
    assert "reward function 'fails_on_rank_one'" in errors[1]  # the failing rank names the cause
    assert "the failing ranks' logs name the cause" in errors[0]


@pytest.mark.slow
def test_a_reward_that_exits_on_one_rank_stops_every_rank_with_its_named_error(tmp_path):
    """Rank 1's reward calls ``sys.exit``: rank 0 raises the same ``RewardFunctionExit`` (noted as rank 1's),
    not gloo's "Connection closed by peer" at its next collective; the log ends with the named error."""
    code, output, records = run_phase(tmp_path, "grpo", grpo_config(
        tmp_path, [], max_steps=1, model_extra="  reward_functions: [rank_faults.exits_on_rank_one]"))
    assert code != 0
    for record in records:
        assert record.get("error", "").startswith(
            "RewardFunctionExit: reward function 'exits_on_rank_one' raised SystemExit(3): a reward function must "
            "return scores"), output[-3000:]
    assert "Connection closed by peer" not in output
    last = [re.sub(r"^\[rank\d\]: ", "", line) for line in output.splitlines() if line.strip()][-3:]  # torch's prefix
    assert any(line.startswith("rloop_lightning.rewards.calls.RewardFunctionExit: reward function 'exits_on_rank_one'")
               for line in last), output[-3000:]
    assert "raised on rank 1 in the rewards of step 0; rank 0 stops with it" in output


@pytest.mark.slow
def test_dynamic_sampling_runs_as_many_rounds_on_every_rank_under_fsdp2(tmp_path):
    """Rank 0's groups are all informative (one round would do), rank 1's never are (3 rounds): under
    FSDP2 every ``generate`` all-gathers, so both ranks must sample 3 rounds. Within a round the ranks
    refill different amounts (rank 0 one prompt, rank 1 two), which the engine's 2 completions per
    ``model.generate`` call split into 1 and 2 calls: rank 0 makes one more, discarded, so that every
    rank makes 2 + 2 + 2 calls per step."""
    code, output, records = run_phase(tmp_path, "grpo", grpo_config(
        tmp_path, [], max_steps=2, model_extra="  reward_functions: [rank_faults.informative_on_rank_zero_only]\n"
                                                "  dynamic_sampling: true\n  max_sampling_rounds: 3\n"
                                                "  engine: {class_path: rloop_lightning.rollout.hf.HFGenerateEngine, "
                                                "init_args: {batch_size: 2}}"),
        strategy="fsdp2_cpu")
    assert code == 0, output[-3000:]
    assert records[0]["generate_calls"] == records[1]["generate_calls"] == [3, 3]
    assert records[0]["generate_chunks"] == records[1]["generate_chunks"] == [6, 6]


@pytest.mark.slow
def test_ranks_whose_data_ends_at_different_steps_are_refused_on_every_rank(tmp_path):
    code, output, records = run_phase(tmp_path, "grpo", grpo_config(
        tmp_path, [], max_steps=-1, max_epochs=1, datamodule="rank_faults.FewerProblemsOnRankOne"))
    assert code != 0
    for record in records:  # 32 problems -> 8 batches of 2 per rank; rank 1 has 8 -> 2
        assert record.get("error") == (
            "RuntimeError: the ranks have different numbers of training batches per epoch (rank 0: 8, rank 1: 2); "
            "every rank must see as many batches (a DistributedSampler over the same dataset gives that)"), output[-3000:]


RFT_CONFIG = """
seed_everything: 0
trainer:
  max_steps: 3
  log_every_n_steps: 1
  enable_checkpointing: false
  enable_progress_bar: false
  logger: false
  default_root_dir: {root}
  callbacks:
    - class_path: rank_faults.RankFault
      init_args: {{kind: loss, batches: [1]}}
    - class_path: rank_faults.RankRecord
      init_args: {{directory: {root}/ranks}}
model:
  policy: {{model_name_or_path: rloop/micro-llama}}
  optimizer: {{class_path: torch.optim.AdamW, init_args: {{lr: 0.01}}}}
data:
  class_path: rloop_lightning.data.datamodules.DemonstrationDataModule
  init_args:
    task: {{class_path: rloop_lightning.tasks.Countdown, init_args: {{num_train: 32, num_test: 4, num_ood: 4}}}}
    batch_size: 4
"""


@pytest.mark.slow
def test_a_nonfinite_rft_loss_on_one_rank_skips_the_batch_on_every_rank(tmp_path):
    code, output, records = run_phase(tmp_path, "rft", RFT_CONFIG.format(root=tmp_path / "run"))
    assert code == 0, output[-3000:]
    assert records[0]["batches"] == records[1]["batches"] and records[0]["global_step"] == records[1]["global_step"]
    assert records[0]["checksum"] == records[1]["checksum"]  # the same updates (a NaN update would make both NaN)
    assert output.count("non-finite RFT loss on rank(s) [1] at step 1: batch skipped (1 in a row)") == 2


def rft_fit_on_one_process(tmp_path: Path, max_bad_steps: int, fault_batches: list[int], max_steps: int):
    import lightning as L

    from rank_faults import RankFault, RankRecord
    from rloop_lightning.data.datamodules import DemonstrationDataModule
    from rloop_lightning.policy import Policy
    from rloop_lightning.rft import RFTModule
    from rloop_lightning.tasks import Countdown

    module = RFTModule(Policy("rloop/micro-llama"), max_bad_steps=max_bad_steps)
    data = DemonstrationDataModule(Countdown(num_train=16, num_test=4, num_ood=4), batch_size=4)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(tmp_path),
                        callbacks=[RankFault("loss", fault_batches, rank=0), RankRecord(str(tmp_path / "ranks"))])
    trainer.fit(module, datamodule=data)
    return json.loads((tmp_path / "ranks" / "rank0.json").read_text())


def test_a_nonfinite_rft_loss_skips_its_update_and_max_bad_steps_in_a_row_abort(tmp_path):
    from rloop_lightning.policy import Policy

    initial = sum(float(p.detach().double().sum()) for p in Policy("rloop/micro-llama").load_model().parameters())
    skipped = rft_fit_on_one_process(tmp_path / "skip", max_bad_steps=2, fault_batches=[0], max_steps=1)
    assert skipped["checksum"] == initial and skipped["bad_steps_in_a_row"] == 1  # the one batch: no update
    trained = rft_fit_on_one_process(tmp_path / "train", max_bad_steps=2, fault_batches=[], max_steps=1)
    assert trained["checksum"] != initial
    recovered = rft_fit_on_one_process(tmp_path / "recover", max_bad_steps=2, fault_batches=[0], max_steps=2)
    assert recovered["bad_steps_in_a_row"] == 0  # a finite batch resets the count
    with pytest.raises(RuntimeError, match=r"^2 consecutive non-finite RFT losses \(max_bad_steps=2\)"):
        rft_fit_on_one_process(tmp_path / "abort", max_bad_steps=2, fault_batches=[0, 1], max_steps=3)


def test_rft_refuses_max_bad_steps_below_one():
    from rloop_lightning.policy import Policy
    from rloop_lightning.rft import RFTModule

    with pytest.raises(ValueError, match="max_bad_steps must be >= 1, got 0"):
        RFTModule(Policy("rloop/micro-llama"), max_bad_steps=0)


# --------------------------------------------------------------------------- a rank count the data cannot serve

TWO_PROCESSES = {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}


@pytest.mark.parametrize("change, message", [
    ({"evaluators.0.limit": 1},
     r"evaluator countdown/test has 1 problems \(limit=1\) for 2 ranks: every rank needs one"),
    ({"grpo.data.limit": 15},  # 15 // 2 = 7 prompts per rank < a batch of 8
     r"15 problems of task 'countdown' split 'train' \(limit=15\) cannot fill a batch of 8 prompts on each of 2 ranks"),
], ids=["fewer-held-out-problems-than-ranks", "fewer-prompts-than-ranks-need"])
def test_the_loop_refuses_a_rank_count_the_data_cannot_serve_before_any_model_loads(tmp_path, monkeypatch, change,
                                                                                    message):
    import yaml

    from rloop_lightning.cli import cli_main
    from rloop_lightning.policy import Policy
    from test_loop import write_loop_config

    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    loop = yaml.safe_load(config.read_text())
    (key, value), = change.items()
    if key.startswith("evaluators"):
        loop["evaluators"][0]["limit"] = value
    else:
        loop["grpo"]["overrides"]["data.init_args.limit"] = value
        loop["grpo"]["overrides"]["data.init_args.batch_size"] = 8
    config.write_text(yaml.safe_dump(loop))
    monkeypatch.setattr(Policy, "load_model", lambda self: pytest.fail("a model loaded before the check"))
    with pytest.raises(ValueError, match=message):
        cli_main(["fit", "--config", str(config), "--trainer", json.dumps(TWO_PROCESSES)])
    assert not (tmp_path / "run").exists()


def test_async_rollouts_on_several_ranks_are_refused_by_rloop_fit_before_any_rank_or_model_starts(tmp_path, monkeypatch):
    """``rloop fit --config LOOP --config configs/loop/ddp_cpu.yaml`` with ``model.rollout.mode: async``: the
    loop's validation refuses it, before the ranks start, theta_0 loads or is evaluated."""
    import yaml

    from rloop_lightning.cli import cli_main
    from rloop_lightning.loop import controller
    from rloop_lightning.policy import Policy
    from test_loop import write_loop_config

    config = write_loop_config(tmp_path / "configs", tmp_path / "run")
    loop = yaml.safe_load(config.read_text())
    loop["grpo"]["overrides"]["model.rollout.mode"] = "async"
    config.write_text(yaml.safe_dump(loop))
    monkeypatch.setattr(Policy, "load_model", lambda self: pytest.fail("a model loaded before the check"))
    monkeypatch.setattr(controller, "start_ranks", lambda **_: pytest.fail("the ranks started before the check"))
    monkeypatch.setattr(controller, "evaluate_policy", lambda *_, **__: pytest.fail("theta_0 evaluated before the check"))
    with pytest.raises(ValueError, match=r"rollout.mode=async runs one sampler process beside one training process; "
                                         r"this phase has 2 ranks \(DDPStrategy\): use rollout.mode=sync"):
        cli_main(["fit", "--config", str(config), "--config", str(ROOT / "configs" / "loop" / "ddp_cpu.yaml")])
    assert not (tmp_path / "run").exists()


def test_prompts_that_fill_one_batch_per_rank_exactly_are_accepted():
    from rloop_lightning.data.datamodules import PromptDataModule
    from rloop_lightning.tasks import Countdown

    data = PromptDataModule(Countdown(num_train=16, num_test=4, num_ood=4), batch_size=8)
    data.setup("validate")
    data.check_ranks(2)  # 16 // 2 = 8: exactly one batch each
    with pytest.raises(ValueError, match="16 problems .* cannot fill a batch of 8 prompts on each of 3 ranks"):
        data.check_ranks(3)
    with pytest.raises(ValueError, match=r"cannot fill a batch of 8 prompts: raise"):
        PromptDataModule(Countdown(num_train=7, num_test=4, num_ood=4), batch_size=8).setup("fit")
