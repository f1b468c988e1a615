"""Pictures of MIL predictions: each slide's tiles next to its attention heatmap and tile truth."""

from __future__ import annotations

import math
from typing import Any

import numpy as np


def _grid(values: np.ndarray, columns: int) -> np.ndarray:
    """Lay ``[K, ...]`` per-tile values out on a ``[rows, columns, ...]`` grid, NaN-padded."""
    rows = math.ceil(len(values) / columns)
    grid = np.full((rows * columns, *values.shape[1:]), np.nan, dtype=np.float64)
    grid[: len(values)] = values
    return grid.reshape(rows, columns, *values.shape[1:])


def _mosaic(tiles: np.ndarray, columns: int) -> np.ndarray:
    """Tiles ``[K, 3, T, T]`` (NaN = missing) as one RGB image ``[rows·T, columns·T, 3]``, white gaps."""
    grid = np.nan_to_num(_grid(tiles, columns), nan=1.0)  # [R, C, 3, T, T]
    rows, cols, _, size, _ = grid.shape
    return np.clip(grid.transpose(0, 3, 1, 4, 2).reshape(rows * size, cols * size, 3), 0.0, 1.0)


def attention_scale(attention: np.ndarray, *, normalised: bool) -> tuple[float, float, float | None]:
    """Colour range ``(vmin, vmax)`` of one bag's tile scores, and the uniform level ``1/n`` of attention weights.

    Attention weights that sum to 1 over a bag's ``n`` real tiles are drawn on ``[0, max(attention)]`` with
    ``1/n`` marked: a near-uniform bag shows as near-uniform colour instead of its noise stretched over the
    whole colour map. Tile probabilities (``normalised`` off) keep ``[0, 1]`` and have no uniform level.

    Parameters
    ----------
    attention : np.ndarray
        ``[K]`` scores, NaN for padded slots.
    normalised : bool
        Whether the scores are attention weights summing to 1 over the real tiles.

    Returns
    -------
    tuple
        ``(vmin, vmax, uniform level or None)``.
    """
    if not normalised:
        return 0.0, 1.0, None
    real = attention[~np.isnan(attention)]
    uniform = 1.0 / max(len(real), 1)
    top = float(real.max()) if len(real) else uniform
    return 0.0, max(top, uniform), uniform


def plot_bags(
    bags: np.ndarray,
    scores: np.ndarray,
    tile_labels: np.ndarray,
    probs: np.ndarray,
    padding: np.ndarray | None = None,
    *,
    normalised: bool = True,
) -> Any:
    """Rows of tiles | attention heatmap | tile truth, the tiles on a ``⌈√K⌉``-column grid.

    Parameters
    ----------
    bags : np.ndarray
        ``[N, K, 3, T, T]`` RGB in ``[0, 1]``.
    scores : np.ndarray
        ``[N, K]`` attention weights (or tile probabilities).
    tile_labels : np.ndarray
        ``[N, K]`` tile truth: 1, 0, or negative = unknown (drawn blank).
    probs : np.ndarray
        ``[N]`` predicted ``P(Y = 1)``.
    padding : np.ndarray | None
        ``[N, K]`` bool, ``True`` = padded slot (drawn blank), or ``None``.
    normalised : bool
        ``scores`` are attention weights summing to 1 per bag (colour range: :func:`attention_scale`), not
        tile probabilities.

    Returns
    -------
    matplotlib.figure.Figure
        The picture (not yet saved).
    """
    from matplotlib.figure import Figure

    padding = np.zeros(scores.shape, dtype=bool) if padding is None else np.asarray(padding, dtype=bool)
    columns = math.ceil(math.sqrt(bags.shape[1]))
    figure = Figure(figsize=(9.0, 3.0 * len(bags)))
    axes = figure.subplots(len(bags), 3, squeeze=False)
    for row in range(len(bags)):
        real = ~padding[row]
        tiles = np.where(real[:, None, None, None], bags[row], np.nan)
        attention = np.where(real, scores[row], np.nan)
        truth = np.where(real & (tile_labels[row] >= 0), tile_labels[row], np.nan)
        axes[row, 0].imshow(_mosaic(tiles, columns))
        axes[row, 0].set_title(f"slide (P(positive) {float(probs[row]):.2f})", fontsize=9)
        _attention_panel(figure, axes[row, 1], _grid(attention, columns), attention_scale(attention, normalised=normalised))
        axes[row, 2].imshow(
            np.ma.masked_invalid(_grid(truth, columns)), cmap="Reds", vmin=0, vmax=1, interpolation="nearest"
        )
        axes[row, 2].set_title("positive tiles (truth)", fontsize=9)
        for ax in axes[row]:
            ax.set_axis_off()
    return figure


def _attention_panel(figure: Any, ax: Any, grid: np.ndarray, scale: tuple[float, float, float | None]) -> None:
    """The scores' heatmap on the fixed range of ``scale``, its colour bar marking the uniform level."""
    vmin, vmax, uniform = scale
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=ax, fraction=0.046)
    if uniform is None:
        ax.set_title("tile P(positive)", fontsize=9)
        return
    colorbar.ax.axhline(uniform, color="cyan", linewidth=1.5)
    colorbar.set_ticks([vmin, uniform, vmax], labels=[f"{vmin:g}", f"uniform 1/n = {uniform:.3g}", f"{vmax:.3g}"])
    ax.set_title("attention", fontsize=9)
