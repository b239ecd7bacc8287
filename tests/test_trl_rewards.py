"""Every reward function of ``trl.rewards`` runs unchanged: through RewardRunner (scores equal to TRL's
own call) and through a short ``rloop grpo fit`` on a MATH-format local file, on a policy with a chat
template (messages) and on one without (strings, where TRL's message-reading functions are refused at
set-up, as TRL itself would fail on them)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml

trl_rewards = pytest.importorskip("trl.rewards")

from rloop_lightning import tiny  # noqa: E402
from rloop_lightning.cli import cli_main  # noqa: E402
from rloop_lightning.rewards import ChatFormat, RewardFunctionError, RewardRunner, TrainerState  # noqa: E402
from rloop_lightning.rewards.calls import CallLog  # noqa: E402
from rloop_lightning.tasks import MATH  # noqa: E402

MATH_FILES = Path(__file__).parent / "data" / "math_format"
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)

# The factories, built at module level so that YAML (and spawned workers) can name them by import path.
soft_overlong = trl_rewards.get_soft_overlong_punishment(max_completion_len=8, soft_punish_cache=4)
cosine_scaled = trl_rewards.get_cosine_scaled_reward(max_len=8)
repetition_penalty = trl_rewards.get_repetition_penalty_reward(ngram_size=2)
MESSAGE_READERS = [trl_rewards.accuracy_reward, trl_rewards.think_format_reward,
                   trl_rewards.reasoning_accuracy_reward, cosine_scaled]
TOKEN_READERS = [soft_overlong, repetition_penalty]
EVERY_FUNCTION = MESSAGE_READERS + TOKEN_READERS
NAMES = ["accuracy_reward", "think_format_reward", "reasoning_accuracy_reward", "cosine_scaled_reward",
         "soft_overlong_punishment_reward", "repetition_penalty_reward"]


def math_problems() -> list[dict]:
    return MATH(path=str(MATH_FILES), train_path=None).load("train")


def call_as_trl(function, prompts, completions, completion_ids, columns):
    """What GRPOTrainer._calculate_rewards does for a sync function (None kept as None)."""
    log = CallLog()
    return function(prompts=prompts, completions=completions, completion_ids=completion_ids,
                    trainer_state=TrainerState(), log_extra=log.log_extra, log_metric=log.log_metric, **columns)


TEXTS = [
    "<think>1+1</think> so \\boxed{2}",  # right, think format
    "<think>halves</think> \\boxed{2}",  # wrong
    "\\boxed{12}",  # right, no think block
    "<think>2/4 2/4 2/4 2/4</think> \\boxed{\\frac{1}{2}}",  # right, repetitive
]
IDS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [1], [5, 5, 5, 5, 5, 5, 5, 5, 5]]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_trl_reward_scores_as_trl_scores_it_on_chat_messages(num_workers):
    problems = math_problems()[:4]
    chat = ChatFormat()
    with RewardRunner(EVERY_FUNCTION, num_workers=num_workers) as runner:
        result = runner.score_problems(problems, [0, 1, 2, 3], TEXTS, IDS, chat=chat)
    prompts = [chat.prompt(p["prompt"]) for p in problems]
    completions = [chat.completion(text) for text in TEXTS]
    columns = {key: [p[key] for p in problems] for key in problems[0] if key != "prompt"}
    expected = {name: call_as_trl(function, prompts, completions, IDS, columns)
                for name, function in zip(NAMES, EVERY_FUNCTION)}
    assert result.per_function == expected
    # and by hand: what each function is documented to return for these completions
    assert expected["accuracy_reward"] == [1.0, 0.0, 1.0, 1.0]
    assert expected["think_format_reward"] == [1.0, 1.0, 0.0, 1.0]
    assert expected["reasoning_accuracy_reward"] == [1.0, 0.0, 0.0, 1.0]  # no </think>: incomplete reasoning
    assert expected["soft_overlong_punishment_reward"] == [0.0, -0.75, 0.0, -1.0]  # (8-4-7)/4; 9 > 8
    assert expected["repetition_penalty_reward"] == pytest.approx([0.0, 0.0, 0.0, -(1 - 1 / 8)])
    assert (result.num_errors, result.num_timeouts, result.num_unscored) == (0, 0, 0)
    assert result.columns["solution"] == [p["solution"] for p in problems]  # accuracy_reward's log_extra
    assert set(result.columns) >= {"gold_parsed", "answer_parsed", "reasoning_accuracy_reward/gold_parsed"}


def test_token_rewards_work_on_strings_and_message_readers_are_refused_at_set_up_by_name():
    problems = math_problems()[:4]
    with RewardRunner(TOKEN_READERS, num_workers=0) as runner:
        runner.check_problems(problems)
        result = runner.score_problems(problems, [0, 1, 2, 3], TEXTS, IDS)
    columns = {key: [p[key] for p in problems] for key in problems[0] if key != "prompt"}
    prompts = [p["prompt"] for p in problems]
    assert result.per_function == {name: call_as_trl(function, prompts, TEXTS, IDS, columns)
                                   for name, function in zip(NAMES[4:], TOKEN_READERS)}
    for function in MESSAGE_READERS:
        with RewardRunner([function], num_workers=0) as runner, pytest.raises(
                RewardFunctionError, match=rf"'{function.__name__}' failed the set-up check .* it raised "
                                           r"IndexError: .* use a policy with a chat template"):
            runner.check_problems(problems)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    directory = tiny.materialize("rloop/micro-llama", tmp_path_factory.mktemp("chat") / "micro-chat")
    tokenizer = tiny.build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def grpo_config(tmp_path: Path, model: str, functions: list[str], steps: int = 2) -> Path:
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": steps, "logger": False,
                    "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"),
                    "callbacks": [{"class_path": "test_trl_rewards.RecordScores"}]},
        "model": {"policy": {"model_name_or_path": model}, "sampling": {"max_new_tokens": 10},
                  "num_generations": 2, "reward_functions": functions},
        "data": {"class_path": "rloop_lightning.data.datamodules.PromptDataModule",
                 "init_args": {"task": {"class_path": "rloop_lightning.tasks.MATH",
                                        "init_args": {"path": str(MATH_FILES), "train_path": None}},
                               "batch_size": 2}},
    }
    path = tmp_path / "grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class RecordScores(L.Callback):
    """Every step's trajectories, reward-health counters and reward function names."""

    steps: list[tuple[list[dict], dict, list[str]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        RecordScores.steps.append((outputs["trajectories"], dict(vars(pl_module.scoring_stats)),
                                   pl_module.runner.names))


TRL_PATHS = ["trl.rewards.accuracy_reward", "trl.rewards.think_format_reward",
             "trl.rewards.reasoning_accuracy_reward", "test_trl_rewards.cosine_scaled",
             "test_trl_rewards.soft_overlong", "test_trl_rewards.repetition_penalty"]


def test_grpo_fit_with_trl_accuracy_reward_on_a_chat_policy_scores_as_trl(tmp_path, chat_model_dir):
    RecordScores.steps.clear()
    cli_main(["grpo", "fit", "--config", str(grpo_config(tmp_path, str(chat_model_dir),
                                                         ["trl.rewards.accuracy_reward"]))])
    assert len(RecordScores.steps) == 2
    for records, stats, names in RecordScores.steps:
        assert names == ["accuracy_reward"] and stats["num_errors"] == 0 and stats["num_timeouts"] == 0
        completions = [[{"role": "assistant", "content": r["completion"]}] for r in records]
        by_id = {p["id"]: p for p in math_problems()}
        solutions = [by_id[r["prompt_id"]]["solution"] for r in records]
        trl_scores = trl_rewards.accuracy_reward(completions=completions, solution=solutions)
        assert [r["reward"] for r in records] == [0.0 if s is None else s for s in trl_scores]
        assert [r["reward_columns"]["solution"] for r in records] == solutions  # log_extra reached the records


@pytest.mark.parametrize("chat", [True, False])
def test_grpo_fit_runs_every_trl_reward(tmp_path, chat_model_dir, chat):
    RecordScores.steps.clear()
    model = str(chat_model_dir) if chat else "rloop/micro-llama"
    paths = TRL_PATHS if chat else TRL_PATHS[4:]
    cli_main(["grpo", "fit", "--config", str(grpo_config(tmp_path, model, paths, steps=1))])
    (records, stats, names), = RecordScores.steps
    assert names == (NAMES if chat else NAMES[4:])
    assert stats["num_errors"] == 0 and stats["num_timeouts"] == 0 and len(records) == 4
    if not chat:  # a message-reading function on a string policy: refused before any sampling, by name
        with pytest.raises(RewardFunctionError, match="'accuracy_reward' failed the set-up check"):
            cli_main(["grpo", "fit", "--config", str(grpo_config(tmp_path, model, TRL_PATHS[:1], steps=1))])


def test_rloop_fit_trains_with_trl_accuracy_reward_on_a_chat_policy(tmp_path, chat_model_dir):
    """The loop (GRPO phase, expert set, evaluation) with TRL's ``accuracy_reward`` on a chat-template policy
    and a MATH-format file: no reward errors or timeouts in any step, and the records score as TRL does."""
    from test_loop import manifest, read_jsonl, rft_yaml

    RecordScores.steps.clear()
    rft = tmp_path / "rft.yaml"
    rft.write_text(yaml.safe_dump(rft_yaml()))
    task = {"class_path": "rloop_lightning.tasks.MATH", "init_args": {"path": str(MATH_FILES), "train_path": None}}
    loop = {"run_dir": str(tmp_path / "loop"), "iterations": 1, "base": {"policy": str(chat_model_dir)},
            "grpo": {"config": str(grpo_config(tmp_path, str(chat_model_dir), ["trl.rewards.accuracy_reward"]))},
            "rft": {"config": str(rft)},
            "evaluators": [{"task": task, "split": "test", "num_samples": 2, "ks": [1, 2], "limit": 2,
                            "sampling": {"max_new_tokens": 10}}]}
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(loop))
    cli_main(["fit", "--config", str(path)])
    run_dir = tmp_path / "loop"
    assert {"eval/theta_0", "iter_00/grpo", "iter_00/expert_set"} <= set(manifest(run_dir)["completed"])
    rows = read_jsonl(run_dir / "iter_00" / "grpo" / "metrics.jsonl")
    assert len(rows) == 2 and all(row["rewards/errors"] == 0 and row["rewards/timeouts"] == 0 for row in rows)
    by_id = {p["id"]: p for p in math_problems()}
    for records, stats, names in RecordScores.steps:
        assert names == ["accuracy_reward"] and stats["num_errors"] == 0
        completions = [[{"role": "assistant", "content": r["completion"]}] for r in records]
        trl_scores = trl_rewards.accuracy_reward(completions=completions,
                                                 solution=[by_id[r["prompt_id"]]["solution"] for r in records])
        assert [r["reward"] for r in records] == [0.0 if s is None else s for s in trl_scores]
