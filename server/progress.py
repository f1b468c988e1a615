"""Live progress of a run: a rich display on a terminal, log lines otherwise.

The server loop drives a :class:`Progress` from its one thread::

    progress = make_progress()
    progress.start(total_rounds=10)
    progress.phase(1, "train", total_clients=6)
    progress.client_done(1, "train", partition_id=3)
    ...
    progress.round_done(1, {"train loss": 0.41, "dice": 0.61})
    progress.close()
"""

from __future__ import annotations

import logging
import math
import statistics
import sys
import time
from collections import deque
from typing import Any, Protocol

__all__ = ["Progress", "format_metrics", "make_progress"]

logger = logging.getLogger("medfed")

_ETA_WINDOW = 5  # rounds averaged for the ETA
_REFRESH_PER_SECOND = 4


class Progress(Protocol):
    """What the server loop reports while a run goes on."""

    def start(self, *, total_rounds: int, first_round: int = 1) -> None:
        """The run starts (or resumes) at ``first_round`` of ``total_rounds``."""

    def phase(self, round: int, phase: str, total_clients: int) -> None:
        """A new phase (train/evaluate/central) of ``round`` starts."""

    def client_done(self, round: int, phase: str, partition_id: int) -> None:
        """A client finished its part of the current phase."""

    def round_done(self, round: int, metrics: dict[str, float]) -> None:
        """``round`` is complete; ``metrics`` are its headline metrics."""

    def message(self, text: str) -> None:
        """A warning or info line (e.g. a client failed)."""

    def close(self) -> None:
        """The run is over (also after an error); release the display."""


def format_metrics(metrics: dict[str, float]) -> str:
    """Formats metrics as ``"train loss 0.4123 | dice 0.6131"``.

    Losses come first, then the other keys alphabetically; numbers have 4
    significant digits, missing ones show as ``n/a``.
    """
    keys = sorted(metrics, key=lambda k: ("loss" not in k, k))
    return " | ".join(f"{k} {_format_number(metrics[k])}" for k in keys)


def make_progress(*, interactive: bool | None = None, console: Any = None) -> Progress:
    """Returns the progress reporter for this process.

    Parameters
    ----------
    interactive : bool | None
        Rich live display (True) or log lines on the ``medfed``
        logger (False). None: ``console.is_terminal`` if a console is
        given, else ``sys.stderr.isatty()``.
    console : Any
        A ``rich.console.Console`` for the live display (default: stderr).

    Returns
    -------
    Progress
        A :class:`Progress`.
    """
    if interactive is None:
        interactive = console.is_terminal if console is not None else sys.stderr.isatty()
    return RichProgress(console) if interactive else LogProgress()


class _RoundClock:
    """Round bookkeeping shared by the reporters: totals, durations, ETA."""

    def __init__(self) -> None:
        self.total_rounds = 0
        self.first_round = 1
        self._last_mark = time.monotonic()
        self._durations: deque[float] = deque(maxlen=_ETA_WINDOW)

    def start(self, total_rounds: int, first_round: int) -> None:
        self.total_rounds = total_rounds
        self.first_round = first_round
        self._last_mark = time.monotonic()
        self._durations.clear()

    def round_done(self) -> None:
        now = time.monotonic()
        self._durations.append(now - self._last_mark)
        self._last_mark = now

    def timing(self, round: int) -> str:
        """``"2.1 s/round | ETA 15 s"`` (or ``"ETA n/a"`` before any round)."""
        if not self._durations:
            return "ETA n/a"
        per_round = statistics.fmean(self._durations)
        eta = per_round * max(0, self.total_rounds - round)
        return f"{_format_per_round(per_round)} | ETA {_format_duration(eta)}"

    def round_line(self, round: int, metrics: dict[str, float]) -> str:
        """The one-line report of a finished round."""
        parts = [f"round {round}/{self.total_rounds}", format_metrics(metrics), self.timing(round)]
        return " | ".join(p for p in parts if p)


class LogProgress:
    """Plain log lines on the ``medfed`` logger: INFO per round, DEBUG per phase."""

    def __init__(self) -> None:
        self._clock = _RoundClock()
        self._done = 0
        self._total_clients = 0

    def start(self, *, total_rounds: int, first_round: int = 1) -> None:
        self._clock.start(total_rounds, first_round)
        logger.info("rounds %d..%d of %d", first_round, total_rounds, total_rounds)

    def phase(self, round: int, phase: str, total_clients: int) -> None:
        self._done, self._total_clients = 0, total_clients
        logger.debug(
            "round %d/%d | %s | %d clients", round, self._clock.total_rounds, phase, total_clients
        )

    def client_done(self, round: int, phase: str, partition_id: int) -> None:
        self._done += 1
        logger.debug(
            "round %d/%d | %s | client %d done (%d/%d)",
            round, self._clock.total_rounds, phase, partition_id, self._done, self._total_clients,
        )  # fmt: skip

    def round_done(self, round: int, metrics: dict[str, float]) -> None:
        self._clock.round_done()
        logger.info("%s", self._clock.round_line(round, metrics))

    def message(self, text: str) -> None:
        logger.info("%s", text)

    def close(self) -> None:
        """Nothing to release."""


class RichProgress:
    """A rich live display: a bar over rounds and a bar over the current phase's clients.

    Finished rounds are also printed above the display, so they stay in the
    scroll-back after it closes.
    """

    def __init__(self, console: Any = None) -> None:
        self._console = console
        self._clock = _RoundClock()
        self._display: Any = None
        self._rounds_task: Any = None
        self._phase_task: Any = None

    def start(self, *, total_rounds: int, first_round: int = 1) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.close()
        self._clock.start(total_rounds, first_round)
        self._display = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self._console or Console(stderr=True),
            refresh_per_second=_REFRESH_PER_SECOND,
        )
        done = first_round - 1
        self._rounds_task = self._display.add_task(
            "rounds", total=total_rounds, completed=done, info=self._clock.timing(done)
        )
        self._phase_task = self._display.add_task("waiting", total=None, info="")
        self._display.start()

    def phase(self, round: int, phase: str, total_clients: int) -> None:
        if self._display is None:
            return
        self._display.reset(
            self._phase_task,
            total=total_clients,
            description=f"round {round} {phase}",
            info="",
        )
        self._display.refresh()

    def client_done(self, round: int, phase: str, partition_id: int) -> None:
        if self._display is None:
            return
        self._display.update(self._phase_task, advance=1, info=f"client {partition_id} done")
        self._display.refresh()

    def round_done(self, round: int, metrics: dict[str, float]) -> None:
        if self._display is None:
            return
        self._clock.round_done()
        info = f"{self._clock.timing(round)} | {format_metrics(metrics)}"
        self._display.update(self._rounds_task, completed=round, info=info)
        self._print(self._clock.round_line(round, metrics))
        self._display.refresh()

    def message(self, text: str) -> None:
        if self._display is None:
            logger.info("%s", text)
        else:
            self._print(text)

    def close(self) -> None:
        if self._display is not None:
            self._display.stop()
            self._display = None

    def _print(self, text: str) -> None:
        """Prints a line above the live display (kept in the scroll-back)."""
        self._display.console.print(text, highlight=False, markup=False)


def _format_number(value: float | None) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    try:
        return f"{value:.4g}"
    except (TypeError, ValueError):
        return str(value)


def _format_per_round(seconds: float) -> str:
    return f"{seconds:.1f} s/round" if seconds < 10 else f"{seconds:.0f} s/round"


def _format_duration(seconds: float) -> str:
    """``"15 s"``, ``"4 min 05 s"`` or ``"1 h 02 min"``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
