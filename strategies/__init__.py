"""Federated algorithms, selectable by name in a scenario's ``strategy.name``.

Each algorithm is ONE module holding both halves (DESIGN.md §2): the server side
(a Flower Message-API strategy) and the client side (a :class:`~strategies.base.ClientRule`
with the hooks the local trainer calls). The module exposes them as ``ALGORITHM``.
"""

from __future__ import annotations

import importlib
from functools import lru_cache

from strategies.base import Algorithm

BUILTIN_ALGORITHMS: dict[str, str] = {
    "fedavg": "strategies.fedavg",
}


class UnknownStrategyError(LookupError):
    """A strategy name that is not registered."""


@lru_cache(maxsize=None)
def get_algorithm(name: str) -> Algorithm:
    """The :class:`Algorithm` registered as ``name``.

    Raises:
        UnknownStrategyError: naming the allowed strategies.
    """
    module_name = BUILTIN_ALGORITHMS.get(name)
    if module_name is None:
        allowed = ", ".join(sorted(BUILTIN_ALGORITHMS))
        raise UnknownStrategyError(f"unknown strategy '{name}' (allowed: {allowed})")
    return importlib.import_module(module_name).ALGORITHM


__all__ = ["Algorithm", "BUILTIN_ALGORITHMS", "UnknownStrategyError", "get_algorithm"]
