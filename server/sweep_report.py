"""``medfed sweep``, reporting: the tables, ``sweep.json`` and the privacy/utility picture of a sweep's results.

:func:`run_sweep` runs the cells (:func:`server.sweep.run_cells`) and then writes, into the sweep folder::

    sweep.json   the grid and, per cell: assignments, seed, run directory, status, the final
                 primary metric, the attack's headline and metric means, ε, seconds
    sweep.csv    the per-cell table
    sweep.md     the per-cell table (and, with several seeds, mean ± std over the seeds)
    privacy_utility.png

The tables are written also when a cell failed or Ctrl-C stopped the sweep (of what ran).

``privacy_utility.png`` puts one point per cell (the mean over seeds, with the
standard deviation as error bars) at x = the attack's success (its headline metric)
when the runs have an attack, else ε when they have differential privacy, else the
first grid key's value; y = the final primary metric. A cell without ε in a DP sweep
(``privacy.mechanism=none``) is a dashed horizontal line: ε = ∞.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.compare import attack_cells, attack_metric_names, finite_number, format_cell, markdown_table
from server.sweep import SEED_KEY, CellResult, Plan, Runner, SweepOutcome, run_cells

__all__ = ["XAxis", "cell_rows", "markdown_report", "plot_privacy_utility", "run_sweep", "seed_rows", "x_axis"]

SWEEP_FILES = ("sweep.json", "sweep.csv", "sweep.md", "privacy_utility.png")


def run_sweep(plan: Plan, folder: Path, runner: Runner) -> SweepOutcome:
    """:func:`server.sweep.run_cells` (same parameters), then sweep.json/csv/md and the plot of what ran, also
    after Ctrl-C; returns every cell's result, the files written and the Markdown tables."""
    return _write_outputs(plan, folder, run_cells(plan, folder, runner))


# --- tables ------------------------------------------------------------------------------------------------
def cell_rows(results: Sequence[CellResult]) -> list[dict[str, Any]]:
    """One row per cell that ran: its assignments (as typed), seed, status, final primary metric, ε (when a
    cell has one), the attack columns (when a cell has an attack), seconds and run directory."""
    ran = [result for result in results if result.status != "not run"]
    with_epsilon = any(result.epsilon is not None for result in ran)
    attacks = [result.attack for result in ran]
    attack_names = attack_metric_names(attacks)
    rows = []
    for result in ran:
        row: dict[str, Any] = {**result.cell.texts, SEED_KEY: result.cell.seed, "status": result.status,
                               "main metric": _metric_name(result), "final": result.main_value}
        if with_epsilon:
            row["ε"] = result.epsilon
        if any(attack is not None for attack in attacks):
            row.update(attack_cells(result.attack, attack_names))
        row["seconds"] = result.seconds
        row["run dir"] = result.cell.folder
        rows.append(row)
    return rows


def seed_rows(results: Sequence[CellResult]) -> list[dict[str, Any]]:
    """One row per cell over its seeds: the mean ± standard deviation (sample, n − 1) of the final primary
    metric, ε and the attack's metrics over the seeds that finished."""
    groups: dict[str, list[CellResult]] = {}
    for result in results:
        if result.status != "not run":
            groups.setdefault(result.cell.group, []).append(result)
    attack_names = attack_metric_names([result.attack for result in results])
    rows = []
    for members in groups.values():
        ok = [result for result in members if result.status == "ok"]
        row: dict[str, Any] = {**members[0].cell.texts, "seeds ok": f"{len(ok)}/{len(members)}",
                               "main metric": _metric_name(ok[0]) if ok else None,
                               "final": _mean_std([result.main_value for result in ok])}
        if any(result.epsilon is not None for result in results):
            row["ε"] = _mean_std([result.epsilon for result in ok])
        if any(result.attack is not None for result in results):
            row["attack value"] = _mean_std([result.attack.value if result.attack else None for result in ok])
            for name in attack_names:
                row[f"attack {name}"] = _mean_std([result.attack.metrics.get(name) if result.attack else None
                                                   for result in ok])
        row["seconds"] = _mean_std([result.seconds for result in ok])
        rows.append(row)
    return rows


def _metric_name(result: CellResult) -> str | None:
    return f"{result.main_phase} {result.main_metric}" if result.main_phase else None


def _mean_std(values: Sequence[float | None]) -> dict[str, float] | None:
    """``{"mean", "std", "n"}`` of the numbers in ``values`` (std 0 for one value), None when there are none."""
    numbers = [value for value in values if value is not None]
    if not numbers:
        return None
    return {"mean": statistics.fmean(numbers), "std": statistics.stdev(numbers) if len(numbers) > 1 else 0.0,
            "n": len(numbers)}


def _display(value: Any) -> Any:
    """A cell of a printed table: ``mean ± std`` for a mean over seeds."""
    if isinstance(value, dict) and "mean" in value:
        return f"{format_cell(value['mean'])} ± {format_cell(value['std'])}"
    return value


def markdown_report(plan: Plan, results: Sequence[CellResult]) -> str:
    """sweep.md: the per-cell table, the table over seeds (several seeds), and the failed cells' reasons."""
    rows = cell_rows(results)
    lines = [f"# Sweep of {plan.scenario_path}", "",
             f"{len(rows)} of {len(results)} cells ran; grid: "
             + (", ".join(f"{axis.key} ∈ {{{', '.join(axis.texts)}}}" for axis in plan.axes) or "none")
             + f"; seeds: {', '.join(str(seed) for seed in plan.seeds) if plan.seeds else 'the scenario seed'}", ""]
    lines.append(markdown_table(rows) if rows else "No cell ran.")
    if plan.seeds and len(plan.seeds) > 1 and rows:
        lines += ["", "## Mean ± std over seeds", "",
                  markdown_table([{key: _display(value) for key, value in row.items()} for row in seed_rows(results)])]
    failed = [result for result in results if result.status in ("failed", "interrupted")]
    if failed:
        lines += ["", "## Cells that did not finish", ""]
        lines += [f"- {result.cell.label}: {result.reason}" for result in failed]
    return "\n".join(lines) + "\n"


def _write_outputs(plan: Plan, folder: Path, results: list[CellResult]) -> SweepOutcome:
    outcome = SweepOutcome(results, markdown=markdown_report(plan, results))
    json_path, csv_path, md_path, plot_path = (folder / name for name in SWEEP_FILES)
    json_path.write_text(json.dumps(_sweep_json(plan, folder, results), indent=2, allow_nan=False) + "\n",
                         encoding="utf-8")
    csv_path.write_text(_csv(cell_rows(results)), encoding="utf-8")
    md_path.write_text(outcome.markdown, encoding="utf-8")
    outcome.files = [json_path, csv_path, md_path]
    if plot_privacy_utility(results, plot_path, first_key=plan.axes[0].key if plan.axes else None):
        outcome.files.append(plot_path)
    return outcome


def _sweep_json(plan: Plan, folder: Path, results: Sequence[CellResult]) -> dict[str, Any]:
    cells = []
    for result in results:
        attack = result.attack
        cells.append({
            "label": result.cell.label, "assignments": result.cell.values, "seed": result.cell.seed,
            "scenario_name": result.cell.scenario.name, "run_dir": result.cell.folder,
            "status": result.status, "reason": result.reason,
            "main_metric": result.main_metric, "main_phase": result.main_phase, "main_value": result.main_value,
            "epsilon": result.epsilon,
            "attack": None if attack is None else {"kind": attack.kind, "headline": attack.headline,
                                                   "value": attack.value, "metrics": attack.metrics,
                                                   "records": attack.records},
            "seconds": result.seconds,
        })
    return {
        "scenario": plan.scenario_path, "name": plan.base_name, "set": plan.overrides,
        "grid": {axis.key: list(axis.texts) for axis in plan.axes},
        "seeds": plan.seeds, "engine": plan.engine, "folder": str(folder),
        "cells": cells,
        "over_seeds": seed_rows(results) if plan.seeds and len(plan.seeds) > 1 else None,
    }


def _csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({key: "" if value is None else value for key, value in row.items()} for row in rows)
    return buffer.getvalue()


# --- the privacy-utility picture ------------------------------------------------------------------------
@dataclass(frozen=True)
class XAxis:
    """The x axis of ``privacy_utility.png``: its title, how to read a cell's x, and what a missing x means."""

    title: str
    read: Callable[[CellResult], Any]
    missing: str = ""


@dataclass
class _Point:
    label: str
    x: float | str | None
    y: float
    x_std: float = 0.0
    y_std: float = 0.0


def x_axis(results: Sequence[CellResult], first_key: str | None) -> XAxis:
    """The attack's success if a finished cell had an attack, else ε if one had DP, else the first grid key's
    value (a number, or the value as typed), else nothing to tell the cells apart (one category)."""
    ok = [result for result in results if result.status == "ok"]
    attacks = [result.attack for result in ok if result.attack is not None and result.attack.value is not None]
    if attacks:
        return XAxis(f"attack success: {attacks[0].kind} {attacks[0].headline} (mean over its records)",
                     lambda result: result.attack.value if result.attack is not None else None, "no attack")
    if any(result.epsilon is not None for result in ok):
        return XAxis("ε (privacy budget spent)", lambda result: result.epsilon, "no privacy: ε = ∞")
    if first_key is not None:
        def value(result: CellResult) -> Any:
            number = finite_number(result.cell.values[first_key])
            return number if number is not None else result.cell.texts[first_key]

        return XAxis(first_key, value)
    return XAxis("cells", lambda result: "all")


def _points(results: Sequence[CellResult], axis: XAxis) -> list[_Point]:
    """One point per cell over its seeds that finished: the means (and sample standard deviations) of x and y."""
    groups: dict[str, list[CellResult]] = {}
    for result in results:
        if result.status == "ok" and result.main_value is not None:
            groups.setdefault(result.cell.group, []).append(result)
    points = []
    for label, members in groups.items():
        y = _mean_std([member.main_value for member in members]) or {"mean": math.nan, "std": 0.0}
        xs = [axis.read(member) for member in members]
        x = _mean_std(xs) if all(isinstance(value, float) for value in xs) else None
        if x is not None:
            points.append(_Point(label, x["mean"], y["mean"], x["std"], y["std"]))
        else:  # a category (the value as typed), or missing where any seed lacks it
            points.append(_Point(label, None if None in xs else str(xs[0]), y["mean"], 0.0, y["std"]))
    return points


def plot_privacy_utility(results: Sequence[CellResult], path: Path, *, first_key: str | None) -> bool:
    """Draw ``privacy_utility.png``: the final primary metric (y) of each cell against :func:`x_axis`.

    Numbers are placed on a number line (log scale when they span a factor of 10 or more), other values side
    by side in grid order; a cell without an x (no ε: no privacy; no attack) is a dashed horizontal line.

    Returns
    -------
    bool
        False, and nothing drawn, when no cell finished with a primary metric.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axis = x_axis(results, first_key)
    points = _points(results, axis)
    if not points:
        return False
    fig = Figure(figsize=(7.5, 5.0), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    placed = [point for point in points if point.x is not None]
    numbers = [point.x for point in placed if isinstance(point.x, float)]
    numeric = len(numbers) == len(placed)
    categories = list(dict.fromkeys(str(point.x) for point in placed))
    for point in placed:
        x = point.x if numeric and isinstance(point.x, float) else categories.index(str(point.x))
        ax.errorbar([x], [point.y], xerr=[point.x_std] if numeric else None, yerr=[point.y_std], fmt="o", capsize=3)
        ax.annotate(point.label, (x, point.y), textcoords="offset points", xytext=(5, 5), fontsize=7)
    for point in points:
        if point.x is None:
            ax.axhline(point.y, linestyle="--", color="grey", label=f"{point.label} ({axis.missing})")
    if not numeric:
        ax.set_xticks(range(len(categories)), categories)
    elif numbers and min(numbers) > 0 and max(numbers) >= 10 * min(numbers):
        ax.set_xscale("log")
    if len(placed) < len(points):
        ax.legend(fontsize=7)
    ax.margins(x=0.15, y=0.1)  # room for the labels
    metrics = sorted({name for name in map(_metric_name, results) if name is not None})
    ax.set_xlabel(axis.title)
    ax.set_ylabel(f"{', '.join(metrics)} (final; mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.set_title("privacy / utility: one point per cell")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    finally:
        fig.clear()
    return True
