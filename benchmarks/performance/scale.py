"""Part ``scale``: the tabular task (the smallest model) with more and more sites, 10 of them sampled per round.

Each size runs in a child process on the in-process engine (``python -m server.cli run
scenarios/tabular-dp-none.yaml --set partition.clients=N --set strategy.fraction_train=10/N ...``, federated
evaluation sampled alike). Measured: discovery (up to 1,000 sites: the task, every site's data and the query
round to all N sites; above: the partition ids only, each site being described when first sampled,
:mod:`server.discovery`), seconds per round (median over the rounds after the first), the process's peak
resident memory. A size the scenario schema refuses is recorded as refused with its reason.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.performance.child import medfed_run
from benchmarks.performance.common import CASES, NO_PLOTS, attempt, median, steady
from server.scenario import ScenarioError, load

SAMPLED = 10  # sites per round
CASE = CASES["tabular"]


def overrides(clients: int, rounds: int) -> list[str]:
    """``clients`` sites, :data:`SAMPLED` of them trained and evaluated per round, ``rounds`` rounds, in-process."""
    fraction = min(1.0, SAMPLED / clients)
    return [f"partition.clients={clients}", f"strategy.fraction_train={fraction}",
            f"strategy.fraction_evaluate={fraction}", f"strategy.min_clients={min(SAMPLED, clients)}",
            f"strategy.rounds={rounds}", "engine.backend=inprocess", NO_PLOTS]


def measure(sizes: list[int], *, rounds: int, timeout: float) -> list[dict[str, Any]]:
    """One row per number of sites."""
    return [{"clients": clients, "sampled": min(SAMPLED, clients),
             **attempt(f"scale {clients} clients", partial(_one, clients, rounds, timeout))}
            for clients in sizes]


def _one(clients: int, rounds: int, timeout: float) -> dict[str, Any]:
    sets = overrides(clients, rounds)
    try:
        load(CASE.path, sets)
    except ScenarioError as error:
        return {"refused": str(error).split(": ", 1)[-1]}
    with tempfile.TemporaryDirectory(prefix="medfed-performance-") as directory:
        timed = medfed_run(CASE.path, sets, Path(directory), timeout=timeout)
    return {"discovery_seconds": timed.discovery, "startup_seconds": timed.startup,
            "seconds_per_round": median(row["wall"] for row in steady(timed.rounds)),
            "peak_rss_mib": timed.child.memory.process, "process_seconds": timed.child.seconds}
