"""Metric curves from ``metrics.jsonl`` records, as PNG files.

matplotlib is imported lazily and used through its object API (``Figure`` +
Agg canvas), never through pyplot: no global backend switch, no figure
registry to leak from.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["DATASETS", "METRIC_UNITS", "axis_label", "metric_figures", "metric_units", "phase_title",
           "plot_metric_curves"]

METRIC_UNITS: dict[str, str] = {"psnr": "dB", "rmse_hu": "HU", "hd95": "px", "loss": "", "epsilon": ""}
"""Units of common metrics, for metrics whose task does not name them (a task's ``metric_units`` wins)."""
DATASETS: dict[str, str] = {
    "train": "sites' training splits",
    "evaluate": "sites' validation splits",
    "central": "server test set",
}
"""The data each phase's metrics are measured on, for titles."""
_BASELINES = {"fbp": "FBP"}  # an aggregate "<metric>_<key>" is a reference method's value, drawn dashed
_PHASES = ("train", "evaluate", "central")
_SKIPPED_METRICS = frozenset({"num-examples", "seconds", "steps", "participations"})  # bookkeeping, not quality
_MAX_LEGEND_CLIENTS = 10
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_DPI = 100
_PANEL_WIDTH = 6.0  # inches
_PANEL_HEIGHT = 4.5


@dataclass
class _PhaseSeries:
    """One phase's values: ``metric -> round -> value`` (NaN where missing)."""

    aggregate: dict[str, dict[int, float]] = field(default_factory=dict)
    clients: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)

    def has_data(self, metric: str) -> bool:
        series = [self.aggregate.get(metric, {}), *self.clients.get(metric, {}).values()]
        return any(_has_values(s) for s in series)

    def aggregate_of(self, metric: str) -> dict[int, float]:
        return self.aggregate.get(metric, {})

    def baselines_of(self, metric: str) -> list[tuple[str, dict[int, float]]]:
        """``(name, values)`` of each reference method recorded beside ``metric`` (e.g. ``psnr_fbp``)."""
        return [(name, values) for key, name in _BASELINES.items()
                if _has_values(values := self.aggregate_of(f"{metric}_{key}"))]


def metric_units(task: object) -> dict[str, str]:
    """Metric → unit: :data:`METRIC_UNITS`, overridden by the task's optional ``metric_units`` class attribute."""
    return {**METRIC_UNITS, **getattr(task, "metric_units", {})}


def axis_label(metric: str, units: Mapping[str, str]) -> str:
    """``metric (unit)``, or the bare name of a unitless metric.

    A metric without an entry takes the unit of its first ``_``-separated part (``psnr_fbp`` → ``psnr``'s dB).
    """
    unit = units.get(metric, units.get(metric.split("_", 1)[0], ""))
    return f"{metric} ({unit})" if unit else metric


def phase_title(title: str, phase: str, metric: str) -> str:
    """``title — phase metric (the data it is measured on)``, e.g. ``quickstart — central dice (server test set)``."""
    data = DATASETS.get(phase)
    return _join(title, f"{phase} {metric}" + (f" ({data})" if data else ""))


def plot_metric_curves(records: list[dict], out_dir: Path, *, primary_metric: str, title: str = "",
                       units: Mapping[str, str] | None = None, target_epsilon: float | None = None) -> list[Path]:
    """Writes one PNG per phase and aggregate metric, plus ``overview.png`` (:func:`metric_figures`).

    Parameters
    ----------
    records : list[dict]
        ``metrics.jsonl`` records.
    out_dir : Path
        Folder for the PNGs (created if missing).
    primary_metric : str
        The task's primary metric, for the overview.
    title : str
        Prefix of every figure title (e.g. the scenario name).
    units : mapping, optional
        Metric → unit (:func:`metric_units`); default :data:`METRIC_UNITS`.
    target_epsilon : float, optional
        The privacy mechanism's ``target_epsilon``, drawn on the ε panel.

    Returns
    -------
    list[Path]
        The paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = metric_figures(records, primary_metric=primary_metric, title=title, units=units,
                             target_epsilon=target_epsilon)
    return [_save(fig, out_dir / name) for name, fig in figures]


def metric_figures(records: list[dict], *, primary_metric: str, title: str = "",
                   units: Mapping[str, str] | None = None,
                   target_epsilon: float | None = None) -> Iterator[tuple[str, Any]]:
    """``(file name, matplotlib Figure)`` of every curve :func:`plot_metric_curves` writes, one at a time.

    ``<phase>_<metric>.png`` shows thin per-client lines ("client k", with a legend when there are at most
    10 clients), a thick aggregate line and, dashed, any reference method recorded beside the metric (a CT
    task's ``psnr_fbp``: "FBP baseline"). ``overview.png`` shows the training loss and the primary metric
    (evaluate aggregate, and central if present) side by side, plus the run's ε over rounds when the records
    hold one (a differentially private run), with ``target_epsilon`` dashed. Axes name their unit
    (``units``), rounds are integer ticks, and titles name the data each phase is measured on
    (:data:`DATASETS`). Metrics that are all None/NaN and bookkeeping counters (``num-examples``,
    ``seconds``, ``steps``, ``participations``) are skipped.
    """
    units = METRIC_UNITS if units is None else units
    phases = _collect(records)
    for phase in _ordered(phases):
        series = phases[phase]
        for metric in series.aggregate:
            if not series.has_data(metric):
                continue
            fig, (ax,) = _figure(1)
            _plot_phase_metric(ax, series, metric, phase)
            _label(ax, phase_title(title, phase, metric), axis_label(metric, units))
            yield f"{_safe(phase)}_{_safe(metric)}.png", fig
    overview = _overview(phases, _epsilon_series(records), primary_metric, title, units, target_epsilon)
    if overview is not None:
        yield "overview.png", overview


def _collect(records: list[dict]) -> dict[str, _PhaseSeries]:
    """Groups records by phase; a later record of the same round wins."""
    phases: dict[str, _PhaseSeries] = {}
    for rec in records:
        rnd = rec.get("round")
        if not isinstance(rnd, int):
            continue
        series = phases.setdefault(str(rec.get("phase", "")), _PhaseSeries())
        for metric, value in (rec.get("aggregate") or {}).items():
            if metric not in _SKIPPED_METRICS and _is_number(value):
                series.aggregate.setdefault(metric, {})[rnd] = _as_float(value)
        for cid, metrics in (rec.get("clients") or {}).items():
            for metric, value in (metrics or {}).items():
                if metric not in _SKIPPED_METRICS and _is_number(value):
                    per_client = series.clients.setdefault(metric, {})
                    per_client.setdefault(str(cid), {})[rnd] = _as_float(value)
    return phases


def _plot_phase_metric(ax: Any, series: _PhaseSeries, metric: str, phase: str) -> None:
    clients = series.clients.get(metric, {})
    for cid in sorted(clients, key=_client_sort_key):
        _line(ax, clients[cid], label=f"client {cid}", linewidth=0.9, alpha=0.7, markersize=2)
    _line(
        ax,
        series.aggregate_of(metric),
        label="central" if phase == "central" else "aggregate",
        color="black",
        linewidth=2.5,
        markersize=4,
    )
    for name, values in series.baselines_of(metric):
        _baseline(ax, values, label=f"{name} baseline", color="dimgray")
    if len(clients) <= _MAX_LEGEND_CLIENTS:
        ax.legend(fontsize="small")


def _epsilon_series(records: list[dict]) -> dict[int, float]:
    """Round → the run's ε (the round's last record that holds a number; empty for a run without DP)."""
    epsilon: dict[int, float] = {}
    for rec in records:
        value, rnd = rec.get("epsilon"), rec.get("round")
        if isinstance(rnd, int) and isinstance(value, (int, float)) and not isinstance(value, bool):
            epsilon[rnd] = float(value)
    return epsilon if _has_values(epsilon) else {}


def _overview(phases: dict[str, _PhaseSeries], epsilon: dict[int, float], primary: str, title: str,
              units: Mapping[str, str], target_epsilon: float | None) -> Any | None:
    """The overview figure (training loss | primary metric [| ε]), or None if the first two are empty."""
    panels = [
        ("training loss", "loss", [("train", "train")]),
        (primary, primary, [("evaluate", "federated evaluate"), ("central", "central")]),
    ]
    curves = [
        [
            (phase, label, phases[phase])
            for phase, label in sources
            if phase in phases and _has_values(phases[phase].aggregate_of(metric))
        ]
        for _, metric, sources in panels
    ]
    if not any(curves):
        return None
    fig, axes = _figure(len(panels) + bool(epsilon), suptitle=True)
    for ax, (name, metric, _), panel in zip(axes, panels, curves):
        for phase, label, series in panel:
            line = _line(ax, series.aggregate_of(metric), label=f"{label} ({DATASETS[phase]})", linewidth=2,
                         markersize=3)
            for baseline, values in series.baselines_of(metric):
                _baseline(ax, values, label=f"{label}: {baseline} baseline", color=line.get_color())
        if panel:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        _label(ax, name, axis_label(metric, units))
    if epsilon:
        _epsilon_panel(axes[-1], epsilon, target_epsilon)
    fig.suptitle(_join(title, "overview"))
    return fig


def _epsilon_panel(ax: Any, epsilon: dict[int, float], target: float | None) -> None:
    """The run's ε over rounds, and the mechanism's ``target_epsilon`` as a dashed line."""
    _line(ax, epsilon, label="ε spent", color="tab:purple", linewidth=2, markersize=3)
    if target is not None:
        ax.axhline(target, color="tab:red", linestyle="--", linewidth=1.5, label=f"target ε = {target:g}")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize="small")
    _label(ax, "privacy spent", "ε")


def _line(ax: Any, values: dict[int, float], *, label: str, **style: Any) -> Any:
    """The curve of ``values`` over rounds (its ``Line2D``)."""
    rounds = sorted(values)
    (line,) = ax.plot(rounds, [values[r] for r in rounds], marker="o", label=label, **style)
    return line


def _baseline(ax: Any, values: dict[int, float], *, label: str, **style: Any) -> None:
    """A reference method's values: dashed, without markers."""
    rounds = sorted(values)
    ax.plot(rounds, [values[r] for r in rounds], linestyle="--", linewidth=1.5, label=label, **style)


def _label(ax: Any, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _figure(columns: int, *, suptitle: bool = False) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width = _PANEL_WIDTH * columns
    fig = Figure(figsize=(width, _PANEL_HEIGHT), dpi=_DPI)
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, columns, squeeze=False)[0])
    # Fixed margins (in inches): a layout engine would draw every figure twice.
    fig.subplots_adjust(
        left=0.8 / width,
        right=1 - 0.25 / width,
        bottom=0.55 / _PANEL_HEIGHT,
        top=1 - (0.7 if suptitle else 0.4) / _PANEL_HEIGHT,
        wspace=0.3,
    )
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    try:
        fig.savefig(path, format="png")
    finally:
        fig.clear()
    return path


def _ordered(phases: dict[str, _PhaseSeries]) -> list[str]:
    return [p for p in _PHASES if p in phases] + sorted(p for p in phases if p not in _PHASES)


def _client_sort_key(cid: str) -> tuple[int, int | str]:
    return (0, int(cid)) if cid.isdigit() else (1, cid)


def _has_values(values: dict[int, float]) -> bool:
    return any(not math.isnan(v) for v in values.values())


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _as_float(value: Any) -> float:
    return math.nan if value is None else float(value)


def _safe(name: str) -> str:
    return _UNSAFE_FILE_CHARS.sub("-", name) or "metric"


def _join(title: str, what: str) -> str:
    return f"{title} — {what}" if title else what
