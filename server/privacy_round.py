"""The server half of the scenario's privacy mechanism as a round plug-in, and the run's ε bookkeeping.

A mechanism's server half (:class:`privacy.ServerPrivacy`: NbAFL's broadcast noise, central DP's clip,
noise and accountant) acts at ``configure``, ``before-aggregate`` and ``after-aggregate``. A site that
refuses to train because its own budget is spent answers with the typed error code
:data:`privacy.accounting.BUDGET_EXHAUSTED_CODE`; this plug-in ends the run when the scenario asks for it
(``on_exhausted: stop-run``) or when too few sites have budget left. Every ``metrics.jsonl`` record gets
the run's ε so far and what it means (:meth:`PrivacyRound.stamp`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flwr.app import Message

import privacy
from medtasks.scenario import Scenario
from privacy.accounting import BUDGET_EXHAUSTED_CODE, PrivacyBudgetExhausted
from server.exchange import Exchange
from server.pipeline import BudgetSpent, FederationError, Round, RoundPlugin


def budget_exhausted(reply: Message) -> bool:
    """Whether ``reply`` is a site's refusal to train because its privacy budget is spent."""
    return reply.has_error() and reply.error.code == BUDGET_EXHAUSTED_CODE


class PrivacyRound(RoundPlugin):
    """The mechanism's server half in the round, the sites' ε as they report it, and the run's ε.

    Parameters
    ----------
    scenario : Scenario
        The resolved scenario.
    stats : mapping
        Each site's discovery statistics (NbAFL calibrates its noise from the smallest site).

    Raises
    ------
    FederationError
        If the sites' statistics cannot calibrate the mechanism (one line).
    """

    def __init__(self, scenario: Scenario, stats: Mapping[int, Mapping[str, Any]]) -> None:
        self.scenario = scenario
        try:
            self.server = privacy.server_privacy(scenario, stats)
        except ValueError as error:
            raise FederationError(str(error)) from None
        self.accounting = privacy.accounting_fields(scenario)  # δ and accountant beside every record's ε
        self.epsilons: dict[str, float] = {}  # partition id → its latest reported ε (DP-SGD)

    def summary(self) -> None:
        """Log the mechanism's settings."""
        if self.server is not None:
            self.server.summary()

    # --- the round's points ---------------------------------------------------------------------
    def configure(self, round_: Round) -> None:
        """The mechanism's train config; a round that would overspend the run's budget ends the run."""
        if self.server is None:
            return
        try:
            self.server.configure(round_.config, round_.number)
        except PrivacyBudgetExhausted as spent:
            raise BudgetSpent(f"round {round_.number}: {spent}") from None

    def inspect(self, round_: Round, phase: str, done: Exchange, sent: list[Message]) -> None:
        """With ``on_exhausted: stop-run``, the first site out of budget ends the run."""
        if phase != "train" or self.scenario.privacy.params.get("on_exhausted") != "stop-run":
            return
        if any(budget_exhausted(reply) for reply in done.replies):
            raise BudgetSpent(f"round {round_.number}: a client's privacy budget is spent (on_exhausted: stop-run)",
                              record_train=True)

    def before_aggregate(self, round_: Round) -> None:
        if self.server is not None and round_.train is not None:
            self.server.before_aggregate(round_.train.replies, round_.arrays, round_.number, round_.cohort)

    def aggregate_failed(self, round_: Round) -> None:
        """When every failed site failed for lack of budget, the budget ends the run (not an error)."""
        failed = [reply for reply in round_.train.replies if reply.has_error()] if round_.train else []
        if failed and all(budget_exhausted(reply) for reply in failed):
            raise BudgetSpent(f"round {round_.number}: too few clients have privacy budget left to train",
                              record_train=True)

    def after_aggregate(self, round_: Round) -> None:
        if self.server is not None:
            round_.arrays = self.server.after_aggregate(round_.arrays, round_.number)

    # --- ε in the records ---------------------------------------------------------------------
    def stamp(self, record: dict[str, Any]) -> None:
        """Note the sites' ε from a train record, then add the run's ``epsilon`` (and ``delta``, ``accountant``)."""
        self._note(record)
        record["epsilon"] = self.run_epsilon()
        record.update(self.accounting)

    def run_epsilon(self) -> float | None:
        """The run's ε: the mechanism's server half's (NbAFL: the ε its formulas guarantee at the end), else
        the privacy spent so far by the weakest site, the largest ε any site has reported (a site keeps its
        last value in rounds it is not sampled); ``None`` without differential privacy."""
        if self.server is not None and self.server.epsilon is not None:
            return self.server.epsilon
        return max(self.epsilons.values()) if self.epsilons else None

    def _note(self, record: dict[str, Any]) -> None:
        if record.get("phase") != "train":
            return
        for pid, metrics in record.get("clients", {}).items():
            value = metrics.get("epsilon")
            if isinstance(value, (int, float)):
                self.epsilons[pid] = float(value)

    def resume(self, extra: dict[str, Any], records: list[dict[str, Any]]) -> None:
        for record in records:
            self._note(record)

    def report(self) -> dict[str, Any]:
        """The mechanism, its settings, its server half's report and each site's final ε (``summary.json``)."""
        section = self.scenario.privacy
        summary: dict[str, Any] = {"mechanism": section.mechanism, **section.params}
        if self.server is not None:
            summary.update(self.server.report())
        if self.epsilons:
            summary["epsilon"] = max(self.epsilons.values())
            summary["epsilon_per_client"] = dict(sorted(self.epsilons.items(), key=lambda item: int(item[0])))
        return summary
