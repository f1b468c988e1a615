"""Metric curves from ``metrics.jsonl`` records, as PNG files.

matplotlib is imported lazily and used through its object API (``Figure`` +
Agg canvas), never through pyplot: no global backend switch, no figure
registry to leak from.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["plot_metric_curves"]

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


def plot_metric_curves(
    records: list[dict], out_dir: Path, *, primary_metric: str, title: str = ""
) -> list[Path]:
    """Writes one PNG per phase and aggregate metric, plus ``overview.png``.

    ``<phase>_<metric>.png`` shows thin per-client lines ("client k", with a
    legend when there are at most 10 clients) and a thick aggregate line over
    rounds. ``overview.png`` shows the training loss and the primary metric
    (evaluate aggregate, and central if present) side by side. Metrics that
    are all None/NaN and bookkeeping counters (``num-examples``, ``seconds``, ``steps``,
    ``participations``) are skipped.

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

    Returns
    -------
    list[Path]
        The paths written.
    """
    phases = _collect(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for phase in _ordered(phases):
        series = phases[phase]
        for metric in series.aggregate:
            if not series.has_data(metric):
                continue
            fig, (ax,) = _figure(1)
            _plot_phase_metric(ax, series, metric, phase)
            _label(ax, _join(title, f"{phase} {metric}"), metric)
            written.append(_save(fig, out_dir / f"{_safe(phase)}_{_safe(metric)}.png"))
    overview = _overview(phases, primary_metric, title)
    if overview is not None:
        written.append(_save(overview, out_dir / "overview.png"))
    return written


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
    if len(clients) <= _MAX_LEGEND_CLIENTS:
        ax.legend(fontsize="small")


def _overview(phases: dict[str, _PhaseSeries], primary: str, title: str) -> Any | None:
    """The 1x2 overview figure (training loss | primary metric), or None if both are empty."""
    panels = [
        ("training loss", "loss", [("train", "train")]),
        (primary, primary, [("evaluate", "federated evaluate"), ("central", "central")]),
    ]
    curves = [
        [
            (label, phases[phase].aggregate_of(metric))
            for phase, label in sources
            if phase in phases and _has_values(phases[phase].aggregate_of(metric))
        ]
        for _, metric, sources in panels
    ]
    if not any(curves):
        return None
    fig, axes = _figure(2, suptitle=True)
    for ax, (name, metric, _), panel in zip(axes, panels, curves):
        for label, values in panel:
            _line(ax, values, label=label, linewidth=2, markersize=3)
        if panel:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        _label(ax, name, metric)
    fig.suptitle(_join(title, "overview"))
    return fig


def _line(ax: Any, values: dict[int, float], *, label: str, **style: Any) -> None:
    rounds = sorted(values)
    ax.plot(rounds, [values[r] for r in rounds], marker="o", label=label, **style)


def _label(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)


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
