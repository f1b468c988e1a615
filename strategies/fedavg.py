"""Federated Averaging (FedAvg) with the optional FedProx proximal term.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017 (arXiv:1602.05629); FedProx: Li et al.,
"Federated Optimization in Heterogeneous Networks", MLSys 2020 (arXiv:1812.06127).

Server (Algorithm 1 of McMahan et al.): sample S_t, send w_t, receive each client's
w_k after E local epochs and set

    w_{t+1} = Σ_{k∈S_t} (n_k / m_t) w_k,   m_t = Σ_{k∈S_t} n_k.

That weighted mean is the default of the scenario's ``defense`` section; a
Byzantine-robust rule and a bound on each site's update norm can replace it
(:class:`strategies.aggregation.Aggregator`, which every averaging strategy of
this package aggregates through).

Client: E epochs of mini-batch steps on F_k(w) (+ μ/2 ‖w − w_t‖² with FedProx).

BatchNorm policy (``bn_stats``), stated because averaging running statistics is a
choice, not a given:

* ``average`` (default): running mean/variance are averaged with the same n_k
  weights as the parameters (what FedAvg on full state dicts does);
  ``num_batches_tracked`` (an integer) takes the maximum over clients.
* ``local``: each client keeps its own running statistics across rounds
  (SiloBN, Andreux et al. 2020, arXiv:2008.07424) and normalises with them when it
  trains and evaluates; they are still sent so the global model's statistics
  (used for central evaluation) are the clients' average. Affine BN parameters are
  averaged in both policies (to keep them local use FedBN).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, TypedDict, cast

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
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from pydantic import Field

from strategies.aggregation import Aggregator
from strategies.base import (
    ARRAYS_KEY,
    CONFIG_KEY,
    Algorithm,
    ClientRule,
    Cohort,
    StrategyContext,
    StrategyParams,
    aggregate_metrics,
    aggregation_weight,
    batchnorm_buffer_names,
    load_into,
    usable_replies,
)

log = logging.getLogger("medfed")

PROXIMAL_MU_KEY = "proximal-mu"
LOCAL_BN_STATE_KEY = "fedavg-local-bn-stats"


class FedAvgParams(StrategyParams):
    """``strategy.params`` of ``fedavg``."""

    proximal_mu: float = Field(0.0, ge=0.0, description="FedProx μ (0 = plain FedAvg)")
    bn_stats: Literal["average", "local"] = Field("average", description="BatchNorm running-statistics policy")


class FedAvg(FlowerFedAvg):
    """Flower's FedAvg made reproducible and robust for medfed.

    Differences to :class:`flwr.serverapp.strategy.FedAvg`: sites are sampled over
    sorted partition ids with a seeded stream; replies are aggregated in
    partition-id order in float64; failed replies and non-finite updates are
    logged and left out; NaN metrics are left out of their average; the
    ``proximal-mu`` of FedProx travels in the train config.

    Parameters
    ----------
    cohort : Cohort
        Node id ↔ partition id map and sampling seed.
    fraction_train, fraction_evaluate : float
        Fractions of sites sampled per round for training / evaluation.
    min_train_nodes, min_evaluate_nodes : int
        Lower bounds on the number of sampled sites.
    proximal_mu : float (default: 0.0)
        FedProx μ; the client adds μ/2 ‖w − w_t‖² (squared norm) to its loss.
    bn_stats : {"average", "local"}
        BatchNorm running-statistics policy (module docstring).
    aggregator : Aggregator, optional
        How the sites' tensors are combined (default: the weighted mean, no norm bound); subclasses
        aggregate through it too (:meth:`aggregate_states`).
    """

    def __init__(
        self,
        cohort: Cohort,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 1,
        min_evaluate_nodes: int = 1,
        proximal_mu: float = 0.0,
        bn_stats: str = "average",
        aggregator: Aggregator | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=len(cohort.node_to_partition),
        )
        self.cohort = cohort
        self.proximal_mu = proximal_mu
        self.bn_stats = bn_stats
        self.aggregator = aggregator or Aggregator()
        self._sent: dict[str, torch.Tensor] = {}

    def summary(self) -> None:
        """Log the configuration (what ran is in the run's log)."""
        self.log_aggregator()
        log.info(
            "FedAvg: fraction train %.2f / evaluate %.2f, min train nodes %d, proximal mu %.4g, BatchNorm statistics '%s'",
            self.fraction_train, self.fraction_evaluate, self.min_train_nodes, self.proximal_mu, self.bn_stats,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send w_t and the train config to the sampled sites (and keep w_t when updates are norm-bounded)."""
        if self.aggregator.norm_bound is not None:
            self._sent = arrays.to_torch_state_dict()
        config[PROXIMAL_MU_KEY] = self.proximal_mu
        nodes = self.cohort.sample(server_round, self.fraction_train, self.min_train_nodes, "train")
        return self._messages(arrays, config, nodes, MessageType.TRAIN, server_round)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send the global model to the sites sampled for evaluation."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.cohort.sample(server_round, self.fraction_evaluate, self.min_evaluate_nodes, "evaluate")
        return self._messages(arrays, config, nodes, MessageType.EVALUATE, server_round)

    def _messages(self, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str,
                  server_round: int) -> list[Message]:
        content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config})
        return [
            Message(content=content, dst_node_id=node, message_type=kind, group_id=str(server_round))
            for node in nodes
        ]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """w_{t+1} = Σ_k (n_k / m_t) w_k over the usable replies (or the scenario's defense rule)."""
        usable = usable_replies(replies, self.cohort, "train")
        if not usable:
            return None, None
        states = [reply.content.array_records[ARRAYS_KEY].to_torch_state_dict() for reply in usable]
        weights = [aggregation_weight(reply) for reply in usable]
        aggregated = self.aggregate_states(server_round, states, weights, self._sent)
        if aggregated is None:
            return None, None
        return ArrayRecord(aggregated), aggregate_metrics(usable)

    def aggregate_states(self, server_round: int, states: Sequence[Mapping[str, torch.Tensor]],
                         weights: Sequence[float],
                         origin: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The sites' tensors combined by :attr:`aggregator`; ``None`` (logged) when too few for its rule.

        Parameters
        ----------
        server_round : int
            For the log.
        states : sequence of mappings of str to torch.Tensor
            The sites' tensors x_k, in partition-id order.
        weights : sequence of float
            Their weights in the mean.
        origin : mapping of str to torch.Tensor
            x_t, the tensors sent this round (used by the norm bound only).

        Returns
        -------
        dict of str to torch.Tensor or None
            The combined tensors.
        """
        problem = self.aggregator.shortfall(len(states))
        if problem is not None:
            log.warning("round %d: only %d usable updates: %s", server_round, len(states), problem)
            return None
        return self.aggregator.aggregate(states, weights, origin)

    def log_aggregator(self) -> None:
        """Log the defense, unless it is the plain weighted mean."""
        if not self.aggregator.is_plain_mean:
            log.info("Aggregation: %s", self.aggregator.describe())

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted mean of the sites' metrics."""
        usable = usable_replies(replies, self.cohort, "evaluate")
        return aggregate_metrics(usable) if usable else None


class FedAvgClient(ClientRule):
    """Client half: local SGD, the FedProx term and the BatchNorm-statistics policy."""

    params: FedAvgParams

    def receive(self, model: torch.nn.Module, content: RecordDict, state: RecordDict) -> None:
        """Load w_t; with ``bn_stats: local`` put this site's own running statistics back."""
        super().receive(model, content, state)
        self._anchor = [p.detach().clone() for p in model.parameters()]
        if self.params.bn_stats == "local" and LOCAL_BN_STATE_KEY in state:
            load_into(model, state.array_records[LOCAL_BN_STATE_KEY].to_torch_state_dict())

    def after_backward(self, model: torch.nn.Module) -> None:
        """∇F_k(w) + μ (w − w_t): the gradient of FedProx's local objective F_k(w) + μ/2 ‖w − w_t‖² (Eq. 2).

        The proximal gradient is added to the parameters' gradients rather than its term to the loss: the same
        step, and under DP-SGD the mechanism applies this hook after the noise, where the term, which does not
        depend on the data, is neither clipped nor noised nor dropped by the per-sample gradient machinery.
        """
        mu = self.params.proximal_mu
        if mu == 0.0:
            return
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), self._anchor):
                if p.grad is not None:
                    p.grad.add_(p - p0, alpha=mu)

    def reply(self, model: torch.nn.Module, state: RecordDict, *, steps: int) -> dict[str, ArrayRecord]:
        """All tensors; with ``bn_stats: local`` also remember the running statistics."""
        if self.params.bn_stats == "local":
            own = model.state_dict()
            state[LOCAL_BN_STATE_KEY] = ArrayRecord({name: own[name] for name in sorted(batchnorm_buffer_names(model))})
        return super().reply(model, state, steps=steps)


class SamplingOptions(TypedDict):
    """The sampling keyword arguments of :class:`FedAvg` (:func:`sampling_options`)."""

    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int


def sampling_options(context: StrategyContext) -> SamplingOptions:
    """The scenario's sampling settings as :class:`FedAvg` keyword arguments (shared by its subclasses).

    Parameters
    ----------
    context : StrategyContext
        What the server half is built from.

    Returns
    -------
    SamplingOptions
        ``fraction_train``, ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes``.
    """
    section = context.scenario.strategy
    return SamplingOptions(
        fraction_train=section.fraction_train,
        fraction_evaluate=section.fraction_evaluate,
        min_train_nodes=section.min_clients,
        min_evaluate_nodes=1,
    )


def build_strategy(context: StrategyContext) -> FedAvg:
    """Server half from a scenario (also of the robust strategy names of :mod:`strategies.robust`)."""
    # the server validates strategy.params with ALGORITHM.Params: FedAvgParams, or a robust alias's subclass of it
    params = cast(FedAvgParams, context.params)
    return FedAvg(context.cohort, proximal_mu=params.proximal_mu, bn_stats=params.bn_stats,
                  aggregator=Aggregator.from_scenario(context.scenario), **sampling_options(context))


ALGORITHM = Algorithm(name="fedavg", Params=FedAvgParams, build_strategy=build_strategy, client_rule=FedAvgClient,
                      label="FedAvg")
