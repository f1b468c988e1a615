"""A benchmark's child process: its stderr lines timed as they arrive, its exit code and its peak memory.

Start-up and per-round times of a run in its own process come from when its log lines arrive here
(``rounds 1..N of N`` once discovery is done, ``round k/N | ...`` as each round ends), so the run is the one a
user starts (``python -m server.cli run ...``), not an instrumented copy. The peak resident memory is the
child's own and that of everything it started (:mod:`benchmarks.performance.memory`).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from benchmarks.performance.common import (
    ROOT,
    child_environment,
    numbers,
    phase_seconds,
    python_command,
    round_walls,
    set_arguments,
    split_rounds,
)
from benchmarks.performance.memory import MemorySampler, Peaks
from server.results import RunDirectory

ROUNDS_START = re.compile(r"^rounds \d+\.\.\d+ of \d+")  # server.progress.LogProgress.start
ROUND_DONE = re.compile(r"^round (\d+)/\d+ ")  # server.progress.LogProgress.round_done
RUN_DIRECTORY = re.compile(r"^run directory: (.+)$")  # server.cli: before the engine starts
ERROR_LINE = re.compile(r"^medfed: (error|interrupted)")
DRAIN_SECONDS = 5.0  # how long the output of a child that exited may still take to arrive


class ChildFailed(RuntimeError):
    """A child process exited with an error, or ran out of time; the message is its one-line reason."""


@dataclass
class ChildRun:
    """One finished child process.

    Attributes
    ----------
    returncode : int
        Its exit code (negative: the signal that ended it).
    seconds : float
        From its start to its exit.
    lines : list of (float, str)
        Its stderr, line by line, each with the seconds since the start at which it arrived.
    stdout : str
        Its standard output.
    memory : Peaks
        Its peak memory, and that of everything it started, MiB.
    timed_out : bool
        Whether it was killed for running past its time.
    """

    returncode: int
    seconds: float
    lines: list[tuple[float, str]] = field(default_factory=list)
    stdout: str = ""
    memory: Peaks = field(default_factory=lambda: Peaks(None, None))
    timed_out: bool = False

    def first(self, pattern: re.Pattern[str]) -> tuple[float, re.Match[str]] | None:
        """When the first stderr line matching ``pattern`` arrived, and the match."""
        return next(iter(self.every(pattern)), None)

    def every(self, pattern: re.Pattern[str]) -> list[tuple[float, re.Match[str]]]:
        """Every stderr line matching ``pattern``, with its arrival time."""
        found = []
        for at, line in self.lines:
            match = pattern.search(line)
            if match is not None:
                found.append((at, match))
        return found

    def failure(self) -> str:
        """Why it failed, on one line: its own error line, else its last line of output."""
        if self.timed_out:
            return f"no result within {self.seconds:.0f} s (killed)"
        said = self.first(ERROR_LINE)
        last = said[1].string if said else next((line for _, line in reversed(self.lines) if line.strip()), "")
        return f"exit code {self.returncode}: {last.strip() or 'no output'}"


def run_child(command: Sequence[str], *, timeout: float) -> ChildRun:
    """Run ``command`` in the repository root, in a process group of its own, reading its output as it comes.

    Parameters
    ----------
    command : sequence of str
        The command line.
    timeout : float
        Seconds after which the child and everything in its process group are killed.

    Returns
    -------
    ChildRun
        Its exit code, timed stderr lines, stdout and peak memory.
    """
    started = time.perf_counter()
    process = subprocess.Popen(list(command), cwd=ROOT, env=child_environment(), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
                               start_new_session=True)
    sampler = MemorySampler(process.pid)
    sampler.start()
    lines: list[tuple[float, str]] = []
    stdout: list[str] = []
    readers = [threading.Thread(target=_timed_lines, args=(process.stderr, started, lines), daemon=True),
               threading.Thread(target=_all_lines, args=(process.stdout, stdout), daemon=True)]
    for reader in readers:
        reader.start()
    timer = _Killer(process.pid, timeout)
    timer.start()
    try:
        process.wait()
    except BaseException:  # Ctrl-C here: its group does not get the terminal's signal, so end it
        _kill_group(process.pid)
        process.wait()
        raise
    finally:
        memory = sampler.finish()
    seconds = time.perf_counter() - started
    timer.cancel()
    for reader, stream in zip(readers, (process.stderr, process.stdout)):
        reader.join(DRAIN_SECONDS)
        if not reader.is_alive() and stream is not None:
            stream.close()
    _kill_group(process.pid)
    return ChildRun(returncode=process.returncode, seconds=seconds, lines=list(lines), stdout="".join(stdout),
                    memory=memory, timed_out=timer.fired)


def _timed_lines(stream: IO[str] | None, started: float, lines: list[tuple[float, str]]) -> None:
    for line in stream or ():
        lines.append((time.perf_counter() - started, line.rstrip("\n")))


def _all_lines(stream: IO[str] | None, lines: list[str]) -> None:
    for line in stream or ():
        lines.append(line)


class _Killer(threading.Timer):
    """Kills the child's process group after ``timeout`` seconds, unless cancelled first."""

    def __init__(self, pid: int, timeout: float) -> None:
        super().__init__(timeout, self._kill)
        self.daemon = True
        self.pid, self.fired = pid, False

    def _kill(self) -> None:
        self.fired = True
        _kill_group(self.pid)


def _kill_group(pid: int) -> None:
    """SIGKILL whatever the child left running in its process group (whose id is the child's pid)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class TimedRun:
    """A federated run in a child process, with its times.

    Attributes
    ----------
    child : ChildRun
        The process.
    startup : float
        Seconds from the process start to the start of round 1 (imports, engine start, discovery).
    rounds : list of dict
        Per round: its wall time, and where known its phases and bookkeeping
        (:func:`benchmarks.performance.common.split_rounds`).
    final : dict
        The last federated (``evaluate``) and ``central`` metrics.
    discovery : float or None
        Seconds from the run directory's creation to the start of round 1 (building the task, the query round).
    """

    child: ChildRun
    startup: float
    rounds: list[dict[str, float]]
    final: dict[str, dict[str, float]]
    discovery: float | None = None


def medfed_run(scenario: Path, overrides: Sequence[str], output_dir: Path, *, timeout: float) -> TimedRun:
    """``python -m server.cli run SCENARIO --set ...`` writing under ``output_dir``, timed from its log lines.

    Raises
    ------
    ChildFailed
        If the run did not finish (its one-line reason).
    """
    sets = set_arguments([*overrides, f"output.dir={output_dir}"])
    child = finished(python_command("server.cli", "run", str(scenario), *sets), timeout=timeout)
    created = child.first(RUN_DIRECTORY)
    if created is None:
        raise ChildFailed("its log has no 'run directory:' line")
    run_dir = RunDirectory.open(Path(created[1].group(1).strip()))
    startup, walls = timed_rounds(child)
    summary = run_dir.read_summary() or {}
    final = {phase: numbers(summary.get("final", {}).get(phase) or {}) for phase in ("evaluate", "central")}
    return TimedRun(child=child, startup=startup, rounds=split_rounds(walls, phase_seconds(run_dir.read_metrics())),
                    final=final, discovery=startup - created[0])


def finished(command: Sequence[str], *, timeout: float) -> ChildRun:
    """:func:`run_child`, raising :class:`ChildFailed` with its reason unless it exited with 0."""
    child = run_child(command, timeout=timeout)
    if child.returncode != 0:
        raise ChildFailed(child.failure())
    return child


def timed_rounds(child: ChildRun) -> tuple[float, list[float]]:
    """When the rounds started (seconds after the process start) and each round's wall time."""
    begun = child.first(ROUNDS_START)
    if begun is None:
        raise ChildFailed("its log has no 'rounds 1..N of N' line")
    return begun[0], round_walls(begun[0], [at for at, _ in child.every(ROUND_DONE)])
