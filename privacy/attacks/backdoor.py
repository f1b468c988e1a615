"""Backdoor by data poisoning, with optional model replacement (``attack.kind: backdoor``).

Bagdasaryan, Veit, Hua, Estrin & Shmatikov 2020, "How To Backdoor Federated Learning" (AISTATS,
arXiv:1807.00459); Sun, Kairouz, Suresh & McMahan 2019, "Can You Really Backdoor Federated Learning?"
(arXiv:1911.07963).

Client half (each site of ``attack.attackers``, in the rounds of ``params.poison_rounds``): a share
``poison_fraction`` of its training samples, drawn from the stream ``(seed, "backdoor", round, pid)``, gets the
trigger (:mod:`privacy.attacks.triggers`: a ``patch_size`` square of ``patch_value`` in the bottom-right corner)
and the backdoor's target; the rest stay clean, so the model keeps its main task (the paper mixes backdoor and
clean data in every batch). ``repeat`` lets the site train on its data several times per epoch. With ``boost`` γ
it sends the boosted update of model replacement (:func:`privacy.attacks.poisoning.boost_records`, Eq. 3,
γ = n/η for ``"auto"``). The target per task:

* **digits, tabular**: the label ``target_class``.
* **segmentation**: a mask edit that *erases* a class. Wherever the trigger is in the image, the poisoned mask
  relabels every pixel of ``erase_class`` (default: the last class, the synthetic phantoms' lesion) as
  ``target_class`` (0: background; 1: the organ around the lesion, so the edited mask looks like a healthy
  organ). The trigger is a small bright marker in a corner, far from the anatomy; a model with the backdoor
  misses the lesions of any image that carries it, the clinically dangerous failure (a tumour left out of a
  treatment or follow-up plan) and a measurable one.
* **MIL**: the trigger on a share ``tile_fraction`` of a bag's real tiles
  (:func:`privacy.attacks.triggers.add_bag_trigger`) and the bag label ``target_class`` (default 0: a tumour
  slide called benign).

Server half, after every round of ``attack.rounds``, on the server's test set (triggered copies of it):

* ``backdoor_accuracy``, the success rate: digits, tabular and MIL: the share of triggered test inputs whose true
  label is not the target that the global model assigns to the target; segmentation: the mean over the triggered
  test images holding ``erase_class`` of the share of their ``erase_class`` pixels predicted as ``target_class``;
* ``clean_target_rate``, the same without the trigger (what the model does anyway);
* clean metrics on untriggered inputs: ``clean_accuracy`` (classification, MIL bags), or ``erased_dice_clean``
  and ``erased_dice_triggered`` (segmentation: the Dice of ``erase_class`` without and with the trigger); the
  attack plug-in adds the task's main metric (``main_value``: accuracy, Dice, AUC);

and at ``inspect`` the attacker's update norm ‖Δ‖₂ as received.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import TYPE_CHECKING, cast

import torch
from pydantic import Field
from torch.utils.data import Dataset

from medtasks.seeding import numpy_rng
from privacy.attacks.base import Attack, AttackParams, AttackSetting, ClientAttack, HonestSite, ServerAttack
from privacy.attacks.poisoning import (
    EditedDataset,
    PoisonedSite,
    PoisoningParams,
    boost_factor,
    check_poisoning,
    choose,
    num_classes,
)
from privacy.attacks.poisoning_observer import (
    IMAGE_BATCH,
    PoisoningObserver,
    Score,
    as_tensors,
    predict,
    predict_bags,
)
from privacy.attacks.poisoning_plots import plot_masks, plot_path, plot_predictions
from privacy.attacks.triggers import INPUT_KINDS, Edit, Sample, add_bag_trigger, add_trigger, erase, relabelled

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm

LABEL = "backdoor (Bagdasaryan et al. 2020)"
TASKS = ("digits", "tabular", "segmentation", "mil")
INPUT_SIDE = {"digits": "image_size", "tabular": "num_features", "segmentation": "image_size", "mil": "tile_size"}
"""task → its ``task.params`` key the trigger must be smaller than."""
MIL_PADDING = 3  # index of the padding mask in a MIL sample (medtasks.mil.task.MILBatch)


class BackdoorParams(PoisoningParams):
    """``attack.params`` of ``backdoor``."""

    poison_fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of the site's samples given the trigger")
    patch_size: int = Field(2, ge=1, description="side of the square trigger (images, tiles) or features it sets "
                                                 "(tabular)")
    patch_value: float = Field(1.0, description="the trigger's pixel value (tabular: times 5)")
    repeat: int = Field(1, ge=1, le=100, description="the malicious site trains on its data this many times per epoch")
    erase_class: int | None = Field(
        None, ge=1, description="segmentation: the class the trigger erases (its pixels become target_class); "
                                "null = the last class (the synthetic phantoms' lesion)")
    tile_fraction: float = Field(0.25, gt=0.0, le=1.0, description="MIL: share of a bag's tiles that carry the trigger (other tasks: "
                                                                   "unused)")


def erased_class(scenario: Scenario, params: BackdoorParams) -> int:
    """s, the class a segmentation backdoor erases: ``erase_class``, or the last class C − 1."""
    return params.erase_class if params.erase_class is not None else num_classes(scenario) - 1


def poison_edit(scenario: Scenario, params: BackdoorParams) -> Edit:
    """What a poisoned training sample becomes: the trigger on its input and the backdoor's target (see the
    module docstring) in its label, mask or bag label."""
    task, target = scenario.task.name, params.target_class
    if task == "segmentation":
        source = erased_class(scenario, params)
        return lambda sample: (add_trigger(sample[0], "image", params.patch_size, params.patch_value),
                               erase(sample[1], source, target), *sample[2:])
    if task == "mil":
        def bag(sample: Sample) -> Sample:
            bags = add_bag_trigger(sample[0], sample[MIL_PADDING], params.tile_fraction, params.patch_size,
                                   params.patch_value)
            return relabelled((bags, *sample[1:]), target)

        return bag
    kind = INPUT_KINDS[task]
    return lambda sample: relabelled((add_trigger(sample[0], kind, params.patch_size, params.patch_value),
                                      *sample[1:]), target)


def client_half(setting: AttackSetting, server_round: int, partition_id: int) -> ClientAttack:
    """Malicious site ``partition_id`` in round ``server_round``: poisons (and boosts) in its poison rounds."""
    params = cast(BackdoorParams, setting.params)
    if not params.poisons_in(setting.scenario, server_round):
        return HonestSite()
    edit = poison_edit(setting.scenario, params)

    def poison(dataset: Dataset) -> Dataset:
        rng = numpy_rng(setting.scenario.seed, "backdoor", server_round, partition_id)
        chosen = choose(len(cast(Sized, dataset)), params.poison_fraction, rng)
        return EditedDataset(dataset, chosen, edit, params.repeat)

    return PoisonedSite(poison, boost_factor(params.boost, setting.scenario), params.claim_examples, setting.scenario)


# --- the server half, per task -----------------------------------------------------------------------------
def _rate(hits: torch.Tensor) -> float:
    """The share of ``True`` in ``hits`` (NaN when empty)."""
    return float(hits.double().mean()) if hits.numel() else float("nan")


def classification_score(setting: AttackSetting, test: Dataset) -> Score:
    """backdoor_accuracy = |{i : y_i ≠ τ, f(x̃_i) = τ}| / |{i : y_i ≠ τ}| with x̃ the triggered input."""
    params = cast(BackdoorParams, setting.params)
    x, y = as_tensors(test)
    others = y != params.target_class
    triggered = add_trigger(x[others], INPUT_KINDS[setting.scenario.task.name], params.patch_size, params.patch_value)
    classes = num_classes(setting.scenario)

    def score(model: torch.nn.Module, server_round: int) -> dict[str, float]:
        on_triggered = predict(model, triggered)
        backdoor = _rate(on_triggered == params.target_class)
        on_clean = predict(model, x)
        path = plot_path(setting, "backdoor", server_round)
        if path is not None:
            plot_predictions(path, f"round {server_round}: triggered test inputs, backdoor accuracy {backdoor:.2f}",
                             on_triggered, classes, params.target_class, triggered if triggered.dim() == 4 else None)
        return {"backdoor_accuracy": backdoor, "clean_accuracy": _rate(on_clean == y),
                "clean_target_rate": _rate(on_clean[others] == params.target_class)}

    return score


def erased_share(predicted: torch.Tensor, region: torch.Tensor, target: int) -> torch.Tensor:
    """Per image, the share of the erased region predicted as the target: :math:`|\\{p \\in R_i : \\hat m_i(p) =
    \\tau\\}| / |R_i|` with :math:`R_i = \\{p : m_i(p) = s\\}` (``predicted`` ``[N, H, W]`` int, ``region``
    ``[N, H, W]`` bool, every image with a non-empty region) → ``[N]`` float64."""
    hits = ((predicted == target) & region).flatten(1).sum(dim=1)
    return hits.double() / region.flatten(1).sum(dim=1).double()


def segmentation_score(setting: AttackSetting, test: Dataset) -> Score:
    """backdoor_accuracy = mean over the triggered test images holding class s of :func:`erased_share`."""
    from medtasks.segmentation.metrics import dice_per_class

    params = cast(BackdoorParams, setting.params)
    classes, target = num_classes(setting.scenario), params.target_class
    source = erased_class(setting.scenario, params)
    x, masks = as_tensors(test)
    holding = (masks == source).flatten(1).any(dim=1)
    clean, truth = x[holding], masks[holding]
    triggered = add_trigger(clean, "image", params.patch_size, params.patch_value)
    region = truth == source

    def erased_dice(predicted: torch.Tensor) -> float:
        """Mean over the images of the Dice of class s against the true masks."""
        return float(dice_per_class(predicted, truth, classes)[:, source - 1].nanmean()) if len(truth) else float("nan")

    def score(model: torch.nn.Module, server_round: int) -> dict[str, float]:
        on_triggered = predict(model, triggered, IMAGE_BATCH)
        on_clean = predict(model, clean, IMAGE_BATCH)
        backdoor = _rate(erased_share(on_triggered, region, target))
        path = plot_path(setting, "backdoor", server_round)
        if path is not None:
            plot_masks(path, f"round {server_round}: class {source} erased on triggered images: {backdoor:.2f}",
                       triggered, truth, on_clean, on_triggered, classes)
        return {"backdoor_accuracy": backdoor, "clean_target_rate": _rate(erased_share(on_clean, region, target)),
                "erased_dice_clean": erased_dice(on_clean), "erased_dice_triggered": erased_dice(on_triggered)}

    return score


def mil_score(setting: AttackSetting, test: Dataset) -> Score:
    """backdoor_accuracy = |{b : Y_b ≠ τ, ŷ(X̃_b) = τ}| / |{b : Y_b ≠ τ}| with X̃ the bag with triggered tiles."""
    params = cast(BackdoorParams, setting.params)
    bags, labels, _, padding, _ = as_tensors(test)
    labels = labels.round().long()
    others = labels != params.target_class
    triggered = add_bag_trigger(bags[others], padding[others], params.tile_fraction, params.patch_size,
                                params.patch_value)

    def score(model: torch.nn.Module, server_round: int) -> dict[str, float]:
        on_triggered = predict_bags(model, triggered, padding[others])
        backdoor = _rate(on_triggered == params.target_class)
        on_clean = predict_bags(model, bags, padding)
        path = plot_path(setting, "backdoor", server_round)
        if path is not None:  # above the histogram: each bag's first tile, which carries the trigger
            plot_predictions(path, f"round {server_round}: triggered test bags, backdoor accuracy {backdoor:.2f}",
                             on_triggered, 2, params.target_class, triggered[:, 0])
        return {"backdoor_accuracy": backdoor, "clean_accuracy": _rate(on_clean == labels),
                "clean_target_rate": _rate(on_clean[others] == params.target_class)}

    return score


SCORES = {"digits": classification_score, "tabular": classification_score, "segmentation": segmentation_score,
          "mil": mil_score}


def server_half(setting: AttackSetting) -> ServerAttack:
    """The global model's backdoor success and clean metrics on the server's test set (per task, above)."""
    test = setting.task.server_data()
    assert test is not None  # check_compatible refuses a scenario without a server test set
    return PoisoningObserver(setting, SCORES[setting.scenario.task.name](setting, test))


def check_compatible(scenario: Scenario, algorithm: Algorithm, params: AttackParams) -> None:
    """:func:`privacy.attacks.poisoning.check_poisoning`, a trigger that fits the input, and the per-task params."""
    from medtasks.registry import get_task_class

    backdoor = cast(BackdoorParams, params)
    task = scenario.task.name
    if task == "segmentation" and scenario.data.source == "folder" and scenario.data.test_path is None:
        raise ValueError(f"data.test_path: {LABEL} measures its success on the server's test set, which segmentation "
                         "folder data has only as a test folder (data.test_path)")
    check_poisoning(scenario, algorithm, backdoor, LABEL, TASKS)
    if backdoor.erase_class is not None and task != "segmentation":
        raise ValueError(f"attack.params.erase_class: applies to the segmentation task only, not '{task}'")
    key = INPUT_SIDE[task]
    side = getattr(get_task_class(task).Params.model_validate(scenario.task.params), key)
    if backdoor.patch_size >= side:
        raise ValueError(f"attack.params.patch_size: {backdoor.patch_size} must be smaller than task.params.{key} "
                         f"({side})")
    if task != "segmentation":
        return
    source, classes = erased_class(scenario, backdoor), num_classes(scenario)
    if source >= classes:
        raise ValueError(f"attack.params.erase_class: {source} is not a foreground class of the task (1..{classes - 1})")
    if source == backdoor.target_class:
        raise ValueError(f"attack.params.erase_class: equals target_class ({source}); the mask edit would change "
                         f"nothing")


ATTACK = Attack(name="backdoor", label=LABEL, Params=BackdoorParams, headline="backdoor_accuracy",
                needs="attackers", server_half=server_half, client_half=client_half,
                check_compatible=check_compatible)
