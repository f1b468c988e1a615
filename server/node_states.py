"""Each node's persistent state, seen from the server: copies for checkpoints, and lost sites brought back.

Everything a node must remember across rounds (SCAFFOLD's c_k, FedBN's local BatchNorm tensors, a DP-SGD
accountant's history, NbAFL's exposure count) lives in its ``context.state`` (:mod:`client.state`). When
``output.checkpoint_node_state`` is on, the server keeps a copy of every site's latest state: after each
training phase it asks the sites that answered for their state (``query.export_state``), so the copy
always matches what the server has used, whatever ``output.checkpoint_every`` is. Checkpoints hold these
copies, and ``--resume`` gives them back.

A site whose node was lost (it did not answer, or the SuperLink reported it unavailable) is asked for its
state again when it is back online. Only a node whose state is *older* than the server's copy — it
restarted and lost its state, counted by its participations (:data:`client.app.PARTICIPATION_KEY`) — gets
the copy back. A node that only missed a phase keeps its own state: rolling back an accountant's history
would under-report the ε of updates it has already released.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from client.app import PARTICIPATION_KEY
from client.state import EXPORT_ACTION, IMPORT_ACTION, from_plain, to_plain
from server.exchange import Exchange, exchange, first_line, is_lost
from server.pipeline import FederationError, Round, RoundPlugin
from strategies.base import Cohort

log = logging.getLogger("medfed")

NODE_STATES_KEY = "node_states"  # checkpoint extra: partition id → plain state


def export_node_states(grid: Grid, cohort: Cohort, partition_ids: list[int], timeout: float,
                       stop: threading.Event | None = None) -> dict[str, Any]:
    """The persistent state of the nodes holding ``partition_ids``, as plain data keyed by partition id.

    A node that cannot export (lost, or failing) is logged and left out.
    """
    nodes = cohort.partition_to_node
    messages = [
        Message(RecordDict(), dst_node_id=nodes[pid], message_type=f"{MessageType.QUERY}.{EXPORT_ACTION}")
        for pid in sorted(partition_ids)
    ]
    states: dict[str, Any] = {}
    for reply in exchange(grid, messages, timeout, stop=stop).replies:
        pid = cohort.partition_of(reply)
        if reply.has_error():
            log.warning("client %d could not export its state (%s)", pid, reply.error.reason)
            continue
        states[str(pid)] = to_plain(reply.content)
    return dict(sorted(states.items(), key=lambda item: int(item[0])))


def import_node_states(grid: Grid, cohort: Cohort, states: dict[str, Any], timeout: float,
                       stop: threading.Event | None = None) -> None:
    """Give the nodes of ``states``'s partition ids those states back.

    Raises
    ------
    FederationError
        If a node cannot restore its state (one line).
    """
    nodes = cohort.partition_to_node
    messages = [
        Message(from_plain(plain), dst_node_id=nodes[int(pid)], message_type=f"{MessageType.QUERY}.{IMPORT_ACTION}")
        for pid, plain in states.items()
    ]
    replies = exchange(grid, messages, timeout, stop=stop).replies
    failed = [reply.error.reason for reply in replies if reply.has_error()]
    if failed:
        raise FederationError(f"a client could not restore its state from the checkpoint: {failed[0]}")


def participations(state: dict[str, Any] | None) -> int:
    """How many rounds a node had trained in when its plain ``state`` was taken (0: never, or empty)."""
    if not state:
        return 0
    return int(state.get("configs", {}).get(PARTICIPATION_KEY, {}).get("rounds", 0))


class NodeStates(RoundPlugin):
    """Lost sites and the server's copy of every site's latest state (a round plug-in).

    Parameters
    ----------
    cohort : Cohort
        Node id ↔ partition id.
    keep_copies : bool
        ``output.checkpoint_node_state``: keep copies (and put them in checkpoints).
    timeout : float
        Seconds to wait for a node's state (``strategy.round_timeout``).
    stop : threading.Event, optional
        Set when the run must stop.
    """

    def __init__(self, cohort: Cohort, *, keep_copies: bool, timeout: float,
                 stop: threading.Event | None = None) -> None:
        self.cohort, self.keep_copies, self.timeout, self.stop = cohort, keep_copies, timeout, stop
        # partition id → the latest state the site exported; a site that has not trained yet has none (every node
        # starts a run with an empty state), so checkpoints grow with the sites that trained, not the federation
        self.copies: dict[str, Any] = {}
        self.lost: dict[int, int] = {}  # partition id → round its node was lost in (until it answers again)

    def configure(self, round_: Round) -> None:
        """Before the round's messages go out: bring back the lost sites that are online again."""
        if self.lost:
            self._welcome_back(round_.grid, round_.number)

    def inspect(self, round_: Round, phase: str, done: Exchange, sent: list[Message]) -> None:
        """Note lost sites; after training, copy the state of every site that answered."""
        answered = []
        for reply in done.replies:
            pid = self.cohort.partition_of(reply)
            if not is_lost(reply):
                answered.append(pid)
            elif pid not in self.lost:
                self.lost[pid] = round_.number
                log.warning("round %d %s: site %d lost (%s); the run goes on without it until it answers again",
                            round_.number, phase, pid, first_line(reply.error.reason))
        if phase == "train" and self.keep_copies and answered:
            self.copies.update(export_node_states(round_.grid, self.cohort, answered, self.timeout, self.stop))

    def _welcome_back(self, grid: Grid, server_round: int) -> None:
        """Each lost site that is online again keeps its state, unless its node restarted with an older one."""
        online = set(grid.get_node_ids())
        nodes = self.cohort.partition_to_node
        for pid in sorted(pid for pid in self.lost if nodes[pid] in online):
            lost_in = self.lost[pid]
            if not self.keep_copies:  # its state may not leave the site: it goes on with whatever it has
                del self.lost[pid]
                log.info("round %d: site %d (lost in round %d) is online; no copy of its state to compare",
                         server_round, pid, lost_in)
                continue
            current = export_node_states(grid, self.cohort, [pid], self.timeout, self.stop).get(str(pid))
            if current is None:
                log.warning("round %d: site %d is still unreachable", server_round, pid)
                continue
            del self.lost[pid]
            saved = self.copies.get(str(pid))
            if saved is None or participations(current) >= participations(saved):
                self.copies[str(pid)] = current
                log.info("round %d: site %d (lost in round %d) is back with its own state", server_round, pid, lost_in)
                continue
            try:
                import_node_states(grid, self.cohort, {str(pid): saved}, self.timeout, self.stop)
            except FederationError as error:
                self.lost[pid] = lost_in
                log.warning("round %d: site %d is still unreachable (%s)", server_round, pid, error)
                continue
            log.info("round %d: site %d (lost in round %d) is back; its state restored from the server's copy "
                     "(after its participation %d)", server_round, pid, lost_in, participations(saved))

    def restore(self, grid: Grid, extra: dict[str, Any]) -> bool:
        """``--resume``: give every node its checkpointed state back; whether the checkpoint held any."""
        states = extra.get(NODE_STATES_KEY)
        self.copies.update(states or {})
        if states:
            import_node_states(grid, self.cohort, states, self.timeout, self.stop)
        return bool(states)

    def checkpoint(self) -> dict[str, Any]:
        if not self.keep_copies:
            return {}
        return {NODE_STATES_KEY: dict(sorted(self.copies.items(), key=lambda item: int(item[0])))}
