"""FedSGD: one full-batch gradient per site and round, aggregated into one server step."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from client.cache import task_for
from server.scenario import LocalSection, Scenario, ScenarioError, validate
from strategies.fedsgd import FedSGDClient, FedSGDParams
from tests.helpers import BLOBS, FULL_BATCH, final_weight, quadratic_scenario, run, toy_scenario


def four_sites(tmp_path: Path, strategy: str, *, rounds: int, local: dict[str, Any] | None = None,
               **strategy_keys: Any) -> Scenario:
    """The quadratic task on 4 sites, without federated evaluation (the tests compare the weights)."""
    return quadratic_scenario(tmp_path, strategy, rounds=rounds, clients=4, local=local or {}, fraction_evaluate=0.0,
                              **strategy_keys)


def test_fedsgd_with_every_site_is_full_batch_gradient_descent_on_the_pooled_data(tmp_path: Path) -> None:
    rounds, eta = 5, 0.3
    scenario = four_sites(tmp_path, "fedsgd", rounds=rounds, params={"server_lr": eta})
    run_dir = run(scenario)

    task = task_for(scenario)
    x = torch.cat([x_k for x_k, _ in task.sites]).double()  # pooled data, (n, dim)
    y = torch.cat([y_k for _, y_k in task.sites]).double()  # (n, 1)
    w = task.build_model().weight.detach().double().squeeze(0)  # w_0, (dim,)
    for _ in range(rounds):  # centralised GD on F(w) = 1/(2n) ‖Xw − y‖²: ∇F = Xᵀ(Xw − y)/n
        w = w - eta * x.T @ (x @ w - y.squeeze(1)) / len(x)
    assert (final_weight(run_dir) - w).abs().max().item() < 1e-6
    assert (w - task.build_model().weight.detach().double().squeeze(0)).abs().max().item() > 0.1  # it moved

    train = [r for r in run_dir.read_metrics() if r["phase"] == "train"]
    assert len(train) == rounds
    for record in train:
        assert {m["steps"] for m in record["clients"].values()} == {1}
        assert record["aggregate"]["num-examples"] == len(x)


def test_fedsgd_equals_fedavg_with_one_full_batch_sgd_step_and_sends_as_many_bytes(tmp_path: Path) -> None:
    eta = 0.2
    fedsgd = run(four_sites(tmp_path, "fedsgd", rounds=4, params={"server_lr": eta}))
    one_step = {"epochs": 1, "max_steps": 1, "batch_size": FULL_BATCH, "optimizer": "sgd", "lr": eta}
    fedavg = run(four_sites(tmp_path, "fedavg", rounds=4, local=one_step))
    assert (final_weight(fedsgd) - final_weight(fedavg)).abs().max().item() < 1e-6
    train_sgd = [r for r in fedsgd.read_metrics() if r["phase"] == "train"]
    train_avg = [r for r in fedavg.read_metrics() if r["phase"] == "train"]
    for ours, theirs in zip(train_sgd, train_avg, strict=True):
        assert ours["aggregate"]["loss"] == pytest.approx(theirs["aggregate"]["loss"], rel=1e-6)
        assert ours["bytes_up"] == theirs["bytes_up"]


def test_fedsgd_steps_with_the_gradient_and_averages_the_sites_batchnorm_statistics_at_w_t(tmp_path: Path) -> None:
    eta = 0.5
    scenario = toy_scenario(BLOBS, "fedsgd", rounds=1, clients=3, samples=16, local={}, model="mlp",
                            output={"dir": str(tmp_path / "runs")}, fraction_evaluate=0.0, params={"server_lr": eta})
    result = run(scenario).load_checkpoint().arrays

    task, start = task_for(scenario), task_for(scenario).build_model()
    sizes = [len(task.client_data(k).train) for k in range(3)]
    expected = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in start.state_dict().items()}
    for k, n_k in enumerate(sizes):  # each site: one forward/backward on all its data in training mode
        site = copy.deepcopy(start).train()
        x, y = task.client_data(k).train.tensors
        task.loss(site, (x, y)).backward()
        share = n_k / sum(sizes)
        for name, p in site.named_parameters():
            expected[name] += share * (p.detach().double() - eta * p.grad.double())  # w_t − η Σ (n_k/n) g_k
        hidden = start[0](x).detach().double()  # BatchNorm input at w_t, (n_k, 16)
        expected["1.running_mean"] += share * hidden.mean(0)  # the batch's statistics, n_k-weighted mean
        expected["1.running_var"] += share * hidden.var(0, unbiased=True)
    for name, value in result.items():
        if name.endswith("num_batches_tracked"):
            assert value.item() == 1
        else:
            assert torch.allclose(value.double(), expected[name], atol=1e-5), name
    assert not torch.allclose(result["1.running_mean"], start.state_dict()["1.running_mean"])


def test_fedsgd_client_takes_one_plain_step_on_all_or_batch_size_examples() -> None:
    local = LocalSection(epochs=3, max_steps=None, batch_size=8, optimizer="adam", lr=0.01)
    full = FedSGDClient(FedSGDParams()).local_section(local, 40)
    assert (full.epochs, full.max_steps, full.batch_size, full.optimizer) == (1, 1, 40, "sgd")
    assert FedSGDClient(FedSGDParams(batch_size=5)).local_section(local, 40).batch_size == 5
    assert local.batch_size == 8  # the scenario's section is not modified


@pytest.mark.parametrize("key", ["momentum", "weight_decay"])
def test_fedsgd_rejects_local_momentum_and_weight_decay(tmp_path: Path, key: str) -> None:
    raw = four_sites(tmp_path, "fedsgd", rounds=1).model_dump(mode="json")
    raw["local"][key] = 0.5
    with pytest.raises(ScenarioError, match=rf"local\.{key}: fedsgd sends one plain gradient") as error:
        validate(raw)
    assert "\n" not in str(error.value)
