"""Specification of the tabular task: deterministic sites, shapes, non-IID kinds, metrics, federated runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medtasks.base import DataSpec, PartitionSpec, TaskContext
from medtasks.partition import heterogeneity
from medtasks.tabular import TabularParams, TabularTask, confusion_matrix
from server.scenario import Scenario, validate
from tests.helpers import ONE_SGD_EPOCH, check_evaluate, check_registered, run, single_torch_thread, toy_scenario

TASK = "tabular"
FEATURES, CLASSES = 12, 5


one_thread = pytest.fixture(autouse=True)(single_torch_thread)  # small models: threads only add overhead


def _task(kind: str = "iid", clients: int = 4, *, partition_params: dict | None = None, model: str | None = None,
          seed: int = 0, samples: int = 50, server: int = 0, **params) -> TabularTask:
    return TabularTask(TaskContext(
        params=TabularParams(**{"num_features": FEATURES, "num_classes": CLASSES, **params}),
        model=model,
        data=DataSpec(samples_per_client=samples, server_samples=server),
        partition=PartitionSpec(clients=clients, kind=kind, params=partition_params or {}),
        seed=seed,
    ))


def _site(task: TabularTask, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x [n, F], y [n])`` of a site, train + val."""
    data = task.client_data(partition_id)
    return tuple(torch.cat([a, b]).numpy() for a, b in zip(data.train.tensors, data.val.tensors))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- data


def test_the_registry_and_the_scenario_loader_know_the_task_and_reject_unknown_params():
    check_registered(TASK, TabularTask, {"num_feature": 3})


def test_sites_have_the_documented_shapes_split_and_stats():
    task = _task(samples=50, server=30)
    data = task.client_data(1)
    x, y = data.train[0]
    assert x.shape == (FEATURES,) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert (len(data.train), len(data.val)) == (40, 10) == (data.stats["n_train"], data.stats["n_val"])
    assert sum(data.stats["label_histogram"]) == 50 and len(data.stats["label_histogram"]) == CLASSES
    assert len(task.server_data()) == 30 and _task(server=0).server_data() is None
    for model in TabularTask.models:
        logits = _task(model=model).build_model()(data.train.tensors[0])
        assert logits.shape == (40, CLASSES)


def test_same_seed_gives_the_same_records_and_weights_and_another_seed_does_not():
    first, again, other = _task(seed=3), _task(seed=3), _task(seed=4)
    for a, b in zip(_site(first, 2), _site(again, 2)):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(_site(first, 2)[0], _site(other, 2)[0])
    weights = [dict(t.build_model().state_dict()) for t in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_building_a_model_leaves_torch_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    _task().build_model()
    assert torch.equal(torch.rand(3), expected)


def test_label_skew_makes_site_histograms_differ_far_more_than_iid():
    def spread(kind: str, **params) -> float:
        task = _task(kind, clients=6, samples=200, partition_params=params)
        return heterogeneity([task.client_data(k).stats["label_histogram"] for k in range(6)])

    assert spread("label_skew", alpha=0.1) > 0.4 > 0.15 > spread("iid")


def test_quantity_skew_gives_unequal_site_sizes_with_the_same_total():
    task = _task("quantity_skew", clients=5, samples=40, partition_params={"alpha": 0.3})
    sizes = [len(_site(task, k)[1]) for k in range(5)]
    assert sum(sizes) == 200 and max(sizes) > 2 * min(sizes)


def test_feature_skew_applies_each_sites_drawn_gain_offset_and_noise():
    skewed = _task("feature_skew", clients=4, samples=300, partition_params={"severity": 1.0})
    neutral = _task(clients=4, samples=300)  # same streams: the same records before the acquisition
    gains = set()
    for k in range(4):
        acq = skewed.client_data(k).stats["acquisition"]
        residual = _site(skewed, k)[0] - (acq["gain"] * _site(neutral, k)[0] + acq["offset"])
        assert residual.std() == pytest.approx(acq["noise"], abs=0.03)
        gains.add(round(acq["gain"], 6))
    assert len(gains) == 4


def test_concept_shift_relabels_c_as_c_plus_1_at_the_drawn_rate():
    shifted_task = _task("concept_shift", clients=3, samples=2000, partition_params={"severity": 1.0})
    clean_task = _task(clients=3, samples=2000)  # same streams: the same true labels
    for k in range(3):
        rate = shifted_task.client_data(k).stats["annotator"]["confusion"]
        recorded, clean = _site(shifted_task, k)[1], _site(clean_task, k)[1]
        shifted = recorded != clean
        assert np.all(recorded[shifted] == (clean[shifted] + 1) % CLASSES)
        assert shifted.mean() == pytest.approx(rate, abs=0.04)


# ----------------------------------------------------------------------------- metrics


def test_confusion_matrix_counts_true_rows_against_predicted_columns():
    matrix = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 0, 1, 2]), 3)
    np.testing.assert_array_equal(matrix, [[1, 1, 0], [0, 1, 0], [0, 0, 1]])
    with pytest.raises(ValueError, match=r"\(2,\).*\(3,\)"):
        confusion_matrix(torch.zeros(2), torch.zeros(3), 3)


def test_evaluate_matches_a_hand_computed_loss_and_accuracy(tmp_path: Path):
    task = _task(server=64)
    model, dataset = task.build_model(), task.server_data()
    metrics = check_evaluate(task, model, dataset)
    with torch.no_grad():
        assert float(task.loss(model, dataset.tensors)) == pytest.approx(metrics["loss"], rel=1e-5)
    task.plot_examples(model, dataset, tmp_path / "examples" / "confusion.png")
    assert (tmp_path / "examples" / "confusion.png").stat().st_size > 1000


# ----------------------------------------------------------------------------- federated runs


def _scenario(tmp_path: Path, rounds: int, privacy: dict | None = None) -> Scenario:
    """4 iid sites of 80 records, 200 on the server, one SGD epoch per round, FedAvg; ``privacy`` if given."""
    scenario = toy_scenario(TASK, "fedavg", rounds=rounds, clients=4, samples=80, server_samples=200,
                            local=ONE_SGD_EPOCH, model="mlp", output={"dir": str(tmp_path / "runs")},
                            task_params={"num_features": FEATURES, "num_classes": CLASSES})
    if privacy is None:
        return scenario
    return validate({**json.loads(scenario.to_json()), "privacy": privacy})


def _central(run_dir) -> list[float]:
    return [r["aggregate"]["accuracy"] for r in run_dir.read_metrics() if r["phase"] == "central"]


def test_a_short_federated_run_raises_central_accuracy_well_above_chance(tmp_path: Path):
    accuracy = _central(run(_scenario(tmp_path, 6)))
    assert accuracy[-1] > max(accuracy[0], 1.0 / CLASSES) + 0.15, accuracy


def test_a_dpsgd_run_reports_each_clients_growing_epsilon(tmp_path: Path):
    scenario = _scenario(tmp_path, 2, privacy={"mechanism": "dpsgd", "params": {"noise_multiplier": 1.0}})
    records = [r for r in run(scenario).read_metrics() if r["phase"] == "train"]
    assert [r["round"] for r in records] == [1, 2]
    for pid in ("0", "1", "2", "3"):
        spent = [r["clients"][pid]["epsilon"] for r in records]
        assert 0.0 < spent[0] < spent[1], spent
