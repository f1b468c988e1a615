"""Pictures of CT reconstructions: ground truth, FBP, network and error, one row per slice."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from medtasks.ct.metrics import psnr
from medtasks.ct.scanner import DATA_RANGE, NORMALISED_MU_WATER

__all__ = ["PLOT_ROWS", "PLOT_WINDOW", "plot_reconstructions"]

PLOT_ROWS = 4
"""Most slices one picture shows."""
PLOT_WINDOW = (0.25, 0.75)
"""Display window of the pictures on the normalised scale (HU ``[−500, 500]``)."""


def plot_reconstructions(target: Tensor, fbp: Tensor, prediction: Tensor) -> Any:
    """Rows of ground truth | FBP | network | |network − truth| (HU, with a colour bar).

    Parameters
    ----------
    target : Tensor
        ``[R, N, N]`` normalised references.
    fbp : Tensor
        ``[R, N, N]`` normalised FBPs.
    prediction : Tensor
        ``[R, N, N]`` normalised network outputs.

    Returns
    -------
    matplotlib.figure.Figure
        The picture (not yet saved).
    """
    from matplotlib.figure import Figure

    psnr_fbp = psnr(fbp, target, DATA_RANGE)
    psnr_net = psnr(prediction, target, DATA_RANGE)
    error_hu = (prediction - target).abs() * (1000.0 / NORMALISED_MU_WATER)  # |Δh| = 2000 |Δx|
    vmin, vmax = PLOT_WINDOW
    figure = Figure(figsize=(10, 2.5 * len(target)))
    axes = figure.subplots(len(target), 4, squeeze=False)
    for row in range(len(target)):
        panels = (
            (target[row], "ground truth", {"cmap": "gray", "vmin": vmin, "vmax": vmax}),
            (fbp[row], f"FBP ({float(psnr_fbp[row]):.1f} dB)", {"cmap": "gray", "vmin": vmin, "vmax": vmax}),
            (prediction[row], f"network ({float(psnr_net[row]):.1f} dB)", {"cmap": "gray", "vmin": vmin, "vmax": vmax}),
            (error_hu[row], "|error| (HU)", {"cmap": "magma", "vmin": 0.0, "vmax": 200.0}),
        )
        for ax, (image, title, style) in zip(axes[row], panels):
            shown = ax.imshow(image.numpy(), **style)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
        figure.colorbar(shown, ax=axes[row, -1], fraction=0.046, label="HU")
    return figure
