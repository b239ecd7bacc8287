"""The run manifest: config comparison on resume and persistence of completed phases."""

from __future__ import annotations

import json

import pytest

from rloop_lightning.loop.manifest import Manifest, ManifestError, config_differences, dotted_items

CONFIG = {"run_dir": "runs/x", "iterations": 2, "expert_set": {"filter": "success_rate", "max_per_prompt": 4},
          "grpo": {"config": "g.yaml", "overrides": {"trainer.max_steps": 3}}, "evaluators": [1, 2]}


def changed(**dotted) -> dict:
    """A deep copy of CONFIG with dotted fields set (a value of ``...`` deletes the field)."""
    import copy

    config = copy.deepcopy(CONFIG)
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = config
        for parent in parents:
            node = node[parent]
        if value is ...:
            del node[leaf]
        else:
            node[leaf] = value
    return config


def test_flatten_uses_dotted_keys_and_keeps_lists_as_leaves():
    assert dotted_items({"a": {"b": 1, "c": {"d": [1, {"e": 2}]}}, "f": None}) == {
        "a.b": 1, "a.c.d": [1, {"e": 2}], "f": None}


def test_config_differences_lists_exactly_the_differing_fields():
    assert config_differences(CONFIG, changed()) == []
    lines = config_differences(CONFIG, changed(expert_set__max_per_prompt=2, iterations=3, evaluators=[1]))
    assert lines == ["evaluators: [1, 2] -> [1]", "expert_set.max_per_prompt: 4 -> 2", "iterations: 2 -> 3"]


def test_config_differences_reports_added_and_removed_fields():
    lines = config_differences(CONFIG, changed(expert_set__filter=..., vanilla=True))
    assert lines == ["expert_set.filter: 'success_rate' -> '<absent>'", "vanilla: '<absent>' -> True"]
    # a dotted key inside a nested dict is one field, not split further
    assert config_differences(CONFIG, changed(grpo__overrides={"trainer.max_steps": 4})) == [
        "grpo.overrides.trainer.max_steps: 3 -> 4"]


def test_check_config_records_the_first_config_and_accepts_it_again(tmp_path):
    manifest = Manifest(tmp_path / "manifest.json")
    assert not manifest.exists
    manifest.check_config(CONFIG)
    assert manifest.exists
    Manifest(tmp_path / "manifest.json").check_config(changed())  # equal config: accepted


def test_check_config_refuses_a_different_config_naming_the_fields(tmp_path):
    Manifest(tmp_path / "manifest.json").check_config(CONFIG)
    with pytest.raises(ValueError, match="refusing to resume") as error:
        Manifest(tmp_path / "manifest.json").check_config(changed(expert_set__max_per_prompt=2, seed=1))
    message = str(error.value)
    assert "expert_set.max_per_prompt: 4 -> 2" in message
    assert "seed: '<absent>' -> 1" in message
    assert "iterations" not in message and "grpo" not in message
    assert Manifest(tmp_path / "manifest.json").data["config"] == CONFIG  # the refused config did not overwrite it


def test_mark_done_persists_across_instances(tmp_path):
    first = Manifest(tmp_path / "manifest.json")
    first.check_config(CONFIG)
    first.mark_done("iter_00/grpo", {"steps": 3, "seconds": 1.5})
    assert first.done("iter_00/grpo") and not first.done("iter_00/rft")
    second = Manifest(tmp_path / "manifest.json")
    assert second.done("iter_00/grpo")
    assert second.info("iter_00/grpo") == {"steps": 3, "seconds": 1.5}
    second.mark_done("iter_00/expert_set", {"size": 0})
    third = Manifest(tmp_path / "manifest.json")
    assert sorted(third.data["completed"]) == ["iter_00/expert_set", "iter_00/grpo"]  # saved with sorted keys
    assert third.data["config"] == CONFIG
    assert not list(tmp_path.glob(".manifest.json.tmp-*"))  # atomic writes leave no temporary file


def test_a_field_added_later_with_a_null_default_is_no_difference():
    assert config_differences({"a": 1}, {"a": 1, "eval_engine": None}) == []
    assert config_differences({"a": 1}, {"a": 1, "eval_engine": "vllm"}) == ["eval_engine: '<absent>' -> 'vllm'"]


# ---------------------------------------------------------------------------- what may change on resume

EVALUATOR = {"class_path": "rloop_lightning.evaluation.Evaluator",
             "init_args": {"split": "test", "num_samples": 4, "reward_workers": 0}}


def run_config(**dotted) -> dict:
    """A config shaped like ``rloop fit``'s snapshot, with dotted fields set (``__`` separates parts)."""
    config = {**changed(), "evaluators": [EVALUATOR, EVALUATOR], "wandb_project": None, "trainer": {},
              "rft": {"config": "r.yaml", "overrides": {}}}
    config = json.loads(json.dumps(config))  # a deep copy that shares no evaluator between the two
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = config
        for parent in parents:
            node = node[int(parent)] if isinstance(node, list) else node[parent]
        node[leaf] = value
    return config


def test_a_list_of_dicts_is_compared_item_by_item():
    assert dotted_items({"e": [{"a": 1}, {"a": 2}]}) == {"e.0.a": 1, "e.1.a": 2}
    assert config_differences(run_config(), run_config(evaluators__1__init_args__num_samples=8)) == [
        "evaluators.1.init_args.num_samples: 4 -> 8"]


@pytest.mark.parametrize("change", [
    {"run_dir": "copied/elsewhere"},
    {"wandb_project": "other"},
    {"evaluators__0__init_args__reward_workers": 4},
    {"iterations": 5},
    {"checkpoint_every_n_steps": 50},
    {"distributed_timeout": 14400.0},
    {"trainer": {"enable_progress_bar": False}},
    {"grpo__overrides": {"trainer.max_steps": 3, "trainer.logger": {"class_path": "WandbLogger"}}},
])
def test_keys_that_change_nothing_computed_may_change_on_resume_and_are_recorded(tmp_path, change):
    Manifest(tmp_path / "manifest.json").check_config(run_config())
    Manifest(tmp_path / "manifest.json").check_config(run_config(**change))
    assert Manifest(tmp_path / "manifest.json").data["config"] == run_config(**change)


@pytest.mark.parametrize("change, line", [
    ({"seed": 1}, "seed: '<absent>' -> 1"),
    ({"grpo__overrides": {"trainer.max_steps": 4}}, "grpo.overrides.trainer.max_steps: 3 -> 4"),
    ({"rft__config": "other.yaml"}, "rft.config: 'r.yaml' -> 'other.yaml'"),
    ({"evaluators__0__init_args__num_samples": 8}, "evaluators.0.init_args.num_samples: 4 -> 8"),
    ({"eval_engine": {"class_path": "VLLMEngine"}}, "eval_engine.class_path: '<absent>' -> 'VLLMEngine'"),
    ({"trainer": {"devices": 2}}, "trainer.devices: '<absent>' -> 2"),
    ({"expert_set__max_per_prompt": 2}, "expert_set.max_per_prompt: 4 -> 2"),
])
def test_keys_that_change_what_phases_computed_may_not_change_on_resume(tmp_path, change, line):
    Manifest(tmp_path / "manifest.json").check_config(run_config())
    with pytest.raises(ValueError, match="refusing to resume") as error:
        Manifest(tmp_path / "manifest.json").check_config(run_config(run_dir="copied", **change))
    assert line in str(error.value) and "run_dir" not in str(error.value).split("Differing fields")[1].split("\nUse")[0]
    assert Manifest(tmp_path / "manifest.json").data["config"] == run_config()


def test_iterations_may_not_drop_below_an_iteration_with_finished_phases(tmp_path):
    manifest = Manifest(tmp_path / "manifest.json")
    manifest.check_config(run_config(iterations=3))
    manifest.mark_done("eval/theta_0", {})
    manifest.mark_done("iter_01/grpo", {})
    Manifest(tmp_path / "manifest.json").check_config(run_config(iterations=2))  # iteration 1 is still in
    with pytest.raises(ValueError, match="finished phases of iteration 1; iterations: 2 -> 1") as error:
        Manifest(tmp_path / "manifest.json").check_config(run_config(iterations=1))
    assert "iterations >= 2" in str(error.value)


@pytest.mark.parametrize("content, problem", [
    ('{"config": {"seed": 0}, "completed": {"eval/th', "not valid JSON"),
    (b'{"config": null, "completed": {}}\xff', "not valid JSON"),
    ("[]", "not a manifest"),
])
def test_a_corrupt_manifest_names_its_path_and_what_to_do(tmp_path, content, problem):
    path = tmp_path / "manifest.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ManifestError) as error:
        Manifest(path)
    message = str(error.value)
    assert message.startswith(f"{path} is corrupt ({problem}")
    assert f"move {tmp_path} aside and start the run again" in message
