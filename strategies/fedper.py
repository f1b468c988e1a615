"""Federated learning with personalization layers (FedPer).

Arivazhagan et al., "Federated Learning with Personalization Layers", 2019
(arXiv:1912.00818): the model is split into base layers, shared by all sites,
and personalization layers private to each site (for classification, the head).

The model's state dict is split into shared tensors W_B (base layers) and local
tensors W_P,k (personalization layers of site k). Each round:

* client k loads the received W_B and its own W_P,k (the global initial values
  the first time), runs E local epochs on F_k(W_B, W_P,k), keeps the new W_P,k in
  its node state (``context.state``) and sends only W_B,k;
* the server averages only the shared part,

      W_B ← Σ_{k∈S_t} (n_k / m_t) W_B,k,   m_t = Σ_{k∈S_t} n_k   (float64, partition-id order),

  or with the scenario's ``defense`` (:mod:`strategies.aggregation`): its rule over
  the W_B,k, each bounded to ‖W_B,k − W_B‖₂ ≤ ``norm_bound``. The personalization
  layers are never aggregated, so a defense concerns the shared part only.

Which tensors are local (``strategy.params``): ``local_layers``, state-dict name
prefixes matched at dot boundaries (``"head"`` selects ``head.weight`` and
``head.1.bias`` but not ``header.weight``), or ``last_modules: N``, every tensor
(parameters and persistent buffers) of the last N modules that own parameters,
in registration order (the forward order of most models). The default is
``last_modules: 1``: the classifier head.

This module holds the general mechanism "some named tensors never leave the
site"; FedBN (:mod:`strategies.fedbn`) is the special case "every BatchNorm tensor".
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

import torch
from flwr.app import ArrayRecord, RecordDict
from pydantic import Field, model_validator

from medtasks.registry import get_task_class
from strategies.aggregation import Aggregator
from strategies.base import (
    ARRAYS_KEY,
    Algorithm,
    ClientRule,
    Cohort,
    StrategyContext,
    StrategyParams,
    Upload,
    load_into,
)
from strategies.fedavg import FedAvg, sampling_options

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario

log = logging.getLogger("medfed")

LOCAL_TENSORS_STATE_KEY = "fedper-local-tensors"


class FedPerParams(StrategyParams):
    """``strategy.params`` of ``fedper``: which tensors stay at the sites (one of the two keys)."""

    local_layers: list[str] | None = Field(
        None, min_length=1, description="state-dict name prefixes of the personalization layers, e.g. ['head']"
    )
    last_modules: int | None = Field(
        None, ge=1, description="the last N modules with parameters stay local (default 1 when local_layers is unset)"
    )

    @model_validator(mode="after")
    def _one_selection(self) -> FedPerParams:
        if self.local_layers is not None and self.last_modules is not None:
            raise ValueError("set either local_layers or last_modules, not both")
        if self.local_layers is None and self.last_modules is None:
            self.last_modules = 1
        return self


# --- which tensors are local ----------------------------------------------------------------------
def template_model(scenario: Scenario) -> torch.nn.Module:
    """A fresh model of the scenario's task, built without the per-process task cache (no data is made)."""
    return get_task_class(scenario.task.name)(scenario.task_context()).build_model()


def _module_tensor_names(model: torch.nn.Module) -> list[set[str]]:
    """For each module owning parameters (registration order): its own state-dict names."""
    persistent = set(model.state_dict())
    owners = []
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(prefix=name, recurse=False)]
        if own:
            own += [n for n, _ in module.named_buffers(prefix=name, recurse=False)]
            owners.append({n for n in own if n in persistent})
    return owners


def personal_tensor_names(model: torch.nn.Module, params: FedPerParams) -> set[str]:
    """State-dict names of the personalization layers W_P selected by ``params``.

    Raises
    ------
    ValueError
        One line naming the key, when a prefix matches no tensor, when
        ``last_modules`` exceeds the modules with parameters, or when nothing would be shared.
    """
    names = list(model.state_dict())
    if params.local_layers is not None:
        key, chosen = "local_layers", set()
        for prefix in params.local_layers:
            stem = prefix.rstrip(".")
            matched = {n for n in names if n == stem or n.startswith(stem + ".")}
            if not matched:
                top = sorted({n.split(".")[0] for n in names})
                raise ValueError(
                    f"strategy.params.local_layers: '{prefix}' matches no tensor of the task's model "
                    f"(its top-level modules with tensors: {', '.join(top)})"
                )
            chosen |= matched
    else:
        key, owners = "last_modules", _module_tensor_names(model)
        last = cast(int, params.last_modules)  # FedPerParams._one_selection sets it when local_layers is None
        if last > len(owners):
            raise ValueError(
                f"strategy.params.last_modules: {last} exceeds the {len(owners)} modules "
                "with parameters of the task's model"
            )
        chosen = set().union(*owners[len(owners) - last:])
    if len(chosen) == len(names):
        raise ValueError(f"strategy.params.{key}: every tensor of the model would stay local and nothing "
                         "would be shared (use strategy 'local' for that)")
    return chosen


# --- server side ----------------------------------------------------------------------------------
class FedPer(FedAvg):
    r"""FedAvg over the shared tensors only; the personalization layers stay at the sites.

    .. math:: W_B^{t+1} = \sum_{k \in S_t} \frac{n_k}{m_t} W_{B,k}

    The clients MUST send only W_B (:class:`FedPerClient` does). Before round 1 the
    server holds the whole initial model and sends it, so every site's local
    tensors start from the global initialisation; afterwards it holds and sends only
    the shared part. ``central_evaluation`` is off (:class:`~strategies.base.Algorithm`): the global model lacks the
    personalization layers by design, so it is judged by federated evaluation, each
    site scoring its own W_B + W_P,k on its validation split.

    Parameters
    ----------
    cohort : Cohort
        Node id ↔ partition id map and sampling seed.
    template : torch.nn.Module
        A model of the task (names and sizes, for the start-up summary).
    local_names : collection of str
        State-dict names of ``template`` that stay local.
    **fedavg_options
        Sampling settings and ``aggregator`` of :class:`~strategies.fedavg.FedAvg` (the aggregator combines the
        shared tensors; w_t for its norm bound is what was sent, restricted to the shared names).
    """

    label: ClassVar[str] = "FedPer"

    def __init__(self, cohort: Cohort, *, template: torch.nn.Module, local_names: Collection[str],
                 **fedavg_options: Any) -> None:
        super().__init__(cohort, **fedavg_options)
        local, sizes = set(local_names), {name: tensor.numel() for name, tensor in template.state_dict().items()}
        self.local_names = [name for name in sizes if name in local]
        self.local_share = sum(sizes[name] for name in self.local_names) / max(sum(sizes.values()), 1)
        self.tensor_count = len(sizes)

    def summary(self) -> None:
        """Log which tensors stay local and their share of the model."""
        shown = ", ".join(self.local_names[:5]) + (", ..." if len(self.local_names) > 5 else "")
        self.log_aggregator()
        log.info("%s: %d of %d tensors (%.2f%% of the values) stay at the sites (%s); fraction train %.2f / "
                 "evaluate %.2f, min train nodes %d", self.label, len(self.local_names), self.tensor_count,
                 100 * self.local_share, shown, self.fraction_train, self.fraction_evaluate, self.min_train_nodes)


PartialStrategy = TypeVar("PartialStrategy", bound=FedPer)


def build_partial_strategy(context: StrategyContext, strategy_class: type[PartialStrategy],
                           local_names: Collection[str]) -> PartialStrategy:
    """A :class:`FedPer`-family server half from a scenario."""
    return strategy_class(context.cohort, template=context.model, local_names=local_names,
                          aggregator=Aggregator.from_scenario(context.scenario), **sampling_options(context))


# --- client side ----------------------------------------------------------------------------------
class FedPerClient(ClientRule):
    """Client half: the tensors of :meth:`local_names` live in the node state and never travel up."""

    params: FedPerParams
    state_key: ClassVar[str] = LOCAL_TENSORS_STATE_KEY

    def local_names(self, model: torch.nn.Module) -> set[str]:
        """State-dict names that stay at this site."""
        return personal_tensor_names(model, self.params)

    def receive(self, model: torch.nn.Module, content: RecordDict, state: RecordDict) -> None:
        """Load the received tensors (round 1: the whole initial model), then this site's own local ones."""
        super().receive(model, content, state)
        if self.state_key in state:
            load_into(model, state.array_records[self.state_key].to_torch_state_dict())

    def reply(self, model: torch.nn.Module, state: RecordDict, *, steps: int) -> dict[str, ArrayRecord]:
        """Keep W_P,k in the node state; send W_B,k only."""
        tensors, local = model.state_dict(), self.local_names(model)
        state[self.state_key] = ArrayRecord({name: t for name, t in tensors.items() if name in local})
        return {ARRAYS_KEY: ArrayRecord({name: t for name, t in tensors.items() if name not in local})}

    def uploads(self, model: torch.nn.Module) -> dict[str, Upload]:
        """The shared weights W_B,k."""
        local = self.local_names(model)
        return {ARRAYS_KEY: Upload("weights", frozenset(name for name in model.state_dict() if name not in local))}


def build_strategy(context: StrategyContext) -> FedPer:
    """Server half from a scenario."""
    params = cast(FedPerParams, context.params)  # the server validates strategy.params with ALGORITHM.Params
    return build_partial_strategy(context, FedPer, personal_tensor_names(context.model, params))


def check_compatible(scenario: Scenario) -> None:
    """The selected personalization layers exist in the task's model and leave something to share."""
    personal_tensor_names(template_model(scenario), FedPerParams.model_validate(scenario.strategy.params))


ALGORITHM = Algorithm(
    name="fedper", Params=FedPerParams, build_strategy=build_strategy, client_rule=FedPerClient,
    check_compatible=check_compatible, label="FedPer", central_evaluation=False,
)
