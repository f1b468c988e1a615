"""Gradient inversion by an honest-but-curious server: what DLG, iDLG and Inverting Gradients share.

In an attack round the server takes a victim's train reply and recovers the gradient it reveals
(:func:`observed_gradient`):

* FedSGD's ``"gradient"`` upload g_k = ∇F_k(w_t) is used as is;
* a ``"weights"`` upload w_k (FedAvg, FedProx, SCAFFOLD, FedBN's and FedPer's shared tensors) after K local steps
  of learning rate η gives g ≈ (w_t − w_k) / (K η) (Geiping et al. 2020, Sec. 6: exact for one plain SGD step);
  an ``"update"`` upload Δ_k = w_k − w_t gives g ≈ −Δ_k / (K η). K is the reply's ``steps`` metric and η the
  site's ``local.lr``. Parameters the upload does not contain (FedBN's BatchNorm tensors, FedPer's head) are not
  matched.

It then optimises candidate data x' (and, for DLG, soft labels) so that the gradient the model at w_t
(:func:`privacy.attacks.base.model_sent`, in training mode as the site trained it) computes on x' matches the
observed one (:func:`gradient_distance`), and scores the reconstruction against the ground truth a simulation
knows (:func:`score`): the victim's mini-batches of the round (for several local steps, their union: each
reconstruction is matched to its best true sample), or, under DP-SGD's Poisson sampling, the victim's whole
training split. Which tasks an attack reconstructs is :data:`VIEWS`: image classification (digits) with labels,
segmentation slices with their masks known to the attacker, and sparse-view CT (:func:`_ct_view`), whose private
data is a pair of images, the FBP input and the reference image FBPConvNet is trained towards. A U-Net normalises after its first convolution
(BatchNorm in training mode, InstanceNorm, GroupNorm), so the gradient does not change when a slice's
intensities are scaled and shifted (per batch for BatchNorm, per image otherwise): a slice is recoverable only up
to that affine map, which PSNR and SSIM penalise. For a batch of one, BatchNorm in training mode normalises like
InstanceNorm and the attack sees the same gradient; for larger batches it couples the samples of the batch, which
the attacker reproduces by computing its candidate gradients in training mode too. Tabular rows (no image
metric means anything for standardised features) and MIL bags are refused with a one-line reason.

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
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader

from medtasks.seeding import torch_generator
from privacy.attacks.base import AttackParams, AttackSetting, Observation, Outcome, model_sent
from privacy.attacks.image_metrics import match, psnr, ssim

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.base import Task
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm

GRADIENT_KINDS = ("gradient", "weights", "update")
"""Upload kinds the server can read a gradient from."""

Labels = Literal["infer", "known"]


class InversionParams(AttackParams):
    """``attack.params`` every gradient inversion takes."""

    iterations: int = Field(300, ge=1, le=100_000, description="optimiser iterations per reconstruction")
    init: Literal["uniform", "normal"] = Field(
        "uniform", description="the dummy data's seeded start: U(lo, hi) of the data range, or N(0, 1)")
    max_batch: int = Field(8, ge=1, le=64, description="largest batch a reconstruction is attempted for")


# --- what each task looks like to the attacker ----------------------------------------------------------
LossOf = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(model, x' [B, *shape], labels) -> scalar``: the site's training loss on candidate data."""


def first_two(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, labels)`` of a batch ``(x, labels, ...)``: inputs and classes or masks."""
    return batch[0], batch[1]


def task_loss(task: Task, public: Sequence[torch.Tensor] | None = None) -> LossOf:
    """The task's own training loss on ``(x', labels)`` (known or extracted hard labels, masks); ``public`` is
    unused (the tasks whose batches hold nothing but inputs and labels)."""
    return lambda model, x, labels: task.loss(model, (x, labels))


@dataclass(frozen=True)
class TaskView:
    """What an inversion needs to know of a task: the shape and range of one input, and its labels.

    Attributes
    ----------
    shape : tuple of int
        One input, e.g. ``(1, S, S)``.
    data_range : tuple of float
        ``(lo, hi)``: the box the inputs live in (public knowledge of the task; the box constraint).
    num_classes : int or None
        Classes of a classification task (labels are ``[B]`` ints); ``None`` for segmentation (labels are
        ``[B, S, S]`` masks, known to the attacker) and CT.
    reference : bool
        The labels are images of ``shape`` in the same box (CT's reference images): private data an attack may
        reconstruct along with the inputs, and score like them.
    pair : callable
        ``batch -> (x [B, *shape], labels [B, ...])``: the private pair of a batch of the task's loader.
    loss : callable
        ``(task, public batch) -> LossOf``: the site's loss on candidates, with whatever else the batch carries
        that the attacker treats as public (CT: the scanner geometry) taken from ``public``.
    """

    shape: tuple[int, ...]
    data_range: tuple[float, float]
    num_classes: int | None
    reference: bool = False
    pair: Callable[[Sequence[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]] = first_two
    loss: Callable[[Task, Sequence[torch.Tensor]], LossOf] = task_loss

    @property
    def width(self) -> float:
        """hi − lo, the R of PSNR."""
        return self.data_range[1] - self.data_range[0]


def _digits_view(task: Task) -> TaskView:
    return TaskView(tuple(task.image_shape), (0.0, 1.0), int(task.num_classes))  # type: ignore[attr-defined]


def _segmentation_view(task: Task) -> TaskView:
    """Slices ``[1, S, S]`` in [0, 1] (the folder source's robust min-max range; synthetic slices spill slightly
    outside it, about −0.1 to 1.1, and are scored unclipped), masks known to the attacker."""
    size = int(task.params.image_size)  # type: ignore[attr-defined]
    return TaskView((1, size, size), (0.0, 1.0), None)


def ct_pair(batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_FBP [B, 1, N, N], reference [B, 1, N, N])`` of a CT batch ``(fbp, sinogram, reference, geometry)``."""
    return batch[0], batch[2]


def ct_loss(task: Task, public: Sequence[torch.Tensor]) -> LossOf:
    """The CT task's loss ‖FBPConvNet(x') − r'‖² on a candidate FBP x' and reference r' (both ``[B, 1, N, N]``).

    The site's scanner geometry ``(views, angular range)`` (``public[3]``, ``[B, 2]``) is public context: it
    describes the site's scanner, not a patient, and the task rebuilds its operator from it. The measured
    sinogram is private and FBPConvNet does not read it: the candidate batch carries zeros of its shape
    ``[B, 1, A, N]`` (A, the number of views, is part of the geometry).
    """
    geometry, sinogram_shape = public[3][:1], tuple(public[1].shape[1:])

    def loss_of(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        size = x.shape[0]
        sinogram = torch.zeros((size, *sinogram_shape), dtype=x.dtype)
        return task.loss(model, (x, sinogram, reference, geometry.expand(size, -1)))

    return loss_of


def _ct_view(task: Task) -> TaskView:
    """FBP inputs ``[1, N, N]`` and reference images in [0, 1] (the HU window [−1000, 1000], the task's PSNR range
    R = 1; FBP streaks dip slightly below 0 and are scored unclipped), both private and reconstructable."""
    size = int(task.params.image_size)  # type: ignore[attr-defined]
    return TaskView((1, size, size), (0.0, 1.0), None, reference=True, pair=ct_pair, loss=ct_loss)


VIEWS: dict[str, Callable[[Task], TaskView]] = {"digits": _digits_view, "segmentation": _segmentation_view,
                                                "ct": _ct_view}
"""Tasks a gradient inversion reconstructs (``task.name`` → its view)."""

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
        The task names this attack supports (a subset of :data:`VIEWS`).
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


# --- the observed gradient --------------------------------------------------------------------------------
@dataclass
class ObservedGradient:
    """What a victim's reply reveals about ∇F_k(w_t).

    Attributes
    ----------
    gradient : dict of str to torch.Tensor
        g per matched parameter name (shapes of the parameters): the gradient itself, or Δw/(Kη).
    kind : str
        The upload kind it was read from (``"gradient"``, ``"weights"``, ``"update"``).
    steps : int
        K, the local steps the site took (1 for a gradient).
    lr : float
        η, the site's local learning rate.
    """

    gradient: dict[str, torch.Tensor]
    kind: str
    steps: int
    lr: float

    @property
    def names(self) -> list[str]:
        """The matched parameter names, in the model's order."""
        return list(self.gradient)

    def descent(self) -> dict[str, torch.Tensor]:
        """w_t − w_k = K η g: the change the site's local steps made (what the multi-step variant matches)."""
        return {name: value * (self.steps * self.lr) for name, value in self.gradient.items()}


def observed_gradient(observation: Observation, model: nn.Module) -> ObservedGradient:
    """Read g from the victim's reply (module docstring); only trainable parameters the upload holds.

    Parameters
    ----------
    observation : Observation
        The victim's reply and the message it answered.
    model : nn.Module
        The model at w_t (its parameter order sets the order of the result).

    Raises
    ------
    ValueError
        If no upload of a gradient kind holds any of the model's parameters.
    """
    parameters = dict(model.named_parameters())
    for record, upload in observation.uploads.items():
        if upload.kind not in GRADIENT_KINDS or record not in observation.reply.array_records:
            continue
        sent = observation.reply.array_records[record].to_torch_state_dict()
        names = [name for name in parameters if name in sent]
        if not names:
            continue
        if upload.kind == "gradient":
            gradient = {name: sent[name].float() for name in names}
            return ObservedGradient(gradient, "gradient", 1, 1.0)
        steps = int(observation.reply.metric_records["metrics"]["steps"])  # type: ignore[arg-type]
        scale = 1.0 / (max(steps, 1) * observation.local.lr)
        sign = 1.0 if upload.kind == "weights" else -1.0  # weights: w_t − w_k; update: Δ = w_k − w_t
        gradient = {name: sign * scale * (parameters[name].detach().float() - sent[name].float())
                    if upload.kind == "weights" else sign * scale * sent[name].float() for name in names}
        return ObservedGradient(gradient, upload.kind, max(steps, 1), observation.local.lr)
    raise ValueError(f"round {observation.round}, site {observation.partition_id}: the reply holds no gradient, "
                     f"update or weights of the model's parameters")


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


# --- scoring ----------------------------------------------------------------------------------------------
def truth_batches(observation: Observation, scenario: Scenario) -> list[Sequence[torch.Tensor]]:
    """The batches a reconstruction is scored against, as the task's loader yields them.

    The victim's mini-batches of the round in order (their union for several local steps); under DP-SGD, whose
    Poisson sampling draws batches the server cannot replay, the victim's whole training split.
    """
    if scenario.privacy.mechanism == "dpsgd":
        return list(DataLoader(observation.members(), batch_size=256, shuffle=False))
    return list(observation.batches())


def ground_truth(batches: Sequence[Sequence[torch.Tensor]], view: TaskView) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [N, *shape], labels [N, ...])``: the private pairs (:attr:`TaskView.pair`) of ``batches``."""
    pairs = [view.pair(batch) for batch in batches]
    return torch.cat([x for x, _ in pairs]), torch.cat([labels for _, labels in pairs])


def batch_truth(batches: Sequence[Sequence[torch.Tensor]], scenario: Scenario,
                view: TaskView) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The first mini-batch's ``(x, labels)`` when it is the whole truth (one step, no DP-SGD), else ``None``."""
    if scenario.privacy.mechanism == "dpsgd" or len(batches) != 1:
        return None
    return view.pair(batches[0])


def label_accuracy(recovered: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of the recovered labels found in the true labels, counted as multisets: |R ∩ T| / |R|.

    Parameters
    ----------
    recovered : torch.Tensor
        ``[B]`` int labels.
    truth : torch.Tensor
        ``[N]`` int labels (N ≥ B for a union of batches).
    """
    common = Counter(recovered.tolist()) & Counter(truth.tolist())
    return sum(common.values()) / max(len(recovered), 1)


def pair_with_truth(x: torch.Tensor, truth: torch.Tensor, data_range: float) -> torch.Tensor:
    """Indices into ``truth`` pairing each reconstruction with a true sample.

    One to one by the best total PSNR (:func:`privacy.attacks.image_metrics.match`) when the counts agree;
    otherwise (a union of batches, a training split) each reconstruction gets its best-PSNR true sample.

    Parameters
    ----------
    x : torch.Tensor
        ``[B, C, H, W]`` reconstructions.
    truth : torch.Tensor
        ``[N, C, H, W]`` true samples.

    Returns
    -------
    torch.Tensor
        ``[B]`` int64 indices.
    """
    if x.shape[0] == truth.shape[0]:
        order = torch.as_tensor(match(x, truth, data_range))  # reconstruction[order[i]] ↔ truth[i]
        return torch.argsort(order)
    best = torch.stack([psnr(truth, sample.unsqueeze(0).expand_as(truth), data_range) for sample in x])
    return best.argmax(dim=1)


def score(result: Reconstruction, truth_x: torch.Tensor, truth_labels: torch.Tensor, view: TaskView,
          paired: torch.Tensor) -> dict[str, float]:
    """The metrics of one reconstruction against its paired true samples.

    Parameters
    ----------
    result : Reconstruction
        ``x [B, C, H, W]``.
    truth_x, truth_labels : torch.Tensor
        ``[N, C, H, W]`` and ``[N, ...]``.
    view : TaskView
        Data range (PSNR's R) and whether labels are classes.
    paired : torch.Tensor
        ``[B]`` from :func:`pair_with_truth`.

    Returns
    -------
    dict
        ``psnr`` (dB, capped at 100), ``ssim``, ``mse`` of the inputs, ``label_accuracy`` (classification only),
        ``reference_psnr``, ``reference_ssim``, ``reference_mse`` (CT, when the attack reconstructed the reference
        images rather than being given them), ``gradient_distance``, ``iterations``, ``batch_size``.
    """
    metrics = image_scores(result.x, truth_x[paired], view)
    if view.reference and result.labels is not None:
        metrics |= {f"reference_{name}": value
                    for name, value in image_scores(result.labels, truth_labels[paired], view).items()}
    metrics |= {"gradient_distance": result.distance, "iterations": float(result.iterations),
                "batch_size": float(result.x.shape[0])}
    if view.num_classes is not None and result.labels is not None:
        metrics["label_accuracy"] = label_accuracy(result.labels, truth_labels)
    return metrics


def image_scores(reconstruction: torch.Tensor, truth: torch.Tensor, view: TaskView) -> dict[str, float]:
    """Mean PSNR (dB, capped at 100), SSIM and MSE of paired images, the reconstruction clipped to the box.

    Parameters
    ----------
    reconstruction, truth : torch.Tensor
        ``[B, C, H, W]``, sample ``i`` paired with sample ``i``.
    view : TaskView
        The box and PSNR's R (:attr:`TaskView.width`).
    """
    x = reconstruction.detach().clamp(*view.data_range) - view.data_range[0]
    true = truth - view.data_range[0]
    return {"psnr": float(torch.clamp(psnr(x, true, view.width), max=100.0).mean()),
            "ssim": float(ssim(x, true, view.width).mean()),
            "mse": float((x.double() - true.double()).pow(2).mean())}


def panels(result: Reconstruction, truth: torch.Tensor, truth_labels: torch.Tensor, view: TaskView,
           i: int) -> list[tuple[torch.Tensor, str]]:
    """Row ``i`` of the picture: true | reconstruction, and for reconstructed CT references true | reconstruction
    of the reference too (``[C, H, W]`` images with their captions)."""
    if view.reference:
        row = [(truth[i], "true FBP"), (result.x[i].detach(), "recon. FBP")]
        if result.labels is not None:
            row += [(truth_labels[i], "true reference"), (result.labels[i].detach(), "recon. reference")]
        return row
    classes = view.num_classes is not None
    return [(truth[i], f"true {int(truth_labels[i])}" if classes else "true"),
            (result.x[i].detach(), f"recon. {int(result.labels[i])}" if result.labels is not None and classes
             else "reconstruction")]


def draw(result: Reconstruction, truth: torch.Tensor, truth_labels: torch.Tensor, view: TaskView,
         path: Path, title: str) -> None:
    """Save true | reconstruction side by side, one row per sample (``truth`` and ``truth_labels`` already
    paired, ``[B, C, H, W]`` and ``[B, ...]``); the columns are :func:`panels`."""
    from matplotlib.figure import Figure

    rows = truth.shape[0]
    columns = len(panels(result, truth, truth_labels, view, 0))
    figure = Figure(figsize=(1.6 * columns, 1.6 * rows + 0.5))
    axes = figure.subplots(rows, columns, squeeze=False)
    lo, hi = view.data_range
    for i in range(rows):
        for column, (image, caption) in enumerate(panels(result, truth, truth_labels, view, i)):
            ax = axes[i, column]
            ax.imshow(image[0].numpy(), cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(caption, fontsize=8)
            ax.set_axis_off()
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80, bbox_inches="tight")


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
        :data:`VIEWS` of the task.
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
