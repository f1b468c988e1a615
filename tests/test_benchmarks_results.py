"""The results benchmark (``python -m benchmarks.results``): a row's cells are its run's summary, a finished run
is reused, and ``--only`` names tables."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.results import (
    RECEIPT,
    ROUNDS,
    RUN_TIME,
    TABLES,
    Row,
    Table,
    chosen_tables,
    ensure_runs,
    final_pair,
    folder_name,
    markdown,
    measure,
    megabytes,
    reached,
    report,
    train_loss,
)
from server.results import RunDirectory

TINY = ("medfed run scenarios/tabular-dp-none.yaml --engine inprocess --set partition.clients=3 "
        "--set data.samples_per_client=30 --set data.server_samples=40 --set strategy.rounds=1 "
        "--set strategy.min_clients=1 --set strategy.fraction_evaluate=1.0 --set output.plots=false")
TINY_TABLE = Table("tiny", "Tiny", "run", (
    ROUNDS, ("final accuracy (evaluate / central)", final_pair("accuracy")), ("final train loss", train_loss),
    ("reached", reached), ("MB", megabytes), RUN_TIME), (Row("tabular, 3 sites, 1 round", TINY, "tiny", 0.0),))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    out = tmp_path_factory.mktemp("results")
    return out, ensure_runs([TINY_TABLE], out)


def test_a_rows_cells_are_its_runs_summary(runs: tuple[Path, dict[str, Path]]) -> None:
    _, found = runs
    summary = RunDirectory.open(found[TINY]).read_summary()
    assert summary is not None
    final = summary["final"]
    megabytes_sent = (summary["bytes_up"] + summary["bytes_down"]) / 1e6
    expected = (f"| tabular, 3 sites, 1 round | 1 | {final['evaluate']['accuracy']:.3f} / "
                f"{final['central']['accuracy']:.3f} | {final['train']['loss']:.3g} | "
                f"central accuracy ≥ 0 at round 1 ({megabytes_sent:.0f} MB) | {megabytes_sent:.0f} | "
                f"{summary['seconds']:.0f} s | `{TINY}` |")
    assert markdown(TINY_TABLE, measure(TINY_TABLE, found)).splitlines()[-1] == expected


def test_a_finished_run_is_reused_not_repeated(runs: tuple[Path, dict[str, Path]]) -> None:
    out, found = runs
    assert found[TINY].parent.parent == out / folder_name(TINY)
    receipt = (out / folder_name(TINY) / RECEIPT).read_text()
    assert ensure_runs([TINY_TABLE], out) == found
    assert (out / folder_name(TINY) / RECEIPT).read_text() == receipt  # not run again
    assert len(list((out / folder_name(TINY)).glob("*/*/summary.json"))) == 1


def test_a_row_without_a_finished_run_says_so_and_the_versions_follow() -> None:
    text = report([TINY_TABLE], {})
    assert "| tabular, 3 sites, 1 round | no finished run | — | — | — | — | — |" in text
    assert text.rstrip().splitlines()[-1].startswith("Measured with Python ")
    assert all(name in text for name in ("torch", "flwr", "opacus", "monai", "scikit-learn", "commit"))


def test_only_names_tables_and_refuses_unknown_names() -> None:
    assert [table.name for table in chosen_tables("ct,central-dp")] == ["ct", "central-dp"]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown table nope .known: segmentation, ct"):
        chosen_tables("ct,nope")


def test_every_command_names_an_existing_scenario_and_a_folder_of_its_own() -> None:
    commands = {row.command for table in TABLES for row in table.rows}
    root = Path(__file__).resolve().parents[1]
    assert all((root / command.split()[2]).is_file() for command in commands)
    assert len({folder_name(command) for command in commands}) == len(commands)
