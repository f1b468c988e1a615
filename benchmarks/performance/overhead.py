"""Part ``overhead``: medfed's in-process engine against the plain PyTorch loop doing the same work.

For each task's default model, the scenario runs in this process on medfed's in-process engine
(:func:`server.engines.run_scenario`) and in the plain FedAvg loop (:mod:`benchmarks.performance.baseline`), in
alternating order when repeated. Both build their data before the first round; a round's time is its wall time
(medfed: from the end of one round to the end of the next, checkpoint included; pictures are off for both). The
per-round figure is the median over the rounds after the first of every repeat, and the overhead is
(medfed − plain) / plain. The final metrics of both are reported: the same algorithm on the same batches gives
the same numbers, or numbers that differ in the last digits.
"""

from __future__ import annotations

import logging
import math
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.performance.baseline import check_plain_fedavg, run_plain_fedavg
from benchmarks.performance.common import (
    CASES,
    Case,
    RoundClock,
    attempt,
    median,
    numbers,
    phase_seconds,
    split_median,
    split_rounds,
    steady,
)
from medtasks.registry import get_task_class
from server.engines import run_scenario
from server.results import RunDirectory
from server.scenario import Scenario, load


def measure(tasks: list[str], *, rounds: int, repeats: int, quick: bool) -> list[dict[str, Any]]:
    """One row per task: medfed's and the plain loop's seconds per round, the overhead and the final metrics."""
    return [{"task": name, "label": CASES[name].label, "scenario": CASES[name].scenario, "rounds": rounds,
             **attempt(f"overhead {name}", partial(_compare, CASES[name], rounds, repeats, quick))}
            for name in tasks]


def _compare(case: Case, rounds: int, repeats: int, quick: bool) -> dict[str, Any]:
    """``repeats`` runs of each side, in alternating order; their steady rounds' medians and final metrics."""
    runners = {"medfed": _medfed, "plain": _plain}
    timed: dict[str, list[float]] = {name: [] for name in runners}
    finals: dict[str, dict[str, dict[str, float]]] = {}
    splits: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="medfed-performance-") as directory:
        scenario = load(case.path, [*case.overrides(quick=quick, rounds=rounds), "engine.backend=inprocess",
                                    f"output.dir={directory}"])
        check_plain_fedavg(scenario)
        for repeat in range(repeats):
            for name in list(runners)[:: 1 if repeat % 2 == 0 else -1]:  # alternate who goes first
                result = runners[name](scenario, Path(directory))
                timed[name] += steady(result["round_seconds"])
                splits += steady(result.get("split", []))
                finals[name] = result["final"]
    medfed, plain = median(timed["medfed"]), median(timed["plain"])
    return {
        "medfed_seconds_per_round": medfed,
        "plain_seconds_per_round": plain,
        "overhead_percent": 100 * (medfed - plain) / plain if medfed and plain else None,
        "medfed_split": split_median(splits),
        "primary_metric": get_task_class(scenario.task.name).primary_metric,
        "medfed_final": finals["medfed"],
        "plain_final": finals["plain"],
        "largest_metric_difference": largest_difference(finals["medfed"], finals["plain"]),
        "rounds_timed": timed,
    }


def _medfed(scenario: Scenario, directory: Path) -> dict[str, Any]:
    """One in-process medfed run: its round times, their phases and its final metrics."""
    run_dir = RunDirectory.create(directory, scenario.name)
    run_dir.write_scenario(scenario.to_yaml())
    clock = RoundClock()
    medfed_log = logging.getLogger("medfed")
    level = medfed_log.level
    medfed_log.setLevel(logging.WARNING)  # the strategy's settings line, not the benchmark's business
    try:
        summary = run_scenario(scenario, run_dir, clock)
    finally:
        medfed_log.setLevel(level)
    walls = clock.round_seconds()
    final = summary.get("final", {})
    return {"round_seconds": walls, "split": split_rounds(walls, phase_seconds(run_dir.read_metrics())),
            "final": {phase: numbers(final.get(phase) or {}) for phase in ("evaluate", "central")}}


def _plain(scenario: Scenario, directory: Path) -> dict[str, Any]:
    """One run of the plain loop: its round times and its final metrics."""
    run = run_plain_fedavg(scenario)
    return {"round_seconds": run.round_seconds, "final": {"evaluate": run.evaluate, "central": run.central}}


def largest_difference(first: dict[str, dict[str, float]], second: dict[str, dict[str, float]]) -> float | None:
    """The largest |a − b| over the metrics both runs report (NaN where both are NaN counts as equal)."""
    differences = [abs(first[phase][key] - second[phase][key])
                   for phase in first.keys() & second.keys() for key in first[phase].keys() & second[phase].keys()
                   if not (math.isnan(first[phase][key]) and math.isnan(second[phase][key]))]
    return max(differences, default=None)
