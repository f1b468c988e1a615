"""Side-by-side comparison of finished (or interrupted) runs: a table and curves.

    medfed compare runs/seg-iid/* runs/seg-iid-fedsgd/* [--target 0.7] [--out FILE|DIR] [--markdown]

Each run directory is read as it is on disk (``scenario.yaml``, ``metrics.jsonl``,
``summary.json`` if the run finished); files among the paths (a ``compare.png`` a glob
caught) are skipped with a warning. Every run is labelled with its scenario name and, where
several runs share that name, the settings of ``scenario.yaml`` that tell them apart
(:func:`label_runs`): ``tabular-dp | privacy.params.target_epsilon=4``.

The table gives, per run, the last completed round (:func:`completed_rounds`: a round
interrupted or failed half-way does not count), the final primary metric of federated
evaluation and of central evaluation, the best value, the run's ε where any run has
differential privacy, wall time and bytes communicated; with ``--target`` also the first
round and the bytes (up + down) after which the run reached the target — the
communication cost that separates, e.g., FedSGD from FedAvg. "Best" and "reached" use one
evaluation for every run (:func:`evaluation_phase`): central when every run has it, else
federated; the column headers and :func:`evaluation_note` say which. The figure plots the
primary metric against rounds and against cumulative megabytes, and the training loss;
without ``--out`` it goes next to the runs (:func:`figure_path`).

Runs with an attack (an ``attack`` block in ``summary.json`` and ``"phase": "attack"``
records in ``metrics.jsonl``) also get the attack's kind, its headline (success)
metric and value, and the mean of each attack metric beside the primary metric, and
a fourth panel: the headline metric against rounds (mean over a round's records).
Runs without an attack show exactly what they showed before.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medtasks.registry import get_task_class
from server.results import RunDirectory, RunDirectoryError

MEGABYTE = 1e6
ATTACK_PHASE = "attack"
TRAIN_PHASE = "train"
EVALUATION_PHASES = {"central": "central", "evaluate": "federated"}  # phase in metrics.jsonl → its name here
EVALUATION_SETS = {"central": "the server's test set",
                   "evaluate": "the sites' validation splits, weighted by their examples"}
FIGURE_NAME = "compare.png"
LABEL_SETTINGS = 3  # settings shown in a run's label; the rest are counted ("+2 more")
LABEL_VALUE_CHARS = 24  # a longer setting value is cut (…)
UNLABELLED_SETTINGS = frozenset({"name", "description", "output.dir"})  # never what tells runs apart

log = logging.getLogger("medfed")


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


# --- which rounds count --------------------------------------------------------------------------------
def is_evaluation_round(server_round: int, *, rounds: int, evaluate_every: int) -> bool:
    """Whether the scenario evaluates after ``server_round``: every ``strategy.evaluate_every`` rounds and
    after the last round (``strategy.rounds``), as :meth:`server.federation.Federation.run_round` does."""
    return server_round % evaluate_every == 0 or server_round == rounds


def completed_rounds(records: Sequence[Mapping[str, Any]], *, rounds: int, evaluate_every: int) -> list[int]:
    """The rounds of ``records`` (a run's ``metrics.jsonl``) that the run completed, in order.

    A round is *completed* when every phase the run's scenario schedules for it has a record and none of
    those records failed. The schedule: ``train`` in every round and, in an evaluation round
    (:func:`is_evaluation_round`), each evaluation phase the run records at all (``evaluate`` where the
    strategy sends evaluation messages, ``central`` where the server has a test set). A phase *failed*
    when its record has no aggregate: every reply failed, or the run stopped in it (e.g. a spent privacy
    budget). Attack records are not part of the schedule. A run stopped in its first evaluation round
    before writing any evaluation record cannot show that it evaluates; its rounds count by their train
    records alone.

    Parameters
    ----------
    records : Sequence[Mapping[str, Any]]
        The run's records, as :meth:`server.results.RunDirectory.read_metrics` returns them.
    rounds : int
        The scenario's ``strategy.rounds``.
    evaluate_every : int
        The scenario's ``strategy.evaluate_every``.

    Returns
    -------
    list[int]
        The completed rounds, ascending.
    """
    recorded: dict[int, dict[str, bool]] = {}  # round → phase → it has an aggregate
    for record in records:
        phase = record.get("phase")
        if phase == TRAIN_PHASE or phase in EVALUATION_PHASES:
            phases = recorded.setdefault(int(record["round"]), {})
            phases[str(phase)] = phases.get(str(phase), True) and bool(record.get("aggregate"))
    evaluations = {phase for phases in recorded.values() for phase in phases if phase in EVALUATION_PHASES}
    completed = []
    for server_round, phases in sorted(recorded.items()):
        scheduled = {TRAIN_PHASE}
        if is_evaluation_round(server_round, rounds=rounds, evaluate_every=evaluate_every):
            scheduled |= evaluations
        if all(phases.get(phase, False) for phase in scheduled):
            completed.append(server_round)
    return completed


def run_epsilon(summary: Mapping[str, Any] | None, records: Sequence[Mapping[str, Any]]) -> float | None:
    """The run's final ε: its ``summary.json`` privacy block's, else the last ``metrics.jsonl`` record's.

    ``None`` without differential privacy. ε counts every training the run did, the rounds it did not
    complete included: that privacy was spent.
    """
    privacy = (summary or {}).get("privacy")
    final = finite_number(privacy.get("epsilon")) if isinstance(privacy, Mapping) else None
    if final is not None:
        return final
    stamped = [value for record in records if (value := finite_number(record.get("epsilon"))) is not None]
    return stamped[-1] if stamped else None


# --- one run ---------------------------------------------------------------------------------------------
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
    settings: dict[str, Any] = field(default_factory=dict)  # scenario.yaml flattened (:func:`flatten_settings`)
    completed: list[int] = field(default_factory=list)  # :func:`completed_rounds`
    epsilon: float | None = None  # None: no differential privacy

    def curve(self, phase: str, metric: str) -> dict[int, float]:
        """Completed round → aggregate ``metric`` of ``phase`` (finite values only)."""
        completed = set(self.completed)
        values = {}
        for record in self.records:
            value = (record.get("aggregate") or {}).get(metric) if record.get("phase") == phase else None
            if isinstance(value, (int, float)) and math.isfinite(value) and int(record["round"]) in completed:
                values[int(record["round"])] = float(value)
        return values

    def megabytes_after(self) -> dict[int, float]:
        """Round → megabytes sent up + down from the start up to the end of that round (every record: the bytes
        of a round the run did not complete were sent all the same)."""
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
        summary = run_dir.read_summary()
    except (RunDirectoryError, OSError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise CompareError(f"{path}: not a readable run directory ({error})") from None
    task_class = get_task_class(scenario["task"]["name"])
    strategy = scenario["strategy"]
    return RunView(
        path=run_dir.path,
        name=scenario["name"],
        strategy=strategy["name"],
        partition=scenario["partition"]["kind"],
        clients=int(scenario["partition"]["clients"]),
        primary=task_class.primary_metric,
        higher_is_better=task_class.higher_is_better,
        records=records,
        seconds=float(summary["seconds"]) if summary else None,
        attack=AttackResult.from_summary(summary),
        settings=flatten_settings(scenario),
        completed=completed_rounds(records, rounds=int(strategy["rounds"]),
                                   evaluate_every=int(strategy.get("evaluate_every") or 1)),
        epsilon=run_epsilon(summary, records),
    )


def run_directories(paths: Iterable[str | Path]) -> list[Path]:
    """``paths`` without the files among them (a run is a directory; ``runs/x/*`` also catches the
    ``compare.png`` drawn next to the runs), each skipped file named in a warning."""
    given = [Path(path) for path in paths]
    files = [path for path in given if path.is_file()]
    if files:
        log.warning("skipped (files, not run directories): %s", ", ".join(map(str, files)))
    return [path for path in given if path not in files]


def load_runs(paths: Iterable[str | Path]) -> list[RunView]:
    """Read several runs (files among ``paths`` skipped) and label them (:func:`label_runs`).

    Raises
    ------
    CompareError
        no runs, an unreadable run, or runs with different primary metrics.
    """
    runs = [load_run(path) for path in run_directories(paths)]
    if not runs:
        raise CompareError("no run directories given")
    metrics = {run.primary for run in runs}
    if len(metrics) > 1:
        raise CompareError(f"runs have different primary metrics ({', '.join(sorted(metrics))}); compare runs of one task")
    label_runs(runs)
    return runs


# --- labels ----------------------------------------------------------------------------------------------
def flatten_settings(section: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A scenario (or one of its sections) as key path → value, in the file's order: ``{"local": {"lr": 0.1}}``
    becomes ``{"local.lr": 0.1}``; lists are values, an empty mapping is ``{}``."""
    flat: dict[str, Any] = {}
    for key, value in section.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_settings(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def distinguishing_keys(settings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The key paths whose values differ between ``settings`` (a missing key differs from any value), in
    first-seen order, :data:`UNLABELLED_SETTINGS` left out."""
    keys = dict.fromkeys(key for flat in settings for key in flat if key not in UNLABELLED_SETTINGS)
    return [key for key in keys if len({_setting_text(flat.get(key, _UNSET)) for flat in settings}) > 1]


_UNSET = object()  # a key a run's scenario lacks


def _setting_text(value: Any) -> str:
    """A setting's value as a label shows it: strings as they are, the rest as JSON (``null``, ``true``, ``[1,2]``),
    cut to :data:`LABEL_VALUE_CHARS`; ``unset`` for a key the run's scenario lacks."""
    if value is _UNSET:
        return "unset"
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= LABEL_VALUE_CHARS else text[:LABEL_VALUE_CHARS - 1] + "…"


def settings_label(name: str, settings: Mapping[str, Any], keys: Sequence[str]) -> str:
    """``name | key=value, ...``: the first :data:`LABEL_SETTINGS` of ``keys`` with this run's values, then
    ``+N more``; just ``name`` without keys."""
    if not keys:
        return name
    shown = ", ".join(f"{key}={_setting_text(settings.get(key, _UNSET))}" for key in keys[:LABEL_SETTINGS])
    more = f" +{len(keys) - LABEL_SETTINGS} more" if len(keys) > LABEL_SETTINGS else ""
    return f"{name} | {shown}{more}"


def label_runs(runs: Sequence[RunView]) -> None:
    """Give each run a label that tells it apart: the scenario name and, among the runs that share that name,
    the settings whose values differ (:func:`distinguishing_keys`); where two labels are still equal, the
    run directory's name after the scenario name (``quadratic-fedavg@20250101-120000``)."""
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for run in runs:
        groups.setdefault(run.name, []).append(run.settings)
    keys = {name: distinguishing_keys(group) for name, group in groups.items()}
    labels = [settings_label(run.name, run.settings, keys[run.name]) for run in runs]
    for run, label in zip(runs, labels):
        name = run.name if labels.count(label) == 1 else f"{run.name}@{run.path.name}"
        run.label = settings_label(name, run.settings, keys[run.name])


# --- the table -------------------------------------------------------------------------------------------
def evaluation_phase(runs: Sequence[RunView]) -> str:
    """The evaluation that "best" and "reached" use for every run: ``central`` (the server's test set) when
    every run has central evaluation of the primary metric, else ``evaluate`` (federated: per site, weighted)."""
    return "central" if all(run.curve("central", run.primary) for run in runs) else "evaluate"


def evaluation_note(runs: Sequence[RunView], target: float | None = None) -> str:
    """One line that says which evaluation the best (and reached) columns use, and why."""
    phase = evaluation_phase(runs)
    columns = "best" if target is None else f"best, rounds to {target:g} and MB to {target:g}"
    verb = "uses" if target is None else "use"
    used = f"{columns} {verb} {EVALUATION_PHASES[phase]} evaluation ({EVALUATION_SETS[phase]})"
    if phase == "central":
        return f"{used}: every run has it"
    without = [run.label for run in runs if not run.curve("central", run.primary)]
    return f"{used}: no central evaluation in {', '.join(without)}"


def _reached(run: RunView, phase: str, target: float) -> int | None:
    """First completed round whose ``phase`` primary metric reaches ``target`` (≥, or ≤ when lower is better)."""
    for server_round, value in sorted(run.curve(phase, run.primary).items()):
        if (value >= target) if run.higher_is_better else (value <= target):
            return server_round
    return None


def comparison_rows(runs: list[RunView], target: float | None = None) -> list[dict[str, Any]]:
    """One row per run: last completed round, final and best primary metric, ε (when a run has it), the attack
    (when a run has one), time, traffic (and the cost to reach ``target``); best and reached by
    :func:`evaluation_phase`, named in their headers (``best (central)``)."""
    rows = []
    attacked = any(run.attack is not None for run in runs)
    private = any(run.epsilon is not None for run in runs)
    attack_names = attack_metric_names([run.attack for run in runs])
    phase = evaluation_phase(runs)
    which = f"({EVALUATION_PHASES[phase]})"
    for run in runs:
        evaluate, central = run.curve("evaluate", run.primary), run.curve("central", run.primary)
        headline = run.curve(phase, run.primary)
        best_round = None
        if headline:
            pick = max if run.higher_is_better else min
            best_round = pick(sorted(headline), key=lambda r: headline[r])
        megabytes = run.megabytes_after()
        row = {
            "run": run.label,
            "strategy": run.strategy,
            "partition": f"{run.partition} × {run.clients}",
            "rounds": max(run.completed, default=0),
            f"evaluate {run.primary}": evaluate[max(evaluate)] if evaluate else None,
            f"central {run.primary}": central[max(central)] if central else None,
            f"best {which}": f"{headline[best_round]:.4g} (r{best_round})" if best_round is not None else None,
            **({"epsilon": run.epsilon} if private else {}),
            **(attack_cells(run.attack, attack_names) if attacked else {}),
            "MB": megabytes[max(megabytes)] if megabytes else 0.0,
            "seconds": run.seconds,
        }
        if target is not None:
            reached = _reached(run, phase, target)
            row[f"rounds to {target:g} {which}"] = reached
            row[f"MB to {target:g} {which}"] = megabytes.get(reached) if reached is not None else None
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


def print_table(rows: list[dict[str, Any]], title: str) -> None:
    """Print the rows as a terminal table, each cell on one line: at least 120 characters wide (or the terminal's
    width), wider where the cells need it — a label cut short ("quadratic-fed…") could not tell runs apart."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(*(format_cell(value) for value in row.values()))
    console = Console(width=max(120, Console().width))
    natural = console.measure(table, options=console.options.update_width(10_000)).maximum
    Console(width=max(console.width, natural)).print(table)


# --- the figure ------------------------------------------------------------------------------------------
def figure_path(out: str | Path | None, run_paths: Sequence[Path]) -> Path:
    """Where the figure goes, its folder created: ``out`` when it names a file; inside ``out`` (as
    :data:`FIGURE_NAME`) when it is a directory or has no suffix; without ``out``, next to the runs (in the
    deepest folder that holds every run directory), never the working directory unless it is that folder.

    Raises
    ------
    CompareError
        ``out``'s suffix is not a format matplotlib writes, or its folder cannot be created or written to.
    """
    if out is None:
        path = Path(os.path.commonpath([run_path.resolve().parent for run_path in run_paths])) / FIGURE_NAME
    else:
        path = Path(out)
        path = path / FIGURE_NAME if path.is_dir() or not path.suffix else path
    _check_format(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CompareError(f"cannot create {path.parent} for the figure ({error.strerror}); choose --out FILE|DIR") from None
    if not os.access(path.parent, os.W_OK):
        raise CompareError(f"cannot write the figure into {path.parent} (no permission); choose --out FILE|DIR")
    return path


def _check_format(path: Path) -> None:
    """Refuse a figure path whose suffix matplotlib cannot write (one line, the formats it can)."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in formats:
        raise CompareError(f"--out {path}: {path.suffix!r} is not a figure format ({', '.join(sorted(formats))}); "
                           "give FILE.png or a DIR")


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
