"""Defenses (strategies.aggregation): each rule against Flower's result or a hand-computed one, the norm bound,
and a defense combined with SCAFFOLD, FedBN and FedSGD; the default is the weighted mean, bit for bit."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp import strategy as flower
from flwr.serverapp.strategy.multikrum import compute_distances, select_multikrum

from client.cache import task_for
from server.scenario import Scenario, ScenarioError, validate
from strategies.aggregation import (
    RULES,
    Aggregator,
    BulyanParams,
    KrumParams,
    MedianParams,
    MultiKrumParams,
    TrimmedMeanParams,
    aggregation_rule,
    bound_update,
    bulyan_selection,
    krum_ranking,
    pairwise_squared_distances,
    update_norm,
)
from strategies.base import Cohort, batchnorm_tensor_names, weighted_average
from strategies.fedavg import FedAvg
from strategies.fedbn import FedBN
from strategies.fedsgd import GRADIENT_KEY, FedSGD
from strategies.scaffold import VARIATE_DELTA_KEY, Scaffold
from tests.helpers import QUADRATIC, blobs_scenario, final_accuracy, reply_message, run

SITES = 7


def random_states(sites: int = SITES, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Float64 'models' of two tensors for ``sites`` sites, the last one far off (a Byzantine site)."""
    rng = np.random.default_rng(seed)
    states = [{"a": torch.from_numpy(rng.normal(size=(3, 4))), "b": torch.from_numpy(rng.normal(size=5))}
              for _ in range(sites)]
    states[-1] = {name: value * 50 + 20 for name, value in states[-1].items()}
    return states


def as_replies(states: list[dict[str, torch.Tensor]], counts: Iterable[int] | None = None) -> list[Message]:
    """Train replies of sites 0, 1, ... (node ids 100, 101, ...) carrying ``states`` in float64."""
    counts = list(counts) if counts is not None else [10] * len(states)
    return [reply_message(100 + pid, {"arrays": ArrayRecord({k: Array(v.numpy()) for k, v in state.items()})},
                          num_examples=n) for pid, (state, n) in enumerate(zip(states, counts))]


def flower_result(rule: flower.FedAvg, states: list[dict[str, torch.Tensor]],
                  counts: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
    arrays, _ = rule.aggregate_train(1, as_replies(states, counts))
    return arrays.to_torch_state_dict()


def cohort(sites: int = SITES) -> Cohort:
    return Cohort({100 + pid: pid for pid in range(sites)}, seed=0)


def with_defense(scenario: Scenario, **defense: Any) -> Scenario:
    """``scenario`` with its ``defense`` section set (validated again)."""
    raw = scenario.model_dump(mode="json")
    raw["defense"] = defense
    return validate(raw)


# --- each rule against Flower -------------------------------------------------------------------------
@pytest.mark.parametrize(("params", "rule"), [
    (MedianParams(), flower.FedMedian()),
    (TrimmedMeanParams(beta=0.2), flower.FedTrimmedAvg(beta=0.2)),
    (TrimmedMeanParams(beta=0.3), flower.FedTrimmedAvg(beta=0.3)),
    (KrumParams(num_malicious_nodes=1), flower.Krum(num_malicious_nodes=1)),
    (KrumParams(num_malicious_nodes=2), flower.Krum(num_malicious_nodes=2)),
], ids=lambda x: x.describe() if hasattr(x, "describe") else "")
def test_median_trimmed_mean_and_krum_are_flowers_bit_for_bit(params: Any, rule: flower.FedAvg) -> None:
    for seed in range(3):
        states = random_states(seed=seed)
        ours = Aggregator(params).aggregate(states, [1.0] * SITES)
        theirs = flower_result(rule, states)
        assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_krum_scores_and_distances_are_flowers() -> None:
    for seed in range(5):
        states = random_states(sites=9, seed=seed)
        vectors = [[v.numpy() for v in state.values()] for state in states]
        records = [ArrayRecord({k: Array(v.numpy()) for k, v in state.items()}) for state in states]
        assert np.array_equal(pairwise_squared_distances(vectors), compute_distances(records))
        contents = [reply.content for reply in as_replies(states)]
        for f, m in [(0, 1), (1, 4), (2, 5), (3, 3)]:
            chosen = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=m)
            expected = [next(i for i, c in enumerate(contents) if c is picked) for picked in chosen]
            assert krum_ranking(pairwise_squared_distances(vectors), f)[:m].tolist() == expected


def test_multikrum_selects_as_flower_but_averages_with_equal_weights() -> None:
    states = random_states()
    params = MultiKrumParams(num_malicious_nodes=1, num_nodes_to_select=4)
    ours = Aggregator(params).aggregate(states, [1.0] * SITES)
    equal_counts = flower_result(flower.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=4), states)
    assert all(torch.allclose(ours[name], equal_counts[name], rtol=0, atol=1e-12) for name in ours)


def test_one_selected_attacker_claiming_a_million_examples_cannot_pull_multikrum_onto_itself() -> None:
    # v = 0, 1, 2, 3.2 honest (10 examples each); site 4 sends 1.5, inside the honest cloud, claiming 10⁶ examples.
    # Krum scores (f = 1, 2 nearest others): 0: 1+2.25 = 3.25  1: 0.25+1 = 1.25  1.5: 0.25+0.25 = 0.5
    #   2: 0.25+1 = 1.25  3.2: 1.44+2.89 = 4.33  → m = n − f = 4 keeps 1.5, 1, 2, 0.
    values, counts = [0.0, 1.0, 2.0, 3.2, 1.5], [10, 10, 10, 10, 10**6]
    states = [{"w": torch.tensor([v, -v], dtype=torch.float64)} for v in values]
    flowers = flower_result(flower.MultiKrum(num_malicious_nodes=1, num_nodes_to_select=4), states, counts)["w"][0]
    assert flowers.item() == pytest.approx(1.5, abs=1e-4)  # Flower's weighted mean sits on the attacker
    strategy = FedAvg(cohort(5), aggregator=Aggregator(MultiKrumParams(num_malicious_nodes=1)))
    arrays, _ = strategy.aggregate_train(1, as_replies(states, counts))
    assert arrays.to_torch_state_dict()["w"].tolist() == [4.5 / 4, -4.5 / 4]  # (1.5 + 1 + 2 + 0) / 4


def test_bulyan_repeats_krum_on_what_remains_where_flower_ranks_once() -> None:
    # n = 7, f = 1, θ = 5, β = 3; v = 0, 2, 3, 5, 7, 8 and an outlier at 100.
    # Flower (one ranking, 4 nearest others): 0: 4+9+25+49 = 87  2: 4+1+9+25 = 39  3: 9+1+4+16 = 30
    #   5: 9+4+4+9 = 26  7: 4+1+16+25 = 46  8: 1+9+25+36 = 71 → keeps 2, 3, 5, 7, 8; median 5; closest 5, 3, 7 → 5
    # Repeated Krum: all 7 (4 neighbours): 5 (26) | 0 2 3 7 8 (3): 0: 4+9+49 = 62  2: 4+1+25 = 30  3: 1+9+16 = 26
    #   7: 1+16+25 = 42  8: 1+25+36 = 62 → 3 | 0 2 7 8 (2): 0: 4+49 = 53  2: 4+25 = 29  7: 1+25 = 26  8: 1+36 = 37
    #   → 7 | 0 2 8 (1): 0: 4  2: 4  8: 36 → tie, the lower partition id: 0 | 2 8: 36, 36 → 2
    #   keeps 0, 2, 3, 5, 7; median 3; the 3 closest: 3, 2, 5 → 10/3
    values = [0.0, 2.0, 3.0, 5.0, 7.0, 8.0, 100.0]
    states = [{"w": torch.tensor([v], dtype=torch.float64)} for v in values]
    assert bulyan_selection([[s["w"].numpy()] for s in states], 1) == [0, 1, 2, 3, 4]
    ours = Aggregator(BulyanParams(num_malicious_nodes=1)).aggregate(states, [1.0] * 7)["w"].item()
    assert ours == pytest.approx(10 / 3, abs=1e-15)
    assert flower_result(flower.Bulyan(num_malicious_nodes=1), states)["w"].item() == 5.0


def test_a_round_with_too_few_updates_for_the_rule_names_the_defense_key() -> None:
    with pytest.raises(ValueError, match=r"^defense.params.num_malicious_nodes: Bulyan \(f = 1\) needs n ≥ 4f \+ 3"):
        Aggregator(BulyanParams(num_malicious_nodes=1)).aggregate(random_states(sites=6), [1.0] * 6)


# --- the norm bound --------------------------------------------------------------------------------------
def test_norm_bound_scales_the_update_of_the_floating_tensors_only() -> None:
    origin = {"w": torch.tensor([1.0, 1.0]), "b": torch.tensor([0.0]), "n": torch.tensor(3)}
    state = {"w": torch.tensor([4.0, 1.0]), "b": torch.tensor([4.0]), "n": torch.tensor(7)}  # ‖Δ‖ = ‖(3, 0, 4)‖ = 5
    assert update_norm(state, origin) == 5.0
    bounded = bound_update(state, origin, 1.0)
    assert torch.allclose(bounded["w"], torch.tensor([1.6, 1.0], dtype=torch.float64))
    assert torch.allclose(bounded["b"], torch.tensor([0.8], dtype=torch.float64))
    assert bounded["n"] is state["n"]  # integer counters are not an update to bound
    assert torch.equal(bound_update(state, origin, 5.0)["w"], state["w"].double())  # inside the bound: unchanged


def test_bounded_mean_limits_a_scaled_update_and_keeps_dtypes() -> None:
    origin = {"w": torch.zeros(2), "n": torch.tensor(0)}
    states = [{"w": torch.tensor([0.1, 0.0]), "n": torch.tensor(1)}, {"w": torch.tensor([0.0, 0.1]), "n": torch.tensor(1)},
              {"w": torch.tensor([100.0, 0.0]), "n": torch.tensor(2)}]  # the last one scaled ×1000
    result = Aggregator(norm_bound=0.2).aggregate(states, [1.0, 1.0, 2.0], origin)
    assert result["w"].dtype == torch.float32 and result["n"].dtype == torch.int64 and result["n"].item() == 2
    assert torch.allclose(result["w"], torch.tensor([(0.1 + 2 * 0.2) / 4, 0.1 / 4]))
    with pytest.raises(ValueError, match="defense.norm_bound"):
        Aggregator(norm_bound=0.2).aggregate(states, [1.0, 1.0, 2.0])


@pytest.mark.parametrize("rule", ["median", "trimmed_mean", "krum", "multikrum", "bulyan"])
def test_a_robust_rule_with_a_norm_bound_keeps_the_sites_dtypes(rule: str) -> None:
    """Bounded updates are float64; the aggregate must still be float32, or the next round's broadcast is float64
    and every site's float32 reply looks malformed."""
    origin = {"w": torch.zeros(3), "n": torch.tensor(0)}
    states = [{"w": torch.full((3,), 0.1 * k), "n": torch.tensor(k)} for k in range(1, 8)]
    aggregator = Aggregator(RULES[rule].model_validate({}), norm_bound=0.25)
    result = aggregator.aggregate(states, [1.0] * 7, origin)
    assert result["w"].dtype == torch.float32 and result["n"].dtype == torch.int64
    assert float(torch.linalg.vector_norm(result["w"].double())) <= 0.25 + 1e-6


# --- the default is today's weighted mean ---------------------------------------------------------------
def test_the_default_defense_is_the_weighted_mean_bit_for_bit() -> None:
    states = [{"w": torch.randn(4, 3, generator=torch.Generator().manual_seed(pid)), "n": torch.tensor(pid)}
              for pid in range(4)]
    weights = [3.0, 1.0, 7.0, 2.0]
    default = Aggregator.from_scenario(blobs_scenario("fedavg"))
    assert default.is_plain_mean and aggregation_rule(blobs_scenario("fedavg")) == "mean"
    ours = default.aggregate(states, weights)
    expected = weighted_average(states, weights)
    assert all(torch.equal(ours[name], expected[name]) for name in expected)


def test_a_robust_strategy_name_and_the_same_defense_give_the_same_model(tmp_path: Path) -> None:
    alias = blobs_scenario("krum", {"num_malicious_nodes": 1}, rounds=2, sites=5)
    defense = with_defense(blobs_scenario("fedavg", rounds=2, sites=5), aggregation="krum",
                           params={"num_malicious_nodes": 1})
    assert aggregation_rule(alias) == aggregation_rule(defense) == "krum"
    assert Aggregator.from_scenario(alias).params == Aggregator.from_scenario(defense).params
    a, b = (run(s, tmp_path).load_checkpoint().arrays for s in (alias, defense))
    assert set(a) == set(b) and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)


# --- a defense with other strategies -------------------------------------------------------------------
def scaffold_reply(pid: int, weight: float, delta_c: float) -> Message:
    return reply_message(100 + pid, {"arrays": ArrayRecord({"weight": torch.tensor([[weight, weight]])}),
                                     VARIATE_DELTA_KEY: ArrayRecord({"weight": torch.tensor([[delta_c, delta_c]])})},
                         num_examples=10 + pid)


def test_scaffold_with_median_steps_robustly_and_keeps_c_the_mean_of_all_c_k() -> None:
    sites = 6  # 5 of them reply; site 4 is Byzantine (its Δw scaled ×100)
    strategy = Scaffold(cohort(sites), {"weight": torch.Size([1, 2])}, server_lr=1.0,
                        aggregator=Aggregator(MedianParams()))
    strategy._current = {"weight": torch.tensor([[1.0, 1.0]])}  # w_t, as configure_train remembers it
    honest = [1.1, 1.2, 1.3, 0.9]
    replies = [scaffold_reply(pid, w, 0.1 * pid) for pid, w in enumerate(honest)]
    replies.append(scaffold_reply(4, 1.0 + 100 * 0.2, 5.0))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert torch.allclose(arrays.to_torch_state_dict()["weight"], torch.tensor([[1.2, 1.2]]))  # median of 0.9 … 21
    # c ← c + (|S|/N) mean Δc_k over all five, the Byzantine one included: c = (1/N) Σ_k c_k (c_k = Δc_k from 0)
    expected = (0.0 + 0.1 + 0.2 + 0.3 + 5.0) / sites
    assert torch.allclose(strategy.control["weight"], torch.full((1, 2), expected, dtype=torch.float64))


def scaled_site(strategy_class: type, origin_attribute: str, factor: float = 100.0) -> Callable[..., Any]:
    """``strategy_class.aggregate_train`` with site 0's reply moved to w_t + factor (w_0 − w_t) (a Byzantine site);
    w_t is the strategy's attribute ``origin_attribute``."""
    original = strategy_class.aggregate_train

    def aggregate_train(strategy: Any, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        origin = getattr(strategy, origin_attribute)
        for reply in replies:
            if strategy.cohort.partition_of(reply) == 0 and not reply.has_error():
                state = reply.content["arrays"].to_torch_state_dict()
                reply.content["arrays"] = ArrayRecord({
                    name: origin[name] + factor * (value - origin[name]) if value.is_floating_point() else value
                    for name, value in state.items()})
        return original(strategy, server_round, replies)

    return aggregate_train


def quadratic_scaffold(aggregation: str) -> Scenario:
    # 5 sites with one shared true w (heterogeneity 0): every honest update heads for the same optimum
    scenario = blobs_scenario("scaffold", {"variate": "II"}, rounds=15, sites=5, task=QUADRATIC, heterogeneity=0.0)
    return with_defense(scenario, aggregation=aggregation)


@pytest.mark.parametrize("aggregation", ["median", "mean"])
def test_scaffold_with_a_defense_converges_despite_a_site_scaled_100_times(
        aggregation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Scaffold, "aggregate_train", scaled_site(Scaffold, "_current"))
    scenario = quadratic_scaffold(aggregation)
    run_dir = run(scenario, tmp_path)
    weight = run_dir.load_checkpoint().arrays["weight"].squeeze(0).double()
    gap = (weight - task_for(scenario).optimum()).norm().item()
    if aggregation == "median":
        assert gap < 0.05, gap  # measured 6e-5
    else:
        assert gap > 1.0, gap  # the mean follows the scaled site: measured 9e17


def test_fedbn_with_median_keeps_batchnorm_local_and_takes_the_median_of_the_shared_part() -> None:
    scenario = with_defense(blobs_scenario("fedbn", sites=5), aggregation="median")
    model = task_for(scenario).build_model()
    bn = batchnorm_tensor_names(model)
    strategy = FedBN(cohort(5), template=model, local_names=bn, aggregator=Aggregator.from_scenario(scenario))
    rng = torch.Generator().manual_seed(0)
    shared = {name: t for name, t in model.state_dict().items() if name not in bn}
    states = [{name: t + torch.randn(t.shape, generator=rng) for name, t in shared.items()} for _ in range(5)]
    states[3] = {name: t + 1000 for name, t in states[3].items()}  # Byzantine
    replies = [reply_message(100 + pid, {"arrays": ArrayRecord(s)}, num_examples=64) for pid, s in enumerate(states)]
    arrays, _ = strategy.aggregate_train(1, replies)
    result = arrays.to_torch_state_dict()
    assert set(result) == set(shared) and not set(result) & bn
    for name in shared:
        median = np.median(np.stack([s[name].double().numpy() for s in states]), axis=0)
        assert torch.equal(result[name], torch.from_numpy(median).to(result[name].dtype))


@pytest.mark.parametrize("aggregation", ["median", "mean"])
def test_fedbn_with_median_trains_despite_a_site_sending_its_update_times_minus_100(
        aggregation: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (×100 alone barely hurts FedBN here: each site's own BatchNorm renormalises the scaled hidden layer)
    monkeypatch.setattr(FedBN, "aggregate_train", scaled_site(FedBN, "_sent", factor=-100.0))
    monkeypatch.setattr(FedBN, "configure_train", _remembering(FedBN.configure_train))
    scenario = with_defense(blobs_scenario("fedbn", rounds=6, sites=5, classes_per_client=4), aggregation=aggregation)
    accuracy = final_accuracy(run(scenario, tmp_path))
    if aggregation == "median":
        assert accuracy > 0.8, accuracy  # measured 0.969
    else:
        assert accuracy < 0.6, accuracy  # measured 0.228


def _remembering(configure_train: Callable[..., Any]) -> Callable[..., Any]:
    """``configure_train`` that keeps the sent arrays in ``_sent`` even without a norm bound (for the attack)."""
    def wrapper(strategy: Any, server_round: int, arrays: ArrayRecord, config: Any, grid: Any) -> Any:
        strategy._sent = arrays.to_torch_state_dict()
        return configure_train(strategy, server_round, arrays, config, grid)
    return wrapper


def test_fedsgd_with_median_steps_with_the_median_gradient() -> None:
    strategy = FedSGD(cohort(5), server_lr=0.5, aggregator=Aggregator(MedianParams()))
    strategy._current = {"weight": torch.tensor([[1.0, 2.0]]), "stat": torch.tensor([0.0])}
    gradients = [[1.0, 0.0], [2.0, 1.0], [3.0, -1.0], [1000.0, 1000.0], [0.0, 0.5]]
    replies = [reply_message(100 + pid, {GRADIENT_KEY: ArrayRecord({"weight": torch.tensor([g])}),
                                         "arrays": ArrayRecord({"stat": torch.tensor([float(pid)])})}, num_examples=10)
               for pid, g in enumerate(gradients)]
    arrays, _ = strategy.aggregate_train(1, replies)
    result = arrays.to_torch_state_dict()
    assert torch.allclose(result["weight"], torch.tensor([[1.0 - 0.5 * 2.0, 2.0 - 0.5 * 0.5]]))  # medians 2, 0.5
    assert result["stat"].item() == 2.0 and result["weight"].dtype == torch.float32


# --- scenario checks -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("strategy", "defense", "sites", "expected"), [
    ("fedavg", {"aggregation": "krum", "params": {"num_malicious_nodes": 1}}, 4,
     "defense.params.num_malicious_nodes: Krum (f = 1) needs n > 2f + 2 = 4 updates per round, but a round has 4"),
    ("scaffold", {"aggregation": "bulyan", "params": {"num_malicious_nodes": 1}}, 6,
     "defense.params.num_malicious_nodes: Bulyan (f = 1) needs n ≥ 4f + 3 = 7"),
    ("fedavg", {"aggregation": "multikrum", "params": {"num_malicious_nodes": 1, "num_nodes_to_select": 5}}, 5,
     "defense.params.num_nodes_to_select: 5 exceeds n − f = 4"),
    ("fedavg", {"aggregation": "trimmed_mean", "params": {"beta": 0.2}}, 4,
     "defense.params.beta: 0.2 trims floor(0.2·4) = 0 of 4 updates"),
    ("fedavg", {"aggregation": "krum", "params": {"beta": 0.2}}, 5,
     "defense.params.beta: unknown key 'beta' for defense.aggregation krum (allowed: num_malicious_nodes)"),
    ("fedavg", {"aggregation": "median", "params": {"beta": 0.2}}, 5,
     "defense.params: aggregation 'median' takes no params (got beta)"),
    ("krum", {"aggregation": "median"}, 5, "defense.aggregation: strategy 'krum' already aggregates with krum"),
    ("local", {"aggregation": "median"}, 5, "defense.aggregation: median is not possible with strategy 'local'"),
    ("pfedhn", {"norm_bound": 1.0}, 5,
     "defense.norm_bound: 1.0 is not possible with strategy 'pfedhn', which uses each site's upload on its own"),
])
def test_defense_problems_are_one_line_scenario_errors(strategy: str, defense: dict, sites: int,
                                                       expected: str) -> None:
    params = {"num_malicious_nodes": 1} if strategy == "krum" else {}
    with pytest.raises(ScenarioError) as error:
        with_defense(blobs_scenario(strategy, params, sites=sites, task=QUADRATIC), **defense)
    assert "\n" not in str(error.value) and expected in str(error.value), str(error.value)


@pytest.mark.parametrize("strategy", ["fedavg", "scaffold", "fedsgd", "fedbn", "fedper", "krum"])
def test_every_averaging_strategy_takes_a_defense(strategy: str) -> None:
    params = {"num_malicious_nodes": 1} if strategy == "krum" else {}
    defense = {"norm_bound": 2.0} if strategy == "krum" else {"aggregation": "bulyan",
                                                               "params": {"num_malicious_nodes": 1}, "norm_bound": 2.0}
    scenario = with_defense(blobs_scenario(strategy, params, sites=7), **defense)
    aggregator = Aggregator.from_scenario(scenario)
    assert aggregator.norm_bound == 2.0 and aggregator.rule == ("krum" if strategy == "krum" else "bulyan")
    assert Scenario.from_json(scenario.to_json()) == scenario
