"""FedAvg server and client halves: weighting, BatchNorm policies, faulty replies, sampling, FedProx term."""

from __future__ import annotations

import logging

import torch
from flwr.app import ArrayRecord, Message, RecordDict

from strategies.base import Cohort, batchnorm_buffer_names, batchnorm_tensor_names, weighted_average
from strategies.fedavg import FedAvg, FedAvgClient, FedAvgParams
from tests.helpers import reply_message


def tiny_bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2), torch.nn.Flatten(), torch.nn.LazyLinear(1))


def reply(node_id: int, state: dict[str, torch.Tensor], n: int) -> Message:
    """Node ``node_id``'s update ``state`` from ``n`` examples, with loss ``n``."""
    return reply_message(node_id, {"arrays": ArrayRecord(state)}, num_examples=n, loss=float(n))


COHORT = Cohort(node_to_partition={101: 2, 202: 0, 303: 1}, seed=0)


def client_states() -> list[dict[str, torch.Tensor]]:
    states = []
    for k in range(3):
        states.append({
            "w": torch.full((2, 2), float(k + 1)),
            "running_mean": torch.full((2,), 10.0 * (k + 1)),
            "num_batches_tracked": torch.tensor(k * 5),
        })
    return states


def test_weighted_average_matches_hand_computation() -> None:
    states, n = client_states(), [10, 30, 60]
    averaged = weighted_average(states, n)
    assert torch.allclose(averaged["w"], torch.full((2, 2), (1 * 10 + 2 * 30 + 3 * 60) / 100))
    assert averaged["w"].dtype == torch.float32
    assert averaged["num_batches_tracked"].item() == 10  # integers: max, not a fractional average


def test_aggregate_train_weights_by_num_examples_and_averages_bn_statistics() -> None:
    strategy = FedAvg(COHORT)
    states = client_states()
    replies = [reply(202, states[0], 10), reply(303, states[1], 30), reply(101, states[2], 60)]
    arrays, metrics = strategy.aggregate_train(1, list(reversed(replies)))
    result = arrays.to_torch_state_dict()
    assert torch.allclose(result["running_mean"], torch.full((2,), (10 * 10 + 20 * 30 + 30 * 60) / 100))
    assert metrics["num-examples"] == 100
    assert abs(metrics["loss"] - (10 * 10 + 30 * 30 + 60 * 60) / 100) < 1e-9


def test_non_finite_update_is_dropped_and_logged(caplog) -> None:
    strategy = FedAvg(COHORT)
    states = client_states()
    states[1]["w"][0, 0] = float("nan")
    with caplog.at_level(logging.WARNING, logger="medfed"):
        arrays, metrics = strategy.aggregate_train(1, [reply(202, states[0], 10), reply(303, states[1], 30)])
    assert torch.equal(arrays.to_torch_state_dict()["w"], states[0]["w"])
    assert metrics["num-examples"] == 10
    assert "client 1 sent non-finite values in 'arrays.w'" in caplog.text


def test_cohort_sampling_is_seeded_sorted_and_bounded() -> None:
    cohort = Cohort(node_to_partition={1000 + k: k for k in range(10)}, seed=3)
    first = cohort.sample(4, fraction=0.3, min_nodes=2, phase="train")
    assert first == cohort.sample(4, fraction=0.3, min_nodes=2, phase="train")
    assert len(first) == 3 and first == sorted(first)
    assert len(cohort.sample(4, fraction=0.1, min_nodes=2, phase="train")) == 2
    picks = {tuple(cohort.sample(r, fraction=0.3, min_nodes=1, phase="train")) for r in range(1, 20)}
    assert len(picks) > 5  # rounds draw different cohorts
    assert cohort.sample(1, fraction=1.0, min_nodes=1, phase="train") == [1000 + k for k in range(10)]


def _trained_copy(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model.train()
    model(torch.randn(8, 1, 5, 5) * (seed + 1) + seed)  # updates running stats
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bn_stats_local_keeps_each_sites_running_statistics_across_rounds() -> None:
    model = tiny_bn_model()
    model(torch.zeros(1, 1, 5, 5))  # materialise the lazy layer
    stats = batchnorm_buffer_names(model)
    assert stats == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert batchnorm_tensor_names(model) == stats | {"1.weight", "1.bias"}

    rule, state = FedAvgClient(FedAvgParams(bn_stats="local")), RecordDict()
    global_state = _trained_copy(model, seed=0)
    rule.receive(model, RecordDict({"arrays": ArrayRecord(global_state)}), state)
    own = _trained_copy(model, seed=5)
    rule.reply(model, state, steps=1)

    next_global = {k: v + 1 if v.is_floating_point() else v for k, v in global_state.items()}
    rule.receive(model, RecordDict({"arrays": ArrayRecord(next_global)}), state)
    now = model.state_dict()
    assert torch.equal(now["1.running_mean"], own["1.running_mean"])  # the site's own statistics
    assert torch.equal(now["0.weight"], next_global["0.weight"])  # everything else is the new global model
    assert torch.equal(now["1.weight"], next_global["1.weight"])

    averaging = FedAvgClient(FedAvgParams(bn_stats="average"))
    averaging.receive(model, RecordDict({"arrays": ArrayRecord(next_global)}), RecordDict())
    assert torch.equal(model.state_dict()["1.running_mean"], next_global["1.running_mean"])


def test_fedprox_adds_the_gradient_of_half_mu_squared_distance() -> None:
    model = torch.nn.Linear(3, 1)
    rule = FedAvgClient(FedAvgParams(proximal_mu=0.4))
    rule.receive(model, RecordDict({"arrays": ArrayRecord(model.state_dict())}), RecordDict())
    with torch.no_grad():
        model.weight += torch.tensor([[1.0, 2.0, 0.0]])
        model.bias -= 2.0
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    rule.after_backward(model)  # ∇ = 1 + μ (w − w_t)
    assert torch.allclose(model.weight.grad, torch.tensor([[1.4, 1.8, 1.0]]))
    assert torch.allclose(model.bias.grad, torch.tensor([0.2]))
    plain = FedAvgClient(FedAvgParams())
    plain.receive(model, RecordDict({"arrays": ArrayRecord(model.state_dict())}), RecordDict())
    plain.after_backward(model)
    assert torch.allclose(model.bias.grad, torch.tensor([0.2]))  # μ = 0 leaves the gradient alone
