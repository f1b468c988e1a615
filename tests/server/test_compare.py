"""``medfed compare``: the table reads the runs' own numbers, the target columns count rounds and bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from server.cli import main
from server.compare import CompareError, comparison_rows, load_runs
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
        reached = row["rounds to 1"]
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
PLAIN_COLUMNS = ["run", "strategy", "partition", "rounds", "evaluate loss", "central loss", "best", "MB", "seconds"]
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
