"""``rloop report`` and ``rloop eval`` refuse bad paths before writing anything or evaluating; run
directories with non-ASCII names (outside the BMP too) work.

Each case failed before: ``rloop report`` on a directory that is not a run wrote ``report.md`` into it
and exited 0, ``--baseline`` on a missing directory gave an empty section, ``rloop eval --output`` was
checked only after the evaluation, and a run directory named with an emoji was refused with a parser
error about ``data`` (the loop's JSON overrides escaped it as a surrogate pair).
"""

from __future__ import annotations

import json

import pytest

from rloop_lightning import cli
from rloop_lightning.cli import cli_main
from rloop_lightning.loop.phases import PhaseSettings, override_args, parse_phase
from rloop_lightning.rft import RFTModule
from test_loop import write_loop_config

EVALUATORS = json.dumps([{"task": {"class_path": "rloop_lightning.tasks.Countdown", "init_args": {"num_test": 2}},
                          "num_samples": 1, "ks": [1], "sampling": {"max_new_tokens": 2}}])


def run_directory(path):
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"config": {}, "completed": {}}))
    return path


def test_report_refuses_a_directory_that_is_not_a_run_and_writes_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"run_dir '{tmp_path}' is not an RLoop run directory .*no manifest.json"):
        cli_main(["report", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    with pytest.raises(FileNotFoundError, match=f"run_dir '{tmp_path / 'none'}' is not a directory"):
        cli_main(["report", str(tmp_path / "none")])


def test_report_refuses_a_missing_baseline_before_writing(tmp_path):
    run = run_directory(tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=f"baseline '{tmp_path / 'vanilla'}' is not a directory"):
        cli_main(["report", str(run), "--baseline", str(tmp_path / "vanilla")])
    with pytest.raises(ValueError, match="baseline .* is not an RLoop run directory"):
        cli_main(["report", str(run), "--baseline", str(tmp_path)])
    assert sorted(p.name for p in run.iterdir()) == ["manifest.json"]
    cli_main(["report", str(run), "--baseline", str(run_directory(tmp_path / "vanilla"))])  # both runs: written
    assert (run / "report.md").exists()


@pytest.mark.parametrize("output, error, message", [
    ("{tmp}", IsADirectoryError, "is a directory; give a file path"),
    ("{tmp}/file.txt/eval.json", NotADirectoryError, "file.txt' is a file, not a directory"),
], ids=["directory", "under_a_file"])
def test_eval_checks_its_output_before_evaluating(tmp_path, monkeypatch, output, error, message):
    (tmp_path / "file.txt").write_text("")
    monkeypatch.setattr(cli, "evaluate_policy", lambda *args, **kwargs: pytest.fail("evaluated first"))
    with pytest.raises(error, match=message):
        cli_main(["eval", "--policy.model_name_or_path", "rloop/micro-llama", "--evaluators", EVALUATORS,
                  "--output", output.format(tmp=tmp_path)])


def test_eval_writes_an_output_in_a_new_directory(tmp_path):
    output = tmp_path / "new" / "eval.json"
    cli_main(["eval", "--policy.model_name_or_path", "rloop/micro-llama", "--evaluators", EVALUATORS,
              "--output", str(output)])
    assert set(json.loads(output.read_text())) == {"countdown/test"}


@pytest.mark.parametrize("name", ["r\u00fcn \u00e9t\u00e9", "\u5b9f\u9a13", "run\U0001F600"], ids=["latin", "cjk", "emoji"])
def test_a_run_directory_with_non_ascii_characters_reaches_the_phases_as_written(tmp_path, name):
    run_dir = tmp_path / name / "run"
    write_loop_config(tmp_path / "configs", run_dir)
    expert_set = str(run_dir / "iter_00" / "expert_set" / "experts.jsonl")
    assert override_args({"data.init_args.paths": [expert_set]}) == [f'--data.init_args.paths=["{expert_set}"]']
    config = parse_phase(RFTModule, PhaseSettings(str(tmp_path / "configs" / "rft.yaml")),
                         {"data.init_args.paths": [expert_set], "trainer.default_root_dir": str(run_dir)})
    assert config.data.init_args.paths == [expert_set] and config.trainer.default_root_dir == str(run_dir)
