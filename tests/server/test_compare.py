"""``medfed compare``: the table reads the runs' own numbers, the target columns count rounds and bytes, the labels
tell runs apart, only completed rounds count, and the figure goes next to the runs."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.cli import main
from server.compare import (
    CompareError,
    comparison_rows,
    completed_rounds,
    evaluation_note,
    figure_path,
    load_runs,
    plot_comparison,
)
from tests.helpers import quadratic_scenario, run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    tmp_path = tmp_path_factory.mktemp("compare")
    scenarios = [quadratic_scenario(tmp_path, "fedavg", rounds=4), quadratic_scenario(tmp_path, "centralized", rounds=4)]
    return [run(scenario).path for scenario in scenarios]


def test_rows_report_each_runs_final_metric_and_traffic(two_runs: list[Path]) -> None:
    runs = load_runs(two_runs)
    rows = comparison_rows(runs, target=1.0)
    assert [row["run"] for row in rows] == ["quadratic-fedavg", "quadratic-centralized"]
    for row, view in zip(rows, runs):
        records = [r for r in view.records if r["phase"] == "evaluate"]
        assert row["evaluate loss"] == records[-1]["aggregate"]["loss"]
        assert row["MB"] == pytest.approx(sum(r["bytes_up"] + r["bytes_down"] for r in view.records) / 1e6)
        reached = row["rounds to 1 (central)"]
        losses = {r["round"]: r["aggregate"]["loss"] for r in view.records if r["phase"] == "central"}
        if reached is None:
            assert min(losses.values()) > 1.0
        else:  # the first round at or below the target (lower is better for a loss)
            assert losses[reached] <= 1.0 and all(losses[r] > 1.0 for r in losses if r < reached)


def test_cli_prints_markdown_and_draws_curves(two_runs: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "curves.png"
    assert main(["compare", *map(str, two_runs), "--markdown", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.splitlines()[0].startswith("| run | strategy |")
    assert "quadratic-centralized" in printed and out.stat().st_size > 10_000


def test_repeated_scenarios_get_distinct_labels(two_runs: list[Path]) -> None:
    labels = [view.label for view in load_runs([two_runs[0], two_runs[0]])]
    assert labels[0] == labels[1] and labels[0].startswith("quadratic-fedavg@")


def test_a_folder_that_is_not_a_run_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(CompareError):
        load_runs([tmp_path])
    assert main(["compare", str(tmp_path)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# --- attacks -----------------------------------------------------------------------------------------------
PLAIN_COLUMNS = ["run", "strategy", "partition", "rounds", "evaluate loss", "central loss", "best (central)", "MB",
                 "seconds"]
ATTACK_RECORDS = [  # round, victim, psnr, ssim (the attack plug-in's "phase": "attack" records)
    (1, 0, 10.0, 0.25), (1, 1, 14.0, 0.75), (2, 0, 20.0, 0.5), (3, 0, None, 0.5), (4, 2, 30.0, 1.0),
]


def with_attack(run: Path, folder: Path) -> Path:
    """A copy of ``run`` as an attacked run would leave it: attack records in metrics.jsonl, an attack block."""
    shutil.copytree(run, folder)
    with (folder / "metrics.jsonl").open("a") as metrics:
        for server_round, victim, psnr, ssim in ATTACK_RECORDS:
            metrics.write(json.dumps({
                "round": server_round, "phase": "attack", "kind": "idlg", "attacker": "server", "victim": victim,
                "metrics": {"psnr": psnr, "ssim": ssim}, "main_metric": "loss", "main_value": 0.5, "seconds": 0.1,
            }) + "\n")
    summary = json.loads((folder / "summary.json").read_text())
    psnrs = [psnr for *_, psnr, _ in ATTACK_RECORDS if psnr is not None]
    summary["attack"] = {"kind": "idlg", "label": "iDLG (Zhao et al. 2020)", "attackers": ["server"],
                         "victims": [0, 1, 2], "rounds": None, "headline": "psnr",
                         "metrics": {"psnr": sum(psnrs) / len(psnrs), "ssim": 0.6}, "records": len(ATTACK_RECORDS)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_runs_without_attacks_show_the_columns_they_always_had(two_runs: list[Path]) -> None:
    runs = load_runs(two_runs)
    assert all(run.attack is None and run.attack_curve() == {} for run in runs)
    assert [list(row) for row in comparison_rows(runs)] == [PLAIN_COLUMNS, PLAIN_COLUMNS]


def test_attacked_runs_show_kind_headline_and_each_metric_mean_beside_the_primary_metric(two_runs: list[Path],
                                                                                        tmp_path: Path) -> None:
    attacked = with_attack(two_runs[0], tmp_path / "attacked")
    rows = comparison_rows(load_runs([attacked, two_runs[1]]))
    assert list(rows[0]) == [*PLAIN_COLUMNS[:7], "attack", "attack headline", "attack value", "attack psnr",
                             "attack ssim", "MB", "seconds"]
    assert (rows[0]["attack"], rows[0]["attack headline"], rows[0]["attack ssim"]) == ("idlg", "psnr", 0.6)
    assert rows[0]["attack value"] == rows[0]["attack psnr"] == pytest.approx(18.5)
    assert [rows[1][column] for column in ("attack", "attack headline", "attack value", "attack psnr")] == [None] * 4
    plain = comparison_rows(load_runs([two_runs[0]]))[0]
    assert {key: value for key, value in rows[0].items() if not key.startswith("attack")} == plain


def test_the_attack_curve_is_the_headline_mean_over_each_rounds_records(two_runs: list[Path], tmp_path: Path) -> None:
    view = load_runs([with_attack(two_runs[0], tmp_path / "attacked")])[0]
    assert view.attack_curve() == {1: 12.0, 2: 20.0, 4: 30.0}  # round 3's only psnr is null
    assert view.curve("evaluate", "loss") == load_runs([two_runs[0]])[0].curve("evaluate", "loss")


def test_compare_draws_a_fourth_panel_only_for_attacked_runs(two_runs: list[Path], tmp_path: Path, capsys) -> None:
    from PIL import Image

    attacked = with_attack(two_runs[0], tmp_path / "attacked")
    assert main(["compare", str(attacked), str(two_runs[1]), "--markdown", "--out", str(tmp_path / "a.png")]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "| attack | attack headline | attack value | attack psnr | attack ssim | MB |" in header
    assert main(["compare", *map(str, two_runs), "--out", str(tmp_path / "plain.png")]) == 0
    widths = [Image.open(tmp_path / name).size[0] for name in ("a.png", "plain.png")]
    assert widths == [round(16 * 4 / 3 * 120), 16 * 120]


# --- copies of a run, edited by hand -----------------------------------------------------------------------
def copy_run(run: Path, folder: Path, edit: Callable[[dict], Any] | None = None) -> Path:
    """A copy of ``run`` in ``folder``, its scenario.yaml changed in place by ``edit``."""
    shutil.copytree(run, folder)
    if edit is not None:
        scenario = yaml.safe_load((folder / "scenario.yaml").read_text())
        edit(scenario)
        (folder / "scenario.yaml").write_text(yaml.safe_dump(scenario, sort_keys=False))
    return folder


def record(server_round: int, phase: str, loss: float | None, **extra: Any) -> dict[str, Any]:
    """One metrics.jsonl record as the federation writes it (``loss=None``: the phase failed, no aggregate)."""
    return {"round": server_round, "phase": phase, "clients": {}, "aggregate": {} if loss is None else {"loss": loss},
            "bytes_up": 100, "bytes_down": 100, "seconds": 0.1, **extra}


def write_metrics(folder: Path, records: list[Mapping[str, Any]], *, finished: bool = False) -> Path:
    """Replace ``folder``'s metrics.jsonl by ``records``; without ``finished``, the run has no summary.json."""
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if not finished:
        (folder / "summary.json").unlink(missing_ok=True)
    return folder


def setting(key: str, value: Any) -> Callable[[dict], None]:
    """An ``edit`` for :func:`copy_run`: set the dotted ``key`` (as ``--set key=value`` would)."""
    def edit(scenario: dict) -> None:
        *path, last = key.split(".")
        section = scenario
        for part in path:
            section = section[part]
        section[last] = value
    return edit


# --- labels ------------------------------------------------------------------------------------------------
def test_runs_of_one_scenario_are_labelled_with_the_settings_that_tell_them_apart(two_runs: list[Path],
                                                                                 tmp_path: Path) -> None:
    slow = copy_run(two_runs[0], tmp_path / "a" / "slow", setting("local.lr", 0.1))
    fast = copy_run(two_runs[0], tmp_path / "b" / "fast", setting("output.dir", "elsewhere"))  # not a setting
    runs = load_runs([slow, fast, two_runs[1]])
    assert [view.label for view in runs] == [
        "quadratic-fedavg | local.lr=0.1", "quadratic-fedavg | local.lr=0.3", "quadratic-centralized"]
    assert [row["run"] for row in comparison_rows(runs)] == [view.label for view in runs]


def test_equal_labels_fall_back_to_the_run_directory_name(two_runs: list[Path], tmp_path: Path) -> None:
    slow = copy_run(two_runs[0], tmp_path / "slow", setting("local.lr", 0.1))
    labels = [view.label for view in load_runs([slow, two_runs[0], two_runs[0]])]
    assert labels[0] == "quadratic-fedavg | local.lr=0.1"
    assert labels[1] == labels[2] == f"quadratic-fedavg@{two_runs[0].name} | local.lr=0.3"


def test_a_label_shows_three_settings_and_counts_the_rest(two_runs: list[Path], tmp_path: Path) -> None:
    def many(scenario: dict) -> None:
        scenario["seed"] = 7
        scenario["strategy"]["fraction_train"] = 0.5
        scenario["local"].update(epochs=3, lr=0.1)
        scenario["data"]["path"] = "/a/very/long/folder/of/images/that/goes/on"
    label = load_runs([copy_run(two_runs[0], tmp_path / "many", many), two_runs[0]])[0].label
    assert label == "quadratic-fedavg | seed=7, data.path=/a/very/long/folder/of/…, strategy.fraction_train=0.5 +2 more"


def test_the_legend_uses_the_table_labels(two_runs: list[Path], tmp_path: Path, monkeypatch) -> None:
    from matplotlib.figure import Figure

    legends: list[list[str]] = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: legends.append(
        fig.axes[2].get_legend_handles_labels()[1]))
    runs = load_runs([copy_run(two_runs[0], tmp_path / "slow", setting("local.lr", 0.1)), two_runs[0]])
    plot_comparison(runs, tmp_path / "curves.png")
    assert legends == [[view.label for view in runs]] and "local.lr=0.1" in legends[0][0]


# --- ε ------------------------------------------------------------------------------------------------------
def with_epsilon(run: Path, folder: Path, epsilons: list[float], summary_epsilon: float | None) -> Path:
    """A copy of ``run`` whose records carry the run's ε so far (``epsilons``, one per round) and whose summary's
    privacy block gives ``summary_epsilon`` (``None``: the run did not finish, no summary.json)."""
    copy_run(run, folder)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    for rec in records:
        rec.update(epsilon=epsilons[rec["round"] - 1], delta=1e-5, accountant="rdp")
    write_metrics(folder, records, finished=summary_epsilon is not None)
    if summary_epsilon is not None:
        summary = json.loads((folder / "summary.json").read_text())
        summary["privacy"] = {"mechanism": "dpsgd", "epsilon": summary_epsilon}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_the_epsilon_column_gives_each_runs_final_epsilon(two_runs: list[Path], tmp_path: Path) -> None:
    finished = with_epsilon(two_runs[0], tmp_path / "finished", [1.0, 2.0, 3.0, 4.0], summary_epsilon=4.5)
    stopped = with_epsilon(two_runs[0], tmp_path / "stopped", [1.0, 2.0, 3.0, 3.5], summary_epsilon=None)
    rows = comparison_rows(load_runs([finished, stopped, two_runs[1]]))
    assert list(rows[0]) == [*PLAIN_COLUMNS[:7], "epsilon", *PLAIN_COLUMNS[7:]]
    assert [row["epsilon"] for row in rows] == [4.5, 3.5, None]  # the summary's, the last record's, no DP


# --- which evaluation ---------------------------------------------------------------------------------------
def without_central(run: Path, folder: Path) -> Path:
    """A copy of ``run`` as a run without a server test set leaves it: no central records."""
    copy_run(run, folder)
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return write_metrics(folder, [r for r in records if r["phase"] != "central"], finished=True)


def test_best_and_reached_use_central_evaluation_only_when_every_run_has_it(two_runs: list[Path],
                                                                            tmp_path: Path) -> None:
    central = comparison_rows(load_runs(two_runs), target=7.0)[0]
    assert "best (central)" in central and "rounds to 7 (central)" in central and "MB to 7 (central)" in central
    assert evaluation_note(load_runs(two_runs), 7.0) == ("best, rounds to 7 and MB to 7 use central evaluation "
                                                         "(the server's test set): every run has it")
    runs = load_runs([two_runs[0], without_central(two_runs[1], tmp_path / "no-central")])
    rows = comparison_rows(runs, target=7.0)
    assert [column for column in rows[0] if "(" in column] == [
        "best (federated)", "rounds to 7 (federated)", "MB to 7 (federated)"]
    evaluate = runs[0].curve("evaluate", "loss")  # the first run has central evaluation, but it is not used
    best = min(evaluate, key=lambda r: evaluate[r])
    assert rows[0]["best (federated)"] == f"{evaluate[best]:.4g} (r{best})"
    assert evaluation_note(runs) == ("best uses federated evaluation (the sites' validation splits, weighted by "
                                     "their examples): no central evaluation in quadratic-centralized")


def test_the_terminal_table_shows_whole_labels_and_says_which_evaluation_under_it(two_runs: list[Path],
                                                                                 tmp_path: Path, capsys) -> None:
    runs = [copy_run(two_runs[0], tmp_path / "slow", setting("local.lr", 0.1)), two_runs[0], two_runs[1]]
    assert main(["compare", *map(str, runs), "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    views = load_runs(runs)
    rows = [next(number for number, line in enumerate(lines) if f" {view.label} " in line) for view in views]
    assert lines.index(evaluation_note(views)) > max(rows)


# --- completed rounds ---------------------------------------------------------------------------------------
def test_a_round_is_completed_when_every_scheduled_phase_has_an_aggregate() -> None:
    records = [
        record(1, "train", 5.0),                                                    # not an evaluation round
        record(2, "train", 4.0), record(2, "evaluate", 4.0), record(2, "central", 4.0),
        record(3, "train", 3.0), {"round": 3, "phase": "attack", "metrics": {}},    # attacks are not scheduled
        record(4, "train", 2.0), record(4, "evaluate", 2.0),                        # central missing
        record(5, "train", 1.5),
        record(6, "train", 1.0), record(6, "evaluate", None), record(6, "central", 1.0),  # evaluate failed
        record(7, "train", None),                                                   # train failed (budget spent)
    ]
    assert completed_rounds(records, rounds=8, evaluate_every=2) == [1, 2, 3, 5]
    assert completed_rounds(records[:7], rounds=3, evaluate_every=2) == [1, 2]  # round 3 is the last: evaluated


def test_an_interrupted_rounds_records_do_not_count(two_runs: list[Path], tmp_path: Path) -> None:
    records = [record(r, phase, 10.0 - r) for r in (1, 2) for phase in ("train", "evaluate", "central")]
    records += [record(3, "train", 0.5), record(3, "evaluate", 0.5)]  # stopped before round 3's central evaluation
    view = load_runs([write_metrics(copy_run(two_runs[0], tmp_path / "stopped"), records)])[0]
    row = comparison_rows([view], target=1.0)[0]
    assert view.completed == [1, 2] and row["rounds"] == 2
    assert (row["evaluate loss"], row["central loss"], row["best (central)"]) == (8.0, 8.0, "8 (r2)")
    assert row["rounds to 1 (central)"] is None and row["MB"] == pytest.approx(8 * 200 / 1e6)  # bytes sent count


# --- where the figure goes ----------------------------------------------------------------------------------
def test_without_out_the_figure_goes_next_to_the_runs_not_the_working_directory(two_runs: list[Path], tmp_path: Path,
                                                                               monkeypatch, capsys) -> None:
    runs = [copy_run(two_runs[0], tmp_path / "runs" / "quadratic" / name) for name in ("first", "second")]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    assert main(["compare", *map(str, runs)]) == 0
    figure = tmp_path / "runs" / "quadratic" / "compare.png"
    assert f"curves: {figure}" in capsys.readouterr().out and figure.stat().st_size > 10_000
    assert list((tmp_path / "cwd").iterdir()) == []
    # a glob over the runs now catches the figure too: it is skipped, with a warning
    assert main(["compare", *map(str, sorted(figure.parent.iterdir()))]) == 0
    assert "skipped (files, not run directories)" in capsys.readouterr().err


def test_the_default_folder_is_the_deepest_one_that_holds_every_run(tmp_path: Path) -> None:
    runs = [tmp_path / "runs" / "a" / "t1", tmp_path / "runs" / "a" / "t2", tmp_path / "runs" / "b" / "t1"]
    assert figure_path(None, runs[:2]) == tmp_path / "runs" / "a" / "compare.png"
    assert figure_path(None, runs) == tmp_path / "runs" / "compare.png"
    assert figure_path(None, runs[:1]) == tmp_path / "runs" / "a" / "compare.png"


def test_out_names_a_file_or_a_folder_and_missing_folders_are_created(two_runs: list[Path], tmp_path: Path) -> None:
    assert figure_path(tmp_path, two_runs) == tmp_path / "compare.png"
    assert figure_path(tmp_path / "new" / "folder", two_runs) == tmp_path / "new" / "folder" / "compare.png"
    assert figure_path(tmp_path / "deep" / "er" / "fig.svg", two_runs) == tmp_path / "deep" / "er" / "fig.svg"
    assert (tmp_path / "new" / "folder").is_dir() and (tmp_path / "deep" / "er").is_dir()
    with pytest.raises(CompareError, match="'.txt' is not a figure format"):
        figure_path(tmp_path / "table.txt", two_runs)


def test_an_out_folder_that_cannot_be_made_is_one_line_exit_2(two_runs: list[Path], tmp_path: Path, capsys) -> None:
    (tmp_path / "a-file").write_text("")
    assert main(["compare", *map(str, two_runs), "--out", str(tmp_path / "a-file" / "fig.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "cannot create" in captured.err and captured.out == ""
