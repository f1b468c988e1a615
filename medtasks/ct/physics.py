"""The CT measurement model: Beer–Lambert attenuation, photon (Poisson) noise, detector blur, Hounsfield units.

Units used throughout ``medtasks.ct``:

* Images hold the linear attenuation coefficient ``μ`` in **1/cm**. Water is
  :data:`MU_WATER` ``= 0.2 /cm``, a round value for the ≈ 60–70 keV effective energy of a 120 kVp
  spectrum (NIST gives 0.206 /cm at 60 keV and 0.193 /cm at 70 keV). Air is 0.
* :class:`~medtasks.ct.operator.RadonOperator` integrates with a step of one pixel, so a
  sinogram ``A μ`` is in ``(1/cm) · pixels``. The dimensionless line integral ``g = ∫_Γ μ ds``
  that an X-ray measurement gives (Kak & Slaney, *Principles of Computerized Tomographic
  Imaging*, ch. 4) is ``p = Δ · A μ`` with the pixel size ``Δ`` in cm.
* By default the image spans a field of view of :data:`FIELD_OF_VIEW_CM` ``= 25.6 cm`` (a head or
  a small abdomen), whatever ``N`` is: ``Δ = 25.6 / N``, i.e. 0.4 cm at ``N = 64`` and 0.2 cm at
  ``N = 128``. Line integrals, and so the noise at a given dose, then do not depend on the
  resolution. A 20 cm water path gives ``p = 4`` (transmission 1.8 %). At ``I0 = 1e3`` photons
  such a ray detects about 18 photons (post-log noise std ≈ 0.24). At ``I0 = 1e6`` it detects
  18 000 (std ≈ 0.007). Doses in ``[1e3, 1e6]`` therefore range from very noisy to almost clean
  on a 64 × 64 phantom. Measured on :func:`~medtasks.ct.phantoms.torso_phantom` at ``N = 64`` with
  60 views (ramp FBP), the noise std is about 160 / 50 / 16 / 5 HU at ``I0`` = 1e3 / 1e4 / 1e5 /
  1e6. The noise-free FBP error is 44 HU.

Every ``sinogram`` argument below is in operator units (``A μ``). Pass ``pixel_size_cm=1.0`` if
it already holds dimensionless line integrals. The noisy measurement is returned in the same
operator units, so it can go straight into ``fbp`` or a data-consistency term ``‖A μ − y‖²``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FIELD_OF_VIEW_CM",
    "MU_WATER",
    "detector_blur",
    "from_hu",
    "noisy_measurement",
    "pixel_size_cm",
    "to_hu",
    "transmission",
]

MU_WATER: float = 0.2
"""Linear attenuation of water in 1/cm at the effective energy assumed (≈ 60–70 keV)."""

FIELD_OF_VIEW_CM: float = 25.6
"""Default side length of the reconstructed square in cm; the pixel size is ``FIELD_OF_VIEW_CM / N``."""


def pixel_size_cm(image_size: int, field_of_view_cm: float = FIELD_OF_VIEW_CM) -> float:
    """Returns the pixel size ``Δ = FOV / N`` in cm (0.4 cm for ``N = 64`` at the default 25.6 cm FOV)."""
    return field_of_view_cm / image_size


def _pixel_size(sinogram: Tensor, pixel_size: float | None) -> float:
    """Returns ``pixel_size``, or the default ``Δ`` for the sinogram's ``N = sinogram.shape[-1]`` bins if it is None."""
    return pixel_size_cm(sinogram.shape[-1]) if pixel_size is None else float(pixel_size)


def transmission(sinogram: Tensor, i0: float, *, pixel_size_cm: float | None = None) -> Tensor:
    """Returns the expected photon counts from Beer–Lambert, ``I = I0 · exp(−∫_Γ μ ds) = I0 · exp(−Δ · A μ)``.

    This is the monoenergetic Beer–Lambert law ``I_d = I0 exp(−∫_{Γ_d} μ(s, Ē) ds)`` at the
    effective energy ``Ē``, without beam hardening (Buzug, *Computed Tomography: From Photon
    Statistics to Modern Cone-Beam CT*, Springer 2008; Kak & Slaney, ch. 4).

    Parameters
    ----------
    sinogram : Tensor
        ``A μ`` in operator units, ``[..., A, N]``.
    i0 : float
        Unattenuated photons per detector bin (the dose), e.g. 1e3 (very low) to 1e6.
    pixel_size_cm : float | None, optional
        ``Δ`` in cm. None uses ``FIELD_OF_VIEW_CM / N``.

    Returns
    -------
    Tensor
        Expected counts ``[..., A, N]``.
    """
    return i0 * torch.exp(-_pixel_size(sinogram, pixel_size_cm) * sinogram)


def noisy_measurement(
    sinogram: Tensor,
    i0: float,
    generator: torch.Generator | None = None,
    *,
    pixel_size_cm: float | None = None,
    blur_sigma: float = 0.0,
) -> Tensor:
    """Simulates a post-log sinogram with photon noise at dose ``I0``.

    The steps are:

    1. ``Ī = blur(I0 · exp(−Δ · A μ))``: expected counts, blurred along the detector by
       ``blur_sigma`` bins (the detector acts on intensities, before the log).
    2. ``n ~ Poisson(Ī)``: photon counting noise.
    3. ``y = −ln(max(n, 1) / I0) / Δ``: the Beer–Lambert law solved for the line integral,
       ``g_d = −ln(I_d / I0)`` (Buzug, *Computed Tomography*), converted back to operator units.
       Zero counts (photon starvation) are clamped to one, so ``log 0`` never happens. This caps
       ``y`` at ``ln(I0)/Δ``.

    Parameters
    ----------
    sinogram : Tensor
        Noiseless ``A μ`` in operator units, ``[..., A, N]``.
    i0 : float
        Unattenuated photons per bin. The noise std of ``Δ·y`` is about ``1/sqrt(Ī)``.
    generator : torch.Generator | None, optional
        Torch generator for the Poisson draw. The same seeded generator gives the same noise.
    pixel_size_cm : float | None, optional
        ``Δ`` in cm. None uses ``FIELD_OF_VIEW_CM / N``.
    blur_sigma : float, optional
        Gaussian detector blur in bins (0 = none).

    Returns
    -------
    Tensor
        Noisy sinogram ``[..., A, N]`` in operator units and in the input dtype. No gradient flows through it.
    """
    delta = _pixel_size(sinogram, pixel_size_cm)
    expected = detector_blur(transmission(sinogram.detach(), i0, pixel_size_cm=delta), blur_sigma)
    counts = torch.poisson(expected, generator=generator)
    return -torch.log(counts.clamp_min(1.0) / i0) / delta


def _gaussian_kernel(sigma: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Returns a normalised 1-D Gaussian ``exp(−k²/2σ²)`` truncated at ``|k| ≤ ⌈4σ⌉``, shape ``[2r+1]``."""
    radius = max(1, math.ceil(4.0 * sigma))
    k = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    kernel = torch.exp(-0.5 * (k / sigma) ** 2)
    return kernel / kernel.sum()


def detector_blur(sinogram: Tensor, sigma: float) -> Tensor:
    """Convolves every projection with a Gaussian along the detector axis: ``y[k] = Σ_j G_σ(j) p[k − j]``.

    The edges are replicated, so flat signals stay flat. The kernel sums to one, so total counts are kept.

    Parameters
    ----------
    sinogram : Tensor
        ``[..., A, N]``.
    sigma : float
        Standard deviation in detector bins. ``0`` returns the input unchanged.

    Returns
    -------
    Tensor
        Blurred sinogram ``[..., A, N]``. Differentiable.
    """
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return sinogram
    kernel = _gaussian_kernel(sigma, sinogram.dtype, sinogram.device)
    radius = kernel.numel() // 2
    rows = sinogram.reshape(-1, 1, sinogram.shape[-1])
    padded = F.pad(rows, (radius, radius), mode="replicate")
    return F.conv1d(padded, kernel.view(1, 1, -1)).reshape(sinogram.shape)


def to_hu(mu: Tensor, mu_water: float = MU_WATER) -> Tensor:
    """Converts μ to Hounsfield units: ``h = 1000 · (μ − μ_water) / (μ_water − μ_air)`` with ``μ_air = 0``.

    Water maps to 0 HU and air to −1000 HU. ``mu`` and ``mu_water`` must be in the same units
    (1/cm, or ``mu_water = 1`` for images normalised to water).
    """
    return 1000.0 * (mu - mu_water) / mu_water


def from_hu(hu: Tensor, mu_water: float = MU_WATER) -> Tensor:
    """Inverse of :func:`to_hu`: ``μ = μ_water · (1 + h / 1000)``."""
    return mu_water * (1.0 + hu / 1000.0)
