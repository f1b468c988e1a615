"""How close a reconstruction is to the truth: PSNR, SSIM, and the best matching of a batch.

PSNR = 10 log10(R² / MSE) with R the data range (Hore and Ziou 2010, "Image Quality Metrics: PSNR vs. SSIM",
ICPR). SSIM (Wang et al. 2004, "Image quality assessment: from error visibility to structural similarity",
IEEE TIP 13(4)) is MONAI's (:class:`monai.metrics.SSIMMetric`, Gaussian window σ = 1.5), with a window no
larger than the image (7, or 3 for images under 7 pixels a side). A batch reconstruction comes back in an
order of its own: it is scored after matching reconstructions to true samples one to one by the assignment
that maximises the total PSNR (Hungarian method, :func:`scipy.optimize.linear_sum_assignment`), as gradient
inversion papers score batches (Geiping et al. 2020, Sec. 6).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.metrics import SSIMMetric
from scipy.optimize import linear_sum_assignment


def psnr(reconstruction: torch.Tensor, truth: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample, in dB.

    Parameters
    ----------
    reconstruction, truth : torch.Tensor
        ``[B, ...]``, same shape.
    data_range : float
        R, the span of valid values (1 for images in [0, 1]).

    Returns
    -------
    torch.Tensor
        ``[B]``; ``inf`` for an exact copy.
    """
    if reconstruction.shape != truth.shape:
        raise ValueError(f"shapes differ: {tuple(reconstruction.shape)} and {tuple(truth.shape)}")
    mse = (reconstruction.double() - truth.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range**2 / mse)


def ssim(reconstruction: torch.Tensor, truth: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity per sample, averaged over channels.

    Parameters
    ----------
    reconstruction, truth : torch.Tensor
        ``[B, C, H, W]``, same shape, values in a range of width ``data_range``.
    data_range : float
        The span of valid values.

    Returns
    -------
    torch.Tensor
        ``[B]``, in [-1, 1]; 1 for an exact copy.
    """
    if reconstruction.shape != truth.shape or reconstruction.dim() != 4:
        raise ValueError(f"ssim takes two [B, C, H, W] tensors of one shape, got {tuple(reconstruction.shape)} "
                         f"and {tuple(truth.shape)}")
    side = min(truth.shape[-2:])
    window = 7 if side >= 7 else 3
    metric = SSIMMetric(spatial_dims=2, data_range=data_range, win_size=window, reduction="none")
    values = metric(reconstruction.float(), truth.float())
    assert isinstance(values, torch.Tensor)  # one tensor for one pair of batches
    return values.reshape(truth.shape[0], -1).mean(dim=1)


def match(reconstruction: torch.Tensor, truth: torch.Tensor, data_range: float = 1.0) -> np.ndarray:
    """The order of ``reconstruction`` that pairs each true sample with its reconstruction.

    Parameters
    ----------
    reconstruction, truth : torch.Tensor
        ``[B, ...]``, same shape.

    Returns
    -------
    np.ndarray
        ``[B]`` indices ``order`` such that ``reconstruction[order]`` matches ``truth`` sample by sample,
        maximising the summed PSNR (capped at 100 dB, so exact copies do not dominate).
    """
    size = truth.shape[0]
    scores = np.zeros((size, size))
    for i in range(size):
        repeated = truth[i:i + 1].expand_as(reconstruction)
        scores[i] = np.minimum(psnr(reconstruction, repeated, data_range).numpy(), 100.0)
    _, order = linear_sum_assignment(scores, maximize=True)
    return np.asarray(order)


def reconstruction_quality(reconstruction: torch.Tensor, truth: torch.Tensor,
                           data_range: float = 1.0) -> dict[str, float]:
    """Mean PSNR (dB, capped at 100) and SSIM of a batch reconstruction after :func:`match`.

    Parameters
    ----------
    reconstruction, truth : torch.Tensor
        ``[B, C, H, W]``, same shape.

    Returns
    -------
    dict
        ``{"psnr": ..., "ssim": ...}``.
    """
    ordered = reconstruction[torch.as_tensor(match(reconstruction, truth, data_range))]
    values = torch.clamp(psnr(ordered, truth, data_range), max=100.0)
    return {"psnr": float(values.mean()), "ssim": float(ssim(ordered, truth, data_range).mean())}


def best_match_ssim(samples: torch.Tensor, references: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """For each sample, its highest SSIM against any reference (e.g. real images of a class).

    Parameters
    ----------
    samples : torch.Tensor
        ``[N, C, H, W]``.
    references : torch.Tensor
        ``[M, C, H, W]``.

    Returns
    -------
    torch.Tensor
        ``[N]``.
    """
    best = torch.full((samples.shape[0],), -math.inf)
    for reference in references:
        best = torch.maximum(best, ssim(samples, reference.unsqueeze(0).expand_as(samples), data_range))
    return best
