"""Specification of the MIL task: scenario wiring, non-IID sites, evaluation, plots, federated run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pydantic
import pytest
import torch

from medtasks.base import DataSpec, PartitionSpec, TaskContext
from medtasks.mil import MILParams, MILTask
from medtasks.mil.task import _generate
from server import scenario as scenario_module
from tests.helpers import single_torch_thread

EVAL_KEYS = {"loss", "auc", "accuracy", "balanced_accuracy", "balanced_accuracy_cv", "attention_auc"}


one_thread = pytest.fixture(autouse=True)(single_torch_thread)  # small models: threads only add overhead


def _task(kind: str = "iid", clients: int = 4, *, partition_params: dict | None = None, model: str | None = None,
          seed: int = 0, samples: int = 24, server: int = 0, **params) -> MILTask:
    params = {"tiles_per_slide": 8, "tile_size": 16, "feature_dim": 16, "attention_dim": 8, **params}
    return MILTask(TaskContext(
        params=MILParams(**params),
        model=model,
        data=DataSpec(samples_per_client=samples, server_samples=server),
        partition=PartitionSpec(clients=clients, kind=kind, params=partition_params or {}),
        seed=seed,
    ))


def _site_arrays(task: MILTask, partition_id: int) -> tuple[np.ndarray, ...]:
    """``(bags [n, K, 3, T, T], labels [n], tile_labels [n, K])`` of a site, train + val."""
    data = task.client_data(partition_id)
    return tuple(torch.cat([a, b]).numpy() for a, b in zip(data.train.tensors[:3], data.val.tensors[:3]))


# ----------------------------------------------------------------------------- scenario


def test_the_scenario_loader_resolves_the_task_defaults_and_names_a_bad_param():
    raw = {"name": "t", "task": {"name": "mil"}, "partition": {"clients": 2}, "strategy": {"rounds": 1}}
    scenario = scenario_module.validate(raw)
    assert scenario.task.params == MILParams().model_dump()
    assert scenario.task.params["tiles_per_slide"] == 16 and scenario.task.params["norm"] == "group"
    assert MILTask(scenario.task_context()).pooling == "gated_attention"

    raw["task"]["params"] = {"tiles_per_slide": 0}
    with pytest.raises(scenario_module.ScenarioError, match=r"task\.params\.tiles_per_slide"):
        scenario_module.validate(raw)
    raw["task"]["params"] = {"pooling": "max"}
    with pytest.raises(scenario_module.ScenarioError, match=r"task\.params\.pooling"):
        scenario_module.validate(raw)
    raw["task"] = {"name": "mil", "model": "transformer"}
    with pytest.raises(scenario_module.ScenarioError, match=r"task\.model"):
        scenario_module.validate(raw)


def test_unknown_sources_and_data_params_are_refused():
    context = _task().ctx
    with pytest.raises(ValueError, match="unknown data.source"):
        MILTask(TaskContext(**{**context.__dict__, "data": DataSpec(source="dicom")}))
    with pytest.raises(ValueError, match="data.params"):
        MILTask(TaskContext(**{**context.__dict__, "data": DataSpec(params={"x": 1})}))
    with pytest.raises(pydantic.ValidationError, match="class_balance"):
        MILParams(class_balance="focal")
    with pytest.raises(pydantic.ValidationError, match="tile_source"):
        MILParams(tile_source="retina")


# ----------------------------------------------------------------------------- non-IID sites


def test_label_skew_gives_sites_different_positive_fractions():
    task = _task("label_skew", partition_params={"alpha": 0.3})
    drawn = [p.label_distribution[1] for p in task.profiles]
    observed = [_site_arrays(task, k)[1].mean() for k in range(4)]
    assert max(drawn) - min(drawn) > 0.4, drawn
    assert max(observed) - min(observed) > 0.4, observed
    assert np.corrcoef(drawn, observed)[0, 1] > 0.8, (drawn, observed)


def test_concept_shift_thresholds_differ_and_relabel_some_positive_slides():
    task = _task("concept_shift", partition_params={"severity": 1.0}, samples=32)
    thresholds = [p.annotator["positive_threshold"] for p in task.profiles]
    assert len(set(thresholds)) == 4 and max(thresholds) > 0.1, thresholds
    relabelled = 0
    for k, threshold in enumerate(thresholds):
        _, labels, tile_labels = _site_arrays(task, k)
        truth = tile_labels.max(axis=1)
        assert np.all(labels <= truth)  # an annotator only drops positives
        np.testing.assert_array_equal(labels, truth * (tile_labels.mean(axis=1) >= threshold))
        relabelled += int((truth - labels).sum())
    assert relabelled > 0


def _site_colour_spread(task: MILTask) -> float:
    """Largest per-channel spread (max - min) of the sites' mean RGB."""
    means = np.stack([_site_arrays(task, k)[0].mean(axis=(0, 1, 3, 4)) for k in range(4)])  # [4, 3]
    return float((means.max(axis=0) - means.min(axis=0)).max())


def test_feature_skew_changes_the_colour_statistics_of_sites():
    shifted = _task("feature_skew", partition_params={"severity": 1.0})
    assert len({json.dumps(p.acquisition, sort_keys=True) for p in shifted.profiles}) == 4
    assert _site_colour_spread(shifted) > 3 * _site_colour_spread(_task("iid"))


def test_quantity_skew_site_sizes_follow_the_profiles():
    task = _task("quantity_skew", partition_params={"alpha": 0.5, "min_samples": 4})
    sizes = [p.n_samples for p in task.profiles]
    assert len(set(sizes)) > 1 and sum(sizes) == 4 * 24
    for k, size in enumerate(sizes):
        data = task.client_data(k)
        assert len(data.train) + len(data.val) == size
        assert data.stats["n_val"] == max(1, round(0.2 * size))


def test_sites_are_deterministic_and_stats_serialisable():
    first = _task("label_skew").client_data(1)
    _generate.cache_clear()
    again = _task("label_skew").client_data(1)
    for a, b in zip(first.train.tensors + first.val.tensors, again.train.tensors + again.val.tensors):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert json.loads(json.dumps(first.stats)) == again.stats
    assert set(first.stats) == {
        "n_train", "n_val", "label_histogram", "label_distribution", "train_log_odds", "acquisition", "annotator"
    }
    assert sum(first.stats["label_histogram"]) == first.stats["n_train"] + first.stats["n_val"]
    assert first.stats["label_histogram"][1] == int(torch.cat([first.train.tensors[1], first.val.tensors[1]]).sum())
    bag, label, tiles, padding, log_odds = first.train[0]
    assert bag.shape == (8, 3, 16, 16) and bag.dtype == torch.float32
    assert label.shape == () and label.dtype == torch.float32 and tiles.dtype == torch.int64
    assert padding.dtype == torch.bool and not padding.any()
    n_pos = int(first.train.tensors[1].sum())
    assert float(log_odds) == pytest.approx(math.log((n_pos + 1) / (first.stats["n_train"] - n_pos + 1)), abs=1e-6)
    assert float(log_odds) == pytest.approx(first.stats["train_log_odds"], abs=1e-6)
    other = _task("label_skew", seed=1).client_data(1)
    assert not torch.equal(other.train.tensors[0][:1], first.train.tensors[0][:1])


# ----------------------------------------------------------------------------- server, model, metrics


def test_server_data_is_a_neutral_site_with_the_base_prevalence():
    assert _task().server_data() is None
    dataset = _task("concept_shift", partition_params={"severity": 1.0}, server=40, positive_rate=0.5).server_data()
    bags, labels, tile_labels = dataset.tensors[:3]
    assert len(dataset) == 40
    torch.testing.assert_close(labels, tile_labels.amax(dim=1).float())  # threshold 0: truth is the label
    assert 0.25 < float(labels.mean()) < 0.75
    neutral = _site_arrays(_task("iid"), 0)[0].mean(axis=(0, 1, 3, 4))
    np.testing.assert_allclose(bags.mean(dim=(0, 1, 3, 4)).numpy(), neutral, atol=0.03)


@pytest.mark.parametrize(("model", "mode"), [("gated_attention", "embedding"), ("attention", "instance"),
                                             ("max", "instance"), ("mean", "embedding")])
def test_evaluate_returns_bounded_metrics_for_an_untrained_model(model, mode):
    task = _task(model=model, mode=mode, server=24)
    net = task.build_model()
    metrics = task.evaluate(net, task.server_data())
    assert set(metrics) == EVAL_KEYS
    assert all(0.0 <= metrics[k] <= 1.0 for k in EVAL_KEYS - {"loss"}), metrics
    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
    batch = next(iter(torch.utils.data.DataLoader(task.client_data(0).train, batch_size=4)))
    loss = task.loss(net, batch)
    loss.backward()
    assert loss.shape == () and all(p.grad is not None for p in net.classifier.parameters())


def test_class_balance_uses_the_sites_own_training_prior():
    """Under label skew each site's train samples carry its log-odds; the task loss applies them."""
    kwargs = dict(partition_params={"alpha": 0.3})
    plain, adjusted = _task("label_skew", **kwargs), _task("label_skew", class_balance="logit_adjust", **kwargs)
    odds = [plain.client_data(k).stats["train_log_odds"] for k in range(4)]
    assert max(odds) - min(odds) > 1.0, odds
    k = int(np.argmax(np.abs(odds)))
    batch = next(iter(torch.utils.data.DataLoader(adjusted.client_data(k).train, batch_size=8)))
    net = plain.build_model()
    with torch.no_grad():
        logits = net(batch[0])
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits + odds[k], batch[1])
        torch.testing.assert_close(adjusted.loss(net, batch), expected)
        assert not torch.isclose(plain.loss(net, batch), expected)


def test_evaluate_and_loss_respect_padding():
    """A bag padded with junk tiles scores like the bag without them."""
    task = _task(server=4, model="attention")
    net = task.build_model()
    bags, labels, tile_labels, padding, odds = task.server_data().tensors
    junk = torch.cat([bags, torch.rand_like(bags[:, :3])], dim=1)
    padded = torch.utils.data.TensorDataset(
        junk, labels, torch.cat([tile_labels, torch.zeros_like(tile_labels[:, :3])], 1),
        torch.cat([padding, torch.ones_like(padding[:, :3])], 1), odds,
    )
    for key, value in task.evaluate(net, task.server_data()).items():
        assert task.evaluate(net, padded)[key] == pytest.approx(value, nan_ok=True, abs=1e-5), key
    with torch.no_grad():
        torch.testing.assert_close(task.loss(net, padded.tensors), task.loss(net, task.server_data().tensors))


def test_attention_auc_and_auc_are_nan_without_positive_bags():
    task = _task(server=8, positive_rate=0.0)
    metrics = task.evaluate(task.build_model(), task.server_data())
    assert math.isnan(metrics["auc"]) and math.isnan(metrics["attention_auc"])
    assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["balanced_accuracy"] == metrics["accuracy"]


def test_plot_examples_writes_a_png(tmp_path: Path):
    task = _task(server=12)
    path = tmp_path / "plots" / "examples.png"
    task.plot_examples(task.build_model(), task.server_data(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- federated run


def test_a_short_federated_run_learns_to_classify_slides(tmp_path: Path):
    from server.engines import run_scenario
    from server.progress import make_progress
    from server.results import RunDirectory

    scenario = scenario_module.validate({
        "name": "mil-e2e",
        "task": {"name": "mil", "params": {"tiles_per_slide": 8}},
        "data": {"samples_per_client": 48, "server_samples": 48},
        "partition": {"clients": 3, "kind": "label_skew"},
        "strategy": {"rounds": 6},
        "local": {"epochs": 2, "batch_size": 8, "lr": 5e-4, "optimizer": "adam"},
        "engine": {"backend": "inprocess"},
        "output": {"dir": str(tmp_path / "runs"), "plots": False},
    })
    run_dir = RunDirectory.create(scenario.output.dir, scenario.name)
    run_dir.write_scenario(scenario.to_yaml())
    run_scenario(scenario, run_dir, make_progress(interactive=False))

    records = run_dir.read_metrics()
    evaluate = [r for r in records if r["phase"] == "evaluate"]
    assert all(sorted(r["clients"]) == ["0", "1", "2"] for r in evaluate)
    assert all("auc" in m for r in evaluate for m in r["clients"].values())
    central = [r["aggregate"]["auc"] for r in records if r["phase"] == "central"]
    assert len(central) == 6 and central[-1] > 0.6, central
