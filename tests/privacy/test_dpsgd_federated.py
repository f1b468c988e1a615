"""DP-SGD in the federation: the local loop's private steps, per-client ε, budget stops and resume.

Federated runs use the quadratic toy task (a linear model without BatchNorm, 20 + 3k examples at site k),
in-process, a few rounds each.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from client.state import from_plain
from client.trainer import fit
from privacy.accounting import epsilon
from privacy.dpsgd import DPSGDClient, DPSGDParams, load_history
from server.results import RunDirectory
from server.scenario import LocalSection, Scenario
from strategies.base import ClientRule, StrategyParams
from tests.helpers import final_weight, interrupted_and_resumed, quadratic_scenario, run, without_timing
from tests.privacy.common import final_central_loss, phase_records, with_privacy

DELTA = 1e-5
MINI_BATCHES = {"epochs": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.1}  # q = 1/3, 1/3, 1/4 at the 3 sites
NO_NOISE_NO_CLIPPING = {"noise_multiplier": 0.0, "max_grad_norm": 1e6, "poisson_sampling": False}


def with_dpsgd(scenario: Scenario, **params: Any) -> Scenario:
    """``scenario`` with ``privacy: {mechanism: dpsgd, params: params}``, validated again."""
    return with_privacy(scenario, "dpsgd", **params)


def node_history(run_dir: RunDirectory, pid: str) -> list[tuple[float, float, int]]:
    """Site ``pid``'s accountant history as exported into the last checkpoint."""
    return load_history(from_plain(run_dir.load_checkpoint().extra["node_states"][pid]))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> RunDirectory:
    """FedAvg without privacy: 3 rounds of 10 full-batch gradient steps."""
    return run(quadratic_scenario(tmp_path_factory.mktemp("plain"), "fedavg", rounds=3))


# --- the local loop ------------------------------------------------------------------------------------
class RecordingTask:
    """Half the mean squared error of a linear model; remembers every loss it computed."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        value = 0.5 * ((model(x) - y) ** 2).mean()
        self.losses.append(value.item())
        return value


class CountingRule(ClientRule):
    """Plain local training that counts the gradient edits it is asked for."""

    def __init__(self) -> None:
        super().__init__(StrategyParams())
        self.edits = 0

    def after_backward(self, model: torch.nn.Module) -> None:
        self.edits += 1


def test_empty_poisson_batches_take_counted_noise_steps_and_the_rule_edits_after_the_noise() -> None:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(100, 4, generator=g), torch.randn(100, 1, generator=g))
    local = LocalSection(epochs=2, max_steps=60, batch_size=2, optimizer="sgd", lr=0.05)  # q = 1/50: 13% empty
    task, rule = RecordingTask(), CountingRule()
    private = DPSGDClient(DPSGDParams(noise_multiplier=1.0), generator=torch.Generator().manual_seed(1),
                          epochs=local.epochs, max_steps=local.max_steps, after_noise=rule.after_backward)
    torch.manual_seed(0)
    result = fit(torch.nn.Linear(4, 1), task, data, local, rule, torch.Generator().manual_seed(2), private)
    private.close()
    empty_steps = result.steps - len(task.losses)
    assert result.steps == 60 and empty_steps > 0  # max_steps counts the noise-only steps
    assert result.loss == pytest.approx(sum(task.losses) / len(task.losses))  # empty batches have no loss
    assert rule.edits == 60  # once per private step, by the mechanism; never by fit on the raw gradient
    assert private.history() == [(1.0, 0.02, 60)]


# --- federated runs ------------------------------------------------------------------------------------
def test_each_client_reports_an_epsilon_growing_every_round_that_its_node_state_reproduces(tmp_path: Path) -> None:
    scenario = with_dpsgd(quadratic_scenario(tmp_path, "fedavg", rounds=3, local=MINI_BATCHES), noise_multiplier=1.0)
    run_dir = run(scenario)
    records = phase_records(run_dir)
    assert [r["round"] for r in records] == [1, 2, 3]
    for pid in ("0", "1", "2"):
        spent = [r["clients"][pid]["epsilon"] for r in records]
        assert 0.0 < spent[0] < spent[1] < spent[2], spent
        assert all(r["clients"][pid]["noise-multiplier"] == 1.0 for r in records)
        history = node_history(run_dir, pid)
        assert spent[-1] == pytest.approx(epsilon(history, DELTA), rel=1e-12)
        assert sum(steps for _, _, steps in history) == sum(r["clients"][pid]["steps"] for r in records)
    assert records[-1]["clients"]["0"]["epsilon"] > records[-1]["clients"]["2"]["epsilon"]  # q 1/3 costs more than 1/4
    for record in records:  # the run's ε is the weakest site's, in the record and in the aggregate (never a mean)
        worst = max(m["epsilon"] for m in record["clients"].values())
        assert record["epsilon"] == record["aggregate"]["epsilon"] == worst
    assert all(r["delta"] == DELTA and r["accountant"] == "rdp" for r in run_dir.read_metrics())
    privacy = json.loads((run_dir.path / "summary.json").read_text())["privacy"]
    assert privacy["mechanism"] == "dpsgd" and privacy["delta"] == DELTA
    assert privacy["epsilon_per_client"] == {pid: records[-1]["clients"][pid]["epsilon"] for pid in ("0", "1", "2")}
    assert privacy["epsilon"] == records[-1]["epsilon"]


@pytest.mark.parametrize("strategy, params", [("fedavg", {}), ("fedavg", {"proximal_mu": 0.5}),
                                              ("scaffold", {"variate": "II"}), ("fedsgd", {})])
def test_no_noise_and_no_clipping_reproduces_the_non_private_run(strategy: str, params: dict, tmp_path: Path) -> None:
    # Full batches: q = 1 and Opacus's mean over int(q n) examples is the plain mean. FedProx's proximal gradient,
    # SCAFFOLD's correction and FedSGD's gradient capture reach the private gradient only through the mechanism's
    # after-noise hook.
    plain = quadratic_scenario(tmp_path / "plain", strategy, rounds=3, params=params)
    private = with_dpsgd(quadratic_scenario(tmp_path / "dp", strategy, rounds=3, params=params), **NO_NOISE_NO_CLIPPING)
    plain_weight, private_run = final_weight(run(plain)), run(private)
    assert not torch.allclose(plain_weight, torch.zeros_like(plain_weight), atol=1e-3)
    assert torch.allclose(final_weight(private_run), plain_weight, atol=1e-5)
    assert phase_records(private_run)[-1]["clients"]["0"]["epsilon"] is None  # ε = ∞ is written as null


def test_large_noise_measurably_degrades_the_final_loss(plain_run: RunDirectory, tmp_path: Path) -> None:
    noisy = with_dpsgd(quadratic_scenario(tmp_path, "fedavg", rounds=3), noise_multiplier=20.0, max_grad_norm=1e6,
                       poisson_sampling=False)
    assert final_central_loss(run(noisy)) > 2 * final_central_loss(plain_run)


def test_a_spent_budget_stops_the_client_and_the_error_is_recorded(tmp_path: Path) -> None:
    # σ = 1, ε after 1 round: 5.2 at sites 0 and 1 (q = 1/3), 4.9 at site 2 (q = 1/4); after 2 rounds: 6.8 and 6.3.
    scenario = with_dpsgd(quadratic_scenario(tmp_path, "fedavg", rounds=2, local=MINI_BATCHES),
                          noise_multiplier=1.0, target_epsilon=6.5)
    run_dir = run(scenario)
    first, second = (r["clients"] for r in phase_records(run_dir))
    assert all("error" not in first[pid] for pid in first)
    for pid in ("0", "1"):
        error = second[pid]["error"]
        assert error.startswith("PrivacyBudgetExhausted: ") and "\n" not in error
        assert f"ε = {first[pid]['epsilon']:.4g} so far" in error and "> target_epsilon 6.5 " in error
        assert epsilon(node_history(run_dir, pid), DELTA) == pytest.approx(first[pid]["epsilon"])  # nothing spent
    assert first["2"]["epsilon"] < second["2"]["epsilon"] <= 6.5


def test_resume_restores_the_accountant_history_so_epsilon_continues(tmp_path: Path) -> None:
    scenario = with_dpsgd(quadratic_scenario(tmp_path, "fedavg", rounds=3, local=MINI_BATCHES), noise_multiplier=1.0)
    resumed, uninterrupted = interrupted_and_resumed(scenario, after=2)
    assert without_timing(resumed.read_metrics()) == without_timing(uninterrupted.read_metrics())
    spent = [r["clients"]["0"]["epsilon"] for r in phase_records(resumed)]
    assert spent[0] < spent[1] < spent[2] and epsilon(node_history(resumed, "0"), DELTA) == pytest.approx(spent[2])


def test_stop_run_ends_the_run_cleanly_at_the_first_spent_budget(tmp_path: Path) -> None:
    scenario = with_dpsgd(quadratic_scenario(tmp_path, "fedavg", rounds=3, local=MINI_BATCHES),
                          noise_multiplier=1.0, target_epsilon=6.5, on_exhausted="stop-run")
    run_dir = run(scenario)
    first, second = phase_records(run_dir)  # round 2's training is not used; its record says who ran out
    assert second["round"] == 2 and second["aggregate"] == {}
    assert second["clients"]["0"]["error"].startswith("PrivacyBudgetExhausted:") and "error" not in second["clients"]["2"]
    assert run_dir.load_checkpoint().round == 1
    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert summary["rounds_completed"] == 1 and summary["privacy"]["epsilon"] <= 6.5


def test_when_every_site_has_spent_its_budget_the_run_ends_without_an_error(tmp_path: Path) -> None:
    scenario = with_dpsgd(quadratic_scenario(tmp_path, "fedavg", rounds=4, local=MINI_BATCHES),
                          noise_multiplier=1.0, target_epsilon=6.0)  # every site spends it after one round
    run_dir = run(scenario)
    records = phase_records(run_dir)
    assert [r["round"] for r in records] == [1, 2]
    assert all(m["error"].startswith("PrivacyBudgetExhausted:") for m in records[1]["clients"].values())
    assert json.loads((run_dir.path / "summary.json").read_text())["rounds_completed"] == 1
