"""TRL's GRPOTrainer set up like our GRPOModule: the one TRL config and dataset builder, used by
``benchmarks.grpo_step`` and ``scripts/trl_arm.py``.

The settings both fix identically: CPU fp32, a constant learning rate, no weight decay,
grad-norm clipping at 1.0, beta 0 (no KL), one optimizer step per rollout batch (all prompts x G
completions in one forward/backward), sampling at temperature 1 with no top-p/top-k, the DAPO
token-mean loss with lower clip 0.2 and group-scaled advantages, nothing saved or reported.
"""

from __future__ import annotations


def countdown_dataset(problems: list[dict], instruction: str = ""):
    """Countdown problems as a TRL dataset: the prompt (after ``instruction``) and the columns the
    reward reads."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": instruction + p["prompt"], "numbers": p["numbers"], "target": p["target"]}
                              for p in problems])


def grpo_config(output_dir: str, *, seed: int, max_steps: int, learning_rate: float, prompts_per_step: int,
                num_generations: int, max_completion_length: int, epsilon_high: float = 0.2,
                logging_steps: int = 1, **options):
    """A ``GRPOConfig`` with the settings above and the given step, batch and sampling sizes; ``options``
    are further ``GRPOConfig`` fields (e.g. ``use_vllm=True``)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=False, seed=seed, report_to=[], logging_steps=logging_steps,
        save_strategy="no", disable_tqdm=True, max_steps=max_steps, learning_rate=learning_rate,
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
        per_device_train_batch_size=prompts_per_step * num_generations, gradient_accumulation_steps=1,
        num_generations=num_generations, max_completion_length=max_completion_length, temperature=1.0,
        top_p=1.0, top_k=0, beta=0.0, num_iterations=1, epsilon=0.2, epsilon_high=epsilon_high,
        loss_type="dapo", scale_rewards="group", dataloader_num_workers=0, **options,
    )
