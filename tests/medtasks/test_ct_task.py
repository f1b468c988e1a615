"""Specification of the CT reconstruction task: metrics, networks, simulated sites, non-IID kinds, folder data."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from scipy import ndimage
from torch.utils.data import DataLoader

from medtasks.base import DataError, DataSpec, PartitionSpec, TaskContext
from medtasks.ct import MU_WATER, Geometry, get_operator, torso_phantom
from medtasks.ct import folder as ct_folder
from medtasks.ct import synthetic as ct_synthetic
from medtasks.ct import task as ct_task
from medtasks.ct.anatomy import anatomy_label
from medtasks.ct.metrics import psnr, rmse_hu, ssim
from medtasks.ct.models import FBPConvNet, UnrolledProximalGradient
from medtasks.ct.params import CTParams
from medtasks.ct.scanner import IMAGE_SCALE, Acquisition, simulate
from medtasks.ct.synthetic import draw_phantom
from medtasks.ct.task import CTReconstructionTask
from medtasks.registry import get_task_class
from tests.helpers import single_torch_thread, write_dicom

_one_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)  # a 2nd MKL thread stalls sparse matmuls


def _task(kind: str = "iid", *, clients: int = 3, n: int = 8, server: int = 0, seed: int = 0, model=None, **params):
    params = {"image_size": 32, **params}
    kind_params = {"label_skew": {"alpha": 0.1}, "feature_skew": {"severity": 1.0}, "concept_shift": {"severity": 1.0}}
    ctx = TaskContext(
        params=CTParams(**params),
        model=model,
        data=DataSpec(samples_per_client=n, server_samples=server),
        partition=PartitionSpec(clients=clients, kind=kind, params=kind_params.get(kind, {})),
        seed=seed,
    )
    return CTReconstructionTask(ctx)


def _tensors(dataset) -> list[torch.Tensor]:
    return [torch.stack([dataset[i][j] for i in range(len(dataset))]) for j in range(4)]


# ----------------------------------------------------------------------------- metrics


def test_psnr_is_ten_log10_of_range_squared_over_mse():
    ref = torch.zeros(1, 1, 4, 4)
    x = ref.clone()
    x[0, 0, 1, 2] = 0.5  # MSE = 0.25 / 16

    assert float(psnr(x, ref, data_range=1.0)) == pytest.approx(10 * math.log10(64.0), abs=1e-5)
    assert float(psnr(2 * x, 2 * ref, data_range=2.0)) == pytest.approx(10 * math.log10(64.0), abs=1e-5)


def test_ssim_matches_scikit_image_gaussian_ssim_and_is_one_for_identical_images():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    ref = ndimage.gaussian_filter(rng.random((3, 40, 36)), (0, 2, 2))  # image-like: correlated pixels
    x = ref + 0.05 * rng.standard_normal(ref.shape)

    ours = ssim(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(ref).unsqueeze(1), data_range=1.0)
    expected = [
        structural_similarity(
            x[b], ref[b], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0
        )
        for b in range(3)
    ]
    np.testing.assert_allclose(ours.numpy(), expected, atol=1e-6)
    same = torch.from_numpy(ref).unsqueeze(1)
    assert torch.allclose(ssim(same, same, 1.0), torch.ones(3, dtype=torch.float64))


def test_rmse_hu_converts_with_the_given_water_value():
    ref = torch.full((2, 1, 8, 8), 0.5)
    assert torch.allclose(rmse_hu(ref + 0.01, ref, mu_water=0.5), torch.full((2,), 20.0))  # 2000 HU per unit
    mu = torch.full((1, 8, 8), MU_WATER)
    assert float(rmse_hu(mu + 0.002, mu)) == pytest.approx(10.0, rel=1e-4)  # 0.002 / 0.2 · 1000


# ----------------------------------------------------------------------------- networks


def _measurement(views: int = 20, n: int = 32):
    operator = get_operator(Geometry.sparse_view(n, views))
    mu = torch.from_numpy(torso_phantom(n, np.random.default_rng(1)))[None, None] / IMAGE_SCALE
    y = operator.forward(mu)
    return operator, operator.fbp(y), y, mu


def test_fresh_fbpconvnet_returns_the_fbp_and_is_seeded():
    operator, fbp, y, _ = _measurement()
    model = FBPConvNet((8, 16), norm="instance", seed=3).eval()

    assert torch.equal(model(fbp, y, operator), fbp)
    state, again = model.state_dict(), FBPConvNet((8, 16), norm="instance", seed=3).state_dict()
    assert all(torch.equal(state[k], again[k]) for k in state)


def test_unrolled_network_keeps_the_operator_out_of_its_state_dict():
    operator, fbp, y, _ = _measurement()
    model = UnrolledProximalGradient(iterations=3, width=4)
    model(fbp, y, operator)  # the operator norm is now cached on the operator, not on the model

    state = model.state_dict()
    assert sum(t.numel() for t in state.values()) == sum(p.numel() for p in model.parameters())
    assert all(k.startswith(("prox.", "step_raw")) for k in state)
    assert len(UnrolledProximalGradient(iterations=3, width=4, shared_weights=True).prox) == 1


def test_unrolled_gradient_reaches_step_sizes_and_proximal_weights():
    operator, fbp, y, mu = _measurement()
    model = UnrolledProximalGradient(iterations=2, width=4)

    torch.nn.functional.mse_loss(model(fbp, y, operator), mu).backward()

    assert torch.all(model.step_raw.grad.abs() > 0)
    for prox in model.prox:  # the last layer starts at zero, so it is the one that receives gradient first
        assert prox.layers[-1].weight.grad.abs().sum() > 0
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in prox.parameters())


def test_one_unrolled_iteration_with_identity_prox_reduces_the_data_residual():
    operator, fbp, y, _ = _measurement()
    model = UnrolledProximalGradient(iterations=1, width=4)  # prox starts at identity, η = 1/‖A‖²

    assert model.step_sizes(operator)[0].item() == pytest.approx(1 / operator.operator_norm() ** 2, rel=1e-6)
    with torch.no_grad():
        x = model(fbp, y, operator)
    before = (operator.forward(fbp) - y).norm()
    after = (operator.forward(x) - y).norm()
    assert after < before  # a gradient step with η < 2/‖A‖² on ½‖Ax − y‖² never increases it


# ----------------------------------------------------------------------------- simulation and non-IID kinds


def test_draw_phantom_gives_the_requested_anatomy():
    rng = np.random.default_rng(0)
    for anatomy, label in (("thorax", 0), ("abdomen", 1), ("thorax", 0), ("abdomen", 1)):
        assert anatomy_label(draw_phantom(rng, anatomy, 48)) == label


def test_more_views_and_dose_give_a_better_fbp():
    rng = np.random.default_rng(0)
    mu = np.stack([torso_phantom(32, rng) for _ in range(4)])
    labels = np.zeros(4, dtype=np.int64)

    def fbp_psnr(views: int, i0: float) -> float:
        scanner = Acquisition(views, 180.0, i0, 0.0)
        samples = simulate(mu, labels, scanner, 0.0, "ram-lak", torch.Generator().manual_seed(0))
        return float(psnr(samples.fbp, samples.target, 1.0).mean())

    assert fbp_psnr(15, 10**3.5) + 1 < fbp_psnr(15, 10**5.5)
    assert fbp_psnr(15, 10**5.5) + 1 < fbp_psnr(45, 10**5.5)


def test_feature_skew_sites_have_their_own_scanners_and_fbp_quality():
    task = _task("feature_skew", clients=4)
    sites = [task.client_data(k) for k in range(4)]
    acquisitions = [s.stats["acquisition"] for s in sites]

    assert len({a["num_views"] for a in acquisitions}) > 1
    assert len({a["dose_i0"] for a in acquisitions}) == 4
    psnrs = [s.stats["fbp_psnr"] for s in sites]
    assert max(psnrs) - min(psnrs) > 1.0
    for site, acquisition in zip(sites, acquisitions):
        fbp, sinogram, target, geometry = _tensors(site.train)
        assert sinogram.shape[-2] == acquisition["num_views"]
        expected = [acquisition["num_views"], acquisition["angular_range_deg"]]
        assert torch.all(geometry == torch.tensor(expected, dtype=torch.float64))
    iid = [_task("iid", clients=4).client_data(k).stats["acquisition"]["num_views"] for k in range(4)]
    assert iid == [30] * 4


def test_label_skew_changes_the_anatomy_mix():
    skewed = [_task("label_skew", clients=3, n=12).client_data(k).stats for k in range(3)]
    iid = [_task("iid", clients=3, n=12).client_data(k).stats for k in range(3)]

    assert all(s["label_names"] == ["thorax", "abdomen"] for s in skewed)
    assert all(sum(s["label_histogram"]) == 12 for s in skewed)
    assert len({tuple(s["label_histogram"]) for s in skewed}) > 1
    shares = [s["label_histogram"][0] / 12 for s in skewed]
    assert max(shares) - min(shares) > 0.5
    assert all(s["label_distribution"] == [0.5, 0.5] for s in iid)


def test_concept_shift_changes_targets_but_not_measurements():
    shifted, iid = _task("concept_shift"), _task("iid")
    for k in range(3):
        a, b = _tensors(shifted.client_data(k).train), _tensors(iid.client_data(k).train)
        sigma = shifted.client_data(k).stats["annotator"]["reference_sigma_px"]
        assert sigma > 0
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same FBP and sinogram
        assert not torch.allclose(a[2], b[2], atol=1e-3)  # a smoother reference
        assert a[2].sum().item() == pytest.approx(b[2].sum().item(), rel=1e-3)  # smoothing keeps the mass


def test_server_data_is_neutral_whatever_the_partition():
    task = _task("feature_skew", server=6, num_views=24, dose_i0=1e4)
    fbp, sinogram, target, geometry = _tensors(task.server_data())

    assert len(fbp) == 6 and sinogram.shape[-2] == 24
    assert torch.all(geometry == torch.tensor([24.0, 180.0], dtype=torch.float64))
    other = _tensors(_task("concept_shift", server=6, num_views=24, dose_i0=1e4).server_data())
    assert all(torch.equal(x, y) for x, y in zip((fbp, sinogram, target), other[:3]))
    assert _task("iid").server_data() is None


def test_sites_and_models_are_deterministic_given_the_seed():
    first = [_tensors(_task("feature_skew", seed=5).client_data(1).val)]
    ct_synthetic._synthetic_samples.cache_clear()
    again = [_tensors(_task("feature_skew", seed=5).client_data(1).val)]
    other = [_tensors(_task("feature_skew", seed=6).client_data(1).val)]

    assert all(torch.equal(x, y) for x, y in zip(first[0], again[0]))
    assert not torch.equal(first[0][2], other[0][2])
    for model in ("fbpconvnet", "unrolled"):
        a, b = (_task(model=model, seed=5).build_model().state_dict() for _ in range(2))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_stats_are_json_serialisable_and_complete():
    site = _task("feature_skew", n=10).client_data(0)
    stats = json.loads(json.dumps(site.stats))

    assert stats["n_train"] == len(site.train) == 8 and stats["n_val"] == len(site.val) == 2
    assert {"label_histogram", "label_distribution", "acquisition", "annotator", "fbp_psnr"} <= set(stats)
    assert {"num_views", "dose_i0", "angular_range_deg", "detector_blur_bins"} <= set(stats["acquisition"])
    assert isinstance(stats["acquisition"]["num_views"], int)


def test_batches_mixing_geometries_are_rejected():
    task = _task("feature_skew", clients=2)
    a, b = task.client_data(0).train[0], task.client_data(1).train[0]
    geometry = torch.stack([a[3], b[3]])
    with pytest.raises(ValueError, match="one scanner geometry"):
        ct_task._batch_operator(geometry, 32)


def test_params_and_model_names_are_validated():
    with pytest.raises(ValidationError):
        CTParams(unknown=1)
    with pytest.raises(ValidationError):
        CTParams(image_size=30)  # not a multiple of 4 for three U-Net levels
    with pytest.raises(ValueError, match="unknown ct model"):
        _task(model="resnet")


# ----------------------------------------------------------------------------- training, plots, scenario


def test_fbpconvnet_learns_to_beat_fbp_on_one_site():
    torch.manual_seed(0)
    task = _task(clients=1, n=25, image_size=64)
    site = task.client_data(0)
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    loader = DataLoader(site.train, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    start, steps = time.perf_counter(), 0
    while steps < 80:
        for batch in loader:
            loss = task.loss(model, batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if steps == 80:
                break
    seconds = time.perf_counter() - start
    metrics = task.evaluate(model, site.val)

    print(f"\nFBPConvNet, 80 steps × 4 on {len(site.train)} slices (N=64) in {seconds:.1f} s: {metrics}")
    assert set(metrics) == {"loss", "psnr", "ssim", "rmse_hu", "psnr_fbp", "ssim_fbp"}
    assert metrics["psnr"] > metrics["psnr_fbp"] + 1.0
    assert metrics["rmse_hu"] < 2000 * 10 ** (-metrics["psnr_fbp"] / 20)  # HU = 2000 × normalised units


def test_evaluate_of_a_fresh_unrolled_network_reports_the_fbp_baseline():
    task = _task(model="unrolled", unrolled_iterations=2, prox_channels=4)
    metrics = task.evaluate(task.build_model(), task.client_data(0).val)

    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["psnr"] > metrics["psnr_fbp"]  # two Landweber steps already help


def test_plot_examples_writes_a_png(tmp_path):
    task = _task()
    path = tmp_path / "plots" / "examples.png"
    task.plot_examples(task.build_model(), task.client_data(0).val, path)

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_scenario_loader_resolves_the_ct_defaults():
    from server import scenario

    resolved = scenario.validate(
        {
            "name": "ct-check",
            "task": {"name": "ct", "model": "unrolled", "params": {"num_views": 20}},
            "partition": {"clients": 2, "kind": "feature_skew"},
            "strategy": {"rounds": 1},
        }
    )

    assert get_task_class("ct") is CTReconstructionTask
    assert resolved.task.params["num_views"] == 20
    assert resolved.task.params["image_size"] == 64 and resolved.task.params["unrolled_iterations"] == 5
    assert isinstance(resolved.task_context().params, CTParams)
    with pytest.raises(scenario.ScenarioError, match="task.params"):
        scenario.validate(
            {
                "name": "bad",
                "task": {"name": "ct", "params": {"views": 3}},
                "partition": {"clients": 1},
                "strategy": {"rounds": 1},
            }
        )


# ----------------------------------------------------------------------------- folder data


def _hu(mu: np.ndarray) -> np.ndarray:
    return 1000.0 * (mu - MU_WATER) / MU_WATER


def test_folder_of_npy_and_dicom_slices_becomes_measured_sites(tmp_path):
    rng = np.random.default_rng(0)
    thorax = [_hu(draw_phantom(rng, "thorax", 48)) for _ in range(3)]
    abdomen = [_hu(draw_phantom(rng, "abdomen", 48)) for _ in range(3)]
    np.save(tmp_path / "a.npy", np.stack(thorax, axis=-1))  # a volume: three slices on the last axis
    for i, hu in enumerate(abdomen[:2]):
        np.save(tmp_path / f"b{i}.npy", hu[:, 4:-4])  # not square: padded with air
    write_dicom(tmp_path / "c.dcm", np.round(abdomen[2]) + 1024, intercept=-1024.0, patient_id="")  # HU + 1024 stored
    (tmp_path / "notes.txt").write_text("ignored")

    slices = ct_folder._load_ct_slices(tmp_path)
    assert len(slices) == 6
    np.testing.assert_allclose(slices[-1], np.round(abdomen[2]))  # DICOM rescaled to HU

    ctx = TaskContext(
        params=CTParams(image_size=32, num_views=16),
        model=None,
        data=DataSpec(source="folder", path=str(tmp_path)),
        partition=PartitionSpec(clients=2, kind="feature_skew"),
        seed=0,
    )
    task = CTReconstructionTask(ctx)
    sites = [task.client_data(k) for k in range(2)]
    assert sum(s.stats["n_train"] + s.stats["n_val"] for s in sites) == 6
    assert [sum(h) for h in zip(*(s.stats["label_histogram"] for s in sites))] == [3, 3]  # 3 thorax, 3 other
    fbp, sinogram, target, _ = _tensors(sites[0].train)
    assert fbp.shape[-2:] == target.shape[-2:] == (32, 32)
    assert sinogram.shape[-2] == sites[0].stats["acquisition"]["num_views"]
    assert task.server_data() is None
    assert task.evaluate(task.build_model(), sites[1].val)["psnr_fbp"] > 15


def test_folder_errors_are_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ct_folder._load_ct_slices(tmp_path / "missing")
    with pytest.raises(DataError, match="no CT slices"):
        ct_folder._load_ct_slices(tmp_path)
    (tmp_path / "x.npy").write_bytes(b"not an array")
    with pytest.raises(DataError, match="cannot read"):
        ct_folder._load_ct_slices(tmp_path)
