"""Side-by-side comparison of finished (or interrupted) runs: a table and curves.

    medfed compare runs/seg-iid/* runs/seg-iid-fedsgd/* [--target 0.7] [--out compare.png] [--markdown]

Each run directory is read as it is on disk (``scenario.yaml``, ``metrics.jsonl``,
``summary.json`` if the run finished). The table gives, per run, the final
primary metric of federated evaluation and of central evaluation, the best value,
wall time and bytes communicated; with ``--target`` also the first round and the
bytes (up + down) after which the run reached the target — the communication cost
that separates, e.g., FedSGD from FedAvg. The figure plots the primary metric
against rounds and against cumulative megabytes, and the training loss.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from medtasks.registry import get_task_class
from server.results import RunDirectory, RunDirectoryError

MEGABYTE = 1e6


class CompareError(ValueError):
    """Runs that cannot be compared (not run directories, different primary metrics); one line."""


@dataclass
class RunView:
    """What the comparison needs of one run directory."""

    path: Path
    name: str
    strategy: str
    partition: str
    clients: int
    primary: str
    higher_is_better: bool
    records: list[dict]
    seconds: float | None  # None: the run did not finish (no summary.json)
    label: str = ""

    def curve(self, phase: str, metric: str) -> dict[int, float]:
        """Round → aggregate ``metric`` of ``phase`` (finite values only)."""
        values = {}
        for record in self.records:
            value = (record.get("aggregate") or {}).get(metric) if record.get("phase") == phase else None
            if isinstance(value, (int, float)) and math.isfinite(value):
                values[int(record["round"])] = float(value)
        return values

    def megabytes_after(self) -> dict[int, float]:
        """Round → megabytes sent up + down from the start up to the end of that round."""
        per_round: dict[int, int] = {}
        for record in self.records:
            per_round[int(record["round"])] = (per_round.get(int(record["round"]), 0)
                                               + int(record.get("bytes_up") or 0) + int(record.get("bytes_down") or 0))
        total, cumulative = 0, {}
        for server_round in sorted(per_round):
            total += per_round[server_round]
            cumulative[server_round] = total / MEGABYTE
        return cumulative

    @property
    def headline_phase(self) -> str:
        """``central`` when the run has central evaluation of the primary metric, else ``evaluate``."""
        return "central" if self.curve("central", self.primary) else "evaluate"


def load_run(path: str | Path) -> RunView:
    """Read one run directory.

    Raises
    ------
    CompareError
        ``path`` is not a run directory or its files cannot be read.
    """
    try:
        run_dir = RunDirectory.open(path)
        scenario = yaml.safe_load(run_dir.read_scenario_text())
        records = run_dir.read_metrics()
    except (RunDirectoryError, OSError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise CompareError(f"{path}: not a readable run directory ({error})") from None
    summary_path = run_dir.path / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    task_class = get_task_class(scenario["task"]["name"])
    return RunView(
        path=run_dir.path,
        name=scenario["name"],
        strategy=scenario["strategy"]["name"],
        partition=scenario["partition"]["kind"],
        clients=int(scenario["partition"]["clients"]),
        primary=task_class.primary_metric,
        higher_is_better=task_class.higher_is_better,
        records=records,
        seconds=float(summary["seconds"]) if summary else None,
    )


def load_runs(paths: Iterable[str | Path]) -> list[RunView]:
    """Read several runs and label them (scenario name, plus the folder name where names repeat).

    Raises
    ------
    CompareError
        no runs, an unreadable run, or runs with different primary metrics.
    """
    runs = [load_run(path) for path in paths]
    if not runs:
        raise CompareError("no run directories given")
    metrics = {run.primary for run in runs}
    if len(metrics) > 1:
        raise CompareError(f"runs have different primary metrics ({', '.join(sorted(metrics))}); compare runs of one task")
    names = [run.name for run in runs]
    for run in runs:
        run.label = run.name if names.count(run.name) == 1 else f"{run.name}@{run.path.name}"
    return runs


def _reached(run: RunView, target: float) -> int | None:
    """First round whose headline primary metric reaches ``target`` (≥, or ≤ when lower is better)."""
    for server_round, value in sorted(run.curve(run.headline_phase, run.primary).items()):
        if (value >= target) if run.higher_is_better else (value <= target):
            return server_round
    return None


def comparison_rows(runs: list[RunView], target: float | None = None) -> list[dict[str, Any]]:
    """One row per run: final and best primary metric, time, traffic (and the cost to reach ``target``)."""
    rows = []
    for run in runs:
        evaluate, central = run.curve("evaluate", run.primary), run.curve("central", run.primary)
        headline = central or evaluate
        best_round = None
        if headline:
            pick = max if run.higher_is_better else min
            best_round = pick(sorted(headline), key=lambda r: headline[r])
        megabytes = run.megabytes_after()
        row = {
            "run": run.label,
            "strategy": run.strategy,
            "partition": f"{run.partition} × {run.clients}",
            "rounds": max((int(r["round"]) for r in run.records), default=0),
            f"evaluate {run.primary}": evaluate[max(evaluate)] if evaluate else None,
            f"central {run.primary}": central[max(central)] if central else None,
            "best": f"{headline[best_round]:.4g} (r{best_round})" if best_round is not None else None,
            "MB": megabytes[max(megabytes)] if megabytes else 0.0,
            "seconds": run.seconds,
        }
        if target is not None:
            reached = _reached(run, target)
            row[f"rounds to {target:g}"] = reached
            row[f"MB to {target:g}"] = megabytes.get(reached) if reached is not None else None
        rows.append(row)
    return rows


def format_cell(value: Any) -> str:
    """A table cell: 4 significant digits, an em dash for missing values."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table (for a README or a lab notebook)."""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(format_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def plot_comparison(runs: list[RunView], path: Path) -> Path:
    """Primary metric vs round and vs cumulative MB (central solid, evaluate dashed), and train loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = runs[0].primary
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        colour = colours[index % len(colours)]
        megabytes = run.megabytes_after()
        for phase, style in (("central", "-"), ("evaluate", "--")):
            values = run.curve(phase, primary)
            if not values:
                continue
            rounds = sorted(values)
            label = f"{run.label} ({phase})"
            axes[0].plot(rounds, [values[r] for r in rounds], style, color=colour, label=label)
            axes[1].plot([megabytes[r] for r in rounds], [values[r] for r in rounds], style, color=colour, label=label)
        loss = run.curve("train", "loss")
        axes[2].plot(sorted(loss), [loss[r] for r in sorted(loss)], color=colour, label=run.label)
    for ax, xlabel, ylabel in ((axes[0], "round", primary), (axes[1], "MB communicated (up + down)", primary),
                               (axes[2], "round", "train loss")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{primary}: central (solid) and federated evaluation (dashed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
