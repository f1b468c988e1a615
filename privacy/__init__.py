"""Privacy mechanisms, accounting and attacks.

A scenario's ``privacy.mechanism`` names one of :data:`MECHANISMS`:

* ``"none"``: no differential privacy (``privacy.params`` must stay empty);
* ``"dpsgd"``: sample-level DP-SGD on every client with a per-node accountant
  (:mod:`privacy.dpsgd`, Opacus); ``privacy.params`` is a
  :class:`~privacy.dpsgd.DPSGDParams`;
* ``"nbafl"``: NbAFL, the lecture's DP-FedAvg (:mod:`privacy.nbafl`): clipped and
  perturbed uploads, noise on the broadcast; ``privacy.params`` is a
  :class:`~privacy.nbafl.NbAFLParams`;
* ``"central"``: client-level central DP, DP-FedAvg of McMahan et al. 2018
  (:mod:`privacy.central`): clipped updates, noise on the aggregate, a
  per-round accountant on the server; ``privacy.params`` is a
  :class:`~privacy.central.CentralDPParams`.

Shared pieces: :mod:`privacy.accounting` (ε of a history of Gaussian steps, RDP
or PRV) and :mod:`privacy.gaussian` (clipping and seeded noise).

Besides acting inside local training (DP-SGD), a mechanism can hook into the
round loop and the reply. Its server half is a :class:`ServerPrivacy`
(:func:`server_privacy`), its client half an :class:`UploadPrivacy` applied to
what a site sends (:func:`upload_privacy`); both are ``None`` for mechanisms
without them. A mechanism's module is imported only when a scenario names it:
Opacus takes seconds to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Protocol, get_args

from medtasks.scenario import MechanismName

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from pydantic import BaseModel

    from medtasks.scenario import Scenario
    from strategies.base import Cohort

MECHANISMS: tuple[str, ...] = get_args(MechanismName)
"""Allowed values of ``privacy.mechanism``."""

BUDGET_ERRORS = ("PrivacyBudgetExhausted:", "ExposureLimitReached:")
"""How the reason of a client's error reply starts when its privacy budget is spent (the exception's class
name: :class:`privacy.dpsgd.PrivacyBudgetExhausted`, :class:`privacy.nbafl.ExposureLimitReached`)."""


class ServerPrivacy(Protocol):
    """The server half of a mechanism, called by the round loop around the strategy."""

    @property
    def epsilon(self) -> float | None:
        """The run's ε to report in every round's record (``None``: take the sites' reports)."""
        ...

    def summary(self) -> None:
        """Log the mechanism's settings at the start of the run."""
        ...

    def configure(self, config: "ConfigRecord", server_round: int) -> None:
        """Add what the clients need to a round's train config (before ``configure_train``).

        Raises:
            privacy.accounting.PrivacyBudgetExhausted: the round would overspend the run's budget.
        """
        ...

    def before_aggregate(self, replies: "list[Message]", sent: "ArrayRecord", server_round: int,
                         cohort: "Cohort") -> None:
        """Transform the round's train replies in place before ``aggregate_train`` (``sent``: the arrays the
        round started from)."""
        ...

    def after_aggregate(self, arrays: "ArrayRecord", server_round: int) -> "ArrayRecord":
        """The global arrays to use and broadcast, given those ``aggregate_train`` returned."""
        ...

    def report(self) -> dict[str, Any]:
        """Entries of ``summary.json``'s privacy block."""
        ...


class UploadPrivacy(Protocol):
    """The client half of a mechanism, applied to one round's reply of one site."""

    def admit(self, state: "RecordDict") -> None:
        """Raise (one line) if this site may not train this round; called before training."""
        ...

    def protect(self, records: Mapping[str, Any], model: "torch.nn.Module", received: "RecordDict",
                state: "RecordDict") -> tuple[dict[str, Any], dict[str, float]]:
        """The records to send instead of ``records`` (``received``: the train message's content, the arrays
        and config the site started from), and train metrics to add to the reply."""
        ...


def accounting_fields(scenario: "Scenario") -> dict[str, Any]:
    """What the ε of every ``metrics.jsonl`` record means: ``{"delta": δ, "accountant": name}``, or ``{}``
    without differential privacy. The accountant is ``rdp`` or ``prv`` (DP-SGD, central DP), or
    ``nbafl-formula`` (NbAFL's calibration; its RDP-accounted ε is in ``summary.json``)."""
    section = scenario.privacy
    if section.mechanism == "none":
        return {}
    accountant = "nbafl-formula" if section.mechanism == "nbafl" else section.params.get("accountant", "rdp")
    return {"delta": section.params.get("delta"), "accountant": accountant}


def params_schema(mechanism: str) -> "type[BaseModel] | None":
    """The pydantic schema of ``privacy.params`` for ``mechanism`` (``None``: it takes no params).

    Raises:
        ValueError: for a name not in :data:`MECHANISMS`.
    """
    if mechanism == "none":
        return None
    if mechanism == "dpsgd":
        from privacy.dpsgd import DPSGDParams

        return DPSGDParams
    if mechanism == "nbafl":
        from privacy.nbafl import NbAFLParams

        return NbAFLParams
    if mechanism == "central":
        from privacy.central import CentralDPParams

        return CentralDPParams
    raise ValueError(f"unknown privacy mechanism '{mechanism}' (allowed: {', '.join(MECHANISMS)})")


def check_compatible(scenario: "Scenario") -> None:
    """Refuse scenarios whose strategy or model the chosen mechanism cannot protect.

    Raises:
        ValueError: one line naming the offending key (e.g. FedBN with DP-SGD, SCAFFOLD with NbAFL).
    """
    if scenario.privacy.mechanism == "dpsgd":
        from medtasks.registry import get_task_class
        from privacy.dpsgd import check_combination

        if not getattr(get_task_class(scenario.task.name), "per_sample_gradients", True):
            raise ValueError(
                f"privacy.mechanism dpsgd: task '{scenario.task.name}' cannot give per-example gradients "
                "(its model's layers see sub-units of an example, e.g. the tiles of a MIL bag), so DP-SGD "
                "cannot clip them per example"
            )
        check_combination(scenario.strategy.name, scenario.strategy.params, scenario.task.params.get("norm"))
    elif scenario.privacy.mechanism == "nbafl":
        from privacy.nbafl import check_combination as check_nbafl

        check_nbafl(scenario)
    elif scenario.privacy.mechanism == "central":
        from privacy.central import check_combination as check_central

        check_central(scenario)


def server_privacy(scenario: "Scenario", stats: Mapping[int, Mapping[str, Any]]) -> ServerPrivacy | None:
    """The server half of the scenario's mechanism, built once discovery has given each site's ``stats``.

    Raises:
        ValueError: (one line) if the sites' statistics cannot calibrate it.
    """
    if scenario.privacy.mechanism == "nbafl":
        from privacy.nbafl import NbAFLServer

        return NbAFLServer.from_discovery(scenario, stats)
    if scenario.privacy.mechanism == "central":
        from privacy.central import CentralDPServer

        return CentralDPServer.from_scenario(scenario)
    return None


def upload_privacy(scenario: "Scenario", server_round: int, partition_id: int,
                   train_size: int) -> UploadPrivacy | None:
    """The client half of the scenario's mechanism for one round of one site (``train_size`` examples)."""
    if scenario.privacy.mechanism == "nbafl":
        from privacy.nbafl import NbAFLClient

        return NbAFLClient.for_round(scenario, server_round, partition_id, train_size)
    if scenario.privacy.mechanism == "central":
        from privacy.central import CentralDPClient

        return CentralDPClient.for_scenario(scenario)
    return None
