"""The 2D U-Net of the segmentation task (MONAI ``UNet``, Ronneberger et al. 2015, arXiv:1505.04597).

Encoder widths ``channels`` with stride-2 downsampling between them, one
residual unit per level, PReLU activations. The normalisation layer is the
knob federated strategies care about:

* ``"batch"``: ``BatchNorm2d``, whose running statistics FedBN keeps local;
  rejected by Opacus (DP-SGD needs per-sample gradients).
* ``"instance"``: ``InstanceNorm2d(affine=True)``, per-image statistics.
* ``"group"``: ``GroupNorm(num_groups)``. MONAI normalises every block,
  including the final up-block, which has ``num_classes`` channels, so
  ``num_groups`` must divide every width *and* ``num_classes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from medtasks.seeding import derive_seed, seed_torch

NormName = Literal["batch", "instance", "group"]


def check_group_norm(channels: Sequence[int], num_classes: int, num_groups: int) -> None:
    """Raise ``ValueError`` unless ``num_groups`` divides every U-Net width and ``num_classes``."""
    widths = (*channels, num_classes)
    bad = [c for c in widths if c % num_groups]
    if bad:
        raise ValueError(
            f"group norm with num_groups={num_groups} needs every U-Net width divisible by it, "
            f"including the final up-block's out_channels=num_classes={num_classes}; "
            f"channels={tuple(channels)} has indivisible {bad}; pick num_groups from the common "
            f"divisors of {widths} (1 always works)"
        )


def _norm(norm: str, num_groups: int) -> tuple[str, dict]:
    """MONAI norm spec for ``norm``."""
    specs: dict[str, tuple[str, dict]] = {
        "batch": ("batch", {}),
        "instance": ("instance", {"affine": True}),
        "group": ("group", {"num_groups": num_groups}),
    }
    if norm not in specs:
        raise ValueError(f"unknown norm {norm!r}; choose batch, instance or group")
    return specs[norm]


def build_unet(
    num_classes: int,
    channels: Sequence[int] = (8, 16, 32, 64),
    norm: NormName = "batch",
    num_groups: int = 4,
    seed: int = 0,
) -> nn.Module:
    """A freshly initialised 2D U-Net, identical for identical arguments.

    The weights are drawn from ``torch.manual_seed(derive_seed(seed, "model-init"))``
    inside ``torch.random.fork_rng``, so the global torch RNG is left untouched.

    Parameters
    ----------
    num_classes : int
        output channels ``C`` (background included).
    channels : Sequence[int]
        encoder widths; ``len(channels) - 1`` stride-2 levels, so the input
        side must be a multiple of ``2 ** (len(channels) - 1)``.
    norm : NormName
        ``"batch"``, ``"instance"`` or ``"group"``.
    num_groups : int
        groups of ``GroupNorm`` (``norm == "group"`` only).
    seed : int
        scenario seed.

    Returns
    -------
    nn.Module
        A module mapping ``[B, 1, H, W]`` images to ``[B, C, H, W]`` logits.

    Raises
    ------
    ValueError
        fewer than two widths, unknown norm, or group counts that do not divide.
    """
    from monai.networks.nets import UNet

    if len(channels) < 2:
        raise ValueError(f"the U-Net needs at least two widths, got channels={tuple(channels)}")
    if norm == "group":
        check_group_norm(channels, num_classes, num_groups)
    with torch.random.fork_rng(devices=[]):
        seed_torch(derive_seed(seed, "model-init"))
        return UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=num_classes,
            channels=tuple(channels),
            strides=(2,) * (len(channels) - 1),
            num_res_units=1,
            norm=_norm(norm, num_groups),
        )
