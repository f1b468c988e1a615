"""How the server combines the sites' uploads: the mean, or a Byzantine-robust rule (the ``defense`` section).

A scenario selects the rule with ``defense.aggregation`` for any strategy that averages (see
:data:`strategies.base.Combine`); the strategy names ``fedmedian``, ``fedtrimmedavg``, ``krum``,
``multikrum`` and ``bulyan`` are FedAvg with that rule (:data:`ROBUST_STRATEGIES`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario

ROBUST_STRATEGIES: dict[str, str] = {
    "fedmedian": "median",
    "fedtrimmedavg": "trimmed_mean",
    "krum": "krum",
    "multikrum": "multikrum",
    "bulyan": "bulyan",
}
"""Strategy name → the aggregation rule it stands for (FedAvg's clients, that rule on the server)."""


def aggregation_rule(scenario: "Scenario") -> str:
    """The rule a scenario's server aggregates with: its robust strategy's, else ``defense.aggregation``."""
    return ROBUST_STRATEGIES.get(scenario.strategy.name, scenario.defense.aggregation)
