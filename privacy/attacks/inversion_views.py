"""What each task exposes to a gradient inversion: the shape and box of its inputs, its labels, its loss.

:data:`VIEWS` lists the tasks an inversion reconstructs: image classification (digits) with labels,
segmentation slices with their masks known to the attacker, and sparse-view CT (:func:`_ct_view`), whose private
data is a pair of images, the FBP input and the reference image FBPConvNet is trained towards. A U-Net normalises
after its first convolution (BatchNorm in training mode, InstanceNorm, GroupNorm), so the gradient does not change
when a slice's intensities are scaled and shifted (per batch for BatchNorm, per image otherwise): a slice is
recoverable only up to that affine map, which PSNR and SSIM penalise. For a batch of one, BatchNorm in training
mode normalises like InstanceNorm and the attack sees the same gradient; for larger batches it couples the samples
of the batch, which the attacker reproduces by computing its candidate gradients in training mode too. Tabular
rows (no image metric means anything for standardised features) and MIL bags have no view
(:data:`privacy.attacks.inversion.REFUSED`).

References
----------
Zhu, Liu, Han 2019, "Deep Leakage from Gradients", NeurIPS (arXiv:1906.08935).
Geiping, Bauermeister, Dröge, Moeller 2020, "Inverting Gradients - How easy is it to break privacy in federated
learning?", NeurIPS (arXiv:2003.14053).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.base import Task


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
