"""Discovery: which node holds which partition, and each site's statistics, asking no more than a run needs.

Node ids are random per run, so before round 1 the server learns node id → partition id. Each site also
describes its data (``n_train``, ``n_val``, label histogram, ...: its ``stats``), which ``partitions.json``
records, :class:`~server.replies.ReplyCheck` bounds example counts with, and NbAFL calibrates its noise from.

* Up to :data:`DESCRIBE_ALL_UP_TO` sites (and for NbAFL, whose noise needs the smallest site), every site is
  asked at once: one query message each, answered with its partition id and its statistics.
* Above, a cross-device federation of which a round samples a few: the partition ids come without any site
  building its data (the local grids know them; Flower's grids get a one-field query), and a site is asked
  for its statistics just before its first message (:meth:`SiteStats.describe`). Discovery time and memory
  then follow the sites sampled, not the federation's size.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from client.app import INFO_KEY, PARTITION_ID_KEY, WANT_KEY, WANT_PARTITION_ID
from server.exchange import check_stop, exchange, first_line, is_lost
from server.local_grid import LocalGrid
from server.pipeline import FederationError
from server.scenario import Scenario
from strategies.base import CONFIG_KEY, SCENARIO_KEY, Cohort

DISCOVERY_TIMEOUT = 600.0
"""Seconds discovery waits for the nodes to connect and to answer."""
DESCRIBE_ALL_UP_TO = 1000
"""The most sites that are all asked for their statistics at discovery (above: each when first sampled)."""


class InputError(FederationError):
    """The run cannot start from its input: a site could not prepare its data, or no site holds a partition.

    Neither running it again nor resuming it helps until the data or the sites' settings are fixed.
    """


def describes_every_site(scenario: Scenario) -> bool:
    """Whether discovery asks every site for its statistics (small federations, and NbAFL's calibration)."""
    return scenario.partition.clients <= DESCRIBE_ALL_UP_TO or scenario.privacy.mechanism == "nbafl"


class SiteStats:
    """Each site's statistics as its own query reply gave them, by partition id (:attr:`known`).

    Parameters
    ----------
    scenario : Scenario
        The resolved scenario (its JSON goes in every statistics query).
    timeout : float
        Seconds a query waits for its replies.
    stop : threading.Event, optional
        Set to abandon a query at once (Ctrl-C).
    """

    def __init__(self, scenario: Scenario, timeout: float = DISCOVERY_TIMEOUT,
                 stop: threading.Event | None = None) -> None:
        self.scenario, self.timeout, self.stop = scenario, timeout, stop
        self.scenario_json = scenario.to_json()
        self.known: dict[int, dict[str, Any]] = {}

    def query(self, grid: Grid, nodes: Iterable[int], *, lost_ok: bool = False) -> dict[int, int]:
        """Ask ``nodes`` for their partition id and statistics; returns node id → partition id.

        Parameters
        ----------
        lost_ok : bool
            A node that is lost (unavailable, or silent until the timeout) is left undescribed rather than
            ending the run: its next message fails the same way, and ``strategy.min_clients`` decides.

        Raises
        ------
        InputError
            A site answered that it cannot prepare its data.
        """
        replies = _query(grid, nodes, ConfigRecord({SCENARIO_KEY: self.scenario_json}), self.timeout, self.stop)
        failed = [reply for reply in replies if reply.has_error() and not (lost_ok and is_lost(reply))]
        if failed:
            raise InputError(f"a client could not prepare its data: {first_line(failed[0].error.reason)}")
        partitions: dict[int, int] = {}
        for reply in replies:
            if reply.has_error():
                continue
            info = reply.content.config_records[INFO_KEY]
            pid = int(str(info[PARTITION_ID_KEY]))
            partitions[reply.metadata.src_node_id] = pid
            self.known[pid] = json.loads(str(info["stats"]))  # in place: the round's plug-ins hold this dict
        return partitions

    def describe(self, grid: Grid, cohort: Cohort, nodes: Iterable[int]) -> bool:
        """Ask those of ``nodes`` not yet described for their statistics; returns whether any new site was."""
        unknown = [node for node in nodes if cohort.node_to_partition[node] not in self.known]
        return bool(self.query(grid, unknown, lost_ok=True))


def discover(grid: Grid, scenario: Scenario, timeout: float = DISCOVERY_TIMEOUT,
             stop: threading.Event | None = None) -> tuple[Cohort, SiteStats]:
    """Wait for ``partition.clients`` nodes, learn node id → partition id, and (small federations) every
    site's statistics.

    Raises
    ------
    FederationError
        Fewer nodes than ``partition.clients`` connected within ``timeout``.
    InputError
        A site cannot prepare its data, or a partition has no node.
    """
    expected = scenario.partition.clients
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < expected:
        check_stop(stop)
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(list(grid.get_node_ids()))} of {expected} clients connected within {timeout:.0f} s")
        time.sleep(0.5)
    nodes = sorted(grid.get_node_ids())
    sites = SiteStats(scenario, timeout, stop)
    if describes_every_site(scenario):
        partitions = sites.query(grid, nodes)
    else:
        partitions = partition_ids(grid, nodes, timeout, stop)
    held = set(partitions.values())
    missing = sorted(set(range(expected)) - held)
    if missing:
        raise InputError(f"no client holds partition(s) {_ids(missing)} (got {_ids(sorted(held))})")
    return Cohort(node_to_partition=partitions, seed=scenario.seed), sites


def partition_ids(grid: Grid, nodes: list[int], timeout: float = DISCOVERY_TIMEOUT,
                  stop: threading.Event | None = None) -> dict[int, int]:
    """Node id → partition id of ``nodes``, without any site building its data.

    The grids of this machine's engines know it; a Flower grid's nodes answer a query that asks for the
    partition id only (:data:`client.app.WANT_PARTITION_ID`).

    Raises
    ------
    InputError
        A node could not say its partition id.
    """
    if isinstance(grid, LocalGrid):
        return {node: grid.partitions[node] for node in nodes}
    replies = _query(grid, nodes, ConfigRecord({WANT_KEY: WANT_PARTITION_ID}), timeout, stop)
    failed = [reply for reply in replies if reply.has_error()]
    if failed:
        raise InputError(f"a client could not say its partition id: {first_line(failed[0].error.reason)}")
    return {reply.metadata.src_node_id: int(str(reply.content.config_records[INFO_KEY][PARTITION_ID_KEY]))
            for reply in replies}


def _query(grid: Grid, nodes: Iterable[int], config: ConfigRecord, timeout: float,
           stop: threading.Event | None) -> list[Message]:
    """One query message holding ``config`` to each of ``nodes``; their replies (none for no nodes)."""
    messages = [Message(RecordDict({CONFIG_KEY: config}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in nodes]
    return exchange(grid, messages, timeout, stop=stop).replies if messages else []


def _ids(pids: list[int], shown: int = 10) -> str:
    """``pids`` as a list, the first ``shown`` of a long one and how many more."""
    if len(pids) <= shown:
        return str(pids)
    return f"[{', '.join(map(str, pids[:shown]))}, ... {len(pids) - shown} more]"
