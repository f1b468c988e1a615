"""Part ``engines``: one scenario on each engine, and on the peer a user would otherwise pick.

Each run is a child process: ``python -m server.cli run SCENARIO --set engine.backend=E --set engine.workers=W``
for medfed's engines (``inprocess``, ``simulation`` on Ray, and ``processes`` where this version has it), and
:mod:`benchmarks.performance.flower_peer` for Flower's own Simulation Engine with a minimal ClientApp. Measured:

* start-up: from the process start to the start of round 1 (imports, the engine's start, discovery);
* per round (median over the rounds after the first): the wall time and, for medfed, its split into the
  ``metrics.jsonl`` phases train, evaluate and central, and bookkeeping (what the wall time leaves: building
  messages, aggregation, checks, the metrics file, checkpoints);
* parallel efficiency: T(1 worker) / (2 × T(2 workers)) of the train phase (the peer: of the whole round).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, get_args

from benchmarks.performance.child import TimedRun, medfed_run
from benchmarks.performance.common import CASES, Case, attempt, split_median, steady
from benchmarks.performance.flower_peer import peer_run
from medtasks.scenario import EngineSection

PEER = "flower"  # the engine name of Flower's Simulation Engine with a minimal ClientApp, in the tables


@dataclass(frozen=True)
class Setup:
    """An engine and its number of parallel workers."""

    engine: str
    workers: int


def backends() -> tuple[str, ...]:
    """The engines ``engine.backend`` accepts in this version of medfed."""
    return get_args(EngineSection.model_fields["backend"].annotation)


def setups(*, quick: bool) -> tuple[list[Setup], list[str]]:
    """The engines and worker counts to measure, and a note for each engine this version does not have."""
    parallel = ["simulation", *(["processes"] if "processes" in backends() else []), PEER]
    workers = (2,) if quick else (1, 2)
    chosen = [Setup("inprocess", 1), *(Setup(engine, count) for engine in parallel for count in workers)]
    notes = [] if "processes" in backends() else [
        "processes: not measured; engine.backend does not accept it in this version (medtasks.scenario.EngineSection)"]
    return chosen, notes


def measure(tasks: list[str], *, rounds: int, quick: bool, timeout: float) -> dict[str, Any]:
    """Rows (task × engine × workers), parallel efficiencies, and notes on what was not measured."""
    chosen, notes = setups(quick=quick)
    rows = [{"task": name, "label": CASES[name].label, "engine": setup.engine, "workers": setup.workers,
             **attempt(f"engines {name} {setup.engine} x{setup.workers}",
                       partial(_one, CASES[name], setup, rounds, quick, timeout))}
            for name in tasks for setup in chosen]
    return {"rounds": rounds, "rows": rows, "efficiency": efficiencies(rows), "notes": notes}


def _one(case: Case, setup: Setup, rounds: int, quick: bool, timeout: float) -> dict[str, Any]:
    overrides = [*case.overrides(quick=quick, rounds=rounds), f"engine.workers={setup.workers}"]
    with tempfile.TemporaryDirectory(prefix="medfed-performance-") as directory:
        if setup.engine == PEER:
            timed = peer_run(case.path, overrides, timeout=timeout)
        else:
            timed = medfed_run(case.path, [*overrides, f"engine.backend={setup.engine}"], Path(directory),
                               timeout=timeout)
    return described(timed)


def described(timed: TimedRun) -> dict[str, Any]:
    """What the tables and the JSON keep of a timed run."""
    return {"startup_seconds": timed.startup, "discovery_seconds": timed.discovery,
            "per_round": split_median(steady(timed.rounds)), "rounds_timed": timed.rounds,
            "process_seconds": timed.child.seconds, "peak_rss_mib": timed.child.memory.process,
            "peak_total_mib": timed.child.memory.everything, "final": timed.final}


def efficiencies(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """T₁ / (2 T₂) per task and engine measured with 1 and 2 workers (train phase; the peer: whole rounds)."""
    timed = {(row["task"], row["engine"], row["workers"]): row["per_round"] for row in rows if "per_round" in row}
    found = []
    for (task, engine, workers), one in timed.items():
        two = timed.get((task, engine, 2))
        if workers != 1 or two is None:
            continue
        part = "wall" if engine == PEER else "train"
        if one.get(part) and two.get(part):
            found.append({"task": task, "engine": engine, "part": part, "one_worker": one[part],
                          "two_workers": two[part], "efficiency": one[part] / (2 * two[part])})
    return found
