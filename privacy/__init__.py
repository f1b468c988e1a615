"""Privacy mechanisms, accounting and attacks.

A scenario's ``privacy.mechanism`` names one of :data:`MECHANISMS`:

* ``"none"``: no differential privacy (``privacy.params`` must stay empty);
* ``"dpsgd"``: sample-level DP-SGD on every client with a per-node accountant
  (:mod:`privacy.dpsgd`, Opacus); ``privacy.params`` is a
  :class:`~privacy.dpsgd.DPSGDParams`.

:mod:`privacy.nbafl` holds NbAFL's calibration (pure functions, not yet a
mechanism of its own). A mechanism's module is imported only when a scenario
names it: Opacus takes seconds to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pydantic import BaseModel

    from server.scenario import Scenario

MECHANISMS = ("none", "dpsgd")
"""Allowed values of ``privacy.mechanism``."""


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
    raise ValueError(f"unknown privacy mechanism '{mechanism}' (allowed: {', '.join(MECHANISMS)})")


def check_compatible(scenario: "Scenario") -> None:
    """Refuse scenarios whose strategy or model the chosen mechanism cannot protect.

    Raises:
        ValueError: one line naming the offending key (e.g. FedBN with DP-SGD).
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
