"""Specification of the packaged real CT slices (medtasks.ct.realdata) and of ``phantom: packaged``."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from medtasks.base import DataError, DataSpec, PartitionSpec, TaskContext
from medtasks.ct import realdata
from medtasks.ct import synthetic as ct_synthetic
from medtasks.ct.folder import slice_to_mu
from medtasks.ct.metrics import psnr
from medtasks.ct.params import CTParams
from medtasks.ct.physics import MU_WATER
from medtasks.ct.scanner import Acquisition, simulate
from medtasks.ct.task import CTReconstructionTask


@pytest.fixture(autouse=True)
def _fresh_caches():
    """One thread (a busy 2-core box), and no cached slices or sites leaking between tests."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    for cached in (realdata.load_slices, ct_synthetic._packaged_pool, ct_synthetic._synthetic_samples):
        cached.cache_clear()


def _has(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def _task(kind: str = "iid", *, seed: int = 0, n: int = 6, server: int = 0, packages=("pydicom",)):
    ctx = TaskContext(
        params=CTParams(image_size=32, num_views=20, phantom="packaged", slice_packages=packages),
        model=None,
        data=DataSpec(samples_per_client=n, server_samples=server),
        partition=PartitionSpec(clients=2, kind=kind, params={"severity": 1.0} if kind == "feature_skew" else {}),
        seed=seed,
    )
    return CTReconstructionTask(ctx)


def _targets(dataset) -> torch.Tensor:
    return torch.stack([dataset[i][2] for i in range(len(dataset))])


def _soft_tissue_median(hu: np.ndarray) -> float:
    return float(np.median(hu[(hu > -200) & (hu < 200)]))


# ----------------------------------------------------------------------------- the packaged slices


def test_pydicom_ships_a_thorax_and_a_head_slice_in_hounsfield_units():
    slices = {s.entry.name: s for s in realdata.load_slices(("pydicom",))}

    assert set(slices) == {"CT_small", "J2K_pixelrep_mismatch"}
    thorax, head = slices["CT_small"], slices["J2K_pixelrep_mismatch"]
    assert thorax.hu.shape == (128, 128) and head.hu.shape == (512, 512)
    assert thorax.pixel_spacing_mm == pytest.approx((0.661468, 0.661468))
    for item in (thorax, head):
        assert 0.0 <= _soft_tissue_median(item.hu) <= 100.0  # muscle, brain
        assert item.hu.max() > 700.0  # bone
    around_head = head.hu[(head.hu > -1100) & (head.hu < -900)]
    assert around_head.size > 0.1 * head.hu.size and abs(float(np.median(around_head)) + 1000.0) < 20.0  # air
    assert realdata.anatomies(("pydicom",)) == ("head", "thorax")


def test_hu_become_linear_attenuation_with_padding_clipped_to_air():
    mu = realdata.hu_to_mu(np.array([-3024.0, -1000.0, 0.0, 1000.0]))
    np.testing.assert_allclose(mu, [0.0, 0.0, MU_WATER, 2 * MU_WATER])


@pytest.mark.skipif(not _has("pydicom-data"), reason="the optional pydicom-data package is not installed")
def test_pydicom_data_adds_an_abdomen_and_the_enhanced_multiframe_ct():
    slices = {s.entry.name: s for s in realdata.load_slices(("pydicom-data",))}

    assert set(slices) == {"693_UNCR", "explicit_VR-UN", "eCT_Supplemental/0", "eCT_Supplemental/1"}
    frames = [slices[f"eCT_Supplemental/{k}"].hu for k in (0, 1)]
    assert not np.array_equal(*frames)
    assert all(f.min() == -1024.0 for f in frames)  # rescaled by the shared functional group, not raw
    assert slices["eCT_Supplemental/0"].pixel_spacing_mm == pytest.approx((0.388672, 0.388672))
    for item in slices.values():
        assert 0.0 <= _soft_tissue_median(item.hu) <= 100.0
    assert realdata.anatomies(("pydicom", "pydicom-data")) == ("head", "thorax", "abdomen")


@pytest.fixture
def without_pydicom_data(monkeypatch):
    """The optional pydicom-data distribution looks uninstalled."""
    real = metadata.distribution

    def distribution(name: str):
        if name == "pydicom-data":
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(realdata.metadata, "distribution", distribution)


def test_a_missing_package_or_file_is_a_one_line_data_error(without_pydicom_data):
    with pytest.raises(DataError, match=r"pip install pydicom-data") as error:
        _task(packages=("pydicom", "pydicom-data"))
    assert "\n" not in str(error.value)
    _task(packages=("pydicom",))  # the bundled slices need nothing else

    missing = realdata.PackagedSlice("gone", "pydicom", "pydicom/data/test_files/no_such.dcm", "head")
    with pytest.raises(DataError, match=r"has no pydicom/data/test_files/no_such\.dcm"):
        realdata.locate(missing)


def test_slice_packages_are_validated():
    with pytest.raises(ValidationError):
        CTParams(phantom="packaged", slice_packages=())
    with pytest.raises(ValidationError):
        CTParams(phantom="packaged", slice_packages=("skimage",))


# ----------------------------------------------------------------------------- patches and held-out material


@pytest.mark.parametrize("name", ["CT_small", "J2K_pixelrep_mismatch"])
def test_patches_never_read_a_pixel_of_the_other_region(name):
    item = next(s for s in realdata.load_slices(("pydicom",)) if s.entry.name == name)
    source = realdata.PatchSource(realdata.hu_to_mu(item.hu))
    (_, split), (start, stop) = source.regions["train"], source.regions["test"]
    assert split == start and stop == item.hu.shape[1]
    rng = np.random.default_rng(0)
    for region, other in (("train", "test"), ("test", "train")):
        clean = source.mu
        poisoned = clean.copy()
        poisoned[:, slice(*source.regions[other])] = np.nan  # any read of the other region gives NaN
        for image_size in (32, 64):
            patches = [source.draw(rng, region, image_size) for _ in range(40)]
            source.mu = poisoned
            images = np.stack([source.render(p, image_size) for p in patches])
            source.mu = clean
            assert np.isfinite(images).all()
            assert (images > 0.5 * MU_WATER).mean() > 0.3  # patches show the body, not air


def test_server_patches_come_from_the_held_out_region_and_sites_from_the_rest(monkeypatch):
    clean = ct_synthetic._packaged_pool(("pydicom",))

    def poisoned(region: str):
        pool = {}
        for anatomy, sources in clean.items():
            copies = []
            for source in sources:
                copy = realdata.PatchSource(source.mu)
                copy.mu = source.mu.copy()
                copy.mu[:, slice(*source.regions[region])] = np.nan
                copies.append(copy)
            pool[anatomy] = tuple(copies)
        return lambda packages: pool

    monkeypatch.setattr(ct_synthetic, "_packaged_pool", poisoned("test"))
    sites = [_task(server=4).client_data(k) for k in range(2)]
    assert all(torch.isfinite(_targets(s.train)).all() and torch.isfinite(_targets(s.val)).all() for s in sites)
    ct_synthetic._synthetic_samples.cache_clear()
    monkeypatch.setattr(ct_synthetic, "_packaged_pool", poisoned("train"))
    assert torch.isfinite(_targets(_task(server=4).server_data())).all()


def test_packaged_sites_are_real_patches_deterministic_given_the_seed():
    task = _task("feature_skew", n=6, server=4)
    site = task.client_data(1)
    first = _targets(site.train)
    ct_synthetic._synthetic_samples.cache_clear()
    again = _targets(_task("feature_skew", n=6, server=4).client_data(1).train)
    other = _targets(_task("feature_skew", n=6, server=4, seed=1).client_data(1).train)

    assert task.label_names == ("head", "thorax") and site.stats["label_names"] == ["head", "thorax"]
    assert sum(site.stats["label_histogram"]) == 6
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert len({tuple(t.flatten()[:50].tolist()) for t in first}) == len(first)  # distinct augmentations
    assert task.client_data(0).stats["acquisition"] != site.stats["acquisition"]  # scanners follow the partition
    assert len(task.server_data()) == 4


def test_fbp_of_a_real_slice_gains_with_more_views():
    item = next(s for s in realdata.load_slices(("pydicom",)) if s.entry.name == "J2K_pixelrep_mismatch")
    mu = slice_to_mu(item.hu, 64)[None]

    def fbp_psnr(views: int) -> float:
        samples = simulate(mu, np.zeros(1, np.int64), Acquisition(views, 180.0, 1e6, 0.0), 0.0, "ram-lak",
                           torch.Generator().manual_seed(0))
        return float(psnr(samples.fbp, samples.target, 1.0).mean())

    assert fbp_psnr(90) > fbp_psnr(12) + 5.0


def test_medfed_run_without_the_package_is_one_line_exit_2_and_no_run_directory(without_pydicom_data, tmp_path, capsys):
    from server.cli import main

    scenario = Path(__file__).resolve().parents[2] / "scenarios" / "ct-real-demo.yaml"
    code = main(["run", str(scenario), "--engine", "inprocess", "--set", f"output.dir={tmp_path / 'runs'}",
                 "--set", "task.params.slice_packages=[pydicom, pydicom-data]"])
    assert code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("medfed: error")]
    assert len(err) == 1 and "pip install pydicom-data" in err[0] and "resume" not in err[0]
    assert not (tmp_path / "runs").exists()
