"""The Gaussian mechanism on a model's tensors: seeded noise, and which tensors an upload protects.

Shared by the mechanisms that perturb what a site uploads or what the server
broadcasts (:mod:`privacy.nbafl`, :mod:`privacy.central`), which clip first with
:func:`strategies.norms.clip_to_norm`:

    x̃ = x + n,   n ~ N(0, σ² I)               add_gaussian_noise

and :func:`protected_names`, which says which tensors of an upload a mechanism
covers: the floating-point ones, which must all be trained parameters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Mapping

import torch

from strategies.norms import check_floating


def add_gaussian_noise(
    tensors: Mapping[str, torch.Tensor], sigma: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """x̃ = x + n with n ~ N(0, σ² I) on every entry (NbAFL's σ_U and σ_D, DP-FedAvg's z S / n).

    The noise is drawn in float64 from ``generator`` on the generator's device, tensor by tensor in the
    mapping's order (so a seed gives the same noise on any device), and the sum is cast back to each
    input's dtype. σ = 0 returns copies and draws nothing.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    check_floating(tensors, "add_gaussian_noise")
    if sigma == 0:
        return {name: t.detach().clone() for name, t in tensors.items()}
    noisy: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64, device=generator.device)
        noisy[name] = (t.detach().double() + float(sigma) * noise.to(t.device)).to(t.dtype)
    return noisy


def protected_names(tensors: Mapping[str, torch.Tensor], trainable: Collection[str], mechanism: str) -> list[str]:
    """The names of x in ``tensors``: the floating-point ones, which must all be in ``trainable``.

    Integer tensors (``num_batches_tracked``) are left out: they count local steps, a function of |D_i|,
    the batch size and the epochs only, equal for neighbouring data sets, so they cost no privacy.

    Raises
    ------
    ValueError
        (one line, naming ``mechanism``) for floating-point tensors that are not trained parameters
        (BatchNorm running statistics): computed from the data, they would leave the site unprotected.
    """
    floating = [name for name, tensor in tensors.items() if torch.is_floating_point(tensor)]
    stray = [name for name in floating if name not in trainable]
    if stray:
        shown = ", ".join(stray[:2]) + (f" and {len(stray) - 2} more" if len(stray) > 2 else "")
        raise ValueError(
            f"privacy.mechanism {mechanism}: the upload holds floating-point tensors that are not trained parameters "
            f"({shown}); computed from the data (BatchNorm running statistics), they would leave the site "
            "unprotected: use a model without BatchNorm (e.g. task.params.norm: group) or a strategy that keeps "
            "BatchNorm local"
        )
    return floating
