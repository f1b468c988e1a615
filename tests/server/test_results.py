"""Tests for the run directory (server/results.py) and the metric plots (server/plots.py)."""

from __future__ import annotations

import json
import math
from datetime import datetime
from importlib import metadata
from pathlib import Path

import pytest
import torch

from server.plots import plot_metric_curves
from server.results import Checkpoint, RunDirectory, RunDirectoryError, build_summary

NOW = datetime(2025, 1, 2, 3, 4, 5)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_loads(line: str) -> dict:
    def reject(token: str) -> None:
        raise ValueError(f"non-strict JSON constant {token}")

    return json.loads(line, parse_constant=reject)


def _record(rnd: int, phase: str, loss: float, dice: float, clients: int = 2) -> dict:
    return {
        "round": rnd,
        "phase": phase,
        "clients": {} if phase == "central" else {
            str(k): {"loss": loss + 0.01 * k, "dice": dice - 0.01 * k, "num-examples": 40}
            for k in range(clients)
        },
        "aggregate": {"loss": loss, "dice": dice, "num-examples": 40 * clients},
        "bytes_up": 100 * rnd,
        "bytes_down": 10 * rnd,
        "seconds": 0.5,
        "epsilon": None,
    }  # fmt: skip


@pytest.fixture()
def run(tmp_path: Path) -> RunDirectory:
    run = RunDirectory.create(tmp_path / "runs", "quickstart", now=NOW)
    run.write_scenario("name: quickstart\nseed: 0\n")
    return run


def test_create_never_reuses_a_directory(tmp_path: Path) -> None:
    first = RunDirectory.create(tmp_path, "seg/fedbn", now=NOW)
    second = RunDirectory.create(tmp_path, "seg/fedbn", now=NOW)
    assert first.path != second.path
    assert first.path.name == "20250102-030405" and second.path.name == "20250102-030405-1"
    assert first.path.parent == tmp_path / "seg-fedbn"
    assert first.checkpoints.is_dir() and first.plots.is_dir()


def test_open_rejects_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(RunDirectoryError, match=str(tmp_path)):
        RunDirectory.open(tmp_path)
    with pytest.raises(RunDirectoryError, match="missing"):
        RunDirectory.open(tmp_path / "missing")


def test_open_reads_back_an_existing_run(run: RunDirectory) -> None:
    again = RunDirectory.open(run.path)
    assert again.read_scenario_text() == "name: quickstart\nseed: 0\n"


def test_metrics_round_trip_as_strict_json(run: RunDirectory) -> None:
    records = [_record(1, "train", 0.5, 0.4), _record(1, "evaluate", 0.6, float("nan"))]
    records[0]["aggregate"]["inf"] = float("inf")
    for record in records:
        run.append_metrics(record)
    lines = run.metrics_path.read_text().splitlines()
    assert len(lines) == 2
    parsed = [_strict_loads(line) for line in lines]
    assert parsed[1]["aggregate"]["dice"] is None
    assert parsed[0]["aggregate"]["inf"] is None
    assert run.read_metrics() == parsed
    assert parsed[0]["clients"]["1"]["loss"] == pytest.approx(0.51)


def test_read_metrics_skips_a_torn_last_line_and_append_repairs_it(run: RunDirectory) -> None:
    run.append_metrics(_record(1, "train", 0.5, 0.4))
    with open(run.metrics_path, "a") as f:
        f.write('{"round": 2, "phase": "tr')  # a write killed halfway
    assert [r["round"] for r in run.read_metrics()] == [1]
    RunDirectory.open(run.path).append_metrics(_record(2, "train", 0.4, 0.5))
    assert [r["round"] for r in run.read_metrics()] == [1, 2]


def test_truncate_metrics_drops_later_rounds(run: RunDirectory) -> None:
    for rnd in (1, 2, 3):
        run.append_metrics(_record(rnd, "train", 0.5, 0.4))
        run.append_metrics(_record(rnd, "evaluate", 0.5, 0.4))
    run.truncate_metrics(2)
    assert [(r["round"], r["phase"]) for r in run.read_metrics()] == [
        (1, "train"), (1, "evaluate"), (2, "train"), (2, "evaluate"),
    ]  # fmt: skip


def test_checkpoint_round_trip(run: RunDirectory) -> None:
    arrays = {"conv.weight": torch.randn(3, 2, 3, 3), "bn.num_batches_tracked": torch.tensor(7)}
    state = {"c": [torch.ones(2)], "lr": 0.1, "ids": (1, 2), "name": "scaffold", "none": None}
    saved = run.save_checkpoint(
        Checkpoint(round=4, arrays=arrays, strategy_state=state, extra={"seconds": 1.5}),
        primary_value=0.7,
        higher_is_better=True,
    )
    loaded = RunDirectory.open(run.path).load_checkpoint()
    assert loaded.round == 4 and loaded.best_value == 0.7 and loaded.best_round == 4
    assert saved.best_value == 0.7 and saved.best_round == 4
    assert set(loaded.arrays) == set(arrays)
    for name, tensor in arrays.items():
        assert torch.equal(loaded.arrays[name], tensor)
    assert torch.equal(loaded.strategy_state["c"][0], torch.ones(2))
    assert {k: v for k, v in loaded.strategy_state.items() if k != "c"} == {
        "lr": 0.1, "ids": (1, 2), "name": "scaffold", "none": None,
    }  # fmt: skip
    assert loaded.extra == {"seconds": 1.5}
    last = torch.load(run.checkpoints / "model_last.pt", weights_only=True)
    assert torch.equal(last["conv.weight"], arrays["conv.weight"])


def test_only_a_run_directory_without_results_is_removed(run: RunDirectory, tmp_path: Path) -> None:
    with run.lock():
        assert run.remove_if_unstarted() and not run.path.exists()  # scenario.yaml and the lock only
    recorded = RunDirectory.create(tmp_path / "runs", "quickstart", now=NOW)
    recorded.append_metrics(_record(1, "train", 0.5, 0.4))
    checkpointed = RunDirectory.create(tmp_path / "runs", "quickstart", now=NOW)
    checkpointed.save_checkpoint(Checkpoint(round=1, arrays={"w": torch.ones(1)}, strategy_state={}),
                                 primary_value=None, higher_is_better=True)
    for kept in (recorded, checkpointed):
        assert not kept.remove_if_unstarted() and kept.path.is_dir()


def test_the_best_rounds_state_is_kept_on_request(run: RunDirectory) -> None:
    for rnd, value in ((1, 0.9), (2, 0.5)):
        run.save_checkpoint(Checkpoint(round=rnd, arrays={"w": torch.full((1,), float(rnd))},
                                       strategy_state={"site": torch.full((1,), float(rnd))},
                                       best_value=0.9 if rnd == 2 else None, best_round=1 if rnd == 2 else None),
                            primary_value=value, higher_is_better=True, keep_best_state=True)
    best, last = run.load_checkpoint(best=True), run.load_checkpoint()
    assert (best.round, best.best_round, float(best.strategy_state["site"])) == (1, 1, 1.0)
    assert (last.round, last.best_round, float(last.strategy_state["site"])) == (2, 1, 2.0)
    plain = RunDirectory.create(run.path.parent.parent, "plain", now=NOW)
    plain.save_checkpoint(Checkpoint(round=1, arrays={"w": torch.ones(1)}, strategy_state={}),
                          primary_value=0.9, higher_is_better=True)
    assert run.has_best_state() and not plain.has_best_state()


def test_load_checkpoint_without_one_raises(run: RunDirectory) -> None:
    with pytest.raises(RunDirectoryError, match="no checkpoint"):
        run.load_checkpoint()
    assert not run.has_checkpoint()


def test_checkpoint_keeps_the_runs_seconds_and_reads_older_checkpoints_as_zero(run: RunDirectory) -> None:
    run.save_checkpoint(Checkpoint(round=2, arrays={}, seconds=12.5), primary_value=None, higher_is_better=True)
    assert run.has_checkpoint() and run.load_checkpoint().seconds == 12.5
    state = torch.load(run.checkpoints / "state.pt", weights_only=True)
    del state["seconds"]  # as written before the total time was kept
    torch.save(state, run.checkpoints / "state.pt")
    assert run.load_checkpoint().seconds == 0.0


def test_lock_admits_one_run_at_a_time_and_names_the_holder(run: RunDirectory) -> None:
    import os

    from server.results import RunDirectoryBusy

    other = RunDirectory.open(run.path)  # what a second process opening the folder gets
    with run.lock():
        with run.lock():  # re-entrant for its holder
            pass
        with pytest.raises(RunDirectoryBusy, match=f"in use by another medfed run \\(pid {os.getpid()}\\)"):
            with other.lock():
                pass
    with other.lock():  # released with its last holder
        with pytest.raises(RunDirectoryBusy):
            with run.lock():
                pass


def test_summary_is_read_back_and_discarded(run: RunDirectory) -> None:
    assert run.read_summary() is None
    run.write_summary({"rounds_completed": 2, "seconds": 3.0})
    assert run.read_summary() == {"rounds_completed": 2, "seconds": 3.0}
    run.discard_summary()
    assert run.read_summary() is None and not (run.path / "summary.json").exists()


def test_checkpoint_rejects_state_that_cannot_be_loaded_safely(run: RunDirectory) -> None:
    class Opaque:
        pass

    with pytest.raises(TypeError, match="strategy_state"):
        run.save_checkpoint(
            Checkpoint(round=1, arrays={}, strategy_state={"x": Opaque()}),
            primary_value=None,
            higher_is_better=True,
        )


@pytest.mark.parametrize(
    ("higher_is_better", "values", "best_value", "best_round"),
    [
        (True, [0.5, 0.7, float("nan"), 0.6, None], 0.7, 2),
        (False, [0.5, 0.7, float("nan"), 0.3, None], 0.3, 4),
    ],
)
def test_best_checkpoint_tracking(
    run: RunDirectory, higher_is_better: bool, values: list, best_value: float, best_round: int
) -> None:
    checkpoint = Checkpoint(round=0, arrays={})
    for rnd, value in enumerate(values, start=1):
        arrays = {"w": torch.full((2,), float(rnd))}
        checkpoint = run.save_checkpoint(
            Checkpoint(rnd, arrays, best_value=checkpoint.best_value, best_round=checkpoint.best_round),
            primary_value=value,
            higher_is_better=higher_is_better,
        )
    assert (checkpoint.best_value, checkpoint.best_round) == (best_value, best_round)
    best = torch.load(run.checkpoints / "model_best.pt", weights_only=True)
    assert torch.equal(best["w"], torch.full((2,), float(best_round)))
    assert run.load_checkpoint().round == len(values)


def test_build_summary_best_and_totals() -> None:
    records = []
    for rnd, dice in enumerate([0.3, 0.8, 0.6], start=1):
        records += [_record(rnd, "train", 1.0 / rnd, 0.0), _record(rnd, "evaluate", 0.5, dice)]
    records[-1]["epsilon"] = 2.5
    summary = build_summary(
        records, primary_metric="dice", higher_is_better=True, seed=7, seconds=12.5,
        rounds_completed=3, extra={"scenario": "quickstart"},
    )  # fmt: skip
    assert summary["best"] == {
        "metric": "dice", "higher_is_better": True, "phase": "evaluate", "value": 0.8, "round": 2,
    }  # fmt: skip
    assert summary["final"]["evaluate"] == records[-1]["aggregate"]
    assert summary["final"]["train"] == records[-2]["aggregate"]
    assert summary["final_round"] == {"train": 3, "evaluate": 3}
    assert summary["bytes_up"] == 2 * (100 + 200 + 300)
    assert summary["bytes_down"] == 2 * (10 + 20 + 30)
    assert (summary["seed"], summary["seconds"], summary["rounds_completed"]) == (7, 12.5, 3)
    assert summary["epsilon"] == 2.5 and summary["scenario"] == "quickstart"
    assert summary["versions"]["torch"] == metadata.version("torch")
    assert set(summary["versions"]) == {"python", "torch", "flwr", "numpy", "medfed"}


def test_build_summary_prefers_central_and_lower_is_better() -> None:
    records = [
        _record(1, "evaluate", 0.5, 0.1),
        _record(1, "central", 0.4, 0.9),
        _record(2, "evaluate", 0.3, 0.2),
        _record(2, "central", 0.6, 0.7),
    ]
    summary = build_summary(
        records, primary_metric="loss", higher_is_better=False, seed=0, seconds=1.0, rounds_completed=2
    )
    assert (summary["best"]["phase"], summary["best"]["value"], summary["best"]["round"]) == ("central", 0.4, 1)
    assert summary["final"]["central"]["loss"] == 0.6


def test_summary_json_is_strict(run: RunDirectory) -> None:
    run.write_summary({"best": {"value": float("nan")}, "seconds": 1.0})
    run.write_partitions({"0": {"n": 40, "labels": [10, 30]}})
    assert _strict_loads((run.path / "summary.json").read_text())["best"]["value"] is None
    assert json.loads((run.path / "partitions.json").read_text()) == {"0": {"n": 40, "labels": [10, 30]}}


def test_plot_metric_curves_writes_valid_pngs(tmp_path: Path) -> None:
    import matplotlib.image

    records = []
    for rnd in (1, 2, 3):
        train, evaluate, central = (
            _record(rnd, "train", 1.0 / rnd, 0.0, clients=3),
            _record(rnd, "evaluate", 1.2 / rnd, 0.25 * rnd, clients=3),
            _record(rnd, "central", 1.1 / rnd, 0.22 * rnd),
        )
        del train["aggregate"]["dice"]  # train reports loss only
        del central["aggregate"]["loss"]
        central["aggregate"]["auc"] = None  # an all-missing metric is skipped
        records += [train, evaluate, central]
    paths = plot_metric_curves(records, tmp_path / "plots", primary_metric="dice", title="quickstart")
    assert [p.name for p in paths] == [
        "train_loss.png", "evaluate_loss.png", "evaluate_dice.png", "central_dice.png", "overview.png",
    ]  # fmt: skip
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5_000, path
    overview = matplotlib.image.imread(paths[-1])
    assert overview.ndim == 3 and overview.shape[0] > 100
    assert overview.shape[1] > 1.5 * overview.shape[0]  # 1x2 layout


def test_plot_metric_curves_without_data_writes_nothing(tmp_path: Path) -> None:
    records = [{"round": 1, "phase": "evaluate", "clients": {}, "aggregate": {"dice": math.nan}}]
    assert plot_metric_curves(records, tmp_path, primary_metric="dice") == []


def test_a_checkpoint_is_made_durable_by_two_fsyncs_whatever_it_writes(run: RunDirectory,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    arrays = {"w": torch.ones(3)}
    checkpoint = run.save_checkpoint(Checkpoint(round=1, arrays=arrays), primary_value=0.5, higher_is_better=True)
    assert checkpoint.best_round == 1 and len(synced) == 2  # state.pt and the folder, not each of the three files
    assert {path.name for path in run.checkpoints.iterdir()} == {"model_best.pt", "model_last.pt", "state.pt"}
    assert torch.equal(torch.load(run.checkpoints / "model_last.pt", weights_only=True)["w"], arrays["w"])
    assert run.load_checkpoint().round == 1
