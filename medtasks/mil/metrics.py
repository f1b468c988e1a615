"""Bag- and tile-level metrics of MIL classifiers: ROC AUC, accuracy, balanced accuracy (at a
fixed threshold, and at thresholds cross-fitted on held-out folds), and how well attention
localises the positive tiles.

Inputs may be NumPy arrays, tensors or sequences; everything is computed in
NumPy float64. Undefined values (a class absent, nothing to score) are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Union

import numpy as np
from scipy.stats import rankdata

if TYPE_CHECKING:
    import torch

#: Scores or labels: a NumPy array, a tensor (detached, moved to the CPU) or a sequence.
ArrayLike = Union[np.ndarray, Sequence[float], "torch.Tensor"]


def _array(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as a NumPy float64 array (tensors are detached and moved to the CPU)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if np.isnan(array).any():
        raise ValueError(f"{name} contains NaN")
    return array


def _binary(labels: ArrayLike, size: int) -> np.ndarray:
    """Labels as a bool array of ``size`` entries; ``ValueError`` unless every label is 0 or 1."""
    y = _array(labels, "labels").reshape(-1)
    if y.size != size:
        raise ValueError(f"{size} scores but {y.size} labels")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    return y.astype(bool)


def roc_auc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve by the Mann–Whitney U statistic.

    .. math:: \\mathrm{AUC} = \\frac{R_+ - n_+(n_+ + 1)/2}{n_+ n_-}
              = P(s_+ > s_-) + \\tfrac12 P(s_+ = s_-),

    with ``R_+`` the sum of the positives' ranks among all scores, ties given their
    average rank (so each tied positive–negative pair counts 1/2).

    Parameters
    ----------
    scores : ArrayLike
        ``[N]`` scores, higher = more positive.
    labels : ArrayLike
        ``[N]`` 0/1 labels.

    Returns
    -------
    float
        The AUC in ``[0, 1]``; NaN if one class is absent.
    """
    s = _array(scores, "scores").reshape(-1)
    y = _binary(labels, s.size)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = rankdata(s, method="average")
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _predictions(probs: ArrayLike, labels: ArrayLike, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted, truth)`` bool arrays with ``predicted = probs >= threshold``."""
    p = _array(probs, "probs").reshape(-1)
    return p >= threshold, _binary(labels, p.size)


def accuracy(probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> float:
    """Fraction of correct predictions ``(1/N) Σ_i 1[1[p_i >= t] = y_i]``; NaN when empty.

    Parameters
    ----------
    probs : ArrayLike
        ``[N]`` predicted probabilities (or any score thresholded at ``threshold``).
    labels : ArrayLike
        ``[N]`` 0/1 labels.
    threshold : float
        decision threshold ``t``.
    """
    predicted, truth = _predictions(probs, labels, threshold)
    return float(np.mean(predicted == truth)) if truth.size else float("nan")


def balanced_accuracy(probs: ArrayLike, labels: ArrayLike, threshold: float = 0.5) -> float:
    """Mean per-class recall, ``(TPR + TNR) / 2``, over the classes present.

    With one class present it is that class' recall (as scikit-learn's
    ``balanced_accuracy_score``); NaN when empty.

    Parameters
    ----------
    probs : ArrayLike
        ``[N]`` predicted probabilities.
    labels : ArrayLike
        ``[N]`` 0/1 labels.
    threshold : float
        decision threshold ``t``.
    """
    predicted, truth = _predictions(probs, labels, threshold)
    recalls = [np.mean(predicted[truth == c] == c) for c in (False, True) if np.any(truth == c)]
    return float(np.mean(recalls)) if recalls else float("nan")


def best_threshold(scores: ArrayLike, labels: ArrayLike) -> float:
    """The threshold that maximises balanced accuracy on ``(scores, labels)`` (Youden's J).

    Candidates are the midpoints between consecutive distinct scores and the two ends
    (predict everything positive / negative); ties go to the smallest threshold.

    Returns
    -------
    float
        The threshold; NaN if one class is absent.
    """
    s = _array(scores, "scores").reshape(-1)
    y = _binary(labels, s.size)
    if y.all() or not y.any():
        return float("nan")
    distinct = np.unique(s)
    candidates = np.concatenate([[distinct[0] - 1.0], (distinct[1:] + distinct[:-1]) / 2, [distinct[-1] + 1.0]])
    predicted = s[None, :] >= candidates[:, None]  # [C, N]
    recall = 0.5 * (predicted[:, y].mean(axis=1) + (~predicted[:, ~y]).mean(axis=1))
    return float(candidates[int(np.argmax(recall))])


def cross_fitted_balanced_accuracy(scores: ArrayLike, labels: ArrayLike, folds: int = 2) -> float:
    """Balanced accuracy at thresholds chosen on held-out folds, never on the samples they judge.

    Sample ``i`` belongs to fold ``i mod folds``. Each fold is predicted with the
    :func:`best_threshold` of the other folds, and the balanced accuracy of all these
    out-of-fold predictions is returned. It answers "how good is this score once its operating
    point is calibrated on data labelled like these samples", whereas :func:`balanced_accuracy`
    at a fixed threshold also judges the score's calibration.

    Parameters
    ----------
    scores : ArrayLike
        ``[N]`` scores (logits or probabilities).
    labels : ArrayLike
        ``[N]`` 0/1 labels.
    folds : int
        number of folds, ``>= 2``.

    Returns
    -------
    float
        The balanced accuracy; NaN when a class is absent from the samples or from the
        complement of some fold.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    s = _array(scores, "scores").reshape(-1)
    y = _binary(labels, s.size)
    fold = np.arange(s.size) % folds
    predicted = np.zeros(s.size, dtype=bool)
    for f in range(folds):
        threshold = best_threshold(s[fold != f], y[fold != f])
        if np.isnan(threshold):
            return float("nan")
        predicted[fold == f] = s[fold == f] >= threshold
    return balanced_accuracy(predicted.astype(np.float64), y.astype(np.float64), threshold=0.5)


def attention_localisation_auc(
    attention: ArrayLike,
    tile_labels: ArrayLike,
    bag_labels: ArrayLike,
    key_padding_mask: ArrayLike | None = None,
    *,
    normalise: bool = True,
) -> float:
    """How well per-tile scores find the positive tiles inside positive bags.

    The tiles of the bags with ``Y = 1`` are pooled and scored by
    ``K_b · a_bk`` (``K_b`` = the bag's unpadded tiles): attention weights sum to
    1 per bag, so ``K·a`` is 1 for uniform attention whatever the bag size, and
    bags of different ``K`` become comparable. The result is the ROC AUC
    (:func:`roc_auc`) of these scores against the tile truth. Negative bags are
    left out: they have no positive tile to find.

    Parameters
    ----------
    attention : ArrayLike
        ``[S, K]`` attention weights (or other per-tile scores).
    tile_labels : ArrayLike
        ``[S, K]`` 0/1 tile truth.
    bag_labels : ArrayLike
        ``[S]`` 0/1 bag labels.
    key_padding_mask : ArrayLike | None
        ``[S, K]`` bool, ``True`` = padding (left out), or ``None``.
    normalise : bool
        multiply by ``K_b``; set ``False`` for scores that are not
        weights summing to 1 (e.g. instance probabilities).

    Returns
    -------
    float
        The AUC; NaN when no positive bag holds both a positive and a negative tile.
    """
    a = _array(attention, "attention")
    if a.ndim != 2:
        raise ValueError(f"attention must be [S, K], got shape {a.shape}")
    y = _binary(tile_labels, a.size).reshape(a.shape)
    bags = _binary(bag_labels, a.shape[0])
    if key_padding_mask is None:
        valid = np.ones_like(y)
    else:
        valid = ~_binary(key_padding_mask, a.size).reshape(a.shape)
    scores = a * valid.sum(axis=1, keepdims=True) if normalise else a
    keep = valid & bags[:, None]
    return roc_auc(scores[keep], y[keep])
