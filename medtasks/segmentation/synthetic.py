"""Synthetic abdominal phantoms and the per-site shifts applied to them.

A phantom is a 2D axial-slice-like image: a body outline, two organs, optional
lesions inside the first organ, an unlabelled bright vertebra as a distractor,
smooth tissue texture, partial-volume blur and noise. Every shape is an ellipse
whose radius is modulated by a few Fourier harmonics of the polar angle,

.. math:: r(\\theta) = 1 + \\sum_{k=2}^{4} a_k \\cos(k\\theta + \\varphi_k),

so no two organs look alike. Labels (:data:`CLASS_NAMES`): 0 background
(air and unlabelled body tissue), 1 organ, 2 second organ, 3 lesion.

Two per-site transforms implement the non-IID kinds of :mod:`medtasks.partition`:

* :func:`acquire` (``feature_skew``, ``P_k(x)`` differs): the site's scanner,
  applied to images only; masks are unchanged. Parameters in :data:`ACQUISITION_SPACE`.
* :func:`annotate` (``concept_shift``, ``P_k(y|x)`` differs): the site's
  annotator, applied to masks only; images are unchanged. Parameters in
  :data:`ANNOTATOR_SPACE`.

Both are the identity at their neutral values, and both work on any label map
(they are reused on real data). Everything is pure NumPy/SciPy and
deterministic given the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from medtasks.partition import ParamRange, resolve_site_params

#: Class names of the synthetic label maps, index = label value.
CLASS_NAMES: tuple[str, ...] = ("background", "organ", "organ2", "lesion")
NUM_CLASSES = len(CLASS_NAMES)
LESION = 3

#: Feature-skew (scanner) parameters; see :func:`acquire`. Images are roughly in [0, 1].
ACQUISITION_SPACE: dict[str, ParamRange] = {
    # Blur sigma in pixels (point-spread function of the scanner).
    "blur_sigma": ParamRange(0.0, 1.5, 0.0),
    # Strength s of a multiplicative linear bias field 1 + s·f(x), f in [-1, 1] (coil shading).
    "bias_field": ParamRange(0.0, 0.4, 0.0),
    # Contrast curve x -> sign(x)·|x|^gamma (window / reconstruction kernel).
    "gamma": ParamRange(0.7, 1.5, 1.0),
    # Intensity scale (detector gain).
    "gain": ParamRange(0.7, 1.3, 1.0),
    # Intensity offset (calibration bias).
    "offset": ParamRange(-0.2, 0.2, 0.0),
    # Standard deviation of added Gaussian noise (dose).
    "noise_sigma": ParamRange(0.0, 0.12, 0.0),
}

#: Concept-shift (annotator) parameters; see :func:`annotate`.
ANNOTATOR_SPACE: dict[str, ParamRange] = {
    # Signed contour offset in pixels: < 0 erodes (tight annotator), > 0 dilates (generous).
    "boundary_offset": ParamRange(-2.0, 2.0, 0.0),
    # Standard deviation, in pixels, of a smooth random displacement of every contour.
    "boundary_noise": ParamRange(0.0, 1.5, 0.0),
    # Probability that the annotator omits a lesion (labels it as the surrounding tissue).
    "lesion_miss_rate": ParamRange(0.0, 0.6, 0.0),
}

#: Correlation length (pixels) of the contour jitter of ``boundary_noise``.
_JITTER_SMOOTHING = 3.0


@dataclass(frozen=True)
class Intensities:
    """Mean tissue intensities of the phantom (each jittered per image).

    The lesion is hypo-intense within the organ and overlaps the unlabelled
    body tissue, and the vertebra is brighter than any organ, so intensity
    alone does not segment the image.
    """

    air: float = 0.02
    body: float = 0.35
    organ: float = 0.60
    organ2: float = 0.75
    lesion: float = 0.42
    vertebra: float = 0.95
    jitter: float = 0.03
    texture: float = 0.05
    noise: float = 0.025
    partial_volume_sigma: float = 0.6


DEFAULT_INTENSITIES = Intensities()


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, each ``[size, size]`` float64 (read-only)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy.setflags(write=False)
    xx.setflags(write=False)
    return yy, xx


def deformed_ellipse(
    size: int,
    center: tuple[float, float],
    radii: tuple[float, float],
    angle: float,
    harmonics: np.ndarray,
    phases: np.ndarray,
) -> np.ndarray:
    """Boolean mask of an ellipse whose radius is modulated by Fourier harmonics.

    A pixel at normalised polar coordinates ``(ρ, θ)`` of the rotated ellipse is
    inside when ``ρ <= 1 + Σ_k a_k cos(kθ + φ_k)``, ``k = 2, 3, ...``.

    Parameters
    ----------
    size : int
        image side ``S``.
    center : tuple[float, float]
        ``(cy, cx)`` in pixels.
    radii : tuple[float, float]
        ``(ry, rx)`` semi-axes in pixels before rotation.
    angle : float
        rotation in radians.
    harmonics : np.ndarray
        amplitudes ``a_k``, shape ``[K]``.
    phases : np.ndarray
        phases ``φ_k``, shape ``[K]``.

    Returns
    -------
    np.ndarray
        Mask ``[S, S]`` bool.
    """
    mask = np.zeros((size, size), dtype=bool)
    extent = max(radii) * (1.0 + float(np.abs(harmonics).sum())) + 1.0
    y0, y1 = max(0, int(center[0] - extent)), min(size, int(center[0] + extent) + 2)
    x0, x1 = max(0, int(center[1] - extent)), min(size, int(center[1] + extent) + 2)
    if y0 >= y1 or x0 >= x1:
        return mask
    yy, xx = _grid(size)
    dy, dx = yy[y0:y1, x0:x1] - center[0], xx[y0:y1, x0:x1] - center[1]
    cos, sin = np.cos(angle), np.sin(angle)
    w = (cos * dx + sin * dy) / radii[1] + 1j * (-sin * dx + cos * dy) / radii[0]
    rho = np.abs(w)
    unit = w / np.where(rho > 0, rho, 1.0)  # e^{iθ}
    radius = np.ones_like(rho)
    power = unit
    for amplitude, phase in zip(harmonics, phases):
        power = power * unit  # e^{ikθ}, k = 2, 3, ...
        radius += amplitude * (np.exp(1j * phase) * power).real
    mask[y0:y1, x0:x1] = rho <= radius
    return mask


def _random_blob(
    rng: np.random.Generator,
    size: int,
    center: tuple[float, float],
    radii: tuple[float, float],
    irregularity: float,
    angle: float | None = None,
) -> np.ndarray:
    """A :func:`deformed_ellipse` with random harmonics ``a_k ~ N(0, irregularity / k)``."""
    orders = np.arange(2, 5)
    harmonics = rng.normal(0.0, irregularity / orders)
    phases = rng.uniform(0.0, 2 * np.pi, size=orders.size)
    if angle is None:
        angle = rng.uniform(-np.pi, np.pi)
    return deformed_ellipse(size, center, radii, angle, harmonics, phases)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise with unit standard deviation, of the given shape."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def _lesions(rng: np.random.Generator, organ: np.ndarray) -> np.ndarray:
    """One or two small blobs inside ``organ`` (``[S, S]`` bool), never empty if ``organ`` is not."""
    size = organ.shape[0]
    depth = ndimage.distance_transform_edt(organ)
    lesion = np.zeros_like(organ)
    for _ in range(1 + int(rng.random() < 0.3)):
        radius = rng.uniform(0.035, 0.075) * size
        candidates = np.flatnonzero(depth >= radius * 0.8 + 1.0)
        if candidates.size == 0:
            candidates = np.flatnonzero(depth >= 0.7 * depth.max())
        cy, cx = np.unravel_index(rng.choice(candidates), organ.shape)
        radii = (radius * rng.uniform(0.8, 1.2), radius * rng.uniform(0.8, 1.2))
        blob = _random_blob(rng, size, (float(cy), float(cx)), radii, irregularity=0.1)
        blob[cy, cx] = True
        lesion |= blob
    return lesion & organ


def phantom(
    rng: np.random.Generator,
    size: int,
    has_lesion: bool,
    intensities: Intensities = DEFAULT_INTENSITIES,
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal slice and its label map.

    Parameters
    ----------
    rng : np.random.Generator
        random stream (consumed).
    size : int
        image side ``S`` in pixels.
    has_lesion : bool
        whether the slice contains lesions (class 3) inside organ 1.
    intensities : Intensities
        tissue intensity model.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(image, mask)``: image ``[S, S]`` float32 roughly in ``[0, 1]``,
        mask ``[S, S]`` int64 with values in ``0..3``.
    """
    s = float(size)
    cy, cx = s / 2 + rng.normal(0, 0.02 * s, size=2)
    ry, rx = 0.36 * s * rng.uniform(0.9, 1.1), 0.44 * s * rng.uniform(0.9, 1.1)
    body = _random_blob(rng, size, (cy, cx), (ry, rx), irregularity=0.04, angle=rng.normal(0, 0.05))
    inner = ndimage.distance_transform_edt(body) > 2.0

    vertebra_center = (cy + 0.62 * ry, cx + rng.normal(0, 0.02 * s))
    vertebra = _random_blob(rng, size, vertebra_center, (0.07 * s, 0.08 * s), irregularity=0.05, angle=0.0)
    free = inner & ~vertebra

    organ_center = (cy + rng.uniform(-0.08, 0.04) * s, cx - rx * rng.uniform(0.35, 0.5))
    organ_radii = (ry * rng.uniform(0.45, 0.6), rx * rng.uniform(0.3, 0.42))
    organ_angle = rng.uniform(-0.4, 0.4)
    organ = _random_blob(rng, size, organ_center, organ_radii, irregularity=0.08, angle=organ_angle) & free

    organ2_center = (cy + rng.uniform(-0.1, 0.1) * s, cx + rx * rng.uniform(0.35, 0.55))
    organ2_radii = (ry * rng.uniform(0.22, 0.32), rx * rng.uniform(0.15, 0.22))
    organ2 = _random_blob(rng, size, organ2_center, organ2_radii, irregularity=0.06) & free & ~organ

    mask = np.zeros((size, size), dtype=np.int64)
    mask[organ] = 1
    mask[organ2] = 2
    if has_lesion and organ.any():
        mask[_lesions(rng, organ)] = LESION

    tissue = {
        "air": ~body,
        "body": body & (mask == 0) & ~vertebra,
        "vertebra": body & vertebra & (mask == 0),
        "organ": mask == 1,
        "organ2": mask == 2,
        "lesion": mask == LESION,
    }
    image = np.zeros((size, size), dtype=np.float64)
    for name, region in tissue.items():
        image[region] = getattr(intensities, name) + rng.normal(0, intensities.jitter)
    image += intensities.texture * _smooth_noise(rng, (size, size), 1.5) * body
    image = ndimage.gaussian_filter(image, intensities.partial_volume_sigma)
    image += rng.normal(0, intensities.noise, size=image.shape)
    return image.astype(np.float32), mask


def acquire(image: np.ndarray, params: Mapping[str, float], rng: np.random.Generator) -> np.ndarray:
    """Apply a site's acquisition (feature skew) to one image.

    In order, with ``f`` a linear ramp in a random direction scaled to ``[-1, 1]``:

    .. math::
        x_1 = G_{\\sigma_b} * x,\\quad x_2 = x_1 (1 + s f),\\quad
        x_3 = \\operatorname{sign}(x_2)|x_2|^{\\gamma},\\quad
        x_4 = g x_3 + o,\\quad x_5 = x_4 + \\sigma_n \\epsilon,\\ \\epsilon \\sim N(0, 1).

    Missing parameters take their neutral value; at neutral values the image is
    returned unchanged.

    Parameters
    ----------
    image : np.ndarray
        ``[H, W]`` float.
    params : Mapping[str, float]
        values for the keys of :data:`ACQUISITION_SPACE`.
    rng : np.random.Generator
        random stream for the bias-field direction and the noise.

    Returns
    -------
    np.ndarray
        The acquired image, ``[H, W]`` float32.
    """
    value = resolve_site_params(params, ACQUISITION_SPACE, "acquisition")
    x = np.asarray(image, dtype=np.float64)
    if value["blur_sigma"] > 0:
        x = ndimage.gaussian_filter(x, value["blur_sigma"])
    if value["bias_field"] != 0:
        height, width = x.shape
        yy, xx = np.mgrid[0:height, 0:width]
        direction = rng.uniform(0, 2 * np.pi)
        ramp = np.sin(direction) * (yy - height / 2) + np.cos(direction) * (xx - width / 2)
        ramp = ramp / (max(height, width) / 2)
        x = x * (1.0 + value["bias_field"] * np.clip(ramp, -1.0, 1.0))
    if value["gamma"] != 1.0:
        x = np.sign(x) * np.abs(x) ** value["gamma"]
    x = value["gain"] * x + value["offset"]
    if value["noise_sigma"] > 0:
        x = x + rng.normal(0.0, value["noise_sigma"], size=x.shape)
    return x.astype(np.float32)


def _enclosing_label(mask: np.ndarray, region: np.ndarray) -> int:
    """Most frequent label on the one-pixel ring around ``region`` (0 if the ring is empty)."""
    ring = ndimage.binary_dilation(region) & ~region
    if not ring.any():
        return 0
    return int(np.bincount(mask[ring]).argmax())


def _omit_lesions(
    mask: np.ndarray, lesion_label: int, miss_rate: float, rng: np.random.Generator
) -> np.ndarray:
    """Relabel each connected lesion, with probability ``miss_rate``, as its surrounding tissue."""
    components, count = ndimage.label(mask == lesion_label)
    out = mask.copy()
    for index in range(1, count + 1):
        if rng.random() < miss_rate:
            region = components == index
            out[region] = _enclosing_label(mask, region)
    return out


def _signed_distance(region: np.ndarray) -> np.ndarray:
    """Signed Euclidean distance to ``region``'s contour: ``<= -1`` inside, ``>= 1`` outside."""
    if not region.any():
        return np.full(region.shape, np.inf)
    return ndimage.distance_transform_edt(~region) - ndimage.distance_transform_edt(region)


def _move_contours(mask: np.ndarray, threshold: np.ndarray, num_classes: int) -> np.ndarray:
    """Redraw every foreground contour at signed distance ``threshold`` (pixels, ``[H, W]``).

    Class ``c`` is annotated where ``d_c(x) <= t(x)``, with ``d_c`` the signed distance to
    the hole-filled region of class ``c`` (so an organ's contour ignores the lesions it
    contains). Classes are painted in increasing order, so a nested class (a lesion)
    stays on top of its container; pixels claimed by no class become background.
    """
    out = np.zeros_like(mask)
    for c in range(1, num_classes):
        region = mask == c
        if region.any():
            out[_signed_distance(ndimage.binary_fill_holes(region)) <= threshold] = c
    return out


def annotate(
    mask: np.ndarray,
    params: Mapping[str, float],
    rng: np.random.Generator,
    num_classes: int = NUM_CLASSES,
) -> np.ndarray:
    """Apply a site's annotator (concept shift) to one label map.

    1. Each connected lesion (label ``num_classes - 1``) is omitted with probability
       ``lesion_miss_rate``: it takes the label of its surrounding tissue.
    2. Every contour moves to signed distance ``t(x) = boundary_offset + boundary_noise·ξ(x)``
       from the true one, ``ξ`` a smooth unit-variance random field (correlation length
       about 3 px): ``t < 0`` erodes, ``t > 0`` dilates. See :func:`_move_contours`.

    Missing parameters take their neutral value; at neutral values the mask is
    returned unchanged.

    Parameters
    ----------
    mask : np.ndarray
        ``[H, W]`` integer labels in ``0..num_classes-1``.
    params : Mapping[str, float]
        values for the keys of :data:`ANNOTATOR_SPACE`.
    rng : np.random.Generator
        random stream for the misses and the contour jitter.
    num_classes : int
        number of labels ``C`` (background included).

    Returns
    -------
    np.ndarray
        The annotated label map, ``[H, W]`` int64.
    """
    value = resolve_site_params(params, ANNOTATOR_SPACE, "annotator")
    out = np.asarray(mask, dtype=np.int64)
    if value["lesion_miss_rate"] > 0:
        out = _omit_lesions(out, num_classes - 1, value["lesion_miss_rate"], rng)
    if value["boundary_offset"] != 0 or value["boundary_noise"] > 0:
        threshold = np.full(out.shape, value["boundary_offset"])
        if value["boundary_noise"] > 0:
            threshold = threshold + value["boundary_noise"] * _smooth_noise(rng, out.shape, _JITTER_SMOOTHING)
        out = _move_contours(out, threshold, num_classes)
    return out


@dataclass(frozen=True)
class SyntheticSamples:
    """A batch of generated samples.

    Attributes
    ----------
    images : np.ndarray
        ``[N, S, S]`` float32 (after acquisition).
    masks : np.ndarray
        ``[N, S, S]`` int64 (after annotation).
    has_lesion : np.ndarray
        ``[N]`` bool, the drawn truth before annotation.
    """

    images: np.ndarray
    masks: np.ndarray
    has_lesion: np.ndarray


def generate(
    rng: np.random.Generator,
    n: int,
    size: int,
    lesion_probability: float,
    acquisition: Mapping[str, float] | None = None,
    annotator: Mapping[str, float] | None = None,
) -> SyntheticSamples:
    """Generate ``n`` samples of one site.

    Lesion presence, phantom shapes, acquisition and annotation draw from
    independent child streams of ``rng``, so, e.g., changing the annotator leaves the
    images unchanged and changing the acquisition leaves the masks unchanged.

    Parameters
    ----------
    rng : np.random.Generator
        the site's random stream (consumed).
    n : int
        number of samples.
    size : int
        image side ``S``.
    lesion_probability : float
        ``P(image contains a lesion)``.
    acquisition : Mapping[str, float] | None
        site scanner parameters (:func:`acquire`); ``None`` = neutral.
    annotator : Mapping[str, float] | None
        site annotator parameters (:func:`annotate`); ``None`` = neutral.

    Returns
    -------
    SyntheticSamples
        The samples.
    """
    label_rng, shape_rng, shift_rng = rng.spawn(3)
    has_lesion = label_rng.random(n) < lesion_probability
    images = np.empty((n, size, size), dtype=np.float32)
    masks = np.empty((n, size, size), dtype=np.int64)
    for i in range(n):
        images[i], masks[i] = phantom(shape_rng, size, bool(has_lesion[i]))
    images, masks = shift_samples(images, masks, acquisition or {}, annotator or {}, shift_rng)
    return SyntheticSamples(images=images, masks=masks, has_lesion=has_lesion)


def shift_samples(
    images: np.ndarray,
    masks: np.ndarray,
    acquisition: Mapping[str, float],
    annotator: Mapping[str, float],
    rng: np.random.Generator,
    num_classes: int = NUM_CLASSES,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one site's acquisition to every image and its annotator to every mask.

    Acquisition and annotation draw from two independent child streams of ``rng``.

    Parameters
    ----------
    images : np.ndarray
        ``[N, H, W]`` float.
    masks : np.ndarray
        ``[N, H, W]`` integer labels in ``0..num_classes-1``.
    acquisition : Mapping[str, float]
        parameters of :func:`acquire` (``{}`` = neutral).
    annotator : Mapping[str, float]
        parameters of :func:`annotate` (``{}`` = neutral).
    rng : np.random.Generator
        random stream (consumed).
    num_classes : int
        number of labels ``C``.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(images [N, H, W] float32, masks [N, H, W] int64)``, new arrays.
    """
    acquisition_rng, annotator_rng = rng.spawn(2)
    shifted_images = np.array([acquire(x, acquisition, acquisition_rng) for x in images], np.float32)
    shifted_masks = np.array([annotate(y, annotator, annotator_rng, num_classes) for y in masks], np.int64)
    return shifted_images.reshape(np.shape(images)), shifted_masks.reshape(np.shape(masks))
