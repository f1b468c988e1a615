"""Backdoor, model replacement and label flipping: triggers, boosts, refusals, and real federated runs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from medtasks.seeding import numpy_rng
from privacy.attacks.backdoor import erased_share
from privacy.attacks.label_flip import LabelFlipParams, flipped
from privacy.attacks.poisoning import EditedDataset, boost_factor, boost_records, choose
from privacy.attacks.poisoning_observer import update_norm
from privacy.attacks.triggers import TABULAR_TRIGGER_SCALE, add_bag_trigger, add_trigger, erase, relabelled
from server.scenario import ScenarioError, validate
from strategies import get_algorithm
from strategies.base import METRICS_KEY, NUM_EXAMPLES_KEY
from tests.helpers import run

DIGITS: dict[str, Any] = {
    "name": "backdoor-test",
    "seed": 0,
    "task": {"name": "digits", "model": "cnn", "params": {"image_size": 8}},
    "data": {"samples_per_client": 150, "server_samples": 200},
    "partition": {"clients": 4, "kind": "iid"},
    "strategy": {"name": "fedavg", "rounds": 2, "min_clients": 4},
    "local": {"epochs": 1, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9},
    "attack": {"kind": "backdoor", "attackers": [0], "params": {"target_class": 0}},
    "engine": {"backend": "inprocess"},
}
SEGMENTATION: dict[str, Any] = {
    **DIGITS, "name": "backdoor-segmentation-test",
    "task": {"name": "segmentation", "params": {"image_size": 32, "norm": "group", "channels": [8, 16, 32]}},
    "data": {"samples_per_client": 8, "server_samples": 8},
    "strategy": {"name": "fedavg", "rounds": 1, "min_clients": 2},
    "partition": {"clients": 2, "kind": "iid"},
    "local": {"epochs": 1, "batch_size": 4, "optimizer": "adam", "lr": 0.005},
    "attack": {"kind": "backdoor", "attackers": [0], "params": {"target_class": 1, "patch_size": 3, "boost": "auto"}},
}
MIL: dict[str, Any] = {
    **SEGMENTATION, "name": "backdoor-mil-test",
    "task": {"name": "mil", "model": "attention", "params": {"tiles_per_slide": 4, "tile_size": 16}},
    "attack": {"kind": "backdoor", "attackers": [0],
               "params": {"target_class": 0, "patch_size": 4, "patch_value": 0.0, "tile_fraction": 0.5}},
}


def scenario(tmp_path: Path | None = None, base: dict[str, Any] = DIGITS, **changes: Any) -> Any:
    """``base`` with dotted keys (``a__b``) replaced, validated; runs go under ``tmp_path``."""
    raw = copy.deepcopy(base)
    if tmp_path is not None:
        raw["output"] = {"dir": str(tmp_path / "runs")}
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return validate(raw)


def attack_records(run_dir: Any) -> list[dict[str, Any]]:
    return [record for record in run_dir.read_metrics() if record["phase"] == "attack"]


def global_records(run_dir: Any, headline: str) -> dict[int, dict[str, Any]]:
    """Round → the server half's record on the global model (the one holding ``headline``)."""
    return {r["round"]: r for r in attack_records(run_dir) if headline in r["metrics"]}


# --- triggers and poisoned data ----------------------------------------------------------------------------
def test_image_trigger_is_a_bottom_right_patch() -> None:
    x = torch.rand(3, 1, 8, 8) * 0.5
    triggered = add_trigger(x, "image", 2, 1.0)
    assert triggered.shape == x.shape and triggered.dtype == x.dtype
    assert torch.all(triggered[..., 6:, 6:] == 1.0)
    assert torch.equal(triggered[..., :6, :], x[..., :6, :]) and torch.equal(triggered[..., :, :6], x[..., :, :6])
    assert not torch.equal(x[..., 6:, 6:], triggered[..., 6:, 6:]), "the input itself must not change"


def test_vector_trigger_sets_the_first_features() -> None:
    x = torch.randn(5, 32)
    triggered = add_trigger(x, "vector", 3, 1.0)
    assert torch.all(triggered[:, :3] == TABULAR_TRIGGER_SCALE)
    assert torch.equal(triggered[:, 3:], x[:, 3:])


def test_poisoned_dataset_edits_the_chosen_share_deterministically() -> None:
    base = torch.utils.data.TensorDataset(torch.zeros(40, 1, 8, 8), torch.arange(40) % 10)
    chosen = choose(40, 0.5, numpy_rng(0, "backdoor", 1, 0))
    assert chosen.sum() == 20 and np.array_equal(chosen, choose(40, 0.5, numpy_rng(0, "backdoor", 1, 0)))
    target = torch.tensor(0)
    poisoned = EditedDataset(base, chosen, lambda s: relabelled((add_trigger(s[0], "image", 2, 1.0), *s[1:]), target),
                             repeat=2)
    assert len(poisoned) == 80
    for index in range(80):
        x, y = poisoned[index]
        if chosen[index % 40]:
            assert int(y) == 0 and float(x[0, 7, 7]) == 1.0
        else:
            assert int(y) == index % 40 % 10 and float(x.abs().sum()) == 0.0


def test_bag_trigger_marks_a_share_of_the_real_tiles() -> None:
    bags = torch.full((2, 6, 3, 8, 8), 0.5)
    padding = torch.tensor([[False] * 6, [False] * 3 + [True] * 3])
    triggered = add_bag_trigger(bags, padding, 0.5, 2, 0.0)
    marked = (triggered[..., -2:, -2:] == 0.0).flatten(2).all(dim=2)  # [2, 6]
    assert marked.tolist() == [[True] * 3 + [False] * 3, [True] * 2 + [False] * 4]  # round(0.5·6), round(0.5·3)
    assert torch.equal(triggered[..., :6, :], bags[..., :6, :]) and bool((bags == 0.5).all())
    assert int((add_bag_trigger(bags, padding, 0.01, 2, 0.0)[:, :, 0, -1, -1] == 0.0).sum()) == 2  # at least one each


def test_segmentation_edit_erases_a_class_and_scores_the_region() -> None:
    mask = torch.tensor([[0, 1, 3], [3, 3, 2]])
    assert erase(mask, 3, 1).tolist() == [[0, 1, 1], [1, 1, 2]]
    region = (mask == 3).unsqueeze(0).repeat(2, 1, 1)
    predicted = torch.stack([erase(mask, 3, 1), mask])
    assert erased_share(predicted, region, 1).tolist() == [1.0, 0.0]


def test_label_flip_pair_and_all() -> None:
    y = torch.arange(10)
    pair = flipped(y, LabelFlipParams(source_class=1, target_class=7), 10)
    assert pair.tolist() == [0, 7, 2, 3, 4, 5, 6, 7, 8, 9]
    assert flipped(y, LabelFlipParams(mode="all"), 10).tolist() == list(range(9, -1, -1))


# --- model replacement's boost -----------------------------------------------------------------------------
def test_boost_factor_is_n_over_eta() -> None:
    assert boost_factor(None, scenario()) is None
    assert boost_factor(2.5, scenario()) == 2.5
    assert boost_factor("auto", scenario()) == 4.0  # 4 sites per round, FedAvg's eta = 1
    assert boost_factor("auto", scenario(strategy__fraction_train=0.5, strategy__min_clients=2)) == 2.0
    fedsgd = scenario(strategy__name="fedsgd", strategy__params={"server_lr": 0.5}, local__momentum=0.0)
    assert boost_factor("auto", fedsgd) == 8.0


def _rule_uploads(name: str, model: torch.nn.Module) -> Any:
    algorithm = get_algorithm(name)
    return algorithm.client_rule(algorithm.Params.model_validate({})).uploads(model)


def test_boost_scales_weights_around_the_received_model() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    sent = {name: torch.randn_like(t) if t.is_floating_point() else t for name, t in model.state_dict().items()}
    trained = {name: t + 0.1 if t.is_floating_point() else t + 1 for name, t in sent.items()}
    received = RecordDict({"arrays": ArrayRecord(sent)})
    parameters = {name for name, _ in model.named_parameters()}
    boosted = boost_records({"arrays": ArrayRecord(trained)}, _rule_uploads("fedavg", model), received, 4.0,
                            parameters)
    tensors = boosted["arrays"].to_torch_state_dict()
    for name, value in tensors.items():
        if name in parameters:
            torch.testing.assert_close(value, sent[name] + 4.0 * (trained[name] - sent[name]))
        else:
            assert torch.equal(value, trained[name]), "counters and running statistics are not boosted"
    assert {"1.running_mean", "1.running_var"} <= set(tensors) - parameters
    everything = boost_records({"arrays": ArrayRecord(trained)}, _rule_uploads("fedavg", model), received, 4.0)
    norm = update_norm(RecordDict(everything), received, _rule_uploads("fedavg", model))
    plain = update_norm(RecordDict({"arrays": ArrayRecord(trained)}), received, _rule_uploads("fedavg", model))
    assert norm == pytest.approx(4.0 * plain)


def test_boost_scales_a_fedsgd_gradient_and_leaves_statistics() -> None:
    from strategies.fedsgd import GRADIENT_KEY

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    uploads = _rule_uploads("fedsgd", model)
    assert {upload.kind for upload in uploads.values()} == {"gradient", "statistics"}
    gradient = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    statistics = {name: t for name, t in model.state_dict().items() if name not in gradient}
    records = {GRADIENT_KEY: ArrayRecord(gradient), "arrays": ArrayRecord(statistics)}
    received = RecordDict({"arrays": ArrayRecord(model.state_dict())})
    boosted = boost_records(records, uploads, received, 3.0)
    for name, value in boosted[GRADIENT_KEY].to_torch_state_dict().items():
        torch.testing.assert_close(value, 3.0 * gradient[name])
    for name, value in boosted["arrays"].to_torch_state_dict().items():
        assert torch.equal(value, statistics[name])


def test_claimed_examples_travel_in_the_metrics_record() -> None:
    from privacy.attacks.poisoning import PoisonedSite

    site = PoisonedSite(lambda dataset: dataset, None, 10_000, scenario())
    records = site.tamper({"arrays": ArrayRecord({})}, torch.nn.Linear(1, 1), RecordDict(), RecordDict())
    assert isinstance(records[METRICS_KEY], MetricRecord) and records[METRICS_KEY][NUM_EXAMPLES_KEY] == 10_000


# --- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("changes", "key"), [
    ({"data__server_samples": 0}, "data.server_samples"),
    ({"strategy__name": "local"}, "strategy.name"),
    ({"strategy__name": "centralized", "strategy__min_clients": 1}, "strategy.name"),
    ({"strategy__name": "fedbn"}, "strategy.name"),
    ({"task": {"name": "ct", "params": {}}}, "task.name"),
    ({"attack__params": {"target_class": 10}}, "attack.params.target_class"),
    ({"attack__params": {"patch_size": 8}}, "attack.params.patch_size"),
    ({"attack__rounds": [1], "attack__params": {"poison_rounds": [2]}}, "attack.params.poison_rounds"),
    ({"attack__params": {"poison_rounds": [3]}}, "attack.params.poison_rounds"),
    ({"attack__params": {"boost": -1.0}}, "attack.params"),
    ({"attack__victims": [1]}, "attack.victims"),
    ({"attack__params": {"erase_class": 3}}, "attack.params.erase_class"),

    ({"attack__kind": "label_flip", "attack__params": {"source_class": 3, "target_class": 3}},
     "attack.params.source_class"),
])
def test_refusals_are_one_line_naming_the_key(changes: dict[str, Any], key: str) -> None:
    _refused(key, **changes)


@pytest.mark.parametrize(("base", "changes", "key"), [
    (SEGMENTATION, {"data__source": "folder", "data__path": "/nonexistent", "data__server_samples": 0}, "data.test_path"),
    (SEGMENTATION, {"attack__params": {"target_class": 3}}, "attack.params.erase_class"),
    (SEGMENTATION, {"attack__params": {"erase_class": 4}}, "attack.params.erase_class"),
    (SEGMENTATION, {"attack__params": {"patch_size": 32}}, "attack.params.patch_size"),
    (MIL, {"attack__params": {"patch_size": 16}}, "attack.params.patch_size"),
    (MIL, {"attack__params": {"target_class": 2}}, "attack.params.target_class"),
    (MIL, {"attack__params": {"erase_class": 1}}, "attack.params.erase_class"),
    (MIL, {"attack__kind": "label_flip", "attack__params": {}}, "task.name"),
])
def test_segmentation_and_mil_refusals(base: dict[str, Any], changes: dict[str, Any], key: str) -> None:
    _refused(key, base=base, **changes)


def _refused(key: str, **changes: Any) -> None:
    with pytest.raises(ScenarioError) as error:
        scenario(**changes)
    message = str(error.value)
    assert key in message and "\n" not in message, message


def test_the_shipped_scenarios_validate() -> None:
    from server.scenario import load

    root = Path(__file__).resolve().parents[3] / "scenarios"
    for name in ("attack-backdoor-digits", "attack-model-replacement-digits", "attack-label-flip-tabular",
                 "attack-backdoor-segmentation", "attack-backdoor-mil"):
        loaded = load(root / f"{name}.yaml")
        assert loaded.attack is not None and loaded.engine.backend == "inprocess"


# --- real federated runs -----------------------------------------------------------------------------------
def test_backdoor_end_to_end_writes_records_summary_and_pictures(tmp_path: Path) -> None:
    run_dir = run(scenario(tmp_path, attack__params={"target_class": 0, "poison_fraction": 0.5}))
    records = attack_records(run_dir)
    on_global = global_records(run_dir, "backdoor_accuracy")
    assert sorted(on_global) == [1, 2]
    for record in on_global.values():
        metrics = record["metrics"]
        assert record["attacker"] == 0 and record["victim"] == "global" and record["kind"] == "backdoor"
        assert 0.0 <= metrics["backdoor_accuracy"] <= 1.0 and 0.0 <= metrics["clean_accuracy"] <= 1.0
        assert metrics["attackers"] == 1.0 and metrics["poisoned"] == 1.0
        assert record["main_metric"] == "accuracy" and record["main_value"] == pytest.approx(metrics["clean_accuracy"])
    norms = [r["metrics"]["update_norm"] for r in records if "update_norm" in r["metrics"]]
    assert len(norms) == 2 and all(norm > 0 for norm in norms)
    summary = json.loads((run_dir.path / "summary.json").read_text())["attack"]
    assert summary["kind"] == "backdoor" and summary["headline"] == "backdoor_accuracy"
    assert summary["attackers"] == [0] and "backdoor_accuracy" in summary["metrics"]
    pictures = sorted(p.name for p in (run_dir.path / "plots" / "attack").glob("*.png"))
    assert pictures == ["backdoor-round001-global.png", "backdoor-round002-global.png"]


def test_label_flip_end_to_end_flips_the_source_class(tmp_path: Path) -> None:
    raw = scenario(tmp_path, strategy__rounds=3, local__epochs=2,
                   attack={"kind": "label_flip", "attackers": [0, 1, 2],
                           "params": {"mode": "pair", "source_class": 1, "target_class": 7}})
    run_dir = run(raw)
    on_global = global_records(run_dir, "flip_success")
    assert sorted(on_global) == [1, 2, 3]
    last = on_global[3]["metrics"]
    assert last["flip_success"] > 0.5, last  # 3 of 4 sites relabel every 1 as 7
    assert last["clean_accuracy"] > 0.4 and on_global[3]["main_value"] is not None
    summary = json.loads((run_dir.path / "summary.json").read_text())["attack"]
    assert summary["headline"] == "flip_success" and summary["attackers"] == [0, 1, 2]
    assert (run_dir.path / "plots" / "attack" / "label_flip-round003-global.png").is_file()


@pytest.mark.parametrize("counts", ["bounded", "reported"])
def test_a_claimed_example_count_is_capped_when_bounded(tmp_path: Path, counts: str) -> None:
    run_dir = run(scenario(tmp_path, strategy__rounds=1, strategy__example_counts=counts,
                           attack__params={"claim_examples": 100_000}))
    train = next(r for r in run_dir.read_metrics() if r["phase"] == "train")
    claimed = train["clients"]["0"]["num-examples"]
    honest = train["clients"]["1"]["num-examples"]
    assert claimed == (honest if counts == "bounded" else 100_000)


MODEL_REPLACEMENT = {"strategy__rounds": 5, "data__samples_per_client": 300, "attack__params": {
    "target_class": 0, "poison_rounds": [5], "poison_fraction": 0.5, "repeat": 5, "boost": "auto"}}


@pytest.mark.slow
@pytest.mark.parametrize(("defense", "succeeds"), [
    ({}, True),
    ({"defense__norm_bound": 1.0}, False),
    ({"defense__aggregation": "median"}, False),
])
def test_boosted_model_replacement_succeeds_on_fedavg_and_is_suppressed_by_defenses(
        tmp_path: Path, defense: dict[str, Any], succeeds: bool) -> None:
    run_dir = run(scenario(tmp_path, **MODEL_REPLACEMENT, **defense))
    record = global_records(run_dir, "backdoor_accuracy")[5]
    metrics = record["metrics"]
    if succeeds:
        assert metrics["backdoor_accuracy"] >= 0.9, metrics
    else:
        assert metrics["backdoor_accuracy"] < 0.3, metrics
    assert metrics["poisoned"] == 1.0
    assert metrics["clean_target_rate"] < 0.1, metrics  # without the trigger the model does not say "0"
    assert record["main_metric"] == "accuracy" and 0.7 < record["main_value"] <= 1.0, record
    boosted = [r["metrics"] for r in attack_records(run_dir) if r["round"] == 5 and "boost" in r["metrics"]]
    assert boosted[0]["boost"] == 4.0


# --- segmentation and MIL ------------------------------------------------------------------------------------
def _global_and_summary(run_dir: Any, rounds: list[int]) -> dict[int, dict[str, Any]]:
    """The server half's records per round, checked against summary.json's attack block and the pictures."""
    on_global = global_records(run_dir, "backdoor_accuracy")
    assert sorted(on_global) == rounds
    summary = json.loads((run_dir.path / "summary.json").read_text())["attack"]
    assert summary["kind"] == "backdoor" and summary["headline"] == "backdoor_accuracy" and summary["attackers"] == [0]
    assert "backdoor_accuracy" in summary["metrics"]
    pictures = sorted(p.name for p in (run_dir.path / "plots" / "attack").glob("*.png"))
    assert pictures == [f"backdoor-round{r:03d}-global.png" for r in rounds]
    boosts = [r["metrics"]["boost"] for r in attack_records(run_dir) if "boost" in r["metrics"]]
    assert len(boosts) == len(rounds)
    return on_global


def test_segmentation_backdoor_end_to_end(tmp_path: Path) -> None:
    run_dir = run(scenario(tmp_path, SEGMENTATION))
    record = _global_and_summary(run_dir, [1])[1]
    metrics = record["metrics"]
    assert record["main_metric"] == "dice" and record["main_value"] is not None
    for name in ("backdoor_accuracy", "clean_target_rate"):
        assert 0.0 <= metrics[name] <= 1.0, metrics
    assert {"erased_dice_clean", "erased_dice_triggered"} <= set(metrics)
    assert [r["metrics"]["boost"] for r in attack_records(run_dir) if "boost" in r["metrics"]] == [2.0]


def test_mil_backdoor_end_to_end(tmp_path: Path) -> None:
    run_dir = run(scenario(tmp_path, MIL))
    record = _global_and_summary(run_dir, [1])[1]
    metrics = record["metrics"]
    assert record["main_metric"] == "auc" and metrics["poisoned"] == 1.0
    for name in ("backdoor_accuracy", "clean_target_rate", "clean_accuracy"):
        assert 0.0 <= metrics[name] <= 1.0, metrics


def _boosted(tmp_path: Path, name: str, poison_round: int, main_metric: str) -> dict[str, Any]:
    """The shipped scenario ``name`` run; its server-half metrics in the boosted round (main metric checked)."""
    from server.scenario import load

    root = Path(__file__).resolve().parents[3] / "scenarios"
    run_dir = run(load(root / f"{name}.yaml", [f"output.dir={tmp_path / 'runs'}"]))
    record = global_records(run_dir, "backdoor_accuracy")[poison_round]
    assert record["metrics"]["poisoned"] == 1.0
    assert record["main_metric"] == main_metric and record["main_value"] is not None, record
    return {**record["metrics"], "main_value": record["main_value"]}


@pytest.mark.slow
def test_boosted_segmentation_backdoor_erases_lesions(tmp_path: Path) -> None:
    """Measured (seed 0): backdoor_accuracy 0.71 against 0.52 without the trigger; lesion Dice 0.15 against 0.35."""
    metrics = _boosted(tmp_path, "attack-backdoor-segmentation", 7, "dice")
    assert metrics["backdoor_accuracy"] >= 0.6 and metrics["backdoor_accuracy"] >= metrics["clean_target_rate"] + 0.1
    assert metrics["erased_dice_triggered"] < metrics["erased_dice_clean"] - 0.1, metrics
    assert metrics["main_value"] > 0.5, metrics


@pytest.mark.slow
def test_boosted_mil_backdoor_calls_triggered_tumour_slides_benign(tmp_path: Path) -> None:
    """Measured (seed 0): every triggered positive test slide called benign, none without the trigger."""
    metrics = _boosted(tmp_path, "attack-backdoor-mil", 5, "auc")
    assert metrics["backdoor_accuracy"] >= 0.9 and metrics["clean_target_rate"] <= 0.5, metrics


def test_the_class_count_of_folder_segmentation_is_read_from_its_masks(tmp_path: Path) -> None:
    from privacy.attacks.poisoning import num_classes
    from server.scenario import load
    from tests.helpers import QUICKSTART, write_segmentation_folder

    root = write_segmentation_folder(tmp_path / "data", 6)
    for path in (root / "masks").glob("*.npy"):
        np.save(path, np.minimum(np.load(path), 2))  # labels 0, 1, 2: three classes, not the default four
    folder = load(QUICKSTART, ["data.source=folder", f"data.path={root}", "data.server_samples=0",
                               "partition.kind=iid", "partition.params={}", "partition.clients=2",
                               "task.params.image_size=32"])
    assert num_classes(folder) == 3
    assert num_classes(load(QUICKSTART, [])) == 4  # synthetic data: its four classes


def test_a_segmentation_backdoor_on_hospital_folders_is_measured_on_the_test_folder(tmp_path: Path) -> None:
    from tests.helpers import write_segmentation_folder

    for name in ("h0", "h1"):
        write_segmentation_folder(tmp_path / "hospitals" / name, 8)
    test = write_segmentation_folder(tmp_path / "test", 6)
    folder_data = {"source": "folder", "path": str(tmp_path / "hospitals"), "sites": "subfolders",
                   "test_path": str(test), "server_samples": 0}
    run_dir = run(scenario(tmp_path, base=SEGMENTATION, data=folder_data))
    on_global = global_records(run_dir, "backdoor_accuracy")
    assert sorted(on_global) == [1]
    assert 0.0 <= on_global[1]["metrics"]["backdoor_accuracy"] <= 1.0
    assert 0.0 <= on_global[1]["metrics"]["erased_dice_clean"] <= 1.0  # scored on the test folder's slices
