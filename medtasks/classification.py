"""Predictions and metrics shared by the classification tasks (tabular, digits).

:func:`predict_logits` runs a model over a dataset without gradients; :func:`classification_metrics`
turns its logits into the metrics those tasks report; :func:`confusion_matrix` counts true against
predicted classes for both and for plots.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from medtasks.base import DataError


def confusion_matrix(predicted: torch.Tensor, truth: torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts ``M[t, p]`` of records of true class ``t`` predicted as ``p``, shape ``[L, L]`` int64.

    Parameters
    ----------
    predicted : torch.Tensor
        ``[N]`` integer predictions.
    truth : torch.Tensor
        ``[N]`` integer labels.
    num_classes : int
        ``L``.

    Raises
    ------
    ValueError
        ``predicted`` and ``truth`` differ in shape.
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted {tuple(predicted.shape)} and truth {tuple(truth.shape)} differ in shape")
    flat = truth.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes).numpy()


def predict_logits(model: nn.Module, dataset: Dataset, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``model`` on every sample of ``dataset``, in order, and the samples' labels.

    The model runs in eval mode without gradients on its own device, in batches of ``batch_size``;
    its train/eval mode is restored afterwards, also when it raises.

    Parameters
    ----------
    model : nn.Module
        maps a batch ``x [B, ...]`` to logits ``[B, L]``.
    dataset : Dataset
        ``(x [...], y [])`` samples, ``N`` of them.
    batch_size : int
        samples per forward pass.

    Returns
    -------
    tuple[torch.Tensor, torch.Tensor]
        ``(logits [N, L], labels [N])``, on the CPU.

    Raises
    ------
    DataError
        ``dataset`` is empty.
    """
    device = next(model.parameters()).device
    logits, labels = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
                logits.append(model(x.to(device)).cpu())
                labels.append(y)
    finally:
        model.train(was_training)
    if not labels:
        raise DataError("cannot evaluate a classifier on an empty dataset")
    return torch.cat(logits), torch.cat(labels)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``loss``, ``accuracy`` and ``balanced_accuracy`` of logits against labels.

    With the confusion matrix ``M`` (:func:`confusion_matrix` of ``argmax`` predictions):
    ``loss = -1/N Σ_i log softmax(z_i)[y_i]`` (mean cross-entropy), ``accuracy = tr(M) / Σ M`` and
    ``balanced_accuracy = 1/|C| Σ_{c∈C} M[c, c] / Σ_p M[c, p]``, the mean per-class recall over the
    classes ``C`` present in ``labels`` (Brodersen, Ong, Stephan & Buhmann 2010, "The balanced accuracy
    and its posterior distribution", ICPR).

    Parameters
    ----------
    logits : torch.Tensor
        ``[N, L]`` float scores, ``N >= 1``.
    labels : torch.Tensor
        ``[N]`` int64 labels in ``[0, L)``.
    num_classes : int
        ``L``.

    Returns
    -------
    dict[str, float]
        ``{"loss", "accuracy", "balanced_accuracy"}``.
    """
    matrix = confusion_matrix(logits.argmax(dim=1), labels, num_classes)
    support = matrix.sum(axis=1)
    recall = np.diag(matrix)[support > 0] / support[support > 0]
    return {
        "loss": float(F.cross_entropy(logits, labels)),
        "accuracy": float(np.trace(matrix) / matrix.sum()),
        "balanced_accuracy": float(recall.mean()),
    }
