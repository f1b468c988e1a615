"""Specification of medtasks.io: image/mask folders in .npy, NIfTI and DICOM."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medtasks.base import DataError
from medtasks.io import case_id, load_image_mask_pairs, normalize_intensity, resample
from tests.helpers import write_dicom


def _folder(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    return root


def _npy_pair(root: Path, image: np.ndarray | None, mask: np.ndarray | None, case: str = "x") -> None:
    """A folder with one ``.npy`` image and/or mask."""
    _folder(root)
    if image is not None:
        np.save(root / "images" / f"{case}.npy", image)
    if mask is not None:
        np.save(root / "masks" / f"{case}.npy", mask)


def _unreadable(root: Path) -> None:
    _npy_pair(root, None, np.zeros((3, 3)))
    (root / "images" / "x.npy").write_bytes(b"not an array")


def _write_nifti(path: Path, array: np.ndarray) -> None:
    import nibabel

    nibabel.save(nibabel.Nifti1Image(array, affine=np.eye(4)), str(path))


def test_npy_pairs_load_with_values_dtypes_and_sorted_ids(tmp_path):
    root = _folder(tmp_path)
    rng = np.random.default_rng(0)
    arrays = {}
    for case in ("b", "a"):
        image = rng.normal(size=(6, 5))
        mask = rng.integers(0, 3, size=(6, 5))
        np.save(root / "images" / f"{case}.npy", image)
        np.save(root / "masks" / f"{case}.npy", mask.astype(np.uint8))
        arrays[case] = (image, mask)

    images, masks, ids, cases = load_image_mask_pairs(root)

    assert ids == cases == ["a", "b"]
    for image, mask, case in zip(images, masks, ids):
        assert image.dtype == np.float32 and mask.dtype == np.int64
        np.testing.assert_allclose(image, arrays[case][0], rtol=1e-6)
        np.testing.assert_array_equal(mask, arrays[case][1])


def test_nifti_volume_expands_to_every_slice_along_last_axis(tmp_path):
    root = _folder(tmp_path)
    volume = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    labels = np.zeros((4, 5, 3), dtype=np.int16)
    labels[1, 1, 0] = 2  # slices 1 and 2 have empty masks and are kept
    _write_nifti(root / "images" / "vol.nii.gz", volume)
    _write_nifti(root / "masks" / "vol.nii", labels)

    images, masks, ids, cases = load_image_mask_pairs(root)

    assert ids == ["vol_z0", "vol_z1", "vol_z2"]
    assert cases == ["vol"] * 3  # a volume is one case: its slices stay together
    for k in range(3):
        assert images[k].shape == (4, 5)
        np.testing.assert_array_equal(images[k], volume[..., k])
        np.testing.assert_array_equal(masks[k], labels[..., k])


def test_dicom_applies_rescale_slope_and_intercept(tmp_path):
    root = _folder(tmp_path)
    stored = np.arange(12, dtype=np.uint16).reshape(3, 4) * 10
    write_dicom(root / "images" / "ct.dcm", stored, slope=2.0, intercept=-1024.0)
    np.save(root / "masks" / "ct.npy", (stored > 50).astype(np.int64))

    images, masks, ids, cases = load_image_mask_pairs(root)

    assert ids == ["ct"] and cases == ["PAT-7"]  # the DICOM PatientID
    np.testing.assert_allclose(images[0], stored * 2.0 - 1024.0)
    np.testing.assert_array_equal(masks[0], stored > 50)


def test_npy_slices_are_grouped_into_cases_by_the_file_name(tmp_path):
    root = _folder(tmp_path)
    for name in ("p1__z0", "p1__z1", "p2__z0", "single", "__odd"):
        np.save(root / "images" / f"{name}.npy", np.zeros((3, 3)))
        np.save(root / "masks" / f"{name}.npy", np.zeros((3, 3)))

    _, _, ids, cases = load_image_mask_pairs(root)

    assert dict(zip(ids, cases)) == {"p1__z0": "p1", "p1__z1": "p1", "p2__z0": "p2", "single": "single", "__odd": "__odd"}


def test_dicom_without_patient_id_falls_back_to_series_then_file_name(tmp_path):
    stored = np.zeros((3, 4), dtype=np.uint16)
    write_dicom(tmp_path / "a__1.dcm", stored, patient_id="", series="1.2.3")
    write_dicom(tmp_path / "b__1.dcm", stored, patient_id="", series="")
    assert case_id(tmp_path / "a__1.dcm") == "1.2.3"
    assert case_id(tmp_path / "b__1.dcm") == "b"


def test_other_files_and_extra_masks_are_ignored(tmp_path):
    root = _folder(tmp_path)
    np.save(root / "images" / "a.npy", np.zeros((3, 3)))
    np.save(root / "masks" / "a.npy", np.zeros((3, 3)))
    np.save(root / "masks" / "orphan.npy", np.zeros((3, 3)))
    (root / "images" / "README.txt").write_text("notes")
    (root / "images" / ".hidden.npy").write_bytes(b"junk")

    assert load_image_mask_pairs(root)[2] == ["a"]


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda root: None, "does not exist"),
        (lambda root: (root / "images").mkdir(parents=True), "no masks/ subfolder"),
        (_folder, "no image files"),
        (lambda root: _npy_pair(root, np.zeros((3, 3)), None), "has no mask"),
        (lambda root: _npy_pair(root, np.zeros((3, 3)), np.zeros((3, 4))), "has shape (3, 3) but its mask"),
        (lambda root: _npy_pair(root, np.zeros((3, 3)), np.full((3, 3), 0.5)), "non-integer"),
        (_unreadable, "cannot read"),
    ],
    ids=["missing-folder", "missing-masks", "no-files", "no-mask", "shape-mismatch", "non-integer", "unreadable"],
)
def test_bad_folders_raise_one_line_data_error_naming_the_path(tmp_path, setup, message):
    root = tmp_path / "data"
    setup(root)

    with pytest.raises(DataError) as error:
        load_image_mask_pairs(root)

    text = str(error.value)
    assert message in text
    assert str(root) in text
    assert "\n" not in text


def test_resample_keeps_labels_and_aspect_ratio():
    image = np.ones((20, 40), dtype=np.float32)
    mask = np.zeros((20, 40), dtype=np.int64)
    mask[:, :20] = 3  # left half

    small_image, small_mask = resample(image, mask, 16)

    assert small_image.shape == small_mask.shape == (16, 16)
    assert set(np.unique(small_mask)) == {0, 3}  # nearest neighbour: no interpolated labels
    # padded to 40 x 40 first: the content fills the middle half of the rows
    assert small_mask[:4].max() == 0 and small_mask[-4:].max() == 0
    assert (small_mask[6:10, :6] == 3).all()


def test_normalize_intensity_maps_robust_range_to_unit_interval():
    image = np.linspace(-500, 1500, 1000).reshape(10, 100)
    image[0, 0] = 1e6  # a hot pixel must not squash the contrast

    out = normalize_intensity(image)

    assert out.dtype == np.float32
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < out[5, 50] < 0.6
    assert not normalize_intensity(np.full((4, 4), 7.0)).any()
