"""Stain colour maths for histology tiles: Beer–Lambert imaging, colour deconvolution and
per-site stain-vector shifts (Ruifrok & Johnston 2001, "Quantification of histochemical
staining by color deconvolution").

A stained, bright-field imaged pixel with stain concentrations ``c ∈ R^S`` has optical
density and colour

.. math:: \\mathrm{OD} = W^\\top c,\\qquad \\mathrm{RGB} = b \\exp(-\\mathrm{OD}),

with ``W ∈ R^{S×3}`` the stains' optical-density vectors (one row per stain) and ``b`` the
illumination brightness. Colour deconvolution inverts this for ``S = 3`` stains,
``c = OD · W^{-1}`` with ``OD = -log(max(x, 1/255))``. A site's staining protocol is
modelled by rotating a stain vector about the grey axis (its hue) and scaling it (its
strength); its scanner by brightness and Gaussian blur.

Pure NumPy/SciPy; shared by the H&E generator (:mod:`medtasks.mil.synthetic`), the IHC
demo (:mod:`medtasks.mil.ihc`) and the re-staining of real tiles.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import ndimage

#: Darkest transmitted intensity a uint8 scanner records; bounds the optical density.
MIN_INTENSITY = 1.0 / 255.0


def unit_rows(matrix: ArrayLike) -> np.ndarray:
    """``matrix`` with every row scaled to unit Euclidean length (read-only float64 copy)."""
    rows = np.asarray(matrix, dtype=np.float64)
    out = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    out.setflags(write=False)
    return out


#: Unit optical-density vectors ``[v_H; v_E]``, shape ``[2, 3]`` (RGB columns), of
#: haematoxylin and eosin (Ruifrok & Johnston 2001, as in ``skimage.color.rgb_from_hed``).
STAIN_MATRIX: np.ndarray = unit_rows([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])


def complete_stains(stains: np.ndarray) -> np.ndarray:
    """A ``[2, 3]`` stain matrix completed to ``[3, 3]`` with the unit residual ``v_1 × v_2``.

    The residual absorbs the part of a real tile's optical density that neither stain
    explains, so deconvolution followed by re-imaging is lossless.
    """
    stains = np.asarray(stains, dtype=np.float64)
    if stains.shape != (2, 3):
        raise ValueError(f"expected a [2, 3] stain matrix, got shape {stains.shape}")
    return unit_rows(np.vstack([stains, np.cross(stains[0], stains[1])]))


def rotate_about_grey(vector: np.ndarray, angle: float) -> np.ndarray:
    """Rotate an OD vector about the grey axis ``g = (1,1,1)/√3`` (Rodrigues' formula),
    ``v' = v cos α + (g × v) sin α + g (g·v)(1 - cos α)``, clipped to ``>= 0``, unit length."""
    g = np.full(3, 1.0 / np.sqrt(3.0))
    cos, sin = np.cos(angle), np.sin(angle)
    rotated = vector * cos + np.cross(g, vector) * sin + g * (g @ vector) * (1 - cos)
    rotated = np.clip(rotated, 0.0, None)
    return rotated / np.linalg.norm(rotated)


def shift_stains(stains: np.ndarray, rotations: Sequence[float], scales: Sequence[float]) -> np.ndarray:
    """A site's stain matrix: row ``i < len(rotations)`` becomes ``s_i R(α_i) v_i``; later rows
    (e.g. a residual) are kept.

    Parameters
    ----------
    stains : np.ndarray
        ``[S, 3]`` unit OD vectors.
    rotations : Sequence[float]
        ``α_i`` in radians about the grey axis (:func:`rotate_about_grey`).
    scales : Sequence[float]
        ``s_i`` (stain strength), same length as ``rotations``.

    Returns
    -------
    np.ndarray
        ``[S, 3]`` float64.
    """
    if len(rotations) != len(scales) or len(rotations) > len(stains):
        raise ValueError(f"{len(rotations)} rotations and {len(scales)} scales for {len(stains)} stains")
    shifted = np.array(stains, dtype=np.float64)
    for i, (angle, scale) in enumerate(zip(rotations, scales)):
        shifted[i] = scale * rotate_about_grey(shifted[i], angle)
    return shifted


def beer_lambert(
    concentrations: np.ndarray, stains: np.ndarray, brightness: float = 1.0, blur_sigma: float = 0.0
) -> np.ndarray:
    """Image stain concentrations: ``RGB = G_σ * clip_[0,1](b exp(-Wᵀ c))``.

    Parameters
    ----------
    concentrations : np.ndarray
        ``[..., S, T, T]``.
    stains : np.ndarray
        ``[S, 3]`` OD vectors ``W``.
    brightness : float
        ``b``.
    blur_sigma : float
        Gaussian blur ``σ`` in pixels (0 = none).

    Returns
    -------
    np.ndarray
        ``[..., 3, T, T]`` float32 RGB in ``[0, 1]``.
    """
    stains = np.asarray(stains, dtype=np.float32)
    if concentrations.shape[-3] != stains.shape[0]:
        raise ValueError(f"{concentrations.shape[-3]} concentration maps for {stains.shape[0]} stains")
    od = np.einsum("...shw,sc->...chw", concentrations, stains)
    rgb = np.clip(brightness * np.exp(-od), 0.0, 1.0)
    if blur_sigma > 0:
        sigma = (0,) * (rgb.ndim - 2) + (blur_sigma,) * 2
        rgb = ndimage.gaussian_filter(rgb, sigma, mode="reflect")
    return rgb.astype(np.float32)


def deconvolve(tiles: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Colour deconvolution: ``c = OD · W^{-1}``, ``OD = -log(max(x, 1/255))``.

    Parameters
    ----------
    tiles : np.ndarray
        ``[..., 3, T, T]`` RGB in ``[0, 1]``.
    stains : np.ndarray
        ``[3, 3]`` invertible OD matrix ``W`` (e.g. :func:`complete_stains`).

    Returns
    -------
    np.ndarray
        ``[..., 3, T, T]`` float32 concentrations (may be slightly negative where a tile
        holds colours outside the stains' cone).
    """
    stains = np.asarray(stains, dtype=np.float64)
    if stains.shape != (3, 3):
        raise ValueError(f"deconvolution needs a [3, 3] stain matrix, got shape {stains.shape}")
    od = -np.log(np.clip(np.asarray(tiles, dtype=np.float64), MIN_INTENSITY, 1.0))
    return np.einsum("...chw,cs->...shw", od, np.linalg.inv(stains)).astype(np.float32)
