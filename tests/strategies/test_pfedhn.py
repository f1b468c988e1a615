"""pFedHN: per-site generated models, the hypernetwork update as a vector-Jacobian product,
personalisation under label skew, checkpoints and --resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from server.scenario import Scenario, ScenarioError, validate
from strategies.base import Cohort
from strategies.pfedhn import BUFFERS_KEY, DELTA_KEY, PFedHN, PFedHNClient, PFedHNParams
from tests.helpers import BLOBS, interrupted_and_resumed, message_grid, reply_message, run, toy_scenario, without_timing

# Server settings for a few rounds (the defaults are the authors' settings for thousands of steps).
FAST_PFEDHN = {"hidden_layers": 2, "hn_lr": 0.075, "momentum": 0.5}
COHORT = Cohort(node_to_partition={303: 2, 101: 0, 202: 1}, seed=0)  # node ids do not follow partition ids


def bn_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def random_deltas(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {name: 0.1 * torch.randn(p.shape, generator=generator) for name, p in model.named_parameters()}


def test_each_site_receives_its_own_generated_model_and_its_own_buffers() -> None:
    grid = message_grid(num_nodes=3)
    model = bn_mlp()
    strategy = PFedHN(COHORT, model, PFedHNParams(hidden_dim=8, hidden_layers=2))
    assert strategy.network.names == [name for name, _ in model.named_parameters()]  # BN statistics not generated
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord({"k": 1}), grid))
    assert [m.metadata.dst_node_id for m in messages] == [101, 202, 303]  # partition-id order
    sent = [m.content["arrays"].to_torch_state_dict() for m in messages]
    assert all(list(state) == list(model.state_dict()) for state in sent)
    for name, _ in model.named_parameters():
        assert not torch.equal(sent[0][name], sent[1][name]) and not torch.equal(sent[1][name], sent[2][name]), name
    for state in sent:
        assert torch.equal(state["1.running_var"], model.state_dict()["1.running_var"])
    personal = strategy.personal_arrays()
    assert sorted(personal) == [0, 1, 2]
    assert torch.equal(personal[2].to_torch_state_dict()["0.weight"], sent[2]["0.weight"])


def reply_records(model: torch.nn.Module, seed: int, running_mean: float) -> dict[str, ArrayRecord]:
    buffers = {"1.running_mean": torch.full((4,), running_mean), "1.running_var": torch.ones(4),
               "1.num_batches_tracked": torch.tensor(seed)}
    return {DELTA_KEY: ArrayRecord(random_deltas(model, seed)), BUFFERS_KEY: ArrayRecord(buffers)}


def test_aggregation_moves_phi_and_the_trained_sites_embeddings_and_keeps_their_buffers() -> None:
    grid = message_grid(num_nodes=3)
    model = bn_mlp()
    strategy = PFedHN(COHORT, model, PFedHNParams(hidden_dim=8, hidden_layers=2, weight_decay=0.0))
    before = {name: value.clone() for name, value in strategy.network.state_dict().items()}
    replies = [reply_message(303, reply_records(model, 2, running_mean=7.0), num_examples=10),
               reply_message(101, reply_records(model, 0, running_mean=5.0), num_examples=10)]
    mean_model, metrics = strategy.aggregate_train(1, replies)
    after = strategy.network.state_dict()
    for name, value in before.items():
        if name != "embeddings":
            assert not torch.equal(value, after[name]), name  # every part of φ is updated
    assert not torch.equal(before["embeddings"][0], after["embeddings"][0])
    assert not torch.equal(before["embeddings"][2], after["embeddings"][2])
    assert torch.equal(before["embeddings"][1], after["embeddings"][1])  # site 1 did not train (and no decay)
    assert metrics["num-examples"] == 20

    personal = {pid: record.to_torch_state_dict() for pid, record in strategy.personal_arrays().items()}
    assert torch.equal(personal[0]["1.running_mean"], torch.full((4,), 5.0))  # a site's own statistics ...
    assert torch.equal(personal[1]["1.running_mean"], model.state_dict()["1.running_mean"])  # ... or the initial ones
    evaluate = list(strategy.configure_evaluate(1, mean_model, ConfigRecord(), grid))
    assert torch.equal(evaluate[2].content["arrays"].to_torch_state_dict()["1.running_mean"], torch.full((4,), 7.0))
    expected = sum(personal[k]["0.weight"].double() for k in range(3)) / 3
    assert torch.allclose(mean_model.to_torch_state_dict()["0.weight"].double(), expected, atol=1e-6)


@pytest.mark.parametrize("hidden_layers", [0, 1])
def test_update_is_the_hand_computed_vector_jacobian_product(hidden_layers: int) -> None:
    """Linear target w ∈ R^{1×3}; trunk u = C v + c (then u = D relu(u) + e); head w = A u + b; plain SGD."""
    target = torch.nn.Linear(3, 1, bias=False)
    lr, embed_lr = 0.05, 0.2
    params = PFedHNParams(embedding_dim=2, hidden_dim=2, hidden_layers=hidden_layers, optimizer="sgd", hn_lr=lr,
                          embed_lr=embed_lr, momentum=0.0, weight_decay=0.0, max_grad_norm=None, head_init_std=0.5)
    strategy = PFedHN(COHORT, target, params)
    old = {name: value.clone() for name, value in strategy.network.state_dict().items()}
    v, A, b, C, c = (old[k] for k in ("embeddings", "heads.0.weight", "heads.0.bias", "trunk.0.weight", "trunk.0.bias"))
    pre = v @ C.T + c  # [3 sites, 2]
    if hidden_layers:
        D, e = old["trunk.2.weight"], old["trunk.2.bias"]
        u = pre.relu() @ D.T + e
    else:
        u = pre
    w = u @ A.T + b  # [3 sites, 3]: what the sites receive
    trained = {0: torch.tensor([0.3, -0.2, 0.5]), 2: torch.tensor([-0.1, 0.4, 0.0])}  # Δw_0, Δw_2

    replies = [reply_message(303, {DELTA_KEY: ArrayRecord({"weight": trained[2][None]})}, num_examples=10),
               reply_message(101, {DELTA_KEY: ArrayRecord({"weight": trained[0][None]})}, num_examples=10)]
    strategy.aggregate_train(1, replies)
    new = strategy.network.state_dict()

    delta = {k: -d.double() for k, d in trained.items()}  # ∂/∂w of ½‖w − w̃‖² = w − w̃ = −Δw
    grad_u = {k: A.T @ delta[k] for k in delta}  # back through the head
    grad_pre = {k: (D.T @ grad_u[k]) * (pre[k] > 0) for k in delta} if hidden_layers else grad_u
    expected = {
        "heads.0.weight": A - lr * sum(torch.outer(delta[k], u[k]) for k in delta),
        "heads.0.bias": b - lr * sum(delta[k] for k in delta),
        "trunk.0.weight": C - lr * sum(torch.outer(grad_pre[k], v[k]) for k in delta),
        "trunk.0.bias": c - lr * sum(grad_pre[k] for k in delta),
    }
    if hidden_layers:
        expected["trunk.2.weight"] = D - lr * sum(torch.outer(grad_u[k], pre[k].relu()) for k in delta)
        expected["trunk.2.bias"] = e - lr * sum(grad_u[k] for k in delta)
    for name, value in expected.items():
        assert torch.allclose(new[name], value, atol=1e-12), name
    for k in (0, 2):  # each embedding gets its own site's VJP
        assert torch.allclose(new["embeddings"][k], v[k] - embed_lr * (C.T @ grad_pre[k]), atol=1e-12)
    assert torch.equal(new["embeddings"][1], v[1])

    generated = {pid: r.to_torch_state_dict()["weight"][0].double() for pid, r in strategy.personal_arrays().items()}
    for k in (0, 2):  # the step moves h_φ(v_k) towards the site's trained w̃_k (the paper's sign typo is not copied)
        assert (generated[k] - (w[k] + trained[k])).norm() < trained[k].double().norm()


def test_client_replies_its_update_and_its_buffers() -> None:
    model, rule = bn_mlp(), PFedHNClient(PFedHNParams())
    received = {name: value + 1.0 if value.is_floating_point() else value for name, value in model.state_dict().items()}
    rule.receive(model, RecordDict({"arrays": ArrayRecord(received)}), RecordDict())
    with torch.no_grad():
        model[0].weight += 0.25
    model.train()
    model(torch.randn(8, 3))  # updates the running statistics
    records = rule.reply(model, RecordDict(), steps=1)
    delta = records[DELTA_KEY].to_torch_state_dict()
    assert sorted(delta) == sorted(name for name, _ in model.named_parameters())
    assert torch.allclose(delta["0.weight"], torch.full_like(delta["0.weight"], 0.25))
    assert torch.equal(delta["3.bias"], torch.zeros(2))
    buffers = records[BUFFERS_KEY].to_torch_state_dict()
    assert torch.equal(buffers["1.running_mean"], model.state_dict()["1.running_mean"])
    assert not torch.equal(buffers["1.running_mean"], received["1.running_mean"])


def label_skew_scenario(tmp_path: Path, strategy: str, rounds: int, **output: object) -> Scenario:
    """Blobs on 4 sites that each see one of the 4 classes (pure label skew), 2 SGD epochs per round."""
    return toy_scenario(BLOBS, strategy, rounds=rounds, clients=4, samples=64, server_samples=32, model="mlp",
                        task_params={"classes": 4, "classes_per_client": 1, "feature_shift": 0.0},
                        local={"epochs": 2, "batch_size": 16, "optimizer": "sgd", "lr": 0.1},
                        output={"dir": str(tmp_path / "runs"), **output},
                        params=FAST_PFEDHN if strategy == "pfedhn" else {})


def test_personalised_models_beat_one_fedavg_model_under_label_skew(tmp_path: Path) -> None:
    """Each site sees one of four classes: its own model wins, one global model cannot fit all sites."""
    accuracy = {}
    for strategy in ("fedavg", "pfedhn"):
        records = run(label_skew_scenario(tmp_path, strategy, rounds=8, checkpoint_node_state=False)).read_metrics()
        accuracy[strategy] = [r for r in records if r["phase"] == "evaluate"][-1]["aggregate"]["accuracy"]
        central = [r for r in records if r["phase"] == "central"][-1]
        assert sorted(central["clients"]) == (["0", "1", "2", "3"] if strategy == "pfedhn" else [])
    assert accuracy["pfedhn"] > accuracy["fedavg"] + 0.2, accuracy


def test_resume_continues_to_the_same_result(tmp_path: Path) -> None:
    interrupted, uninterrupted = interrupted_and_resumed(label_skew_scenario(tmp_path, "pfedhn", rounds=3), after=2)
    assert without_timing(interrupted.read_metrics()) == without_timing(uninterrupted.read_metrics())
    resumed, straight = (d.load_checkpoint().strategy_state["hypernetwork"] for d in (interrupted, uninterrupted))
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)
    assert straight["embeddings"].dtype == torch.float64


def test_bad_params_name_the_key(tmp_path: Path) -> None:
    raw = label_skew_scenario(tmp_path, "pfedhn", rounds=1).model_dump(mode="json")
    raw["strategy"]["params"] = {"hidden_dim": 0}
    with pytest.raises(ScenarioError, match=r"strategy\.params\.hidden_dim: Input should be greater than or equal to 1"):
        validate(raw)
    raw["strategy"]["params"] = {"optimiser": "sgd"}
    with pytest.raises(ScenarioError, match=r"strategy\.params\.optimiser: unknown key 'optimiser' for strategy\.name pfedhn \(allowed: .*"):
        validate(raw)
