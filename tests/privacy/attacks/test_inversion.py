"""Gradient inversion (DLG, iDLG, Inverting Gradients): the acceptance tests of the attack issue on digits,
end-to-end runs writing attack records, summary and pictures, the defenses, and the refusals."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from medtasks.registry import get_task_class
from medtasks.seeding import torch_generator
from privacy.attacks import dlg, idlg
from privacy.attacks import inverting_gradients as ig
from privacy.attacks.image_metrics import reconstruction_quality
from privacy.attacks.inversion_matching import Problem, batch_problem, gradient_distance
from privacy.attacks.inversion_scoring import image_scores, label_accuracy, score
from privacy.attacks.inversion_views import VIEWS, TaskView
from server.results import RunDirectory
from server.scenario import Scenario, ScenarioError, load
from tests.helpers import ROOT, run, single_torch_thread

SCENARIOS = ROOT / "scenarios"
IDLG, DLG, IG_FEDAVG = (SCENARIOS / f"attack-{name}-digits.yaml" for name in ("idlg", "dlg", "ig-fedavg"))
ONE_ROUND = ["strategy.rounds=1", "attack.rounds=[1]", "attack.victims=[0]", "partition.clients=2",
             "data.samples_per_client=20", "data.server_samples=20"]

one_thread = pytest.fixture(single_torch_thread)


def tiny(path: Path, tmp_path: Path, *overrides: str) -> Scenario:
    """The scenario file shrunk to one round with one victim, run under ``tmp_path``."""
    return load(path, [*ONE_ROUND, f"output.dir={tmp_path / 'runs'}", *overrides])


def attack_records(run_dir: RunDirectory) -> list[dict]:
    return [record for record in run_dir.read_metrics() if record["phase"] == "attack"]


@pytest.fixture(scope="module")
def digits() -> Iterator[tuple[object, TaskView, torch.Tensor, torch.Tensor]]:
    """The digits task of the iDLG scenario (8×8, sigmoid LeNet), its view and its pool."""
    scenario = load(IDLG)
    task = get_task_class("digits")(scenario.task_context())
    x, y = task.pool()
    yield task, VIEWS["digits"](task), x, y


def problem(digits: tuple, index: int, size: int = 1) -> Problem:
    """A site's exact gradient of pool images ``index .. index + size - 1`` at a fresh LeNet."""
    task, view, x, y = digits
    model = task.build_model()
    model.train()
    return batch_problem(task, view, model, x[index:index + size], y[index:index + size],
                         torch_generator(0, "test-inversion", index))


# --- acceptance: the attacks on an undefended LeNet-sigmoid gradient --------------------------------------
def test_idlg_extracts_the_label_in_every_trial(digits: tuple) -> None:
    images = range(0, 200, 20)  # 10 images, batch 1
    labels = [int(idlg.infer_labels(problem(digits, i))[0]) for i in images]
    assert labels == [int(digits[3][i]) for i in images]


def test_batch_labels_from_the_heuristic(digits: tuple) -> None:
    """Yin et al.'s row-minimum heuristic on 10 batches of 2: most labels right (measured 0.95-0.975), not all."""
    accuracies = [label_accuracy(idlg.infer_labels(problem(digits, 2 * t, size=2)), digits[3][2 * t:2 * t + 2])
                  for t in range(10)]
    assert sum(accuracies) / len(accuracies) >= 0.85, accuracies


def test_idlg_and_dlg_reconstruct_single_images(digits: tuple, one_thread: None) -> None:
    params = idlg.IDLGParams()
    for attack, index in ((idlg, 0), (idlg, 40), (dlg, 60)):
        pr = problem(digits, index)
        result = attack.reconstruct(pr, params)
        quality = reconstruction_quality(result.x.clamp(0, 1), digits[2][index:index + 1])
        assert quality["psnr"] > 40.0, (attack.__name__, index, quality)  # measured 70-90 dB
        assert result.labels is not None and int(result.labels[0]) == int(digits[3][index])


def test_inverting_gradients_reconstructs_a_single_image(digits: tuple, one_thread: None) -> None:
    pr = problem(digits, 20)
    result = ig.reconstruct(pr, ig.InvertingGradientsParams(iterations=300))
    quality = reconstruction_quality(result.x, digits[2][20:21])
    assert quality["psnr"] > 25.0, quality  # measured ~40 dB


def test_noise_on_the_gradient_defeats_idlg(digits: tuple, one_thread: None) -> None:
    """The Gaussian mechanism on the gradient (clip to C = 1, σ = 0.1 per entry) drops the PSNR sharply."""
    pr = problem(digits, 0)
    generator = torch_generator(0, "test-inversion", "noise")
    norm = torch.sqrt(sum((g**2).sum() for g in pr.observed.gradient.values()))
    scale = min(1.0, 1.0 / float(norm))
    pr.observed.gradient = {name: g * scale + 0.1 * torch.randn(g.shape, generator=generator)
                            for name, g in pr.observed.gradient.items()}
    result = idlg.reconstruct(pr, idlg.IDLGParams(iterations=50))
    assert reconstruction_quality(result.x.clamp(0, 1), digits[2][:1])["psnr"] < 15.0


def test_distances() -> None:
    a = [torch.tensor([1.0, 0.0]), torch.tensor([[2.0]])]
    assert float(gradient_distance(a, a, "euclidean")) == 0.0
    assert float(gradient_distance(a, [2 * t for t in a], "cosine")) == pytest.approx(0.0, abs=1e-6)
    assert float(gradient_distance(a, [-t for t in a], "cosine")) == pytest.approx(2.0)
    assert label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([1, 2, 3])) == pytest.approx(2 / 3)
    assert float(ig.total_variation(torch.zeros(1, 1, 4, 4))) == 0.0


# --- end to end: real federated runs ----------------------------------------------------------------------
def check_run(run_dir: RunDirectory, kind: str) -> dict:
    """The attack records, the summary's attack block and the picture exist; returns the first record's metrics."""
    records = attack_records(run_dir)
    assert [(r["round"], r["victim"], r["attacker"], r["kind"]) for r in records] == [(1, 0, "server", kind)]
    summary = json.loads((run_dir.path / "summary.json").read_text())["attack"]
    assert summary["kind"] == kind and summary["headline"] == "psnr" and summary["records"] == 1
    assert (run_dir.plots / "attack" / f"{kind}-round001-site0.png").is_file()
    metrics = records[0]["metrics"]
    assert set(metrics) >= {"psnr", "ssim", "mse", "gradient_distance", "iterations", "batch_size"}
    return metrics


def test_idlg_end_to_end_on_fedsgd(tmp_path: Path, one_thread: None) -> None:
    metrics = check_run(run(tiny(IDLG, tmp_path)), "idlg")
    assert metrics["label_accuracy"] == 1.0 and metrics["psnr"] > 40.0 and metrics["batch_size"] == 1


def test_dlg_end_to_end_on_fedsgd(tmp_path: Path, one_thread: None) -> None:
    metrics = check_run(run(tiny(DLG, tmp_path, "attack.params.iterations=100")), "dlg")
    assert metrics["label_accuracy"] == 1.0 and metrics["psnr"] > 30.0


def test_idlg_reads_one_fedavg_step_as_its_gradient(tmp_path: Path, one_thread: None) -> None:
    """FedAvg with one plain SGD step: (w_t − w_k)/η is the gradient, and the attack works as on FedSGD."""
    scenario = tiny(IDLG, tmp_path, "strategy={name: fedavg, rounds: 1, min_clients: 2}",
                    "local={epochs: 1, max_steps: 1, batch_size: 1, optimizer: sgd, lr: 0.1}")
    metrics = check_run(run(scenario), "idlg")
    assert metrics["label_accuracy"] == 1.0 and metrics["psnr"] > 30.0


@pytest.mark.slow
def test_inverting_gradients_unrolls_fedavg_steps(tmp_path: Path, one_thread: None) -> None:
    """Geiping's multi-step variant beats Δw/(Kη) on K = 2 different single-image batches."""
    overrides = ("local.batch_size=1", "local.max_steps=2", "attack.params.iterations=300")
    unrolled = check_run(run(tiny(IG_FEDAVG, tmp_path, *overrides, "attack.params.multistep=true")),
                         "inverting_gradients")
    averaged = check_run(run(tiny(IG_FEDAVG, tmp_path, *overrides, "attack.params.multistep=false")),
                         "inverting_gradients")
    assert unrolled["batch_size"] == 2 and averaged["batch_size"] == 1
    assert unrolled["psnr"] > 25.0 and unrolled["psnr"] > averaged["psnr"] + 10.0


def test_strong_pruning_defeats_idlg(tmp_path: Path, one_thread: None) -> None:
    """defense.prune 0.9 (Zhu et al. 2019, Sec. 5) through a real run: the PSNR falls far below the undefended."""
    metrics = check_run(run(tiny(IDLG, tmp_path, "defense.prune=0.9", "attack.params.iterations=50")), "idlg")
    assert metrics["psnr"] < 15.0


def test_nbafl_noise_defeats_idlg(tmp_path: Path, one_thread: None) -> None:
    """NbAFL's clipping and noise on a one-step FedAvg upload, through a real run."""
    scenario = tiny(IDLG, tmp_path, "strategy={name: fedavg, rounds: 1, min_clients: 2}",
                    "local={epochs: 1, max_steps: 1, batch_size: 1, optimizer: sgd, lr: 0.1}",
                    "privacy={mechanism: nbafl, params: {clip: 1.0, epsilon: 10.0}}", "attack.params.iterations=50")
    assert check_run(run(scenario), "idlg")["psnr"] < 15.0


# --- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("path", "overrides", "key"), [
    (IDLG, ["strategy={name: local, rounds: 2}"], "strategy.name"),
    (DLG, ["strategy={name: centralized, rounds: 2}"], "strategy.name"),
    (IDLG, ["task={name: tabular, model: mlp}"], "task.name"),
    (IG_FEDAVG, ["local.optimizer=adam"], "attack.params.multistep"),
    (IG_FEDAVG, ["strategy={name: fedsgd, rounds: 2, params: {batch_size: 1}}", "local.momentum=0.0"],
     "attack.params.multistep"),
    (IDLG, ["strategy={name: fedper, rounds: 2}"], "strategy.name"),
    (IDLG, ["attack.params.iterations=0"], "attack.params"),
])
def test_refusals_name_the_key(path: Path, overrides: list[str], key: str) -> None:
    with pytest.raises(ScenarioError) as raised:
        load(path, overrides)
    message = str(raised.value)
    assert key in message and "\n" not in message.strip(), message


def test_segmentation_labels_cannot_be_inferred() -> None:
    with pytest.raises(ScenarioError, match="attack.params.labels"):
        load(SCENARIOS / "attack-ig-segmentation.yaml", ["attack.params.labels=infer"])


def test_inverting_gradients_end_to_end_on_segmentation(tmp_path: Path, one_thread: None) -> None:
    """A U-Net slice gradient (BatchNorm in training mode), masks known: records, picture, no label metric."""
    scenario = load(SCENARIOS / "attack-ig-segmentation.yaml",
                    [f"output.dir={tmp_path / 'runs'}", "attack.params.iterations=20"])
    metrics = check_run(run(scenario), "inverting_gradients")
    assert "label_accuracy" not in metrics and metrics["batch_size"] == 1 and metrics["iterations"] == 20
    assert 0.0 < metrics["psnr"] < 100.0


# --- CT: the FBP input and the reference image through FBPConvNet -------------------------------------------
IG_CT = SCENARIOS / "attack-ig-ct.yaml"


@pytest.fixture(scope="module")
def ct() -> Iterator[tuple[object, TaskView, tuple]]:
    """The CT task of the attack-ig-ct scenario (32×32, FBPConvNet [8, 16]), its view and one training slice."""
    task = get_task_class("ct")(load(IG_CT).task_context())
    batch = next(iter(torch.utils.data.DataLoader(task.client_data(0).train, batch_size=1)))
    yield task, VIEWS["ct"](task), batch


def ct_problem(ct: tuple, head: float = 0.1) -> Problem:
    """The exact gradient of one slice at an FBPConvNet whose zero-initialised 1×1 head holds N(0, head²) weights
    (a model past its first rounds)."""
    task, view, batch = ct
    model = task.build_model()
    model.train()
    with torch.no_grad():
        model.head.weight.copy_(head * torch.randn(model.head.weight.shape, generator=torch_generator(0, "test-ct")))
    x, reference = view.pair(batch)
    return batch_problem(task, view, model, x, reference, torch_generator(0, "test-inversion", "ct"),
                         public=batch)


def test_a_fresh_fbpconvnet_reveals_only_its_head(ct: tuple) -> None:
    """x̂ = x + W·U(x) with W = 0 at initialisation: round 1's gradient holds nothing but ∂L/∂W, ∂L/∂b."""
    gradient = ct_problem(ct, head=0.0).observed.gradient
    nonzero = {name for name, value in gradient.items() if bool(value.abs().max() > 0)}
    assert nonzero == {"head.weight", "head.bias"}


def test_inverting_gradients_reconstructs_the_fbp_input(ct: tuple, one_thread: None) -> None:
    pr = ct_problem(ct)
    result = ig.reconstruct(pr, ig.InvertingGradientsParams(iterations=300, labels="known", tv=0.01, init="uniform"))
    x, _ = ct[1].pair(ct[2])
    metrics = score(result, x, ct[2][2], ct[1], torch.tensor([0]))
    assert metrics["psnr"] > 20.0, metrics  # measured 25.8 dB
    assert "reference_psnr" not in metrics  # a known reference is not scored


def test_the_reference_follows_from_the_input(ct: tuple, one_thread: None) -> None:
    """Given the exact FBP input, the gradient is affine in the reference: the Euclidean refit recovers it."""
    pr = ct_problem(ct)
    x, reference = ct[1].pair(ct[2])
    params = ig.InvertingGradientsParams(labels="infer")
    fitted = ig.fit_reference(pr, params, x, torch.full_like(reference, 0.5).requires_grad_(True), pr.target())
    assert image_scores(fitted, reference, ct[1])["psnr"] > 40.0  # measured 48.8 dB


def test_inverting_gradients_end_to_end_on_ct(tmp_path: Path, one_thread: None) -> None:
    """FedSGD, attack in round 2, FBP input and reference inferred jointly: both scored, a four-column picture."""
    scenario = load(IG_CT, [f"output.dir={tmp_path / 'runs'}", "attack.params.iterations=10",
                            "attack.params.restarts=1"])
    run_dir = run(scenario)
    records = attack_records(run_dir)
    assert [(r["round"], r["victim"], r["kind"]) for r in records] == [(2, 0, "inverting_gradients")]
    metrics = records[0]["metrics"]
    assert {"psnr", "ssim", "reference_psnr", "reference_ssim"} <= set(metrics) and metrics["batch_size"] == 1
    assert json.loads((run_dir.path / "summary.json").read_text())["attack"]["records"] == 1
    assert (run_dir.plots / "attack" / "inverting_gradients-round002-site0.png").is_file()


def test_dlg_end_to_end_on_a_ct_fedavg_update(tmp_path: Path, one_thread: None) -> None:
    """DLG's joint L-BFGS on Δw/η of one local SGD step (FedAvg): the reference is reconstructed and scored."""
    scenario = load(IG_CT, [f"output.dir={tmp_path / 'runs'}", "strategy={name: fedavg, rounds: 2, min_clients: 2}",
                            "local={epochs: 1, max_steps: 1, batch_size: 1, optimizer: sgd, lr: 0.1}",
                            "attack={kind: dlg, victims: [0], rounds: [2], params: {iterations: 3}}"])
    records = attack_records(run(scenario))
    assert len(records) == 1 and records[0]["kind"] == "dlg"
    assert {"psnr", "reference_psnr"} <= set(records[0]["metrics"])


@pytest.mark.parametrize(("overrides", "key"), [
    (["attack={kind: idlg, victims: [0], rounds: [2]}"], "task.name"),
    (["task.model=unrolled"], "task.model"),
])
def test_ct_refusals_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ScenarioError) as raised:
        load(IG_CT, overrides)
    message = str(raised.value)
    assert key in message and "\n" not in message.strip(), message
