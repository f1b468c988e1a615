"""Membership inference: the published-style digits anchor and the federated scenarios, timed on one core.

    python benchmarks/membership.py [--quick]

Prints a markdown table (what, command, numbers, seconds):

* **centralised anchor** — digits (all 1,797 images, 8×8), 256-unit MLP trained on a random half; candidates:
  every image (members: that half, non-members: the rest). Loss threshold (Yeom et al. 2018) and LiRA
  (Carlini et al. 2022, online, fixed variance) with 16 and 64 reference MLPs trained like the target on
  random halves (each image IN for half of them). The issue's anchor: loss threshold AUC ≈ 0.51, LiRA with
  16–64 references AUC ≈ 0.61, TPR@1%FPR ≈ 7–8 %.
* **federated** — ``scenarios/attack-mia-digits.yaml``, ``attack-lira-digits.yaml``, ``attack-lira-tabular.yaml``
  and the loss threshold on the same candidates, run in-process; the speed target is "one membership-inference
  evaluation with 16 reference models on the tabular or digits task in a few minutes".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from medtasks.registry import get_task_class  # noqa: E402
from medtasks.scenario import LocalSection  # noqa: E402
from medtasks.seeding import numpy_rng, torch_generator  # noqa: E402
from privacy.attacks.lira import Recipe, inclusion, lira_scores, logit_confidence, train_reference  # noqa: E402
from privacy.attacks.membership import example_losses, logits_of, roc_metrics  # noqa: E402
from server.engines import run_scenario  # noqa: E402
from server.progress import make_progress  # noqa: E402
from server.results import RunDirectory  # noqa: E402
from server.scenario import load  # noqa: E402

SEED = 0
ANCHOR_RECIPE = LocalSection(epochs=1, batch_size=32, optimizer="adam", lr=1e-3)
ANCHOR_EPOCHS = 30  # epochs of the target and of every reference


def numbers(metrics: dict[str, float]) -> str:
    """AUC and TPR at 1 % / 0.1 % FPR as a table cell."""
    return (f"AUC {metrics['auc']:.3f}, TPR@1%FPR {100 * metrics['tpr_at_1pct_fpr']:.1f} %, "
            f"TPR@0.1%FPR {100 * metrics['tpr_at_0.1pct_fpr']:.1f} %")


def centralised_anchor(references: list[int]) -> list[tuple[str, str, str, float]]:
    """The digits anchor: target on a random half, loss threshold and LiRA with each count of references."""
    scenario = load(ROOT / "scenarios" / "attack-lira-digits.yaml")
    task = get_task_class("digits")(scenario.task_context())
    x, y = task.pool()  # type: ignore[attr-defined]  # the digits task's whole pool
    n = len(y)
    steps = ANCHOR_EPOCHS * int(np.ceil(n / 2 / ANCHOR_RECIPE.batch_size))
    plan = Recipe(ANCHOR_RECIPE, steps)
    member = np.zeros(n, dtype=bool)
    member[numpy_rng(SEED, "anchor", "target").permutation(n)[: n // 2]] = True
    command = "python benchmarks/membership.py"
    started = time.perf_counter()
    target = train_reference(task.build_model(), task.loss, x[member], y[member], plan,
                             torch_generator(SEED, "anchor", "target"))
    logits = logits_of(task, target, x, y)
    seconds = time.perf_counter() - started
    rows = [("digits centralised, MLP 256, half the pool, loss threshold", command,
             numbers(roc_metrics(member, -example_losses(logits, y))) +
             f"; test accuracy {float((logits.argmax(1) == y)[~member].double().mean()):.3f}", seconds)]
    phi = logit_confidence(logits, y)
    for count in references:
        started = time.perf_counter()
        keep = inclusion(count, n, numpy_rng(SEED, "anchor", "inclusion", count))
        reference_phi = np.stack([
            logit_confidence(logits_of(task, train_reference(task.build_model(), task.loss, x[keep[r]], y[keep[r]],
                                                             plan, torch_generator(SEED, "anchor", count, r)), x, y), y)
            for r in range(count)])
        for variant in ("online", "offline"):
            scores = lira_scores(phi, reference_phi, keep, variant=variant)  # type: ignore[arg-type]
            rows.append((f"digits centralised, LiRA {variant}, {count} references", command,
                         numbers(roc_metrics(member, scores)), time.perf_counter() - started))
    return rows


def federated(path: Path, overrides: list[str], what: str) -> tuple[str, str, str, float]:
    """One scenario run in-process; the summary's attack metrics."""
    with tempfile.TemporaryDirectory() as directory:
        scenario = load(path, [*overrides, f"output.dir={directory}"])
        run_dir = RunDirectory.create(directory, scenario.name)
        run_dir.write_scenario(scenario.to_yaml())
        started = time.perf_counter()
        run_scenario(scenario, run_dir, make_progress(interactive=False))
        seconds = time.perf_counter() - started
        attack = json.loads((run_dir.path / "summary.json").read_text())["attack"]
    command = f"medfed run {path.relative_to(ROOT)}" + "".join(f" --set {item}" for item in overrides)
    return what, command, numbers(attack["metrics"]) + f" (mean of {attack['records']} victims)", seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 references only in the anchor")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = centralised_anchor([16] if args.quick else [16, 64])
    scenarios = ROOT / "scenarios"
    mia, lira_digits, lira_tabular = (scenarios / f"attack-{name}.yaml" for name in
                                      ("mia-digits", "lira-digits", "lira-tabular"))
    rows += [
        federated(mia, [], "digits, 4 sites × 32 train, site model, loss threshold"),
        federated(mia, ["attack.kind=lira"], "digits, 4 sites × 32 train, site model, LiRA 16 references"),
        federated(mia, ["privacy.mechanism=dpsgd", "privacy.params.noise_multiplier=4", "local.momentum=0"],
                  "digits, as above under DP-SGD σ = 4, loss threshold"),
        federated(lira_digits, [], "digits, 4 sites × 48 train, global model, LiRA 16 references"),
        federated(lira_digits, ["attack.kind=loss_threshold", "attack.params={target: global}"],
                  "digits, 4 sites × 48 train, global model, loss threshold"),
        federated(lira_tabular, [], "tabular, 5 sites × 80 train, site model, LiRA 16 references"),
        federated(lira_tabular, ["attack.kind=loss_threshold", "attack.params={target: site}"],
                  "tabular, 5 sites × 80 train, site model, loss threshold"),
    ]
    print("| what | command | numbers | seconds |\n|---|---|---|---|")
    for what, command, result, seconds in rows:
        print(f"| {what} | `{command}` | {result} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
