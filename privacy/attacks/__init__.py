"""Attacks on federated learning, measured inside real federated runs.

A scenario's ``attack.kind`` names one of :data:`KINDS`; each is one module with its halves
(:mod:`privacy.attacks.base`):

* gradient inversion by an honest-but-curious server: ``dlg`` (Zhu et al. 2019), ``idlg`` (Zhao et al. 2020),
  ``inverting_gradients`` (Geiping et al. 2020);
* membership inference: ``loss_threshold`` (Yeom et al. 2018), ``lira`` (Carlini et al. 2022);
* poisoning by malicious sites: ``backdoor`` with optional model replacement (Bagdasaryan et al. 2020),
  ``label_flip``;
* ``gan``: class representatives of another site's data through a generator (Hitaj et al. 2017).

A module is imported only when a scenario names its attack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, get_args

from medtasks.scenario import AttackName
from privacy.attacks.base import SIDE_RECORD_PREFIX, Attack, AttackParams, AttackSetting, ClientAttack, ServerAttack

if TYPE_CHECKING:  # pragma: no cover
    from pathlib import Path

    from medtasks.base import Task
    from medtasks.scenario import Scenario

__all__ = ["KINDS", "MODULES", "SIDE_RECORD_PREFIX", "Attack", "AttackParams", "AttackSetting", "ClientAttack",
           "ServerAttack", "check_compatible", "client_attack", "get_attack", "server_attack"]

KINDS: tuple[str, ...] = get_args(AttackName)
"""Allowed values of ``attack.kind``."""

MODULES: dict[str, str] = {
    "dlg": "privacy.attacks.dlg",
    "idlg": "privacy.attacks.idlg",
    "inverting_gradients": "privacy.attacks.inverting_gradients",
    "loss_threshold": "privacy.attacks.loss_threshold",
    "lira": "privacy.attacks.lira",
    "backdoor": "privacy.attacks.backdoor",
    "label_flip": "privacy.attacks.label_flip",
    "gan": "privacy.attacks.gan",
}
"""``attack.kind`` → the module that implements it (its ``ATTACK``, an :class:`Attack`)."""


def get_attack(kind: str) -> Attack:
    """The registered :class:`Attack` of ``kind``.

    Raises
    ------
    ValueError
        For a kind not in :data:`MODULES`.
    """
    if kind not in MODULES:
        raise ValueError(f"unknown attack '{kind}' (allowed: {', '.join(MODULES)})")
    attack: Attack = importlib.import_module(MODULES[kind]).ATTACK
    return attack


def _setting(scenario: Scenario, task: Task, plots: Path | None = None) -> AttackSetting:
    section = scenario.attack
    assert section is not None
    attack = get_attack(section.kind)
    return AttackSetting(scenario, attack.Params.model_validate(section.params), task, plots)


def check_compatible(scenario: Scenario) -> None:
    """Refuse attack settings the scenario cannot run (one-line ``ValueError`` naming the key).

    With ``attack.params`` already validated against the attack's schema.
    """
    section = scenario.attack
    if section is None:
        return
    from strategies import get_algorithm

    attack = get_attack(section.kind)
    if not getattr(section, attack.needs):
        raise ValueError(f"attack.{attack.needs}: {attack.label} needs at least one partition id in "
                         f"attack.{attack.needs} (0..{scenario.partition.clients - 1})")
    unused = "attackers" if attack.needs == "victims" else "victims"
    if getattr(section, unused):
        raise ValueError(f"attack.{unused}: {attack.label} takes no {unused} (it uses attack.{attack.needs})")
    attack.check_compatible(scenario, get_algorithm(scenario.strategy.name),
                            attack.Params.model_validate(section.params))


def server_attack(scenario: Scenario, task: Task, plots: Path | None) -> ServerAttack | None:
    """The server half of the scenario's attack (``None`` without an ``attack:`` block)."""
    if scenario.attack is None:
        return None
    setting = _setting(scenario, task, plots)
    return get_attack(scenario.attack.kind).server_half(setting)


def client_attack(scenario: Scenario, server_round: int, partition_id: int, task: Task) -> ClientAttack | None:
    """The client half a site runs in round ``server_round``: only a site in ``attack.attackers``, only in an
    attack round, only for attacks with a client half; ``None`` otherwise."""
    section = scenario.attack
    if section is None or partition_id not in section.attackers or not section.acts_in(server_round):
        return None
    attack = get_attack(section.kind)
    if attack.client_half is None:
        return None
    return attack.client_half(_setting(scenario, task), server_round, partition_id)
