"""Label flipping (``attack.kind: label_flip``): malicious sites train on relabelled data.

A targeted poisoning without a trigger (Tolpegin, Truex, Gursoy & Liu 2020, "Data Poisoning Attacks Against
Federated Learning Systems", ESORICS, arXiv:2007.08432; Fang, Cao, Jia & Gong 2020, USENIX Security, on
Byzantine-robust rules). Client half (each site of ``attack.attackers``, in the rounds of
``params.poison_rounds``): ``mode: pair`` relabels every sample of ``source_class`` as ``target_class``;
``mode: all`` relabels every sample ``y → L − 1 − y``. An optional ``boost`` scales the update as model
replacement does (:func:`privacy.attacks.poisoning.boost_records`).

Server half, after every round of ``attack.rounds``: ``flip_success`` — the share of the server's test samples
of the source class (``mode: all``: of every class) that the global model assigns to their flipped label — and
``clean_accuracy``; at ``inspect`` the attacker's update norm ‖Δ‖₂ as received.
"""

from __future__ import annotations

from collections.abc import Sized
from typing import TYPE_CHECKING, Literal, cast

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from privacy.attacks.base import Attack, AttackParams, AttackSetting, ClientAttack, HonestSite, ServerAttack
from privacy.attacks.poisoning import (
    EditedDataset,
    PoisonedSite,
    PoisoningParams,
    boost_factor,
    check_poisoning,
    num_classes,
)
from privacy.attacks.poisoning_observer import PoisoningObserver, as_tensors, predict
from privacy.attacks.poisoning_plots import plot_path, plot_predictions
from privacy.attacks.triggers import relabelled

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm

LABEL = "label flipping (Tolpegin et al. 2020)"


class LabelFlipParams(PoisoningParams):
    """``attack.params`` of ``label_flip``."""

    mode: Literal["pair", "all"] = Field("pair", description="pair: source_class → target_class; all: y → L − 1 − y")
    source_class: int = Field(1, ge=0, description="the class relabelled in mode pair")
    target_class: int = Field(7, ge=0, description="its new label in mode pair")


def flipped(y: torch.Tensor, params: LabelFlipParams, classes: int) -> torch.Tensor:
    """The label the attack wants for ``y`` (any shape, int64): ``target_class`` where ``y = source_class`` (pair),
    ``L − 1 − y`` (all); ``y`` elsewhere."""
    if params.mode == "all":
        return classes - 1 - y
    return torch.where(y == params.source_class, torch.full_like(y, params.target_class), y)


def client_half(setting: AttackSetting, server_round: int, partition_id: int) -> ClientAttack:
    """Malicious site ``partition_id`` in round ``server_round``: relabels (and boosts) in its poison rounds."""
    params = cast(LabelFlipParams, setting.params)
    if not params.poisons_in(setting.scenario, server_round):
        return HonestSite()
    classes = num_classes(setting.scenario)

    def poison(dataset: Dataset) -> Dataset:
        everything = np.ones(len(cast(Sized, dataset)), dtype=np.bool_)
        return EditedDataset(dataset, everything, lambda sample: relabelled(sample, flipped(sample[1], params, classes)))

    return PoisonedSite(poison, boost_factor(params.boost, setting.scenario), params.claim_examples, setting.scenario)


def server_half(setting: AttackSetting) -> ServerAttack:
    """Flip success and clean accuracy of the global model on the server's test set."""
    params = cast(LabelFlipParams, setting.params)
    test = setting.task.server_data()
    assert test is not None  # check_compatible refuses data.server_samples 0
    x, y = as_tensors(test)
    classes = num_classes(setting.scenario)
    attacked = y == params.source_class if params.mode == "pair" else torch.ones_like(y, dtype=torch.bool)
    wanted = flipped(y[attacked], params, classes)

    def score(model: torch.nn.Module, server_round: int) -> dict[str, float]:
        """flip_success = |{i attacked : f(x_i) = flip(y_i)}| / |attacked|."""
        predicted = predict(model, x)
        success = float((predicted[attacked] == wanted).double().mean()) if bool(attacked.any()) else float("nan")
        path = plot_path(setting, "label_flip", server_round)
        if path is not None:
            plot_predictions(path, f"round {server_round}: attacked test inputs, flip success {success:.2f}",
                             predicted[attacked], classes, params.target_class if params.mode == "pair" else -1)
        return {"flip_success": success, "clean_accuracy": float((predicted == y).double().mean())}

    return PoisoningObserver(setting, score)


def check_compatible(scenario: Scenario, algorithm: Algorithm, params: AttackParams) -> None:
    """:func:`privacy.attacks.poisoning.check_poisoning`, and a source class that exists and differs from the target."""
    flip = cast(LabelFlipParams, params)
    check_poisoning(scenario, algorithm, flip, LABEL)
    classes = num_classes(scenario)
    if flip.mode == "pair" and flip.source_class >= classes:
        raise ValueError(f"attack.params.source_class: {flip.source_class} is not a class of the task (0..{classes - 1})")
    if flip.mode == "pair" and flip.source_class == flip.target_class:
        raise ValueError(f"attack.params.source_class: equals target_class ({flip.target_class}); nothing would flip")


ATTACK = Attack(name="label_flip", label=LABEL, Params=LabelFlipParams, headline="flip_success",
                needs="attackers", server_half=server_half, client_half=client_half,
                check_compatible=check_compatible)
