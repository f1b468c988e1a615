"""Centralized training: all hospitals' training data pooled in one place.

The upper baseline of every federated comparison (all data collected centrally, the
setting federated learning tries to match without moving data; McMahan et al. 2017,
arXiv:1602.05629, compare against it): one model minimises the pooled empirical risk

    F(w) = Σ_k (n_k / n) F_k(w) = 1/n Σ_{i ∈ ∪_k P_k} ℓ(w; x_i, y_i)

with mini-batch SGD over the union of the sites' training splits. It runs in the
same round loop as a federated run so its results are directly comparable:

* One round = ``local.epochs`` epochs over the pooled data, shuffled as one set.
  A task whose batches must share something that differs by site (the CT
  scanner's geometry) sets ``batches_within_site = True``: its mini-batches then
  each come from one site, in an order shuffled across sites, so an epoch still
  visits every pooled sample once (:class:`medtasks.base.PooledSites`).
  ``local.max_steps``, when set, is multiplied by
  the number of sites, so a round does as many gradient steps as one federated
  round in which every site trains.
* The pooled training runs on the node holding partition 0 (it builds every
  site's data; this baseline exists in simulation only, where data can be pooled).
* Federated evaluation sends the model to the sites, which score it on their own
  validation splits; central evaluation uses the server's test set, as in FedAvg.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType
from flwr.serverapp import Grid
from torch.utils.data import Dataset

from medtasks.base import PooledSites, Task
from medtasks.scenario import LocalSection, Scenario
from strategies.base import Algorithm, ClientRule, StrategyContext, StrategyParams
from strategies.fedavg import FedAvg, sampling_options

log = logging.getLogger("medfed")

POOLING_PARTITION = 0


class CentralizedParams(StrategyParams):
    """``strategy.params`` of ``centralized`` (none)."""


class Centralized(FedAvg):
    """One trainer on the pooled data; evaluation as in FedAvg."""

    def summary(self) -> None:
        log.info("Centralized: %d sites' training data pooled and trained on by one node", len(self.cohort.node_to_partition))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send w_t to the pooling node only."""
        node = self.cohort.partition_to_node[POOLING_PARTITION]
        return self._messages(arrays, config, [node], MessageType.TRAIN, server_round)


class CentralizedClient(ClientRule):
    """Trains on the union of every site's training split."""

    def training_data(self, task: Task, partition_id: int, sites: int) -> Dataset:
        """∪_k P_k in partition-id order (this node builds every site's data)."""
        self._sites = sites
        by_site = bool(getattr(task, "batches_within_site", False))
        return PooledSites([task.client_data(pid).train for pid in range(sites)], by_site=by_site)

    def local_section(self, local: LocalSection, train_size: int) -> LocalSection:
        """``max_steps`` × number of sites: as many steps as a federated round in which every site trains."""
        if local.max_steps is None:
            return local
        return local.model_copy(update={"max_steps": local.max_steps * self._sites})


def build_strategy(context: StrategyContext) -> Centralized:
    """Server half from a scenario."""
    options = sampling_options(context)
    options["fraction_train"], options["min_train_nodes"] = 1.0, 1  # every round: the pooling node alone
    return Centralized(context.cohort, **options)


def check_compatible(scenario: Scenario) -> None:
    """One trainer replies per round, so ``strategy.min_clients`` must be 1."""
    if scenario.strategy.min_clients != 1:
        raise ValueError("strategy.min_clients: the centralized baseline trains on one node per round; set it to 1")


ALGORITHM = Algorithm(name="centralized", Params=CentralizedParams, build_strategy=build_strategy,
                      client_rule=CentralizedClient, check_compatible=check_compatible, combine="pooled")
