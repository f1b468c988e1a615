"""The figures of ``medfed report`` (:mod:`server.report`), drawn from a run's files as PNG bytes.

* :func:`partition_figure`: each site's train/validation sizes and its stacked label histogram;
* :func:`metric_figure`: one metric against rounds, per site (thin lines), aggregated over the sites
  (federated evaluation, thick) and on the server's test set (central, dashed), with its baseline: the
  FBP reconstruction's value for CT (``<metric>_fbp`` in the records), chance for AUC (0.5) and for
  accuracy (1 / number of classes);
* :func:`epsilon_figure`: ε against rounds, per site and the run's, with the target ε.

matplotlib is used through its object API (``Figure`` + Agg canvas), never pyplot.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Baseline", "epsilon_figure", "metric_figure", "partition_figure"]

DPI = 100
MAX_SITE_LEGEND = 10  # more sites: no legend entry per site


@dataclass(frozen=True)
class Baseline:
    """A reference a metric is read against: a constant (chance) or a curve (FBP)."""

    label: str
    value: float | None = None
    curve: Mapping[int, float] | None = None


def _figure(width: float, height: float, columns: int = 1) -> tuple[Any, list[Any]]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, columns, squeeze=False)[0])


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png")
    finally:
        fig.clear()
    return buffer.getvalue()


def _plot(ax: Any, curve: Mapping[int, float], **style: Any) -> None:
    rounds = sorted(r for r, v in curve.items() if math.isfinite(v))
    ax.plot(rounds, [curve[r] for r in rounds], marker="o", markersize=3, **style)


def partition_figure(sites: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Two panels: each site's train and validation sizes (stacked bars), and its label histogram
    (one stacked bar per site, one colour per class). A site without a histogram has no bar there."""
    names = list(sites)
    fig, (sizes, labels) = _figure(12, 3.8, columns=2)
    positions = range(len(names))
    train = [int(sites[name].get("n_train") or 0) for name in names]
    validation = [int(sites[name].get("n_val") or 0) for name in names]
    sizes.bar(positions, train, label="train")
    sizes.bar(positions, validation, bottom=train, label="validation")
    sizes.set(title="site sizes", xlabel="site", ylabel="samples")
    sizes.legend(fontsize="small")
    histograms = [list(sites[name].get("label_histogram") or []) for name in names]
    classes = max((len(histogram) for histogram in histograms), default=0)
    bottom = [0.0] * len(names)
    for label in range(classes):
        counts = [float(h[label]) if label < len(h) else 0.0 for h in histograms]
        labels.bar(positions, counts, bottom=bottom, label=f"class {label}" if classes <= 12 else None)
        bottom = [b + c for b, c in zip(bottom, counts)]
    labels.set(title="label histogram per site (training split)", xlabel="site", ylabel="samples")
    if 0 < classes <= 12:
        labels.legend(fontsize="x-small", ncols=2)
    for ax in (sizes, labels):
        ax.set_xticks(list(positions), names if len(names) <= 30 else [""] * len(names))
    return _png(fig)


def metric_figure(metric: str, ylabel: str, *, sites: Mapping[str, Mapping[int, float]], federated: Mapping[int, float],
                  central: Mapping[int, float], baselines: Sequence[Baseline],
                  aggregate_label: str = "federated (sites' mean, weighted)") -> bytes:
    """One metric against rounds: per site, the sites' aggregate (``aggregate_label``), central, baselines
    (see the module)."""
    fig, (ax,) = _figure(5.6, 3.6)
    for site in sorted(sites, key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else s)):
        _plot(ax, sites[site], linewidth=0.8, alpha=0.6, label=f"site {site}" if len(sites) <= MAX_SITE_LEGEND else None)
    if federated:
        _plot(ax, federated, color="black", linewidth=2.5, label=aggregate_label)
    if central:
        _plot(ax, central, color="tab:red", linewidth=2.5, linestyle="--", label="central (server's test set)")
    for baseline in baselines:
        if baseline.curve:
            _plot(ax, baseline.curve, color="grey", linestyle=":", linewidth=2, label=baseline.label)
        elif baseline.value is not None:
            ax.axhline(baseline.value, color="grey", linestyle=":", linewidth=2, label=baseline.label)
    ax.set(title=metric, xlabel="round", ylabel=ylabel)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return _png(fig)


def epsilon_figure(*, sites: Mapping[str, Mapping[int, float]], run: Mapping[int, float],
                   target: float | None) -> bytes:
    """ε spent against rounds: each site's (thin), the run's (thick: the largest), and the target ε."""
    fig, (ax,) = _figure(5.6, 3.6)
    for site, curve in sorted(sites.items()):
        _plot(ax, curve, linewidth=0.8, alpha=0.6, label=f"site {site}" if len(sites) <= MAX_SITE_LEGEND else None)
    _plot(ax, run, color="black", linewidth=2.5, label="run (the weakest site)")
    if target is not None:
        ax.axhline(target, color="tab:red", linestyle="--", linewidth=2, label=f"target ε = {target:g}")
    ax.set(title="privacy spent", xlabel="round", ylabel="ε")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small")
    return _png(fig)
