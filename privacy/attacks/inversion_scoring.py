"""Scoring a gradient inversion against the ground truth a simulation knows, and drawing it.

A reconstruction is scored (:func:`score`) against the victim's mini-batches of the round (for several local
steps, their union: each reconstruction is matched to its best true sample, :func:`pair_with_truth`), or, under
DP-SGD's Poisson sampling, the victim's whole training split (:func:`truth_batches`): PSNR, SSIM and MSE of the
images (Geiping et al. 2020, Sec. 6), label accuracy of classification batches; :func:`draw` saves true and
reconstructed samples side by side.

References
----------
Zhu, Liu, Han 2019, "Deep Leakage from Gradients", NeurIPS (arXiv:1906.08935).
Geiping, Bauermeister, Dröge, Moeller 2020, "Inverting Gradients - How easy is it to break privacy in federated
learning?", NeurIPS (arXiv:2003.14053).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from privacy.attacks.base import Observation
from privacy.attacks.image_metrics import match, psnr, ssim
from privacy.attacks.inversion_matching import Reconstruction
from privacy.attacks.inversion_views import TaskView

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario


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
