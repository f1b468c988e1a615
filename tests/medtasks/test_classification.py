"""Specification of the shared classification helpers: batched prediction and the reported metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import medtasks.tabular
from medtasks.base import DataError
from medtasks.classification import classification_metrics, confusion_matrix, predict_logits


def _linear(features: int = 3, classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(features, classes), torch.nn.Dropout(0.5))


def test_predict_logits_matches_one_eval_pass_in_order_and_restores_the_mode():
    model = _linear()
    x, y = torch.randn(10, 3, generator=torch.Generator().manual_seed(1)), torch.arange(10) % 4
    model.train()
    logits, labels = predict_logits(model, TensorDataset(x, y), batch_size=3)  # 4 batches, the last of 1
    assert model.training
    assert logits.shape == (10, 4) and not logits.requires_grad
    torch.testing.assert_close(logits, model[0](x).detach())  # eval mode: dropout off
    torch.testing.assert_close(labels, y)
    model.eval()
    predict_logits(model, TensorDataset(x, y), batch_size=4)
    assert not model.training


def test_predict_logits_refuses_an_empty_dataset():
    with pytest.raises(DataError, match="empty"):
        predict_logits(_linear(), TensorDataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), batch_size=8)


def test_metrics_of_a_hand_made_confusion():
    # labels 0,0,0,1 (class 2 absent); predictions 0,0,1,1 → accuracy 3/4, recalls 2/3 and 1/1
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1]]))
    metrics = classification_metrics(logits, labels, num_classes=3)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert metrics["loss"] == pytest.approx(-np.mean(np.log([0.7, 0.6, 0.2, 0.8])), rel=1e-6)


def test_the_tabular_module_still_exports_confusion_matrix():
    assert medtasks.tabular.confusion_matrix is confusion_matrix
