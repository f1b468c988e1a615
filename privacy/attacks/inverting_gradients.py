"""Inverting Gradients: cosine gradient matching with a total-variation prior, Adam on signed gradients.

Geiping, Bauermeister, Dröge, Moeller 2020, "Inverting Gradients - How easy is it to break privacy in federated
learning?", NeurIPS (arXiv:2003.14053). The reconstruction solves (Sec. 4, Eq. 4)

    x'* = argmin_{x' ∈ [lo, hi]^n}  1 − ⟨∇W(x', y), ∇W⟩ / (‖∇W(x', y)‖ ‖∇W‖)  +  α TV(x')

with TV(x) the mean absolute difference of neighbouring pixels (anisotropic total variation), by Adam (step
``lr``, 0.1) applied to the *sign* of the objective's gradient, the step divided by 10 after 3/8, 5/8 and 7/8 of
the iterations, and the box constraint enforced by projection after every step (Sec. 4, "we minimize ... with
Adam" with signed gradients and step decay as in the authors' reference implementation). The best of
``restarts`` seeded starts (lowest objective) is kept.

Labels (``params.labels``): ``known`` (the paper's default assumption, Sec. 4: labels are given to the attacker)
or ``infer`` (iDLG's extraction from the last layer, :func:`privacy.attacks.inversion_matching.extract_labels`, for
classification). Segmentation slices always use their true masks as known labels. On CT the "label" is the
reference image r the site trains FBPConvNet towards (loss ‖x' + U(x') − r‖²), private like the FBP input x:
``infer`` optimises x' and r' jointly, both in the box, each with its own TV term, then refits r' alone to the
Euclidean distance (:func:`fit_reference`: the cosine cannot see the residual's scale, which fixes r' given x');
``known`` gives the attacker the true references, a weaker privacy statement (it assumes the attacker already
holds the patient's clean image).

What is matched (``params.multistep``):

* ``false``: the gradient the upload reveals (FedSGD's, or Δw/(Kη) of a weights/update upload), one batch of B;
* ``true``: the multi-step variant of Sec. 6 ("Federated averaging"): the attacker unrolls the site's K local
  steps of SGD (``local.lr``, ``momentum``, ``weight_decay`` as torch.optim.SGD applies them) from w_t on
  candidate data of min(n_k, K·B) samples, cut in mini-batches of B in a fixed order and cycled, and matches the
  resulting change w_t − w_K to the observed w_t − w_k with the same cosine objective. Adam's steps are not
  unrolled (refused up front).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.func import functional_call

from privacy.attacks.base import Attack, AttackParams, AttackSetting
from privacy.attacks.idlg import infer_labels
from privacy.attacks.inversion import InversionAttack, InversionParams, check_inversion
from privacy.attacks.inversion_matching import (
    Problem,
    Reconstruction,
    candidate_gradient,
    gradient_distance,
    lbfgs_match,
)
from privacy.attacks.inversion_views import LossOf

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm

TASKS = ("digits", "segmentation", "ct")

REFIT_STEPS = 20
"""L-BFGS steps of :func:`fit_reference` (each up to 20 evaluations)."""


class InvertingGradientsParams(InversionParams):
    """``attack.params`` of ``inverting_gradients``."""

    iterations: int = Field(1000, ge=1, le=100_000, description="Adam iterations per restart")
    init: Literal["uniform", "normal"] = Field("normal", description="the dummy data's seeded start")
    lr: float = Field(0.1, gt=0.0, le=10.0, description="Adam's step size")
    tv: float = Field(1e-4, ge=0.0, le=10.0, description="α, weight of the total-variation prior")
    restarts: int = Field(1, ge=1, le=32, description="seeded starts; the lowest objective wins")
    labels: Literal["infer", "known"] = Field(
        "known", description="known (the paper's assumption) or infer (iDLG's extraction for classes; for CT the "
                             "reference images are reconstructed jointly with the inputs)")
    multistep: bool = Field(False, description="unroll the site's K local SGD steps (Sec. 6) instead of Δw/(Kη)")


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation, mean |x_{i+1,j} − x_{i,j}| + mean |x_{i,j+1} − x_{i,j}|.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, C, H, W]``.
    """
    return (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., :, 1:] - x[..., :, :-1]).abs().mean()


class _Functional(nn.Module):
    """``model`` evaluated at given parameters (torch.func.functional_call), for the task's loss."""

    def __init__(self, model: nn.Module, parameters: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.inner, self.parameters_at = model, parameters

    def forward(self, x: torch.Tensor) -> Any:
        return functional_call(self.inner, self.parameters_at, (x,))


def unrolled_descent(problem: Problem, x: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """w_t − w_K after the site's K local SGD steps on the candidates, differentiable in x (Sec. 6).

    Step k uses the mini-batch ``k mod ⌈N/B⌉`` of the candidates cut in order into batches of B, and applies
    torch.optim.SGD's rule: d = ∇L + λ w; v = d (first step) or μ v + d; w ← w − η v.

    Parameters
    ----------
    problem : Problem
        The model at w_t, K (``observed.steps``) and the site's local settings.
    x : torch.Tensor
        ``[N, *shape]`` candidates.
    labels : torch.Tensor
        ``[N]`` labels or ``[N, S, S]`` masks.

    Returns
    -------
    list of torch.Tensor
        w_t − w_K for each matched parameter (:attr:`ObservedGradient.names`).
    """
    local = problem.observation.local
    start: dict[str, torch.Tensor] = dict(problem.model.named_parameters())
    current = dict(start)
    velocity: dict[str, torch.Tensor] = {}
    size = local.batch_size
    chunks = [slice(i, min(i + size, x.shape[0])) for i in range(0, x.shape[0], size)]
    for step in range(problem.observed.steps):
        chunk = chunks[step % len(chunks)]
        loss = problem.loss_of(_Functional(problem.model, current), x[chunk], labels[chunk])
        names = list(current)
        grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=True, allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            direction = (grad if grad is not None else torch.zeros_like(current[name]))
            direction = direction + local.weight_decay * current[name]
            velocity[name] = direction if name not in velocity else local.momentum * velocity[name] + direction
            current[name] = current[name] - local.lr * velocity[name]
    return [start[name] - current[name] for name in problem.observed.names]


def reconstruct(problem: Problem, params: InvertingGradientsParams) -> Reconstruction:
    """Inverting Gradients on one victim's upload (module docstring), best of ``params.restarts``.

    Parameters
    ----------
    problem : Problem
        The model at w_t, the observed gradient, B and the seeded stream (``labels`` set when known).
    params : InvertingGradientsParams
        Iterations, step, α, restarts, labels, multistep.

    Returns
    -------
    Reconstruction
        x' ``[B, *shape]``, the labels used (classes; CT: the reconstructed references r' ``[B, *shape]``, or
        ``None`` when they were known), the final objective and the iterations run per restart.
    """
    joint = problem.view.reference and params.labels == "infer"
    labels = problem.labels if params.labels == "known" or problem.view.num_classes is None else None
    if labels is None and not joint:
        labels = infer_labels(problem)
    if params.multistep:
        target = [value for value in problem.observed.descent().values()]
    else:
        target = problem.target()
    lo, hi = problem.view.data_range
    best: tuple[float, list[torch.Tensor]] = (math.inf, [])
    for _ in range(params.restarts):
        images = [problem.dummy(params.init) for _ in range(2 if joint else 1)]  # x' (and r')
        with torch.no_grad():
            for image in images:
                image.clamp_(lo, hi)
        value = _adam_on_signs(problem, params, images, labels, target, problem.loss_of)
        if value < best[0] or not best[1]:
            best = (value, [image.detach().clone() for image in images])
    x = best[1][0]
    if joint:
        reference = fit_reference(problem, params, x, best[1][1].requires_grad_(True), target)
        return Reconstruction(x, reference, best[0], params.iterations)
    return Reconstruction(x, labels if problem.view.num_classes is not None else None, best[0], params.iterations)


def fit_reference(problem: Problem, params: InvertingGradientsParams, x: torch.Tensor, reference: torch.Tensor,
                  target: list[torch.Tensor]) -> torch.Tensor:
    """Refit CT's reference r' ``[B, *shape]`` to the observed gradient with x' fixed, by L-BFGS on the Euclidean
    distance ‖∇W(x', r') − ∇W‖² (Zhu et al. 2019, Eq. 4).

    For the loss (1/n) ‖x̂(x') − r‖² the gradient is affine in r, ∇W(x', r) = (2/n) J(x')ᵀ (x̂(x') − r) with J the
    Jacobian of x̂ in W: the cosine objective fixes the residual x̂ − r only up to a positive factor, and this
    least-squares problem in r' fixes the factor (a quadratic, so L-BFGS converges in few steps).

    Parameters
    ----------
    x : torch.Tensor
        ``[B, *shape]`` the reconstructed inputs (held fixed).
    reference : torch.Tensor
        ``[B, *shape]`` the start r' (from the joint cosine stage), requiring grad; refined in place.
    target : list of torch.Tensor
        The observed gradient (or, multi-step, the observed descent).

    Returns
    -------
    torch.Tensor
        ``[B, *shape]`` r'.
    """
    images = [x.detach(), reference]

    def objective() -> torch.Tensor:
        if params.multistep:
            candidate = unrolled_descent(problem, images[0], reference)
        else:
            candidate = candidate_gradient(problem.model, problem.observed.names, problem.loss_of, images[0],
                                           reference)
        return gradient_distance(candidate, target, "euclidean")

    energy = float(sum(float((t.double() ** 2).sum()) for t in target))
    lbfgs_match([reference], objective, REFIT_STEPS, energy)
    return reference.detach()


def _objective(problem: Problem, params: InvertingGradientsParams, images: list[torch.Tensor],
               labels: torch.Tensor | None, target: list[torch.Tensor], loss_of: LossOf) -> torch.Tensor:
    """1 − cos(∇W(x', y), ∇W) + α Σ TV (Eq. 4), or its multi-step form; ``images`` is ``[x']``, or ``[x', r']``
    when the labels are reconstructed too (``labels`` is then ``None``)."""
    x, used = images[0], labels if labels is not None else images[1]
    if params.multistep:
        candidate = unrolled_descent(problem, x, used)
    else:
        candidate = candidate_gradient(problem.model, problem.observed.names, loss_of, x, used)
    prior = torch.stack([total_variation(image) for image in images]).sum()
    return gradient_distance(candidate, target, "cosine") + params.tv * prior


def _adam_on_signs(problem: Problem, params: InvertingGradientsParams, images: list[torch.Tensor],
                   labels: torch.Tensor | None, target: list[torch.Tensor], loss_of: LossOf) -> float:
    """Adam on sign(∇ objective) of every image variable, steps ÷10 at 3/8, 5/8, 7/8 of the run, projected onto
    the box; the final objective."""
    lo, hi = problem.view.data_range
    optimizer = torch.optim.Adam(images, lr=params.lr)
    n = params.iterations
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[3 * n // 8, 5 * n // 8, 7 * n // 8],
                                                     gamma=0.1)
    for _ in range(n):
        optimizer.zero_grad()
        value = _objective(problem, params, images, labels, target, loss_of)
        gradients = torch.autograd.grad(value, images)
        for image, gradient in zip(images, gradients, strict=True):
            image.grad = gradient.sign()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            for image in images:
                image.clamp_(lo, hi)
    return float(_objective(problem, params, images, labels, target, loss_of).detach())


def server_half(setting: AttackSetting) -> InversionAttack:
    """The honest-but-curious server running Inverting Gradients on every victim's reply."""
    params = setting.params
    assert isinstance(params, InvertingGradientsParams)
    return InversionAttack(setting, "inverting_gradients", lambda problem: reconstruct(problem, params),
                           known_labels=True, whole_round=params.multistep)


def check_compatible(scenario: Scenario, algorithm: Algorithm, params: AttackParams) -> None:
    """A per-site upload, a supported task (:data:`TASKS`); labels inferred for classification with a shared
    head, or for CT (reconstructed), never for segmentation; the multi-step variant only for plain SGD (momentum and weight decay allowed) and uploads of
    weights (not FedSGD's single gradient)."""
    assert isinstance(params, InvertingGradientsParams)
    check_inversion(scenario, algorithm, TASKS, "inverting_gradients")
    if params.labels == "infer" and scenario.task.name == "segmentation":
        raise ValueError(f"attack.params.labels: 'infer' reads class labels from the last layer; the "
                         f"{scenario.task.name} task's labels are masks (use 'known')")
    if params.labels == "infer" and scenario.task.name == "digits" and scenario.strategy.name == "fedper":
        raise ValueError("attack.params.labels: 'infer' needs the last layer's gradient, which fedper never uploads")
    if params.multistep and scenario.strategy.name == "fedsgd":
        raise ValueError("attack.params.multistep: fedsgd uploads one gradient; there are no local steps to unroll")
    if params.multistep and scenario.local.optimizer != "sgd":
        raise ValueError(f"attack.params.multistep: unrolls SGD steps, but local.optimizer is "
                         f"{scenario.local.optimizer} (use sgd)")


ATTACK = Attack(
    name="inverting_gradients", label="Inverting Gradients (Geiping et al. 2020)", Params=InvertingGradientsParams,
    headline="psnr", needs="victims", server_half=server_half, check_compatible=check_compatible,
)
