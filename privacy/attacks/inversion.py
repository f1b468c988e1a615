"""Gradient inversion by an honest-but-curious server: the params, checks and server half DLG, iDLG and Inverting
Gradients share.

In an attack round the server takes a victim's train reply, recovers the gradient it reveals
(:mod:`privacy.attacks.inversion_observed`), optimises candidate data so that their gradient at w_t matches it
(:mod:`privacy.attacks.inversion_matching`, with the task's inputs, labels and loss as
:mod:`privacy.attacks.inversion_views` exposes them) and scores the reconstruction against the ground truth a
simulation knows (:mod:`privacy.attacks.inversion_scoring`). This module holds :class:`InversionParams`,
:func:`check_inversion` (what no inversion can run, with a one-line reason: tabular rows, MIL bags, strategies
that upload nothing per site) and :class:`InversionAttack`, the server half that ties these together; it
re-exports the public names of the other modules.

References
----------
Zhu, Liu, Han 2019, "Deep Leakage from Gradients", NeurIPS (arXiv:1906.08935).
Zhao, Mopuri, Bilen 2020, "iDLG: Improved Deep Leakage from Gradients" (arXiv:2001.02610).
Geiping, Bauermeister, Dröge, Moeller 2020, "Inverting Gradients - How easy is it to break privacy in federated
learning?", NeurIPS (arXiv:2003.14053).
Yin et al. 2021, "See through Gradients: Image Batch Recovery via GradInversion", CVPR (arXiv:2104.07586).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field
from torch import nn

from medtasks.seeding import torch_generator
from privacy.attacks.base import AttackParams, AttackSetting, Observation, Outcome, model_sent
from privacy.attacks.inversion_matching import (
    CONVERGED,
    Problem,
    Reconstruction,
    batch_problem,
    candidate_gradient,
    extract_labels,
    gradient_distance,
    last_linear,
    lbfgs_match,
    soft_cross_entropy,
    soft_label_loss,
)
from privacy.attacks.inversion_observed import GRADIENT_KINDS, ObservedGradient, observed_gradient
from privacy.attacks.inversion_scoring import (
    batch_truth,
    draw,
    ground_truth,
    image_scores,
    label_accuracy,
    pair_with_truth,
    panels,
    score,
    truth_batches,
)
from privacy.attacks.inversion_views import VIEWS, LossOf, TaskView, ct_loss, ct_pair, first_two, task_loss

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm

__all__ = [
    "CONVERGED", "GRADIENT_KINDS", "REFUSED", "VIEWS", "InversionAttack", "InversionParams", "Labels", "LossOf",
    "ObservedGradient", "Problem", "Reconstruct", "Reconstruction", "TaskView", "batch_problem", "batch_truth",
    "candidate_gradient", "check_inversion", "ct_loss", "ct_pair", "draw", "extract_labels", "first_two",
    "gradient_distance", "ground_truth", "image_scores", "label_accuracy", "last_linear", "lbfgs_match",
    "observed_gradient", "pair_with_truth", "panels", "score", "soft_cross_entropy", "soft_label_loss",
    "task_loss", "truth_batches",
]

Labels = Literal["infer", "known"]


class InversionParams(AttackParams):
    """``attack.params`` every gradient inversion takes."""

    iterations: int = Field(300, ge=1, le=100_000, description="optimiser iterations per reconstruction")
    init: Literal["uniform", "normal"] = Field(
        "uniform", description="the dummy data's seeded start: U(lo, hi) of the data range, or N(0, 1)")
    max_batch: int = Field(8, ge=1, le=64, description="largest batch a reconstruction is attempted for")


REFUSED = {
    "tabular": "rows of standardised features have no image metric (PSNR/SSIM) worth reporting",
    "mil": "a bag's tiles pass through attention pooling to one bag label; tiles are not recoverable one by one",
    "ct": "its labels are reference images, not classes to read from the last layer; use dlg or "
          "inverting_gradients",
    "segmentation": "its labels are masks, not classes to read from the last layer; use inverting_gradients",
}


def check_inversion(scenario: Scenario, algorithm: Algorithm, tasks: Sequence[str], kind: str) -> None:
    """Refuse what no gradient inversion can run (one-line ``ValueError`` naming the key).

    Parameters
    ----------
    scenario : Scenario
        The scenario with its ``attack`` section.
    algorithm : Algorithm
        The scenario's strategy.
    tasks : sequence of str
        The task names this attack supports (a subset of :data:`privacy.attacks.inversion_views.VIEWS`).
    kind : str
        The attack's ``attack.kind``, for the message.
    """
    if algorithm.combine in ("none", "pooled"):
        raise ValueError(f"strategy.name: {kind} inverts a site's upload, and {scenario.strategy.name} uploads "
                         f"nothing per site to the server")
    name = scenario.task.name
    if name not in tasks:
        reason = REFUSED.get(name, "only " + ", ".join(tasks) + " are supported")
        raise ValueError(f"task.name: {kind} does not attack the {name} task ({reason})")
    if name == "ct" and (scenario.task.model or "fbpconvnet") != "fbpconvnet":
        raise ValueError(f"task.model: {kind} attacks FBPConvNet; the {scenario.task.model} network also reads the "
                         f"site's measured sinogram, private data this attack does not reconstruct")


# --- the server half --------------------------------------------------------------------------------------
Reconstruct = Callable[[Problem], Reconstruction]


class InversionAttack:
    """The server half every gradient inversion shares: build the problem, reconstruct, score, draw.

    Parameters
    ----------
    setting : AttackSetting
        The scenario, the attack's params and the task.
    kind : str
        ``attack.kind`` (seeds and picture names).
    reconstruct : callable
        The attack itself: :class:`Problem` → :class:`Reconstruction`.
    known_labels : bool
        Whether the attacker is given the batch's true labels / masks (:attr:`Problem.labels`).
    whole_round : bool
        Reconstruct every sample of the round's K steps, min(n_k, K·B) of them (the multi-step variant),
        rather than one batch of B.
    """

    def __init__(self, setting: AttackSetting, kind: str, reconstruct: Reconstruct, *, known_labels: bool,
                 whole_round: bool = False) -> None:
        self.setting, self.kind, self.reconstruct = setting, kind, reconstruct
        self.known_labels, self.whole_round = known_labels, whole_round
        self.view = VIEWS[setting.scenario.task.name](setting.task)

    def observe(self, observation: Observation) -> list[Outcome]:
        """Invert the victim's reply and score it (one :class:`Outcome`, victim = its partition id)."""
        scenario = self.setting.scenario
        model = model_sent(self.setting.task, observation.sent)
        model.train()
        observed = observed_gradient(observation, model)
        batches = truth_batches(observation, scenario)
        truth_x, truth_labels = ground_truth(batches, self.view)
        batch = batch_truth(batches, scenario, self.view)
        size = batch[0].shape[0] if batch is not None else min(observation.local.batch_size, truth_x.shape[0])
        if self.whole_round:
            examples = int(observation.reply.metric_records["metrics"]["num-examples"])  # type: ignore[arg-type]
            size = min(examples, observed.steps * observation.local.batch_size, truth_x.shape[0])
        cap = getattr(self.setting.params, "max_batch", size)
        if size > cap:
            raise ValueError(f"attack.params.max_batch: site {observation.partition_id}'s batch holds {size} "
                             f"samples, more than max_batch {cap}")
        labels = None
        if self.known_labels:
            labels = batch[1] if batch is not None else truth_labels[:size]
        problem = Problem(model, observed, self.view, size, self.view.loss(self.setting.task, batches[0]), labels,
                          torch_generator(scenario.seed, self.kind, observation.round, observation.partition_id),
                          observation)
        with torch.random.fork_rng(devices=[]), torch.enable_grad():  # the round loop may run without grad
            result = self.reconstruct(problem)
        paired = pair_with_truth(result.x.detach().clamp(*self.view.data_range) - self.view.data_range[0],
                                 truth_x - self.view.data_range[0], self.view.width)
        metrics = score(result, truth_x, truth_labels, self.view, paired)
        if self.setting.plots is not None:
            name = f"{self.kind}-round{observation.round:03d}-site{observation.partition_id}.png"
            draw(result, truth_x[paired], truth_labels[paired], self.view, Path(self.setting.plots) / name,
                 f"{self.kind}, round {observation.round}, site {observation.partition_id}: "
                 f"PSNR {metrics['psnr']:.1f} dB")
        return [Outcome(victim=observation.partition_id, attacker="server", metrics=metrics)]

    def after_round(self, server_round: int, model: nn.Module | None) -> list[Outcome]:
        """Nothing: gradient inversion only looks at the sites' replies."""
        return []
