"""privacy.compatibility decides from the declarations, not from strategy names; privacy.client_privacy gives every
mechanism's client half through one protocol."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

import privacy
from medtasks.scenario import LocalSection
from privacy import compatibility
from privacy.dpsgd import ACCOUNTANT_KEY, DPSGDSite, load_history
from server.scenario import Scenario, validate
from strategies import get_algorithm
from tests.helpers import blobs_scenario


def with_sections(scenario: Scenario, **sections: Any) -> Scenario:
    raw = json.loads(scenario.to_json())
    raw.update(sections)
    return validate(raw)


def test_a_robust_rule_chosen_by_the_defense_section_is_refused_like_a_robust_strategy() -> None:
    plain = blobs_scenario("fedavg", norm="none")
    defended = plain.model_copy(deep=True)
    defended.defense.aggregation = "median"  # the rule, whatever the strategy is called
    assert compatibility.verdict(plain, "nbafl").allowed and compatibility.verdict(plain, "central").allowed
    for mechanism in ("nbafl", "central"):
        reason = compatibility.verdict(defended, mechanism).reason
        assert reason is not None and "robust rule (median)" in reason and reason.startswith("strategy fedavg with")
    assert compatibility.verdict(defended, "dpsgd").allowed


def test_the_declaration_is_read_from_the_algorithm_and_the_model() -> None:
    decl = compatibility.declare(blobs_scenario("scaffold", {"variate": "I"}, norm="batch"))
    assert decl.label == "SCAFFOLD" and decl.combine == "average" and decl.rule == "mean"
    assert decl.from_data_settings == "variate I"  # the setting that makes the variate computed from data
    assert decl.kinds() == {"weights", "variate-update"} and decl.batchnorm
    fedbn = compatibility.declare(blobs_scenario("fedbn", norm="batch"))
    assert fedbn.label == "FedBN" and not fedbn.batchnorm & set(fedbn.uploads["arrays"].names)


def test_dpsgd_refusals_name_the_setting_the_local_batchnorm_and_the_norm() -> None:
    scaffold = compatibility.verdict(blobs_scenario("scaffold", {"variate": "I"}, norm="none"), "dpsgd").reason
    assert scaffold is not None and scaffold.startswith("strategy scaffold with variate I and privacy.mechanism dpsgd")
    fedbn = compatibility.verdict(blobs_scenario("fedbn", norm="batch"), "dpsgd").reason
    assert fedbn is not None and "strategy fedbn with privacy.mechanism dpsgd: FedBN keeps BatchNorm local" in fedbn
    batch = compatibility.verdict(blobs_scenario("fedavg", norm="batch"), "dpsgd").reason
    assert batch is not None and batch.startswith("privacy.mechanism dpsgd with task.params.norm: batch")
    # keeping only the running statistics local still trains BatchNorm's affine parameters
    local_stats = compatibility.verdict(blobs_scenario("fedavg", {"bn_stats": "local"}, norm="batch"), "dpsgd")
    assert local_stats.reason is not None and "keeps BatchNorm local" not in local_stats.reason


def test_the_protected_record_comes_from_the_declaration() -> None:
    model = torch.nn.Linear(2, 2)
    for name, record, kind in (("fedavg", "arrays", "weights"), ("pfedhn", "delta", "update")):
        algorithm = get_algorithm(name)
        uploads = algorithm.client_rule(algorithm.Params()).uploads(model)
        found, upload = compatibility.protected_upload(uploads)
        assert (found, upload.kind) == (record, kind)
    scaffold = get_algorithm("scaffold")
    with pytest.raises(ValueError):  # weights only: the variate record is neither
        compatibility.protected_upload({name: upload for name, upload in
                                         scaffold.client_rule(scaffold.Params()).uploads(model).items()
                                         if upload.kind != "weights"})


# --- the client protocol ----------------------------------------------------------------------------------
def rule_of(scenario: Scenario):
    algorithm = get_algorithm(scenario.strategy.name)
    return algorithm.client_rule(algorithm.Params.model_validate(scenario.strategy.params))


def test_without_a_mechanism_the_client_half_changes_nothing() -> None:
    scenario = blobs_scenario("fedavg", norm="none")
    half = privacy.client_privacy(scenario, 1, 0, 64, LocalSection(), rule_of(scenario))
    assert isinstance(half, privacy.NoPrivacy)
    records = {"arrays": ArrayRecord({"w": torch.ones(2)})}
    half.admit(RecordDict())
    assert half.private_training() is None
    assert half.protect(records, torch.nn.Linear(1, 1), RecordDict(), RecordDict()) == records
    assert half.spend(RecordDict()) == {}


@pytest.mark.parametrize("mechanism, params, kind", [
    ("dpsgd", {"noise_multiplier": 1.0}, "DPSGDSite"),
    ("nbafl", {"clip": 1.0, "epsilon": 10.0}, "NbAFLClient"),
    ("central", {"clip": 1.0, "noise_multiplier": 1.0}, "CentralDPClient"),
])
def test_each_mechanism_gives_its_client_half_through_one_factory(mechanism: str, params: dict, kind: str) -> None:
    scenario = with_sections(blobs_scenario("fedavg", norm="none"), privacy={"mechanism": mechanism, "params": params})
    half = privacy.client_privacy(scenario, 1, 0, 64, scenario.local, rule_of(scenario))
    assert type(half).__name__ == kind
    for method in ("admit", "private_training", "protect", "spend", "close"):
        assert callable(getattr(half, method))


def test_dpsgd_spends_only_when_asked_after_the_reply_is_built() -> None:
    scenario = with_sections(blobs_scenario("fedavg", norm="none"),
                             privacy={"mechanism": "dpsgd", "params": {"noise_multiplier": 1.0}})
    half = privacy.client_privacy(scenario, 1, 0, 64, scenario.local, rule_of(scenario))
    assert isinstance(half, DPSGDSite)
    state = RecordDict({ACCOUNTANT_KEY: ConfigRecord({"noise-multiplier": [1.0], "sample-rate": [0.25],
                                                      "steps": [4]})})
    half.admit(state)
    training = half.private_training()
    assert training.prior == load_history(state) == [(1.0, 0.25, 4)]
    training.noise_multiplier, training.history = 1.0, lambda: [(1.0, 0.25, 4)]  # as if fit had taken 4 steps
    assert load_history(state) == [(1.0, 0.25, 4)]  # nothing spent before spend()
    metrics = half.spend(state)
    assert load_history(state) == [(1.0, 0.25, 8)] and metrics["noise-multiplier"] == 1.0 and metrics["epsilon"] > 0
    half.close()
