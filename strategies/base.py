"""What every algorithm module shares: the registry entry, the client-side hooks,
deterministic cohorts and reply bookkeeping.

Record keys exchanged between the two halves (Flower's conventions):
``"arrays"`` (ArrayRecord, model tensors), ``"config"`` (ConfigRecord),
``"metrics"`` (MetricRecord with the weight ``"num-examples"``, which a privacy
mechanism may override with ``"aggregation-weight"``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    Protocol,
    runtime_checkable,
)

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from pydantic import BaseModel, ConfigDict

from medtasks.seeding import numpy_rng

if TYPE_CHECKING:  # pragma: no cover
    from flwr.serverapp.strategy import Strategy
    from torch.utils.data import Dataset

    from medtasks.base import Task
    from medtasks.scenario import LocalSection, Scenario

log = logging.getLogger("medfed")

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
NUM_EXAMPLES_KEY = "num-examples"
AGGREGATION_WEIGHT_KEY = "aggregation-weight"  # optional train metric: a site's weight in the average, if not n_k
SCENARIO_KEY = "scenario"
ROUND_KEY = "server-round"


UploadKind = Literal["weights", "update", "gradient", "variate-update", "statistics"]
"""What a record of a train reply holds: the site's trained weights w_k, its update Δw_k = w_k − w_t, a
gradient g_k, a control-variate update Δc_k (SCAFFOLD), or buffers computed from data (BatchNorm running
statistics sent beside something else)."""

Combine = Literal["average", "per-site", "none", "pooled"]
"""How the server half uses the sites' uploads: a (weighted) average into one model, each site's upload on its
own (pFedHN's hypernetwork steps), not at all (each site alone), or one node trains on the pooled data."""


@dataclass(frozen=True)
class Upload:
    """One record of a train reply, as the algorithm that sends it declares it.

    The server checks every train reply against these declarations before the strategy sees it (names,
    shapes and dtypes against the tensors of the same names in the train message's ``reference`` record),
    and the privacy mechanisms decide from them what they can protect (:mod:`privacy.compatibility`).

    Attributes
    ----------
    kind : UploadKind
        What the record holds.
    names : frozenset of str
        The tensor names the record holds, for the task's model.
    reference : str
        The record of the train message whose tensors of the same names give shape and dtype.
    from_data : bool
        Computed from the raw local data directly rather than from the trained weights (SCAFFOLD's option I
        Δc_k = ∇F_k(w_t) − c_k): sample-level DP of the training steps does not cover it.
    """

    kind: UploadKind
    names: frozenset[str]
    reference: str = ARRAYS_KEY
    from_data: bool = False


class StrategyParams(BaseModel):
    """Base class of an algorithm's ``strategy.params`` schema (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


# --- client side ----------------------------------------------------------------------------
class ClientRule:
    """The hooks the local trainer calls; the base class is plain local training.

    An algorithm overrides the hooks it needs (FedProx adds a loss term, SCAFFOLD
    corrects gradients, FedBN keeps BatchNorm tensors in the node's state).

    Parameters
    ----------
    params : StrategyParams
        The algorithm's validated ``strategy.params``.
    """

    def __init__(self, params: StrategyParams) -> None:
        self.params = params

    def training_data(self, task: Task, partition_id: int, sites: int) -> Dataset:
        """The examples this site trains on (default: its own training split).

        Parameters
        ----------
        task : Task
            The scenario's task.
        partition_id : int
            This site's partition id.
        sites : int
            Number of sites in the federation (``partition.clients``).
        """
        return task.client_data(partition_id).train

    def local_section(self, local: LocalSection, train_size: int) -> LocalSection:
        """The local-training settings to use (default: the scenario's ``local`` section).

        An algorithm that prescribes its own local schedule (FedSGD: one full-batch
        gradient step) returns a modified copy (``local.model_copy(update=...)``).
        """
        return local

    def before_training(self, model: torch.nn.Module, task: Task, dataset: Dataset,
                        local: LocalSection) -> None:
        """Called once after :meth:`receive` and before the first local step (e.g. SCAFFOLD
        option I computes its full local gradient at w_t here)."""

    def receive(self, model: torch.nn.Module, content: RecordDict, state: RecordDict) -> None:
        """Load what the server sent into ``model`` (before training or evaluation)."""
        received = content.array_records[ARRAYS_KEY].to_torch_state_dict()
        load_into(model, received)

    def loss(self, model: torch.nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """The loss to minimise given the task loss (e.g. + a proximal term)."""
        return loss

    def after_backward(self, model: torch.nn.Module) -> None:
        """Called after ``loss.backward()`` and before the optimiser step."""

    def reply(self, model: torch.nn.Module, state: RecordDict, *, steps: int) -> dict[str, Any]:
        """Records to send back after training, keyed by record name (default: all tensors)."""
        return {ARRAYS_KEY: ArrayRecord(model.state_dict())}

    def uploads(self, model: torch.nn.Module) -> dict[str, Upload]:
        """What :meth:`reply` sends for ``model``'s layout, record by record (default: every tensor's weights).

        A rule that overrides :meth:`reply` overrides this too; the server drops a train reply that does not
        match it, and the privacy mechanisms read it to decide what they can protect.
        """
        return {ARRAYS_KEY: Upload("weights", frozenset(model.state_dict()))}


def load_into(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into ``model``'s parameters and buffers of the same names.

    Raises
    ------
    KeyError
        If a tensor name is not in the model (a message from another model).
    """
    own = model.state_dict()
    unknown = [name for name in tensors if name not in own]
    if unknown:
        raise KeyError(f"received tensors the model does not have: {unknown[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            own[name].copy_(value)


# --- server side ----------------------------------------------------------------------------
@runtime_checkable
class Personalized(Protocol):
    """A strategy whose clients end with models of their own (local-only, pFedHN, ...).

    The round loop evaluates each of these models on the server's held-out set,
    records them per client in the ``central`` phase and reports their mean.
    """

    def personal_arrays(self) -> Mapping[int, ArrayRecord]:
        """Partition id → that site's current full model (every tensor of the state dict)."""
        ...


@runtime_checkable
class Stateful(Protocol):
    """A server half with state of its own beyond the global arrays (SCAFFOLD's c, pFedHN's hypernetwork,
    each site's model of the local baseline): checkpoints save it and ``--resume`` loads it back."""

    def state_dict(self) -> dict[str, Any]:
        """The state as plain data (tensors, numbers, strings)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        ...


@dataclass(frozen=True)
class Cohort:
    """The federation's nodes, known by partition id (node ids are random per run).

    Sampling is over sorted partition ids with a stream derived from
    (seed, "sample", phase, round), so the same scenario picks the same sites on
    every engine (:mod:`medtasks.seeding`).
    """

    node_to_partition: Mapping[int, int]
    seed: int

    @property
    def partition_to_node(self) -> dict[int, int]:
        return {pid: nid for nid, pid in self.node_to_partition.items()}

    @staticmethod
    def sample_size(sites: int, fraction: float, min_nodes: int) -> int:
        """How many of ``sites`` a round samples: ``min(N, max(min_nodes, floor(fraction·N)))``."""
        return min(sites, max(min_nodes, int(fraction * sites)))

    def sample(self, server_round: int, fraction: float, min_nodes: int, phase: str) -> list[int]:
        """Node ids of :meth:`sample_size` sites, in partition-id order."""
        partitions = sorted(self.node_to_partition.values())
        size = self.sample_size(len(partitions), fraction, min_nodes)
        if size >= len(partitions):
            chosen = partitions
        else:
            rng = numpy_rng(self.seed, "sample", phase, server_round)
            chosen = sorted(rng.choice(partitions, size=size, replace=False).tolist())
        nodes = self.partition_to_node
        return [nodes[pid] for pid in chosen]

    def partition_of(self, message: Message) -> int:
        return self.node_to_partition[message.metadata.src_node_id]


def usable_replies(replies: Iterable[Message], cohort: Cohort, phase: str) -> list[Message]:
    """Replies without errors and with finite arrays and metrics, in partition-id order.

    Faulty replies are logged (with the site's partition id and the reason) and dropped,
    so one broken hospital cannot poison the global model.
    """
    usable = []
    failed: dict[tuple[str, str | None], list[int]] = {}  # (round, reason) -> the sites that gave it
    for reply in replies:
        pid = cohort.partition_of(reply)
        if reply.has_error():
            failed.setdefault((reply.metadata.group_id, reply.error.reason), []).append(pid)
            continue
        bad = non_finite(reply.content)
        if bad:
            log.warning("round %s %s: client %d sent non-finite values in '%s'; update ignored",
                        reply.metadata.group_id, phase, pid, bad)
            continue
        usable.append(reply)
    for (group, reason), pids in failed.items():  # one line per cause, however many sites gave it
        log.warning("round %s %s: %s failed: %s", group, phase, describe_sites(pids), reason)
    return sorted(usable, key=cohort.partition_of)


def describe_sites(pids: Iterable[int]) -> str:
    """``client 3``, or ``3 clients (0-1, 4)`` with runs of consecutive partition ids as ranges."""
    ordered = sorted(set(pids))
    if len(ordered) == 1:
        return f"client {ordered[0]}"
    runs: list[list[int]] = []
    for pid in ordered:
        if runs and pid == runs[-1][-1] + 1:
            runs[-1].append(pid)
        else:
            runs.append([pid])
    spans = ", ".join(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]) for run in runs)
    return f"{len(ordered)} clients ({spans})"


def non_finite(content: RecordDict) -> str | None:
    """Name of the first array holding NaN or ±inf, or ``None``."""
    for name, record in content.array_records.items():
        for key, array in record.items():
            values = torch.from_numpy(array.numpy())
            if values.is_floating_point() and not bool(torch.isfinite(values).all()):
                return f"{name}.{key}"
    return None


WORST_CASE_METRICS = frozenset({"epsilon"})
"""Metrics aggregated as the maximum over clients, not a mean: a privacy guarantee is the weakest site's."""


def metric_value(record: MetricRecord, key: str) -> float:
    """``record[key]``, a scalar metric, as a float.

    Raises
    ------
    KeyError
        If ``record`` has no ``key``.
    TypeError
        If the metric is a list (as ``float()`` of it would).
    """
    value = record[key]
    if isinstance(value, list):
        raise TypeError(f"metric '{key}' is a list, not a number")
    return float(value)


def aggregate_metrics(replies: list[Message]) -> MetricRecord:
    """Σ_k n_k m_k / Σ_k n_k for every metric, weighted by ``num-examples``.

    A metric a client could not compute (NaN, e.g. HD95 on images without any
    foreground) is left out of that metric's average instead of poisoning it. The
    :data:`WORST_CASE_METRICS` (ε) take the maximum over clients instead.
    """
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    worst: dict[str, float] = {}
    for reply in replies:
        record = reply.content.metric_records[METRICS_KEY]
        weight = metric_value(record, NUM_EXAMPLES_KEY)
        for key, value in record.items():
            if key in (NUM_EXAMPLES_KEY, AGGREGATION_WEIGHT_KEY) or isinstance(value, list) or math.isnan(float(value)):
                continue
            if key in WORST_CASE_METRICS:
                worst[key] = max(worst.get(key, -math.inf), float(value))
            elif math.isfinite(float(value)):
                sums[key] = sums.get(key, 0.0) + weight * float(value)
                weights[key] = weights.get(key, 0.0) + weight
    aggregated = MetricRecord({key: sums[key] / weights[key] for key in sums if weights[key] > 0})
    aggregated.update(worst)
    aggregated[NUM_EXAMPLES_KEY] = int(sum(metric_value(r.content.metric_records[METRICS_KEY], NUM_EXAMPLES_KEY)
                                           for r in replies))
    return aggregated


def aggregation_weight(reply: Message) -> float:
    """A train reply's weight in a weighted average: n_k (``num-examples``), unless a privacy mechanism set
    ``aggregation-weight`` (client-level DP weighs every site 1, so one site's influence is bounded)."""
    metrics = reply.content.metric_records[METRICS_KEY]
    return metric_value(metrics, AGGREGATION_WEIGHT_KEY if AGGREGATION_WEIGHT_KEY in metrics else NUM_EXAMPLES_KEY)


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_k (w_k / Σ_j w_j) · state_k for every tensor name, accumulated in float64.

    Integer tensors (e.g. BatchNorm's ``num_batches_tracked``) cannot be averaged;
    they take the maximum over clients. Summation follows the order of ``states``
    (callers pass them in partition-id order for bit-exact reproducibility).
    """
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    averaged: dict[str, torch.Tensor] = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            acc = torch.zeros_like(first, dtype=torch.float64)
            for state, weight in zip(states, weights):
                acc += state[name].to(torch.float64) * (weight / total)
            averaged[name] = acc.to(first.dtype)
        else:
            averaged[name] = torch.stack([state[name] for state in states]).amax(dim=0)
    return averaged


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """State-dict name → parameter, for every parameter with ``requires_grad`` (model order)."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def batchnorm_tensor_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of every BatchNorm tensor: weight, bias, running stats, counter."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            prefix = f"{module_name}." if module_name else ""
            names.update(prefix + key for key in module.state_dict())
    return names


def batchnorm_buffer_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of BatchNorm running statistics (buffers, not trained parameters)."""
    parameters = {name for name, _ in model.named_parameters()}
    return {name for name in batchnorm_tensor_names(model) if name not in parameters}


# --- registry entry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class StrategyContext:
    """What the server half of an algorithm is built from."""

    scenario: Scenario
    params: StrategyParams
    cohort: Cohort
    model: torch.nn.Module  # a freshly built model of the task: names, shapes, BN layout


@dataclass(frozen=True)
class Algorithm:
    """A registered algorithm: its params schema and its two halves.

    Attributes
    ----------
    name : str
        The ``strategy.name`` it is selected by.
    Params : type of StrategyParams
        Pydantic schema of ``strategy.params``.
    build_strategy : callable
        Server half, a Flower ``Strategy`` built from a :class:`StrategyContext`.
    client_rule : callable
        Client half, a :class:`ClientRule` built from the validated params.
    check_compatible : callable
        Raises ``ValueError`` (one line, naming the key) for scenario combinations the algorithm does
        not support.
    combine : Combine
        How the server half uses the uploads the client half declares (:meth:`ClientRule.uploads`).
    label : str
        The algorithm's name as its paper writes it, for messages (default: ``name``).
    central_evaluation : bool
        Whether the server's global model is a complete model the server's own test set can judge
        (FedBN and FedPer keep layers at the sites: judged by federated evaluation only).
    """

    name: str
    Params: type[StrategyParams]
    build_strategy: Callable[[StrategyContext], Strategy]
    client_rule: Callable[[StrategyParams], ClientRule]
    check_compatible: Callable[[Scenario], None] = field(default=lambda scenario: None)
    combine: Combine = "average"
    label: str = ""
    central_evaluation: bool = True

    @property
    def title(self) -> str:
        """:attr:`label`, or :attr:`name` without one."""
        return self.label or self.name
