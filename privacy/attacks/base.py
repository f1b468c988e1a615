"""What every attack module shares: its registry entry, its two halves and what they see.

An attack experiment has up to two halves, like a privacy mechanism:

* a **server half** (:class:`ServerAttack`), the experimenter's eye on the run: an honest-but-curious server
  observing the sites' replies (gradient inversion, membership inference on one site's update), or any observer
  of the broadcast global model (membership inference against it, a backdoor's success, the GAN attacker's
  samples). It scores every attempt against the ground truth, which a simulation knows (the site's real data);
* a **client half** (:class:`ClientAttack`) run by a malicious site on its own node: it changes the data it trains
  on (poisoning, label flipping, fakes from a generator) and what it sends (model replacement's boosted update).

The round loop calls the server half from a plug-in of the round pipeline (``server/attack_round.py``) and the
client half from the ClientApp's train handler; neither exists when a scenario has no ``attack:`` block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from flwr.app import RecordDict
    from torch.utils.data import Dataset

    from medtasks.base import Task
    from medtasks.scenario import LocalSection, Scenario
    from strategies.base import Algorithm, Upload

SIDE_RECORD_PREFIX = "attack-"
"""Records a malicious site adds to its reply for the experimenter (the GAN attacker's samples). The server's
attack plug-in removes them before anything else sees the reply; from any other site they are undeclared
uploads, and the reply checks drop the reply."""


class AttackParams(BaseModel):
    """Base class of an attack's ``attack.params`` schema (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class AttackSetting:
    """What either half of an attack is built from.

    Attributes
    ----------
    scenario : Scenario
        The resolved scenario (its ``attack`` section is set).
    params : AttackParams
        The attack's validated ``attack.params``.
    task : Task
        The scenario's task (on the server: every site's simulated data, the server's test set).
    plots : Path or None
        Where the server half draws its pictures (``<run>/plots/attack``); ``None`` on a node, or when the
        scenario turns plots off.
    """

    scenario: Scenario
    params: AttackParams
    task: Task
    plots: Path | None = None


@dataclass
class Observation:
    """One site's train reply in an attack round, as the server receives it.

    Attributes
    ----------
    round : int
        t.
    partition_id : int
        The site.
    sent : RecordDict
        The train message's content: w_t (``"arrays"``) and the config.
    reply : RecordDict
        The reply's content, as the strategy will see it (side records removed).
    side : dict
        The records the site's attack half added (names starting with :data:`SIDE_RECORD_PREFIX`).
    uploads : Mapping[str, Upload]
        What the strategy declares the reply holds, record by record.
    local : LocalSection
        The local-training settings the site used (after the strategy's ``local_section``).
    batches : Callable[[], list]
        Ground truth for scoring only: the mini-batches the site trained on this round, in order, as its
        seeded loader drew them (without DP-SGD's Poisson sampling).
    members : Callable[[], Dataset]
        Ground truth for scoring only: the site's training split.
    """

    round: int
    partition_id: int
    sent: RecordDict
    reply: RecordDict
    side: dict[str, Any]
    uploads: Mapping[str, Upload]
    local: LocalSection
    batches: Callable[[], list[Any]]
    members: Callable[[], Dataset]


@dataclass
class Outcome:
    """One scored attempt, written as a ``"phase": "attack"`` record of ``metrics.jsonl``.

    Attributes
    ----------
    victim : int or "global"
        The attacked site's partition id, or ``"global"`` for the broadcast model.
    attacker : int or "server"
        The malicious site's partition id, or ``"server"`` (an honest-but-curious server or any observer).
    metrics : dict of str to float
        The attack's metrics (e.g. PSNR, AUC, backdoor accuracy); NaN is written as ``null``.
    """

    victim: int | Literal["global"]
    attacker: int | Literal["server"]
    metrics: dict[str, float] = field(default_factory=dict)


class ServerAttack(Protocol):
    """The server half: observes the run and scores the attack (built once per run)."""

    def observe(self, observation: Observation) -> list[Outcome]:
        """A victim's or an attacker's train reply in an attack round (error replies are not observed)."""
        ...

    def after_round(self, server_round: int, model: torch.nn.Module | None) -> list[Outcome]:
        """Round ``server_round`` is aggregated and evaluated; ``model`` holds the new global weights (``None``
        when the strategy's global model is not a complete model, e.g. FedBN's)."""
        ...


class ClientAttack(Protocol):
    """The client half, run by a malicious site in an attack round."""

    def training_data(self, dataset: Dataset, model: torch.nn.Module, state: RecordDict) -> Dataset:
        """The examples the site trains on instead of ``dataset`` (``model`` holds w_t; ``state`` is the node's
        persistent state, e.g. a generator's weights)."""
        ...

    def tamper(self, records: dict[str, Any], model: torch.nn.Module, received: RecordDict,
               state: RecordDict) -> dict[str, Any]:
        """The reply's records as the site sends them (``model`` is the trained local model, ``received`` the
        train message's content)."""
        ...


class HonestSite:
    """A :class:`ClientAttack` that changes nothing (a base for attacks with only one client hook)."""

    def training_data(self, dataset: Dataset, model: torch.nn.Module, state: RecordDict) -> Dataset:
        return dataset

    def tamper(self, records: dict[str, Any], model: torch.nn.Module, received: RecordDict,
               state: RecordDict) -> dict[str, Any]:
        return records


@dataclass(frozen=True)
class Attack:
    """A registered attack: its schema, its halves and what it needs of a scenario.

    Attributes
    ----------
    name : str
        The ``attack.kind`` it is selected by.
    label : str
        Name and paper, for messages and tables (``"iDLG (Zhao et al. 2020)"``).
    Params : type of AttackParams
        Schema of ``attack.params``.
    headline : str
        The metric that says how well the attack worked (a sweep's x axis), e.g. ``"psnr"``, ``"auc"``.
    needs : "victims" or "attackers"
        Which list of ``attack`` must be non-empty.
    server_half : callable
        Builds the :class:`ServerAttack` from an :class:`AttackSetting`.
    client_half : callable or None
        Builds the :class:`ClientAttack` of a malicious site for one round: ``(setting, server_round,
        partition_id)``; ``None`` for attacks that only observe.
    check_compatible : callable
        ``(scenario, algorithm, params)``: raises ``ValueError`` (one line, naming the key) for combinations the
        attack cannot run, e.g. a gradient inversion against a strategy that uploads nothing per site.
    """

    name: str
    label: str
    Params: type[AttackParams]
    headline: str
    needs: Literal["victims", "attackers"]
    server_half: Callable[[AttackSetting], ServerAttack]
    client_half: Callable[[AttackSetting, int, int], ClientAttack] | None = None
    check_compatible: Callable[[Scenario, Algorithm, AttackParams], None] = field(
        default=lambda scenario, algorithm, params: None)


def model_sent(task: Task, content: RecordDict, record: str = "arrays") -> torch.nn.Module:
    """A fresh model of ``task`` holding the weights of a message's ``record`` (w_t of a train message).

    Raises
    ------
    KeyError
        If the message has no such record.
    """
    from strategies.base import load_into

    model = task.build_model()
    load_into(model, content.array_records[record].to_torch_state_dict())
    return model
