"""Segmentation losses (Ma et al. 2021, "Loss odyssey in medical image segmentation", Medical
Image Analysis 71:102035, arXiv:2005.13449).

:func:`build_loss` returns a callable ``loss(logits, target)`` with logits
``[B, C, *spatial]`` and integer targets ``[B, *spatial]``. Notation: ``p̂_i^k`` is
the softmax probability of class ``k`` at pixel ``i``, ``s_i^k`` the one-hot truth.

* ``"ce"``: cross-entropy ``CE = -(1/I) Σ_i Σ_k s_i^k log p̂_i^k`` (``torch.nn.CrossEntropyLoss``).
* ``"dice"``: soft Dice loss per image and class, averaged,
  ``D = 1 - 2⟨p̂, s⟩ / (⟨p̂, 1⟩ + ⟨s, 1⟩)`` (V-Net, Milletari et al. 2016, arXiv:1606.04797;
  MONAI ``DiceLoss``).
* ``"dice_ce"``: ``D + CE`` (MONAI ``DiceCELoss``).
* ``"focal"``: ``L = -(1/(C·I)) Σ_i Σ_k (1 - p̂_i^k)^γ s_i^k log p̂_i^k``, which down-weights
  easy pixels (Lin et al. 2017, arXiv:1708.02002; MONAI ``FocalLoss``, which averages over
  classes too: the ``1/I`` form of Ma et al. 2021 divided by ``C``).
* ``"tversky"``: ``1 - TI`` with the Tversky index
  ``TI = ⟨p̂, s⟩ / (⟨p̂, s⟩ + α⟨p̂, 1-s⟩ + β⟨1-p̂, s⟩)``; α weights false positives and
  β false negatives, α = β = ½ is Dice (Salehi et al. 2017, arXiv:1706.05721; MONAI ``TverskyLoss``).

Region losses include the background class and are computed per image
(``batch=False``), so each sample's loss is independent of the others in the
batch (needed by DP-SGD's per-sample gradients). ``smooth`` is added to the
numerator and denominator of the region ratios.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypedDict

import torch
from torch import nn

LossName = Literal["ce", "dice", "dice_ce", "focal", "tversky"]
LOSS_NAMES: tuple[str, ...] = ("ce", "dice", "dice_ce", "focal", "tversky")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _RegionKwargs(TypedDict):
    """Keyword arguments shared by the MONAI region losses (Dice, Dice + CE, Tversky)."""

    to_onehot_y: bool
    softmax: bool
    smooth_nr: float
    smooth_dr: float


class _ChannelTarget(nn.Module):
    """Adapts a MONAI loss that expects targets ``[B, 1, *spatial]`` to targets ``[B, *spatial]``."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, target.unsqueeze(1))


def _check_inputs(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    """Raise ``ValueError`` unless logits are ``[B, C, *S]`` and target is ``[B, *S]``."""
    if logits.dim() != target.dim() + 1 or logits.shape[:1] + logits.shape[2:] != target.shape:
        raise ValueError(
            f"logits must be [B, C, *S] for a target [B, *S]; got logits {tuple(logits.shape)}, "
            f"target {tuple(target.shape)}"
        )
    if logits.shape[1] != num_classes:
        raise ValueError(
            f"logits have {logits.shape[1]} channels, the loss was built for {num_classes} classes"
        )


def build_loss(
    name: str,
    num_classes: int,
    *,
    tversky_alpha: float = 0.3,
    tversky_beta: float = 0.7,
    focal_gamma: float = 2.0,
    smooth: float = 1e-5,
) -> LossFn:
    """Build a segmentation loss.

    Parameters
    ----------
    name : str
        one of :data:`LOSS_NAMES`.
    num_classes : int
        ``C`` (background included).
    tversky_alpha : float
        Tversky weight α of false positives.
    tversky_beta : float
        Tversky weight β of false negatives.
    focal_gamma : float
        focusing exponent γ of the focal loss.
    smooth : float
        smoothing added to numerator and denominator of the Dice and Tversky ratios.

    Returns
    -------
    LossFn
        ``loss(logits [B, C, *S] float, target [B, *S] int64) -> scalar tensor``.

    Raises
    ------
    ValueError
        unknown ``name``.
    """
    from monai.losses import DiceCELoss, DiceLoss, FocalLoss, TverskyLoss

    region: _RegionKwargs = {"to_onehot_y": True, "softmax": True, "smooth_nr": smooth, "smooth_dr": smooth}
    factories: dict[str, Callable[[], nn.Module]] = {
        "ce": nn.CrossEntropyLoss,
        "dice": lambda: _ChannelTarget(DiceLoss(**region)),
        "dice_ce": lambda: _ChannelTarget(DiceCELoss(**region)),
        "focal": lambda: _ChannelTarget(FocalLoss(to_onehot_y=True, use_softmax=True, gamma=focal_gamma)),
        "tversky": lambda: _ChannelTarget(TverskyLoss(alpha=tversky_alpha, beta=tversky_beta, **region)),
    }
    if name not in factories:
        raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
    loss = factories[name]()

    def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_inputs(logits, target, num_classes)
        return loss(logits, target.long())

    return segmentation_loss
