"""Synthetic H&E-like slides for multiple-instance learning, and their per-site shifts.

A *slide* is a bag of ``K`` tiles ``X = {x_1, ..., x_K}`` (Ilse et al. 2018, §2.1, arXiv:1802.04712);
each tile is an RGB image ``[3, T, T]`` in ``[0, 1]``. Tiles are drawn as two
stain concentration maps, haematoxylin ``c_H`` (nuclei, blue-purple) and eosin
``c_E`` (stroma, pink), turned into colour by the Beer–Lambert colour
deconvolution model (Ruifrok & Johnston 2001):

.. math:: \\mathrm{OD}(p) = c_H(p)\\, v_H + c_E(p)\\, v_E,\\qquad \\mathrm{RGB}(p) = b \\exp(-\\mathrm{OD}(p)),

with ``v_H, v_E`` the unit optical-density vectors of the stains (:data:`STAIN_MATRIX`)
and ``b`` the illumination brightness.

Tumour and normal tiles differ in morphology, not in one pixel feature
(:class:`TissueStyle`):

* normal (:data:`NORMAL`): few small, round, equally sized nuclei spread over
  smooth fibrous eosin stroma;
* inflamed normal (:data:`INFLAMED`, a hard negative, a fraction
  :data:`INFLAMED_PROBABILITY` of normal tiles): many small, round, very dark
  lymphocyte-like nuclei, as crowded and dark as tumour;
* tumour-like (:data:`TUMOUR`): larger, irregular, elongated, pleomorphic,
  hyperchromatic nuclei in clusters, with gland-like lumina.

Inflamed tiles, lumina, a per-tile stain uptake and a per-tile stroma
counterstain make the mean colour of tumour and normal tiles overlap (each RGB
channel's effect size |d| is about 1 or less), so a model must look at nuclear
size and shape.

Bag labels follow the standard MIL assumption (Dietterich, Lathrop & Lozano-Pérez 1997,
Artificial Intelligence 89; Ilse et al. 2018, §2.1): ``Y = 1``
iff the slide holds at least one tumour tile. Tile truth is kept for
localisation metrics.

Per-site shifts (the non-IID kinds of :mod:`medtasks.partition`) are parameterised like the other tasks
(:class:`medtasks.partition.ParamRange`, drawn by :func:`medtasks.partition.draw_site_profiles`):

* :func:`acquire` (``feature_skew``, ``P_k(x)`` differs): stain vector rotation and
  scale, brightness and blur; labels unchanged. Parameters in :data:`ACQUISITION_SPACE`.
* :func:`annotate` (``concept_shift``, ``P_k(y|x)`` differs): the site's pathologist
  calls a slide positive only when its tumour fraction reaches a threshold.
  Parameters in :data:`ANNOTATOR_SPACE`.

Every slide of one :func:`generate_slides` call has the same ``K``; ``quantity_skew``
varies the number of slides per site, and bags of different sizes can be padded
for the models (:func:`medtasks.mil.models.pad_bags`).

Pure NumPy/SciPy, vectorised over tiles, deterministic given the generator passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage, special

from medtasks.mil.stains import (
    STAIN_MATRIX,
    beer_lambert,
    complete_stains,
    deconvolve,
    shift_stains,
)
from medtasks.partition import ParamRange, resolve_site_params

#: Feature-skew (scanner / staining protocol) parameters; see :func:`acquire`.
ACQUISITION_SPACE: dict[str, ParamRange] = {
    # Rotation (radians) of the haematoxylin OD vector about the grey axis (hue of the nuclei).
    "h_rotation": ParamRange(-0.35, 0.35, 0.0),
    # Rotation (radians) of the eosin OD vector about the grey axis (hue of the stroma).
    "e_rotation": ParamRange(-0.35, 0.35, 0.0),
    # Haematoxylin strength: scale of its OD vector (under/over-staining).
    "h_scale": ParamRange(0.7, 1.3, 1.0),
    # Eosin strength: scale of its OD vector.
    "e_scale": ParamRange(0.7, 1.3, 1.0),
    # Illumination brightness b in RGB = b·exp(-OD).
    "brightness": ParamRange(0.85, 1.15, 1.0),
    # Gaussian blur sigma in pixels (focus).
    "blur_sigma": ParamRange(0.0, 1.2, 0.0),
}

#: Concept-shift (annotator) parameters; see :func:`annotate`.
ANNOTATOR_SPACE: dict[str, ParamRange] = {
    # Smallest tumour fraction the site's pathologist calls positive (0 = any tumour tile).
    "positive_threshold": ParamRange(0.0, 0.3, 0.0),
}

#: Tile side the morphology sizes below are given for; other sizes scale them.
REFERENCE_TILE_SIZE = 32


@dataclass(frozen=True)
class TissueStyle:
    """Morphology and staining of one tile class, sizes in pixels of a 32-pixel tile.

    Attributes
    ----------
    nuclei : tuple[int, int]
        inclusive range of the number of nuclei per tile.
    radius : tuple[float, float]
        range of the tile's mean nuclear radius.
    pleomorphism : float
        log-normal sigma of each nucleus' radius around the tile mean.
    elongation : tuple[float, float]
        range of the axis ratio ``r_minor / r_major``.
    irregularity : tuple[float, float]
        amplitude range of the contour harmonics ``a_2, a_3``.
    chromatin : tuple[float, float]
        range of the nuclear haematoxylin concentration.
    cluster_spread : float | None
        standard deviation of nuclei around 1–2 cluster centres, as a
        fraction of the tile side; ``None`` = nuclei spread uniformly.
    stroma : tuple[float, float]
        range of the stroma's eosin concentration.
    lumen : tuple[float, float]
        range of the fraction of the tile that is unstained space (gland
        lumina, fat, tears).
    """

    nuclei: tuple[int, int]
    radius: tuple[float, float]
    pleomorphism: float
    elongation: tuple[float, float]
    irregularity: tuple[float, float]
    chromatin: tuple[float, float]
    cluster_spread: float | None
    stroma: tuple[float, float]
    lumen: tuple[float, float]


NORMAL = TissueStyle(
    nuclei=(3, 8),
    radius=(1.7, 2.3),
    pleomorphism=0.05,
    elongation=(0.8, 1.0),
    irregularity=(0.0, 0.04),
    chromatin=(0.9, 1.2),
    cluster_spread=None,
    stroma=(0.35, 0.75),
    lumen=(0.0, 0.1),
)

#: Normal tissue with a lymphocytic infiltrate: many small, round, very dark nuclei.
#: A hard negative: as dark and crowded as tumour, but not large, irregular or pleomorphic.
INFLAMED = TissueStyle(
    nuclei=(14, 26),
    radius=(1.3, 1.6),
    pleomorphism=0.05,
    elongation=(0.85, 1.0),
    irregularity=(0.0, 0.04),
    chromatin=(1.3, 1.7),
    cluster_spread=0.22,
    stroma=(0.35, 0.75),
    lumen=(0.0, 0.1),
)

TUMOUR = TissueStyle(
    nuclei=(6, 11),
    radius=(2.6, 3.4),
    pleomorphism=0.25,
    elongation=(0.55, 0.95),
    irregularity=(0.08, 0.2),
    chromatin=(1.2, 1.7),
    cluster_spread=0.16,
    stroma=(0.3, 0.7),
    lumen=(0.0, 0.2),
)

#: Tissue styles by index: the ``kind`` arrays below hold these indices.
STYLES: tuple[TissueStyle, ...] = (NORMAL, INFLAMED, TUMOUR)
NORMAL_KIND, INFLAMED_KIND, TUMOUR_KIND = range(3)
#: Probability that a normal tile carries a lymphocytic infiltrate.
INFLAMED_PROBABILITY = 0.3

#: Range of the per-tile haematoxylin counterstain of stroma (basophilic to eosinophilic
#: stroma), and the relative chromatin texture in nuclei.
_STROMA_HAEMATOXYLIN = (0.02, 0.3)
_CHROMATIN_TEXTURE = 0.15
#: Per-tile stain uptake factor range (section thickness), applied to both stains.
_UPTAKE = (0.75, 1.25)
#: Nuclear radii vary as r̄·exp(pleomorphism·z), z ~ N(0, 1) clipped to ±this.
_MAX_PLEOMORPHIC_Z = 2.0


@dataclass
class Slides:
    """Bags of tiles of one site.

    Attributes
    ----------
    tiles : np.ndarray
        ``[S, K, 3, T, T]`` float32 RGB in ``[0, 1]`` (zeros on padding).
    tile_labels : np.ndarray
        ``[S, K]`` int64 tile truth: 1 = positive (tumour) tile, 0 = negative,
        :data:`UNKNOWN_TILE` where the truth is not known (real slides without it).
    labels : np.ndarray
        ``[S]`` int64, the site's annotated bag label (:func:`annotate`).
    tumour_fraction : np.ndarray
        ``[S]`` float64, fraction of positive tiles per slide (NaN when unknown).
    padding : np.ndarray | None
        ``[S, K]`` bool, ``True`` = padded slot of a slide with fewer than ``K`` tiles.
    """

    tiles: np.ndarray
    tile_labels: np.ndarray
    labels: np.ndarray
    tumour_fraction: np.ndarray
    padding: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.padding is None:
            self.padding = np.zeros(self.tile_labels.shape, dtype=bool)

    @property
    def true_labels(self) -> np.ndarray:
        """``[S]`` int64 MIL ground truth: 1 iff the slide holds a positive tile."""
        return (self.tile_labels == 1).any(axis=1).astype(np.int64)


#: ``Slides.tile_labels`` value of a tile whose truth is unknown.
UNKNOWN_TILE = -1


def _style_values(kind: np.ndarray, field: str) -> np.ndarray:
    """The :class:`TissueStyle` attribute ``field`` of each tile's style, ``[N, ...]``."""
    return np.array([getattr(style, field) for style in STYLES], dtype=float)[kind]


def _draw(rng: np.random.Generator, kind: np.ndarray, field: str, columns: int = 1) -> np.ndarray:
    """Uniform draws from the style range ``field`` of each tile, ``[N, columns]``."""
    low, high = _style_values(kind, field).T[:, :, None]
    if field == "nuclei":
        return rng.integers(low.astype(np.int64), high.astype(np.int64) + 1, size=(kind.shape[0], columns))
    return rng.uniform(low, high, size=(kind.shape[0], columns))


def _nucleus_layout(rng: np.random.Generator, kind: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """Per-nucleus parameters, each ``[N, M]`` (``M`` = most nuclei a tile can hold).

    Keys: ``active`` (bool), ``cy, cx`` (centre, px), ``ry, rx`` (radii, px),
    ``angle``, ``a2, a3, p2, p3`` (contour harmonics), ``chromatin``. Radii are
    ``r̄·exp(s·z)``, ``z ~ N(0, 1)`` clipped, with ``s`` the style's pleomorphism.
    Nuclei of clustered styles scatter as ``N(c, (spread·T)²)`` around one of 1–2
    centres ``c``; the others are uniform over the tile.
    """
    n = kind.shape[0]
    scale = size / REFERENCE_TILE_SIZE
    slots = max(style.nuclei[1] for style in STYLES)
    active = np.arange(slots)[None, :] < _draw(rng, kind, "nuclei")

    z = np.clip(rng.standard_normal((n, slots)), -_MAX_PLEOMORPHIC_Z, _MAX_PLEOMORPHIC_Z)
    radius = _draw(rng, kind, "radius") * np.exp(_style_values(kind, "pleomorphism")[:, None] * z) * scale

    spread = np.array([style.cluster_spread or 0.0 for style in STYLES])[kind][:, None, None]
    centres = rng.uniform(0.25 * size, 0.75 * size, size=(n, 2, 2))
    which = rng.integers(0, rng.integers(1, 3, size=(n, 1)), size=(n, slots))
    clustered = np.take_along_axis(centres, which[:, :, None], axis=1)
    clustered = clustered + spread * size * rng.standard_normal((n, slots, 2))
    uniform = rng.uniform(0, size, size=(n, slots, 2))
    centre = np.clip(np.where(spread > 0, clustered, uniform), 0.0, size - 1e-3)

    return {
        "active": active,
        "cy": centre[..., 0],
        "cx": centre[..., 1],
        "ry": radius,
        "rx": radius * _draw(rng, kind, "elongation", slots),
        "angle": rng.uniform(0, np.pi, size=(n, slots)),
        "a2": _draw(rng, kind, "irregularity", slots),
        "a3": _draw(rng, kind, "irregularity", slots),
        "p2": rng.uniform(0, 2 * np.pi, size=(n, slots)),
        "p3": rng.uniform(0, 2 * np.pi, size=(n, slots)),
        "chromatin": _draw(rng, kind, "chromatin", slots),
    }


def _window_half(size: int) -> int:
    """Half side, in pixels, of a window that holds any nucleus (see :func:`_nucleus_layout`)."""
    radius = max(s.radius[1] * np.exp(_MAX_PLEOMORPHIC_Z * s.pleomorphism) for s in STYLES)
    contour = 1.0 + 2.0 * max(s.irregularity[1] for s in STYLES)
    return int(np.ceil(radius * contour * size / REFERENCE_TILE_SIZE + 1.0))


def _membership(dy: np.ndarray, dx: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """Soft membership of pixels in one nucleus each, broadcast over ``dy, dx``.

    A pixel at rotated, radius-normalised offset ``(u, v)`` from the nucleus centre,
    ``ρ = |(u, v)|``, ``θ = atan2(v, u)``, lies inside when
    ``ρ <= r(θ) = 1 + a_2 cos(2θ + φ_2) + a_3 cos(3θ + φ_3)``; the edge is
    anti-aliased over about one pixel: ``m = clip((r(θ) - ρ)·r̄ + 1/2, 0, 1)``.
    """
    cos, sin = np.cos(p["angle"]), np.sin(p["angle"])
    u = (dx * cos + dy * sin) / p["rx"]
    v = (-dx * sin + dy * cos) / p["ry"]
    rho = np.sqrt(u * u + v * v) + 1e-6
    c, s = u / rho, v / rho
    cos2, sin2 = c * c - s * s, 2 * c * s
    cos3, sin3 = c * (4 * c * c - 3), s * (3 - 4 * s * s)
    contour = (
        1.0
        + p["a2"] * (cos2 * np.cos(p["p2"]) - sin2 * np.sin(p["p2"]))
        + p["a3"] * (cos3 * np.cos(p["p3"]) - sin3 * np.sin(p["p3"]))
    )
    mean_radius = 0.5 * (p["rx"] + p["ry"])
    return np.clip((contour - rho) * mean_radius + 0.5, 0.0, 1.0)


def _nuclei(layout: dict[str, np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Nuclei drawn one slot at a time in a window around each centre.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(membership [N, T, T], haematoxylin [N, T, T])``: the union ``max_m m_m``
        of the tile's nuclear masks (:func:`_membership`) and ``max_m m_m·chromatin_m``.
    """
    n, slots = layout["active"].shape
    half = _window_half(size)
    offsets = np.arange(-half, half + 1)
    member = np.zeros((n, size + 2 * half, size + 2 * half), dtype=np.float32)
    chromatin = np.zeros_like(member)
    for slot in range(slots):
        tiles = np.flatnonzero(layout["active"][:, slot])
        p = {k: v[tiles, slot, None, None].astype(np.float32) for k, v in layout.items()}
        rows = np.floor(p["cy"][:, :, 0]).astype(np.int64) + offsets  # [n, W] pixel rows
        cols = np.floor(p["cx"][:, 0, :]).astype(np.int64) + offsets  # [n, W] pixel cols
        dy = (rows[:, :, None] + 0.5).astype(np.float32) - p["cy"]
        dx = (cols[:, None, :] + 0.5).astype(np.float32) - p["cx"]
        m = _membership(dy, dx, p)
        index = (tiles[:, None, None], rows[:, :, None] + half, cols[:, None, :] + half)
        member[index] = np.maximum(member[index], m)
        chromatin[index] = np.maximum(chromatin[index], m * p["chromatin"])
    crop = (slice(None), slice(half, half + size), slice(half, half + size))
    return member[crop], chromatin[crop]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise per tile, rescaled to unit standard deviation, ``[N, T, T]``."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), (0, sigma, sigma), mode="wrap")
    return noise / (noise.std(axis=(1, 2), keepdims=True) + 1e-8)


def _stroma(rng: np.random.Generator, kind: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Eosin concentration of the stroma and the tile's lumina, each ``[N, T, T]``.

    A per-tile level ``e`` with smooth texture ``n_1`` and faint fibres in a random
    direction, ``c_E = e (1 + 0.2 n_1 + 0.12 sin(2π f (x cos φ + y sin φ) + ψ))``,
    set to 0 in lumina ``{n_2 > Φ^{-1}(1 - q)}`` covering a fraction ``q`` of the
    tile (``n_1, n_2`` smooth unit-variance noise fields).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(c_E float, lumen bool)``.
    """
    n = kind.shape[0]
    scale = size / REFERENCE_TILE_SIZE
    yy, xx = np.mgrid[0:size, 0:size] / scale
    phi = rng.uniform(0, np.pi, size=(n, 1, 1))
    freq = rng.uniform(0.08, 0.18, size=(n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(n, 1, 1))
    fibres = np.sin(2 * np.pi * freq * (xx * np.cos(phi) + yy * np.sin(phi)) + phase)
    texture = 1.0 + 0.2 * _smooth_noise(rng, (n, size, size), 2.0 * scale) + 0.12 * fibres
    lumen_fraction = _draw(rng, kind, "lumen")[:, :, None]
    lumen = _smooth_noise(rng, (n, size, size), 3.0 * scale) > special.ndtri(1.0 - lumen_fraction)
    level = _draw(rng, kind, "stroma")[:, :, None]
    return np.clip(level * texture, 0.0, None) * ~lumen, lumen


def tissue_kinds(rng: np.random.Generator, tumour: np.ndarray) -> np.ndarray:
    """Style index of each tile (:data:`STYLES`), ``[N]`` int64: tumour tiles get
    :data:`TUMOUR_KIND`, normal tiles :data:`INFLAMED_KIND` with probability
    :data:`INFLAMED_PROBABILITY`, else :data:`NORMAL_KIND`."""
    tumour = np.asarray(tumour, dtype=bool)
    inflamed = rng.random(tumour.shape[0]) < INFLAMED_PROBABILITY
    return np.where(tumour, TUMOUR_KIND, np.where(inflamed, INFLAMED_KIND, NORMAL_KIND)).astype(np.int64)


def render_concentrations(
    rng: np.random.Generator, kind: np.ndarray, size: int = REFERENCE_TILE_SIZE
) -> np.ndarray:
    """Haematoxylin and eosin concentration maps of tiles.

    With ``m`` the nuclear union and ``h`` its chromatin (:func:`_nuclei`),
    ``u ~ U(0.75, 1.25)`` a per-tile stain uptake, ``h_0 ~ U(0.02, 0.3)`` a per-tile
    stroma counterstain, ``ℓ`` the lumina and ``ε`` white noise:
    ``c_H = u (h_0 (1 - m)(1 - ℓ) + h (1 + 0.15 ε))`` and
    ``c_E = u · stroma · (1 - 0.8 m)`` (:func:`_stroma`).

    Parameters
    ----------
    rng : np.random.Generator
        random stream (consumed).
    kind : np.ndarray
        ``[N]`` style index of each tile (:func:`tissue_kinds`).
    size : int
        tile side ``T``.

    Returns
    -------
    np.ndarray
        ``[N, 2, T, T]`` float32 concentrations ``(c_H, c_E)``, non-negative.
    """
    kind = np.asarray(kind, dtype=np.int64)
    member, chromatin = _nuclei(_nucleus_layout(rng, kind, size), size)
    texture = 1.0 + _CHROMATIN_TEXTURE * rng.standard_normal(member.shape)
    uptake = rng.uniform(*_UPTAKE, size=(kind.shape[0], 1, 1))
    counterstain = rng.uniform(*_STROMA_HAEMATOXYLIN, size=(kind.shape[0], 1, 1))
    eosin, lumen = _stroma(rng, kind, size)
    c_h = np.clip(uptake * (counterstain * (1 - member) * ~lumen + chromatin * texture), 0.0, None)
    c_e = uptake * eosin * (1.0 - 0.8 * member)
    return np.stack([c_h, c_e], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- site shifts


def site_stain_matrix(acquisition: Mapping[str, float] | None = None) -> np.ndarray:
    """The site's stain OD vectors ``[s_H R(α_H) v_H; s_E R(α_E) v_E]``, shape ``[2, 3]``.

    Parameters
    ----------
    acquisition : Mapping[str, float] | None
        values for keys of :data:`ACQUISITION_SPACE` (missing = neutral).
    """
    value = resolve_site_params(acquisition, ACQUISITION_SPACE, "acquisition")
    return shift_stains(
        STAIN_MATRIX, (value["h_rotation"], value["e_rotation"]), (value["h_scale"], value["e_scale"])
    )


def acquire(concentrations: np.ndarray, acquisition: Mapping[str, float] | None = None) -> np.ndarray:
    """Image stain concentrations with a site's stains and scanner (feature skew).

    Beer–Lambert colour model, then blur:

    .. math:: \\mathrm{RGB} = G_{\\sigma} * \\operatorname{clip}_{[0,1]}\\big(b \\exp(-W^\\top c)\\big),

    with ``W`` the site's stain matrix (:func:`site_stain_matrix`), ``c = (c_H, c_E)``,
    brightness ``b`` and blur ``σ``. At neutral values this is the plain
    Beer–Lambert image with :data:`STAIN_MATRIX`. Deterministic.

    Parameters
    ----------
    concentrations : np.ndarray
        ``[..., 2, T, T]`` from :func:`render_concentrations`.
    acquisition : Mapping[str, float] | None
        values for keys of :data:`ACQUISITION_SPACE` (missing = neutral).

    Returns
    -------
    np.ndarray
        ``[..., 3, T, T]`` float32 RGB in ``[0, 1]``.
    """
    value = resolve_site_params(acquisition, ACQUISITION_SPACE, "acquisition")
    return beer_lambert(concentrations, site_stain_matrix(value), value["brightness"], value["blur_sigma"])


def restain(tiles: np.ndarray, acquisition: Mapping[str, float] | None = None) -> np.ndarray:
    """Re-image real H&E tiles as a site would stain and scan them (feature skew of real data).

    Colour deconvolution with ``W = [v_H; v_E; v_H × v_E]`` (:func:`~medtasks.mil.stains.complete_stains`),
    then :func:`acquire`'s imaging with the site's ``[v_H'; v_E']`` and the residual kept:

    .. math::
        c = \\mathrm{OD}(x)\\, W^{-1},\\qquad
        x' = G_{\\sigma} * \\operatorname{clip}_{[0,1]}\\big(b \\exp(-W'^\\top c)\\big).

    At neutral values ``x' = x`` up to the ``1/255`` intensity floor.

    Parameters
    ----------
    tiles : np.ndarray
        ``[..., 3, T, T]`` RGB in ``[0, 1]``.
    acquisition : Mapping[str, float] | None
        values for keys of :data:`ACQUISITION_SPACE` (missing = neutral).

    Returns
    -------
    np.ndarray
        ``[..., 3, T, T]`` float32 RGB in ``[0, 1]``.
    """
    value = resolve_site_params(acquisition, ACQUISITION_SPACE, "acquisition")
    stains = complete_stains(STAIN_MATRIX)
    site = np.vstack([site_stain_matrix(value), stains[2:]])
    return beer_lambert(deconvolve(tiles, stains), site, value["brightness"], value["blur_sigma"])


def annotate(
    tile_labels: np.ndarray, annotator: Mapping[str, float] | None = None, padding: np.ndarray | None = None
) -> np.ndarray:
    """A site's bag labels (concept shift).

    ``Y = 1`` iff the slide holds a tumour tile and its tumour fraction
    ``q = (1/K) Σ_k y_k`` (over unpadded tiles) reaches the site's ``positive_threshold`` ``τ``:
    ``Y = 1[max_k y_k = 1 ∧ q >= τ]``. At ``τ = 0`` this is the standard MIL
    assumption (Dietterich et al. 1997; Ilse et al. 2018, §2.1).

    Parameters
    ----------
    tile_labels : np.ndarray
        ``[S, K]`` tile truth (1 = positive; any other value counts as not positive).
    annotator : Mapping[str, float] | None
        values for keys of :data:`ANNOTATOR_SPACE` (missing = neutral).
    padding : np.ndarray | None
        ``[S, K]`` bool, ``True`` = padded slot (left out), or ``None``.

    Returns
    -------
    np.ndarray
        ``[S]`` int64 bag labels.
    """
    value = resolve_site_params(annotator, ANNOTATOR_SPACE, "annotator")
    positive = np.asarray(tile_labels) == 1
    valid = np.ones(positive.shape, dtype=bool) if padding is None else ~np.asarray(padding, dtype=bool)
    positive &= valid
    fraction = positive.sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    return (positive.any(axis=1) & (fraction >= value["positive_threshold"] - 1e-12)).astype(np.int64)


# --------------------------------------------------------------------------- slides


def tumour_counts(
    rng: np.random.Generator, num_slides: int, tiles_per_slide: int, fraction: tuple[float, float]
) -> np.ndarray:
    """Number of tumour tiles of each positive slide, ``[num_slides]`` int64.

    Uniform over the integers ``n`` with ``lo·K <= n <= hi·K`` and ``n >= 1``; when
    ``K`` is too small for any such integer, ``max(1, round(q·K))`` with
    ``q ~ U(lo, hi)``.
    """
    lo, hi = fraction
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"tumour_fraction must satisfy 0 <= low <= high <= 1, got {fraction}")
    k = tiles_per_slide
    smallest = max(1, int(np.ceil(lo * k - 1e-9)))
    largest = int(np.floor(hi * k + 1e-9))
    if smallest <= largest:
        return rng.integers(smallest, largest + 1, size=num_slides)
    return np.maximum(1, np.rint(rng.uniform(lo, hi, size=num_slides) * k)).astype(np.int64)


def generate_slides(
    rng: np.random.Generator,
    num_slides: int,
    *,
    tiles_per_slide: int = 16,
    tile_size: int = 32,
    positive_rate: float = 0.5,
    tumour_fraction: tuple[float, float] = (0.1, 0.3),
    acquisition: Mapping[str, float] | None = None,
    annotator: Mapping[str, float] | None = None,
) -> Slides:
    """Generate ``num_slides`` slides of one site.

    A slide is truly positive with probability ``positive_rate``; a positive
    slide gets ``n`` tumour tiles (:func:`tumour_counts`) at random positions.
    Tiles are rendered (:func:`render_concentrations`), imaged with the site's
    acquisition (:func:`acquire`) and labelled by the site's annotator
    (:func:`annotate`). The layout and the tissue draw from independent child
    streams of ``rng``, and the shifts are deterministic, so changing the
    acquisition or annotator of a site changes neither the tiles' truth nor
    their tissue.

    Parameters
    ----------
    rng : np.random.Generator
        the site's random stream (consumed).
    num_slides : int
        ``S``.
    tiles_per_slide : int
        ``K`` (fixed for the call).
    tile_size : int
        ``T``.
    positive_rate : float
        ``P(slide holds a tumour tile)``.
    tumour_fraction : tuple[float, float]
        ``(low, high)`` fraction of tumour tiles of a positive slide.
    acquisition : Mapping[str, float] | None
        site stain/scanner parameters (:data:`ACQUISITION_SPACE`); ``None`` = neutral.
    annotator : Mapping[str, float] | None
        site annotator parameters (:data:`ANNOTATOR_SPACE`); ``None`` = neutral.

    Returns
    -------
    Slides
        The slides.
    """
    check_slide_args(num_slides, tiles_per_slide, tile_size, positive_rate)
    resolve_site_params(annotator, ANNOTATOR_SPACE, "annotator")
    resolve_site_params(acquisition, ACQUISITION_SPACE, "acquisition")
    layout_rng, tissue_rng = rng.spawn(2)
    tile_labels = slide_layout(layout_rng, num_slides, tiles_per_slide, positive_rate, tumour_fraction)
    kind = tissue_kinds(tissue_rng, tile_labels.reshape(-1).astype(bool))
    concentrations = render_concentrations(tissue_rng, kind, tile_size)
    tiles = acquire(concentrations, acquisition)
    tiles = tiles.reshape(num_slides, tiles_per_slide, 3, tile_size, tile_size)
    return labelled_slides(tiles, tile_labels, annotator)


def check_slide_args(num_slides: int, tiles_per_slide: int, tile_size: int, positive_rate: float) -> None:
    """``ValueError`` unless ``num_slides >= 0``, ``K >= 1``, ``T >= 4`` and ``0 <= positive_rate <= 1``."""
    if num_slides < 0 or tiles_per_slide < 1 or tile_size < 4 or not 0.0 <= positive_rate <= 1.0:
        raise ValueError(
            "need num_slides >= 0, tiles_per_slide >= 1, tile_size >= 4, 0 <= positive_rate <= 1; "
            f"got {num_slides}, {tiles_per_slide}, {tile_size}, {positive_rate}"
        )


def slide_layout(
    rng: np.random.Generator,
    num_slides: int,
    tiles_per_slide: int,
    positive_rate: float,
    tumour_fraction: tuple[float, float],
) -> np.ndarray:
    """Which tiles of each slide are positive, ``[S, K]`` int64.

    A slide is positive with probability ``positive_rate``; a positive slide gets ``n``
    positive tiles (:func:`tumour_counts`) at positions given by a random permutation.
    """
    positive = rng.random(num_slides) < positive_rate
    count = np.where(positive, tumour_counts(rng, num_slides, tiles_per_slide, tumour_fraction), 0)
    # A random permutation per slide; its first `count` values mark the positive positions.
    permutation = np.argsort(rng.random((num_slides, tiles_per_slide)), axis=1)
    return (permutation < count[:, None]).astype(np.int64)


def labelled_slides(
    tiles: np.ndarray,
    tile_labels: np.ndarray,
    annotator: Mapping[str, float] | None = None,
    padding: np.ndarray | None = None,
) -> Slides:
    """:class:`Slides` of ``tiles [S, K, 3, T, T]`` and ``tile_labels [S, K]``, labelled by the
    site's annotator (:func:`annotate`); the positive fraction counts unpadded tiles only."""
    tile_labels = np.asarray(tile_labels, dtype=np.int64)
    valid = np.ones(tile_labels.shape, dtype=bool) if padding is None else ~np.asarray(padding, dtype=bool)
    known = (tile_labels != UNKNOWN_TILE).all(axis=1)
    fraction = ((tile_labels == 1) & valid).sum(axis=1) / np.maximum(valid.sum(axis=1), 1)
    return Slides(
        tiles=tiles,
        tile_labels=tile_labels,
        labels=annotate(tile_labels, annotator, padding),
        tumour_fraction=np.where(known, fraction, np.nan),
        padding=padding,
    )


def tiles_from_image(image: np.ndarray, tile_size: int) -> np.ndarray:
    """Cut an RGB image into non-overlapping tiles, row-major; partial border tiles are dropped.

    Used to turn a real micrograph (e.g. ``skimage.data.immunohistochemistry()``)
    into a bag.

    Parameters
    ----------
    image : np.ndarray
        ``[H, W, 3]`` uint8.
    tile_size : int
        ``T``.

    Returns
    -------
    np.ndarray
        ``[n, 3, T, T]`` float32 in ``[0, 1]``, ``n = ⌊H/T⌋·⌊W/T⌋``.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an [H, W, 3] image, got shape {image.shape}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be >= 1, got {tile_size}")
    rows, cols = image.shape[0] // tile_size, image.shape[1] // tile_size
    crop = image[: rows * tile_size, : cols * tile_size]
    tiles = crop.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 4, 1, 3)
    tiles = tiles.reshape(rows * cols, 3, tile_size, tile_size)
    scale = 255.0 if image.dtype == np.uint8 else 1.0
    return (tiles.astype(np.float32) / scale).astype(np.float32)
