"""Segmentation metrics: Dice per class, mean Dice and the 95th-percentile Hausdorff distance.

Both metrics are computed per image and per foreground class (background is
excluded) from hard label maps, in plain torch / SciPy (no MONAI import); the
tests check both against MONAI's ``compute_dice`` and
``compute_hausdorff_distance(percentile=95)``.

Empty structures (Metrics Reloaded, Maier-Hein et al. 2024, arXiv:2206.01653):

* Dice ``D = 2|P ∩ T| / (|P| + |T|)`` is undefined (NaN) when the class is
  absent from both prediction and truth; a class predicted where the truth has
  none scores 0 (the false positive is penalised), and a missed class scores 0.
  This differs from MONAI's ``ignore_empty=True``, which gives NaN whenever the
  truth is empty and so hides false-positive lesions in lesion-free images.
* HD95 (the 95th-percentile variant of the Hausdorff distance of Huttenlocher,
  Klanderman & Rucklidge 1993, "Comparing images using the Hausdorff distance",
  IEEE TPAMI 15(9); as in MONAI's ``compute_hausdorff_distance``) is undefined (NaN)
  when prediction or truth is empty (no contour to measure from). Distances are in pixels.

Aggregation: per class, the NaN-mean over images; the reported means are the
NaN-mean over classes (a macro average, so a small lesion counts as much as a
large organ).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def _check_labels(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` unless ``pred`` and ``target`` are same-shaped label maps in ``[0, C)``."""
    if pred.shape != target.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from target shape {tuple(target.shape)}"
        )
    if pred.dim() < 2:
        raise ValueError(f"expected label maps [B, *spatial], got shape {tuple(pred.shape)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    for name, labels in (("prediction", pred), ("target", target)):
        if labels.is_floating_point():
            raise ValueError(f"{name} must hold integer labels, got dtype {labels.dtype}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            low, high = int(labels.min()), int(labels.max())
            raise ValueError(
                f"{name} labels must lie in [0, {num_classes}), got [{low}, {high}]"
            )


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot encoding with the class axis second.

    Parameters
    ----------
    labels : torch.Tensor
        ``[B, *spatial]`` integer labels.
    num_classes : int
        ``C``.

    Returns
    -------
    torch.Tensor
        ``[B, C, *spatial]`` float32.
    """
    return F.one_hot(labels.long(), num_classes).movedim(-1, 1).float()


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice ``D = 2|P ∩ T| / (|P| + |T|)`` of each image and foreground class.

    Parameters
    ----------
    pred : torch.Tensor
        ``[B, *spatial]`` predicted labels.
    target : torch.Tensor
        ``[B, *spatial]`` true labels.
    num_classes : int
        ``C`` (background included).

    Returns
    -------
    torch.Tensor
        ``[B, C-1]`` float32; NaN where the class is absent from both prediction and truth.

    Raises
    ------
    ValueError
        shape mismatch or labels outside ``[0, C)``.
    """
    _check_labels(pred, target, num_classes)
    p = one_hot(pred, num_classes).flatten(2)[:, 1:]
    t = one_hot(target, num_classes).flatten(2)[:, 1:]
    return 2 * (p * t).sum(dim=2) / (p.sum(dim=2) + t.sum(dim=2))  # 0/0 = NaN: absent from both


def contour(region: np.ndarray) -> np.ndarray:
    """Contour pixels of a boolean region: ``region XOR erosion(region)`` (4-connected, outside = 0)."""
    return region ^ ndimage.binary_erosion(region, border_value=0)


def _hd95_one(pred: np.ndarray, target: np.ndarray) -> float:
    """Symmetric 95th-percentile Hausdorff distance of two non-empty boolean masks, in pixels."""
    rows, cols = np.nonzero(pred | target)
    window = np.s_[max(rows.min() - 1, 0) : rows.max() + 2, max(cols.min() - 1, 0) : cols.max() + 2]
    pred_contour, target_contour = contour(pred[window]), contour(target[window])
    to_target = ndimage.distance_transform_edt(~target_contour)[pred_contour]
    to_pred = ndimage.distance_transform_edt(~pred_contour)[target_contour]
    return float(max(np.percentile(to_target, 95), np.percentile(to_pred, 95)))


def hd95(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """95th-percentile symmetric Hausdorff distance of each 2D image and foreground class, in pixels.

    ``HD95 = max(P95_{p ∈ ∂P} d(p, ∂T), P95_{t ∈ ∂T} d(t, ∂P))`` over contour pixels
    (:func:`contour`), with linear interpolation between order statistics. This is
    MONAI's ``compute_hausdorff_distance(percentile=95)`` (the tests check they agree)
    computed directly with SciPy's Euclidean distance transform: about 20× faster,
    as MONAI spends its time on per-image cropping of meta-tensors.

    Parameters
    ----------
    pred : torch.Tensor
        ``[B, H, W]`` predicted labels.
    target : torch.Tensor
        ``[B, H, W]`` true labels.
    num_classes : int
        ``C`` (background included).

    Returns
    -------
    torch.Tensor
        ``[B, C-1]`` float32; NaN where the class is absent from the prediction or the truth.

    Raises
    ------
    ValueError
        shape mismatch, labels outside ``[0, C)``, or not 2D.
    """
    _check_labels(pred, target, num_classes)
    if pred.dim() != 3:
        raise ValueError(f"hd95 expects 2D label maps [B, H, W], got shape {tuple(pred.shape)}")
    pred_np, target_np = pred.cpu().numpy(), target.cpu().numpy()
    distance = np.full((pred_np.shape[0], num_classes - 1), np.nan, dtype=np.float32)
    for b, c in np.ndindex(*distance.shape):
        pred_region, target_region = pred_np[b] == c + 1, target_np[b] == c + 1
        if pred_region.any() and target_region.any():
            distance[b, c] = _hd95_one(pred_region, target_region)
    return torch.from_numpy(distance)


class SegmentationMetrics:
    """Dice and HD95 accumulated over batches (MONAI-style ``__call__`` / ``aggregate`` / ``reset``).

    Parameters
    ----------
    num_classes : int
        ``C`` (background included).

    Examples
    --------
    ::

        metrics = SegmentationMetrics(num_classes=4)
        for images, masks in loader:
            metrics(model(images).argmax(1), masks)
        result = metrics.aggregate()   # {"dice": ..., "dice_per_class": [3], ...}
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self._dice: list[torch.Tensor] = []
        self._hd95: list[torch.Tensor] = []

    def __call__(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: ``pred`` and ``target`` are ``[B, *spatial]`` label maps."""
        pred, target = pred.detach().cpu(), target.detach().cpu()
        self._dice.append(dice_per_class(pred, target, self.num_classes))
        self._hd95.append(hd95(pred, target, self.num_classes))

    def reset(self) -> None:
        """Forget every batch seen so far."""
        self._dice.clear()
        self._hd95.clear()

    def aggregate(self) -> dict[str, torch.Tensor]:
        """Per-class and mean metrics over all batches since the last :meth:`reset`.

        Returns
        -------
        dict[str, torch.Tensor]
            ``dice_per_class`` and ``hd95_per_class`` (``[C-1]``, NaN-mean over images),
            ``dice`` and ``hd95`` (scalars, NaN-mean over classes); NaN where undefined.
        """
        if not self._dice:
            raise ValueError("SegmentationMetrics.aggregate() called before any batch was added")
        result: dict[str, torch.Tensor] = {}
        for name, values in (("dice", self._dice), ("hd95", self._hd95)):
            per_class = torch.nanmean(torch.cat(values), dim=0)
            result[f"{name}_per_class"] = per_class
            result[name] = torch.nanmean(per_class)
        return result
