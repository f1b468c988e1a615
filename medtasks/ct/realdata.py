"""Real CT slices that installed Python packages ship: found and read offline, then cut into augmented patches.

Each entry of :data:`PACKAGED_SLICES` names one axial CT image in the files a PyPI distribution
installs. The file is found through the distribution's own metadata
(``importlib.metadata.distribution(name).locate_file``). Nothing calls pydicom's
``get_testdata_file``, because that function downloads files the wheel does not hold.

=========================  ============  ========  =========================================================
slice                      distribution  anatomy   what it is
=========================  ============  ========  =========================================================
``CT_small``               pydicom       thorax    128² crop (0.66 mm) around a thoracic vertebra (NEMA
                                                   WG04 CT1), uncompressed
``J2K_pixelrep_mismatch``  pydicom       head      512² skull base (0.43 mm), lossless JPEG 2000 (Pillow
                                                   decodes it)
``693_UNCR``               pydicom-data  head      512² head (0.48 mm) from CQ500, uncompressed
``explicit_VR-UN``         pydicom-data  abdomen   512² abdomen at the pancreas (0.86 mm), lossless JPEG 2000
``eCT_Supplemental/0``,    pydicom-data  head      the two 512² frames (0.39 mm) of an enhanced multi-frame
``eCT_Supplemental/1``                             perfusion CT of the brain (DICOM's example; skull removed)
=========================  ============  ========  =========================================================

pydicom is a main dependency of medfed, so its two slices are always there. ``pydicom-data``
(MIT, a 34 MB wheel and 58 MB installed) is optional: ``pip install pydicom-data``. Asking for a
distribution that is not installed, or for a file it does not hold, raises a one-line
:class:`~medtasks.base.DataError`.

pydicom 3.0.2 also bundles ``693_J2KI.dcm``: the slice of ``693_UNCR``, lossy JPEG 2000 at 3.6 kB
(and stored with another pixel representation: its values range over −3995…1812 HU against
−3024…1468), so it is left out. The other CT files in the pydicom wheel are 16² thumbnails
(``dicomdirtests``) or hold no pixels.

Values are in Hounsfield units: ``h = RescaleSlope · stored + RescaleIntercept``. The slope and
intercept come from the dataset itself or, in an enhanced multi-frame image, from its shared
(else first per-frame) functional group.

**Patches.** A handful of slices cannot train a network by themselves, so every training image
is an augmented patch of one of them (:meth:`PatchSource.draw`, :meth:`PatchSource.render`): a
square crop of side ``s`` centred on a body pixel, rotated by ``θ ~ U(0°, 360°)``, mirrored with
probability 1/2, resampled to ``N × N`` (Gaussian anti-aliasing of ``σ = max(0, (s/N − 1)/2)``
pixels when it shrinks) and multiplied by a gain ``g ~ U(0.9, 1.1)`` (another effective energy).
Only the disk inscribed in the crop is kept (the scanner's field of view), so the patch is a
magnified view: it fills the 25.6 cm field of view of :mod:`~medtasks.ct.physics`.

**Held-out material.** Each slice's body (:func:`body_mask`) is split at a column: the left
``1 − f`` of its width is the ``"train"`` region and the right ``f`` (:data:`HELD_OUT_FRACTION`) the
``"test"`` region (:class:`PatchSource`). A patch reads native pixels only inside its region's
columns (:meth:`Patch.window` includes the reach of the anti-aliasing and of the bilinear
interpolation), so no pixel of a central test patch ever reaches a training patch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

import numpy as np
from scipy import ndimage

from medtasks import io
from medtasks.base import DataError
from medtasks.ct.physics import from_hu

if TYPE_CHECKING:
    from pydicom import Dataset

__all__ = [
    "AIR_HU",
    "HELD_OUT_FRACTION",
    "PACKAGED_SLICES",
    "PACKAGES",
    "Package",
    "PackagedSlice",
    "Patch",
    "PatchSource",
    "RealSlice",
    "Region",
    "anatomies",
    "body_mask",
    "field_of_view_disk",
    "hu_to_mu",
    "load_slices",
    "locate",
    "read_hu",
    "selection",
]

Package = Literal["pydicom", "pydicom-data"]
PACKAGES: tuple[str, ...] = get_args(Package)
"""Distributions that ship real CT slices, in catalogue order."""

AIR_HU: float = -1000.0
"""HU of air. Lower values (padding outside the scanner's circle, −2000 or −3024) are clipped to it."""

#: Anatomy labels in a fixed order; :func:`anatomies` keeps the ones a selection holds.
_ANATOMY_ORDER: tuple[str, ...] = ("head", "thorax", "abdomen")


@dataclass(frozen=True)
class PackagedSlice:
    """One catalogue entry: where a real CT slice lies in an installed distribution.

    Attributes
    ----------
    name : str
        Short name (the file stem, plus ``/frame`` for a multi-frame file).
    package : Package
        The distribution that installs the file.
    path : str
        The file's path inside the distribution's installed files.
    anatomy : str
        Body region, the label used for label skew.
    frame : int | None
        Frame index of a multi-frame file, or None for a single image.
    """

    name: str
    package: Package
    path: str
    anatomy: str
    frame: int | None = None


PACKAGED_SLICES: tuple[PackagedSlice, ...] = (
    PackagedSlice("CT_small", "pydicom", "pydicom/data/test_files/CT_small.dcm", "thorax"),
    PackagedSlice(
        "J2K_pixelrep_mismatch", "pydicom", "pydicom/data/test_files/J2K_pixelrep_mismatch.dcm", "head"
    ),
    PackagedSlice("693_UNCR", "pydicom-data", "data_store/data/693_UNCR.dcm", "head"),
    PackagedSlice("explicit_VR-UN", "pydicom-data", "data_store/data/explicit_VR-UN.dcm", "abdomen"),
    PackagedSlice("eCT_Supplemental/0", "pydicom-data", "data_store/data/eCT_Supplemental.dcm", "head", 0),
    PackagedSlice("eCT_Supplemental/1", "pydicom-data", "data_store/data/eCT_Supplemental.dcm", "head", 1),
)
"""Every real CT slice medfed knows, in a fixed order (the order seeds index into)."""


@dataclass(frozen=True)
class RealSlice:
    """A loaded real slice.

    Attributes
    ----------
    entry : PackagedSlice
        Its catalogue entry.
    hu : np.ndarray
        ``[H, W]`` float64 Hounsfield units as stored (not clipped).
    pixel_spacing_mm : tuple[float, float] | None
        ``(row, column)`` spacing, or None if the file does not say.
    """

    entry: PackagedSlice
    hu: np.ndarray
    pixel_spacing_mm: tuple[float, float] | None


def _check_packages(packages: Sequence[str]) -> tuple[str, ...]:
    """``packages`` as a tuple; ``ValueError`` for an empty selection or an unknown name."""
    unknown = sorted(set(packages) - set(PACKAGES))
    if unknown or not packages:
        raise ValueError(f"packages must be a non-empty subset of {list(PACKAGES)}, got {list(packages)}")
    return tuple(packages)


def selection(packages: Sequence[str]) -> tuple[PackagedSlice, ...]:
    """The catalogue entries shipped by ``packages``, in catalogue order."""
    chosen = set(_check_packages(packages))
    return tuple(entry for entry in PACKAGED_SLICES if entry.package in chosen)


def anatomies(packages: Sequence[str]) -> tuple[str, ...]:
    """The anatomy labels of the slices of ``packages``, in the order head, thorax, abdomen.

    Needs no installed file: it reads the catalogue only.
    """
    present = {entry.anatomy for entry in selection(packages)}
    return tuple(a for a in _ANATOMY_ORDER if a in present)


def locate(entry: PackagedSlice) -> Path:
    """The installed file of ``entry``.

    Raises
    ------
    DataError
        The distribution is not installed, or it does not hold the file (another
        version of it).
    """
    try:
        distribution = metadata.distribution(entry.package)
    except metadata.PackageNotFoundError:
        raise DataError(
            f"the real CT slice {entry.name} needs the package {entry.package}, which is not installed "
            f"(pip install {entry.package}, or leave {entry.package} out of task.params.slice_packages)"
        ) from None
    path = Path(str(distribution.locate_file(entry.path)))
    if not path.is_file():
        raise DataError(
            f"{entry.package} {distribution.version} has no {entry.path} (the real CT slice {entry.name}); "
            "reinstall it or use a version that ships the file"
        )
    return path


def _spacing(dataset: Dataset) -> tuple[float, float] | None:
    """``PixelSpacing`` of the dataset or of its shared functional group, in mm."""
    spacing = dataset.get("PixelSpacing")
    if spacing is None:
        groups = dataset.get("SharedFunctionalGroupsSequence") or []
        measures = groups[0].get("PixelMeasuresSequence") if groups else None
        spacing = measures[0].get("PixelSpacing") if measures else None
    return (float(spacing[0]), float(spacing[1])) if spacing is not None else None


def read_hu(path: str | Path, frame: int | None = None) -> tuple[np.ndarray, tuple[float, float] | None]:
    """One CT image of a DICOM file in HU, and its pixel spacing.

    Parameters
    ----------
    path : str | Path
        DICOM file.
    frame : int | None, optional
        Frame of a multi-frame file (None: the file must hold one image).

    Returns
    -------
    tuple[np.ndarray, tuple[float, float] | None]
        ``(hu [H, W] float64, (row, column) spacing in mm or None)``.

    Raises
    ------
    DataError
        Unreadable file, a missing frame, or not a 2D image.
    """
    import pydicom

    try:
        dataset = pydicom.dcmread(str(path))
        pixels = np.asarray(dataset.pixel_array, dtype=np.float64)
    except Exception as error:
        raise DataError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    if frame is not None:
        if pixels.ndim != 3 or not 0 <= frame < len(pixels):
            raise DataError(f"{path} has pixel shape {pixels.shape}; it has no frame {frame}")
        pixels = pixels[frame]
    if pixels.ndim != 2:
        raise DataError(f"{path} has pixel shape {pixels.shape}; expected one 2D image")
    slope, intercept = io.dicom_rescale(dataset)
    return pixels * slope + intercept, _spacing(dataset)


@functools.lru_cache(maxsize=4)
def load_slices(packages: tuple[str, ...]) -> tuple[RealSlice, ...]:
    """Every catalogued slice of ``packages`` in HU (cached per process).

    Raises
    ------
    DataError
        A distribution or file is missing, or a file cannot be decoded.
    """
    return tuple(RealSlice(entry, *read_hu(locate(entry), entry.frame)) for entry in selection(packages))


def hu_to_mu(hu: np.ndarray) -> np.ndarray:
    """Linear attenuation in 1/cm, ``μ = μ_water (1 + max(h, −1000) / 1000)`` (:func:`~.physics.from_hu`)."""
    return np.asarray(from_hu(np.maximum(hu, AIR_HU)), dtype=np.float64)


def field_of_view_disk(image_size: int) -> np.ndarray:
    """The scanner's field of view: ``(i − c)² + (j − c)² ≤ c²`` with ``c = N // 2``, bool ``[N, N]``.

    This is the circle every projection of :class:`~medtasks.ct.operator.RadonOperator` sees.
    """
    offset = np.arange(image_size) - image_size // 2
    return offset[:, None] ** 2 + offset[None, :] ** 2 <= (image_size // 2) ** 2


# ----------------------------------------------------------------------------- patches

Region = Literal["train", "test"]

HELD_OUT_FRACTION: float = 0.4
"""Share ``f`` of each slice's body width (its right side) kept for the central test set."""
PATCH_SCALE: tuple[float, float] = (0.6, 1.0)
"""Crop side ``s`` as a fraction of the largest side that fits the test region."""
GAIN_RANGE: tuple[float, float] = (0.9, 1.1)
"""Range of the attenuation gain ``g`` (a different effective energy)."""
BODY_HU: float = -500.0
"""The body is the largest connected set of pixels above this value, holes filled (not the table)."""


@dataclass(frozen=True)
class Patch:
    """How one patch is cut from a slice, in the slice's native pixel coordinates.

    Pixel ``k`` covers ``[k − ½, k + ½]``; the crop is the square of side ``s`` centred at
    ``(r, c) = (row, col)``. Output pixel ``(i, j)`` of an ``N × N`` patch samples the native point

    .. math::
        \\text{row} = r + u \\sin θ + v \\cos θ, \\qquad \\text{col} = c + u \\cos θ − v \\sin θ,

    with ``u = ±((j + ½)/N − ½) s`` (minus when ``flip``) and ``v = ((i + ½)/N − ½) s``.

    Attributes
    ----------
    row : float
        Centre row ``r``.
    col : float
        Centre column ``c``.
    side : float
        Crop side ``s`` in native pixels.
    angle : float
        Rotation ``θ`` in degrees.
    flip : bool
        Mirror left–right before rotating.
    gain : float
        Attenuation factor ``g``.
    """

    row: float
    col: float
    side: float
    angle: float
    flip: bool
    gain: float

    @staticmethod
    def sigma(side: float, image_size: int) -> float:
        """Anti-aliasing ``σ = max(0, (s/N − 1)/2)`` in native pixels."""
        return max(0.0, (side / image_size - 1.0) / 2.0)

    @staticmethod
    def reach(side: float, image_size: int) -> float:
        """Half-width of the native pixels a patch reads: ``s/2 + ⌈4σ⌉ + 2`` (blur, then bilinear taps)."""
        return side / 2.0 + math.ceil(4.0 * Patch.sigma(side, image_size)) + 2.0

    def window(self, shape: tuple[int, int], image_size: int) -> tuple[slice, slice]:
        """The native rows and columns the patch reads (its footprint), clipped to the image."""
        half = self.reach(self.side, image_size)
        rows = slice(max(0, math.floor(self.row - half)), min(shape[0], math.ceil(self.row + half) + 1))
        cols = slice(max(0, math.floor(self.col - half)), min(shape[1], math.ceil(self.col + half) + 1))
        return rows, cols


def body_mask(mu: np.ndarray) -> np.ndarray:
    """The patient: the largest connected component of ``μ > μ(−500 HU)``, holes filled, bool ``[H, W]``.

    Table and head rest are separate components, so they are left out; an empty slice gives all False.
    """
    dense = mu > hu_to_mu(np.asarray(BODY_HU, dtype=np.float64))  # a 0-d array, as hu_to_mu returns
    components, count = ndimage.label(dense)
    if count == 0:
        return dense
    sizes = np.bincount(components.ravel())[1:]
    return ndimage.binary_fill_holes(components == 1 + int(np.argmax(sizes)))


class PatchSource:
    """One slice ``μ`` ready to be cut into patches: its body and its train / test column regions.

    The body (:func:`body_mask`) spans columns ``x0 … x1``; it is split at
    ``c = x0 + round((1 − f)(x1 − x0 + 1))`` with ``f`` = :data:`HELD_OUT_FRACTION`. The
    ``"train"`` region is columns ``[0, c)`` and ``"test"`` is ``[c, W)``.

    Parameters
    ----------
    mu : np.ndarray
        The slice ``[H, W]``, any units (the patches keep them).
    """

    def __init__(self, mu: np.ndarray) -> None:
        self.mu = np.asarray(mu, dtype=np.float64)
        self.body = body_mask(self.mu)
        if not self.body.any():
            raise ValueError("a slice without body (nothing above -500 HU) cannot be cut into patches")
        columns = np.flatnonzero(self.body.any(axis=0))
        split = int(columns[0] + round((1.0 - HELD_OUT_FRACTION) * (columns[-1] - columns[0] + 1)))
        #: Columns ``[start, stop)`` each region may read.
        self.regions: dict[str, tuple[int, int]] = {"train": (0, split), "test": (split, self.mu.shape[1])}

    def max_side(self, image_size: int) -> float:
        """The largest crop side ``s`` whose footprint (``2·reach + 3`` pixels) fits the test region and the height."""
        start, stop = self.regions["test"]
        width = min(stop - start, self.mu.shape[0]) - 3.0
        side = width - 2.0 * (Patch.reach(width, image_size) - width / 2.0)  # the margin grows with s
        if side < 4.0:
            raise ValueError(f"a slice of shape {self.mu.shape} is too small to cut held-out patches from")
        return side

    def draw(self, rng: np.random.Generator, region: Region, image_size: int) -> Patch:
        """Draw one augmented patch of ``region`` (module docstring); its window stays in the region's columns.

        ``s = U(0.6, 1) · max_side``; the centre is a uniform body pixel among those whose window
        fits (a uniform point of the feasible rectangle if none does); ``θ``, the mirror and ``g``
        are drawn last.
        """
        if region not in self.regions:
            raise ValueError(f"region must be 'train' or 'test', got {region!r}")
        side = float(rng.uniform(*PATCH_SCALE)) * self.max_side(image_size)
        half = Patch.reach(side, image_size) + 1.0
        start, stop = self.regions[region]
        row_range, col_range = (half, self.mu.shape[0] - half), (start + half, stop - half)
        rows, cols = np.nonzero(self.body)
        inside = (rows >= row_range[0]) & (rows <= row_range[1]) & (cols >= col_range[0]) & (cols <= col_range[1])
        if inside.any():
            k = int(rng.choice(np.flatnonzero(inside)))
            row, col = float(rows[k]), float(cols[k])
        else:
            row, col = float(rng.uniform(*row_range)), float(rng.uniform(*col_range))
        angle, flip, gain = float(rng.uniform(0.0, 360.0)), bool(rng.random() < 0.5), float(rng.uniform(*GAIN_RANGE))
        return Patch(row=row, col=col, side=side, angle=angle, flip=flip, gain=gain)

    def render(self, patch: Patch, image_size: int) -> np.ndarray:
        """The patch as an image ``[N, N]`` float32 (units of ``mu``), zero outside the field of view.

        Only ``mu[patch.window(...)]`` is read: the window is smoothed (``σ`` of :meth:`Patch.sigma`),
        then sampled bilinearly at the points of :class:`Patch`, scaled by the gain and masked with
        :func:`field_of_view_disk`.
        """
        rows, cols = patch.window(self.mu.shape, image_size)
        window = self.mu[rows, cols]
        sigma = Patch.sigma(patch.side, image_size)
        if sigma > 0:
            window = ndimage.gaussian_filter(window, sigma, mode="nearest")
        t = ((np.arange(image_size) + 0.5) / image_size - 0.5) * patch.side
        u, v = t[None, :] * (-1.0 if patch.flip else 1.0), t[:, None]
        cos, sin = math.cos(math.radians(patch.angle)), math.sin(math.radians(patch.angle))
        points = np.broadcast_arrays(
            patch.row + u * sin + v * cos - rows.start, patch.col + u * cos - v * sin - cols.start
        )
        values = ndimage.map_coordinates(window, points, order=1, mode="nearest")
        return np.clip(patch.gain * values * field_of_view_disk(image_size), 0.0, None).astype(np.float32)
