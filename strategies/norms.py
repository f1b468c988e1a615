"""L2 norms and norm clipping of a collection of tensors, treated as one vector.

Shared by the update-norm bound of the defenses (:mod:`strategies.aggregation`, Sun et al. 2019,
arXiv:1911.07963) and the privacy mechanisms that clip what a site uploads (:mod:`privacy.nbafl`,
:mod:`privacy.central`):

    ‖x‖₂ = sqrt(Σ_tensors Σ_entries x²)      l2_norm       (in float64)
    x ← x / max(1, ‖x‖₂ / C)                clip_to_norm  (one factor for every tensor)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch


def check_floating(tensors: Mapping[str, torch.Tensor], caller: str) -> None:
    for name, tensor in tensors.items():
        if not torch.is_floating_point(tensor):
            raise ValueError(f"{caller}: tensor {name!r} has dtype {tensor.dtype}; only floating-point tensors")


def l2_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """‖x‖₂ of the concatenation of all given tensors, computed in float64."""
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors.values()))


def clip_to_norm(tensors: Mapping[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """x ← x / max(1, ‖x‖₂ / C): NbAFL's weight clipping, DP-FedAvg's update clipping.

    x is the concatenation of all given tensors: one L2 norm over every entry of every tensor (computed
    in float64), one common factor for all. Returns new tensors of the input dtypes, unchanged copies
    when ‖x‖₂ ≤ C. Pass exactly the tensors the sensitivity is meant to cover.
    """
    if isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not math.isfinite(clip) or clip <= 0:
        raise ValueError(f"clip must be a finite number > 0, got {clip!r}")
    check_floating(tensors, "clip_to_norm")
    norm = l2_norm(tensors)
    if norm <= clip:
        return {name: t.detach().clone() for name, t in tensors.items()}
    factor = clip / norm
    return {name: (t.detach().double() * factor).to(t.dtype) for name, t in tensors.items()}
