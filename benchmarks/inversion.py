"""Gradient inversion on digits, single images (batch 1): iDLG and DLG label accuracy, PSNR and time on one core.

The protocol of Zhao et al. 2020 (iDLG, arXiv:2001.02610, Table 1): the sigmoid LeNet at a fresh uniform(-0.5,
0.5) initialisation, one image per gradient, L-BFGS for 300 steps. Each image gets a fresh model (its own seed).
Published anchor (MNIST, 28x28): label accuracy iDLG 100 %, DLG 89.9 %.

    python benchmarks/inversion.py                   # 50 images at 8x8, 10 at 32x32, Inverting Gradients on 10
    python benchmarks/inversion.py --images 100 --large 20

CT rows (scenarios/attack-ig-ct.yaml: 32x32 slices, FBPConvNet [8, 16]): one slice's exact gradient at a model whose
zero-initialised 1x1 head holds N(0, 0.1^2) weights (a fresh one reveals only the head), Inverting Gradients with
the reference known or inferred jointly, and DLG's joint L-BFGS; PSNR of the FBP input and of the reference.

Prints a markdown table: what, command, numbers, seconds (per image, mean).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medtasks.registry import get_task_class
from medtasks.seeding import derive_seed, torch_generator
from privacy.attacks import dlg, idlg
from privacy.attacks import inverting_gradients as ig
from privacy.attacks.image_metrics import reconstruction_quality
from privacy.attacks.inversion_matching import batch_problem
from privacy.attacks.inversion_scoring import label_accuracy, score
from privacy.attacks.inversion_views import VIEWS
from server.scenario import load

SCENARIO = Path(__file__).resolve().parents[1] / "scenarios" / "attack-idlg-digits.yaml"
ATTACKS = {"idlg": (idlg, idlg.IDLGParams()), "dlg": (dlg, dlg.DLGParams()),
           "inverting_gradients": (ig, ig.InvertingGradientsParams())}


def measure(kind: str, image_size: int, images: int) -> tuple[float, float, float, float]:
    """``(label accuracy, mean PSNR, median PSNR, mean seconds)`` of ``kind`` on ``images`` pool images."""
    scenario = load(SCENARIO, [f"task.params.image_size={image_size}"])
    task = get_task_class("digits")(scenario.task_context())
    view = VIEWS["digits"](task)
    x, y = task.pool()
    module, params = ATTACKS[kind]
    picks = torch.randperm(len(y), generator=torch_generator(0, "benchmark", "images"))[:images]
    labels, psnrs, seconds = [], [], []
    for index in picks.tolist():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(0, "benchmark", "model", index))
            model = task.build_model()
            for parameter in model.parameters():  # a fresh uniform(-0.5, 0.5) LeNet per image, as in the protocol
                torch.nn.init.uniform_(parameter, -0.5, 0.5)
        model.train()
        problem = batch_problem(task, view, model, x[index:index + 1], y[index:index + 1],
                                torch_generator(0, "benchmark", kind, index))
        started = time.perf_counter()
        result = module.reconstruct(problem, params)  # type: ignore[attr-defined]
        seconds.append(time.perf_counter() - started)
        psnrs.append(reconstruction_quality(result.x.clamp(0, 1), x[index:index + 1])["psnr"])
        labels.append(label_accuracy(result.labels, y[index:index + 1]))
    return statistics.mean(labels), statistics.mean(psnrs), statistics.median(psnrs), statistics.mean(seconds)


CT = Path(__file__).resolve().parents[1] / "scenarios" / "attack-ig-ct.yaml"
CT_ATTACKS = {"inverting_gradients, reference known": (ig, ig.InvertingGradientsParams(
                  iterations=300, labels="known", tv=0.01, init="uniform")),
              "inverting_gradients, reference inferred": (ig, ig.InvertingGradientsParams(
                  iterations=300, labels="infer", tv=0.01, init="uniform")),
              "dlg, reference inferred": (dlg, dlg.DLGParams(iterations=100))}


def measure_ct(what: str, slices: int) -> tuple[float, float, float]:
    """``(mean FBP-input PSNR, mean reference PSNR (NaN when known), mean seconds)`` on ``slices`` slices."""
    scenario = load(CT)
    task = get_task_class("ct")(scenario.task_context())
    view = VIEWS["ct"](task)
    module, params = CT_ATTACKS[what]
    inputs, references, seconds = [], [], []
    for index, batch in zip(range(slices), DataLoader(task.client_data(0).train, batch_size=1), strict=False):
        model = task.build_model()
        model.train()
        with torch.no_grad():
            model.head.weight.copy_(0.1 * torch.randn(model.head.weight.shape,
                                                      generator=torch_generator(0, "benchmark", "ct", index)))
        x, reference = view.pair(batch)
        problem = batch_problem(task, view, model, x, reference,
                                torch_generator(0, "benchmark", what, index), public=batch)
        started = time.perf_counter()
        result = module.reconstruct(problem, params)  # type: ignore[attr-defined]
        seconds.append(time.perf_counter() - started)
        metrics = score(result, x, reference, view, torch.tensor([0]))
        inputs.append(metrics["psnr"])
        references.append(metrics.get("reference_psnr", float("nan")))
    return statistics.mean(inputs), statistics.mean(references), statistics.mean(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50, help="images at 8x8 for iDLG and DLG")
    parser.add_argument("--large", type=int, default=10, help="images at 32x32 for iDLG and DLG, and for IG at 8x8")
    parser.add_argument("--ct", type=int, default=3, help="CT slices per CT row")
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = "python benchmarks/inversion.py"
    print("| what | command | numbers | seconds |")
    print("|---|---|---|---|")
    for kind, size, count in (("idlg", 8, args.images), ("dlg", 8, args.images), ("idlg", 32, args.large),
                              ("dlg", 32, args.large), ("inverting_gradients", 8, args.large)):
        accuracy, mean_psnr, median_psnr, seconds = measure(kind, size, count)
        print(f"| {kind}, digits {size}x{size}, batch 1, {count} images | `{command}` | label accuracy "
              f"{100 * accuracy:.1f} %, PSNR mean {mean_psnr:.1f} dB, median {median_psnr:.1f} dB | "
              f"{seconds:.2f} per image |", flush=True)
    for what in CT_ATTACKS:
        fbp, reference, seconds = measure_ct(what, args.ct)
        print(f"| {what}, CT 32x32, batch 1, {args.ct} slices | `{command}` | PSNR FBP input {fbp:.1f} dB, "
              f"reference {reference:.1f} dB | {seconds:.2f} per slice |", flush=True)


if __name__ == "__main__":
    main()
