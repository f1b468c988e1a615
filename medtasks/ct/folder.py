"""Folder sites (``data.source: folder``): real slices in HU read from a data folder, measured.

A folder is ``data.path`` (one pool), a hospital folder of ``data.sites`` or the test folder
``data.test_path`` (:mod:`medtasks.sites`). :func:`folder_pool` reads every slice (:func:`_load_ct_cases`), converts it to ``μ``, resamples
it to ``image_size`` and cuts it to the scanner's field of view (:func:`slice_to_mu`); its label
is "thorax" when the slice contains lungs, "other" otherwise
(:func:`~medtasks.ct.anatomy.anatomy_label`), and its case is the patient it belongs to
(:func:`medtasks.io.case_id`: a DICOM file's ``PatientID``, else the file-name group
``<case>__<rest>``, so a volume is one case). The task splits a pool across sites by case
(:func:`~medtasks.partition.split_indices` with ``groups``), or gives each site its hospital folder
whole; :func:`site_samples` measures a site's slices with the site's scanner, with photon noise from
``torch_generator(seed, "ct", "noise", "site", k)``, and the test folder's with the neutral scanner
(stream ``(seed, "ct", "noise", "server")``).

The folders and the sites are cached per process, as the task is (``client/cache.py``).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from medtasks import io
from medtasks.base import DataError
from medtasks.ct import realdata
from medtasks.ct.anatomy import anatomy_label
from medtasks.ct.operator import FilterName
from medtasks.ct.params import CTParams
from medtasks.ct.scanner import Acquisition, Samples, simulate
from medtasks.seeding import torch_generator

__all__ = ["folder_pool", "site_samples", "slice_to_mu"]


def _load_ct_slices(folder: str | Path) -> list[np.ndarray]:
    """All slices in HU of ``folder`` (:func:`_load_ct_cases` without the cases)."""
    return _load_ct_cases(folder)[0]


def _load_ct_cases(folder: str | Path) -> tuple[list[np.ndarray], list[str]]:
    """All slices in HU from a folder of ``.npy`` / ``.dcm`` files (also NIfTI), sorted by file name,
    and the case (patient, :func:`medtasks.io.case_id`) of each.

    DICOM values are ``RescaleSlope · stored + RescaleIntercept`` (:func:`medtasks.io.read_array`);
    NumPy files must already hold HU. A 3D file gives one slice per index of its last axis.

    Raises
    ------
    DataError
        Missing folder, no slice files, or an unreadable file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"CT data folder {root} does not exist or is not a directory")
    files = [
        p for p in sorted(root.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(io.EXTENSIONS)
    ]
    if not files:
        raise DataError(f"no CT slices ({', '.join(io.EXTENSIONS)}) in {root}")
    slices: list[np.ndarray] = []
    cases: list[str] = []
    for path in files:
        file_slices = io.slices(io.read_array(path))
        slices.extend(file_slices)
        cases.extend([io.case_id(path)] * len(file_slices))
    return slices, cases


def slice_to_mu(hu: np.ndarray, image_size: int) -> np.ndarray:
    """One HU slice as ``μ`` (float32 ``[N, N]``, 1/cm) inside the scanner's field of view.

    ``μ = μ_water (1 + max(h, −1000) / 1000)``, padded with air to a square, resampled bilinearly to
    ``N × N`` and zeroed outside the inscribed circle (the region every projection sees).
    """
    mu = realdata.hu_to_mu(hu)
    side = max(mu.shape)
    pad = [((side - s) // 2, (side - s + 1) // 2) for s in mu.shape]
    mu = np.pad(mu, pad, constant_values=0.0)
    if side != image_size:
        mu = ndimage.zoom(mu, image_size / side, order=1, grid_mode=True, mode="nearest")
    return np.clip(mu * realdata.field_of_view_disk(image_size), 0.0, None).astype(np.float32)


@functools.lru_cache(maxsize=4)
def folder_pool(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All slices of ``path`` as ``μ [n, N, N]``, their labels ``[n]`` and cases ``[n]`` (cached per process).

    Raises
    ------
    DataError
        The folder cannot be read (:func:`_load_ct_cases`).
    """
    slices, cases = _load_ct_cases(path)
    mu = np.stack([slice_to_mu(hu, image_size) for hu in slices])
    return mu, np.array([anatomy_label(m) for m in mu], dtype=np.int64), np.asarray(cases)


@dataclass(frozen=True)
class _FolderSite:
    """Everything that determines a folder site's samples (hashable: the cache key)."""

    path: str
    image_size: int
    indices: tuple[int, ...]
    acquisition: Acquisition
    reference_sigma: float
    filter: FilterName
    seed: int
    stream: tuple[str | int, ...]


@functools.lru_cache(maxsize=16)
def _folder_samples(site: _FolderSite) -> Samples:
    """A folder site's slices measured by its scanner (cached per process)."""
    mu, labels, _ = folder_pool(site.path, site.image_size)
    rows = np.asarray(site.indices, dtype=np.int64)
    generator = torch_generator(site.seed, "ct", "noise", *site.stream)
    return simulate(mu[rows], labels[rows], site.acquisition, site.reference_sigma, site.filter, generator)


def site_samples(
    path: str,
    params: CTParams,
    indices: np.ndarray,
    acquisition: Mapping[str, float],
    annotator: Mapping[str, float],
    *,
    seed: int,
    stream: tuple[str | int, ...],
) -> Samples:
    """The slices ``indices`` of the folder at ``path``, measured by one scanner.

    Parameters
    ----------
    path : str
        The resolved data folder (the key of :func:`folder_pool`).
    params : CTParams
        The task's parameters (neutral scanner, image size, FBP filter).
    indices : np.ndarray
        The site's rows of the pool, in the order the site holds them.
    acquisition : Mapping[str, float]
        The site's :data:`~medtasks.ct.scanner.ACQUISITION_SPACE` values.
    annotator : Mapping[str, float]
        The site's :data:`~medtasks.ct.scanner.ANNOTATOR_SPACE` values.
    seed : int
        The scenario seed.
    stream : tuple[str | int, ...]
        Who measures: ``("site", k)`` for site ``k``, ``("server",)`` for the central test set; the photon
        noise is drawn from ``torch_generator(seed, "ct", "noise", *stream)``.

    Returns
    -------
    Samples
        The site's slices (cached per process).
    """
    site = _FolderSite(
        path=path,
        image_size=params.image_size,
        indices=tuple(int(i) for i in indices),
        acquisition=Acquisition.of_site(params, acquisition),
        reference_sigma=float(annotator["reference_smoothing"]),
        filter=params.filter,
        seed=seed,
        stream=tuple(stream),
    )
    return _folder_samples(site)
