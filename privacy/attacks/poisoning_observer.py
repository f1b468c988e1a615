"""The server half of the poisoning attacks: the global model measured after each round, the uploads as received.

The success of a poisoning attack is a property of the *global* model (Bagdasaryan, Veit, Hua, Estrin & Shmatikov
2020, "How To Backdoor Federated Learning", AISTATS, arXiv:1807.00459: the backdoor accuracy of the joint model),
measured on the server's test set in every round of ``attack.rounds``, also after the malicious sites stop
poisoning (its durability, Sun, Kairouz, Suresh & McMahan 2019, "Can You Really Backdoor Federated Learning?",
arXiv:1911.07963). :class:`PoisoningObserver` reports each attacker's update norm ‖Δ‖₂ at ``inspect`` (what a
norm-bounding defence sees) and an attack's :data:`Score` of the global model after each round; the helpers
here turn the test set into tensors and a model into its predicted classes, label maps or bag labels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import torch
from flwr.app import RecordDict
from torch.utils.data import DataLoader, Dataset

from privacy.attacks.base import AttackSetting, Observation, Outcome
from privacy.attacks.poisoning import PoisoningParams, boost_factor
from privacy.attacks.triggers import Sample
from strategies.base import Upload

EVAL_BATCH = 1024
BAG_BATCH = 16  # MIL bags per forward pass
IMAGE_BATCH = 32  # segmentation images per forward pass


def as_tensors(dataset: Dataset) -> Sample:
    """The whole of a map-style dataset, field by field: ``(x [N, ...], y [N, ...], ...)`` (every field of its
    samples stacked)."""
    fields: list[list[torch.Tensor]] = []
    for batch in DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False):
        fields = fields or [[] for _ in batch]
        for store, part in zip(fields, batch):
            store.append(part)
    return tuple(torch.cat(parts) for parts in fields)


def predict(model: torch.nn.Module, x: torch.Tensor, chunk: int = EVAL_BATCH) -> torch.Tensor:
    """Predicted classes ``argmax_c f(x)_c`` of ``model`` on ``x [N, ...]`` (eval mode, no gradients, ``chunk``
    inputs at a time): ``[N]`` for a classifier, ``[N, H, W]`` label maps for a segmenter (logits ``[N, C, H, W]``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(part).argmax(dim=1) for part in x.split(chunk)])
    finally:
        model.train(was_training)


def predict_bags(model: torch.nn.Module, bags: torch.Tensor, padding: torch.Tensor,
                 chunk: int = BAG_BATCH) -> torch.Tensor:
    """Predicted bag labels ``1[S(X) ≥ 0] = 1[σ(S(X)) ≥ 0.5]`` ``[N]`` int64 of a MIL model on ``bags
    [N, K, C, T, T]`` with ``padding [N, K]`` bool (the MIL task's threshold; eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = [model(part, mask if bool(mask.any()) else None)
                      for part, mask in zip(bags.split(chunk), padding.split(chunk))]
    finally:
        model.train(was_training)
    return (torch.cat(logits) >= 0).long()


def update_norm(content: RecordDict, sent: RecordDict, uploads: Mapping[str, Upload]) -> float:
    """‖Δ‖₂ of a reply over its ``weights`` (w_k − w_t), ``update`` and ``gradient`` records (floating tensors)."""
    total = 0.0
    for name, upload in uploads.items():
        if upload.kind not in ("weights", "update", "gradient") or name not in content.array_records:
            continue
        tensors = content.array_records[name].to_torch_state_dict()
        origin = sent.array_records[upload.reference].to_torch_state_dict() if upload.kind == "weights" else {}
        for key, value in tensors.items():
            if value.is_floating_point():
                delta = value.double() - origin[key].double() if key in origin else value.double()
                total += float(delta.square().sum())
    return total ** 0.5


Score = Callable[[torch.nn.Module, int], dict[str, float]]
"""``(global model, round) → metrics`` of the attack's success (it may draw a picture)."""


class PoisoningObserver:
    """The server half: the attackers' update norms at ``inspect``, the global model's success rates after a round.

    Parameters
    ----------
    setting : AttackSetting
        The scenario, validated params (a :class:`PoisoningParams`) and task.
    score : Score
        The success rates of the global model.
    """

    def __init__(self, setting: AttackSetting, score: Score) -> None:
        self.setting, self.score = setting, score
        self.params = cast(PoisoningParams, setting.params)
        section = setting.scenario.attack
        assert section is not None
        self.attackers = section.attackers
        self.gamma = boost_factor(self.params.boost, setting.scenario)

    def observe(self, observation: Observation) -> list[Outcome]:
        """The attacker's ‖Δ‖₂ as the server receives it, whether it poisoned, and its boost γ (1 without)."""
        poisoned = self.params.poisons_in(self.setting.scenario, observation.round)
        norm = update_norm(observation.reply, observation.sent, observation.uploads)
        gamma = self.gamma if poisoned and self.gamma is not None else 1.0
        return [Outcome(victim="global", attacker=observation.partition_id,
                        metrics={"update_norm": norm, "poisoned": float(poisoned), "boost": gamma})]

    def after_round(self, server_round: int, model: torch.nn.Module | None) -> list[Outcome]:
        """The global model's success rates (attacker: the first malicious site; ``attackers``: how many)."""
        if model is None:
            return []
        metrics = self.score(model, server_round)
        metrics["attackers"] = float(len(self.attackers))
        metrics["poisoned"] = float(self.params.poisons_in(self.setting.scenario, server_round))
        return [Outcome(victim="global", attacker=self.attackers[0], metrics=metrics)]
