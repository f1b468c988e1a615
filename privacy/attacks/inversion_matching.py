"""Matching gradients: the objectives, the labels a last layer reveals, and the optimiser of one reconstruction.

An inversion optimises candidate data x' (and, for DLG, soft labels) so that the gradient the model at w_t
(:func:`privacy.attacks.base.model_sent`, in training mode as the site trained it) computes on x'
(:func:`candidate_gradient`) matches the observed one (:func:`gradient_distance`), with L-BFGS
(:func:`lbfgs_match`) or the attack's own optimiser. :class:`Problem` holds what one reconstruction needs,
:class:`Reconstruction` its result; :func:`batch_problem` builds a problem from one batch directly, without a
federated run. Labels of classification batches can be read from the last linear layer's gradient
(:func:`extract_labels`).

References
----------
Zhu, Liu, Han 2019, "Deep Leakage from Gradients", NeurIPS (arXiv:1906.08935).
Zhao, Mopuri, Bilen 2020, "iDLG: Improved Deep Leakage from Gradients" (arXiv:2001.02610).
Geiping, Bauermeister, Dröge, Moeller 2020, "Inverting Gradients - How easy is it to break privacy in federated
learning?", NeurIPS (arXiv:2003.14053).
Yin et al. 2021, "See through Gradients: Image Batch Recovery via GradInversion", CVPR (arXiv:2104.07586).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from privacy.attacks.base import Observation
from privacy.attacks.inversion_observed import ObservedGradient
from privacy.attacks.inversion_views import LossOf, TaskView

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.base import Task


# --- the gradient of candidate data -----------------------------------------------------------------------
def soft_cross_entropy(logits: torch.Tensor, label_logits: torch.Tensor) -> torch.Tensor:
    """DLG's loss for soft labels: mean over the batch of −Σ_c softmax(ŷ)_c log softmax(f(x))_c.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, C]`` the model's outputs f(x').
    label_logits : torch.Tensor
        ``[B, C]`` the dummy labels' logits ŷ' (Zhu et al. 2019, Algorithm 1).
    """
    return -(F.softmax(label_logits, dim=-1) * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def soft_label_loss(model: nn.Module, x: torch.Tensor, label_logits: torch.Tensor) -> torch.Tensor:
    """:func:`soft_cross_entropy` of ``model(x)`` (classification with jointly optimised labels)."""
    return soft_cross_entropy(model(x), label_logits)


def candidate_gradient(model: nn.Module, names: Sequence[str], loss_of: LossOf, x: torch.Tensor,
                       labels: torch.Tensor) -> list[torch.Tensor]:
    """∇_W L(f_W(x'), y') at the model's weights, differentiable in x' and y' (create_graph).

    Parameters
    ----------
    model : nn.Module
        At w_t, in the mode the site trained in.
    names : sequence of str
        The parameters to differentiate (those the upload holds).
    loss_of : LossOf
        The loss.
    x : torch.Tensor
        ``[B, *shape]`` candidate inputs.
    labels : torch.Tensor
        ``[B]`` labels, ``[B, C]`` label logits, or ``[B, S, S]`` masks.

    Returns
    -------
    list of torch.Tensor
        One gradient per name, shaped like the parameter.
    """
    parameters = dict(model.named_parameters())
    loss = loss_of(model, x, labels)
    return list(torch.autograd.grad(loss, [parameters[name] for name in names], create_graph=True))


def gradient_distance(candidate: Sequence[torch.Tensor], observed: Sequence[torch.Tensor],
                      metric: Literal["euclidean", "cosine"]) -> torch.Tensor:
    """How far the candidate's gradient is from the observed one.

    * ``"euclidean"``: Σ_l ‖∇W'_l − ∇W_l‖² (Zhu et al. 2019, Eq. 4);
    * ``"cosine"``: 1 − ⟨∇W', ∇W⟩ / (‖∇W'‖ ‖∇W‖) over all layers together (Geiping et al. 2020, Eq. 4).

    Parameters
    ----------
    candidate, observed : sequence of torch.Tensor
        Layer by layer, same shapes.
    """
    pairs = list(zip(candidate, observed, strict=True))
    if metric == "euclidean":
        return torch.stack([((c - o) ** 2).sum() for c, o in pairs]).sum()
    dot = torch.stack([(c * o).sum() for c, o in pairs]).sum()
    norm_c = torch.stack([(c**2).sum() for c, _ in pairs]).sum().sqrt()
    norm_o = torch.stack([(o**2).sum() for _, o in pairs]).sum().sqrt()
    return 1.0 - dot / (norm_c * norm_o + 1e-12)


# --- labels from the last layer ---------------------------------------------------------------------------
def last_linear(model: nn.Module, num_classes: int) -> str:
    """The parameter name of the weight of the model's last ``nn.Linear`` with ``num_classes`` outputs.

    Raises
    ------
    ValueError
        If the model has none (iDLG's label extraction needs it).
    """
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = f"{name}.weight" if name else "weight"
    if found is None:
        raise ValueError(f"the model has no final linear layer with {num_classes} outputs to read labels from")
    return found


def extract_labels(weight_gradient: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Labels of a batch from the gradient of the last linear layer's weight.

    For cross-entropy and a final linear layer z = W h, ∂L/∂W_c = (1/B) Σ_i (p_ic − 1[y_i = c]) h_iᵀ.

    * B = 1 (iDLG, Zhao et al. 2020, Sec. 3, Eq. 3–5): with non-negative features h (the sigmoid LeNet's) the
      row sum s_c = Σ_j ∂L/∂W_cj is negative exactly for the true class; the label is argmin_c s_c (as in their
      code).
    * B > 1 (Yin et al. 2021, GradInversion, Sec. 3.1, which assumes the batch's labels are distinct): the B
      classes with the smallest row minima min_j ∂L/∂W_cj, in increasing order. Repeated labels in a batch are
      therefore recovered at most once each (label accuracy below 1 then).

    Parameters
    ----------
    weight_gradient : torch.Tensor
        ``[C, F]`` ∂L/∂W of the last layer.
    batch_size : int
        B (at most C for B > 1).

    Returns
    -------
    torch.Tensor
        ``[B]`` int64 labels.
    """
    if batch_size == 1:
        return weight_gradient.sum(dim=-1).argmin().reshape(1).to(torch.int64)
    minima = weight_gradient.min(dim=-1).values
    order = torch.argsort(minima)
    return order[torch.arange(batch_size) % order.numel()].to(torch.int64)


# --- one reconstruction -----------------------------------------------------------------------------------
@dataclass
class Problem:
    """One victim's reply, ready to be inverted.

    Attributes
    ----------
    model : nn.Module
        The model at w_t, in training mode.
    observed : ObservedGradient
        What the reply reveals.
    view : TaskView
        The task's inputs and labels.
    batch_size : int
        B, the number of samples to reconstruct.
    loss_of : LossOf
        The site's loss on candidate data with hard labels / masks.
    labels : torch.Tensor or None
        The true labels (``[B]``) or masks (``[B, S, S]``) of the batch, for attacks that assume them known.
    generator : torch.Generator
        The reconstruction's seeded stream.
    observation : Observation
        The reply itself (the local settings of the multi-step variant).
    """

    model: nn.Module
    observed: ObservedGradient
    view: TaskView
    batch_size: int
    loss_of: LossOf
    labels: torch.Tensor | None
    generator: torch.Generator
    observation: Observation

    def dummy(self, init: Literal["uniform", "normal"]) -> torch.Tensor:
        """A seeded start x'₀, ``[B, *shape]``: U(lo, hi) or N(0, 1), requiring grad."""
        shape = (self.batch_size, *self.view.shape)
        if init == "uniform":
            lo, hi = self.view.data_range
            start = lo + (hi - lo) * torch.rand(shape, generator=self.generator)
        else:
            start = torch.randn(shape, generator=self.generator)
        return start.requires_grad_(True)

    def target(self) -> list[torch.Tensor]:
        """The observed gradient, layer by layer."""
        return list(self.observed.gradient.values())

    def target_energy(self) -> float:
        """‖∇W‖², the scale of the Euclidean objective."""
        return float(sum(float((g.double() ** 2).sum()) for g in self.observed.gradient.values()))


@dataclass
class Reconstruction:
    """An attack's result.

    Attributes
    ----------
    x : torch.Tensor
        ``[B, *shape]`` the reconstructed inputs.
    labels : torch.Tensor or None
        ``[B]`` recovered labels (classification), ``[B, *shape]`` reconstructed reference images (CT, when not
        given to the attacker), ``None`` otherwise.
    distance : float
        The final objective (gradient distance, with priors where the attack adds them).
    iterations : int
        Optimiser iterations run.
    """

    x: torch.Tensor
    labels: torch.Tensor | None
    distance: float
    iterations: int


CONVERGED = 1e-9
"""L-BFGS stops once ‖∇W(x') − ∇W‖² < CONVERGED · ‖∇W‖² (a reconstruction of digits is then exact to ~70 dB)."""


def lbfgs_match(variables: list[torch.Tensor], objective: Callable[[], torch.Tensor], iterations: int,
                scale: float) -> tuple[float, int]:
    """Minimise ``objective`` over ``variables`` with L-BFGS, lr 1 (Zhu et al. 2019, Algorithm 1).

    As in the DLG and iDLG reference code, each of the ``iterations`` is one ``LBFGS.step`` (at most 20
    function evaluations). The best variables seen are kept (L-BFGS can jump to non-finite values); it stops
    early once the objective is below :data:`CONVERGED` × ``scale`` (e.g. ‖∇W‖²), or stops decreasing.

    Returns
    -------
    tuple
        ``(best objective, iterations run)``; ``variables`` hold the best values.
    """
    optimizer = torch.optim.LBFGS(variables, lr=1.0)
    best = math.inf
    kept = [v.detach().clone() for v in variables]
    steps = 0

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        value = objective()
        value.backward()
        return value

    while steps < iterations:
        steps += 1
        optimizer.step(closure)
        value = float(objective().detach())
        if not math.isfinite(value):
            break
        if value < best:
            previous, best = best, value
            kept = [v.detach().clone() for v in variables]
            if best < CONVERGED * scale or previous - best < 1e-12 * previous:
                break
    with torch.no_grad():
        for variable, saved in zip(variables, kept, strict=True):
            variable.copy_(saved)
    return best, steps


def batch_problem(task: Task, view: TaskView, model: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                  generator: torch.Generator, observation: Observation | None = None,
                  public: Sequence[torch.Tensor] | None = None) -> Problem:
    """The problem of a site that sends its exact gradient of one batch (FedSGD), computed here directly.

    For benchmarks and unit tests that invert many single batches without a federated run.

    Parameters
    ----------
    task : Task
        Its loss is the site's.
    view : TaskView
        :data:`privacy.attacks.inversion_views.VIEWS` of the task.
    model : nn.Module
        The model at w_t, in training mode.
    x : torch.Tensor
        ``[B, *shape]`` the batch.
    labels : torch.Tensor
        ``[B]``, ``[B, S, S]`` or ``[B, *shape]`` (CT's references).
    generator : torch.Generator
        The attack's stream.
    observation : Observation or None
        Only for the multi-step variant.
    public : sequence of torch.Tensor or None
        A batch of the site's loader holding its public context (CT: the whole true batch, whose geometry the
        loss reads); ``None`` for tasks without any.
    """
    loss_of = view.loss(task, public if public is not None else (x, labels))
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        gradient = torch.autograd.grad(loss_of(model, x, labels), [dict(model.named_parameters())[n] for n in names])
    observed = ObservedGradient({n: g.detach() for n, g in zip(names, gradient, strict=True)}, "gradient", 1, 1.0)
    return Problem(model, observed, view, x.shape[0], loss_of, labels, generator,
                   observation)  # type: ignore[arg-type]
