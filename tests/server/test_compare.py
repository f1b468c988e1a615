"""``medfed compare``: the table reads the runs' own numbers, the target columns count rounds and bytes."""

from __future__ import annotations

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
