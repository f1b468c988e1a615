"""Segmentation of new images with a trained U-Net (``medfed predict``).

Each input file (NumPy, NIfTI or DICOM, read as :func:`medtasks.io.read_array` reads a site's images: a 2D
image or a 3D volume whose last axis holds the slices) is segmented slice by slice as the task sees its
folder data: every slice normalised (:func:`medtasks.io.normalize_intensity`), padded to a square and
resampled to ``task.params.image_size``. The logits are resampled back (bilinear) to the padded square, the
padding is cut off and the arg-max taken, so the mask has the input's shape. It is written as
``<case>_mask.nii.gz`` (integer labels, ``uint8`` up to 256 classes), on the input's grid (affine and header)
when the input is NIfTI.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medtasks import io
from medtasks.prediction import input_files, write_nifti

__all__ = ["MASK_SUFFIX", "predict_masks", "segment_volume"]

MASK_SUFFIX = "_mask.nii.gz"


def _padding(height: int, width: int) -> tuple[int, int, int]:
    """``(side, top, left)`` of :func:`medtasks.io.pad_to_square` for an ``[height, width]`` slice."""
    side = max(height, width)
    return side, (side - height) // 2, (side - width) // 2


def segment_volume(model: nn.Module, volume: np.ndarray, image_size: int) -> np.ndarray:
    """Labels of every slice of ``volume`` (``[H, W]`` or ``[H, W, Z]``), the same shape, ``int64``."""
    slices = io.slices(volume)
    height, width = slices[0].shape
    side, top, left = _padding(height, width)
    empty = np.zeros((height, width), dtype=np.int64)
    inputs = np.stack([io.resample(io.normalize_intensity(s), empty, image_size)[0] for s in slices])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(inputs)[:, None].to(device))
            logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
    finally:
        model.train(was_training)
    labels = logits[:, :, top: top + height, left: left + width].argmax(dim=1).cpu().numpy()
    return labels[0] if volume.ndim == 2 else np.moveaxis(labels, 0, -1)


def predict_masks(model: nn.Module, input_path: str | Path, output_path: str | Path, *, image_size: int,
                  num_classes: int) -> list[Path]:
    """Segment every image of ``input_path`` (a folder, or one file) into ``output_path``.

    Returns
    -------
    list[Path]
        the ``<case>_mask.nii.gz`` files written, one per input file.

    Raises
    ------
    DataError
        no input file, or one that cannot be read.
    """
    dtype = np.uint8 if num_classes <= 256 else np.int32
    written = []
    for path in input_files(input_path):
        labels = segment_volume(model, io.read_array(path), image_size)
        written.append(write_nifti(labels.astype(dtype), Path(output_path) / f"{io.file_id(path)}{MASK_SUFFIX}",
                                   like=path))
    return written
