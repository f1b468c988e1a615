"""Side-by-side comparison of finished (or interrupted) runs: a table and curves.

    medfed compare runs/seg-iid/* runs/seg-iid-fedsgd/* [--target 0.7] [--out compare.png] [--markdown]

Each run directory is read as it is on disk (``scenario.yaml``, ``metrics.jsonl``,
``summary.json`` if the run finished). The table gives, per run, the final
primary metric of federated evaluation and of central evaluation, the best value,
wall time and bytes communicated; with ``--target`` also the first round and the
bytes (up + down) after which the run reached the target — the communication cost
that separates, e.g., FedSGD from FedAvg. The figure plots the primary metric
against rounds and against cumulative megabytes, and the training loss.

Runs with an attack (an ``attack`` block in ``summary.json`` and ``"phase": "attack"``
records in ``metrics.jsonl``) also get the attack's kind, its headline (success)
metric and value, and the mean of each attack metric beside the primary metric, and
a fourth panel: the headline metric against rounds (mean over a round's records).
Runs without an attack show exactly what they showed before.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medtasks.registry import get_task_class
from server.results import RunDirectory, RunDirectoryError

MEGABYTE = 1e6
ATTACK_PHASE = "attack"


class CompareError(ValueError):
    """Runs that cannot be compared (not run directories, different primary metrics); one line."""


@dataclass(frozen=True)
class AttackResult:
    """The ``attack`` block of a run's ``summary.json``: which attack ran and how well it did.

    Attributes
    ----------
    kind : str
        The attack (e.g. ``"idlg"``).
    headline : str
        The name of its success metric (e.g. ``"psnr"``).
    metrics : dict[str, float | None]
        The mean of each attack metric over the run's attack records (``None``: no finite value).
    records : int
        How many attack records the means are over.
    """

    kind: str
    headline: str
    metrics: dict[str, float | None] = field(default_factory=dict)
    records: int = 0

    @property
    def value(self) -> float | None:
        """The headline metric's mean (the attack's success)."""
        return self.metrics.get(self.headline)

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any] | None) -> AttackResult | None:
        """The attack block of ``summary`` (a ``summary.json`` mapping), or ``None`` when the run had no attack."""
        block = (summary or {}).get("attack")
        if not isinstance(block, Mapping):
            return None
        metrics = block.get("metrics")
        metrics = metrics if isinstance(metrics, Mapping) else {}
        return cls(kind=str(block.get("kind")), headline=str(block.get("headline")),
                   metrics={str(name): finite_number(value) for name, value in metrics.items()},
                   records=int(block.get("records") or 0))


def attack_metric_names(attacks: Sequence[AttackResult | None]) -> list[str]:
    """Every attack metric of ``attacks``, in first-seen order (the attack columns of a table)."""
    names: dict[str, None] = {}
    for attack in attacks:
        names.update(dict.fromkeys(attack.metrics if attack is not None else ()))
    return list(names)


def attack_cells(attack: AttackResult | None, metric_names: Sequence[str]) -> dict[str, Any]:
    """The attack columns of one table row: kind, headline metric and value, then each metric's mean."""
    metrics = attack.metrics if attack is not None else {}
    return {
        "attack": attack.kind if attack is not None else None,
        "attack headline": attack.headline if attack is not None else None,
        "attack value": attack.value if attack is not None else None,
        **{f"attack {name}": metrics.get(name) for name in metric_names},
    }


def finite_number(value: Any) -> float | None:
    """``value`` as a float if it is a finite number (not a bool), else ``None`` (missing, NaN, ±inf)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


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
    attack: AttackResult | None = None  # None: the run had no attack (or did not finish)

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

    def attack_curve(self) -> dict[int, float]:
        """Round → the attack's headline metric, the mean over that round's attack records (finite values only).

        ``{}`` when the run has no attack block.
        """
        if self.attack is None:
            return {}
        per_round: dict[int, list[float]] = {}
        for record in self.records:
            if record.get("phase") != ATTACK_PHASE:
                continue
            value = finite_number((record.get("metrics") or {}).get(self.attack.headline))
            if value is not None:
                per_round.setdefault(int(record["round"]), []).append(value)
        return {server_round: sum(values) / len(values) for server_round, values in sorted(per_round.items())}

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
        attack=AttackResult.from_summary(summary),
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
    """One row per run: final and best primary metric, the attack (when a run has one), time, traffic (and the
    cost to reach ``target``)."""
    rows = []
    attacked = any(run.attack is not None for run in runs)
    attack_names = attack_metric_names([run.attack for run in runs])
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
            **(attack_cells(run.attack, attack_names) if attacked else {}),
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
    """Primary metric vs round and vs cumulative MB (central solid, evaluate dashed), and train loss; with
    attacks, a fourth panel: each attack's headline metric vs round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = runs[0].primary
    attacked = any(run.attack_curve() for run in runs)
    panels = 4 if attacked else 3
    fig, axes = plt.subplots(1, panels, figsize=(16 * panels / 3, 4.5))
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
        attack = run.attack_curve()
        if attack and run.attack is not None:
            axes[3].plot(sorted(attack), [attack[r] for r in sorted(attack)], "o-", color=colour,
                         label=f"{run.label} ({run.attack.kind} {run.attack.headline})")
    labels = [(axes[0], "round", primary), (axes[1], "MB communicated (up + down)", primary),
              (axes[2], "round", "train loss")]
    if attacked:
        labels.append((axes[3], "round", "attack headline metric (round mean)"))
        axes[3].legend(fontsize=7)
    for ax, xlabel, ylabel in labels:
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
