"""NbAFL in the federation: clipped and perturbed uploads, the server's calibration and broadcast noise,
exposure counts, the run's ε, determinism and resume.

Federated runs use the quadratic toy task (a linear model of 5 weights without BatchNorm, 20 + 3k examples at
site k, so m = 20), in-process, a few rounds of 10 full-batch gradient steps each.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from client.state import from_plain
from privacy import nbafl
from privacy.nbafl import (
    EXPOSURES_KEY,
    SIGMA_UP_KEY,
    ExposureLimitReached,
    NbAFLClient,
    NbAFLParams,
    NbAFLServer,
    downlink_sigma,
    downlink_sigma_sampled,
    exposures_so_far,
)
from server.results import RunDirectory
from server.scenario import Scenario
from strategies.base import batchnorm_tensor_names
from strategies.fedper import template_model
from tests.helpers import (
    blobs_scenario,
    final_weight,
    interrupted_and_resumed,
    quadratic_scenario,
    run,
    without_timing,
)
from tests.privacy.common import (
    final_central_loss,
    phase_records,
    run_summary,
    total_norm,
    with_privacy,
)

C_1E5 = 4.844805  # the Gaussian constant at δ = 1e-5: sqrt(2 ln(1.25e5)) = sqrt(23.472139)
SIZES = {0: 20, 1: 23, 2: 26}  # n_train of the quadratic task's three sites


def with_nbafl(scenario: Scenario, **params: Any) -> Scenario:
    """``scenario`` with ``privacy: {mechanism: nbafl, params: params}``, validated again."""
    return with_privacy(scenario, "nbafl", **params)


def node_exposures(run_dir: RunDirectory, pid: str) -> int:
    """Site ``pid``'s upload count as exported into the last checkpoint."""
    return exposures_so_far(from_plain(run_dir.load_checkpoint().extra["node_states"][pid]))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> RunDirectory:
    """FedAvg without privacy: 3 rounds."""
    return run(quadratic_scenario(tmp_path_factory.mktemp("plain"), "fedavg", rounds=3))


@pytest.fixture(scope="module")
def nbafl_run(tmp_path_factory: pytest.TempPathFactory) -> RunDirectory:
    """FedAvg + NbAFL, C = 2, ε = 30, L = T = 3: σ_U = c L (2C/m) / ε = 4.844805 · 3 · 0.2 / 30 = 0.0968961."""
    return run(with_nbafl(quadratic_scenario(tmp_path_factory.mktemp("nbafl"), "fedavg", rounds=3), clip=2.0,
                          epsilon=30.0))


# --- the client half --------------------------------------------------------------------------------
def client(exposures: int = 2, train_size: int = 20, seed: int = 0) -> NbAFLClient:
    """NbAFL's client half with C = 1, ε = 10, δ = 1e-5: it needs σ_U ≥ c L (2/|D|) / 10."""
    return NbAFLClient(NbAFLParams(clip=1.0, epsilon=10.0), exposures=exposures, train_size=train_size,
                       generator=torch.Generator().manual_seed(seed))


def upload(model: torch.nn.Module) -> dict[str, Any]:
    return {"arrays": ArrayRecord(model.state_dict())}


def received(config: dict[str, Any]) -> RecordDict:
    """A train message's content as the site received it (only its config matters to NbAFL)."""
    return RecordDict({"config": ConfigRecord(config)})


def test_the_upload_is_clipped_then_perturbed_with_the_configs_sigma_and_counted() -> None:
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(2.0)  # ‖w‖ = sqrt(6·4 + 2 b²) > C = 1
    state = RecordDict()
    site = client()
    records = site.protect(upload(model), model, received({SIGMA_UP_KEY: 0.5}), state)
    assert exposures_so_far(state) == 0  # counted only once the reply is built
    metrics = site.spend(state)
    clipped = nbafl.clip_weights(dict(model.state_dict()), 1.0)
    expected = nbafl.add_gaussian_noise(clipped, 0.5, torch.Generator().manual_seed(0))
    sent = records["arrays"].to_torch_state_dict()
    assert total_norm(clipped) == pytest.approx(1.0) and not torch.equal(sent["weight"], clipped["weight"])
    assert all(torch.equal(sent[name], expected[name]) for name in expected)
    assert metrics == {"exposures": 1, "sigma-up": 0.5} and exposures_so_far(state) == 1


def test_integer_tensors_travel_unchanged_and_outside_the_norm() -> None:
    model = torch.nn.Linear(3, 1)
    tensors = {**model.state_dict(), "steps": torch.tensor(10**6)}  # a huge integer would dominate the norm
    records = client().protect({"arrays": ArrayRecord(tensors)}, model, received({SIGMA_UP_KEY: 0.5}),
                               RecordDict())
    sent = records["arrays"].to_torch_state_dict()
    assert sent["steps"].item() == 10**6 and sent["steps"].dtype == torch.int64
    expected = nbafl.add_gaussian_noise(nbafl.clip_weights(dict(model.state_dict()), 1.0), 0.5,
                                        torch.Generator().manual_seed(0))
    assert torch.equal(sent["weight"], expected["weight"]) and torch.equal(sent["bias"], expected["bias"])


def test_a_site_refuses_after_l_uploads() -> None:
    model, state = torch.nn.Linear(2, 1), RecordDict()
    site = client(exposures=2)
    for _ in range(2):
        site.admit(state)
        site.protect(upload(model), model, received({SIGMA_UP_KEY: 0.5}), state)
        site.spend(state)
    with pytest.raises(ExposureLimitReached, match=r"uploaded its weights 2 times, the L = 2 exposures"):
        site.admit(state)


@pytest.mark.parametrize("config, records, message", [
    ({}, {}, "the train message has no 'nbafl-sigma-up'"),
    # this site alone needs c L (2C/|D|)/ε = 4.844805 · 2 · 0.1 / 10 = 0.0969
    ({SIGMA_UP_KEY: 0.09}, {}, r"the server's sigma_U 0.09 is below 0.0969, what this site's 20 examples need"),
    ({SIGMA_UP_KEY: 0.5}, {"variate": ArrayRecord({"c": torch.zeros(2)})},
     r"the reply also sends \['variate'\], which NbAFL does not perturb"),
])
def test_uploads_nbafl_cannot_protect_are_refused(config: dict, records: dict, message: str) -> None:
    model, state = torch.nn.Linear(2, 1), RecordDict()
    with pytest.raises(ValueError, match=message):
        client().protect({**upload(model), **records}, model, received(config), state)
    assert EXPOSURES_KEY not in state  # nothing sent, nothing counted


def test_batchnorm_running_statistics_are_refused() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with pytest.raises(ValueError, match=r"not trained parameters \(1.running_mean, 1.running_var\)"):
        client().protect(upload(model), model, received({SIGMA_UP_KEY: 0.5}), RecordDict())


def test_the_client_half_imports_without_opacus() -> None:
    code = "import sys, privacy.nbafl; assert 'opacus' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


# --- the server half -------------------------------------------------------------------------------
def server(tmp_path: Path, *, rounds: int, exposures: int, clients: int = 4, fraction: float = 1.0) -> NbAFLServer:
    scenario = with_nbafl(quadratic_scenario(tmp_path, "fedavg", rounds=rounds, clients=clients,
                                             fraction_train=fraction), clip=1.0, epsilon=1.0, exposures=exposures)
    return NbAFLServer.from_discovery(scenario, {pid: {"n_train": 20 + 3 * pid} for pid in range(clients)})


def test_broadcast_noise_is_added_when_t_exceeds_l_sqrt_n(tmp_path: Path) -> None:
    # T = 5 > L√N = 2·2: σ_D = 2cC sqrt(T² − L²N) / (m N ε) = 2 · 4.844805 · sqrt(25 − 16) / (20 · 4) = 0.3633604
    half = server(tmp_path, rounds=5, exposures=2)
    assert half.calibration.sigma_down == pytest.approx(0.3633604, abs=1e-6)
    arrays = ArrayRecord({"w": torch.zeros(100_000), "count": torch.tensor(7)})
    noisy = half.after_aggregate(arrays, 3).to_torch_state_dict()
    assert noisy["w"].std().item() == pytest.approx(0.3633604, rel=0.02) and noisy["count"].item() == 7
    again, other = half.after_aggregate(arrays, 3), half.after_aggregate(arrays, 4)
    assert torch.equal(again.to_torch_state_dict()["w"], noisy["w"])  # stream (seed, "nbafl-downlink", round)
    assert not torch.equal(other.to_torch_state_dict()["w"], noisy["w"])


def test_no_broadcast_noise_when_t_is_at_most_l_sqrt_n(tmp_path: Path) -> None:
    half = server(tmp_path, rounds=4, exposures=2)  # T = 4 = L√N: the uplink noise covers the broadcasts
    arrays = ArrayRecord({"w": torch.ones(10)})
    assert half.calibration.sigma_down == 0.0 and half.after_aggregate(arrays, 1) is arrays


def test_k_of_n_sampling_is_calibrated_by_theorem_3(tmp_path: Path) -> None:
    half = server(tmp_path, rounds=20, exposures=2, fraction=0.5)  # K = 2 of N = 4
    assert half.report()["sampled"] == 2 and half.calibration.sampled == 2
    theorem_3 = downlink_sigma_sampled(1.0, 20, 2, 4, 2, 20, 1.0, 1e-5)
    assert half.calibration.sigma_down == theorem_3 > 0 and theorem_3 != downlink_sigma(1.0, 20, 2, 4, 20, 1.0, 1e-5)


def test_sites_without_their_size_cannot_be_calibrated(tmp_path: Path) -> None:
    scenario = with_nbafl(quadratic_scenario(tmp_path, "fedavg"), clip=1.0, epsilon=1.0)
    with pytest.raises(ValueError, match=r"statistics of site\(s\) \[1\] have no 'n_train'"):
        NbAFLServer.from_discovery(scenario, {0: {"n_train": 20}, 1: {}, 2: {"n_train": 26}})


# --- federated runs ------------------------------------------------------------------------------------
def test_sigma_up_sent_to_every_site_is_the_hand_calibration_from_the_smallest_site(nbafl_run: RunDirectory) -> None:
    sent = [m["sigma-up"] for record in phase_records(nbafl_run) for m in record["clients"].values()]
    assert len(sent) == 3 * len(SIZES) and all(sigma == pytest.approx(0.0968961, abs=1e-7) for sigma in sent)
    privacy = run_summary(nbafl_run)["privacy"]
    assert privacy["min_samples"] == min(SIZES.values()) and privacy["sigma_up"] == pytest.approx(0.0968961, abs=1e-7)


def test_every_record_reports_the_formula_epsilon_and_the_summary_both_epsilons(nbafl_run: RunDirectory) -> None:
    records = nbafl_run.read_metrics()
    assert {r["phase"] for r in records} == {"train", "evaluate", "central"}
    assert {r["epsilon"] for r in records} == {30.0}
    assert {(r["delta"], r["accountant"]) for r in records} == {(1e-5, "nbafl-formula")}
    assert [r["clients"]["1"]["exposures"] for r in phase_records(nbafl_run)] == [1, 2, 3]
    privacy = run_summary(nbafl_run)["privacy"]
    assert privacy["mechanism"] == "nbafl" and privacy["epsilon"] == 30.0 and privacy["delta"] == 1e-5
    assert privacy["exposures"] == 3 and privacy["sigma_down"] == 0.0  # L = T by default; T = 3 ≤ L√N
    assert 0 < privacy["epsilon_rdp_uplink"] < 30.0 and 0 < privacy["epsilon_rdp_broadcast"] < 30.0
    assert not privacy["epsilon_formula_proven"]  # ε/L = 10 ≥ 1: the classical constant is no proof there


def test_the_same_seed_gives_the_same_noise(tmp_path: Path) -> None:
    one, two = (run(with_nbafl(quadratic_scenario(tmp_path / name, "fedavg", rounds=3), clip=2.0, epsilon=30.0))
                for name in ("one", "two"))  # equally long paths: the scenario's output.dir travels in the messages
    assert without_timing(one.read_metrics()) == without_timing(two.read_metrics())
    assert torch.equal(final_weight(one), final_weight(two))


def test_uploads_are_clipped_to_c_before_the_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    norms: list[tuple[float, float]] = []

    def recording_clip(tensors: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
        clipped = original(tensors, clip)
        norms.append((total_norm(tensors), total_norm(clipped)))
        return clipped

    original = nbafl.clip_weights
    monkeypatch.setattr(nbafl, "clip_weights", recording_clip)
    run_dir = run(with_nbafl(quadratic_scenario(tmp_path, "fedavg", rounds=2), clip=0.5, epsilon=1e12))
    assert len(norms) == 2 * len(SIZES)
    assert all(before > 0.5 and after == pytest.approx(0.5, rel=1e-6) for before, after in norms)
    assert final_weight(run_dir).norm().item() <= 0.5 + 1e-5  # an average of clipped uploads (σ ≈ 1e-12)


def test_huge_epsilon_and_clip_reproduce_the_non_private_run(plain_run: RunDirectory, tmp_path: Path) -> None:
    private = run(with_nbafl(quadratic_scenario(tmp_path, "fedavg", rounds=3), clip=1e6, epsilon=1e15))
    assert run_summary(private)["privacy"]["sigma_up"] < 1e-8
    plain_weight = final_weight(plain_run)
    assert plain_weight.norm() > 1.0 and torch.allclose(final_weight(private), plain_weight, atol=1e-6, rtol=0)


def test_small_epsilon_measurably_degrades_the_final_loss(plain_run: RunDirectory, tmp_path: Path) -> None:
    noisy = run(with_nbafl(quadratic_scenario(tmp_path, "fedavg", rounds=3), clip=10.0, epsilon=5.0))
    assert final_central_loss(noisy) > 2 * final_central_loss(plain_run)


def test_fedbn_clips_what_it_sends_and_nothing_of_batchnorm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clipped_names: list[set[str]] = []

    def recording_clip(tensors: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
        clipped_names.append(set(tensors))
        return original(tensors, clip)

    original = nbafl.clip_weights
    monkeypatch.setattr(nbafl, "clip_weights", recording_clip)
    scenario = with_nbafl(blobs_scenario("fedbn"), clip=1.0, epsilon=1e9)
    run(scenario, tmp_path)
    model = template_model(scenario)
    shared = set(model.state_dict()) - batchnorm_tensor_names(model)
    assert shared and clipped_names == [shared] * 3  # one upload per site, BatchNorm's γ, β and statistics stay


def test_a_site_asked_beyond_l_exposures_refuses_and_the_run_ends_cleanly(tmp_path: Path) -> None:
    run_dir = run(with_nbafl(quadratic_scenario(tmp_path, "fedavg", rounds=3), clip=2.0, epsilon=30.0, exposures=2))
    last = phase_records(run_dir)[-1]
    assert last["round"] == 3 and last["aggregate"] == {}
    for error in (m["error"] for m in last["clients"].values()):
        assert error.startswith("ExposureLimitReached: NbAFL: this site has uploaded its weights 2 times")
        assert "\n" not in error
    assert run_summary(run_dir)["rounds_completed"] == 2 and node_exposures(run_dir, "0") == 2


def test_resume_restores_the_exposure_counts(tmp_path: Path) -> None:
    # L = 3 of T = 4 rounds: only counts carried over the interruption after round 2 make round 4 refuse.
    scenario = with_nbafl(quadratic_scenario(tmp_path, "fedavg", rounds=4), clip=2.0, epsilon=30.0, exposures=3)
    resumed, uninterrupted = interrupted_and_resumed(scenario, after=2)
    assert without_timing(resumed.read_metrics()) == without_timing(uninterrupted.read_metrics())
    assert all("error" in m for m in phase_records(resumed)[-1]["clients"].values())
    assert node_exposures(resumed, "2") == 3 and run_summary(resumed)["rounds_completed"] == 3


# --- scenarios ------------------------------------------------------------------------------------------
def test_fedbn_may_keep_batchnorm_but_fedavg_may_not_upload_it() -> None:
    assert with_nbafl(blobs_scenario("fedbn"), clip=1.0, epsilon=1.0).privacy.params["exposures"] is None
    with pytest.raises(Exception, match="not trained parameters .*a strategy that keeps BatchNorm local"):
        with_nbafl(blobs_scenario("fedavg"), clip=1.0, epsilon=1.0)
