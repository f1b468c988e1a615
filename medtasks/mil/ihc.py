"""Slides built from real immunohistochemistry (IHC) tiles: the offline demo source.

scikit-image's wheel bundles one real IHC micrograph, ``skimage.data.immunohistochemistry()``
(512×512 RGB uint8; colonic glands whose FHL2 protein is revealed by DAB, brown, with a
haematoxylin counterstain, blue; "no known copyright restrictions"). No download is ever
made: without scikit-image, or when the file is missing, :func:`load_ihc_image` raises a
one-line :class:`~medtasks.base.DataError` naming the install command.

What is real and what is simulated:

* **Tile truth is read from the image.** Colour deconvolution with the H–DAB–E stain
  vectors (:data:`IHC_STAINS`, Ruifrok & Johnston 2001) gives each pixel's DAB
  concentration ``c_D`` (optical-density units). A pixel is DAB-positive when
  ``c_D >= 0.5``; a ``T×T`` crop is a *positive tile* when at least 50 % of its pixels are
  DAB-positive, a *negative tile* when at most 2 % are. Crops in between are never used, so
  tile labels are unambiguous. The positive class is "DAB-stained epithelium", visible by
  colour and texture; this is a pipeline demonstration on real pixels, not a diagnostic task.
* **Slides are assembled.** A slide holds ``K`` crops: a positive slide (probability
  ``positive_rate``) holds ``n`` positive tiles (:func:`~medtasks.mil.synthetic.slide_layout`,
  as for the synthetic slides), every other tile is negative. Crops lie on a 4-pixel grid,
  each with one of the 8 flips/rotations of the square.
* **Test tiles are unseen.** The image is cut into 4×4 blocks; the server's central test set
  crops only from the 4 blocks with ``(row + col) mod 4 = 0`` (one per block row and
  column), the sites from the other 12. A crop never straddles blocks. Sites share the same
  tissue: they differ only through the simulated shifts below.
* **Feature skew** (:func:`acquire_ihc`): crops are deconvolved into H, DAB and E (residual)
  concentrations and re-imaged with the site's stain vectors (H and DAB hue rotation and
  strength), brightness and blur (:data:`IHC_ACQUISITION_SPACE`).
* **Concept shift**: the site's annotator threshold on the positive-tile fraction
  (:func:`~medtasks.mil.synthetic.annotate`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from medtasks.base import DataError
from medtasks.mil.stains import beer_lambert, deconvolve, shift_stains, unit_rows
from medtasks.mil.synthetic import (
    ACQUISITION_SPACE,
    Slides,
    check_slide_args,
    labelled_slides,
    slide_layout,
)
from medtasks.partition import ParamRange, resolve_site_params

#: Stain OD vectors, rows ``(H, DAB, E)``: ``skimage.color.rgb_from_hed`` reordered so that the
#: two stains a site's protocol shifts come first (:func:`acquire_ihc`); E is the residual.
IHC_STAINS: np.ndarray = unit_rows([[0.65, 0.70, 0.29], [0.27, 0.57, 0.78], [0.07, 0.99, 0.11]])
H_CHANNEL, DAB_CHANNEL, E_CHANNEL = range(3)

#: Feature-skew parameters of IHC sites: the H&E ranges, with DAB in the place of eosin.
IHC_ACQUISITION_SPACE: dict[str, ParamRange] = {
    "h_rotation": ACQUISITION_SPACE["h_rotation"],
    "dab_rotation": ACQUISITION_SPACE["e_rotation"],
    "h_scale": ACQUISITION_SPACE["h_scale"],
    "dab_scale": ACQUISITION_SPACE["e_scale"],
    "brightness": ACQUISITION_SPACE["brightness"],
    "blur_sigma": ACQUISITION_SPACE["blur_sigma"],
}

#: DAB concentration (OD units) above which a pixel counts as DAB-positive.
DAB_PIXEL_THRESHOLD = 0.5
#: Least DAB-positive pixel fraction of a positive tile, largest of a negative tile.
POSITIVE_TILE_FRACTION = 0.5
NEGATIVE_TILE_FRACTION = 0.02
#: The image is cut into BLOCKS × BLOCKS blocks; the server crops from the held-out ones.
BLOCKS = 4
#: Step in pixels between candidate crop corners.
CROP_STRIDE = 4

INSTALL_HINT = "pip install scikit-image"


def load_ihc_image() -> np.ndarray:
    """scikit-image's bundled IHC micrograph, ``[512, 512, 3]`` uint8 (never downloaded).

    Raises
    ------
    DataError
        scikit-image is not installed, or its bundled file cannot be read.
    """
    try:
        from skimage import data
    except ImportError:
        raise DataError(f"the IHC demo source needs scikit-image: {INSTALL_HINT}") from None
    try:
        image = np.asarray(data.immunohistochemistry())
    except Exception as error:
        raise DataError(
            f"scikit-image's bundled immunohistochemistry image is unavailable "
            f"({type(error).__name__}: {error}); reinstall it: {INSTALL_HINT}"
        ) from None
    if image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"scikit-image's immunohistochemistry image has shape {image.shape}; expected [H, W, 3]")
    return image


def held_out_block(row: int, col: int) -> bool:
    """Whether block ``(row, col)`` of the ``BLOCKS × BLOCKS`` grid belongs to the server."""
    return (row + col) % BLOCKS == 0


@dataclass(frozen=True)
class CropPool:
    """Candidate crops of one region.

    Attributes
    ----------
    concentrations : np.ndarray
        ``[3, H, W]`` float32 ``(c_H, c_DAB, c_E)`` of the whole image.
    positive : np.ndarray
        ``[P, 2]`` int64 top-left ``(y, x)`` of positive crops.
    negative : np.ndarray
        ``[N, 2]`` int64 top-left ``(y, x)`` of negative crops.
    tile_size : int
        ``T``.
    """

    concentrations: np.ndarray
    positive: np.ndarray
    negative: np.ndarray
    tile_size: int


def _window_means(mask: np.ndarray, corners: np.ndarray, size: int) -> np.ndarray:
    """Mean of ``mask [H, W]`` over the ``size × size`` windows at ``corners [n, 2]`` (integral image)."""
    integral = np.pad(np.cumsum(np.cumsum(mask, axis=0, dtype=np.float64), axis=1), ((1, 0), (1, 0)))
    y, x = corners[:, 0], corners[:, 1]
    total = integral[y + size, x + size] - integral[y, x + size] - integral[y + size, x] + integral[y, x]
    return total / (size * size)


@functools.lru_cache(maxsize=8)
def crop_pool(tile_size: int, held_out: bool) -> CropPool:
    """Positive and negative crop corners of the sites' (``held_out=False``) or the server's region.

    Raises
    ------
    DataError
        the image is unavailable, or the region holds no crop of one class
        (``tile_size`` too large for the blocks).
    """
    image = load_ihc_image()
    concentrations = deconvolve(image.transpose(2, 0, 1) / 255.0, IHC_STAINS)
    height, width = image.shape[:2]
    block_h, block_w = height // BLOCKS, width // BLOCKS
    if tile_size > min(block_h, block_w):
        raise DataError(f"tile_size {tile_size} exceeds the IHC demo's {block_h}×{block_w} pixel blocks")
    corners = [
        (row * block_h + dy, col * block_w + dx)
        for row in range(BLOCKS)
        for col in range(BLOCKS)
        if held_out_block(row, col) == held_out
        for dy in range(0, block_h - tile_size + 1, CROP_STRIDE)
        for dx in range(0, block_w - tile_size + 1, CROP_STRIDE)
    ]
    corners_array = np.array(corners, dtype=np.int64)
    dab = _window_means(concentrations[DAB_CHANNEL] >= DAB_PIXEL_THRESHOLD, corners_array, tile_size)
    pool = CropPool(
        concentrations=concentrations,
        positive=corners_array[dab >= POSITIVE_TILE_FRACTION],
        negative=corners_array[dab <= NEGATIVE_TILE_FRACTION],
        tile_size=tile_size,
    )
    region = "server (held-out)" if held_out else "site"
    for name in ("positive", "negative"):
        if len(getattr(pool, name)) == 0:
            raise DataError(f"the IHC demo's {region} blocks hold no {name} {tile_size}-pixel crop; lower tile_size")
    return pool


def _dihedral(tiles: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Apply one of the 8 symmetries of the square per tile: ``rot90^(t mod 4)``, then a
    left-right flip when ``t >= 4``. ``tiles [N, C, T, T]``, ``transform [N]`` in ``0..7``."""
    out = np.empty_like(tiles)
    for t in range(8):
        chosen = transform == t
        turned = np.rot90(tiles[chosen], k=t % 4, axes=(2, 3))
        out[chosen] = turned[..., ::-1] if t >= 4 else turned
    return out


def sample_crops(rng: np.random.Generator, positive: np.ndarray, pool: CropPool) -> np.ndarray:
    """Concentration crops, positive where ``positive`` is set, ``[N, 3, T, T]`` float32.

    Each crop is a uniformly drawn candidate of its class with a uniformly drawn symmetry.
    """
    positive = np.asarray(positive, dtype=bool)
    pick_positive = rng.integers(0, len(pool.positive), size=positive.shape[0])
    pick_negative = rng.integers(0, len(pool.negative), size=positive.shape[0])
    corners = np.where(positive[:, None], pool.positive[pick_positive], pool.negative[pick_negative])
    offsets = np.arange(pool.tile_size)
    rows = corners[:, 0, None, None] + offsets[None, :, None]  # [N, T, 1]
    cols = corners[:, 1, None, None] + offsets[None, None, :]  # [N, 1, T]
    crops = pool.concentrations[:, rows, cols].transpose(1, 0, 2, 3)  # [N, 3, T, T]
    return np.ascontiguousarray(_dihedral(crops, rng.integers(0, 8, size=len(positive))))


def acquire_ihc(concentrations: np.ndarray, acquisition: Mapping[str, float] | None = None) -> np.ndarray:
    """Image ``(c_H, c_DAB, c_E)`` crops with a site's stains and scanner (feature skew).

    ``RGB = G_σ * clip_[0,1](b exp(-W'ᵀ c))`` with ``W'`` = :data:`IHC_STAINS` whose H and DAB
    rows are rotated about the grey axis and scaled (:func:`~medtasks.mil.stains.shift_stains`).
    At neutral values this reproduces the real image (up to the ``1/255`` floor).

    Parameters
    ----------
    concentrations : np.ndarray
        ``[..., 3, T, T]``.
    acquisition : Mapping[str, float] | None
        values for keys of :data:`IHC_ACQUISITION_SPACE` (missing = neutral).

    Returns
    -------
    np.ndarray
        ``[..., 3, T, T]`` float32 RGB in ``[0, 1]``.
    """
    value = resolve_site_params(acquisition, IHC_ACQUISITION_SPACE, "acquisition")
    stains = shift_stains(
        IHC_STAINS, (value["h_rotation"], value["dab_rotation"]), (value["h_scale"], value["dab_scale"])
    )
    return beer_lambert(concentrations, stains, value["brightness"], value["blur_sigma"])


def generate_ihc_slides(
    rng: np.random.Generator,
    num_slides: int,
    *,
    tiles_per_slide: int = 16,
    tile_size: int = 32,
    positive_rate: float = 0.5,
    tumour_fraction: tuple[float, float] = (0.1, 0.3),
    acquisition: Mapping[str, float] | None = None,
    annotator: Mapping[str, float] | None = None,
    held_out: bool = False,
) -> Slides:
    """Slides of real IHC crops (module docstring), with the same interface as
    :func:`~medtasks.mil.synthetic.generate_slides`.

    Parameters
    ----------
    rng : np.random.Generator
        the site's random stream (consumed).
    num_slides : int
        ``S``.
    tiles_per_slide : int
        ``K``.
    tile_size : int
        ``T`` (at most the block side, 128 for the bundled image).
    positive_rate : float
        ``P(slide holds a DAB-positive tile)``.
    tumour_fraction : tuple[float, float]
        ``(low, high)`` fraction of positive tiles of a positive slide.
    acquisition : Mapping[str, float] | None
        :data:`IHC_ACQUISITION_SPACE` values; ``None`` = neutral.
    annotator : Mapping[str, float] | None
        :data:`~medtasks.mil.synthetic.ANNOTATOR_SPACE` values; ``None`` = neutral.
    held_out : bool
        crop from the server's held-out blocks instead of the sites' blocks.

    Returns
    -------
    Slides
        The slides; ``tile_labels`` 1 = DAB-positive tile.

    Raises
    ------
    DataError
        the image is unavailable (see :func:`load_ihc_image`).
    """
    check_slide_args(num_slides, tiles_per_slide, tile_size, positive_rate)
    resolve_site_params(acquisition, IHC_ACQUISITION_SPACE, "acquisition")
    pool = crop_pool(tile_size, held_out)
    layout_rng, crop_rng = rng.spawn(2)
    tile_labels = slide_layout(layout_rng, num_slides, tiles_per_slide, positive_rate, tumour_fraction)
    crops = sample_crops(crop_rng, tile_labels.reshape(-1).astype(bool), pool)
    tiles = acquire_ihc(crops, acquisition).reshape(num_slides, tiles_per_slide, 3, tile_size, tile_size)
    return labelled_slides(tiles, tile_labels, annotator)
