"""The robust strategy names (FedAvg + a rule of strategies.aggregation) on hand-made updates with one absurd
outlier, their checks, and one real run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Message

from server.scenario import ScenarioError
from strategies import get_algorithm
from strategies.aggregation import (
    Aggregator,
    BulyanParams,
    KrumParams,
    MedianParams,
    MultiKrumParams,
    RuleParams,
    TrimmedMeanParams,
)
from strategies.base import Cohort
from strategies.fedavg import FedAvg
from tests.helpers import QUADRATIC, blobs_scenario, reply_message, run

HONEST = [0.0, 1.0, 2.5, 4.5]  # sites 0..3, with n_k = 10, 20, 30, 40
OUTLIER = 1000.0  # site 4, n_k = 50


def reply(pid: int, value: float) -> Message:
    """Site ``pid``'s update: w = [v, 2v] (float32) and an integer counter c = round(v); n_k = 10 (pid + 1)."""
    arrays = ArrayRecord({"w": torch.tensor([value, 2 * value]), "c": torch.tensor(round(value))})
    return reply_message(100 + pid, {"arrays": arrays}, num_examples=10 * (pid + 1), loss=value)


def aggregate(strategy: FedAvg, values: list[float]) -> dict[str, torch.Tensor]:
    replies = [reply(pid, value) for pid, value in enumerate(values)]
    arrays, metrics = strategy.aggregate_train(1, list(reversed(replies)))  # arrival order must not matter
    assert metrics["num-examples"] == sum(10 * (pid + 1) for pid in range(len(values)))
    return arrays.to_torch_state_dict()


def robust(params: RuleParams, sites: int = 5) -> FedAvg:
    return FedAvg(Cohort({100 + pid: pid for pid in range(sites)}, seed=0),
                  aggregator=Aggregator(params, source="strategy.params"))


# Krum scores with f = 1, n = 5: the sum of squared distances (in v; w = [v, 2v] scales all by 5) to the
# n - f - 2 = 2 nearest other updates:
#   v=0: 1 + 6.25 = 7.25   v=1: 1 + 2.25 = 3.25   v=2.5: 2.25 + 4 = 6.25   v=4.5: 4 + 12.25 = 16.25   v=1000: huge
CASES = [
    ("median of 0, 1, 2.5, 4.5, 1000", MedianParams(), 2.5),
    ("mean of 1, 2.5, 4.5 after trimming 1 at each end", TrimmedMeanParams(beta=0.2), (1.0 + 2.5 + 4.5) / 3),
    ("Krum's lowest score: v=1", KrumParams(num_malicious_nodes=1), 1.0),
    ("plain mean of the 3 lowest scores (v=1, 2.5, 0)", MultiKrumParams(num_malicious_nodes=1,
                                                                       num_nodes_to_select=3),
     (1.0 + 2.5 + 0.0) / 3),
]


@pytest.mark.parametrize(("why", "params", "expected"), CASES, ids=[c[1].describe() for c in CASES])
def test_rule_matches_the_hand_computed_value_and_ignores_the_outlier(why: str, params: RuleParams,
                                                                      expected: float) -> None:
    result = aggregate(robust(params), [*HONEST, OUTLIER])
    assert torch.allclose(result["w"], torch.tensor([expected, 2 * expected])), why
    assert result["w"].dtype == torch.float32 and result["c"].dtype == torch.int64
    moved = aggregate(robust(params), [*HONEST, 1e9])
    assert torch.equal(moved["w"], result["w"])  # the outlier's value does not matter ...
    dragged = aggregate(FedAvg(robust(params).cohort), [*HONEST, OUTLIER])["w"][0].item()
    assert dragged > 300  # ... while FedAvg's mean follows it: (20 + 75 + 180 + 50 000) / 150 = 335.2


def test_bulyan_averages_the_values_nearest_the_median_of_the_krum_selection() -> None:
    # n = 7, f = 1: θ = n - 2f = 5 repeated Krum picks (scores over |R| - f - 2 nearest others, at least 1):
    #   R = all 7, 4 neighbours: v=0: 42.25  v=1: 24.25  v=2: 1+2.25+4+9 = 16.25  v=3.5: 23  v=5: 33.5 ... → 2
    #   R = {0, 1, 3.5, 5, 7.5, 1000}, 3 neighbours: 0: 1+12.25+25 = 38.25  1: 1+6.25+16 = 23.25
    #     3.5: 2.25+6.25+12.25 = 20.75  5: 2.25+6.25+16 = 24.5 → 3.5
    #   R = {0, 1, 5, 7.5, 1000}, 2 neighbours: 0: 1+25 = 26  1: 1+16 = 17  5: 6.25+16 = 22.25  7.5: 6.25+42.25 → 1
    #   R = {0, 5, 7.5, 1000}, 1 neighbour: 0: 25  5: 6.25  7.5: 6.25 → tie, the lower partition id: 5
    #   R = {0, 7.5, 1000}, 1 neighbour: 0: 56.25  7.5: 56.25 → tie: 0          → keeps 0, 1, 2, 3.5, 5
    # median 2; the β = θ - 2f = 3 values closest to it: 2, 1, 3.5.
    honest = [0.0, 1.0, 2.0, 3.5, 5.0, 7.5]
    result = aggregate(robust(BulyanParams(num_malicious_nodes=1), sites=7), [*honest, OUTLIER])
    assert torch.allclose(result["w"], torch.tensor([6.5 / 3, 13 / 3]))
    moved = aggregate(robust(BulyanParams(num_malicious_nodes=1), sites=7), [*honest, 1e9])
    assert torch.equal(moved["w"], result["w"])


def test_too_few_usable_updates_for_the_rule_fail_the_round_with_a_reason(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="medfed"):
        arrays, metrics = robust(KrumParams(num_malicious_nodes=1)).aggregate_train(
            1, [reply(pid, value) for pid, value in enumerate(HONEST)])
    assert arrays is None and metrics is None
    assert "only 4 usable updates" in caplog.text and "n > 2f + 2 = 4" in caplog.text


@pytest.mark.parametrize(("strategy", "params", "clients", "expected"), [
    ("krum", {"num_malicious_nodes": 1}, 4,
     "strategy.params.num_malicious_nodes: Krum (f = 1) needs n > 2f + 2 = 4 updates per round, but a round has 4"),
    ("multikrum", {"num_malicious_nodes": 1, "num_nodes_to_select": 5}, 5,
     "strategy.params.num_nodes_to_select: 5 exceeds n − f = 4"),
    ("bulyan", {"num_malicious_nodes": 1}, 6,
     "strategy.params.num_malicious_nodes: Bulyan (f = 1) needs n ≥ 4f + 3 = 7 updates per round, but a round has 6"),
    ("fedtrimmedavg", {"beta": 0.2}, 4, "strategy.params.beta: 0.2 trims floor(0.2·4) = 0 of 4 updates"),
    ("fedtrimmedavg", {"beta": 0.5}, 10, "strategy.params.beta: Input should be less than 0.5"),
])
def test_too_few_clients_or_bad_settings_are_one_line_scenario_errors(strategy: str, params: dict, clients: int,
                                                                       expected: str) -> None:
    with pytest.raises(ScenarioError) as error:
        blobs_scenario(strategy, params, sites=clients, task=QUADRATIC)
    assert "\n" not in str(error.value) and expected in str(error.value)


def test_the_check_counts_the_clients_sampled_per_round() -> None:
    assert blobs_scenario("krum", {"num_malicious_nodes": 1}, sites=10, task=QUADRATIC).strategy.name == "krum"
    with pytest.raises(ScenarioError, match="but a round has 4 .partition.clients 10, strategy.fraction_train 0.4"):
        blobs_scenario("krum", {"num_malicious_nodes": 1}, sites=10, fraction_train=0.4, task=QUADRATIC)


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_every_rule_is_registered_by_name(name: str) -> None:
    assert get_algorithm(name).name == name


def test_multikrum_trains_end_to_end_through_the_round_loop(tmp_path: Path) -> None:
    # sites share one true w (heterogeneity 0): every honest update heads to the same optimum, where the loss is 0
    scenario = blobs_scenario("multikrum", {"num_malicious_nodes": 1}, rounds=3, sites=5, task=QUADRATIC,
                              heterogeneity=0.0)
    losses = [r["aggregate"]["loss"] for r in run(scenario, tmp_path).read_metrics() if r["phase"] == "evaluate"]
    assert losses[2] < 0.2 * losses[0], losses  # measured 0.0366 → 0.0072 → 0.0028
