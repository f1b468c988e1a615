"""Pictures of MIL predictions: each slide's tiles next to its attention heatmap and tile truth."""

from __future__ import annotations

import math
from pathlib import Path

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


def plot_bags(
    bags: np.ndarray,
    scores: np.ndarray,
    tile_labels: np.ndarray,
    probs: np.ndarray,
    path: Path,
    padding: np.ndarray | None = None,
) -> None:
    """Write rows of tiles | attention heatmap | tile truth, the tiles on a ``⌈√K⌉``-column grid.

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
    path : Path
        PNG file to write (parent folders are created).
    padding : np.ndarray | None
        ``[N, K]`` bool, ``True`` = padded slot (drawn blank), or ``None``.
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
        image = axes[row, 1].imshow(
            np.ma.masked_invalid(_grid(attention, columns)), cmap="magma", interpolation="nearest"
        )
        figure.colorbar(image, ax=axes[row, 1], fraction=0.046)
        axes[row, 1].set_title("attention", fontsize=9)
        axes[row, 2].imshow(
            np.ma.masked_invalid(_grid(truth, columns)), cmap="Reds", vmin=0, vmax=1, interpolation="nearest"
        )
        axes[row, 2].set_title("positive tiles (truth)", fontsize=9)
        for ax in axes[row]:
            ax.set_axis_off()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
