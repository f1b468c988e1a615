"""What every part of the performance benchmark shares: the scenarios, the machine's description, a failed
measurement as one line, per-round times and their split into phases."""

from __future__ import annotations

import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from server.engines import QUIET_ENVIRONMENT

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = ROOT / "scenarios"
PHASES = ("train", "evaluate", "central")  # the timed phases of a metrics.jsonl record
NO_PLOTS = "output.plots=false"  # what a benchmark run leaves out: pictures are not per-round work

log = logging.getLogger("benchmarks.performance")
T = TypeVar("T")


@dataclass(frozen=True)
class Case:
    """A task's default model, as a scenario file and the overrides that shrink it for ``--quick``.

    Attributes
    ----------
    label : str
        The task's name in the tables.
    scenario : str
        The file under ``scenarios/``.
    quick : tuple of str
        ``--set`` overrides of the smoke version (smaller images, fewer samples and steps).
    """

    label: str
    scenario: str
    quick: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return SCENARIOS / self.scenario

    def overrides(self, *, quick: bool, rounds: int) -> list[str]:
        """The ``--set`` overrides of a run: ``rounds`` rounds, no pictures, and the smoke sizes if ``quick``."""
        return [*(self.quick if quick else ()), f"strategy.rounds={rounds}", NO_PLOTS]


CASES = {
    "quickstart": Case("segmentation", "quickstart.yaml",
                       ("task.params.image_size=32", "data.samples_per_client=16", "data.server_samples=8")),
    "ct-iid": Case("ct", "ct-iid.yaml", ("task.params.image_size=32", "data.samples_per_client=16",
                                         "data.server_samples=8", "local.max_steps=4")),
    "mil-iid": Case("mil", "mil-iid.yaml", ("task.params.tiles_per_slide=8", "data.samples_per_client=16",
                                            "data.server_samples=16")),
    "tabular": Case("tabular", "tabular-dp-none.yaml", ("partition.clients=10", "data.samples_per_client=50",
                                                        "data.server_samples=200")),
    "digits-iid": Case("digits", "digits-iid.yaml", ("data.samples_per_client=100", "data.server_samples=100")),
}


def environment() -> dict[str, Any]:
    """The machine and library versions the numbers were measured with."""
    versions = {name: _version(name) for name in ("torch", "flwr", "ray", "numpy", "monai", "opacus")}
    return {
        "python": platform.python_version(),
        **versions,
        "cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    """The repository's commit (with ``+changes`` when the working tree differs), if git can say."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+changes" if dirty else commit


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line (the first line of the message)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def attempt(what: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``, or ``{"error": reason}`` when it raises: one failed measurement never stops the others."""
    log.info("%s ...", what)
    started = time.perf_counter()
    try:
        result = measure()
    except Exception as error:  # a benchmark records any failure and goes on
        log.info("%s failed: %s", what, one_line(error))
        return {"error": one_line(error)}
    log.info("%s done in %.1f s", what, time.perf_counter() - started)
    return result


def steady(rounds: Sequence[T]) -> list[T]:
    """The rounds after the first (which also pays lazy imports, first kernels and caches), or the only one."""
    return list(rounds[1:]) if len(rounds) > 1 else list(rounds)


def median(values: Iterable[float]) -> float | None:
    """The median of ``values`` (None when there are none)."""
    values = list(values)
    return statistics.median(values) if values else None


def phase_seconds(records: Iterable[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Seconds of each round's phases (train, evaluate, central) from ``metrics.jsonl`` records."""
    rounds: dict[int, dict[str, float]] = {}
    for record in records:
        if record.get("phase") in PHASES:
            phases = rounds.setdefault(int(record["round"]), dict.fromkeys(PHASES, 0.0))
            phases[record["phase"]] += float(record.get("seconds", 0.0))
    return rounds


def split_rounds(walls: Sequence[float], phases: dict[int, dict[str, float]]) -> list[dict[str, float]]:
    """Each round's wall time and its parts: the phases, and bookkeeping (the wall time the phases leave)."""
    rows = []
    for number, wall in enumerate(walls, start=1):
        parts = phases.get(number, dict.fromkeys(PHASES, 0.0))
        rows.append({"round": number, "wall": wall, **parts, "bookkeeping": wall - sum(parts.values())})
    return rows


def split_median(rows: Sequence[dict[str, float]]) -> dict[str, float | None]:
    """The median of every part of :func:`split_rounds` over ``rows`` (the steady rounds: :func:`steady`)."""
    return {key: median(row[key] for row in rows if row.get(key) is not None)
            for key in ("wall", *PHASES, "bookkeeping")}


class RoundClock:
    """A progress display that only notes when the rounds start and when each ends (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.ends: list[float] = []

    def start(self, *, total_rounds: int, first_round: int = 1) -> None:
        self.started = time.perf_counter()

    def phase(self, round: int, phase: str, total_clients: int) -> None:
        """Not timed."""

    def client_done(self, round: int, phase: str, partition_id: int) -> None:
        """Not timed."""

    def round_done(self, round: int, metrics: dict[str, float]) -> None:
        self.ends.append(time.perf_counter())

    def message(self, text: str) -> None:
        """Not shown."""

    def close(self) -> None:
        """Nothing to release."""

    def round_seconds(self) -> list[float]:
        """Wall-clock seconds of each round, from the start of the rounds (after discovery)."""
        return round_walls(self.started, self.ends) if self.started is not None else []


def round_walls(started: float, ends: Sequence[float]) -> list[float]:
    """Each round's wall time from when the rounds started and when each ended."""
    marks = [started, *ends]
    return [end - start for start, end in zip(marks, marks[1:])]


def child_environment() -> dict[str, str]:
    """The environment of a benchmark's child process: this checkout first on the path, quiet libraries."""
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    for key, value in {**QUIET_ENVIRONMENT, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}.items():
        environment.setdefault(key, value)
    return environment


def set_arguments(overrides: Iterable[str]) -> list[str]:
    """``--set KEY=VALUE`` for every override."""
    return [argument for item in overrides for argument in ("--set", item)]


def numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The numeric metrics of a ``summary.json`` phase, without the example count."""
    return {key: float(value) for key, value in metrics.items()
            if isinstance(value, (int, float)) and key != "num-examples"}


def python_command(module: str, *arguments: str) -> list[str]:
    """``python -m module arguments`` with this interpreter."""
    return [sys.executable, "-m", module, *arguments]
