"""Privacy mechanisms, accounting and attacks.

A scenario's ``privacy.mechanism`` names one of :data:`MECHANISMS`:

* ``"none"``: no differential privacy (``privacy.params`` must stay empty);
* ``"dpsgd"``: sample-level DP-SGD on every client with a per-node accountant
  (:mod:`privacy.dpsgd`, Opacus); ``privacy.params`` is a
  :class:`~privacy.dpsgd.DPSGDParams`;
* ``"nbafl"``: NbAFL of Wei et al. 2020 (IEEE TIFS, "Federated Learning with
  Differential Privacy: Algorithms and Performance Analysis"; :mod:`privacy.nbafl`):
  clipped and perturbed uploads, noise on the broadcast; ``privacy.params`` is a
  :class:`~privacy.nbafl.NbAFLParams`;
* ``"central"``: client-level central DP, DP-FedAvg of McMahan et al. 2018
  (:mod:`privacy.central`): clipped updates, noise on the aggregate, a
  per-round accountant on the server; ``privacy.params`` is a
  :class:`~privacy.central.CentralDPParams`.

Shared pieces: :mod:`privacy.accounting` (ε of a history of Gaussian steps, RDP
or PRV, for every mechanism), :mod:`privacy.gaussian` (seeded noise; clipping is :mod:`strategies.norms`)
and :mod:`privacy.compatibility` (which mechanism can protect which scenario,
decided from what the strategy declares it uploads).

Every mechanism is a plug-in with two halves. Its client half is a
:class:`ClientPrivacy` (:func:`client_privacy`; :class:`NoPrivacy` without a
mechanism), which may act inside local training (DP-SGD) and on what a site
sends (NbAFL, central DP); its server half is a :class:`ServerPrivacy`
(:func:`server_privacy`, ``None`` for mechanisms without one). A mechanism's
module is imported only when a scenario names it: Opacus takes seconds to
import.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, get_args

from medtasks.scenario import MechanismName

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from pydantic import BaseModel
    from torch.utils.data import DataLoader

    from medtasks.scenario import LocalSection, Scenario
    from strategies.base import ClientRule, Cohort

MECHANISMS: tuple[str, ...] = get_args(MechanismName)
"""Allowed values of ``privacy.mechanism``."""

MODULES: dict[str, str] = {"dpsgd": "privacy.dpsgd", "nbafl": "privacy.nbafl", "central": "privacy.central"}
"""Mechanism → the module that implements it (its ``client_privacy`` factory and params schema)."""

class PrivateTraining(Protocol):
    """Sample-level differential privacy of the local loop (:mod:`privacy.dpsgd` implements it;
    :func:`client.trainer.fit` uses it).

    The mechanism owns the gradient that reaches the optimiser: :func:`client.trainer.fit` does not
    call ``rule.after_backward`` on the raw gradient (the private optimiser would
    discard the edit, or worse, it would act on unprotected data); the mechanism
    applies such edits itself after adding the noise.
    """

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               loader: DataLoader) -> tuple[torch.optim.Optimizer, DataLoader]:
        """The private optimiser and loader to train ``model`` with (``model`` is trained in place)."""
        ...

    def is_empty(self, batch: Any) -> bool:
        """Whether the private loader drew a batch without any example (Poisson sampling)."""
        ...

    def noise_step(self, optimizer: torch.optim.Optimizer) -> None:
        """The step taken for an empty batch (noise only; no loss is computed)."""
        ...


class ServerPrivacy(Protocol):
    """The server half of a mechanism, called by the round loop around the strategy."""

    @property
    def epsilon(self) -> float | None:
        """The run's ε to report in every round's record (``None``: take the sites' reports)."""
        ...

    def summary(self) -> None:
        """Log the mechanism's settings at the start of the run."""
        ...

    def configure(self, config: ConfigRecord, server_round: int) -> None:
        """Add what the clients need to a round's train config (before ``configure_train``).

        Raises
        ------
        privacy.accounting.PrivacyBudgetExhausted
            The round would overspend the run's budget.
        """
        ...

    def before_aggregate(self, replies: list[Message], sent: ArrayRecord, server_round: int,
                         cohort: Cohort) -> None:
        """Transform the round's train replies in place before ``aggregate_train`` (``sent``: the arrays the
        round started from)."""
        ...

    def after_aggregate(self, arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        """The global arrays to use and broadcast, given those ``aggregate_train`` returned."""
        ...

    def report(self) -> dict[str, Any]:
        """Entries of ``summary.json``'s privacy block."""
        ...


class ClientPrivacy(Protocol):
    """The client half of a mechanism for one round of one site, driven by the train handler in this order:

    1. :meth:`admit` before any training (raise if the site may not train);
    2. :meth:`private_training` gives the trainer its private optimiser and loader (DP-SGD) or ``None``;
    3. :meth:`protect` transforms the reply's records once the strategy has built them;
    4. :meth:`spend` spends the round's budget and gives the train metrics to report, once the reply is
       built (a round that fails before costs nothing);
    5. :meth:`close`, always (e.g. Opacus's hooks on the model).
    """

    def admit(self, state: RecordDict) -> None:
        """Raise (one line; a :class:`privacy.accounting.BudgetExhausted` for a spent budget) if this site may not
        train this round (``state``: the node's persistent state)."""
        ...

    def private_training(self) -> PrivateTraining | None:
        """What replaces the trainer's optimiser and loader (:class:`PrivateTraining`), or ``None``."""
        ...

    def protect(self, records: Mapping[str, Any], model: torch.nn.Module, received: RecordDict,
                state: RecordDict) -> dict[str, Any]:
        """The records to send instead of ``records`` (``received``: the train message's content, the arrays
        and config the site started from)."""
        ...

    def spend(self, state: RecordDict) -> dict[str, float]:
        """Spend this round's budget in ``state``; the train metrics to add to the reply."""
        ...

    def close(self) -> None:
        """Release what training attached (called whether the round succeeded or not)."""
        ...


class NoPrivacy:
    """The client half of ``privacy.mechanism: none``: every step leaves the round as it is."""

    def admit(self, state: RecordDict) -> None:
        """Every site may train."""

    def private_training(self) -> None:
        """Plain local training."""
        return

    def protect(self, records: Mapping[str, Any], model: torch.nn.Module, received: RecordDict,
                state: RecordDict) -> dict[str, Any]:
        """The records as they are."""
        return dict(records)

    def spend(self, state: RecordDict) -> dict[str, float]:
        """No budget, no metrics."""
        return {}

    def close(self) -> None:
        """Nothing to release."""


def accounting_fields(scenario: Scenario) -> dict[str, Any]:
    """What the ε of every ``metrics.jsonl`` record means: ``{"delta": δ, "accountant": name}``, or ``{}``
    without differential privacy. The accountant is ``rdp`` or ``prv`` (DP-SGD, central DP), or
    ``nbafl-formula`` (NbAFL's calibration; its RDP-accounted ε is in ``summary.json``)."""
    section = scenario.privacy
    if section.mechanism == "none":
        return {}
    accountant = "nbafl-formula" if section.mechanism == "nbafl" else section.params.get("accountant", "rdp")
    return {"delta": section.params.get("delta"), "accountant": accountant}


def params_schema(mechanism: str) -> type[BaseModel] | None:
    """The pydantic schema of ``privacy.params`` for ``mechanism`` (``None``: it takes no params).

    Raises
    ------
    ValueError
        For a name not in :data:`MECHANISMS`.
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


def check_compatible(scenario: Scenario) -> None:
    """Refuse scenarios whose strategy, model or task the chosen mechanism cannot protect.

    The decision is :mod:`privacy.compatibility`'s, from what the strategy declares; NbAFL also checks its
    ``exposures`` against the rounds, and central DP with both ``noise_multiplier`` and ``target_epsilon``
    that its first round fits the budget (else the run would end before round 1). DP-SGD's first round
    depends on each site's data size: ``server.checks`` checks it.

    Raises
    ------
    ValueError
        One line naming the mechanism and the reason (e.g. a control-variate update beside the weights under
        NbAFL, BatchNorm under DP-SGD).
    """
    if scenario.privacy.mechanism == "none":
        return
    from privacy.compatibility import check

    check(scenario)
    if scenario.privacy.mechanism == "nbafl":
        from privacy.nbafl import check_params

        check_params(scenario)
    if scenario.privacy.mechanism == "central":
        _check_central_first_round(scenario)


def _check_central_first_round(scenario: Scenario) -> None:
    """Refuse a given noise multiplier z whose first round (one subsampled Gaussian step at q = K/N,
    McMahan et al. 2018) already spends more than ``target_epsilon``."""
    params = scenario.privacy.params
    target = params.get("target_epsilon")
    if target is None or params.get("noise_multiplier") is None:
        return  # a calibrated z fits every planned round
    from privacy.central import CentralDPServer

    server = CentralDPServer.from_scenario(scenario)
    first = server.epsilon_after(1)
    if first > target:
        raise ValueError(
            f"privacy.params: one round already spends ε = {first:.4g} at δ = {server.params.delta:g} > "
            f"target_epsilon {target:g} (noise_multiplier {server.noise_multiplier:g}, sampling rate "
            f"{server.sample_rate:.3g}): raise noise_multiplier or target_epsilon, or drop noise_multiplier to "
            f"calibrate it"
        )


def server_privacy(scenario: Scenario, stats: Mapping[int, Mapping[str, Any]]) -> ServerPrivacy | None:
    """The server half of the scenario's mechanism, built once discovery has given each site's ``stats``.

    Raises
    ------
    ValueError
        (one line) if the sites' statistics cannot calibrate it.
    """
    if scenario.privacy.mechanism == "nbafl":
        from privacy.nbafl import NbAFLServer

        return NbAFLServer.from_discovery(scenario, stats)
    if scenario.privacy.mechanism == "central":
        from privacy.central import CentralDPServer

        return CentralDPServer.from_scenario(scenario)
    return None


def client_privacy(scenario: Scenario, server_round: int, partition_id: int, train_size: int,
                   local: LocalSection, rule: ClientRule) -> ClientPrivacy:
    """The client half of the scenario's mechanism for one round of one site.

    Parameters
    ----------
    scenario : Scenario
        The scenario the train message carried.
    server_round : int
        The round (with the seed and ``partition_id``, it selects the mechanism's noise stream).
    partition_id : int
        This site.
    train_size : int
        The examples this site trains on.
    local : LocalSection
        The local-training settings the strategy's rule resolved for this round.
    rule : ClientRule
        The strategy's client rule (its declared uploads, its gradient edit).

    Returns
    -------
    ClientPrivacy
        The mechanism module's ``client_privacy(...)`` (:data:`MODULES`), or :class:`NoPrivacy`.
    """
    module = MODULES.get(scenario.privacy.mechanism)
    if module is None:
        return NoPrivacy()
    import importlib

    return importlib.import_module(module).client_privacy(scenario, server_round, partition_id, train_size,
                                                          local, rule)
