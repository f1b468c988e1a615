"""Anatomy labels of CT slices: the label set of each data source and the thorax test for a slice."""

from __future__ import annotations

import numpy as np

from medtasks.ct import realdata
from medtasks.ct.params import CTParams
from medtasks.ct.physics import MU_WATER

__all__ = ["ANATOMIES", "FOLDER_LABELS", "LUNG_FRACTION", "anatomy_label", "anatomy_names"]

#: Anatomy labels each generated phantom family draws from (label skew changes their mix); the
#: labels of ``"packaged"`` are those of its slices (:func:`anatomy_names`).
ANATOMIES: dict[str, tuple[str, ...]] = {
    "torso": ("thorax", "abdomen"),
    "ellipses": ("ellipses",),
    "mixed": ("thorax", "abdomen", "ellipses"),
}
#: Labels of folder data (:func:`anatomy_label`).
FOLDER_LABELS: tuple[str, ...] = ("thorax", "other")

LUNG_FRACTION = 0.1
"""A slice is a thorax when more than this fraction of its body is below −500 HU (lungs)."""
_LUNG_THRESHOLD_MU = MU_WATER * (1.0 - 500.0 / 1000.0)  # μ at −500 HU


def anatomy_label(mu: np.ndarray) -> int:
    """0 (thorax) if the slice holds lungs, else 1 (abdomen / other).

    The body is the set of pixels above −500 HU, filled along rows and columns (exact for a
    convex outline); the slice is a thorax when more than :data:`LUNG_FRACTION` of the body lies
    below −500 HU. On ``torso_phantom`` slices the fraction is ≥ 0.27 for thoraces and ≤ 0.02
    for abdomens (bowel gas).

    Parameters
    ----------
    mu : np.ndarray
        One slice ``[H, W]`` in 1/cm.

    Returns
    -------
    int
        The index of the slice's label in :data:`FOLDER_LABELS` (and in ``("thorax", "abdomen")``).
    """
    dense = mu > _LUNG_THRESHOLD_MU

    def span(mask: np.ndarray, axis: int) -> np.ndarray:  # between the first and last True of each line
        forward = np.logical_or.accumulate(mask, axis=axis)
        backward = np.flip(np.logical_or.accumulate(np.flip(mask, axis), axis=axis), axis)
        return forward & backward

    body = span(dense, 0) & span(dense, 1)
    if not body.any():
        return 1
    return 0 if (body & ~dense).sum() > LUNG_FRACTION * body.sum() else 1


def anatomy_names(params: CTParams) -> tuple[str, ...]:
    """The anatomy labels of synthetic data with ``params.phantom`` (and its ``slice_packages``)."""
    if params.phantom == "packaged":
        return realdata.anatomies(params.slice_packages)
    return ANATOMIES[params.phantom]
