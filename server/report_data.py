"""What ``medfed report`` (:mod:`server.report`) reads of a run directory, and the curves, units and
baselines it draws from ``metrics.jsonl``.

A metric is read against its baseline: for CT the filtered back-projection's own value of the metric
(``<metric>_fbp`` in the records, per round), for an AUC chance (0.5), for accuracy and balanced accuracy
chance (1 / number of classes).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from server.compare import finite_number
from server.report_figures import Baseline
from server.results import PLOTS_DIR, RunDirectory, RunDirectoryError

__all__ = ["BOOKKEEPING", "ReportError", "RunFiles", "aggregate_curve", "axis_label", "baselines", "described_sites", "evaluation_metrics",
           "num_classes", "read_run", "site_curves"]

BOOKKEEPING = frozenset({"num-examples", "seconds", "steps", "participations", "epsilon", "noise-multiplier"})
FBP_SUFFIX = "_fbp"  # CT: the same metric of the filtered back-projection, the baseline the network must beat


class ReportError(ValueError):
    """A path that is not a readable run directory, or a report that cannot be written; one line."""


@dataclass
class RunFiles:
    """What a report reads of one run directory."""

    path: Path
    scenario: dict[str, Any]
    scenario_text: str
    partitions: dict[str, Any]
    records: list[dict[str, Any]]
    summary: dict[str, Any] | None  # None: the run did not finish
    primary: str
    units: dict[str, str] = field(default_factory=dict)  # metric → unit (:func:`server.plots.metric_units`)

    @property
    def plots(self) -> Path:
        return self.path / PLOTS_DIR

    @property
    def private(self) -> bool:
        return (self.scenario.get("privacy") or {}).get("mechanism", "none") != "none"


def read_run(path: str | Path) -> RunFiles:
    """Read the files of one run directory.

    Raises
    ------
    ReportError
        ``path`` is not a run directory, or one of its files cannot be read.
    """
    try:
        run_dir = RunDirectory.open(path)
        scenario_text = run_dir.read_scenario_text()
        scenario = yaml.safe_load(scenario_text)
        files = RunFiles(run_dir.path, scenario, scenario_text, run_dir.read_partitions(), run_dir.read_metrics(),
                         run_dir.read_summary(), primary="")
    except (RunDirectoryError, OSError, yaml.YAMLError, json.JSONDecodeError) as error:
        raise ReportError(f"{path}: not a readable run directory ({error})") from None
    if not isinstance(scenario, dict):
        raise ReportError(f"{path}: its scenario.yaml is not a scenario")
    files.primary, files.units = _task_facts(files)
    return files


def described_sites(run: RunFiles) -> dict[str, dict[str, Any]]:
    """Partition id → the site's statistics in ``partitions.json`` (every site, or above 1,000 the sampled ones)."""
    return dict((run.partitions.get("clients") or {}).items())


def _task_facts(run: RunFiles) -> tuple[str, dict[str, str]]:
    """The task's primary metric and its metrics' units; for a task that cannot be imported here, the
    primary metric ``summary.json`` names and the units every task shares."""
    from medtasks.registry import get_task_class
    from server.plots import metric_units

    try:
        task_class = get_task_class(str(run.scenario["task"]["name"]))
    except Exception:  # a user's task module missing on this machine: the report still shows the rest
        return str(((run.summary or {}).get("best") or {}).get("metric") or "loss"), metric_units(None)
    return task_class.primary_metric, metric_units(task_class)


# --- curves from metrics.jsonl -----------------------------------------------------------------------------
def site_curves(records: Sequence[Mapping[str, Any]], phase: str, metric: str) -> dict[str, dict[int, float]]:
    """Site → round → ``metric`` of ``phase`` (finite numbers only; a later record of a round wins)."""
    curves: dict[str, dict[int, float]] = {}
    for record in records:
        if record.get("phase") == phase:
            for site, metrics in (record.get("clients") or {}).items():
                value = finite_number((metrics or {}).get(metric))
                if value is not None:
                    curves.setdefault(str(site), {})[int(record["round"])] = value
    return curves


def aggregate_curve(records: Sequence[Mapping[str, Any]], phase: str, metric: str) -> dict[int, float]:
    """Round → aggregate ``metric`` of ``phase`` (``metric`` ``"epsilon"``: the record's own ε)."""
    curve = {}
    for record in records:
        if record.get("phase") == phase:
            value = finite_number(record.get("epsilon") if metric == "epsilon"
                                  else (record.get("aggregate") or {}).get(metric))
            if value is not None:
                curve[int(record["round"])] = value
    return curve


def evaluation_metrics(run: RunFiles) -> list[str]:
    """The metrics of federated and central evaluation, the primary one first, bookkeeping and FBP
    baselines left out."""
    names: dict[str, None] = {run.primary: None}
    for record in run.records:
        if record.get("phase") in ("evaluate", "central"):
            names.update(dict.fromkeys(record.get("aggregate") or {}))
    return [name for name in names if name not in BOOKKEEPING and not name.endswith(FBP_SUFFIX)
            and (aggregate_curve(run.records, "evaluate", name) or aggregate_curve(run.records, "central", name))]


def axis_label(run: RunFiles, metric: str) -> str:
    """``metric (unit)`` with the unit the task declares (dB, HU, px), or the bare name."""
    from server.plots import axis_label as labelled

    return labelled(metric, run.units)


def num_classes(run: RunFiles) -> int | None:
    """The task's classes: ``task.params.num_classes``, else the length of a site's label histogram."""
    configured = ((run.scenario.get("task") or {}).get("params") or {}).get("num_classes")
    if isinstance(configured, int):
        return configured
    lengths = [len(site.get("label_histogram") or []) for site in described_sites(run).values()]
    return max(lengths) if lengths and max(lengths) > 1 else None


def baselines(run: RunFiles, metric: str) -> list[Baseline]:
    """What ``metric`` is read against: FBP's value (CT), chance for AUC and for accuracy."""
    found = [Baseline(f"FBP ({name})", curve=curve) for phase, name in (("evaluate", "federated"), ("central", "central"))
             if (curve := aggregate_curve(run.records, phase, metric + FBP_SUFFIX))]
    if metric == "auc" or metric.endswith("_auc"):
        found.append(Baseline("chance (0.5)", value=0.5))
    classes = num_classes(run)
    if metric in ("accuracy", "balanced_accuracy") and classes:
        found.append(Baseline(f"chance (1/{classes})", value=1 / classes))
    return found
