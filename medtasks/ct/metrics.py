"""Image-quality metrics of CT reconstructions: PSNR, SSIM and RMSE in Hounsfield units.

Every function takes batches ``[B, 1, H, W]`` (or ``[B, H, W]``) and returns one value per
image, ``[B]``, so a caller can average over a dataset however it likes (the CT task averages
per image).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from medtasks.ct.physics import MU_WATER, to_hu

__all__ = ["SSIM_K1", "SSIM_K2", "SSIM_SIGMA", "SSIM_WINDOW", "psnr", "rmse_hu", "ssim"]

SSIM_WINDOW = 11
"""Side of the Gaussian SSIM window (``2 · ⌊3.5 σ + 0.5⌋ + 1``, scikit-image's truncation)."""
SSIM_SIGMA = 1.5
"""Standard deviation of the Gaussian SSIM window in pixels (Wang et al. 2004)."""
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _images(x: Tensor, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Checks equal shapes and returns both as ``[B, 1, H, W]``."""
    if x.shape != ref.shape:
        raise ValueError(f"image and reference shapes differ: {list(x.shape)} vs {list(ref.shape)}")
    if x.dim() == 3:
        return x.unsqueeze(1), ref.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected images [B, 1, H, W] or [B, H, W], got {list(x.shape)}")
    return x, ref


def _mse(x: Tensor, ref: Tensor) -> Tensor:
    """Per-image mean squared error ``(1/HW) Σ (x − ref)²``, ``[B]``."""
    x, ref = _images(x, ref)
    return (x - ref).pow(2).flatten(1).mean(dim=1)


def psnr(x: Tensor, ref: Tensor, data_range: float) -> Tensor:
    """Peak signal-to-noise ratio ``10 · log10(R² / MSE)`` in dB, per image.

    Parameters
    ----------
    x : Tensor
        Reconstructions ``[B, 1, H, W]`` or ``[B, H, W]``.
    ref : Tensor
        References of the same shape.
    data_range : float
        ``R``, the span of the intensity scale (1 for images normalised to ``[0, 1]``).

    Returns
    -------
    Tensor
        ``[B]`` PSNR in dB; ``+inf`` where ``x == ref``.
    """
    return 10.0 * torch.log10(data_range**2 / _mse(x, ref))


def rmse_hu(x: Tensor, ref: Tensor, mu_water: float = MU_WATER) -> Tensor:
    """Root-mean-square error in Hounsfield units, ``sqrt((1/HW) Σ (h(x) − h(ref))²)``, per image.

    ``h(μ) = 1000 (μ − μ_water) / μ_water`` (:func:`~medtasks.ct.physics.to_hu`).

    Parameters
    ----------
    x : Tensor
        Reconstructions ``[B, 1, H, W]`` or ``[B, H, W]`` in the units of ``mu_water``.
    ref : Tensor
        References of the same shape.
    mu_water : float, optional
        Water's value in those units (0.2 for 1/cm; 0.5 for the CT task's images,
        which are ``μ / (2 μ_water)``).

    Returns
    -------
    Tensor
        ``[B]`` RMSE in HU.
    """
    return _mse(to_hu(x, mu_water), to_hu(ref, mu_water)).sqrt()


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The normalised 2-D Gaussian window ``w(i, j) ∝ exp(−(i² + j²) / 2σ²)``, ``[1, 1, 11, 11]``."""
    k = torch.arange(SSIM_WINDOW, dtype=dtype, device=device) - (SSIM_WINDOW - 1) / 2
    g = torch.exp(-0.5 * (k / SSIM_SIGMA) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, SSIM_WINDOW, SSIM_WINDOW)


def ssim(x: Tensor, ref: Tensor, data_range: float) -> Tensor:
    """Structural similarity (Wang, Bovik, Sheikh & Simoncelli 2004, IEEE TIP 13(4)), per image.

    With local Gaussian-weighted statistics (window 11 × 11, σ = 1.5; population covariances),

    .. math::

        \\mathrm{SSIM} = \\frac{(2 μ_x μ_y + C_1)(2 σ_{xy} + C_2)}
                              {(μ_x^2 + μ_y^2 + C_1)(σ_x^2 + σ_y^2 + C_2)},
        \\quad C_1 = (K_1 R)^2,\\ C_2 = (K_2 R)^2,

    averaged over the window positions that lie fully inside the image. This equals
    ``skimage.metrics.structural_similarity(gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=R)``.

    Parameters
    ----------
    x : Tensor
        Reconstructions ``[B, 1, H, W]`` or ``[B, H, W]``, ``H, W >= 11``.
    ref : Tensor
        References of the same shape.
    data_range : float
        ``R``, the span of the intensity scale.

    Returns
    -------
    Tensor
        ``[B]`` mean SSIM in ``[−1, 1]``.
    """
    x, ref = _images(x, ref)
    if min(x.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} × {SSIM_WINDOW}, got {list(x.shape)}")
    window = _gaussian_window(x.dtype, x.device)

    def local_mean(image: Tensor) -> Tensor:  # E_w[image] at every full window position
        return F.conv2d(image, window)

    mu_x, mu_y = local_mean(x), local_mean(ref)
    var_x = local_mean(x * x) - mu_x**2  # σ_x² = E[x²] − μ_x²
    var_y = local_mean(ref * ref) - mu_y**2
    cov = local_mean(x * ref) - mu_x * mu_y  # σ_xy = E[xy] − μ_x μ_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    numerator = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    denominator = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=1)

