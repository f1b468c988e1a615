"""Deep Leakage from Gradients (DLG): dummy data and soft labels fitted to a site's gradient by L-BFGS.

Zhu, Liu, Han 2019, "Deep Leakage from Gradients", NeurIPS (arXiv:1906.08935), Algorithm 1: start from seeded
dummy inputs x' and dummy label logits y', and minimise

    x'*, y'* = argmin_{x', y'} ‖∇W(x', y') − ∇W‖²          (Eq. 4)

with L-BFGS (lr 1, ``params.iterations`` steps, 300 by default as in the paper's and iDLG's protocol), where
∇W(x', y') is the gradient of the soft-label cross-entropy −Σ_c softmax(y')_c log softmax(f(x'))_c at the model
w_t the site received. The recovered label is argmax_c y'_c. The observed ∇W is the victim's upload
(:func:`privacy.attacks.inversion_observed.observed_gradient`: a FedSGD gradient, or Δw/(Kη) of a FedAvg-style update).

On CT (Sec. 4's joint optimisation carried over to regression) the private pair is the FBP input x and the
reference image r the site trains FBPConvNet towards: x' and r' ``[B, 1, N, N]`` are fitted jointly by the same
L-BFGS on ‖∇W(x', r') − ∇W‖² with the task's own loss ‖x' + U(x') − r'‖² (the scanner geometry is public
context, :func:`privacy.attacks.inversion_views.ct_loss`). Digits and CT only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from privacy.attacks.base import Attack, AttackParams, AttackSetting
from privacy.attacks.inversion import InversionAttack, InversionParams, check_inversion
from privacy.attacks.inversion_matching import (
    Problem,
    Reconstruction,
    candidate_gradient,
    gradient_distance,
    lbfgs_match,
    soft_label_loss,
)

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm

TASKS = ("digits", "ct")


class DLGParams(InversionParams):
    """``attack.params`` of ``dlg`` (iterations, init, max_batch: :class:`InversionParams`)."""


def reconstruct(problem: Problem, params: InversionParams) -> Reconstruction:
    """DLG on one victim's gradient: joint L-BFGS over x' ``[B, *shape]`` and label logits y' ``[B, C]`` (CT:
    reference images r' ``[B, *shape]``).

    Parameters
    ----------
    problem : Problem
        The model at w_t, the observed gradient, the batch size and the seeded stream.
    params : InversionParams
        ``iterations`` (L-BFGS steps) and ``init`` (the dummy data's start).

    Returns
    -------
    Reconstruction
        x', argmax_c y' (CT: r'), the final ‖∇W(x', y') − ∇W‖² and the steps run.
    """
    x = problem.dummy(params.init)
    if problem.view.reference:
        labels, loss_of = problem.dummy(params.init), problem.loss_of
    else:
        assert problem.view.num_classes is not None
        labels = torch.randn((problem.batch_size, problem.view.num_classes),
                             generator=problem.generator).requires_grad_(True)
        loss_of = soft_label_loss
    target, names = problem.target(), problem.observed.names

    def objective() -> torch.Tensor:
        return gradient_distance(candidate_gradient(problem.model, names, loss_of, x, labels), target, "euclidean")

    distance, steps = lbfgs_match([x, labels], objective, params.iterations, problem.target_energy())
    recovered = labels.detach() if problem.view.reference else labels.detach().argmax(dim=-1)
    return Reconstruction(x.detach(), recovered, distance, steps)


def server_half(setting: AttackSetting) -> InversionAttack:
    """The honest-but-curious server running DLG on every victim's reply."""
    params = setting.params
    assert isinstance(params, InversionParams)
    return InversionAttack(setting, "dlg", lambda problem: reconstruct(problem, params), known_labels=False)


def check_compatible(scenario: Scenario, algorithm: Algorithm, params: AttackParams) -> None:
    """A strategy that uploads per site, and digits or CT (:data:`TASKS`)."""
    check_inversion(scenario, algorithm, TASKS, "dlg")


ATTACK = Attack(
    name="dlg", label="DLG (Zhu et al. 2019)", Params=DLGParams, headline="psnr", needs="victims",
    server_half=server_half, check_compatible=check_compatible,
)
