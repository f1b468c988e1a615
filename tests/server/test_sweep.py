"""``medfed sweep``: the grid expands and validates before anything runs, every cell is a normal run directory,
a cell that fails or Ctrl-C is recorded, and the tables and the privacy/utility picture read the runs' own numbers."""

from __future__ import annotations

import contextlib
import csv
import json
import re
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import yaml
from pydantic import Field

from medtasks.base import TaskContext, TaskParams
from server.cli import main
from server.compare import load_runs
from server.results import RunDirectory
from server.scenario import Scenario
from server.sweep import CellResult, SweepError, parse_axis, plan_sweep, split_values
from server.sweep_report import plot_privacy_utility, run_sweep, x_axis
from tests.strategies.toy_tasks import QuadraticParams, QuadraticTask

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class FailingParams(QuadraticParams):
    fail: bool = Field(False, description="every site's training raises")


class FailingTask(QuadraticTask):
    """The quadratic toy task whose sites' training raises when ``task.params.fail`` is true."""

    Params: ClassVar[type[TaskParams]] = FailingParams

    def __init__(self, ctx: TaskContext) -> None:
        params = FailingParams.model_validate(ctx.params.model_dump())
        self.fail = params.fail
        super().__init__(replace(ctx, params=QuadraticParams(**params.model_dump(exclude={"fail"}))))

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("this site cannot train")
        return super().loss(model, batch)


def tiny_tabular(tmp_path: Path, **sections: Any) -> Path:
    """A scenario file: the tabular task, 2 sites of 40 examples, 2 rounds of FedAvg in-process, no plots."""
    scenario = {
        "name": "tiny", "seed": 0,
        "task": {"name": "tabular", "model": "mlp", "params": {"num_features": 8, "num_classes": 3, "hidden": 16}},
        "data": {"samples_per_client": 40, "server_samples": 40},
        "partition": {"clients": 2},
        "strategy": {"name": "fedavg", "rounds": 2, "min_clients": 2},
        "local": {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.1},
        "engine": {"backend": "inprocess"},
        "output": {"dir": str(tmp_path / "runs"), "plots": False},
        **sections,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


# --- the grid ----------------------------------------------------------------------------------------------
def test_cells_are_the_product_of_the_axes_and_seeds_with_values_parsed_like_set(tmp_path: Path) -> None:
    plan = plan_sweep(tiny_tabular(tmp_path), ["local.momentum=0.5"],
                      ["local.lr=0.01,1e-1", "defense.norm_bound=null,2", "local.optimizer=sgd,adam"], "3,0")
    assert len(plan.cells) == 2 * 2 * 2 * 2
    first = plan.cells[0]
    assert first.texts == {"local.lr": "0.01", "defense.norm_bound": "null", "local.optimizer": "sgd"}
    assert first.values == {"local.lr": 0.01, "defense.norm_bound": None, "local.optimizer": "sgd"}
    assert [cell.seed for cell in plan.cells[:2]] == [3, 0]  # seeds vary fastest, in the order given
    assert plan.cells[-1].values == {"local.lr": 0.1, "defense.norm_bound": 2.0, "local.optimizer": "adam"}
    for cell in plan.cells:  # what ran is what the cell says: the assignments, the seed, the --set
        scenario = cell.scenario
        assert (scenario.local.lr, scenario.defense.norm_bound, scenario.local.optimizer) == tuple(cell.values.values())
        assert scenario.seed == cell.seed and scenario.local.momentum == 0.5
        assert NAME_PATTERN.match(scenario.name) and len(scenario.name) <= 100
    assert plan.cells[0].scenario.name == "tiny-lr-0.01_norm_bound-null_optimizer-sgd_seed-3"
    assert plan.cells[0].folder == "local.lr=0.01,defense.norm_bound=null,local.optimizer=sgd,seed=3"
    assert len({cell.folder for cell in plan.cells}) == len({cell.scenario.name for cell in plan.cells}) == 16
    assert plan.folder.parent == tmp_path / "runs" and plan.folder.name.startswith("tiny-sweep-")
    assert not (tmp_path / "runs").exists()  # planning writes nothing


def test_without_seeds_every_cell_has_the_scenario_seed(tmp_path: Path) -> None:
    plan = plan_sweep(tiny_tabular(tmp_path), ["seed=7"], ["local.epochs=1,2"])
    assert [(cell.seed, cell.values["local.epochs"]) for cell in plan.cells] == [(7, 1), (7, 2)]
    assert plan.cells[1].label == "local.epochs=2,seed=7"


def test_long_names_and_unsafe_values_still_give_valid_distinct_names(tmp_path: Path) -> None:
    scenario = tiny_tabular(tmp_path, name="n" * 98)
    plan = plan_sweep(scenario, [], ["description=a/b,a-b,../x"])
    names = [cell.scenario.name for cell in plan.cells]
    folders = [cell.folder for cell in plan.cells]
    assert all(NAME_PATTERN.match(name) and len(name) <= 100 for name in names) and len(set(names)) == 3
    assert all("/" not in folder and not folder.startswith(".") for folder in folders) and len(set(folders)) == 3


@pytest.mark.parametrize(("option", "message"), [
    ("local.lr", "expected KEY=V1,V2"),
    ("local.lr=0.1,,0.2", "empty value"),
    ("local.lr=0.1,0.1", "given twice"),
    ("seed=1,2", "--seeds"),
])
def test_malformed_grid_options_are_refused(option: str, message: str) -> None:
    with pytest.raises(SweepError, match=message):
        parse_axis(option)


@pytest.mark.parametrize(("arguments", "named"), [
    (["--grid", "local.lr=0.1", "--grid", "local.lr=0.2"], "--grid local.lr: the key is given twice"),
    (["--grid", "local.lrr=0.1,0.2"], "cell local.lrr=0.1: "),
    (["--grid", "local.lr=0.1,fast"], "cell local.lr=fast: "),
    (["--grid", "local.lr=0.1", "--seeds", "0,x"], "--seeds '0,x'"),
    (["--grid", "local.lr=0.1", "--set", "engine.backend=deployment"], "cell local.lr=0.1: engine.backend"),
])
def test_an_invalid_sweep_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, capsys, arguments: list[str],
                                                                  named: str) -> None:
    assert main(["sweep", str(tiny_tabular(tmp_path)), *arguments]) == 2
    error = capsys.readouterr().err
    assert named in error and error.count("\n") == 1 and error.startswith("medfed: error: ")
    assert not (tmp_path / "runs").exists()


def test_out_must_be_a_new_or_empty_folder(tmp_path: Path, capsys) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["sweep", str(tiny_tabular(tmp_path)), "--grid", "local.lr=0.1", "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["notes.txt"]


def test_the_default_folder_is_new_for_every_sweep(tmp_path: Path) -> None:
    scenario, now = tiny_tabular(tmp_path), datetime(2026, 1, 2, 3, 4, 5)
    folders = [plan_sweep(scenario, [], ["local.lr=0.1"], now=now).create_folder() for _ in range(2)]
    assert [folder.name for folder in folders] == ["tiny-sweep-20260102-030405", "tiny-sweep-20260102-030405-1"]
    assert all(folder.parent == tmp_path / "runs" and folder.is_dir() for folder in folders)
    with pytest.raises(SweepError, match="--engine deployment"):
        plan_sweep(scenario, [], ["local.lr=0.1"], engine="deployment")


def test_dry_run_lists_the_cells_and_runs_nothing(tmp_path: Path, capsys) -> None:
    argv = ["sweep", str(tiny_tabular(tmp_path)), "--grid", "local.lr=0.01,0.1", "--seeds", "0,1", "--dry-run"]
    assert main(argv) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[0].startswith("4 cells, into ") and "local.lr=0.1,seed=1" in listed[-1]
    assert not (tmp_path / "runs").exists()


# --- a real sweep ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory) -> tuple[Path, str]:
    """``medfed sweep tiny.yaml --grid local.lr=0.01,1.0`` run for real; (its folder, what it printed)."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    out = tmp_path / "sweep"
    capture = tmp_path / "stdout.txt"
    with capture.open("w") as stdout, contextlib.redirect_stdout(stdout):
        assert main(["sweep", str(tiny_tabular(tmp_path)), "--grid", "local.lr=0.01,1.0", "--out", str(out)]) == 0
    return out, capture.read_text()


def test_each_cell_is_a_normal_run_directory_and_sweep_json_reads_their_summaries(lr_sweep) -> None:
    out, _ = lr_sweep
    report = json.loads((out / "sweep.json").read_text())
    assert report["grid"] == {"local.lr": ["0.01", "1.0"]} and len(report["cells"]) == 2
    finals = []
    for cell, lr in zip(report["cells"], (0.01, 1.0)):
        run_dir = RunDirectory.open(out / cell["run_dir"])
        summary = json.loads((run_dir.path / "summary.json").read_text())
        scenario = yaml.safe_load(run_dir.read_scenario_text())
        assert cell["status"] == "ok" and cell["reason"] is None and cell["assignments"] == {"local.lr": lr}
        assert scenario["local"]["lr"] == lr and scenario["name"] == cell["scenario_name"]
        assert (cell["main_metric"], cell["main_phase"]) == ("accuracy", "central")
        assert cell["main_value"] == summary["final"]["central"]["accuracy"]
        assert cell["epsilon"] is None and cell["attack"] is None and cell["seconds"] > 0
        finals.append(cell["main_value"])
    assert finals[0] != finals[1]
    labels = [view.label for view in load_runs([out / cell["run_dir"] for cell in report["cells"]])]
    assert len(set(labels)) == 2  # medfed compare tells the cells apart


def test_the_csv_markdown_and_picture_have_one_row_or_point_per_cell(lr_sweep) -> None:
    out, printed = lr_sweep
    report = json.loads((out / "sweep.json").read_text())
    rows = read_csv(out / "sweep.csv")
    assert [row["local.lr"] for row in rows] == ["0.01", "1.0"]
    assert [float(row["final"]) for row in rows] == [cell["main_value"] for cell in report["cells"]]
    table = [line for line in (out / "sweep.md").read_text().splitlines() if line.startswith("| ")]
    assert len(table) == 3 and table[0].startswith("| local.lr | seed | status | main metric | final |")
    assert "over seeds" not in (out / "sweep.md").read_text()  # one seed: no table over seeds
    assert all(line in printed for line in table)
    assert (out / "privacy_utility.png").stat().st_size > 10_000


def test_several_seeds_add_mean_and_std_over_seeds(tmp_path: Path, capsys) -> None:
    out = tmp_path / "seeds"
    assert main(["sweep", str(tiny_tabular(tmp_path)), "--seeds", "0,1", "--out", str(out)]) == 0
    report = json.loads((out / "sweep.json").read_text())
    values = [cell["main_value"] for cell in report["cells"]]
    [group] = report["over_seeds"]
    assert group["seeds ok"] == "2/2" and group["final"]["n"] == 2
    assert group["final"]["mean"] == pytest.approx(sum(values) / 2)
    assert group["final"]["std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert "## Mean ± std over seeds" in (out / "sweep.md").read_text() and "±" in capsys.readouterr().out


def test_a_cell_that_fails_at_run_time_is_recorded_and_the_sweep_goes_on_exit_1(tmp_path: Path, capsys) -> None:
    scenario = tiny_tabular(tmp_path, task={"name": f"{__name__}:FailingTask", "model": "linear"},
                            data={"samples_per_client": 10, "server_samples": 0})
    out = tmp_path / "failing"
    assert main(["sweep", str(scenario), "--grid", "task.params.fail=true,false", "--out", str(out)]) == 1
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert [cell["status"] for cell in cells] == ["failed", "ok"]
    assert cells[0]["reason"].startswith("FederationError: round 1: 0 of 2 clients returned a usable update")
    assert "this site cannot train" in cells[0]["reason"] and "\n" not in cells[0]["reason"]
    assert cells[1]["main_value"] is not None and cells[1]["main_metric"] == "loss"
    assert [row["status"] for row in read_csv(out / "sweep.csv")] == ["failed", "ok"]
    assert "task.params.fail=true,seed=0: FederationError" in (out / "sweep.md").read_text()
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"medfed: error: 1 of 2 cells failed (see {out / 'sweep.md'})")


def test_ctrl_c_records_the_cell_and_writes_the_tables_of_what_ran(tmp_path: Path, monkeypatch, capsys) -> None:
    from server import cli

    calls: list[str] = []
    run_cell = cli._run_cell

    def interrupted_second(scenario: Scenario, run_dir: RunDirectory) -> dict:
        calls.append(scenario.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_cell(scenario, run_dir)

    out = tmp_path / "stopped"
    monkeypatch.setattr(cli, "_run_cell", interrupted_second)
    assert main(["sweep", str(tiny_tabular(tmp_path)), "--grid", "local.lr=0.01,0.1,1.0", "--out", str(out)]) == 130
    cells = json.loads((out / "sweep.json").read_text())["cells"]
    assert [cell["status"] for cell in cells] == ["ok", "interrupted", "not run"] and len(calls) == 2
    # stopped before its first checkpoint: nothing to resume, so the advice is to run it again
    assert f"run it again with: medfed run {out / cells[1]['run_dir'] / 'scenario.yaml'}" in cells[1]["reason"]
    assert [row["status"] for row in read_csv(out / "sweep.csv")] == ["ok", "interrupted"]
    assert "interrupted" in capsys.readouterr().err


# --- the privacy/utility picture -------------------------------------------------------------------------
def _results(tmp_path: Path, summaries: list[dict]) -> list[CellResult]:
    plan = plan_sweep(tiny_tabular(tmp_path), [], [f"local.lr={','.join(str(0.1 * (k + 1)) for k in range(len(summaries)))}"])
    results = []
    for cell, summary in zip(plan.cells, summaries):
        result = CellResult(cell, status="ok")
        result.read_summary(summary)
        results.append(result)
    return results


def _summary(accuracy: float, *, epsilon: float | None = None, psnr: float | None = None) -> dict:
    summary: dict[str, Any] = {"best": {"metric": "accuracy"}, "final": {"central": {"accuracy": accuracy}},
                               "privacy": {"mechanism": "none"} if epsilon is None else {"epsilon": epsilon}}
    if psnr is not None:
        summary["attack"] = {"kind": "idlg", "headline": "psnr", "metrics": {"psnr": psnr, "ssim": 0.5}, "records": 2}
    return summary


def test_the_x_axis_is_attack_success_else_epsilon_else_the_first_grid_key(tmp_path: Path) -> None:
    attacked = _results(tmp_path, [_summary(0.8, epsilon=4.0, psnr=30.0), _summary(0.7, epsilon=1.0, psnr=12.0)])
    axis = x_axis(attacked, "local.lr")
    assert axis.title.startswith("attack success: idlg psnr") and [axis.read(r) for r in attacked] == [30.0, 12.0]
    private = _results(tmp_path, [_summary(0.8, epsilon=4.0), _summary(0.9)])
    axis = x_axis(private, "local.lr")
    assert axis.title.startswith("ε") and [axis.read(r) for r in private] == [4.0, None]
    plain = _results(tmp_path, [_summary(0.8), _summary(0.9)])
    assert [x_axis(plain, "local.lr").read(r) for r in plain] == [0.1, 0.2]


def test_the_picture_draws_cells_without_epsilon_as_a_line(tmp_path: Path) -> None:
    results = _results(tmp_path, [_summary(0.6, epsilon=1.0), _summary(0.7, epsilon=16.0), _summary(0.9)])
    assert plot_privacy_utility(results, tmp_path / "pu.png", first_key="local.lr")
    assert (tmp_path / "pu.png").stat().st_size > 10_000
    failed = [CellResult(result.cell, status="failed", reason="x") for result in results]
    assert not plot_privacy_utility(failed, tmp_path / "none.png", first_key="local.lr")
    assert not (tmp_path / "none.png").exists()


def test_run_sweep_records_each_cells_numbers_from_its_runner(tmp_path: Path) -> None:
    plan = plan_sweep(tiny_tabular(tmp_path), [], ["local.lr=0.1,0.2"], out=tmp_path / "fake")
    summaries = iter([_summary(0.5, epsilon=2.0, psnr=20.0), _summary(0.6, epsilon=8.0, psnr=25.0)])
    outcome = run_sweep(plan, plan.create_folder(), lambda scenario, run_dir: next(summaries))
    assert [(r.main_value, r.epsilon, r.attack.value if r.attack else None) for r in outcome.results] == [
        (0.5, 2.0, 20.0), (0.6, 8.0, 25.0)]
    row = read_csv(tmp_path / "fake" / "sweep.csv")[1]
    assert (row["ε"], row["attack"], row["attack headline"], row["attack value"], row["attack ssim"]) == (
        "8.0", "idlg", "psnr", "25.0", "0.5")
    assert [path.name for path in outcome.files] == ["sweep.json", "sweep.csv", "sweep.md", "privacy_utility.png"]


def test_values_split_at_commas_outside_brackets_and_quotes() -> None:
    assert split_values("null,1.0") == ["null", "1.0"]
    assert split_values("{mechanism: none},{mechanism: dpsgd, params: {noise_multiplier: 1.0}}") == [
        "{mechanism: none}", "{mechanism: dpsgd, params: {noise_multiplier: 1.0}}"]
    assert split_values("[0, 1],[2]") == ["[0, 1]", "[2]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    with pytest.raises(SweepError, match="do not close"):
        split_values("{mechanism: none")
