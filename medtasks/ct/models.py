"""Learned reconstruction networks for sparse-view CT.

Both models share one call signature, ``model(fbp, sinogram, operator) -> image``:

* ``fbp``: filtered backprojection of the measurement, ``[B, 1, N, N]``;
* ``sinogram``: the measurement ``y``, ``[B, 1, A, N]``, in the image's units times pixels
  (so that ``A x ≈ y`` for the image ``x``);
* ``operator``: the :class:`~medtasks.ct.operator.RadonOperator` of the batch's geometry.

The operator is an argument, never an attribute: its sparse system matrix must not enter the
``state_dict`` that federated clients send, and one network serves sites with different
geometries (numbers of views, angular ranges).

Models:

* :class:`FBPConvNet`: ``x̂ = FBP(y) + U(FBP(y))`` with a U-Net ``U`` (Jin, McCann, Froustey &
  Unser 2017, "Deep Convolutional Neural Network for Inverse Problems in Imaging", IEEE TIP,
  arXiv:1611.03679). It ignores ``sinogram`` and ``operator``.
* :class:`UnrolledProximalGradient`: ``K`` iterations of a gradient step on ``½‖Ax − y‖²``
  followed by a learned residual proximal CNN, started from the FBP (learned proximal gradient
  descent; Adler & Öktem 2017, "Solving ill-posed inverse problems using iterative deep neural
  networks", arXiv:1704.04058, and 2018, "Learned Primal-Dual Reconstruction",
  arXiv:1707.06474).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medtasks.ct.operator import RadonOperator
from medtasks.seeding import derive_seed, seed_torch
from medtasks.segmentation.model import NormName, build_unet

__all__ = ["FBPConvNet", "ProximalCNN", "UnrolledProximalGradient"]

#: ``softplus⁻¹(1) = log(e − 1)``: the raw step parameter that gives a relative step of 1.
_SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


class FBPConvNet(nn.Module):
    """FBPConvNet: residual U-Net post-processing of the FBP (Jin et al. 2017, arXiv:1611.03679).

    .. math:: \\hat x = x_{\\mathrm{FBP}} + W_{1×1} * U(x_{\\mathrm{FBP}})

    ``U`` is a MONAI U-Net (:func:`medtasks.segmentation.model.build_unet`) with ``channels[0]``
    output features and ``W_{1×1}`` a zero-initialised 1 × 1 convolution, so a fresh network is
    exactly the FBP and training only learns the correction (the artefacts and noise).

    Parameters
    ----------
    channels : Sequence[int], optional
        U-Net widths, one per level; the image side must be a multiple of
        ``2 ** (len(channels) - 1)``.
    norm : NormName, optional
        ``"batch"``, ``"instance"`` or ``"group"``.
    num_groups : int, optional
        Groups of ``GroupNorm`` (``norm == "group"``); divides every width.
    seed : int, optional
        Scenario seed; the same seed gives the same weights, the global RNG is untouched.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64),
        norm: NormName = "batch",
        num_groups: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.unet = build_unet(channels[0], channels, norm, num_groups, seed=seed)
        self.head = nn.Conv2d(channels[0], 1, kernel_size=1)
        assert self.head.bias is not None  # nn.Conv2d has a bias unless built with bias=False
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, fbp: Tensor, sinogram: Tensor | None = None, operator: RadonOperator | None = None) -> Tensor:
        """Returns ``x̂ = fbp + W * U(fbp)``, ``[B, 1, N, N]``; ``sinogram`` and ``operator`` are unused."""
        return fbp + self.head(self.unet(fbp))


class ProximalCNN(nn.Module):
    """A residual 3-layer CNN used as a learned proximal step: ``x ↦ x + C(x)``.

    ``C = conv3×3(c→1) ∘ PReLU ∘ conv3×3(c→c) ∘ PReLU ∘ conv3×3(1→c)``, without normalisation
    (per-sample gradients stay exact for DP-SGD). The last convolution starts at zero, so a fresh
    proximal step is the identity.

    Parameters
    ----------
    width : int, optional
        Hidden channels ``c``.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.PReLU(width),
            nn.Conv2d(width, width, 3, padding=1),
            nn.PReLU(width),
            nn.Conv2d(width, 1, 3, padding=1),
        )
        last = cast(nn.Conv2d, self.layers[-1])  # Sequential indexing is typed as a plain Module
        assert last.bias is not None  # nn.Conv2d has a bias unless built with bias=False
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Returns ``x + C(x)``, ``[B, 1, N, N]``."""
        return x + self.layers(x)


class UnrolledProximalGradient(nn.Module):
    """Learned proximal gradient descent on ``½‖Ax − y‖²``, unrolled for ``K`` iterations.

    Starting from ``x_0 = x_FBP``, iteration ``k = 0 … K−1`` computes

    .. math::

        z_k = x_k - η_k A^\\top (A x_k - y), \\qquad x_{k+1} = z_k + C_k(z_k),

    with step sizes ``η_k = softplus(ρ_k) / ‖A‖²`` (positive; a fresh network has ``η_k = 1/‖A‖²``,
    the classic safe step) and residual proximal CNNs ``C_k`` (:class:`ProximalCNN`, zero at
    initialisation, so a fresh network is ``K`` plain Landweber steps from the FBP). Learning the
    step *relative* to ``1/‖A‖²`` lets one network serve geometries with different ``‖A‖``
    (more views ⇒ larger ``‖A‖``). ``‖A‖`` is estimated by
    :meth:`~medtasks.ct.operator.RadonOperator.operator_norm` (cached per operator).

    Parameters
    ----------
    iterations : int, optional
        ``K``.
    width : int, optional
        Hidden channels of every proximal CNN.
    shared_weights : bool, optional
        One proximal CNN for all iterations (the step sizes stay per iteration).
    seed : int, optional
        Scenario seed; the same seed gives the same weights, the global RNG is untouched.
    """

    def __init__(self, iterations: int = 5, width: int = 32, shared_weights: bool = False, seed: int = 0) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        self.iterations = iterations
        self.shared_weights = shared_weights
        with torch.random.fork_rng(devices=[]):
            seed_torch(derive_seed(seed, "model-init"))
            self.prox = nn.ModuleList(ProximalCNN(width) for _ in range(1 if shared_weights else iterations))
        self.step_raw = nn.Parameter(torch.full((iterations,), _SOFTPLUS_INV_ONE))

    def step_sizes(self, operator: RadonOperator) -> Tensor:
        """``η_k = softplus(ρ_k) / ‖A‖²`` for the operator's geometry, ``[K]``."""
        return F.softplus(self.step_raw) / operator.operator_norm() ** 2

    def forward(self, fbp: Tensor, sinogram: Tensor, operator: RadonOperator) -> Tensor:
        """Runs the ``K`` iterations from ``x_0 = fbp``.

        Parameters
        ----------
        fbp : Tensor
            ``[B, 1, N, N]``.
        sinogram : Tensor
            ``y``, ``[B, 1, A, N]``.
        operator : RadonOperator
            ``A`` of the batch's geometry.

        Returns
        -------
        Tensor
            ``x_K``, ``[B, 1, N, N]``.
        """
        eta = self.step_sizes(operator).to(fbp.dtype)
        x = fbp
        for k in range(self.iterations):
            x = x - eta[k] * operator.adjoint(operator.forward(x) - sinogram)  # z_k = x_k − η_k Aᵀ(A x_k − y)
            x = self.prox[0 if self.shared_weights else k](x)  # x_{k+1} = z_k + C_k(z_k)
        return x
