"""Byzantine-robust aggregation rules, for the attack experiments: Flower's maths, medfed's bookkeeping.

* ``fedmedian``: coordinate-wise median (Yin et al., ICML 2018, arXiv:1803.01498).
* ``fedtrimmedavg``: coordinate-wise β-trimmed mean (same paper).
* ``krum`` / ``multikrum``: the update(s) closest to their n − f − 2 nearest
  neighbours (Blanchard et al., NeurIPS 2017, arXiv:1703.02757).
* ``bulyan``: Multi-Krum selection of θ = n − 2f updates, then per coordinate the
  mean of the β = θ − 2f values closest to their median (El Mhamdi et al., ICML
  2018, arXiv:1802.07927).

The maths is Flower's (``flwr.serverapp.strategy.FedMedian``, ``FedTrimmedAvg``,
``Krum``, ``MultiKrum``, ``Bulyan``): :class:`RobustFedAvg` is medfed's
:class:`~strategies.fedavg.FedAvg` (seeded cohorts over partition ids, failed and
non-finite replies dropped, partition-id order) whose model aggregation is
delegated to the Flower strategy's ``aggregate_train``. The replies it receives are
float64 copies (every rule then computes in float64) and the result takes each
tensor's original dtype again (integers rounded). Training metrics remain the
example-weighted mean over every usable reply (monitoring values, not the model).

Each rule's ``strategy.params`` extend FedAvg's (``proximal_mu``, ``bn_stats``: the
clients train exactly as for FedAvg) with the rule's own settings, and the scenario
is checked up front: the clients sampled per round must be enough for the rule's
guarantee (Krum: n > 2f + 2; Bulyan: n ≥ 4f + 3; trimmed mean: ⌊βn⌋ ≥ 1).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from pydantic import Field

from strategies.base import (
    ARRAYS_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    Algorithm,
    Cohort,
    StrategyContext,
    aggregate_metrics,
    usable_replies,
)
from strategies.fedavg import FedAvg, FedAvgClient, FedAvgParams, sampling_options

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario

log = logging.getLogger("medfed")


# --- the rules' parameters ------------------------------------------------------------------------
class RobustParams(FedAvgParams):
    """``strategy.params`` of a robust rule: FedAvg's client settings plus the rule's own."""

    def flower_rule(self, n: int) -> flower.FedAvg:
        """The Flower strategy whose ``aggregate_train`` aggregates ``n`` updates."""
        raise NotImplementedError

    def shortfall(self, n: int) -> str | None:
        """Why ``n`` updates per round are too few for the rule (``'strategy.params.KEY: ...'``), or None."""
        return None

    def describe(self) -> str:
        """The rule and its settings, for the run's log."""
        return type(self).__name__.removesuffix("Params")


class FedMedianParams(RobustParams):
    """``fedmedian``: w_{t+1}[j] = median_k w_k[j] for every coordinate j."""

    def flower_rule(self, n: int) -> flower.FedAvg:
        return flower.FedMedian()


class FedTrimmedAvgParams(RobustParams):
    """``fedtrimmedavg``: per coordinate, drop the ⌊βn⌋ smallest and largest values and average the rest."""

    beta: float = Field(0.2, gt=0.0, lt=0.5, description="fraction trimmed at each end")

    def flower_rule(self, n: int) -> flower.FedAvg:
        return flower.FedTrimmedAvg(beta=self.beta)

    def shortfall(self, n: int) -> str | None:
        if int(self.beta * n) < 1:
            return (f"strategy.params.beta: {self.beta} trims floor({self.beta}·{n}) = 0 of {n} updates per round "
                    f"at each end, which is the plain mean; raise beta to at least {1 / n:.3g} or sample more clients")
        return None

    def describe(self) -> str:
        return f"FedTrimmedAvg (beta {self.beta})"


class KrumParams(RobustParams):
    """``krum``: the update with the smallest sum of squared distances to its n − f − 2 nearest others."""

    num_malicious_nodes: int = Field(0, ge=0, description="f, the Byzantine updates to tolerate")

    def flower_rule(self, n: int) -> flower.FedAvg:
        return flower.Krum(num_malicious_nodes=self.num_malicious_nodes)

    def shortfall(self, n: int) -> str | None:
        f = self.num_malicious_nodes
        if n <= 2 * f + 2:
            return (f"strategy.params.num_malicious_nodes: {self.describe()} needs n > 2f + 2 = {2 * f + 2} "
                    f"updates per round, but a round has {n}")
        return None

    def describe(self) -> str:
        return f"Krum (f = {self.num_malicious_nodes})"


class MultiKrumParams(KrumParams):
    """``multikrum``: the example-weighted mean of the m updates with the smallest Krum scores."""

    num_nodes_to_select: int | None = Field(None, ge=1, description="m (default: n − f)")

    def selected(self, n: int) -> int:
        """m for a round of ``n`` updates."""
        return self.num_nodes_to_select or n - self.num_malicious_nodes

    def flower_rule(self, n: int) -> flower.FedAvg:
        return flower.MultiKrum(num_malicious_nodes=self.num_malicious_nodes, num_nodes_to_select=self.selected(n))

    def shortfall(self, n: int) -> str | None:
        problem = super().shortfall(n)
        if problem is None and self.selected(n) > n - self.num_malicious_nodes:
            return (f"strategy.params.num_nodes_to_select: {self.selected(n)} exceeds n − f = "
                    f"{n - self.num_malicious_nodes}, so a Byzantine update would always be averaged in")
        return problem

    def describe(self) -> str:
        m = self.num_nodes_to_select if self.num_nodes_to_select is not None else "n − f"
        return f"MultiKrum (f = {self.num_malicious_nodes}, m = {m})"


class BulyanParams(RobustParams):
    """``bulyan``: Multi-Krum keeps θ = n − 2f updates; per coordinate, the mean of the β = θ − 2f values
    closest to their median."""

    num_malicious_nodes: int = Field(0, ge=0, description="f, the Byzantine updates to tolerate")

    def flower_rule(self, n: int) -> flower.FedAvg:
        return flower.Bulyan(num_malicious_nodes=self.num_malicious_nodes)

    def shortfall(self, n: int) -> str | None:
        f = self.num_malicious_nodes
        if n < 4 * f + 3:
            return (f"strategy.params.num_malicious_nodes: {self.describe()} needs n ≥ 4f + 3 = {4 * f + 3} "
                    f"updates per round, but a round has {n}")
        return None

    def describe(self) -> str:
        return f"Bulyan (f = {self.num_malicious_nodes})"


# --- server side ----------------------------------------------------------------------------------
class RobustFedAvg(FedAvg):
    r"""medfed's FedAvg whose model aggregation is a Byzantine-robust rule of Flower's.

    .. math:: w_{t+1} = \mathrm{Rule}(w_k : k \in S_t)

    Parameters
    ----------
    cohort : Cohort
        Node id ↔ partition id map and sampling seed.
    rule : RobustParams
        The rule and its validated settings (``strategy.params``).
    **fedavg_options
        Sampling settings of :class:`~strategies.fedavg.FedAvg`.
    """

    def __init__(self, cohort: Cohort, rule: RobustParams, **fedavg_options) -> None:
        super().__init__(cohort, proximal_mu=rule.proximal_mu, bn_stats=rule.bn_stats, **fedavg_options)
        self.rule = rule

    def summary(self) -> None:
        """Log the rule, then FedAvg's sampling settings."""
        log.info("Robust aggregation: %s", self.rule.describe())
        super().summary()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """w_{t+1} = Rule(usable updates); no update (the round fails) when too few arrived for the rule."""
        usable = usable_replies(replies, self.cohort, "train")
        if not usable:
            return None, None
        problem = self.rule.shortfall(len(usable))
        if problem is not None:
            log.warning("round %d: only %d usable updates: %s", server_round, len(usable), problem)
            return None, None
        arrays, _ = self.rule.flower_rule(len(usable)).aggregate_train(server_round, _float64_copies(usable))
        return _with_dtypes_of(arrays, usable[0].content[ARRAYS_KEY]), aggregate_metrics(usable)


def _float64_copies(replies: list[Message]) -> list[Message]:
    """Copies for Flower's rule (which consumes its input): arrays in float64, the weight as the only metric."""
    copies = []
    for reply in replies:
        arrays = ArrayRecord(
            {key: Array(array.numpy().astype(np.float64)) for key, array in reply.content[ARRAYS_KEY].items()}
        )
        weight = MetricRecord({NUM_EXAMPLES_KEY: reply.content[METRICS_KEY][NUM_EXAMPLES_KEY]})
        copies.append(Message(content=RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: weight}), metadata=reply.metadata))
    return copies


def _with_dtypes_of(arrays: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """``arrays`` in the key order and dtypes of ``reference`` (integer tensors rounded to nearest)."""
    tensors = {}
    for key, like in reference.items():
        dtype = np.dtype(like.dtype)
        value = arrays[key].numpy()
        value = np.rint(value) if np.issubdtype(dtype, np.integer) else value
        tensors[key] = torch.from_numpy(np.ascontiguousarray(value.astype(dtype)))
    return ArrayRecord(tensors)


# --- registry entries -----------------------------------------------------------------------------
def clients_per_round(scenario: "Scenario") -> int:
    """How many sites every training round samples (the cohort rule of :class:`~strategies.base.Cohort`)."""
    section = scenario.strategy
    return Cohort.sample_size(scenario.partition.clients, section.fraction_train, section.min_clients)


def _algorithm(name: str, params: type[RobustParams]) -> Algorithm:
    def build_strategy(context: StrategyContext) -> RobustFedAvg:
        return RobustFedAvg(context.cohort, context.params, **sampling_options(context))  # type: ignore[arg-type]

    def check_compatible(scenario: "Scenario") -> None:
        problem = params.model_validate(scenario.strategy.params).shortfall(clients_per_round(scenario))
        if problem is not None:
            section = scenario.strategy
            raise ValueError(f"{problem} (partition.clients {scenario.partition.clients}, strategy.fraction_train "
                             f"{section.fraction_train}, strategy.min_clients {section.min_clients})")

    return Algorithm(name=name, Params=params, build_strategy=build_strategy, client_rule=FedAvgClient,
                     check_compatible=check_compatible)


FEDMEDIAN = _algorithm("fedmedian", FedMedianParams)
FEDTRIMMEDAVG = _algorithm("fedtrimmedavg", FedTrimmedAvgParams)
KRUM = _algorithm("krum", KrumParams)
MULTIKRUM = _algorithm("multikrum", MultiKrumParams)
BULYAN = _algorithm("bulyan", BulyanParams)
