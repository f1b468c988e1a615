"""Slices of one patient never sit at two sites, nor in both a site's training and validation sets.

A folder of NIfTI volumes used to be split per 2D slice: with 3 patients × 8 slices over 2 sites, site 0
trained on slices of patients [0,0,0,1,1,1,1,2,2] and validated on [0,1,1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medtasks.base import DataError, DataSpec, PartitionSpec, TaskContext
from medtasks.ct.params import CTParams
from medtasks.ct.task import CTReconstructionTask
from medtasks.segmentation.task import SegmentationParams, SegmentationTask
from tests.helpers import write_dicom

SIDE = 32
SLICES = 8


def _patient_volume(patient: int) -> tuple[np.ndarray, np.ndarray]:
    """``(image, mask)`` ``[32, 32, 8]``: a bright bar at rows ``4p..4p+3`` tells the patient in every slice."""
    image = np.zeros((SIDE, SIDE, SLICES), dtype=np.float32)
    image[4 * patient: 4 * patient + 4, 4:28, :] = 100.0
    mask = np.zeros(image.shape, dtype=np.int16)
    mask[4 * patient: 4 * patient + 4, 4:28, :] = 1
    return image, mask


def _write_nifti_patients(root: Path, patients: int) -> Path:
    import nibabel

    for name in ("images", "masks"):
        (root / name).mkdir(parents=True)
    for p in range(patients):
        image, mask = _patient_volume(p)
        nibabel.save(nibabel.Nifti1Image(image, np.eye(4)), root / "images" / f"patient{p}.nii.gz")
        nibabel.save(nibabel.Nifti1Image(mask, np.eye(4)), root / "masks" / f"patient{p}.nii.gz")
    return root


def _segmentation(root: Path, clients: int, val_fraction: float = 0.2) -> SegmentationTask:
    return SegmentationTask(TaskContext(
        params=SegmentationParams(image_size=SIDE, channels=(4, 8)),
        model=None,
        data=DataSpec(source="folder", path=str(root), val_fraction=val_fraction),
        partition=PartitionSpec(clients=clients),
        seed=0,
    ))


def _patients(dataset) -> set[int]:
    """The patients of a dataset's samples, read back from the bar's rows."""
    return {int(torch.nonzero(image[0] > 0.5)[:, 0].min()) // 4 for image, _ in dataset}


def test_issue_example_three_patients_over_two_sites_never_shares_a_patient(tmp_path):
    task = _segmentation(_write_nifti_patients(tmp_path, 3), clients=2)
    held: list[set[int]] = []
    for k in range(2):
        try:
            data = task.client_data(k)
        except DataError as error:  # a site with a single patient cannot validate on another one
            assert "needs at least 2 cases" in str(error) and "\n" not in str(error)
            continue
        train, val = _patients(data.train), _patients(data.val)
        assert not train & val, f"site {k} trains and validates on patients {sorted(train & val)}"
        assert data.stats["cases"] == {"train": [f"patient{p}" for p in sorted(train)],
                                       "val": [f"patient{p}" for p in sorted(val)]}
        held.append(train | val)
    assert held, "no site could be built"
    assert all(not a & b for i, a in enumerate(held) for b in held[i + 1:])


def test_patients_stay_whole_across_sites_and_splits_and_are_recorded(tmp_path):
    task = _segmentation(_write_nifti_patients(tmp_path, 6), clients=2, val_fraction=0.25)
    sites = [task.client_data(k) for k in range(2)]
    cases = [s.stats["cases"] for s in sites]
    everyone = [c for split in cases for c in split["train"] + split["val"]]
    assert sorted(everyone) == [f"patient{p}" for p in range(6)]  # each patient exactly once
    for data, recorded in zip(sites, cases):
        assert len(recorded["val"]) >= 1 and len(recorded["train"]) >= 1
        assert data.stats["n_val"] == SLICES * len(recorded["val"])  # whole patients held out
        assert {f"patient{p}" for p in _patients(data.val)} == set(recorded["val"])
        assert {f"patient{p}" for p in _patients(data.train)} == set(recorded["train"])


def test_too_few_patients_for_the_sites_is_one_line(tmp_path):
    task = _segmentation(_write_nifti_patients(tmp_path, 2), clients=3)
    with pytest.raises(DataError, match=r"cannot partition 2 cases \(16 samples\) across 3 clients") as error:
        task.client_data(0)
    assert "\n" not in str(error.value)


def test_ct_folder_splits_volumes_and_dicom_patients_whole(tmp_path):
    hu = np.full((SIDE, SIDE), -1000.0)
    hu[8:24, 8:24] = 40.0
    for p in range(3):  # three patients as 4-slice NumPy volumes
        np.save(tmp_path / f"vol{p}.npy", np.repeat(hu[..., None], 4, axis=-1))
    for p, z in ((3, 0), (3, 1), (4, 0), (4, 1)):  # two patients as one DICOM file per slice
        write_dicom(tmp_path / f"s{z}{p}.dcm", hu + 1024, intercept=-1024.0, patient_id=f"P{p}")
    task = CTReconstructionTask(TaskContext(
        params=CTParams(image_size=SIDE, num_views=8, channels=(4, 8)), model=None,
        data=DataSpec(source="folder", path=str(tmp_path), val_fraction=0.25),
        partition=PartitionSpec(clients=2), seed=0,
    ))
    sites = [task.client_data(k).stats for k in range(2)]
    groups = [set(s["cases"]["train"]) | set(s["cases"]["val"]) for s in sites]
    assert not groups[0] & groups[1]
    assert groups[0] | groups[1] == {"vol0", "vol1", "vol2", "P3", "P4"}
    for stats in sites:
        assert not set(stats["cases"]["train"]) & set(stats["cases"]["val"])
    assert sum(s["n_train"] + s["n_val"] for s in sites) == 16
