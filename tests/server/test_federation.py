"""End-to-end runs on the in-process engine: run directory content, learning, determinism, resume, faults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.cli import main
from server.federation import FederationError
from server.results import RunDirectory
from tests.helpers import (
    QUICKSTART,
    SMALL,
    interrupted_and_resumed,
    run,
    small_scenario,
    without_timing,
    write_segmentation_folder,
)


def test_cli_run_writes_a_complete_run_directory_and_dice_improves(tmp_path: Path, capsys) -> None:
    overrides = [*SMALL, f"output.dir={tmp_path / 'runs'}", "strategy.rounds=3", "output.examples_every=2"]
    args = ["run", str(QUICKSTART)] + [item for o in overrides for item in ("--set", o)]
    assert main(args) == 0
    (run_path,) = (tmp_path / "runs" / "quickstart").iterdir()
    assert f"results: {run_path}" in capsys.readouterr().out

    for name in ("scenario.yaml", "partitions.json", "metrics.jsonl", "summary.json",
                 "checkpoints/model_last.pt", "checkpoints/model_best.pt", "checkpoints/state.pt",
                 "plots/overview.png", "plots/examples.png"):
        assert (run_path / name).is_file(), name
    assert (run_path / "plots" / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (run_path / "plots" / "examples").iterdir()) == ["round-002.png"]  # every 2nd round

    partitions = json.loads((run_path / "partitions.json").read_text())
    assert sorted(partitions["clients"]) == ["0", "1", "2", "3"]
    acquisitions = [c["acquisition"] for c in partitions["clients"].values()]
    assert len({json.dumps(a, sort_keys=True) for a in acquisitions}) == 4  # feature skew: every scanner differs

    records = RunDirectory.open(run_path).read_metrics()
    assert [(r["round"], r["phase"]) for r in records] == [
        (rnd, phase) for rnd in (1, 2, 3) for phase in ("train", "evaluate", "central")
    ]
    for record in records:
        if record["phase"] != "central":
            assert sorted(record["clients"]) == ["0", "1", "2", "3"]
            assert record["bytes_up"] > 0 and record["bytes_down"] > 0
    evaluate = [r["aggregate"]["dice"] for r in records if r["phase"] == "evaluate"]
    central = [r["aggregate"]["dice"] for r in records if r["phase"] == "central"]
    assert evaluate[-1] > evaluate[0] + 0.05, evaluate
    assert central[-1] > central[0] + 0.05, central
    summary = json.loads((run_path / "summary.json").read_text())
    assert summary["seed"] == 0 and summary["rounds_completed"] == 3


def test_same_seed_gives_identical_metrics(tmp_path: Path) -> None:
    scenario = small_scenario(tmp_path, "strategy.rounds=2")
    first = without_timing(run(scenario).read_metrics())
    second = without_timing(run(scenario).read_metrics())
    assert first == second
    other_seed = without_timing(run(small_scenario(tmp_path, "strategy.rounds=2", "seed=1")).read_metrics())
    assert other_seed != first


def test_resume_continues_to_the_same_result(tmp_path: Path) -> None:
    # interrupted_and_resumed also checks that the interrupted run's metrics stop at round 2, without summary.json
    interrupted, uninterrupted = interrupted_and_resumed(small_scenario(tmp_path, "strategy.rounds=3"), after=2)
    resumed = interrupted.read_metrics()
    assert without_timing(resumed) == without_timing(uninterrupted.read_metrics())
    round_3 = next(r for r in resumed if r["round"] == 3 and r["phase"] == "train")
    assert {m["participations"] for m in round_3["clients"].values()} == {3}  # node state came back
    assert (interrupted.path / "summary.json").is_file()


def test_a_failing_client_is_logged_and_left_out(tmp_path: Path, monkeypatch, caplog) -> None:
    import client.app as client_app
    from client.trainer import NonFiniteLossError

    real_fit, calls = client_app.fit, []

    def flaky_fit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # the first training message of the run: partition 0, round 1
            raise NonFiniteLossError("local loss became nan at step 3")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(client_app, "fit", flaky_fit)
    run_dir = run(small_scenario(tmp_path, "strategy.rounds=1"))
    train = next(r for r in run_dir.read_metrics() if r["phase"] == "train")
    assert train["clients"]["0"] == {"error": "NonFiniteLossError: local loss became nan at step 3"}
    assert sorted(train["clients"]) == ["0", "1", "2", "3"] and "loss" in train["clients"]["1"]
    assert train["aggregate"]["num-examples"] == sum(train["clients"][p]["num-examples"] for p in "123")
    assert "round 1 train: client 0 failed: NonFiniteLossError" in caplog.text


def test_too_few_usable_clients_stop_the_run_with_one_line(tmp_path: Path, monkeypatch) -> None:
    import client.app as client_app

    def broken_fit(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(client_app, "fit", broken_fit)
    with pytest.raises(FederationError) as error:
        run(small_scenario(tmp_path, "strategy.rounds=1"))
    message = str(error.value)
    assert "\n" not in message
    assert "round 1: 0 of 4 clients returned a usable update" in message and "RuntimeError: disk full" in message


def test_a_users_folder_of_npy_slices_runs_federated(tmp_path: Path) -> None:
    folder = write_segmentation_folder(tmp_path / "data", 24)
    scenario = small_scenario(tmp_path, "strategy.rounds=1", "data.source=folder", f"data.path={folder}",
                              "data.server_samples=0", "partition.kind=label_skew", "partition.params={alpha: 5.0}")
    run_dir = run(scenario)
    partitions = json.loads((run_dir.path / "partitions.json").read_text())["clients"]
    assert sum(c["n_train"] + c["n_val"] for c in partitions.values()) == 24
    evaluate = next(r for r in run_dir.read_metrics() if r["phase"] == "evaluate")
    assert 0.0 <= evaluate["aggregate"]["dice"] <= 1.0


def test_a_broken_data_folder_stops_with_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    folder = write_segmentation_folder(tmp_path / "data", 8, with_masks=False)
    overrides = [*SMALL, f"output.dir={tmp_path / 'runs'}", "data.source=folder", f"data.path={folder}",
                 "data.server_samples=0"]
    assert main(["run", str(QUICKSTART)] + [item for o in overrides for item in ("--set", o)]) == 2  # the input's fault
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("medfed: error")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "a client could not prepare its data: DataError" in errors[0] and "masks" in errors[0], errors
    assert "resume" not in errors[0]  # resuming cannot fix the data
    assert errors[0].endswith("(no run directory is kept: it held no results)")
    assert not list((tmp_path / "runs").glob("*/*")), "the run directory made for the refused run is left"
