"""A run's metrics as a table (``metrics.csv``) and in experiment trackers (``output.trackers``: MLflow,
TensorBoard), read back with their own readers (issue 15, point 2)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

from server.cli import EXIT_INVALID, main
from server.engines import run_scenario
from server.results import RunDirectory, csv_rows
from server.scenario import Scenario, ScenarioError, load, validate
from server.tracking import TensorBoardTracker, scalars
from tests.helpers import QUICKSTART, InterruptAfter, blobs_scenario, interrupted_and_resumed, new_run_directory, run


def _blobs(tmp_path: Path, rounds: int = 2, **output: object) -> Scenario:
    """Three blobs sites, FedAvg, in-process, under ``tmp_path/runs`` with the ``output`` keys given."""
    scenario = json.loads(blobs_scenario("fedavg", rounds=rounds).model_dump_json())
    scenario["output"].update(dir=str(tmp_path / "runs"), **output)
    return validate(scenario)


def _table(run_dir: RunDirectory) -> list[dict[str, str]]:
    with open(run_dir.path / "metrics.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _without_seconds(run_dir: RunDirectory) -> list[list[str]]:
    """metrics.csv as lists of cells, the wall-clock column left out."""
    with open(run_dir.path / "metrics.csv", encoding="utf-8", newline="") as f:
        lines = list(csv.reader(f))
    keep = [index for index, name in enumerate(lines[0]) if name != "seconds"]
    return [[line[index] for index in keep] for line in lines]


# --- metrics.csv ---------------------------------------------------------------------------------------------
def test_metrics_csv_has_a_row_per_round_phase_and_site_after_the_phases_aggregate(tmp_path: Path) -> None:
    run_dir = run(_blobs(tmp_path))
    rows, records = _table(run_dir), run_dir.read_metrics()

    assert list(rows[0])[:3] == ["round", "phase", "client"]
    assert list(rows[0])[-4:] == ["bytes_up", "bytes_down", "seconds", "epsilon"]
    assert [(row["round"], row["phase"], row["client"]) for row in rows[:5]] == [
        ("1", "train", "all"), ("1", "train", "0"), ("1", "train", "1"), ("1", "train", "2"), ("1", "evaluate", "all")]
    assert len(rows) == sum(1 + len(record["clients"]) for record in records)  # 2 x (train 4, evaluate 4, central 1)
    for record in records:
        (aggregate,) = [row for row in rows if (row["round"], row["phase"], row["client"])
                        == (str(record["round"]), record["phase"], "all")]
        assert float(aggregate["loss"]) == record["aggregate"]["loss"]
        assert int(aggregate["bytes_down"]) == record["bytes_down"]
    evaluate_site_1 = next(row for row in rows if (row["round"], row["phase"], row["client"]) == ("2", "evaluate", "1"))
    assert float(evaluate_site_1["accuracy"]) == records[4]["clients"]["1"]["accuracy"]
    assert evaluate_site_1["bytes_up"] == "" and evaluate_site_1["epsilon"] == ""  # the phase's, not the site's


def test_metrics_csv_of_a_resumed_run_equals_the_uninterrupted_runs(tmp_path: Path) -> None:
    resumed, uninterrupted = interrupted_and_resumed(_blobs(tmp_path, rounds=3), after=1)
    assert len(_without_seconds(resumed)) == 1 + 3 * 9
    assert _without_seconds(resumed) == _without_seconds(uninterrupted)


def test_a_record_with_a_new_metric_rewrites_the_header_and_keeps_every_row(tmp_path: Path) -> None:
    run_dir = RunDirectory(tmp_path)
    run_dir.append_metrics({"round": 1, "phase": "train", "clients": {"0": {"loss": 0.5}}, "aggregate": {"loss": 0.5},
                            "bytes_up": 10, "bytes_down": 20, "seconds": 0.1, "epsilon": None})
    run_dir.append_metrics({"round": 1, "phase": "attack", "kind": "dlg", "attacker": "server", "victim": 0,
                            "metrics": {"psnr": 12.5}, "main_metric": "accuracy", "main_value": 0.5, "seconds": 0.2})
    run_dir.append_metrics({"round": 2, "phase": "train", "clients": {"0": {"error": "lost, sorry"}},
                            "aggregate": {}, "bytes_up": 0, "bytes_down": 20, "seconds": 0.1, "epsilon": None})

    rows = _table(run_dir)
    assert list(rows[0]) == ["round", "phase", "client", "attack_psnr", "attacker", "error", "loss",
                             "bytes_up", "bytes_down", "seconds", "epsilon"]
    assert [(row["phase"], row["client"]) for row in rows] == [("train", "all"), ("train", "0"), ("attack", "0"),
                                                               ("train", "all"), ("train", "0")]
    assert (rows[2]["attack_psnr"], rows[2]["attacker"], rows[2]["loss"]) == ("12.5", "server", "")
    assert rows[4]["error"] == "lost, sorry"


def test_an_attack_attempt_is_a_row_of_its_victim_with_prefixed_metrics() -> None:
    (row,) = csv_rows({"round": 3, "phase": "attack", "kind": "backdoor", "attacker": 2, "victim": "global",
                       "metrics": {"backdoor_accuracy": 0.9}, "main_metric": "accuracy", "main_value": 0.7,
                       "seconds": 1.5})
    assert row == {"round": 3, "phase": "attack", "client": "global", "attacker": 2, "attack_backdoor_accuracy": 0.9,
                   "seconds": 1.5}


# --- the scenario keys ----------------------------------------------------------------------------------------
def test_trackers_at_their_default_leave_the_scenario_json_as_it_was(tmp_path: Path) -> None:
    plain = load(QUICKSTART)
    assert "trackers" not in plain.to_json() and "mlflow_uri" not in plain.to_json()
    tracked = load(QUICKSTART, ["output.trackers=[mlflow]"])
    assert tracked.output.trackers == ("mlflow",)
    assert Scenario.from_json(tracked.to_json()).output.trackers == ("mlflow",)


@pytest.mark.parametrize(("override", "message"), [
    ("output.trackers=[mlflow,mlflow]", "output.trackers: mlflow named more than once"),
    ("output.trackers=[wandb]", "output.trackers.0: Input should be 'mlflow' or 'tensorboard'"),
    ("output.mlflow_uri=sqlite:///x.db", "mlflow_uri is set but trackers does not name mlflow"),
])
def test_bad_tracker_settings_are_refused_in_one_line(override: str, message: str) -> None:
    with pytest.raises(ScenarioError) as refused:
        load(QUICKSTART, [override])
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_a_tracker_whose_package_is_missing_is_refused_before_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    import server.checks as checks

    monkeypatch.setattr(checks, "module_available", lambda name: name != "tensorboard")
    code = main(["validate", str(QUICKSTART), "--set", "output.trackers=[mlflow,tensorboard]"])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_INVALID
    assert "output.trackers: this setting needs the Python module 'tensorboard'" in line
    assert 'pip install -e ".[tracking]"' in line


# --- the trackers ---------------------------------------------------------------------------------------------
def test_scalar_names_say_the_phase_the_site_and_the_metric() -> None:
    record = {"round": 2, "phase": "train", "clients": {"3": {"loss": 0.5, "epsilon": 1.5}, "4": {"error": "lost"}},
              "aggregate": {"loss": 0.25}, "bytes_up": 10, "bytes_down": 20, "seconds": 0.5, "epsilon": 1.5}
    assert scalars(record) == {"train/loss": 0.25, "train/site-3/loss": 0.5, "train/site-3/epsilon": 1.5,
                               "train/bytes_up": 10.0, "train/bytes_down": 20.0, "train/seconds": 0.5,
                               "privacy/epsilon": 1.5}
    assert scalars({"round": 1, "phase": "attack", "victim": "global", "metrics": {"auc": 0.75, "tpr": None}}) == {
        "attack/global/auc": 0.75}


def test_mlflow_gets_params_metrics_per_round_and_files_and_a_resume_continues_its_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    scenario = _blobs(tmp_path, trackers=["mlflow"])
    run_dir = new_run_directory(scenario)
    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario, run_dir, InterruptAfter(1))
    assert main(["run", "--resume", str(run_dir.path)]) == 0

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(scenario.name)
    (tracked,) = client.search_runs([experiment.experiment_id])  # one MLflow run for both parts
    assert tracked.info.run_name == run_dir.path.name and tracked.info.status == "FINISHED"
    assert tracked.data.params["strategy.rounds"] == "2" and tracked.data.params["task.name"] == scenario.task.name
    records = run_dir.read_metrics()
    history = client.get_metric_history(tracked.info.run_id, "evaluate/accuracy")
    assert sorted((point.step, point.value) for point in history) == [
        (record["round"], record["aggregate"]["accuracy"]) for record in records if record["phase"] == "evaluate"]
    assert [point.step for point in client.get_metric_history(tracked.info.run_id, "train/site-2/loss")] == [1, 2]
    artifacts = {artifact.path for artifact in client.list_artifacts(tracked.info.run_id)}
    assert {"summary.json", "scenario.yaml"} <= artifacts
    assert Path(experiment.artifact_location.removeprefix("file://")) == tmp_path / "runs" / "mlruns"


def test_tensorboard_events_hold_each_rounds_scalars(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = run(_blobs(tmp_path, trackers=["tensorboard"]))
    events = EventAccumulator(str(run_dir.path / "tensorboard"))
    events.Reload()
    train = [record for record in run_dir.read_metrics() if record["phase"] == "train"]
    losses = events.Scalars("train/loss")
    assert [point.step for point in losses] == [record["round"] for record in train]
    assert [point.value for point in losses] == pytest.approx([record["aggregate"]["loss"] for record in train])
    assert [point.step for point in events.Scalars("central/accuracy")] == [1, 2]
    assert [point.step for point in events.Scalars("evaluate/site-0/accuracy")] == [1, 2]


def test_a_tracker_that_fails_mid_run_is_one_warning_and_the_run_completes(tmp_path: Path, monkeypatch,
                                                                             caplog) -> None:
    logged = TensorBoardTracker.log

    def fails_in_round_two(self: TensorBoardTracker, values: dict[str, float], step: int) -> None:
        if step == 2:
            raise OSError("disk full")
        logged(self, values, step)

    monkeypatch.setattr(TensorBoardTracker, "log", fails_in_round_two)
    with caplog.at_level(logging.WARNING, logger="medfed"):
        run_dir = run(_blobs(tmp_path, trackers=["tensorboard"]))

    warnings = [entry.getMessage() for entry in caplog.records if entry.levelno == logging.WARNING]
    assert warnings == ["tensorboard tracking failed (log: disk full); it is off for the rest of the run"]
    assert json.loads((run_dir.path / "summary.json").read_text())["rounds_completed"] == 2
    assert {row["round"] for row in _table(run_dir)} == {"1", "2"}
