"""Pictures of the poisoning attacks' success: predicted-class histograms and segmentation mask rows.

Drawn by the server half (:mod:`privacy.attacks.poisoning_observer`) of the backdoor (Bagdasaryan, Veit, Hua,
Estrin & Shmatikov 2020, arXiv:1807.00459) and label flipping (Tolpegin, Truex, Gursoy & Liu 2020,
arXiv:2007.08432) when a run draws pictures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from privacy.attacks.base import AttackSetting

HISTOGRAM_EXAMPLES = 8  # triggered images drawn above the prediction histogram
MASK_ROWS = 4  # triggered segmentation images drawn


def plot_predictions(path: Path, title: str, predicted: torch.Tensor, classes: int, target: int,
                     examples: torch.Tensor | None = None) -> None:
    """Save a histogram of the predicted classes on the attacked test inputs (target class in red), with a row of
    the attacked images above it when ``examples`` ``[K, C, H, W]`` is given (grey for one channel, RGB for
    three)."""
    from matplotlib.figure import Figure

    shown = 0 if examples is None else min(HISTOGRAM_EXAMPLES, len(examples))
    figure = Figure(figsize=(max(6.0, 0.8 * shown), 4.5 if shown else 3.5))
    grid = figure.add_gridspec(2 if shown else 1, max(shown, 1), height_ratios=[1, 2] if shown else [1])
    for k in range(shown):
        axis = figure.add_subplot(grid[0, k])
        assert examples is not None
        if examples.shape[1] == 3:
            axis.imshow(examples[k].permute(1, 2, 0).clamp(0.0, 1.0).numpy())
        else:
            axis.imshow(examples[k, 0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        axis.set_axis_off()
    axis = figure.add_subplot(grid[-1, :])
    counts = np.bincount(predicted.numpy(), minlength=classes)
    axis.bar(range(classes), counts, color=["tab:red" if c == target else "tab:gray" for c in range(classes)])
    axis.set_xlabel("predicted class")
    axis.set_ylabel("test inputs")
    axis.set_xticks(range(classes))
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def plot_masks(path: Path, title: str, images: torch.Tensor, truth: torch.Tensor, clean: torch.Tensor,
               triggered: torch.Tensor, classes: int) -> None:
    """Save rows of triggered image | true mask | prediction without the trigger | prediction with it.

    Parameters
    ----------
    path : Path
        The PNG (parent folders are created).
    title : str
        The figure's title.
    images : torch.Tensor
        ``[N, C, H, W]`` triggered images (channel 0 is drawn); up to :data:`MASK_ROWS` rows.
    truth, clean, triggered : torch.Tensor
        ``[N, H, W]`` int label maps: the true masks and the predictions on the clean and triggered images.
    classes : int
        C, background included (label 0 is drawn transparent).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    palette = ["tab:red", "tab:green", "gold", "tab:cyan", "tab:purple", "tab:orange", "tab:pink"]
    colours = ListedColormap(["none"] + [palette[(c - 1) % len(palette)] for c in range(1, classes)])
    rows = min(MASK_ROWS, len(images))
    figure = Figure(figsize=(10.0, 2.5 * max(rows, 1)))
    axes = figure.subplots(max(rows, 1), 4, squeeze=False)
    titles = ("triggered image", "true mask", "prediction, clean", "prediction, triggered")
    for row in range(rows):
        for axis, overlay, name in zip(axes[row], (None, truth[row], clean[row], triggered[row]), titles):
            axis.imshow(images[row, 0].numpy(), cmap="gray")
            if overlay is not None:
                axis.imshow(np.ma.masked_equal(overlay.numpy(), 0), cmap=colours, vmin=0, vmax=classes - 1,
                            alpha=0.5, interpolation="nearest")
            axis.set_title(name, fontsize=9)
            axis.set_axis_off()
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def plot_path(setting: AttackSetting, kind: str, server_round: int) -> Path | None:
    """``<plots>/<kind>-round<t>-global.png``, or ``None`` when the run draws no pictures."""
    if setting.plots is None:
        return None
    return setting.plots / f"{kind}-round{server_round:03d}-global.png"
