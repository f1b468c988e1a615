"""defense.prune: each site sends only the largest-magnitude entries of its update (Zhu et al. 2019, Sec. 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from server.scenario import ScenarioError, load
from strategies.base import Upload
from strategies.pruning import prune_records, prune_tensor
from tests.helpers import QUICKSTART, run


def test_prune_tensor_keeps_the_largest_magnitudes() -> None:
    values = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.05]])
    pruned = prune_tensor(values, 0.5)  # keep ⌈0.5·6⌉ = 3 entries: −5, 2, 0.3
    assert torch.equal(pruned, torch.tensor([[0.0, -5.0, 0.3], [2.0, 0.0, 0.0]]))
    assert torch.equal(prune_tensor(values, 0.0), values)
    assert int((prune_tensor(torch.randn(1000), 0.9) != 0).sum()) == 100


def test_weights_are_pruned_as_an_update_and_statistics_are_not() -> None:
    w_t = {"layer.weight": torch.ones(4), "bn.running_mean": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(3)}
    w_k = {"layer.weight": torch.tensor([1.5, 0.9, 1.0, -1.0]), "bn.running_mean": torch.tensor([0.2, 0.1]),
           "bn.num_batches_tracked": torch.tensor(5)}
    records = {"arrays": ArrayRecord(w_k), "stats": ArrayRecord({"s": torch.tensor([0.001, 9.0])})}
    uploads = {"arrays": Upload("weights", frozenset(w_k)), "stats": Upload("statistics", frozenset({"s"}))}
    sent = prune_records(records, uploads, RecordDict({"arrays": ArrayRecord(w_t)}), 0.5)
    weights = sent["arrays"].to_torch_state_dict()
    # Δ = [0.5, −0.1, 0, −2]: the two largest |Δ| stay, the rest fall back to w_t
    assert torch.allclose(weights["layer.weight"], torch.tensor([1.5, 1.0, 1.0, -1.0]))
    assert torch.allclose(weights["bn.running_mean"], torch.tensor([0.2, 0.0]))
    assert int(weights["bn.num_batches_tracked"]) == 5  # integers are sent as they are
    assert sent["stats"] is records["stats"]


def test_a_gradient_is_pruned_directly() -> None:
    gradient = {"w": torch.tensor([0.01, -3.0, 0.5, 0.0])}
    sent = prune_records({"g": ArrayRecord(gradient)}, {"g": Upload("gradient", frozenset(gradient))}, RecordDict(), 0.75)
    assert torch.equal(sent["g"].to_torch_state_dict()["w"], torch.tensor([0.0, -3.0, 0.0, 0.0]))


def test_prune_in_a_run_changes_what_sites_send(tmp_path: Path) -> None:
    small = ["task.name=tabular", "task.model=logistic", "task.params={}", "data.samples_per_client=40",
             "data.server_samples=20", "partition.kind=iid", "partition.params={}", "strategy.rounds=1",
             "engine.backend=inprocess", "output.plots=false", f"output.dir={tmp_path}"]
    plain = run(load(QUICKSTART, small))
    pruned = run(load(QUICKSTART, [*small, "defense.prune=0.99"]))
    read = [json.loads((d.path / "summary.json").read_text()) for d in (plain, pruned)]
    assert read[0] != read[1]
    first_central = [next(r for r in d.read_metrics() if r["phase"] == "central") for d in (plain, pruned)]
    assert first_central[0]["aggregate"]["loss"] != first_central[1]["aggregate"]["loss"]


@pytest.mark.parametrize("strategy", ["local", "centralized"])
def test_prune_is_refused_where_no_upload_leaves_a_site(tmp_path: Path, strategy: str) -> None:
    with pytest.raises(ScenarioError, match=r"defense.prune: 0.5 is not possible with strategy"):
        load(QUICKSTART, [f"strategy.name={strategy}", "strategy.min_clients=1", "defense.prune=0.5"])
