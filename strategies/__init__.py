"""Federated algorithms, selectable by name in a scenario's ``strategy.name``.

Each algorithm is ONE module holding both halves: the server side
(a Flower Message-API strategy) and the client side (a :class:`~strategies.base.ClientRule`
with the hooks the local trainer calls). The module exposes them as ``ALGORITHM``.
"""

from __future__ import annotations

import importlib
from functools import cache

from strategies.base import Algorithm

BUILTIN_ALGORITHMS: dict[str, str] = {
    # federated optimisation
    "fedavg": "strategies.fedavg",
    "fedsgd": "strategies.fedsgd",
    "scaffold": "strategies.scaffold",
    # personalisation
    "fedbn": "strategies.fedbn",
    "fedper": "strategies.fedper",
    "pfedhn": "strategies.pfedhn",
    # robust aggregation: FedAvg + a rule of strategies.aggregation (any averaging strategy takes one via `defense`)
    "fedmedian": "strategies.robust:FEDMEDIAN",
    "fedtrimmedavg": "strategies.robust:FEDTRIMMEDAVG",
    "krum": "strategies.robust:KRUM",
    "multikrum": "strategies.robust:MULTIKRUM",
    "bulyan": "strategies.robust:BULYAN",
    # baselines: each hospital alone, all data pooled
    "local": "strategies.local",
    "centralized": "strategies.centralized",
}
"""Strategy name → ``module`` (exposing ``ALGORITHM``) or ``module:ATTRIBUTE``."""


class UnknownStrategyError(LookupError):
    """A strategy name that is not registered."""


@cache
def get_algorithm(name: str) -> Algorithm:
    """The :class:`Algorithm` registered as ``name``.

    Raises
    ------
    UnknownStrategyError
        Naming the allowed strategies.
    """
    module_name = BUILTIN_ALGORITHMS.get(name)
    if module_name is None:
        allowed = ", ".join(sorted(BUILTIN_ALGORITHMS))
        raise UnknownStrategyError(f"unknown strategy '{name}' (allowed: {allowed})")
    module_name, _, attribute = module_name.partition(":")
    return getattr(importlib.import_module(module_name), attribute or "ALGORITHM")


__all__ = ["BUILTIN_ALGORITHMS", "Algorithm", "UnknownStrategyError", "get_algorithm"]
