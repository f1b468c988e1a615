"""Client-level central DP (DP-FedAvg, McMahan et al. 2018): update clipping, equal weights, noise on the
aggregate, the server's accountant, the budget stop, determinism, resume and the strategies it protects.

Federated runs use the quadratic toy task (a linear model without BatchNorm, 20 + 3k examples at site k),
in-process, a few rounds of 10 full-batch gradient steps each.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from privacy.accounting import make_accountant
from privacy.central import (
    CentralDPClient,
    CentralDPParams,
    CentralDPServer,
    clipped_upload,
)
from server.results import RunDirectory
from server.scenario import Scenario
from strategies import get_algorithm
from strategies.base import AGGREGATION_WEIGHT_KEY, Cohort, StrategyContext
from tests.helpers import (
    blobs_scenario,
    final_weight,
    interrupted_and_resumed,
    quadratic_scenario,
    reply_message,
    run,
    without_timing,
)
from tests.privacy.common import phase_records, run_summary, total_norm, with_privacy


def with_central(scenario: Scenario, **params: Any) -> Scenario:
    """``scenario`` with ``privacy: {mechanism: central, params: params}``, validated again."""
    return with_privacy(scenario, "central", **params)


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> RunDirectory:
    """FedAvg without privacy: 3 rounds."""
    return run(quadratic_scenario(tmp_path_factory.mktemp("plain"), "fedavg", rounds=3))


@pytest.fixture(scope="module")
def central_run(tmp_path_factory: pytest.TempPathFactory) -> RunDirectory:
    """FedAvg + central DP, S = 0.5, z = 0.8, all 3 sites every round (q = 1), 3 rounds."""
    scenario = quadratic_scenario(tmp_path_factory.mktemp("central"), "fedavg", rounds=3)
    return run(with_central(scenario, clip=0.5, noise_multiplier=0.8))


# --- clipping -----------------------------------------------------------------------------------------
def test_an_update_above_s_is_clipped_to_s_and_one_below_is_sent_unchanged() -> None:
    start = {"w": torch.ones(4), "steps": torch.tensor(3)}
    big = {"w": torch.ones(4) + torch.tensor([3.0, 0.0, 4.0, 0.0]), "steps": torch.tensor(9)}  # ‖Δ‖ = 5
    sent, before = clipped_upload(big, start, 2.0)
    assert before == pytest.approx(5.0)
    assert torch.allclose(sent["w"] - start["w"], torch.tensor([1.2, 0.0, 1.6, 0.0]))  # Δ · 2/5
    assert sent["steps"].item() == 9  # integer tensors travel as they are, outside the norm
    small = {"w": start["w"] + 0.1, "steps": torch.tensor(9)}
    unchanged, before = clipped_upload(small, start, 2.0)
    assert before == pytest.approx(0.2) and torch.equal(unchanged["w"], small["w"])


def test_an_update_upload_is_clipped_itself_and_a_non_finite_one_is_left_for_the_strategy() -> None:
    delta = {"w": torch.full((100,), 1.0)}  # ‖Δ‖ = 10
    clipped, before = clipped_upload(delta, None, 1.0)
    assert before == pytest.approx(10.0) and total_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    broken = {"w": torch.tensor([float("nan"), 1.0])}
    left, before = clipped_upload(broken, None, 1.0)
    assert math.isnan(before) and left["w"] is broken["w"]


def test_the_client_half_clips_against_the_weights_it_received_and_reports_the_norm(tmp_path: Path) -> None:
    site = CentralDPClient.for_scenario(with_central(quadratic_scenario(tmp_path, "fedavg"), clip=1.0,
                                                     noise_multiplier=1.0))
    received = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(3)})})
    records = site.protect({"arrays": ArrayRecord({"w": torch.tensor([0.0, 6.0, 8.0])})},
                           torch.nn.Linear(1, 1), received, RecordDict())
    metrics = site.spend(RecordDict())
    assert torch.allclose(records["arrays"].to_torch_state_dict()["w"], torch.tensor([0.0, 0.6, 0.8]))
    assert metrics == {"update-norm": pytest.approx(10.0), "clipped": 1.0}


# --- the server half --------------------------------------------------------------------------------------
def server(tmp_path: Path, strategy: str = "fedavg", *, clients: int = 4, fraction: float = 1.0,
           rounds: int = 10, **params: Any) -> CentralDPServer:
    scenario = quadratic_scenario(tmp_path, strategy, rounds=rounds, clients=clients, fraction_train=fraction)
    return CentralDPServer.from_scenario(with_central(scenario, **params))


def weight_replies(updates: list[torch.Tensor], start: torch.Tensor) -> list:
    return [reply_message(node, {"arrays": ArrayRecord({"w": start + update})}, num_examples=10 * (node + 1))
            for node, update in enumerate(updates)]


def test_the_server_reclips_weighs_every_site_equally_and_noises_the_mean_with_z_s_over_n(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    half = server(tmp_path, clip=1.0, noise_multiplier=2.0)
    start = torch.zeros(200_000)
    updates = [torch.full((200_000,), 0.001), torch.full((200_000,), 1.0)]  # norms 0.447 and 447 (unclipped)
    replies = weight_replies(updates, start)
    cohort = Cohort({0: 0, 1: 1}, seed=0)
    with caplog.at_level(logging.WARNING, logger="medfed"):
        half.before_aggregate(replies, ArrayRecord({"w": start}), 1, cohort)
    assert "arrived unclipped; the server clipped it" in caplog.text
    sent = [reply.content["arrays"].to_torch_state_dict()["w"] for reply in replies]
    assert total_norm({"w": sent[0]}) == pytest.approx(0.4472, rel=1e-3) and total_norm({"w": sent[1]}) == pytest.approx(1.0)
    assert [reply.content["metrics"][AGGREGATION_WEIGHT_KEY] for reply in replies] == [1.0, 1.0]
    assert [reply.content["metrics"]["num-examples"] for reply in replies] == [10, 20]  # still reported
    mean = ArrayRecord({"w": torch.zeros(200_000), "count": torch.tensor(5)})
    noisy = half.after_aggregate(mean, 1).to_torch_state_dict()
    assert noisy["w"].std().item() == pytest.approx(2.0 * 1.0 / 2, rel=0.01)  # z S / n
    assert noisy["count"].item() == 5 and half.rounds_spent == 1


def test_fedavg_aggregates_with_the_equal_weights(tmp_path: Path) -> None:
    scenario = quadratic_scenario(tmp_path, "fedavg")
    algorithm = get_algorithm("fedavg")
    cohort = Cohort({0: 0, 1: 1}, seed=0)
    strategy = algorithm.build_strategy(StrategyContext(scenario, algorithm.Params(), cohort, torch.nn.Linear(1, 1)))
    replies = weight_replies([torch.zeros(2), torch.full((2,), 0.3)], torch.zeros(2))
    weighted, _ = strategy.aggregate_train(1, replies)
    assert torch.allclose(weighted.to_torch_state_dict()["w"], torch.full((2,), 0.2))  # n = 10 and 20
    for reply in replies:
        reply.content["metrics"][AGGREGATION_WEIGHT_KEY] = 1.0
    equal, metrics = strategy.aggregate_train(1, replies)
    assert torch.allclose(equal.to_torch_state_dict()["w"], torch.full((2,), 0.15))
    assert AGGREGATION_WEIGHT_KEY not in metrics and metrics["num-examples"] == 30


def test_update_uploads_get_their_own_noise_per_site_and_nothing_on_the_aggregate(tmp_path: Path) -> None:
    half = server(tmp_path, "pfedhn", clip=1.0, noise_multiplier=0.5)
    replies = [reply_message(node, {"delta": ArrayRecord({"w": torch.zeros(100_000)})}, num_examples=5)
               for node in (7, 9)]
    half.before_aggregate(replies, ArrayRecord({}), 3, Cohort({7: 0, 9: 1}, seed=0))
    noise = [reply.content["delta"].to_torch_state_dict()["w"] for reply in replies]
    assert all(n.std().item() == pytest.approx(0.5, rel=0.02) for n in noise)  # z S on each Δw_k
    assert not torch.equal(noise[0], noise[1])
    mean = ArrayRecord({"w": torch.ones(3)})
    assert half.after_aggregate(mean, 3) is mean


def test_epsilon_after_t_rounds_equals_a_fresh_opacus_accountant_fed_the_same_steps(tmp_path: Path) -> None:
    from opacus.accountants import RDPAccountant

    half = server(tmp_path, clients=10, fraction=0.3, clip=1.0, noise_multiplier=1.1)
    assert half.sample_rate == pytest.approx(0.3)
    live = RDPAccountant()
    for _ in range(7):
        live.step(noise_multiplier=1.1, sample_rate=0.3)
    assert half.epsilon_after(7) == pytest.approx(live.get_epsilon(delta=1e-5), rel=1e-9)
    prv = server(tmp_path, clients=10, fraction=0.3, clip=1.0, noise_multiplier=1.1, accountant="prv")
    assert prv.epsilon_after(7) == pytest.approx(make_accountant([(1.1, 0.3, 7)], "prv").get_epsilon(1e-5), rel=1e-6)
    assert prv.epsilon_after(7) < half.epsilon_after(7)  # PRV is the tighter bound


def test_target_epsilon_calibrates_z_for_the_planned_rounds(tmp_path: Path) -> None:
    half = server(tmp_path, clients=20, fraction=0.5, rounds=30, clip=1.0, target_epsilon=4.0)
    assert 3.9 <= half.epsilon_after(30) <= 4.0 and half.epsilon_after(31) > 4.0
    assert half.report()["noise_multiplier"] == half.noise_multiplier > 0


def test_params_need_noise_or_a_budget() -> None:
    with pytest.raises(ValueError, match="central needs noise_multiplier or target_epsilon"):
        CentralDPParams(clip=1.0)


# --- federated runs ---------------------------------------------------------------------------------------
def test_every_record_reports_the_epsilon_spent_so_far_and_the_summary_the_final_budget(
        central_run: RunDirectory, tmp_path: Path) -> None:
    half = server(tmp_path, clients=3, rounds=3, clip=0.5, noise_multiplier=0.8)
    assert [r["epsilon"] for r in phase_records(central_run, "train")] == [
        pytest.approx(half.epsilon_after(t), rel=1e-12) for t in (1, 2, 3)]
    assert all(r["delta"] == 1e-5 and r["accountant"] == "rdp" for r in central_run.read_metrics())
    privacy = run_summary(central_run)["privacy"]
    assert privacy["mechanism"] == "central" and privacy["accountant"] == "rdp" and privacy["delta"] == 1e-5
    assert privacy["epsilon"] == pytest.approx(half.epsilon_after(3)) and privacy["rounds_spent"] == 3
    for record in phase_records(central_run, "train"):
        assert all(m[AGGREGATION_WEIGHT_KEY] == 1.0 and m["update-norm"] > 0 for m in record["clients"].values())


def test_clip_and_no_noise_reproduce_fedavg_with_equal_sites(tmp_path: Path) -> None:
    plain = run(blobs_scenario("fedbn", rounds=2), tmp_path / "plain")  # 64 examples at every site
    private = run(with_central(blobs_scenario("fedbn", rounds=2), clip=1e6, noise_multiplier=0.0), tmp_path / "dp")
    plain_arrays, private_arrays = plain.load_checkpoint().arrays, private.load_checkpoint().arrays
    assert all(torch.allclose(private_arrays[name], plain_arrays[name], atol=1e-6, rtol=0) for name in plain_arrays)
    assert run_summary(private)["privacy"]["epsilon"] is None  # ε = ∞ (no noise), written as null


def test_large_noise_measurably_degrades_the_model(plain_run: RunDirectory, tmp_path: Path) -> None:
    noisy = run(with_central(quadratic_scenario(tmp_path, "fedavg", rounds=3), clip=1.0, noise_multiplier=20.0))
    final_loss = [phase_records(r, "central")[-1]["aggregate"]["loss"] for r in (noisy, plain_run)]
    assert final_loss[0] > 2 * final_loss[1]


def test_the_same_seed_gives_the_same_noise(tmp_path: Path) -> None:
    one, two = (run(with_central(quadratic_scenario(tmp_path / name, "fedavg", rounds=2), clip=0.5,
                                 noise_multiplier=1.0)) for name in ("one", "two"))
    assert without_timing(one.read_metrics()) == without_timing(two.read_metrics())
    assert torch.equal(final_weight(one), final_weight(two))


def test_a_budget_with_a_given_z_stops_the_run_before_it_is_overspent(tmp_path: Path) -> None:
    scenario = quadratic_scenario(tmp_path, "fedavg", rounds=6)
    half = server(tmp_path, clients=3, rounds=6, clip=0.5, noise_multiplier=1.0)
    target = (half.epsilon_after(3) + half.epsilon_after(4)) / 2  # room for 3 rounds, not 4
    run_dir = run(with_central(scenario, clip=0.5, noise_multiplier=1.0, target_epsilon=target))
    assert run_summary(run_dir)["rounds_completed"] == 3
    spent = run_summary(run_dir)["privacy"]["epsilon"]
    assert spent == pytest.approx(half.epsilon_after(3)) and spent <= target


def test_resume_continues_the_accounting(tmp_path: Path) -> None:
    scenario = with_central(quadratic_scenario(tmp_path, "fedavg", rounds=4), clip=0.5, noise_multiplier=1.0)
    resumed, uninterrupted = interrupted_and_resumed(scenario, after=2)
    assert without_timing(resumed.read_metrics()) == without_timing(uninterrupted.read_metrics())
    assert run_summary(resumed)["privacy"]["epsilon"] == run_summary(uninterrupted)["privacy"]["epsilon"]


def test_pfedhn_runs_with_noisy_updates_and_its_sites_still_learn(tmp_path: Path) -> None:
    scenario = quadratic_scenario(tmp_path, "pfedhn", rounds=3)
    run_dir = run(with_central(scenario, clip=5.0, noise_multiplier=0.01))
    losses = [r["aggregate"]["loss"] for r in phase_records(run_dir, "train")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert run_summary(run_dir)["privacy"]["epsilon"] > 0


# --- scenarios ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy, params, message", [
    ("scaffold", {}, "control-variate update"),
    ("fedsgd", {}, "use strategy fedavg"),
    ("krum", {}, "robust rule"),
    ("local", {}, "nothing is aggregated"),
])
def test_strategies_it_cannot_protect_are_refused_in_one_line(tmp_path: Path, strategy: str, params: dict,
                                                              message: str) -> None:
    with pytest.raises(Exception, match=message) as error:
        with_central(quadratic_scenario(tmp_path, strategy, params=params), clip=1.0, noise_multiplier=1.0)
    assert "\n" not in str(error.value).strip().splitlines()[-1]


def test_batchnorm_statistics_are_refused_unless_fedbn_keeps_them_local() -> None:
    assert with_central(blobs_scenario("fedbn"), clip=1.0, noise_multiplier=1.0).privacy.mechanism == "central"
    with pytest.raises(Exception, match="privacy.mechanism central: the upload holds floating-point tensors"):
        with_central(blobs_scenario("fedavg"), clip=1.0, noise_multiplier=1.0)
    with pytest.raises(Exception, match="buffers .* travel beside Δw unprotected"):
        with_central(blobs_scenario("pfedhn"), clip=1.0, noise_multiplier=1.0)
