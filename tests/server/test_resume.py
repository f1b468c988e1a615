"""``medfed run --resume``: one run per run directory at a time, what to do when there is nothing to resume, finished
runs, extending a finished run, the total time over every part, and failures caused by the input (issue 13, point 7)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from server.cli import EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, EXIT_RUN_FAILED, main
from server.engines import run_scenario
from server.results import Checkpoint, RunDirectory
from server.scenario import Scenario, load
from tests.helpers import (
    BLOBS,
    ONE_SGD_EPOCH,
    ROOT,
    InterruptAfter,
    new_run_directory,
    run,
    toy_scenario,
    without_timing,
)


def _one_line_error(text: str) -> str:
    """The one line that says why the command stopped (the run's own log lines aside)."""
    lines = [line for line in text.splitlines() if line.startswith(("medfed: error:", "medfed: interrupted"))]
    assert len(lines) == 1, text
    return lines[0]


def _blobs(tmp_path: Path, rounds: int) -> Scenario:
    """A scenario of a second a round: three sites of the blobs task, FedAvg, in-process, under ``tmp_path``."""
    return toy_scenario(BLOBS, "fedavg", rounds=rounds, clients=3, samples=64, server_samples=32, local=ONE_SGD_EPOCH,
                        output={"dir": str(tmp_path / "runs")})


def _interrupted_after(scenario: Scenario, after: int) -> RunDirectory:
    """A run directory of ``scenario`` stopped by Ctrl-C once round ``after`` is done."""
    run_dir = new_run_directory(scenario)
    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario, run_dir, InterruptAfter(after))
    return run_dir


def test_a_second_run_on_a_run_directory_in_use_is_refused_with_one_line(tmp_path: Path, capsys) -> None:
    run_dir = _interrupted_after(_blobs(tmp_path, rounds=2), after=1)
    capsys.readouterr()
    with RunDirectory.open(run_dir.path).lock():  # another medfed process holds the directory
        assert main(["run", "--resume", str(run_dir.path)]) == EXIT_INVALID
    line = _one_line_error(capsys.readouterr().err)
    assert "in use by another medfed run" in line and str(run_dir.path) in line
    assert max(r["round"] for r in run_dir.read_metrics()) == 1  # the refused run wrote nothing
    assert main(["run", "--resume", str(run_dir.path)]) == EXIT_OK  # the lock went with its holder
    assert [r["round"] for r in run_dir.read_metrics() if r["phase"] == "train"] == [1, 2]


def test_ctrl_c_before_the_first_checkpoint_says_to_run_again_not_to_resume(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    import server.federation as federation

    def interrupted_discovery(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(federation, "discover", interrupted_discovery)
    overrides = ["--set", f"output.dir={tmp_path / 'runs'}", "--set", "engine.backend=inprocess"]
    assert main(["run", str(ROOT / "scenarios" / "quickstart.yaml"), *overrides]) == EXIT_INTERRUPTED
    (run_path,) = (tmp_path / "runs" / "quickstart").iterdir()
    line = _one_line_error(capsys.readouterr().err)
    assert "--resume" not in line
    assert f"run it again with: medfed run {run_path / 'scenario.yaml'}" in line

    assert main(["run", "--resume", str(run_path)]) == EXIT_INVALID  # and a resume says the same, not "resume"
    line = _one_line_error(capsys.readouterr().err)
    assert "nothing to resume" in line and "--resume" not in line
    assert f"medfed run {run_path / 'scenario.yaml'}" in line


def test_resuming_a_finished_run_says_it_is_finished_and_changes_nothing(tmp_path: Path, capsys) -> None:
    run_dir = run(_blobs(tmp_path, rounds=1))
    capsys.readouterr()
    before = {name: (run_dir.path / name).read_bytes() for name in ("metrics.jsonl", "summary.json")}
    assert main(["run", "--resume", str(run_dir.path)]) == EXIT_OK
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert lines == [f"medfed: {run_dir.path} is finished (1 of 1 rounds); to run more rounds: "
                     f"medfed run --resume {run_dir.path} --set strategy.rounds=N"]
    assert {name: (run_dir.path / name).read_bytes() for name in before} == before


def test_summary_seconds_is_the_total_over_every_part_of_a_resumed_run(tmp_path: Path) -> None:
    run_dir = _interrupted_after(_blobs(tmp_path, rounds=2), after=1)
    checkpoint = run_dir.load_checkpoint()
    assert checkpoint.seconds > 0  # the first part's time, kept with its checkpoint
    earlier = 1000.0  # pretend the first part took long, so the resumed part alone cannot reach it
    run_dir.save_checkpoint(replace(checkpoint, seconds=earlier), primary_value=None, higher_is_better=True)
    assert main(["run", "--resume", str(run_dir.path)]) == EXIT_OK
    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert earlier < summary["seconds"] < earlier + 120
    assert run_dir.load_checkpoint().seconds > earlier  # and the next part starts from the total


def test_a_finished_run_is_extended_with_more_rounds_to_the_uninterrupted_result(tmp_path: Path) -> None:
    finished = run(_blobs(tmp_path, rounds=1))
    first_seconds = json.loads((finished.path / "summary.json").read_text())["seconds"]
    assert main(["run", "--resume", str(finished.path), "--set", "strategy.rounds=2"]) == EXIT_OK
    longer = run(_blobs(tmp_path, rounds=2))
    assert without_timing(finished.read_metrics()) == without_timing(longer.read_metrics())
    assert load(finished.path / "scenario.yaml").strategy.rounds == 2  # a later --resume goes on to round 2
    summary = json.loads((finished.path / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["seconds"] > first_seconds


@pytest.mark.parametrize(("overrides", "expected"), [
    (["--set", "local.lr=0.1"], "local.lr cannot change when a run is resumed; only strategy.rounds can"),
    (["--set", "strategy.rounds=3", "--set", "seed=1"], "seed cannot change when a run is resumed"),
    (["--set", "strategy.rounds=1"], "strategy.rounds=1: the run has already completed 2 rounds"),
])
def test_resume_changes_nothing_but_more_rounds(tmp_path: Path, capsys, overrides: list[str], expected: str) -> None:
    run_dir = _fake_finished_run(tmp_path, _blobs(tmp_path, rounds=2), rounds=2)
    assert main(["run", "--resume", str(run_dir.path), *overrides]) == EXIT_INVALID
    assert expected in _one_line_error(capsys.readouterr().err)


def test_more_rounds_are_refused_where_the_noise_was_calibrated_to_the_rounds(tmp_path: Path, capsys) -> None:
    scenario = load(ROOT / "scenarios" / "tabular-dp-eps4.yaml", [f"output.dir={tmp_path / 'runs'}"])
    assert scenario.privacy.params.get("noise_multiplier") is None  # calibrated to target_epsilon over the rounds
    run_dir = _fake_finished_run(tmp_path, scenario, rounds=scenario.strategy.rounds)
    more = scenario.strategy.rounds + 5
    assert main(["run", "--resume", str(run_dir.path), "--set", f"strategy.rounds={more}"]) == EXIT_INVALID
    line = _one_line_error(capsys.readouterr().err)
    assert "strategy.rounds" in line and "privacy.mechanism dpsgd" in line and "calibrated" in line


def _fake_finished_run(tmp_path: Path, scenario: Scenario, rounds: int) -> RunDirectory:
    """A run directory as a finished run leaves it, without running it: scenario, checkpoint, summary."""
    run_dir = new_run_directory(scenario)
    run_dir.save_checkpoint(Checkpoint(round=rounds, arrays={}), primary_value=None, higher_is_better=True)
    run_dir.write_summary({"rounds_completed": rounds, "seconds": 1.0})
    return run_dir


def test_a_run_that_fails_on_its_input_never_suggests_resume(tmp_path: Path, monkeypatch, capsys) -> None:
    import client.app as client_app
    from medtasks.base import DataError

    def unreadable(*args, **kwargs):
        raise DataError("images/case07.npy: cannot read the file")

    monkeypatch.setattr(client_app, "site_data", unreadable)  # every site's data fails when discovery asks for it
    overrides = [item for o in small_overrides(tmp_path) for item in ("--set", o)]
    assert main(["run", str(ROOT / "scenarios" / "quickstart.yaml"), *overrides]) == EXIT_INVALID
    line = _one_line_error(capsys.readouterr().err)
    assert "cannot read the file" in line and "resume" not in line


def test_a_failure_before_the_first_checkpoint_suggests_no_resume_and_after_it_does(tmp_path: Path, monkeypatch,
                                                                                   capsys) -> None:
    import client.app as client_app

    real_fit, calls = client_app.fit, []

    def broken_from_round_2(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4 * run_number[0]:  # four sites a round: the first run's round 1 fails, the second's round 2
            raise RuntimeError("disk full")
        return real_fit(*args, **kwargs)

    run_number = [0]
    monkeypatch.setattr(client_app, "fit", broken_from_round_2)
    overrides = [item for o in [*small_overrides(tmp_path), "strategy.rounds=2"] for item in ("--set", o)]
    assert main(["run", str(ROOT / "scenarios" / "quickstart.yaml"), *overrides]) == EXIT_RUN_FAILED
    line = _one_line_error(capsys.readouterr().err)
    assert "disk full" in line and "--resume" not in line and "nothing to resume" in line

    calls.clear()
    run_number[0] = 1
    assert main(["run", str(ROOT / "scenarios" / "quickstart.yaml"), *overrides]) == EXIT_RUN_FAILED
    line = _one_line_error(capsys.readouterr().err)
    assert "round 2" in line and "resume with: medfed run --resume" in line


def small_overrides(tmp_path: Path) -> list[str]:
    from tests.helpers import SMALL

    return [*SMALL, f"output.dir={tmp_path / 'runs'}", "strategy.rounds=1"]
