"""Local-only training: every hospital trains its own model and nothing is averaged.

The lower baseline of every federated comparison (each hospital alone, the setting
federated learning improves on; McMahan et al. 2017, arXiv:1602.05629, Section 1): site k
minimises its own empirical risk

    w_k ← argmin_w F_k(w),   F_k(w) = 1/n_k Σ_{i∈P_k} ℓ(w; x_i, y_i),

with the same local schedule (E epochs per round, optimiser, learning rate) a
federated run uses, so curves are comparable round by round. All sites start
from the same initial model.

Where the models live: the server keeps each site's current model (its strategy
state, so checkpoints and ``--resume`` keep them) and sends every sampled site its
own model each round. That travel is bookkeeping of the simulation, not
communication a real local-only deployment needs: ``bytes_up``/``bytes_down`` of
these runs are not comparable to a federated run's. There is no global model:
federated evaluation scores each site's model on its own validation split, and
central evaluation scores each site's model on the server's test set and reports
their mean (:class:`~strategies.base.Personalized`); ``checkpoints/`` keeps the
site models in the strategy state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.base import (
    ARRAYS_KEY,
    CONFIG_KEY,
    Algorithm,
    ClientRule,
    Cohort,
    StrategyContext,
    StrategyParams,
    aggregate_metrics,
    usable_replies,
)

log = logging.getLogger("medfed")


class LocalOnlyParams(StrategyParams):
    """``strategy.params`` of ``local`` (none)."""


class LocalOnly(Strategy):
    """Per-site models, trained in isolation; the server only keeps them.

    Parameters
    ----------
    cohort : Cohort
        Node id ↔ partition id map and sampling seed.
    initial : ArrayRecord
        The common initial model every site starts from.
    fraction_train, fraction_evaluate : float
        Fractions of sites that train / are evaluated each round.
    min_train_nodes : int
        Lower bound on the number of sites training per round.
    """

    def __init__(self, cohort: Cohort, initial: ArrayRecord, *, fraction_train: float = 1.0,
                 fraction_evaluate: float = 1.0, min_train_nodes: int = 1) -> None:
        self.cohort = cohort
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.models: dict[int, ArrayRecord] = {
            pid: ArrayRecord(initial.to_torch_state_dict()) for pid in sorted(cohort.node_to_partition.values())
        }

    def summary(self) -> None:
        log.info("Local only: %d sites train alone (fraction train %.2f / evaluate %.2f); no aggregation",
                 len(self.models), self.fraction_train, self.fraction_evaluate)

    def personal_arrays(self) -> dict[int, ArrayRecord]:
        """Partition id → that site's current model."""
        return dict(self.models)

    def _messages(self, nodes: list[int], config: ConfigRecord, kind: str, server_round: int) -> list[Message]:
        return [
            Message(
                RecordDict({ARRAYS_KEY: self.models[self.cohort.node_to_partition[node]], CONFIG_KEY: config}),
                dst_node_id=node, message_type=kind, group_id=str(server_round),
            )
            for node in nodes
        ]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send every sampled site its own model (``arrays`` is unused: there is no global model)."""
        nodes = self.cohort.sample(server_round, self.fraction_train, self.min_train_nodes, "train")
        return self._messages(nodes, config, MessageType.TRAIN, server_round)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Keep each site's trained model; the returned global record is empty (there is none)."""
        usable = usable_replies(replies, self.cohort, "train")
        if not usable:
            return None, None
        for reply in usable:
            self.models[self.cohort.partition_of(reply)] = reply.content.array_records[ARRAYS_KEY]
        return ArrayRecord(), aggregate_metrics(usable)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Each evaluated site scores its own model on its validation split."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.cohort.sample(server_round, self.fraction_evaluate, 1, "evaluate")
        return self._messages(nodes, config, MessageType.EVALUATE, server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        usable = usable_replies(replies, self.cohort, "evaluate")
        return aggregate_metrics(usable) if usable else None

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        """Every site's model (``"models"``: partition id as a string → tensors by name), for checkpoints."""
        return {"models": {str(pid): record.to_torch_state_dict() for pid, record in self.models.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.models = {int(pid): ArrayRecord(tensors) for pid, tensors in state["models"].items()}


def build_strategy(context: StrategyContext) -> LocalOnly:
    """Server half from a scenario."""
    section = context.scenario.strategy
    return LocalOnly(
        context.cohort,
        ArrayRecord(context.model.state_dict()),
        fraction_train=section.fraction_train,
        fraction_evaluate=section.fraction_evaluate,
        min_train_nodes=section.min_clients,
    )


ALGORITHM = Algorithm(name="local", Params=LocalOnlyParams, build_strategy=build_strategy, client_rule=ClientRule,
                      combine="none")
