"""Load real 2D images and segmentation masks from a folder.

Layout::

    folder/
      images/<id>.<ext>
      masks/<id>.<ext>      # same id; the extension may differ from the image's

Supported extensions: ``.npy`` (NumPy), ``.nii`` / ``.nii.gz`` (NIfTI, read with
nibabel) and ``.dcm`` (DICOM, read with pydicom; ``RescaleSlope`` and
``RescaleIntercept`` are applied). Files with other extensions and hidden files
are ignored, as are masks without an image.

* A 2D array gives one sample with id ``<id>``.
* A 3D array gives one sample per slice along the last axis (NumPy and NIfTI;
  the frame axis for multi-frame DICOM), with ids ``<id>_z<k>``. Every slice is
  kept, including slices whose mask is empty. A trailing axis of length 1 is
  dropped, so an ``[H, W, 1]`` NIfTI is a 2D image.
* Masks must hold non-negative integer labels (stored as any numeric type).

Every sample also carries the **case** (patient) it belongs to, so that slices of one
patient are never split across sites or across train/validation (:func:`case_id`):

* DICOM: the file's ``PatientID`` (else its ``SeriesInstanceUID``), so every slice file
  of one patient is one case;
* any other file (and DICOM without either tag): the file-name group, the part of the
  file id before the first ``__`` (:data:`CASE_SEPARATOR`), else the whole id. So a
  NIfTI / NumPy volume is one case, and 2D slices of one patient saved as NumPy files
  are grouped by naming them ``<case>__<slice>.npy`` (e.g. ``p007__z012.npy``).

Helpers :func:`resample` (pad to square, then bilinear for images / nearest for
masks) and :func:`normalize_intensity` (robust per-image min-max to ``[0, 1]``)
bring the samples to a task's input size and intensity range.

Samples are returned sorted by id. Every problem (missing folder or subfolder,
no image files, an image without mask, a shape mismatch, an unreadable file,
non-integer labels) raises :class:`medtasks.base.DataError` with a one-line
message naming the offending path.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np

from medtasks.base import DataError

if TYPE_CHECKING:  # pragma: no cover
    import pydicom
    from nibabel.dataobj_images import DataobjImage

#: Supported file extensions, longest first so ``.nii.gz`` wins over ``.gz``.
EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii", ".npy", ".dcm")

#: Separates the case (patient) from the rest of a file id: ``<case>__<slice>``.
CASE_SEPARATOR = "__"


def _extension(path: Path) -> str | None:
    """The supported extension of ``path`` (lower-case), or ``None``."""
    name = path.name.lower()
    return next((ext for ext in EXTENSIONS if name.endswith(ext)), None)


def file_id(path: str | Path) -> str:
    """The id of a supported file: its name without the extension (``p1.nii.gz`` -> ``p1``)."""
    path = Path(path)
    ext = _extension(path)
    return path.name[: -len(ext)] if ext else path.name


def _files_by_id(folder: Path) -> dict[str, Path]:
    """Supported, non-hidden files of ``folder`` by file id (name without extension)."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        ext = _extension(path)
        if ext is None or path.name.startswith(".") or not path.is_file():
            continue
        name = file_id(path)
        if name in files:
            raise DataError(f"two files with id {name!r} in {folder}: {files[name].name} and {path.name}")
        files[name] = path
    return files


def _read_npy(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)


def _read_nifti(path: Path) -> np.ndarray:
    import nibabel

    # nibabel.load is annotated as returning a FileBasedImage; a .nii / .nii.gz loads as a
    # Nifti1Image or Nifti2Image, both DataobjImage subclasses with get_fdata.
    image = cast("DataobjImage", nibabel.load(str(path)))
    return np.asarray(image.get_fdata(dtype=np.float64))


def case_id(path: str | Path) -> str:
    """The case (patient) of the samples read from ``path``.

    DICOM: ``PatientID``, else ``SeriesInstanceUID`` (a header read only); otherwise, or
    when both are empty, the :func:`file_id` up to its first :data:`CASE_SEPARATOR` (the
    whole id when it has none).

    Raises
    ------
    DataError
        an unreadable DICOM header.
    """
    path = Path(path)
    if _extension(path) == ".dcm":
        import pydicom

        try:
            header = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as error:
            raise DataError(f"cannot read {path}: {type(error).__name__}: {error}") from None
        for keyword in ("PatientID", "SeriesInstanceUID"):
            value = str(header.get(keyword, "") or "").strip()
            if value:
                return value
    name = file_id(path)
    return name.split(CASE_SEPARATOR, 1)[0] or name


def dicom_rescale(dataset: pydicom.Dataset) -> tuple[float, float]:
    """``(slope, intercept)`` of the dataset, or of its shared / first per-frame functional group
    (enhanced multi-frame CT keeps them there, not at the top level)."""
    if "RescaleSlope" in dataset or "RescaleIntercept" in dataset:
        return float(dataset.get("RescaleSlope", 1.0)), float(dataset.get("RescaleIntercept", 0.0))
    for keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = dataset.get(keyword) or []
        transform = groups[0].get("PixelValueTransformationSequence") if groups else None
        if transform:
            item = transform[0]
            return float(item.get("RescaleSlope", 1.0)), float(item.get("RescaleIntercept", 0.0))
    return 1.0, 0.0


def _read_dicom(path: Path) -> np.ndarray:
    """DICOM pixel data in stored units: ``slope · stored + intercept``; frames on the last axis."""
    import pydicom

    dataset = pydicom.dcmread(str(path))
    pixels = dataset.pixel_array.astype(np.float64)
    slope, intercept = dicom_rescale(dataset)
    pixels = pixels * slope + intercept
    return np.moveaxis(pixels, 0, -1) if pixels.ndim == 3 else pixels


_READERS: dict[str, Callable[[Path], np.ndarray]] = {
    ".npy": _read_npy,
    ".nii": _read_nifti,
    ".nii.gz": _read_nifti,
    ".dcm": _read_dicom,
}


def read_array(path: str | Path) -> np.ndarray:
    """Read one supported file as a 2D ``[H, W]`` or 3D ``[H, W, Z]`` float64 array.

    Raises
    ------
    DataError
        unsupported extension, unreadable file, or not 2D/3D.
    """
    path = Path(path)
    ext = _extension(path)
    if ext is None:
        raise DataError(f"unsupported file type {path} (supported: {', '.join(EXTENSIONS)})")
    try:
        array = np.asarray(_READERS[ext](path), dtype=np.float64)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise DataError(f"{path} has shape {array.shape}; expected a 2D image or a 3D volume")
    return array


def _as_labels(mask: np.ndarray, path: Path) -> np.ndarray:
    """``mask`` as int64 labels; ``DataError`` for non-integer or negative values."""
    if not np.all(np.isfinite(mask)) or np.any(mask != np.round(mask)):
        raise DataError(f"mask {path} holds non-integer values; masks must be integer labels")
    if mask.size and mask.min() < 0:
        raise DataError(f"mask {path} holds negative labels (min {mask.min():g})")
    return np.round(mask).astype(np.int64)


def slices(array: np.ndarray) -> list[np.ndarray]:
    """The 2D slices of ``array``: itself if 2D, else one per index of the last axis."""
    return [array] if array.ndim == 2 else [array[..., k] for k in range(array.shape[-1])]


def load_image_mask_pairs(
    folder: str | Path,
) -> tuple[list[np.ndarray], list[np.ndarray], list[str], list[str]]:
    """Load every image and its mask from ``folder`` (layout in the module docstring).

    Parameters
    ----------
    folder : str | Path
        the data folder holding ``images/`` and ``masks/``.

    Returns
    -------
    tuple[list[np.ndarray], list[np.ndarray], list[str], list[str]]
        ``(images, masks, ids, cases)``: images ``[H, W]`` float32, masks ``[H, W]`` int64
        (same shape as their image), sample ids and the case (patient, :func:`case_id` of the
        image file) of each sample; sorted by id, one entry per 2D slice.

    Raises
    ------
    DataError
        see the module docstring.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a directory")
    subfolders = {name: root / name for name in ("images", "masks")}
    for path in subfolders.values():
        if not path.is_dir():
            raise DataError(f"data folder {root} has no {path.name}/ subfolder (expected {path})")
    image_files = _files_by_id(subfolders["images"])
    mask_files = _files_by_id(subfolders["masks"])
    if not image_files:
        raise DataError(f"no image files ({', '.join(EXTENSIONS)}) in {subfolders['images']}")

    images: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    ids: list[str] = []
    cases: list[str] = []
    for name, image_path in sorted(image_files.items()):
        mask_path = mask_files.get(name)
        if mask_path is None:
            raise DataError(f"image {image_path} has no mask {name}.<ext> in {subfolders['masks']}")
        image, mask = read_array(image_path), read_array(mask_path)
        if image.shape != mask.shape:
            raise DataError(
                f"image {image_path} has shape {image.shape} but its mask {mask_path} has {mask.shape}"
            )
        labels = _as_labels(mask, mask_path)
        image_slices, mask_slices = slices(image), slices(labels)
        images.extend(s.astype(np.float32) for s in image_slices)
        masks.extend(np.ascontiguousarray(s) for s in mask_slices)
        ids.extend([name] if image.ndim == 2 else [f"{name}_z{k}" for k in range(len(image_slices))])
        cases.extend([case_id(image_path)] * len(image_slices))
    return images, masks, ids, cases


def pad_to_square(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``[H, W]`` image and mask symmetrically to ``[L, L]``, ``L = max(H, W)``.

    The image is padded with its minimum (air), the mask with background (0), so the
    aspect ratio survives a later resampling.
    """
    height, width = image.shape
    side = max(height, width)
    pad = ((side - height) // 2, (side - height + 1) // 2), ((side - width) // 2, (side - width + 1) // 2)
    fill = float(image.min()) if image.size else 0.0
    return np.pad(image, pad, constant_values=fill), np.pad(mask, pad, constant_values=0)


def resample(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad to square (:func:`pad_to_square`) and resample to ``[size, size]``.

    Images are resampled bilinearly (spline order 1), masks with nearest neighbour
    (order 0) so labels stay labels.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(image [size, size] float32, mask [size, size] int64)``.
    """
    from scipy import ndimage

    image, mask = pad_to_square(image, mask)
    if image.shape != (size, size):
        zoom = size / image.shape[0]
        image = ndimage.zoom(image, zoom, order=1, grid_mode=True, mode="nearest")
        mask = ndimage.zoom(mask, zoom, order=0, grid_mode=True, mode="nearest")
    return image.astype(np.float32), mask.astype(np.int64)


def normalize_intensity(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Robust min-max normalisation of one image to about ``[0, 1]``.

    ``x' = (clip(x, q_low, q_high) - q_low) / (q_high - q_low)`` with ``q`` the image's
    percentiles, so one hot pixel cannot squash the contrast. A constant image maps to 0.

    Returns
    -------
    np.ndarray
        ``[H, W]`` float32.
    """
    q_low, q_high = np.percentile(image, [low, high])
    if q_high <= q_low:
        return np.zeros_like(image, dtype=np.float32)
    return ((np.clip(image, q_low, q_high) - q_low) / (q_high - q_low)).astype(np.float32)
