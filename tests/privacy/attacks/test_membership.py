"""Membership inference: the ROC metrics, LiRA's pieces, the site model, end-to-end runs and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, RecordDict

from medtasks.scenario import LocalSection
from privacy.attacks.base import Observation
from privacy.attacks.lira import inclusion, lira_scores, logit_confidence
from privacy.attacks.membership import matched, roc_metrics, site_model, tpr_at_fpr
from server.scenario import ScenarioError, load
from strategies.fedsgd import GRADIENT_KEY, FedSGDClient, FedSGDParams
from tests.helpers import run

ROOT = Path(__file__).resolve().parents[3]
MIA = ROOT / "scenarios" / "attack-mia-digits.yaml"
LIRA_DIGITS = ROOT / "scenarios" / "attack-lira-digits.yaml"
LIRA_TABULAR = ROOT / "scenarios" / "attack-lira-tabular.yaml"
STRONG_DP = ["privacy.mechanism=dpsgd", "privacy.params.noise_multiplier=4", "local.momentum=0"]


# --- ROC metrics on hand-made scores -------------------------------------------------------------------
def test_perfect_separation_gives_auc_one() -> None:
    member = np.array([True] * 5 + [False] * 5)
    metrics = roc_metrics(member, np.where(member, 2.0, -1.0) + np.linspace(0, 0.1, 10))
    assert metrics["auc"] == 1.0
    assert metrics["tpr_at_1pct_fpr"] == 1.0 and metrics["tpr_at_0.1pct_fpr"] == 1.0
    assert metrics["best_accuracy"] == 1.0


def test_identical_distributions_give_chance() -> None:
    rng = np.random.default_rng(0)
    member = np.arange(20_000) < 10_000
    metrics = roc_metrics(member, rng.standard_normal(20_000))
    assert abs(metrics["auc"] - 0.5) < 0.02
    assert metrics["tpr_at_1pct_fpr"] < 0.03


def test_tpr_at_fpr_on_a_hand_computed_case() -> None:
    # scores, high to low: M(0.9) N(0.8) M(0.7) M(0.6) N(0.5) N(0.4) M(0.3) N(0.2): 4 members, 4 non-members.
    member = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    metrics = roc_metrics(member, scores)
    assert metrics["tpr_at_1pct_fpr"] == 0.25  # only the threshold above 0.8 has FPR 0: one member of four
    assert metrics["auc"] == pytest.approx(11 / 16)  # member-over-non-member pairs: 4 + 3 + 3 + 1
    assert metrics["best_accuracy"] == pytest.approx(0.5 * (0.75 + 0.75))  # threshold at 0.6: TPR 3/4, FPR 1/4
    fpr, tpr = np.array([0.0, 0.25, 0.25, 0.5]), np.array([0.25, 0.25, 0.75, 1.0])
    assert tpr_at_fpr(fpr, tpr, 0.25) == 0.75 and tpr_at_fpr(fpr, tpr, 0.2) == 0.25


def test_non_finite_scores_are_refused() -> None:
    with pytest.raises(ValueError, match="finite"):
        roc_metrics(np.array([True, False]), np.array([np.nan, 0.0]))


# --- candidates and LiRA's pieces ------------------------------------------------------------------------
def test_non_members_copy_the_members_label_histogram() -> None:
    rng = np.random.default_rng(1)
    pool = np.repeat(np.arange(5), [2, 40, 40, 40, 40])
    wanted = np.array([0, 0, 0, 1, 1, 2])  # class 0 is short in the pool: one filler from another class
    chosen = matched(wanted, pool, rng)
    assert len(np.unique(chosen)) == 6
    counts = np.bincount(pool[chosen], minlength=5)
    assert counts[0] == 2 and counts[1] >= 2 and counts[2] >= 1 and counts.sum() == 6


def test_logit_confidence_is_the_log_odds_of_the_true_class() -> None:
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0], [300.0, -300.0, 0.0]])
    y = torch.tensor([0, 2, 1])
    p = torch.softmax(logits[:2].double(), dim=1)[torch.arange(2), y[:2]]
    phi = logit_confidence(logits, y)
    assert np.allclose(phi[:2], torch.log(p / (1 - p)).numpy())
    assert np.isfinite(phi[2]) and phi[2] == pytest.approx(-600.0)  # p_y ≈ e^-600: still finite


def test_inclusion_puts_every_candidate_in_half_the_references() -> None:
    keep = inclusion(16, 200, np.random.default_rng(0))
    assert keep.shape == (16, 200) and (keep.sum(axis=0) == 8).all()
    assert 70 < keep.sum(axis=1).min() and keep.sum(axis=1).max() < 130


@pytest.mark.parametrize("variant", ["online", "offline"])
@pytest.mark.parametrize("fixed_variance", [True, False])
def test_lira_beats_the_loss_threshold_when_difficulty_varies(variant: str, fixed_variance: bool) -> None:
    """Examples differ in intrinsic difficulty d_i (spread 3) far more than membership shifts φ (by 1): the raw
    statistic barely separates members, calibrating each example against its own references does."""
    rng = np.random.default_rng(0)
    n, references = 400, 16
    difficulty = 3.0 * rng.standard_normal(n)
    member = np.arange(n) < n // 2
    keep = inclusion(references, n, rng)
    reference_phi = difficulty + 1.0 * keep + 0.3 * rng.standard_normal((references, n))
    phi = difficulty + 1.0 * member + 0.3 * rng.standard_normal(n)
    raw = roc_metrics(member, phi)["auc"]
    calibrated = roc_metrics(member, lira_scores(phi, reference_phi, keep, variant=variant,  # type: ignore[arg-type]
                                                 fixed_variance=fixed_variance))["auc"]
    assert raw < 0.65
    assert calibrated > 0.9


def test_lira_needs_out_references() -> None:
    keep = np.ones((4, 3), dtype=bool)
    with pytest.raises(ValueError, match="OUT references"):
        lira_scores(np.zeros(3), np.zeros((4, 3)), keep)


# --- the site's model as the server rebuilds it ---------------------------------------------------------
def test_site_model_from_a_fedsgd_gradient_is_one_server_step() -> None:
    from medtasks.registry import get_task_class

    scenario = load(MIA)
    task = get_task_class("digits")(scenario.task_context())
    w_t = task.build_model().state_dict()
    rule = FedSGDClient(FedSGDParams())
    gradient = {name: torch.full_like(tensor, 0.5) for name, tensor in w_t.items()}
    observation = Observation(
        round=1, partition_id=0, sent=RecordDict({"arrays": ArrayRecord(w_t)}),
        reply=RecordDict({GRADIENT_KEY: ArrayRecord(gradient)}), side={}, uploads=rule.uploads(task.build_model()),
        local=LocalSection(), batches=list, members=lambda: task.client_data(0).train)
    rebuilt = site_model(task, observation, eta=0.2).state_dict()
    for name, tensor in w_t.items():
        assert torch.allclose(rebuilt[name], tensor - 0.1)


# --- end to end ---------------------------------------------------------------------------------------------
def _attack_results(run_dir_path: Path, kind: str, victims: list[int]) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (run_dir_path / "metrics.jsonl").read_text().splitlines()]
    attack = [record for record in records if record.get("phase") == "attack"]
    assert [record["victim"] for record in attack] == victims
    assert all(record["attacker"] == "server" and record["kind"] == kind for record in attack)
    summary = json.loads((run_dir_path / "summary.json").read_text())["attack"]
    assert summary["kind"] == kind and summary["headline"] == "auc" and summary["records"] == len(victims)
    pictures = sorted(path.name for path in (run_dir_path / "plots" / "attack").glob("*.png"))
    assert pictures == [f"{kind}-round{attack[0]['round']:03d}-site{pid}.png" for pid in victims]
    return attack, summary


@pytest.mark.slow
def test_loss_threshold_leaks_from_an_overfitted_site_model(tmp_path: Path) -> None:
    """Measured (seed 0): AUC 0.60, 0.77, 0.86, 0.81 for the four sites, mean 0.76; members' mean loss 0.012
    against 0.26 for the held-out images."""
    run_dir = run(load(MIA, [f"output.dir={tmp_path}"]))
    attack, summary = _attack_results(run_dir.path, "loss_threshold", [0, 1, 2, 3])
    assert summary["metrics"]["auc"] > 0.68
    assert all(record["metrics"]["auc"] > 0.55 for record in attack)
    assert summary["metrics"]["member_loss"] < summary["metrics"]["non_member_loss"]
    assert all(record["metrics"]["members"] == record["metrics"]["non_members"] == 32 for record in attack)


@pytest.mark.slow
def test_loss_threshold_is_near_chance_under_strong_dp_sgd(tmp_path: Path) -> None:
    """Measured (seed 0, σ = 4): AUC 0.48, 0.55, 0.55, 0.47, mean 0.51 (the model still reaches 25 % accuracy)."""
    run_dir = run(load(MIA, [f"output.dir={tmp_path}", *STRONG_DP]))
    attack, summary = _attack_results(run_dir.path, "loss_threshold", [0, 1, 2, 3])
    assert abs(summary["metrics"]["auc"] - 0.5) < 0.06
    assert all(abs(record["metrics"]["auc"] - 0.5) < 0.15 for record in attack)


def test_lira_end_to_end_on_the_global_model(tmp_path: Path) -> None:
    scenario = load(LIRA_DIGITS, [f"output.dir={tmp_path}", "strategy.rounds=1", "attack.rounds=[1]",
                                  "data.samples_per_client=20", "local.epochs=5", "attack.victims=[1]",
                                  "attack.params.references=4"])
    attack, summary = _attack_results(run(scenario).path, "lira", [1])
    metrics = attack[0]["metrics"]
    assert metrics["references"] == 4 and metrics["reference_epochs"] == 5
    assert metrics["members"] == metrics["non_members"] == 16
    assert 0.0 <= metrics["auc"] <= 1.0 and summary["metrics"]["auc"] == metrics["auc"]


# --- scenarios and refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [MIA, LIRA_DIGITS, LIRA_TABULAR])
def test_scenarios_validate(path: Path) -> None:
    scenario = load(path)
    assert scenario.attack is not None and scenario.engine.backend == "inprocess"


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.server_samples=0"], r"data\.server_samples: loss_threshold takes its non-members"),
    (["strategy.name=fedper", "strategy.params={}"], r"attack\.params\.target: FedPer keeps .* at the site"),
    (["strategy.name=local"], r"attack\.params\.target: .* sends no per-site model"),
    (["strategy.name=local", "attack.params.target=global"], r"attack\.params\.target: .* trains no global model"),
    (["strategy.name=fedper", "attack.params.target=global"], r"attack\.params\.target: FedPer's global model is"),
    (["strategy.name=centralized", "strategy.min_clients=1"], r"attack\.params\.target: .* sends no per-site"),
    (["attack.kind=lira", "attack.params.references=1"], r"attack\.params\.references"),
    (["attack.params.epochs=3"], r"attack\.params\.epochs: unknown key"),
    (["attack.victims=[]"], r"attack\.victims: .* needs at least one partition id"),
])
def test_refusals_are_one_line_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ScenarioError, match=message) as caught:
        load(MIA, overrides)
    assert "\n" not in str(caught.value)


def test_a_task_without_class_logits_is_refused() -> None:
    with pytest.raises(ScenarioError, match=r"task\.name: loss_threshold scores the class logits"):
        load(ROOT / "scenarios" / "quickstart.yaml",
             ["attack={kind: loss_threshold, victims: [0], params: {}}", "data.server_samples=8"])
