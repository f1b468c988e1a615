"""Baselines: centralized training reaches the pooled optimum, local-only training each site's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from client.cache import task_for
from client.trainer import make_loader
from medtasks.base import PooledSites
from server.scenario import ScenarioError, validate
from tests.helpers import final_weight, interrupted_and_resumed, quadratic_scenario, run, without_timing


def test_centralized_training_reaches_the_pooled_optimum_on_one_node(tmp_path: Path) -> None:
    scenario = quadratic_scenario(tmp_path, "centralized")
    run_dir = run(scenario)
    task = task_for(scenario)
    assert torch.allclose(final_weight(run_dir), task.optimum(), atol=1e-4)
    train = [r for r in run_dir.read_metrics() if r["phase"] == "train"]
    assert all(list(r["clients"]) == ["0"] for r in train)  # one trainer ...
    pooled = sum(len(task.client_data(k).train) for k in range(3))
    assert train[0]["aggregate"]["num-examples"] == pooled  # ... on every site's data
    evaluate = next(r for r in run_dir.read_metrics() if r["phase"] == "evaluate")
    assert sorted(evaluate["clients"]) == ["0", "1", "2"]  # every site scores the pooled model


def test_centralized_max_steps_counts_one_federated_round(tmp_path: Path) -> None:
    scenario = quadratic_scenario(tmp_path, "centralized", rounds=1)
    scenario = validate({**scenario.model_dump(mode="json"), "local": {"epochs": 5, "max_steps": 2, "batch_size": 4}})
    train = next(r for r in run(scenario).read_metrics() if r["phase"] == "train")
    assert train["clients"]["0"]["steps"] == 2 * 3


def test_centralized_needs_min_clients_one(tmp_path: Path) -> None:
    raw = quadratic_scenario(tmp_path, "centralized").model_dump(mode="json")
    raw["strategy"]["min_clients"] = 2
    with pytest.raises(ScenarioError, match="strategy.min_clients: the centralized baseline"):
        validate(raw)


def test_local_only_sites_reach_their_own_optima_and_central_scores_each(tmp_path: Path) -> None:
    scenario = validate({**quadratic_scenario(tmp_path, "local").model_dump(mode="json"),
                         "data": {"samples_per_client": 20, "server_samples": 1}})
    run_dir = run(scenario)
    task = task_for(scenario)
    models = run_dir.load_checkpoint().strategy_state["models"]
    for k in range(3):
        own = models[str(k)]["weight"].squeeze(0).double()
        assert torch.allclose(own, task.optimum([k]), atol=1e-4)
        assert not torch.allclose(own, task.optimum(), atol=1e-1)  # heterogeneous sites: nothing shared
    central = [r for r in run_dir.read_metrics() if r["phase"] == "central"][-1]
    losses = [central["clients"][str(k)]["loss"] for k in range(3)]
    assert central["aggregate"]["loss"] == pytest.approx(sum(losses) / 3)
    evaluate = [r for r in run_dir.read_metrics() if r["phase"] == "evaluate"][-1]
    assert max(m["loss"] for m in evaluate["clients"].values()) < 1e-6  # each site fits its own data exactly


def test_local_only_resumes_every_sites_model(tmp_path: Path) -> None:
    resumed, uninterrupted = interrupted_and_resumed(quadratic_scenario(tmp_path, "local", rounds=3), after=2)
    assert without_timing(resumed.read_metrics()) == without_timing(uninterrupted.read_metrics())


def test_pooled_batches_by_site_never_mix_sites_and_cover_every_sample_once_per_epoch() -> None:
    sites = [TensorDataset(torch.full((n, 1, width), float(k))) for k, (n, width) in enumerate([(7, 3), (5, 4), (9, 3)])]
    loader = make_loader(PooledSites(sites, by_site=True), batch_size=4, generator=torch.Generator().manual_seed(0))
    epochs = [[batch[0] for batch in loader] for _ in range(2)]
    for batches in epochs:
        assert len(batches) == len(loader) == 2 + 2 + 3
        assert all(len(set(b[:, 0, 0].tolist())) == 1 for b in batches)  # one site per batch
        assert sorted(sum((b[:, 0, 0].tolist() for b in batches), [])) == [0.0] * 7 + [1.0] * 5 + [2.0] * 9
    firsts = [[b[0, 0, 0].item() for b in batches] for batches in epochs]
    assert firsts[0] != firsts[1] or len(set(firsts[0])) > 1  # batch order mixes sites, and changes by epoch
