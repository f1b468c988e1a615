"""Backdoor by data poisoning, with optional model replacement (``attack.kind: backdoor``).

Bagdasaryan, Veit, Hua, Estrin & Shmatikov 2020, "How To Backdoor Federated Learning" (AISTATS,
arXiv:1807.00459); Sun, Kairouz, Suresh & McMahan 2019, "Can You Really Backdoor Federated Learning?"
(arXiv:1911.07963).

Client half (each site of ``attack.attackers``, in the rounds of ``params.poison_rounds``): a share
``poison_fraction`` of its training samples, drawn from the stream ``(seed, "backdoor", round, pid)``, gets the
trigger (:func:`privacy.attacks.poisoning.add_trigger`) and the label ``target_class``; the rest stay clean, so
the model keeps its main task (the paper mixes backdoor and clean data in every batch). ``repeat`` lets the site
train on its data several times per epoch. With ``boost`` γ it sends the boosted update of model replacement
(:func:`privacy.attacks.poisoning.boost_records`, Eq. 3, γ = n/η for ``"auto"``).

Server half: ``backdoor_accuracy`` — the share of the server's triggered test inputs whose true label is not
the target that the global model classifies as the target — ``clean_target_rate``, the same share without the
trigger (what an untrained or biased model scores anyway), and ``clean_accuracy`` on the untouched test set,
after every round of ``attack.rounds``; at ``inspect`` the attacker's update norm ‖Δ‖₂ as received.
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
    INPUT_KINDS,
    EditedDataset,
    PoisonedSite,
    PoisoningObserver,
    PoisoningParams,
    add_trigger,
    as_tensors,
    boost_factor,
    check_poisoning,
    choose,
    num_classes,
    plot_path,
    plot_predictions,
    predict,
)

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm

LABEL = "backdoor (Bagdasaryan et al. 2020)"


class BackdoorParams(PoisoningParams):
    """``attack.params`` of ``backdoor``."""

    poison_fraction: float = Field(0.5, gt=0.0, le=1.0, description="share of the site's samples given the trigger")
    patch_size: int = Field(2, ge=1, description="side of the square trigger (images) or features it sets (tabular)")
    patch_value: float = Field(1.0, description="the trigger's pixel value (tabular: times 5)")
    repeat: int = Field(1, ge=1, le=100, description="the malicious site trains on its data this many times per epoch")


def _trigger(setting: AttackSetting, x: torch.Tensor) -> torch.Tensor:
    params = cast(BackdoorParams, setting.params)
    return add_trigger(x, INPUT_KINDS[setting.scenario.task.name], params.patch_size, params.patch_value)


def client_half(setting: AttackSetting, server_round: int, partition_id: int) -> ClientAttack:
    """Malicious site ``partition_id`` in round ``server_round``: poisons (and boosts) in its poison rounds."""
    params = cast(BackdoorParams, setting.params)
    if not params.poisons_in(setting.scenario, server_round):
        return HonestSite()
    target = torch.tensor(params.target_class, dtype=torch.int64)

    def poison(dataset: Dataset) -> Dataset:
        rng = numpy_rng(setting.scenario.seed, "backdoor", server_round, partition_id)
        chosen = choose(len(cast(Sized, dataset)), params.poison_fraction, rng)
        return EditedDataset(dataset, chosen, lambda x, y: (_trigger(setting, x), target), params.repeat)

    return PoisonedSite(poison, boost_factor(params.boost, setting.scenario), params.claim_examples, setting.scenario)


def server_half(setting: AttackSetting) -> ServerAttack:
    """Backdoor and clean accuracy of the global model on the server's test set."""
    params = cast(BackdoorParams, setting.params)
    test = setting.task.server_data()
    assert test is not None  # check_compatible refuses data.server_samples 0
    x, y = as_tensors(test)
    others = y != params.target_class
    triggered = _trigger(setting, x[others])
    classes = num_classes(setting.scenario)

    def score(model: torch.nn.Module, server_round: int) -> dict[str, float]:
        """backdoor_accuracy = |{i : y_i ≠ τ, f(x̃_i) = τ}| / |{i : y_i ≠ τ}| with x̃ the triggered input."""
        on_triggered = predict(model, triggered)
        backdoor = float((on_triggered == params.target_class).double().mean())
        on_clean = predict(model, x)
        clean = float((on_clean == y).double().mean())
        baseline = float((on_clean[others] == params.target_class).double().mean())
        path = plot_path(setting, "backdoor", server_round)
        if path is not None:
            images = triggered if triggered.dim() == 4 else None
            plot_predictions(path, f"round {server_round}: triggered test inputs, backdoor accuracy {backdoor:.2f}",
                             on_triggered, classes, params.target_class, images)
        return {"backdoor_accuracy": backdoor, "clean_accuracy": clean, "clean_target_rate": baseline}

    return PoisoningObserver(setting, score)


def check_compatible(scenario: Scenario, algorithm: Algorithm, params: AttackParams) -> None:
    """:func:`privacy.attacks.poisoning.check_poisoning`, and a trigger that fits the input."""
    backdoor = cast(BackdoorParams, params)
    check_poisoning(scenario, algorithm, backdoor, LABEL)
    if scenario.task.name == "digits":
        side = int(scenario.task.params.get("image_size", 8))
        if backdoor.patch_size >= side:
            raise ValueError(f"attack.params.patch_size: {backdoor.patch_size} must be smaller than the image ({side})")
    else:
        features = int(scenario.task.params.get("num_features", 32))
        if backdoor.patch_size >= features:
            raise ValueError(f"attack.params.patch_size: {backdoor.patch_size} must be fewer than the features "
                             f"({features})")


ATTACK = Attack(name="backdoor", label=LABEL, Params=BackdoorParams, headline="backdoor_accuracy",
                needs="attackers", server_half=server_half, client_half=client_half,
                check_compatible=check_compatible)
