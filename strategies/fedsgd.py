"""Federated SGD (FedSGD), the baseline of FedAvg's paper.

McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data", AISTATS 2017 (arXiv:1602.05629), Sec. 2 ("FederatedSGD").

In round t (Sec. 2 of McMahan et al.) the server samples S_t and sends w_t; every sampled site k computes ONE gradient on
its full local data P_k (or on one seeded mini-batch of ``batch_size``)

    g_k = ∇F_k(w_t) = ∇ (1/n_k) Σ_{i∈P_k} f_i(w_t)

and the server takes one step with its learning rate η (``server_lr``)

    w_{t+1} = w_t − η Σ_{k∈S_t} (n_k / m_t) g_k,   m_t = Σ_{k∈S_t} n_k.

With every site sampled m_t = n, so this is the paper's n_k/n and one step of
full-batch gradient descent on the pooled objective F = Σ_k (n_k/n) F_k. With a
fraction of the sites the gradients are weighted among the sampled ones (as
FedAvg weights its models). FedAvg with one local step (``epochs: 1``,
``max_steps: 1``, full batch, plain SGD with ``lr`` η) computes the same w_{t+1};
both send one model down and one model-sized payload up per site and round.

Defenses (the scenario's ``defense`` section, :mod:`strategies.aggregation`): the
robust rules were defined for gradients (Krum, Blanchard et al. 2017,
arXiv:1703.02757; median and trimmed mean, Yin et al. 2018, arXiv:1803.01498), so
FedSGD takes them. The server applies the rule and the norm bound to the model
each site's reply proposes, w_k = w_t − η g_k (its running statistics beside it):

    w_{t+1} = Rule(w̃_k),   w̃_k = w_t + Δ_k min(1, C/‖Δ_k‖₂),   Δ_k = w_k − w_t = −η g_k (and statistics),

which for the translation- and scale-equivariant rules offered is w_t − η Rule(g_k),
and bounds each site's step η g_k (not g_k) by C, as for every other strategy. The
default (the weighted mean without a bound) averages the gradients themselves, as
above.

What the client does: the trainer's single step at w_t *is* the gradient
computation. :class:`FedSGDClient` forces that schedule (one step, full local
batch or ``batch_size``), captures ∇F_k(w_t) of every trainable parameter right
after ``backward()`` and replies it as the ``"fedsgd-gradient"`` record (sent
exactly, not reconstructed from a weight difference). The local optimiser step
that follows changes nothing that is sent. So ``local.epochs``, ``max_steps``,
``batch_size``, ``optimizer`` and ``lr`` are not used; ``local.momentum`` and
``local.weight_decay`` must be 0 (a scenario setting them is rejected, since
FedSGD would silently ignore them; put regularisation into the task's loss).

BatchNorm policy: the gradient is taken in training mode (normalised with the
statistics of the gradient's batch), and that forward pass runs with BatchNorm
momentum 1, so each site's running statistics become the statistics of its
batch (all its data by default) under w_t. The sites send them (every tensor
that is not a trainable parameter, in the ``"arrays"`` record) and the server
sets the global ones to their n_k-weighted average, as FedAvg's
``bn_stats: average`` does: the mean is the pooled mean, the variance the mean
of the sites' variances (the spread between the sites' means is not added);
``num_batches_tracked`` takes the maximum. Why not PyTorch's running average
(momentum 0.1 per forward pass): FedSGD makes one forward pass per round, so
that average would trail the model by tens of rounds, and evaluation, which
normalises with it, collapses (seg-iid after 20 rounds: Dice 0.003 with the
trailing statistics, 0.49 with statistics recomputed for the same weights).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from pydantic import Field

from strategies.aggregation import Aggregator
from strategies.base import (
    ARRAYS_KEY,
    Algorithm,
    ClientRule,
    Cohort,
    StrategyContext,
    StrategyParams,
    Upload,
    aggregate_metrics,
    aggregation_weight,
    trainable_parameters,
    usable_replies,
    weighted_average,
)
from strategies.fedavg import FedAvg, sampling_options

if TYPE_CHECKING:  # pragma: no cover
    from torch.utils.data import Dataset

    from medtasks.base import Task
    from medtasks.scenario import LocalSection, Scenario

log = logging.getLogger("medfed")

GRADIENT_KEY = "fedsgd-gradient"


class FedSGDParams(StrategyParams):
    """``strategy.params`` of ``fedsgd``."""

    server_lr: float = Field(1.0, gt=0.0, description="η of w_{t+1} = w_t − η Σ_k (n_k/m_t) g_k")
    batch_size: int | None = Field(
        None, ge=1, description="examples per gradient (None = the full local data in one batch)"
    )


# --- server half -------------------------------------------------------------------------------
class FedSGD(FedAvg):
    """FedAvg's sampling and bookkeeping with FedSGD's server step.

    .. math::

        w_{t+1} = w_t - \\eta \\sum_{k \\in S_t} \\frac{n_k}{m_t} g_k

    The client MUST reply g_k = ∇F_k(w_t) of every trainable parameter in the
    ``"fedsgd-gradient"`` record and every other tensor (BatchNorm running
    statistics) in ``"arrays"`` (:class:`FedSGDClient` does).

    Parameters
    ----------
    cohort : Cohort
        Node id ↔ partition id map and sampling seed.
    server_lr : float (default: 1.0)
        η, the server's step size.
    **sampling
        ``fraction_train``, ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes`` and
        ``aggregator`` as for :class:`strategies.fedavg.FedAvg`.
    """

    def __init__(self, cohort: Cohort, *, server_lr: float = 1.0, **sampling: Any) -> None:
        super().__init__(cohort, **sampling)
        self.server_lr = server_lr
        self._current: dict[str, torch.Tensor] = {}

    def summary(self) -> None:
        """Log the configuration (what ran is in the run's log)."""
        self.log_aggregator()
        log.info("FedSGD: server lr %.4g, fraction train %.2f / evaluate %.2f, min train nodes %d",
                 self.server_lr, self.fraction_train, self.fraction_evaluate, self.min_train_nodes)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember w_t (the step starts from it) and send it to the sampled sites."""
        self._current = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """w_{t+1} = w_t − η Σ_k (n_k/m_t) g_k; running statistics: Σ_k (n_k/m_t) of the sites'.

        With a defense: the rule over the norm-bounded proposals w_t − η g_k (module docstring).
        """
        usable = usable_replies(replies, self.cohort, "train")
        if not usable:
            return None, None
        weights = [aggregation_weight(reply) for reply in usable]
        if not self.aggregator.is_plain_mean:
            proposals = [self._proposal(reply) for reply in usable]
            aggregated = self.aggregate_states(server_round, proposals, weights, self._current)
            if aggregated is None:
                return None, None
            updated = {name: aggregated[name].to(current.dtype) for name, current in self._current.items()}
            return ArrayRecord(updated), aggregate_metrics(usable)
        gradient = weighted_average(
            [reply.content.array_records[GRADIENT_KEY].to_torch_state_dict() for reply in usable], weights)
        others = weighted_average(
            [reply.content.array_records[ARRAYS_KEY].to_torch_state_dict() for reply in usable], weights)
        updated = {}
        for name, current in self._current.items():
            if name in gradient:
                updated[name] = (current.double() - self.server_lr * gradient[name].double()).to(current.dtype)
            else:
                updated[name] = others[name]
        return ArrayRecord(updated), aggregate_metrics(usable)

    def _proposal(self, reply: Message) -> dict[str, torch.Tensor]:
        """w_k = w_t − η g_k (float64) for the trained parameters, the site's statistics for the rest."""
        gradient = reply.content.array_records[GRADIENT_KEY].to_torch_state_dict()
        others = reply.content.array_records[ARRAYS_KEY].to_torch_state_dict()
        return {name: current.double() - self.server_lr * gradient[name].double() if name in gradient else others[name]
                for name, current in self._current.items()}


# --- client half -------------------------------------------------------------------------------
class FedSGDClient(ClientRule):
    """Client half: one gradient at w_t on the full local data (or one batch), replied as is."""

    params: FedSGDParams
    _gradient: dict[str, torch.Tensor] | None = None

    def local_section(self, local: LocalSection, train_size: int) -> LocalSection:
        """One plain step on one batch of ``batch_size`` (default: all ``train_size`` examples)."""
        return local.model_copy(update={
            "epochs": 1, "max_steps": 1, "batch_size": self.params.batch_size or max(train_size, 1),
            "optimizer": "sgd", "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0,
        })

    def receive(self, model: torch.nn.Module, content: RecordDict, state: RecordDict) -> None:
        """Load w_t and forget any gradient of an earlier message."""
        super().receive(model, content, state)
        self._gradient = None

    def before_training(self, model: torch.nn.Module, task: Task, dataset: Dataset,
                        local: LocalSection) -> None:
        """BatchNorm momentum 1: the one forward pass sets the running statistics to its batch's."""
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = 1.0

    def after_backward(self, model: torch.nn.Module) -> None:
        """Keep g_k = ∇F_k(w_t), shape of each parameter (zeros for a parameter the loss does not use)."""
        self._gradient = {
            name: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for name, p in trainable_parameters(model).items()
        }

    def reply(self, model: torch.nn.Module, state: RecordDict, *, steps: int) -> dict[str, ArrayRecord]:
        """``"fedsgd-gradient"``: g_k; ``"arrays"``: every other tensor (BatchNorm running statistics)."""
        if self._gradient is None:
            raise ValueError("fedsgd: no gradient was computed (this site has no training examples)")
        others = {name: tensor for name, tensor in model.state_dict().items() if name not in self._gradient}
        return {GRADIENT_KEY: ArrayRecord(self._gradient), ARRAYS_KEY: ArrayRecord(others)}

    def uploads(self, model: torch.nn.Module) -> dict[str, Upload]:
        """g_k over the trainable parameters, and every other tensor (running statistics of the batch)."""
        trainable = frozenset(trainable_parameters(model))
        return {
            GRADIENT_KEY: Upload("gradient", trainable),
            ARRAYS_KEY: Upload("statistics", frozenset(name for name in model.state_dict() if name not in trainable)),
        }


def check_compatible(scenario: Scenario) -> None:
    """FedSGD takes one plain gradient: local momentum and weight decay would be silently lost."""
    for key in ("momentum", "weight_decay"):
        value = getattr(scenario.local, key)
        if value != 0.0:
            raise ValueError(
                f"local.{key}: fedsgd sends one plain gradient per round and would ignore {key} {value:g} "
                f"(set it to 0; regularise in the task loss)"
            )


def build_strategy(context: StrategyContext) -> FedSGD:
    """Server half from a scenario."""
    params = cast(FedSGDParams, context.params)  # the server validates strategy.params with ALGORITHM.Params
    return FedSGD(context.cohort, server_lr=params.server_lr,
                  aggregator=Aggregator.from_scenario(context.scenario), **sampling_options(context))


ALGORITHM = Algorithm(name="fedsgd", Params=FedSGDParams, build_strategy=build_strategy, client_rule=FedSGDClient,
                      check_compatible=check_compatible, label="FedSGD")
