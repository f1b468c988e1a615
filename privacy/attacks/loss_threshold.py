"""Membership inference by the loss (``attack.kind: loss_threshold``).

Yeom, Giacomelli, Fredrikson & Jha 2018, "Privacy Risk in Machine Learning: Analyzing the Connection to
Overfitting", IEEE CSF (arXiv:1709.01604), Sec. 3.2 ("Membership attack", adversary 2): a model fits its
training examples better than others, so the lower an example's loss, the likelier it is a member. The score of a
candidate ``(x, y)`` is

    s(x, y) = −ℓ(f(x), y)

and the ROC metrics of :func:`privacy.attacks.membership.roc_metrics` follow from it. Yeom's attack itself is
one threshold: "member iff ℓ(f(x), y) < ℓ̄", with ℓ̄ the model's mean training loss (which the adversary is
assumed to know; here: the mean over the member candidates). Its balanced accuracy ½(TPR + TNR) is the record's
``accuracy``; Yeom et al.'s membership advantage is ``2·accuracy − 1`` (Theorem 2 bounds it by the
generalisation gap). Which model is attacked and who the candidates are: :mod:`privacy.attacks.membership`.
"""

from __future__ import annotations

import numpy as np
import torch

from privacy.attacks.base import Attack, AttackSetting
from privacy.attacks.membership import Candidates, MembershipInference, MembershipParams, check_membership


class LossThresholdParams(MembershipParams):
    """``attack.params`` of ``loss_threshold`` (the shared ones: :class:`MembershipParams`)."""


def yeom_accuracy(member: np.ndarray, losses: np.ndarray) -> float:
    """Balanced accuracy of Yeom et al.'s threshold attack, "member iff ℓ_i < mean of ℓ over the members".

    Parameters
    ----------
    member : np.ndarray
        ``[N]`` bool ground truth, both classes present.
    losses : np.ndarray
        ``[N]`` per-example losses ℓ_i.

    Returns
    -------
    float
        ½ (TPR + TNR) of the prediction ``ℓ_i < ℓ̄``.
    """
    predicted = losses < losses[member].mean()
    return float(0.5 * (predicted[member].mean() + (~predicted[~member]).mean()))


class LossThreshold(MembershipInference):
    """The server half: ``s = −ℓ`` for every candidate."""

    kind = "loss_threshold"

    def score(self, model: torch.nn.Module, cands: Candidates, losses: np.ndarray, server_round: int,
              partition_id: int) -> tuple[np.ndarray, dict[str, float]]:
        """Scores ``−ℓ_i`` ``[2n]`` and ``accuracy`` (:func:`yeom_accuracy`)."""
        return -losses, {"accuracy": yeom_accuracy(cands.member, losses)}


def server_half(setting: AttackSetting) -> LossThreshold:
    """The server half of ``loss_threshold``."""
    return LossThreshold(setting)


ATTACK = Attack(
    name="loss_threshold", label="loss threshold (Yeom et al. 2018)", Params=LossThresholdParams,
    headline="auc", needs="victims", server_half=server_half, check_compatible=check_membership,
)
