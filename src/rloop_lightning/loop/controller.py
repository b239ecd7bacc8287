"""The RLoop controller: iterative policy initialisation (Zeng et al., 2025).

    for k in 0..K-1:
        explore  GRPO from theta_k, harvesting every verified-correct trajectory of every step
        filter   expert set = hard prompts' distinct correct trajectories (+ optional replay)
        exploit  RFT on the expert set, starting again from theta_k (not from the RL end point)
        theta_{k+1} = the RFT result, saved in Hugging Face format and evaluated

Each phase is a fresh Lightning Trainer built from its own YAML (the same file that drives
``rloop grpo fit`` / ``rloop rft fit``) plus per-iteration overrides: policy path, run directory,
seed. ``vanilla=True`` runs the baseline one flag away: the same K GRPO phases chained from each
other's end points, no expert set, no RFT, no re-initialisation.

Resume: the manifest records completed phases; a rerun skips them and continues a half-done GRPO or
RFT phase from its last mid-phase checkpoint (``PhaseCheckpoint``), or wipes and redoes it with the
same seed when it has none, so expert sets never gain or lose trajectories. Several processes: see
``loop.distributed`` (every rank trains and evaluates; the main process keeps the books).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import lightning as L

from rloop_lightning import tiny
from rloop_lightning.agreement import on_main_process
from rloop_lightning.callbacks import (
    ExpertHarvester, ExportPolicy, MetricsRecorder, PassAtKEvaluation, PhaseCheckpoint,
)
from rloop_lightning.records import iter_records, write_json_atomic, write_jsonl_atomic
from rloop_lightning.evaluation import Evaluator, evaluate_policy
from rloop_lightning.grpo import GRPOModule
from rloop_lightning.loop.checks import check_loop_prompts, check_loop_rewards, check_phase, check_run_dir
from rloop_lightning.loop.curves import Output, check_curve, check_curve_interval, phase_rl_steps
from rloop_lightning.loop.distributed import (
    DEFAULT_TIMEOUT_SECONDS, barrier, is_main_process, share_from_main, start_ranks,
)
from rloop_lightning.loop.expert_set import ExpertSetSettings, build_expert_set
from rloop_lightning.loop.base_identity import BASE, check_base, unresolved
from rloop_lightning.loop.layout import BASE_EVALUATION, RunLayout
from rloop_lightning.loop.lock import RunDirectoryBusy, RunLock
from rloop_lightning.loop.manifest import Manifest
from rloop_lightning.loop.verify import (
    DIGESTS, ChangedOutputError, changed_outputs, is_redone, output_digests,
)
from rloop_lightning.loop.phases import (
    OverrideValue, PhaseCLI, PhaseSettings, build_phase, check_seed, override_keys, parse_phase, phase_policy,
)
from rloop_lightning.prompt_stats import PromptStats
from rloop_lightning.rft import RFTModule
from rloop_lightning.rollout.base import RolloutEngine
from rloop_lightning.rollout.staleness import check_rollout_mode

log = logging.getLogger(__name__)
BUILD_RECORD = "rloop_base_build.json"  # in a built base's policy directory: which config built it
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")  # the form of a hub repository id: name or org/name


@dataclass
class BasePolicySettings:
    """theta_0: a hub id or local directory, built by ``build_config`` when missing."""

    policy: str = "runs/base/tiny_countdown/policy"
    """Hub id or local directory of theta_0."""
    build_config: Optional[str] = None
    """An RFT YAML that builds theta_0 into ``policy`` when that directory is missing."""

    def check(self) -> None:
        """Refuse, before anything is written, a ``policy`` that can be neither built nor found: a missing
        local path (``./x``, ``/x``, ``a/b/c``: not of the hub's ``name`` or ``org/name`` form) or an
        unknown built-in id (``rloop/...``). Hub ids are left to the hub."""
        if self.build_config is not None or tiny.is_builtin(self.policy) or os.path.exists(self.policy):
            return
        if self.policy.startswith("rloop/"):
            raise ValueError(f"base.policy {self.policy!r} is not a built-in model; built-ins: "
                             f"{sorted(tiny.BUILTIN_MODELS)}")
        if self.policy.startswith((".", "/", "~")) or not HUB_ID.fullmatch(self.policy):
            raise FileNotFoundError(
                f"base.policy {self.policy!r} does not exist (a local path, not a hub id). Point base.policy to "
                "a policy directory, a hub id (org/name) or a built-in id, or set base.build_config to build it.")


def check_checkpoint_cadence(every_n_steps: Optional[int], every_seconds: Optional[float]) -> None:
    if every_n_steps is not None and every_n_steps < 1:
        raise ValueError(f"checkpoint_every_n_steps must be >= 1 or null, got {every_n_steps}")
    if every_seconds is not None and not every_seconds > 0:
        raise ValueError(f"checkpoint_every_seconds must be > 0 or null, got {every_seconds}")


def processes_of(phase_config) -> dict:
    """The Trainer settings of a parsed phase that decide its processes."""
    return {key: phase_config.trainer.get(key) or default
            for key, default in (("accelerator", "auto"), ("devices", "auto"), ("num_nodes", 1))}


def rank_count(processes: dict) -> Optional[int]:
    """Processes in all, when the settings name a count (None for ``devices: auto`` or -1 on GPUs)."""
    devices, nodes = processes["devices"], processes["num_nodes"]
    if isinstance(devices, (list, tuple)):
        devices = len(devices)
    elif isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    elif devices == "auto" and str(processes["accelerator"]).lower() == "cpu":
        devices = 1
    if not isinstance(devices, int) or devices < 1 or not isinstance(nodes, int):
        return None
    return devices * nodes


def ensure_callback(trainer: L.Trainer, kind: type, make) -> None:
    if not any(isinstance(c, kind) for c in trainer.callbacks):
        trainer.callbacks.append(make())


class RLoop:
    """Run RLoop (or the vanilla-RL baseline) for ``iterations`` iterations in ``run_dir``.

    Args:
        run_dir: where every iteration and phase writes; also the resume state.
        base: the starting policy theta_0.
        grpo: the exploration phase.
        rft: the exploitation phase.
        evaluators: held-out evaluations of theta_0 and of every theta_{k+1}.
        iterations: K.
        expert_set: how harvested trajectories become the RFT set.
        vanilla: the plain-RL baseline: chained GRPO phases, no RFT, no re-initialisation.
        evaluate_rl_end: also evaluate each GRPO phase's end point (RLoop runs).
        rft_from: where RFT starts: ``theta_k`` (RLoop) or ``rl_end``, the GRPO end point (ablation).
        eval_engine: rollout engine of the held-out evaluations (default: Hugging Face ``generate``;
            ``VLLMEngine`` for large models). Released after every evaluation (a vLLM engine sleeps on
            CUDA with sleep mode, else closes), so it holds no memory while a phase trains.
        wandb_project: log held-out metrics per iteration to this W&B project (sweeps optimise
            ``final/<task>/<split>/<metric>``); in a sweep each run gets ``run_dir/<W&B run id>``.
        seed: base seed; phase k uses ``seed + 1000 k`` (+1 for RFT); every held-out evaluation uses ``seed``.
        resume: continue a run directory that has a manifest (same configuration only).
        trainer: Trainer settings for every GRPO and RFT phase, after each phase's own overrides, e.g.
            ``{devices: 2, strategy: ddp}`` to run the loop on two processes (``configs/loop/``).
        checkpoint_every_n_steps: GRPO and RFT phases save a resumable checkpoint every this many
            optimizer steps (None: by time only). A rerun after a crash resumes a phase from its last
            checkpoint, with the outputs of an uninterrupted run.
        checkpoint_every_seconds: ... and whenever this many seconds passed since the last one (None:
            by steps only). The default, 30 minutes, bounds the work a crash loses on a GPU, where a DAPO
            phase runs for hours and a checkpoint of a 7B model with its optimizer takes minutes to write
            (a step count would have to be tuned to each model and step time); a CPU phase of a few
            minutes writes none.
        keep_checkpoints: keep each phase's last checkpoint when the phase completes (default: deleted).
        curve_every_n_steps: evaluate the policy (``evaluators``, ``evaluate_policy`` with ``seed``: the end
            points' evaluation) every this many RL steps of every GRPO phase, both arms alike, and each GRPO
            end point: the learning curve of ``loop.curves`` and the report (None: no curve). Each point
            costs one evaluation of ``evaluators``: a phase of S steps adds floor((S - 1) / N) of them, and
            an RLoop run one more per iteration (its RL end point).
        output: the policy the loop hands over, in ``final.json`` (its path and metrics) and as W&B's
            ``final/...``: ``theta_K`` (the last RFT output; a plain-RL run's last GRPO end point),
            ``rl_end`` (the last GRPO phase's end point) or ``best_validation`` (the saved policy of highest
            validation avg@n, theta_0 and each RL end point and RFT output; needs a validation evaluator).
        distributed_timeout: seconds a rank waits for the others, several processes only: at the process
            group's rendezvous (under torchrun/SLURM ranks 1..N-1 wait there while the main process checks
            the configuration and builds or downloads theta_0) and in every later collective and barrier.
            The default, 2 hours, covers a base build or a large download; a run that exceeds it stops with
            an error naming this setting. Not part of the configuration a resumed run must repeat.
    """

    def __init__(self, run_dir: str, base: BasePolicySettings, grpo: PhaseSettings, rft: PhaseSettings,
                 evaluators: list[Evaluator], iterations: int = 2,
                 expert_set: Optional[ExpertSetSettings] = None, vanilla: bool = False,
                 evaluate_rl_end: bool = False, rft_from: Literal["theta_k", "rl_end"] = "theta_k",
                 seed: int = 0, resume: bool = True, eval_engine: Optional[RolloutEngine] = None,
                 wandb_project: Optional[str] = None, trainer: Optional[dict[str, OverrideValue]] = None,
                 checkpoint_every_n_steps: Optional[int] = None,
                 checkpoint_every_seconds: Optional[float] = 1800.0, keep_checkpoints: bool = False,
                 distributed_timeout: float = DEFAULT_TIMEOUT_SECONDS, curve_every_n_steps: Optional[int] = None,
                 output: Output = "theta_K"):
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if not distributed_timeout > 0:
            raise ValueError(f"distributed_timeout must be > 0 seconds, got {distributed_timeout}")
        check_checkpoint_cadence(checkpoint_every_n_steps, checkpoint_every_seconds)
        check_seed(seed, "seed", 1000 * (iterations - 1) + 1)  # phase k: seed + 1000 k (+1 for RFT)
        check_curve(curve_every_n_steps, evaluators, output)
        self.curve_every_n_steps = curve_every_n_steps
        self.output = output
        self.layout = RunLayout(run_dir)
        self.base = base
        self.grpo = grpo
        self.rft = rft
        self.evaluators = evaluators
        self.iterations = iterations
        self.expert_set = expert_set or ExpertSetSettings()
        self.vanilla = vanilla
        self.evaluate_rl_end = evaluate_rl_end
        self.rft_from = rft_from
        self.seed = seed
        self.resume = resume
        self.wandb_project = wandb_project
        self.eval_engine = eval_engine
        self.trainer = dict(trainer or {})
        self.checkpoint_every_n_steps = checkpoint_every_n_steps
        self.checkpoint_every_seconds = checkpoint_every_seconds
        self.keep_checkpoints = keep_checkpoints
        self.distributed_timeout = distributed_timeout
        self.manifest = Manifest(self.layout.manifest)
        self.redone: dict[str, dict[str, str]] = {}  # phase -> the digests it must give again
        self.processes: dict = {"accelerator": "auto", "devices": "auto", "num_nodes": 1}  # set by validate_phases
        self.base_revision: Optional[str] = None  # set by validate_phases

    # ------------------------------------------------------------------ driver
    def run(self, config: Optional[dict] = None) -> dict:
        config = config if config is not None else self.describe()
        self.validate_phases()
        tracker = None
        if self.wandb_project and is_main_process():
            from rloop_lightning.loop.tracking import WandbTracker

            tracker = WandbTracker(self.wandb_project, config, self.layout.root)
            if tracker.run_dir != self.layout.root:  # a sweep run: run_dir/<W&B run id>, shared in _run
                self.layout = RunLayout(tracker.run_dir)
                self.manifest = Manifest(self.layout.manifest)
        lock = RunLock(self.layout.root, main=is_main_process())  # one run per directory; ranks > 0 skip it
        try:
            lock.acquire()
        except RunDirectoryBusy:
            if tracker is not None:
                tracker.finish()
            raise
        try:
            return self._run(config)
        finally:
            if tracker is not None:
                tracker.log_results(self.manifest.data["completed"])
                tracker.finish()
            lock.release()

    def _run(self, config: dict) -> dict:
        if is_main_process():
            if self.manifest.exists and not self.resume:
                raise FileExistsError(f"{self.layout.root} already holds a run; pass --resume true or another run_dir")
            self.manifest.check_config(config)
            self.verify_finished_phases()
            check_base(self.manifest, self.base.policy, self.base_revision)  # before a missing base is rebuilt
            theta_path = self.build_base()
            if tiny.is_builtin(theta_path):
                tiny.materialize(theta_path)  # once, before the other ranks load it
        else:  # a rank started by the launcher or torchrun: the main process checks and builds
            theta_path = self.base.policy
        start_ranks(**self.processes, timeout_seconds=self.distributed_timeout)  # every rank, before any work
        root = share_from_main(str(self.layout.root))  # a W&B sweep gives the main process its run directory
        if root != str(self.layout.root):
            self.layout = RunLayout(root)
            self.manifest = Manifest(self.layout.manifest)
        barrier()  # the main process has checked the configuration and built theta_0
        self.manifest.reload()
        self.phase(BASE_EVALUATION, lambda d: self.evaluate_held_out(theta_path, BASE_EVALUATION))
        if is_main_process() and unresolved(self.manifest.data.get(BASE)):  # built, or downloaded by the evaluation
            check_base(self.manifest, theta_path, self.base_revision)
        for k in range(self.iterations):
            theta_path = self.iteration(k, theta_path)
        if is_main_process():
            from rloop_lightning.loop.report import write_final, write_report

            write_final(self.layout.root, self.output)

            log.info("RLoop finished: report at %s", write_report(self.layout.root))
        return self.results()

    def validate_phases(self) -> None:
        """Parse and build every phase's configuration with the loop's overrides before any compute (no
        weights load), check the prompts against the context and probe the reward functions
        (``loop.checks``): a typo, a bad value in a phase YAML or override, or a broken reward fails here,
        before theta_0 is built or evaluated."""
        check_run_dir(self.layout.root)
        self.base.check()
        theta = self.base.policy
        if self.base.build_config is not None:
            build = PhaseSettings(self.base.build_config)
            parse_phase(RFTModule, build, {})
            built_from = check_phase(RFTModule, build, {}, "base build").model.policy.model_name_or_path
            theta = theta if os.path.exists(theta) else built_from  # its tokenizer and context
        grpo_overrides = self.grpo_overrides(theta, self.layout.root, self.seed)
        parse_phase(GRPOModule, self.grpo, grpo_overrides)
        grpo = check_phase(GRPOModule, self.grpo, grpo_overrides, "grpo")
        self.base_revision = grpo.model.policy.revision  # the hub revision theta_0 is loaded at
        check_curve_interval(self.curve_every_n_steps, phase_rl_steps(grpo.config))
        self.processes = processes_of(grpo.config)
        # async rollouts on several ranks: refused here, not in the GRPO phase's setup after theta_0's evaluation
        check_rollout_mode(grpo.model.rollout, rank_count(self.processes) or 1, type(grpo.trainer.strategy).__name__)
        if not self.vanilla:
            rft_overrides = self.rft_overrides(theta, 0, self.layout.root, self.seed)
            parse_phase(RFTModule, self.rft, rft_overrides)
            rft = processes_of(check_phase(RFTModule, self.rft, rft_overrides, "rft").config)
            counts = rank_count(self.processes), rank_count(rft)
            if None not in counts and counts[0] != counts[1]:
                raise ValueError(f"the GRPO and RFT phases must run on as many processes (one process group serves "
                                 f"the whole loop), but GRPO has {self.processes} and RFT {rft}: set them in the "
                                 f"loop's trainer field")
        check_loop_prompts(grpo, self.evaluators, self.eval_engine)
        self.check_ranks(grpo.datamodule)
        if is_main_process():  # the other ranks run the same functions on the same probe
            check_loop_rewards(grpo, self.grpo.config)

    def check_ranks(self, grpo_data: L.LightningDataModule) -> None:
        """Refuse, before any model loads, a process count the data cannot serve: fewer held-out problems
        than ranks, or too few GRPO prompts for each rank's batch (a count Lightning resolves at launch,
        ``devices: auto``, is checked when each phase starts)."""
        ranks = rank_count(self.processes)
        if ranks is None or ranks == 1:
            return
        for evaluator in self.evaluators:
            evaluator.check_ranks(ranks)
        if hasattr(grpo_data, "check_ranks"):
            grpo_data.setup("validate")
            grpo_data.check_ranks(ranks)

    def verify_finished_phases(self) -> None:
        """Check every finished phase's files against the digests the manifest recorded (``loop.verify``):
        a missing or changed expert set or evaluation is redone, any other changed output refused."""
        for name, info in list(self.manifest.data["completed"].items()):
            recorded = info.get(DIGESTS)
            problems = (changed_outputs(self.layout.directory(name), recorded, self.layout.read_later(name))
                        if recorded is not None else [])
            if not problems:
                continue
            if not is_redone(name):
                raise ChangedOutputError(
                    f"{self.layout.root}: phase {name} finished, but " + "; ".join(problems) + ". Later phases "
                    "were computed from it, and it cannot be recomputed bit for bit: restore the file (e.g. from "
                    "a copy of the run directory), or start a new run directory.")
            log.warning("%s: %s; the phase is redone", name, "; ".join(problems))
            self.redone[name] = recorded
            del self.manifest.data["completed"][name]
        if self.redone:
            self.manifest.save()

    def iteration(self, k: int, theta_path: str) -> str:
        layout = self.layout
        grpo = layout.phase("grpo", k)
        rl_end = str(layout.policy(grpo))
        self.phase(grpo, lambda d: self.run_grpo(theta_path, d, seed=self.seed + 1000 * k))
        if self.vanilla:
            self.phase(layout.phase("eval", k), lambda d: self.evaluate_held_out(rl_end, layout.phase("eval", k)))
            return rl_end
        if self.evaluate_rl_end or self.curve_every_n_steps is not None or self.output != "theta_K":
            self.phase(layout.phase("eval_rl_end", k), lambda d: self.evaluate_held_out(rl_end, layout.phase("eval_rl_end", k)))
        self.phase(layout.phase("expert_set", k), lambda d: self.build_experts(k), every_rank=False)
        if self.manifest.info(layout.phase("expert_set", k))["size"] == 0:
            log.warning("iteration %d: empty expert set (nothing hard was solved); RFT skipped, theta_%d "
                        "carried forward", k, k)
            return theta_path
        rft = layout.phase("rft", k)
        start = theta_path if self.rft_from == "theta_k" else rl_end
        self.phase(rft, lambda d: self.run_rft(start, k, d, seed=self.seed + 1000 * k + 1))
        next_theta = str(layout.policy(rft))
        self.phase(layout.phase("eval", k), lambda d: self.evaluate_held_out(next_theta, layout.phase("eval", k)))
        return next_theta

    def phase(self, name: str, work, every_rank: bool = True) -> None:
        """Run ``work(directory)`` unless the manifest says ``name`` is done; mark it done after.

        Several processes: ``work`` runs on every rank (training and evaluation) or on the main process
        alone (``every_rank=False``: bookkeeping); the main process prepares the directory and marks the
        phase done, and every rank re-reads the manifest afterwards (``loop.distributed``).
        """
        if self.manifest.done(name):
            return
        # the main process's own steps end in on_main_process, not a barrier: when one fails, every rank
        # raises its error at once instead of waiting out distributed_timeout
        on_main_process(f"{name} (preparing its directory)", lambda: self.prepare_directory(name))
        directory = self.layout.directory(name)
        started = time.perf_counter()
        if every_rank:
            info = work(directory)
            barrier()  # every rank's outputs are written
        else:
            info = on_main_process(name, lambda: work(directory))

        def mark_done() -> None:
            digests = output_digests(directory, self.layout.read_later(name))
            expected = self.redone.pop(name, None)
            if expected is None or not name.endswith("expert_set") or digests == expected:
                self.manifest.mark_done(name, {**(info or {}), "seconds": round(time.perf_counter() - started, 2),
                                               DIGESTS: digests})

        on_main_process(f"{name} (recording it done)", mark_done)
        self.manifest.reload()
        if not self.manifest.done(name):  # every rank reads the main process's verdict from the manifest
            raise ChangedOutputError(f"{name} was rebuilt from its harvest, but its files differ from those the "
                                     "later phases were trained on: start a new run directory")

    def prepare_directory(self, name: str) -> Path:
        """The phase's directory. One left by a crash mid-phase is kept when it holds a checkpoint
        (``_fit`` resumes from it); otherwise it is wiped, and the phase redone from scratch with the same
        seed."""
        directory = self.layout.directory(name)
        if PhaseCheckpoint.latest(self.layout.checkpoints(name)) is not None:
            log.info("%s: resuming from %s", name, PhaseCheckpoint.latest(self.layout.checkpoints(name)))
            return directory
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        return directory

    # ------------------------------------------------------------------ phases
    def build_base(self) -> str:
        """theta_0: built by ``base.build_config`` when missing. A base built earlier from a config file
        with other contents is refused, not silently reused: runs would start from a stale theta_0."""
        path = Path(self.base.policy)
        if self.base.build_config is None:
            return self.base.policy
        digest = hashlib.sha256(Path(self.base.build_config).read_bytes()).hexdigest()
        record = path / BUILD_RECORD
        if (path / "config.json").exists() or (path / "adapter_config.json").exists():
            if record.exists():
                built = json.loads(record.read_text())
                if built["sha256"] != digest:
                    raise ValueError(
                        f"{path} was built by {built['build_config']} (sha256 {built['sha256'][:12]}), but "
                        f"{self.base.build_config} now has other contents (sha256 {digest[:12]}). Delete "
                        f"{path.parent} to rebuild the base, or point base.policy to another directory.")
            return self.base.policy
        if path.name != "policy":
            raise ValueError(f"base.policy must end in '/policy' to be built by {self.base.build_config} "
                             f"(the export goes to {{default_root_dir}}/policy); got {path}")
        log.info("building the base policy %s with %s", path, self.base.build_config)
        cli = build_phase(RFTModule, PhaseSettings(self.base.build_config), {"trainer.default_root_dir": str(path.parent)})
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        steps, planned = cli.trainer.global_step, cli.trainer.max_steps
        if 0 < planned and steps < planned:  # stopped by trainer.max_time: a loaded machine builds a weaker base
            log.warning("the base build stopped after %d of %d steps (trainer.max_time in %s): theta_0 is "
                        "under-trained; delete %s and rerun on an idle machine for the intended base",
                        steps, planned, self.base.build_config, path.parent)
        write_json_atomic(record, {"build_config": self.base.build_config, "sha256": digest, "steps": steps})
        return self.base.policy

    def grpo_overrides(self, theta_path: str, directory: Path, seed: int) -> dict:
        return {**override_keys("trainer", self.trainer), "model.policy.model_name_or_path": theta_path,
                "trainer.default_root_dir": str(directory), "seed_everything": seed}

    def rft_overrides(self, theta_path: str, k: int, directory: Path, seed: int) -> dict:
        return {**override_keys("trainer", self.trainer), "model.policy.model_name_or_path": theta_path,
                "trainer.default_root_dir": str(directory), "data.init_args.paths": [str(self.layout.expert_set(k))],
                "seed_everything": seed}

    def _fit(self, cli: PhaseCLI, directory: Path, curve: Optional[PassAtKEvaluation] = None) -> None:
        trainer = cli.trainer
        trainer.callbacks[:] = [c for c in trainer.callbacks if not isinstance(c, PassAtKEvaluation)] + (
            [curve] if curve else [])
        ensure_callback(trainer, ExportPolicy, ExportPolicy)
        trainer.callbacks.append(MetricsRecorder(str(directory / "metrics.jsonl")))
        checkpoints = self.layout.checkpoints(directory.relative_to(self.layout.root).as_posix())
        trainer.callbacks.append(PhaseCheckpoint(str(checkpoints), self.checkpoint_every_n_steps,
                                                 self.checkpoint_every_seconds, self.keep_checkpoints))
        # weights_only=False: the checkpoint holds RNG states (NumPy's, Python's); it is this run's own file
        trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=PhaseCheckpoint.latest(checkpoints),
                    weights_only=False)

    def run_grpo(self, theta_path: str, directory: Path, seed: int) -> dict:
        cli = build_phase(GRPOModule, self.grpo, self.grpo_overrides(theta_path, directory, seed))
        ensure_callback(cli.trainer, ExpertHarvester, ExpertHarvester)
        curve = None if self.curve_every_n_steps is None else PassAtKEvaluation(
            self.evaluators, self.curve_every_n_steps, engine=self.eval_engine, seed=self.seed,
            path=str(self.layout.curve(directory.relative_to(self.layout.root).as_posix())), at_end=False,
            end_step=phase_rl_steps(cli.config))
        try:
            self._fit(cli, directory, curve)
        finally:
            cli.model.engine.close()  # a vLLM engine's model and KV cache go before the RFT phase starts
        info = {"policy": str(directory / "policy"), "steps": cli.model.rollout_step}
        return info if curve is None else {**info, "training_seconds": round(curve.state_dict()["training_seconds"], 2)}

    def build_experts(self, k: int) -> dict:
        stats = PromptStats()
        for path in self.layout.prompt_stats(k):
            stats.merge(PromptStats.from_dict(json.loads(path.read_text())))
        shards = self.layout.harvest_shards(k)
        records, summary = build_expert_set(iter_records(shards) if shards else [], stats, self.expert_set)
        if self.expert_set.replay:
            for j in range(k):
                earlier = self.layout.expert_set(j)
                if not earlier.exists():  # never a smaller set
                    raise FileNotFoundError(f"replay: the expert set of iteration {j}, {earlier}, is missing")
                records.extend(iter_records(earlier))
            summary["size_with_replay"] = len(records)
        write_jsonl_atomic(self.layout.expert_set(k), records)
        write_json_atomic(self.layout.expert_set_summary(k), summary)
        log.info("iteration %d expert set: %s", k, summary)
        return summary

    def run_rft(self, theta_path: str, k: int, directory: Path, seed: int) -> dict:
        cli = build_phase(RFTModule, self.rft, self.rft_overrides(theta_path, k, directory, seed))
        self._fit(cli, directory)
        return {"policy": str(directory / "policy"), "started_from": theta_path}

    def evaluate_held_out(self, policy_path: str, phase: str) -> dict:
        """Held-out metrics of the policy at ``policy_path`` (``evaluate_policy`` with the run's seed), loaded
        with the GRPO phase's policy settings; written to the phase's ``eval.json``."""
        policy = phase_policy(self.grpo, policy_path)
        try:
            metrics = evaluate_policy(policy, self.evaluators, self.eval_engine, seed=self.seed)  # on every rank
        finally:
            if self.eval_engine is not None:  # its memory goes back to training until the next evaluation
                self.eval_engine.release()

        def write() -> None:
            write_json_atomic(self.layout.evaluation(phase), {"policy": policy_path, "metrics": metrics})
            log.info("evaluation of %s: %s", policy_path, metrics)

        on_main_process(f"{phase} (writing its evaluation)", write)
        return {"metrics": metrics}

    # ------------------------------------------------------------------ results
    def describe(self) -> dict:
        return {"run_dir": str(self.layout.root), "base": asdict(self.base), "grpo": asdict(self.grpo),
                "rft": asdict(self.rft), "iterations": self.iterations, "expert_set": asdict(self.expert_set),
                "vanilla": self.vanilla, "rft_from": self.rft_from, "seed": self.seed, "trainer": self.trainer,
                "curve_every_n_steps": self.curve_every_n_steps, "output": self.output}

    def results(self) -> dict:
        return dict(self.manifest.data["completed"])
