"""Tests for the progress reporters (server/progress.py)."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console

from server.progress import LogProgress, RichProgress, format_metrics, make_progress


def _drive(progress, rounds: int = 3, clients: int = 2) -> None:
    progress.start(total_rounds=rounds)
    for rnd in range(1, rounds + 1):
        for phase in ("train", "evaluate"):
            progress.phase(rnd, phase, total_clients=clients)
            for pid in range(clients):
                progress.client_done(rnd, phase, pid)
        progress.phase(rnd, "central", total_clients=0)
        progress.round_done(rnd, {"dice": 0.6 + 0.01 * rnd, "train loss": 0.5 / rnd})
    progress.message("client 1 failed: out of memory")
    progress.close()


def test_format_metrics_is_stable_and_rounded() -> None:
    assert format_metrics({"dice": 0.61349, "train loss": 0.41234}) == "train loss 0.4123 | dice 0.6135"
    assert format_metrics({"train loss": 0.41234, "dice": 0.61349}) == "train loss 0.4123 | dice 0.6135"
    assert format_metrics({"auc": None, "psnr": float("nan")}) == "auc n/a | psnr nan"


def test_make_progress_picks_the_reporter() -> None:
    assert isinstance(make_progress(interactive=False), LogProgress)
    assert isinstance(make_progress(interactive=True), RichProgress)
    console = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(make_progress(console=console), LogProgress)


def test_log_progress_writes_one_info_line_per_round(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="medfed"):
        _drive(make_progress(interactive=False))
    round_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert len(round_lines) == 3
    assert all(r.levelno == logging.INFO for r in caplog.records)  # phase lines are DEBUG
    assert round_lines[0].startswith("round 1/3 | train loss 0.5 | dice 0.61 | ")
    assert "s/round" in round_lines[1] and "ETA" in round_lines[1]
    assert round_lines[2].endswith("ETA 0 s")
    assert "client 1 failed: out of memory" in caplog.text


def test_log_progress_phase_lines_are_debug(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="medfed"):
        _drive(LogProgress(), rounds=1)
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert "round 1/1 | train | 2 clients" in debug
    assert "round 1/1 | evaluate | client 1 done (2/2)" in debug


def test_rich_progress_runs_against_a_terminal_console() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    progress = make_progress(console=console)
    assert isinstance(progress, RichProgress)
    _drive(progress)
    output = buffer.getvalue()
    assert "3/3" in output
    assert "round 3/3 | train loss 0.1667 | dice 0.63" in output
    assert "client 1 failed: out of memory" in output
    progress.close()  # closing twice is harmless


def test_rich_progress_resumes_midway() -> None:
    buffer = io.StringIO()
    progress = RichProgress(Console(file=buffer, force_terminal=True, width=120))
    progress.start(total_rounds=5, first_round=4)
    progress.round_done(4, {"dice": 0.5})
    progress.close()
    assert "4/5" in buffer.getvalue()
