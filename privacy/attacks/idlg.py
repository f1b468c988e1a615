"""Improved Deep Leakage from Gradients (iDLG): the label from the last layer's gradient, then DLG on x' alone.

Zhao, Mopuri, Bilen 2020, "iDLG: Improved Deep Leakage from Gradients" (arXiv:2001.02610). For cross-entropy
and a final linear layer, the gradient of the last layer's weight has negative row sums exactly for the classes
in the batch when the features feeding it are non-negative (Sec. 3, Eq. 3–5): a batch of one gives its label
as argmin_c Σ_j ∂L/∂W_cj (:func:`privacy.attacks.inversion_matching.extract_labels`, which also states the heuristic
used for B > 1). With the label fixed, the dummy data x' minimises ‖∇W(x', y) − ∇W‖² (DLG's Eq. 4) by L-BFGS
(lr 1, ``params.iterations`` steps, 300 by default as in the paper's protocol). Classification of images only.
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
    extract_labels,
    gradient_distance,
    last_linear,
    lbfgs_match,
)

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm

TASKS = ("digits",)


class IDLGParams(InversionParams):
    """``attack.params`` of ``idlg`` (iterations, init, max_batch: :class:`InversionParams`)."""


def infer_labels(problem: Problem) -> torch.Tensor:
    """The batch's labels ``[B]`` from the observed gradient of the last linear layer (iDLG, Sec. 3).

    Raises
    ------
    ValueError
        If the upload does not hold the last layer's weight (e.g. FedPer keeps the head at the site).
    """
    assert problem.view.num_classes is not None
    name = last_linear(problem.model, problem.view.num_classes)
    if name not in problem.observed.gradient:
        raise ValueError(f"the upload does not hold the last layer's weight '{name}' that iDLG reads labels from")
    return extract_labels(problem.observed.gradient[name], problem.batch_size)


def reconstruct(problem: Problem, params: InversionParams) -> Reconstruction:
    """iDLG on one victim's gradient: labels extracted, then L-BFGS over x' ``[B, *shape]`` only.

    Parameters
    ----------
    problem : Problem
        The model at w_t, the observed gradient, the batch size and the seeded stream.
    params : InversionParams
        ``iterations`` (L-BFGS steps) and ``init``.

    Returns
    -------
    Reconstruction
        x', the extracted labels, the final ‖∇W(x', y) − ∇W‖² and the steps run.
    """
    labels = infer_labels(problem)
    x = problem.dummy(params.init)
    target, names = problem.target(), problem.observed.names

    def objective() -> torch.Tensor:
        return gradient_distance(candidate_gradient(problem.model, names, problem.loss_of, x, labels),
                                 target, "euclidean")

    distance, steps = lbfgs_match([x], objective, params.iterations, problem.target_energy())
    return Reconstruction(x.detach(), labels, distance, steps)


def server_half(setting: AttackSetting) -> InversionAttack:
    """The honest-but-curious server running iDLG on every victim's reply."""
    params = setting.params
    assert isinstance(params, InversionParams)
    return InversionAttack(setting, "idlg", lambda problem: reconstruct(problem, params), known_labels=False)


def check_compatible(scenario: Scenario, algorithm: Algorithm, params: AttackParams) -> None:
    """A strategy that uploads per site, an image classification task (:data:`TASKS`), and a shared head
    (FedPer keeps the last layer at the site: no label to read)."""
    check_inversion(scenario, algorithm, TASKS, "idlg")
    if scenario.strategy.name == "fedper":
        raise ValueError("strategy.name: idlg reads labels from the last layer's gradient, which fedper never uploads")


ATTACK = Attack(
    name="idlg", label="iDLG (Zhao et al. 2020)", Params=IDLGParams, headline="psnr", needs="victims",
    server_half=server_half, check_compatible=check_compatible,
)
