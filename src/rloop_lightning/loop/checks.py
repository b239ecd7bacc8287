"""Checks that run before any model loads: a bad value fails in seconds, naming the phase and field, not
after theta_0's evaluation or a whole GRPO phase.

``RLoop.validate_phases`` builds every phase as it will run (trainer, module, data module; a policy
loads its tokenizer but no weights), so each value's own check runs: those of the dataclasses
(``SamplingParams``, ``ExpertSetSettings``) and module ``__init__``s (``GRPOModule``, ``RFTModule``,
the data modules), and ``strategies.check_trainer_values`` on the trainer's settings. Then the prompts of the
GRPO phase and of every held-out evaluation are tokenized and checked against the model context, and
the GRPO phase's reward functions probed (``check_loop_rewards``): a reward that returns a set, a
generator, strings or the wrong number of values, raises, exits or never returns fails here, not after
theta_0's held-out evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import lightning as L
from jsonargparse import ArgumentError

from rloop_lightning.loop.phases import PhaseCLI, PhaseSettings, build_phase
from rloop_lightning.policy import Policy
from rloop_lightning.rewards import RewardFunctionError, RewardFunctionExit, RewardRunner, chat_format


def check_phase(module_class: type[L.LightningModule], settings: PhaseSettings, overrides: dict[str, Any],
                name: str) -> PhaseCLI:
    """The phase built as it will run (no weights loaded); an invalid value raises a ``ValueError`` naming
    the phase (``name``), its YAML and the field."""
    try:
        return build_phase(module_class, settings, overrides)
    except (ValueError, TypeError, ArgumentError) as error:
        raise ValueError(f"{name} phase ({settings.config} with its overrides {settings.overrides} and the "
                         f"loop's): {readable(error)}") from None


def readable(error: BaseException) -> str:
    """An instantiation error's own message, without jsonargparse's list of the optional type's other
    subtypes ("Does not validate against any of the Union subtypes ... Expected a NoneType")."""
    text = str(error)
    if "Does not validate against any of the Union subtypes" not in text:
        return text
    reasons = [line.strip()[2:] for line in text.splitlines()
               if line.strip().startswith("- ") and "Expected a <class 'NoneType'>" not in line]
    return "; ".join(reasons) or text


def check_run_dir(run_dir: Path) -> None:
    """Refuse a ``run_dir`` that is a file, or lies under one, before anything is written."""
    existing = next(path for path in [run_dir, *run_dir.parents] if path.exists() or path == path.parent)
    if not existing.is_dir():
        where = "is a file" if existing == run_dir else f"lies under {str(existing)!r}, a file"
        raise NotADirectoryError(f"run_dir {str(run_dir)!r} {where}, not a directory: point run_dir to a "
                                 "directory (a new one for a new run)")


def check_prompt_lengths(policy: Policy, prompts: Sequence[str], max_new_tokens: int, where: str,
                         max_context: Optional[int] = None) -> None:
    """Refuse a prompt whose tokens plus ``max_new_tokens`` exceed the model context (``where`` names the
    data and the setting; ``max_context`` defaults to the policy's, from its config)."""
    max_context = policy.context_length if max_context is None else max_context
    if max_context is None or not prompts:
        return
    for index, ids in enumerate(policy.encode_prompts(list(prompts))):
        if len(ids) + max_new_tokens > max_context:
            raise ValueError(f"{where}: prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                             f"it exceeds the model context of {max_context} tokens ({str(prompts[index])[:80]!r}...)")


def check_loop_prompts(grpo: PhaseCLI, evaluators: Sequence, eval_engine: Optional[Any] = None) -> None:
    """The GRPO phase's prompts (with its ``model.sampling.max_new_tokens``) and every evaluator's (with
    its ``sampling.max_new_tokens``) fit the context of the phase's policy; the GRPO data module's own
    ``setup`` checks run too (an empty split, fewer problems than a batch)."""
    module, data = grpo.model, grpo.datamodule
    policy = module.policy
    if hasattr(data, "problems") and hasattr(data, "task"):
        data.setup("fit")
        check_prompt_lengths(policy, [p["prompt"] for p in data.problems], module.sampling.max_new_tokens,
                             f"grpo phase, task {data.task.name!r} split {data.split!r} "
                             f"(model.sampling.max_new_tokens)", getattr(module.engine, "max_model_len", None))
    for index, evaluator in enumerate(evaluators):
        check_prompt_lengths(policy, [p["prompt"] for p in evaluator.problems], evaluator.sampling.max_new_tokens,
                             f"evaluators.{index} (task {evaluator.task.name!r} split {evaluator.split!r}, "
                             f"sampling.max_new_tokens)", getattr(eval_engine, "max_model_len", None))


def check_loop_rewards(grpo: PhaseCLI, phase_config: str) -> None:
    """The GRPO phase's set-up probe of its reward functions (``RewardRunner.check_problems``: an empty
    completion for each of two prompts, with the phase's workers and time limit), run before theta_0 is
    built or evaluated; the error names the function and ``phase_config``. Its workers are stopped after.
    (Held-out evaluators probe their task's reward when an evaluation starts, before its weights load.)"""
    module, data = grpo.model, grpo.datamodule
    if not (hasattr(data, "problems") and hasattr(data, "task")):
        return
    functions = module.reward_functions or [data.task.reward]
    runner = RewardRunner(functions, module.reward_weights, module.reward_workers, module.reward_timeout)
    try:
        runner.check_problems(data.problems, chat_format(module.policy))
    except (RewardFunctionError, RewardFunctionExit) as error:  # each names the function
        raise type(error)(f"grpo phase ({phase_config}): {error}") from None
    except ValueError as error:  # a wrong number or type of values (check_reward_output) names it too
        raise ValueError(f"grpo phase ({phase_config}): {error}") from None
    finally:
        runner.close()
