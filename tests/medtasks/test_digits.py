"""Specification of the digits task: the pool, the server/site split, site shifts, models, training, DP-SGD."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from medtasks.base import DataError, DataSpec, PartitionSpec, TaskContext
from medtasks.digits import DigitsParams, DigitsTask
from medtasks.partition import heterogeneity
from tests.helpers import ONE_SGD_EPOCH, check_evaluate, check_registered, run, single_torch_thread, toy_scenario
from tests.privacy.common import phase_records, with_privacy

TASK = "digits"
POOL_SIZE = 1797  # scikit-learn's load_digits

one_thread = pytest.fixture(autouse=True)(single_torch_thread)  # small models: threads only add overhead


def _task(kind: str = "iid", clients: int = 4, *, partition_params: dict | None = None, model: str | None = None,
          seed: int = 0, samples: int = 100, server: int = 0, source: str = "synthetic", **params) -> DigitsTask:
    return DigitsTask(TaskContext(
        params=DigitsParams(**params),
        model=model,
        data=DataSpec(source=source, path="digits-folder" if source == "folder" else None,
                      samples_per_client=samples, server_samples=server),
        partition=PartitionSpec(clients=clients, kind=kind, params=partition_params or {}),
        seed=seed,
    ))


def _site(task: DigitsTask, partition_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [n, 1, S, S], y [n])`` of a site, train then val."""
    data = task.client_data(partition_id)
    x, y = (torch.cat([a, b]) for a, b in zip(data.train.tensors, data.val.tensors))
    return x, y


# ----------------------------------------------------------------------------- pool and split


def test_the_registry_knows_the_task_and_the_scenario_loader_rejects_unknown_params():
    check_registered(TASK, DigitsTask, {"image_size": 12})


def test_the_pool_is_all_digits_scaled_to_the_unit_interval():
    task = _task()
    x, y = task.pool()
    assert x.shape == (POOL_SIZE, 1, 8, 8) == (POOL_SIZE, *task.image_shape) and x.dtype == torch.float32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and sorted(y.unique().tolist()) == list(range(10)) == list(range(task.num_classes))
    assert torch.equal(torch.unique(x * 16), torch.arange(17, dtype=torch.float32))  # v / 16 for v = 0..16


def test_image_size_32_is_a_bilinear_resize_of_each_digit():
    small, large = _task().pool()[0], _task(image_size=32).pool()[0]
    assert large.shape == (POOL_SIZE, 1, 32, 32) == (POOL_SIZE, *_task(image_size=32).image_shape)
    assert 0.0 <= float(large.min()) and float(large.max()) <= 1.0
    # bilinear with align_corners=False: output pixel i samples the source at (i + 1/2)·8/32 - 1/2, edges clamped
    source = (np.arange(32) + 0.5) * 8 / 32 - 0.5
    for image in (0, 1000):
        rows = np.stack([np.interp(source, np.arange(8), row) for row in small[image, 0].numpy()])
        expected = np.stack([np.interp(source, np.arange(8), column) for column in rows.T], axis=1)
        np.testing.assert_allclose(large[image, 0].numpy(), expected, atol=1e-6)


def test_server_and_site_shares_are_disjoint_and_cover_the_pool():
    task = _task(clients=5, samples=1000, server=300)
    shares = [task.server_indices, *task.site_shares]
    np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(POOL_SIZE))
    server_counts = np.bincount(task.pool()[1][task.server_indices].numpy(), minlength=10)
    assert server_counts.sum() == 300 and server_counts.min() >= 29 and server_counts.max() <= 31  # stratified
    x, y = task.pool()
    for k in range(5):  # each site holds exactly its (unshifted) pool images
        indices = task.site_indices(k)
        assert sorted(indices.tolist()) == task.site_shares[k].tolist()
        site_x, site_y = _site(task, k)
        assert torch.equal(site_x, x[indices]) and torch.equal(site_y, y[indices])
    server = task.server_data()
    assert torch.equal(server.tensors[1], y[task.server_indices]) and _task().server_data() is None


def test_sites_are_capped_at_samples_per_client_and_hold_out_the_validation_share():
    data = _task(samples=50).client_data(2)
    assert (len(data.train), len(data.val)) == (40, 10) == (data.stats["n_train"], data.stats["n_val"])
    assert sum(data.stats["label_histogram"]) == 50 and sum(data.stats["label_distribution"]) == pytest.approx(1.0)
    assert data.stats["acquisition"] == {"gain": 1.0, "noise": 0.0, "offset": 0.0}


def test_same_seed_gives_the_same_data_and_weights_and_another_seed_does_not():
    first, again, other = _task(seed=3, server=100), _task(seed=3, server=100), _task(seed=4, server=100)
    for a, b in zip(_site(first, 1), _site(again, 1)):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(first.server_indices, again.server_indices)
    assert not np.array_equal(first.site_indices(1), other.site_indices(1))
    assert not np.array_equal(first.server_indices, other.server_indices)
    weights = [dict(t.build_model().state_dict()) for t in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_label_skew_makes_site_histograms_differ_far_more_than_iid():
    def spread(kind: str, **params) -> float:
        task = _task(kind, clients=6, samples=300, partition_params=params)
        return heterogeneity([task.client_data(k).stats["label_histogram"] for k in range(6)])

    assert spread("label_skew", alpha=0.1) > 0.4 > 0.1 > spread("iid")


def test_feature_skew_applies_each_sites_gain_and_offset_within_the_unit_interval():
    skewed = _task("feature_skew", clients=3, partition_params={"severity": 1.0})
    x, _ = skewed.pool()
    gains = set()
    for k in range(3):
        acquisition = skewed.client_data(k).stats["acquisition"]
        shifted = _site(skewed, k)[0]
        assert 0.0 <= float(shifted.min()) and float(shifted.max()) <= 1.0
        expected = (acquisition["gain"] * x[skewed.site_indices(k)] + acquisition["offset"]).clamp(0, 1)
        residual = (shifted - expected)[(expected > 0.3) & (expected < 0.7)]  # away from the clipping
        assert float(residual.std()) == pytest.approx(acquisition["noise"], abs=0.03)
        gains.add(round(acquisition["gain"], 6))
    assert len(gains) == 3


def test_concept_shift_records_c_as_c_plus_1_at_the_drawn_rate():
    task = _task("concept_shift", clients=2, samples=800, partition_params={"severity": 1.0})
    true_labels = task.pool()[1]
    for k in range(2):
        rate = task.client_data(k).stats["annotator"]["confusion"]
        recorded, clean = _site(task, k)[1], true_labels[task.site_indices(k)]
        changed = recorded != clean
        assert torch.equal(recorded[changed], (clean[changed] + 1) % 10)
        assert float(changed.float().mean()) == pytest.approx(rate, abs=0.06)


def test_bad_data_sections_are_refused_in_one_line():
    with pytest.raises(DataError, match="data.source") as folder:
        _task(source="folder")
    with pytest.raises(DataError, match="data.server_samples") as too_many:
        _task(clients=10, server=1790)
    for error in (folder, too_many):
        assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("size", [8, 16, 32])
def test_every_model_maps_images_to_ten_logits_without_batchnorm(size: int):
    for model_name in DigitsTask.models:
        model = _task(model=model_name, image_size=size).build_model()
        assert model(torch.zeros(3, 1, size, size)).shape == (3, 10)
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_lenet_is_the_sigmoid_dlg_network_with_uniform_half_unit_weights():
    model = _task(image_size=32, channels=12).build_model()  # the default model
    convolutions = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in convolutions] == [((5, 5), s, (2, 2)) for s in
                                                                           [(2, 2), (2, 2), (1, 1)]]
    assert sum(isinstance(m, torch.nn.Sigmoid) for m in model.modules()) == 3
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d)) for m in model.modules())
    assert model[-1].in_features == 12 * 8 * 8
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float(weights.abs().max()) <= 0.5 and float(weights.std()) == pytest.approx(1 / 12**0.5, rel=0.05)


def test_a_short_centralised_training_of_the_cnn_beats_85_percent_on_held_out_digits(tmp_path: Path):
    task = _task(model="cnn", clients=1, samples=600, server=400)
    data = task.client_data(0)
    train = TensorDataset(*(torch.cat([a, b]) for a, b in zip(data.train.tensors, data.val.tensors)))
    model = task.build_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(12):
        for batch in DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)):
            optimizer.zero_grad()
            task.loss(model, batch).backward()
            optimizer.step()
    metrics = task.evaluate(model, task.server_data())
    assert metrics["accuracy"] > 0.85 and metrics["balanced_accuracy"] > 0.85, metrics
    task.plot_examples(model, task.server_data(), tmp_path / "examples.png")
    assert (tmp_path / "examples.png").stat().st_size > 5000


def test_evaluate_matches_a_hand_computed_loss_and_accuracy():
    task = _task(server=64)
    check_evaluate(task, task.build_model(), task.server_data())


# ----------------------------------------------------------------------------- federated runs


@pytest.mark.parametrize("model", ["lenet", "mlp"])
def test_a_dpsgd_round_trains_the_model_and_reports_each_sites_epsilon(tmp_path: Path, model: str):
    scenario = toy_scenario(TASK, "fedavg", rounds=1, clients=2, samples=40, server_samples=50, local=ONE_SGD_EPOCH,
                            model=model, output={"dir": str(tmp_path / "runs")})
    run_dir = run(with_privacy(scenario, "dpsgd", noise_multiplier=1.0, max_grad_norm=1.0))
    train = phase_records(run_dir, "train")
    assert [r["round"] for r in train] == [1]
    assert all(train[0]["clients"][pid]["epsilon"] > 0 for pid in ("0", "1"))
    assert 0.0 <= phase_records(run_dir, "central")[-1]["aggregate"]["accuracy"] <= 1.0
