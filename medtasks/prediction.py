"""What every task's ``predict`` shares: the input files it is given, and NIfTI outputs.

A task may offer ``predict_files(model, input_path, output_path) -> list[Path]`` (``medfed predict``): it reads
new inputs from ``input_path`` (a folder, or one file), applies ``model`` and writes its outputs into the
folder ``output_path``, returning the files it wrote. Tasks without the method cannot predict.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtasks import io
from medtasks.base import DataError

__all__ = ["input_files", "write_nifti"]


def input_files(path: str | Path, extensions: Sequence[str] = io.EXTENSIONS) -> list[Path]:
    """The files to predict on: ``path`` itself when it is a file, else its non-hidden files with one of
    ``extensions``, sorted by name.

    Raises
    ------
    DataError
        ``path`` does not exist, has an unsupported extension, or is a folder without any such file.
    """
    path = Path(path)
    supported = tuple(ext.lower() for ext in extensions)
    if path.is_file():
        if not path.name.lower().endswith(supported):
            raise DataError(f"cannot predict on {path}: supported files are {', '.join(supported)}")
        return [path]
    if not path.is_dir():
        raise DataError(f"input {path} does not exist")
    files = [p for p in sorted(path.iterdir())
             if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(supported)]
    if not files:
        raise DataError(f"no input files ({', '.join(supported)}) in {path}")
    return files


def write_nifti(array: np.ndarray, path: Path, like: Path | None = None,
                spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """Write ``array`` as a NIfTI file at ``path`` (folders created).

    Parameters
    ----------
    array : np.ndarray
        the volume, in the axis order :func:`medtasks.io.read_array` reads (``[H, W]`` or ``[H, W, Z]``).
    path : Path
        the ``.nii.gz`` file to write.
    like : Path | None
        the input it was predicted from: when a NIfTI file, its affine and header are kept (so the output lies
        on the input's grid); otherwise the affine scales the axes by ``spacing``.
    spacing : tuple[float, float, float]
        voxel size in mm, when ``like`` gives none.
    """
    import nibabel

    affine: Any = np.diag([*spacing, 1.0])
    header = None
    if like is not None and like.name.lower().endswith((".nii", ".nii.gz")):
        source: Any = nibabel.load(str(like))
        affine, header = source.affine, source.header.copy()
    image = nibabel.Nifti1Image(array, affine, header)
    image.set_data_dtype(array.dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    nibabel.save(image, str(path))
    return path
