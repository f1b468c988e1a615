"""Reconstruction of new sparse-view sinograms with a trained network (``medfed predict``).

What a user of sparse-view CT holds is the scanner's measurement, so the input is **sinograms**, not FBP
images: the unrolled network needs the measurement itself (its data-consistency steps apply ``Aᵀ(Ax − y)``),
and FBPConvNet is trained on this task's own FBP (filter ``task.params.filter``), which is computed here
from the sinogram as in training. Each input file (``.npy``; NIfTI and DICOM are read too, with
:func:`medtasks.io.read_array`) holds one sinogram ``[A, N]`` (a row per view), or a stack ``[A, N, n]`` of
``n`` slices on the last axis, taken with the run's neutral scanner: ``A = task.params.num_views`` views
evenly spaced over ``[0, task.params.angular_range)`` and ``N = task.params.image_size`` detector bins, in
the geometry of :mod:`medtasks.ct.operator` (parallel beam, pixel size 1). Values are line integrals of
``μ`` in 1/cm along each ray in pixel steps: ``−ln(I / I₀) / Δ`` with ``Δ`` the pixel size in cm
(:func:`medtasks.ct.physics.pixel_size_cm`), as :func:`medtasks.ct.scanner.simulate` measures them.

The reconstruction is written as ``<case>_recon.nii.gz``: float32 Hounsfield units, ``[N, N]`` or
``[N, N, n]``, voxel size ``Δ`` in mm in the affine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medtasks import io
from medtasks.base import DataError
from medtasks.ct.operator import Geometry, get_operator
from medtasks.ct.params import CTParams
from medtasks.ct.physics import pixel_size_cm, to_hu
from medtasks.ct.scanner import IMAGE_SCALE
from medtasks.prediction import input_files, write_nifti

__all__ = ["RECON_SUFFIX", "predict_reconstructions", "reconstruct"]

RECON_SUFFIX = "_recon.nii.gz"


def reconstruct(model: nn.Module, sinograms: np.ndarray, params: CTParams) -> np.ndarray:
    """Hounsfield-unit images ``[n, N, N]`` (float32) of sinograms ``[n, A, N]`` of the neutral scanner."""
    operator = get_operator(Geometry.sparse_view(params.image_size, params.num_views, params.angular_range))
    device = next(model.parameters()).device
    y = torch.from_numpy(np.ascontiguousarray(sinograms, dtype=np.float32))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            fbp = operator.fbp(y, params.filter) / IMAGE_SCALE
            x = model(fbp[:, None].to(device), (y / IMAGE_SCALE)[:, None].to(device), operator)
    finally:
        model.train(was_training)
    return to_hu(x[:, 0].cpu() * IMAGE_SCALE).numpy().astype(np.float32)


def _read_sinograms(path: Path, params: CTParams) -> np.ndarray:
    """The sinogram ``[A, N]`` or stack ``[A, N, n]`` of one file, checked against the neutral scanner's geometry."""
    array = io.read_array(path)
    expected = (params.num_views, params.image_size)
    if array.shape[:2] != expected:
        raise DataError(f"{path}: a sinogram of shape {array.shape[:2]}, but the run's scanner gives {expected} "
                        "(task.params.num_views views × task.params.image_size detector bins)")
    return array


def predict_reconstructions(model: nn.Module, input_path: str | Path, output_path: str | Path,
                            params: CTParams) -> list[Path]:
    """Reconstruct every sinogram file of ``input_path`` (a folder, or one file) into ``output_path``; returns
    the ``<case>_recon.nii.gz`` files written, one per input file. An input that cannot be read, or a sinogram
    of another geometry, raises :class:`~medtasks.base.DataError`."""
    spacing_mm = 10.0 * pixel_size_cm(params.image_size)
    written = []
    for path in input_files(input_path):
        sinograms = _read_sinograms(path, params)
        images = reconstruct(model, np.stack(io.slices(sinograms)), params)
        volume = images[0] if sinograms.ndim == 2 else np.moveaxis(images, 0, -1)
        target = Path(output_path) / f"{io.file_id(path)}{RECON_SUFFIX}"
        written.append(write_nifti(volume, target, spacing=(spacing_mm, spacing_mm, 1.0)))
    return written
