"""The triggers and sample edits of the poisoning attacks, per input kind.

Inputs: image samples ``x [C, H, W]`` (digits, segmentation), feature vectors ``x [F]`` (tabular) and bags of
tiles ``x [K, 3, T, T]`` (MIL). The trigger of an image is a ``patch_size × patch_size`` square of value
``patch_value`` in the bottom-right corner of every channel (BadNets, Gu, Dolan-Gavitt & Garg 2017,
arXiv:1708.06733); the trigger of a feature vector sets its first ``patch_size`` features to
``patch_value · TABULAR_TRIGGER_SCALE``, a value far outside the data (the tabular task's features have unit noise
around cluster centres of spread ``separation/√F``); the trigger of a bag is the image trigger on a share of its
real (unpadded) tiles (:func:`add_bag_trigger`). The targets a poisoned sample gets: a new scalar label
(:func:`relabelled`: a class, or a MIL bag label) or, on segmentation, a mask edit that relabels one class
(:func:`erase`). :data:`INPUT_KINDS` lists the classification tasks (a label per sample); which trigger and
target the backdoor combines per task is in :mod:`privacy.attacks.backdoor` (Bagdasaryan, Veit, Hua, Estrin &
Shmatikov 2020, "How To Backdoor Federated Learning", AISTATS, arXiv:1807.00459).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

InputKind = Literal["image", "vector"]

INPUT_KINDS: dict[str, InputKind] = {"digits": "image", "tabular": "vector"}
"""Classification tasks → the kind of their inputs (samples ``(x, y)`` with a class label y)."""

Sample = tuple[torch.Tensor, ...]
"""One sample of a task's dataset: ``(x, y, ...)`` (MIL: ``(bag, label, tile_labels, padding, log_odds)``)."""

TABULAR_TRIGGER_SCALE = 5.0
"""A tabular trigger feature is ``patch_value · 5``: five noise standard deviations of the tabular task."""


def add_trigger(x: torch.Tensor, kind: InputKind, patch_size: int, patch_value: float) -> torch.Tensor:
    """The inputs with the trigger stamped on them (a copy).

    Parameters
    ----------
    x : torch.Tensor
        ``[..., C, H, W]`` images (``kind`` ``"image"``) or ``[..., F]`` feature vectors (``"vector"``).
    kind : {"image", "vector"}
        Which trigger: a bottom-right ``patch_size × patch_size`` square of ``patch_value`` on every channel
        (Gu et al. 2017, BadNets), or the first ``patch_size`` features set to
        ``patch_value · TABULAR_TRIGGER_SCALE``.
    patch_size, patch_value : int, float
        Size (pixels or features) and value of the trigger.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``.
    """
    triggered = x.clone()
    if kind == "image":
        triggered[..., -patch_size:, -patch_size:] = patch_value
    else:
        triggered[..., :patch_size] = patch_value * TABULAR_TRIGGER_SCALE
    return triggered


def add_bag_trigger(bags: torch.Tensor, padding: torch.Tensor, fraction: float, patch_size: int,
                    patch_value: float) -> torch.Tensor:
    """Bags with the image trigger on a share of their real tiles (a copy).

    Bag b with :math:`K_b` real tiles gets the trigger of :func:`add_trigger` on its first
    :math:`m_b = \\max(1, \\mathrm{round}(\\text{fraction} \\cdot K_b))` real tiles (attention and mean pooling are
    permutation invariant, and the synthetic slides place their tumour tiles at random positions, so "first" is
    as good as a random choice and needs no random stream).

    Parameters
    ----------
    bags : torch.Tensor
        ``[..., K, C, T, T]`` tiles (one bag or a batch of bags).
    padding : torch.Tensor
        ``[..., K]`` bool, ``True`` where a tile is padding (never triggered).
    fraction : float
        Share of a bag's real tiles that carry the trigger, in ``(0, 1]``.
    patch_size, patch_value : int, float
        The square's side (pixels) and value.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``bags``.
    """
    real = ~padding
    rank = real.long().cumsum(dim=-1) - 1  # index of each real tile among the bag's real tiles
    wanted = (fraction * real.sum(dim=-1, keepdim=True)).round().clamp(min=1)
    chosen = real & (rank < wanted)
    triggered = bags.clone()
    triggered[chosen] = add_trigger(bags[chosen], "image", patch_size, patch_value)
    return triggered


Edit = Callable[[Sample], Sample]
"""One sample → the sample the malicious site trains on (same fields, shapes and dtypes)."""


def relabelled(sample: Sample, y: torch.Tensor | float) -> Sample:
    """``sample`` with its scalar label (field 1, shape ``[]``) replaced by the value ``y``, in the label's dtype."""
    return (sample[0], torch.full_like(sample[1], float(y)), *sample[2:])


def erase(mask: torch.Tensor, source: int, target: int) -> torch.Tensor:
    """The segmentation backdoor's mask edit :math:`m'(p) = \\tau` where :math:`m(p) = s`, else :math:`m(p)` (any shape, int)."""
    return torch.where(mask == source, torch.full_like(mask, target), mask)
