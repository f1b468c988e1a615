"""SCAFFOLD: drift correction reaches the optimum FedAvg misses; c and c_k are kept, checkpointed and resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from client.cache import task_for
from client.trainer import fit
from medtasks.seeding import torch_generator
from server.engines import run_scenario
from server.progress import make_progress
from server.results import RunDirectory
from server.scenario import LocalSection, Scenario, ScenarioError, validate
from strategies.base import Cohort
from strategies.scaffold import (
    LOCAL_VARIATE_KEY,
    SERVER_VARIATE_KEY,
    VARIATE_DELTA_KEY,
    Scaffold,
    ScaffoldClient,
    ScaffoldParams,
    full_gradient,
)
from tests.helpers import (
    BLOBS,
    FULL_BATCH,
    final_weight,
    interrupted_and_resumed,
    message_grid,
    new_run_directory,
    quadratic_scenario,
    reply_message,
    run,
    toy_scenario,
    without_timing,
)

# 4 sites, K = 10 full-batch plain-SGD steps per round: enough local drift for FedAvg to miss the optimum;
# no federated evaluation (the tests compare the weights)
SETTING: dict[str, Any] = {"clients": 4, "fraction_evaluate": 0.0,
                           "local": {"epochs": 10, "batch_size": FULL_BATCH, "optimizer": "sgd", "lr": 0.1}}
ROUNDS = 20


def scaffold_scenario(tmp_path: Path, *, variate: str = "II", rounds: int = ROUNDS, fraction: float = 1.0) -> Scenario:
    return quadratic_scenario(tmp_path, "scaffold", rounds=rounds, fraction_train=fraction,
                              params={"variate": variate}, **SETTING)


def uniform_optimum(task: Any) -> torch.Tensor:
    """argmin_w (1/N) Σ_k F_k(w), SCAFFOLD's objective: Σ_k X_kᵀX_k/n_k · w = Σ_k X_kᵀy_k/n_k; shape (dim,)."""
    gram = sum(x.double().T @ x.double() / len(x) for x, _ in task.sites)
    moment = sum(x.double().T @ y.double() / len(x) for x, y in task.sites)
    return torch.linalg.solve(gram, moment).squeeze(1)


@pytest.fixture(scope="module")
def fedavg_gaps(tmp_path_factory: pytest.TempPathFactory) -> tuple[float, float]:
    """Distance of FedAvg (same local steps, same rounds) to the pooled and to the unweighted optimum."""
    scenario = quadratic_scenario(tmp_path_factory.mktemp("fedavg"), "fedavg", rounds=ROUNDS, **SETTING)
    weight, task = final_weight(run(scenario)), task_for(scenario)
    return (weight - task.optimum()).norm().item(), (weight - uniform_optimum(task)).norm().item()


@pytest.mark.parametrize("variate", ["I", "II"])
def test_scaffold_reaches_the_optimum_where_fedavg_stays_biased(tmp_path: Path, variate: str,
                                                                 fedavg_gaps: tuple[float, float]) -> None:
    scenario = scaffold_scenario(tmp_path, variate=variate)
    weight, task = final_weight(run(scenario)), task_for(scenario)
    gap = (weight - uniform_optimum(task)).norm().item()
    assert gap < 1e-3
    # FedAvg misses both its own n_k-weighted optimum and SCAFFOLD's by far more
    assert min(fedavg_gaps) > 10 * max(gap, 1e-3)


# --- client half ---------------------------------------------------------------------------------
def client_round(variate: str, local: LocalSection, c: torch.Tensor, c_k: torch.Tensor | None
                 ) -> tuple[dict[str, Any], RecordDict, Any, torch.Tensor, int]:
    """One local round of site 1 of the quadratic task through the real trainer."""
    scenario = scaffold_scenario(Path("unused"), variate=variate)
    task = task_for(scenario)
    model = task.build_model()
    state = RecordDict() if c_k is None else RecordDict({LOCAL_VARIATE_KEY: ArrayRecord({"weight": c_k})})
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), SERVER_VARIATE_KEY: ArrayRecord({"weight": c})})
    rule = ScaffoldClient(ScaffoldParams(variate=variate))
    dataset = task.client_data(1).train
    rule.receive(model, content, state)
    w_t = model.weight.detach().clone()
    rule.before_training(model, task, dataset, local)
    result = fit(model, task, dataset, local, rule, torch_generator(0, "test"))
    return rule.reply(model, state, steps=result.steps), state, task, w_t, result.steps


def test_option_two_corrects_every_step_and_counts_the_steps_taken() -> None:
    local = LocalSection(epochs=6, max_steps=4, batch_size=FULL_BATCH, optimizer="sgd", lr=0.05)
    c, c_k = torch.full((1, 5), 0.3), torch.linspace(-1, 1, 5).reshape(1, 5)
    records, state, task, w_t, steps = client_round("II", local, c, c_k)
    assert steps == 4  # max_steps, not epochs × batches

    x, y = (t.double() for t in task.sites[1])
    w = w_t.double()
    for _ in range(steps):  # w ← w − η_l (∇F_k(w) − c_k + c), by hand
        w = w - 0.05 * ((x @ w.T - y).T @ x / len(x) - c_k.double() + c.double())
    w_k = records["arrays"].to_torch_state_dict()["weight"].double()
    assert torch.allclose(w_k, w, atol=1e-6)

    c_plus = c_k.double() - c.double() + (w_t.double() - w) / (steps * 0.05)  # option II with K = 4
    stored = state[LOCAL_VARIATE_KEY].to_torch_state_dict()["weight"].double()
    assert torch.allclose(stored, c_plus, atol=1e-5)
    delta = records[VARIATE_DELTA_KEY].to_torch_state_dict()["weight"].double()
    assert torch.allclose(delta, c_plus - c_k.double(), atol=1e-5)


def test_option_one_stores_the_full_local_gradient_at_the_received_model() -> None:
    local = LocalSection(epochs=2, batch_size=7, optimizer="adam", lr=0.01)  # option I: any optimiser
    records, state, task, w_t, _ = client_round("I", local, torch.zeros(1, 5), None)
    x, y = (t.double() for t in task.sites[1])
    gradient = (x @ w_t.double().T - y).T @ x / len(x)  # ∇F_k(w_t) over all 23 examples, batches of 7
    stored = state[LOCAL_VARIATE_KEY].to_torch_state_dict()["weight"].double()
    assert torch.allclose(stored, gradient, atol=1e-5)
    # c_k started at zero, so Δc_k = c_k⁺
    assert torch.allclose(records[VARIATE_DELTA_KEY].to_torch_state_dict()["weight"].double(), gradient, atol=1e-5)


def test_full_gradient_leaves_batchnorm_statistics_unchanged() -> None:
    scenario = toy_scenario(BLOBS, "scaffold", rounds=1, clients=4, samples=20, local={}, model="mlp",
                            fraction_evaluate=0.0, params={"variate": "I"})
    task = task_for(scenario)
    model = task.build_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    gradient = full_gradient(model, task, task.client_data(0).train, batch_size=5)
    assert all(torch.equal(model.state_dict()[name], value) for name, value in before.items())
    assert set(gradient) == {name for name, _ in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    assert gradient["0.weight"].abs().sum() > 0


def test_evaluation_receives_w_only_and_leaves_c_k_alone() -> None:
    model = torch.nn.Linear(5, 1, bias=False)
    state = RecordDict({LOCAL_VARIATE_KEY: ArrayRecord({"weight": torch.ones(1, 5)})})
    sent = {"weight": torch.full((1, 5), 2.0)}
    ScaffoldClient(ScaffoldParams()).receive(model, RecordDict({"arrays": ArrayRecord(sent)}), state)
    assert torch.equal(model.weight.detach(), sent["weight"])
    assert torch.equal(state[LOCAL_VARIATE_KEY].to_torch_state_dict()["weight"], torch.ones(1, 5))


# --- server half ---------------------------------------------------------------------------------
COHORT = Cohort(node_to_partition={11: 0, 22: 1, 33: 2, 44: 3}, seed=0)


def train_reply(node_id: int, weight: float, delta: float) -> Message:
    return reply_message(node_id, {
        "arrays": ArrayRecord({"w": torch.full((2,), weight), "running_mean": torch.full((2,), 10 * weight)}),
        VARIATE_DELTA_KEY: ArrayRecord({"w": torch.full((2,), delta)}),
    }, num_examples=10 * node_id)


def test_server_steps_with_the_mean_update_and_adds_sampled_share_of_mean_delta_c() -> None:
    strategy = Scaffold(COHORT, {"w": torch.Size([2])}, server_lr=0.5)
    grid = message_grid(num_nodes=4)  # messages can only be made next to a Grid
    config = ConfigRecord({"server-round": 1})
    w_t = ArrayRecord({"w": torch.ones(2), "running_mean": torch.zeros(2)})
    messages = list(strategy.configure_train(1, w_t, config, grid))
    assert len(messages) == 4
    assert all(torch.equal(m.content[SERVER_VARIATE_KEY].to_torch_state_dict()["w"], torch.zeros(2)) for m in messages)
    assert all(SERVER_VARIATE_KEY not in m.content for m in strategy.configure_evaluate(1, w_t, config, grid))

    # 2 of N = 4 sites reply (unequal n_k: the paper's means are unweighted)
    arrays, _ = strategy.aggregate_train(1, [train_reply(33, weight=5.0, delta=2.0), train_reply(11, 3.0, 6.0)])
    result = arrays.to_torch_state_dict()
    assert torch.allclose(result["w"], torch.full((2,), 1 + 0.5 * ((5 - 1) + (3 - 1)) / 2))  # w_t + η_g mean Δw
    assert torch.allclose(result["running_mean"], torch.full((2,), 40.0))  # statistics: the sites' mean
    assert torch.allclose(strategy.control["w"], torch.full((2,), (2 / 4) * (2.0 + 6.0) / 2, dtype=torch.float64))

    restored = Scaffold(COHORT, {"w": torch.Size([2])})
    restored.load_state_dict(strategy.state_dict())
    assert torch.equal(restored.control["w"], strategy.control["w"])
    with pytest.raises(ValueError, match="no SCAFFOLD control variate"):
        Scaffold(COHORT, {"v": torch.Size([2])}).load_state_dict(strategy.state_dict())


def test_option_two_with_a_non_plain_sgd_optimiser_is_rejected_in_one_line(tmp_path: Path) -> None:
    raw = scaffold_scenario(tmp_path).model_dump(mode="json")
    raw["local"]["optimizer"] = "adam"
    with pytest.raises(ScenarioError, match=r"local\.optimizer: scaffold variate 'II' assumes plain SGD") as error:
        validate(raw)
    assert "\n" not in str(error.value)
    raw["local"].update(optimizer="sgd", momentum=0.9)
    with pytest.raises(ScenarioError, match=r"local\.momentum: scaffold variate 'II'"):
        validate(raw)
    raw["strategy"]["params"]["variate"] = "I"
    validate(raw)  # option I works with any optimiser


# --- per-node state through the round loop -------------------------------------------------------
class StateRecorder:
    """A progress display that reads the checkpoint after every round: c on the server, c_k on each node."""

    def __init__(self, run_dir: RunDirectory, sites: int, inner: Any = None) -> None:
        self.inner, self.run_dir, self.sites = inner or make_progress(interactive=False), run_dir, sites
        self.rounds: dict[int, tuple[torch.Tensor, dict[int, torch.Tensor | None]]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def round_done(self, server_round: int, metrics: dict) -> None:
        checkpoint = self.run_dir.load_checkpoint()
        local: dict[int, torch.Tensor | None] = dict.fromkeys(range(self.sites))  # a site yet to train has no state
        local.update({int(pid): plain["arrays"].get(LOCAL_VARIATE_KEY, {}).get("weight")
                      for pid, plain in checkpoint.extra["node_states"].items()})
        self.rounds[server_round] = (checkpoint.strategy_state["control"]["weight"], local)
        self.inner.round_done(server_round, metrics)


def recorded_run(scenario: Scenario) -> tuple[RunDirectory, StateRecorder]:
    run_dir = new_run_directory(scenario)
    recorder = StateRecorder(run_dir, scenario.partition.clients)
    run_scenario(scenario, run_dir, recorder)
    return run_dir, recorder


def assert_server_c_is_the_mean_of_the_sites(control: torch.Tensor, local: dict[int, torch.Tensor | None]) -> None:
    """c = (1/N) Σ_k c_k (c_k = 0 for a site that never trained) holds only if no c_k was lost."""
    mean = sum((c_k.double() for c_k in local.values() if c_k is not None), torch.zeros_like(control)) / len(local)
    assert torch.allclose(control, mean, atol=1e-6)


def test_c_k_persists_in_node_state_across_rounds_and_while_a_site_is_not_sampled(tmp_path: Path) -> None:
    run_dir, recorder = recorded_run(scaffold_scenario(tmp_path, rounds=5, fraction=0.5))
    train = {r["round"]: r for r in run_dir.read_metrics() if r["phase"] == "train"}
    rounds_trained = {k: 0 for k in range(4)}
    kept_while_skipped = 0
    for server_round in range(1, 6):
        control, local = recorder.rounds[server_round]
        assert_server_c_is_the_mean_of_the_sites(control, local)
        sampled = {int(pid) for pid in train[server_round]["clients"]}
        assert len(sampled) == 2
        previous = recorder.rounds.get(server_round - 1, (None, {k: None for k in range(4)}))[1]
        for k in range(4):
            if k in sampled:
                rounds_trained[k] += 1
                assert train[server_round]["clients"][str(k)]["participations"] == rounds_trained[k]
                assert local[k] is not None and (previous[k] is None or not torch.equal(local[k], previous[k]))
            elif previous[k] is not None:
                assert torch.equal(local[k], previous[k])  # skipped: c_k untouched ...
                kept_while_skipped += int(local[k].abs().sum() > 0)  # ... and not zero
    assert kept_while_skipped >= 2
    assert not torch.equal(recorder.rounds[5][0], torch.zeros_like(recorder.rounds[5][0]))


def test_resume_restores_c_and_every_c_k_and_continues_to_the_same_result(tmp_path: Path) -> None:
    interrupted, uninterrupted = interrupted_and_resumed(scaffold_scenario(tmp_path, rounds=4, fraction=0.5), after=2)
    assert without_timing(interrupted.read_metrics()) == without_timing(uninterrupted.read_metrics())
    resumed, reference = interrupted.load_checkpoint(), uninterrupted.load_checkpoint()
    assert torch.equal(resumed.arrays["weight"], reference.arrays["weight"])
    assert torch.equal(resumed.strategy_state["control"]["weight"], reference.strategy_state["control"]["weight"])
    for pid, plain in reference.extra["node_states"].items():
        saved = plain["arrays"].get(LOCAL_VARIATE_KEY)
        again = resumed.extra["node_states"][pid]["arrays"].get(LOCAL_VARIATE_KEY)
        assert (saved is None and again is None) or torch.equal(saved["weight"], again["weight"])


@pytest.mark.slow
def test_simulation_engine_keeps_c_k_per_node_like_the_inprocess_engine(tmp_path: Path) -> None:
    inprocess = scaffold_scenario(tmp_path, rounds=3, fraction=0.5)
    simulation = validate({**inprocess.model_dump(mode="json"), "engine": {"backend": "simulation", "workers": 2}})
    reference, (run_dir, recorder) = run(inprocess).load_checkpoint(), recorded_run(simulation)
    ours = run_dir.load_checkpoint()
    assert torch.allclose(ours.arrays["weight"], reference.arrays["weight"], atol=1e-5)
    assert torch.allclose(ours.strategy_state["control"]["weight"], reference.strategy_state["control"]["weight"],
                          atol=1e-5)
    for server_round in (1, 2, 3):  # c_k survived each round in Ray's per-node contexts
        assert_server_c_is_the_mean_of_the_sites(*recorder.rounds[server_round])
    train = [r for r in run_dir.read_metrics() if r["phase"] == "train"]
    assert max(m["participations"] for r in train for m in r["clients"].values()) >= 2
