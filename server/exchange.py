"""One phase's messages out and replies in: every message gets exactly one reply, attributed to its node.

:func:`exchange` is the only place the round loop talks to a Flower ``Grid``. It pushes a phase's
messages, pulls replies as they arrive, and makes sure each message ends with one reply from the node it
was sent to: the SuperLink's own "Node Unavailable" reply is re-addressed to the lost node, and a node
silent until the timeout gets an error reply with :data:`NO_REPLY_CODE`. :func:`is_lost` tells these
two apart from a failure of the ClientApp itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

log = logging.getLogger("medfed")

POLL_INTERVAL = 0.05  # seconds between two pulls that brought nothing
NO_REPLY_CODE = 900  # error code of the reply :func:`exchange` records for a node that did not answer in time
LOST_CODES = frozenset({ErrorCode.NODE_UNAVAILABLE, NO_REPLY_CODE})
"""Error codes that mean the node itself was lost (not a failure of its ClientApp)."""


class RunInterrupted(KeyboardInterrupt):
    """The run was asked to stop (Ctrl-C reaching another thread); the last checkpoint stays resumable."""


def check_stop(stop: threading.Event | None) -> None:
    """Raise :class:`RunInterrupted` if ``stop`` is set."""
    if stop is not None and stop.is_set():
        raise RunInterrupted("run stopped on request")


@dataclass
class Exchange:
    """The replies of one phase and what travelled."""

    replies: list[Message] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0


def record_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: serialised arrays plus config/metric values."""
    total = 0
    for name in content.array_records:
        arrays = content.array_records[name]
        total += sum(len(arrays[key].data) for key in arrays)
    for name in content.config_records:
        total += _values_nbytes(content.config_records[name])
    for name in content.metric_records:
        total += _values_nbytes(content.metric_records[name])
    return total


def _values_nbytes(record: ConfigRecord | MetricRecord) -> int:
    """Bytes of a config or metric record: each key, and each value's text (8 for a number)."""
    return sum(len(key) + (len(value.encode()) if isinstance(value, str) else 8) for key, value in record.items())


def exchange(grid: Grid, messages: Iterable[Message], timeout: float,
             on_reply: Callable[[Message], None] | None = None, stop: threading.Event | None = None) -> Exchange:
    """Push ``messages``, pull replies as they arrive (calling ``on_reply``) until all are in or ``timeout``.

    Every message gets exactly one reply, attributed to the node it was sent to:

    * an error reply the SuperLink made for a node that stopped heartbeating (``Node Unavailable``, sent
      from the SuperLink's own node id) is re-addressed as coming from that node;
    * a node that has not answered when ``timeout`` passes, or whose message could not be pushed, gets an
      error reply with :data:`NO_REPLY_CODE`.

    Raises
    ------
    RunInterrupted
        As soon as ``stop`` is set.
    """
    started = time.perf_counter()
    messages = list(messages)
    result = Exchange(bytes_down=sum(record_nbytes(m.content) for m in messages))
    pushed = set(grid.push_messages(messages))  # Flower's grids (and ours) also set each message's id in place
    sent = {message.metadata.message_id: message for message in messages}
    pending = dict.fromkeys(mid for mid in sent if mid in pushed)  # ordered: in-process runs go in partition order
    deadline = time.monotonic() + timeout

    def receive(reply: Message) -> None:
        result.replies.append(reply)
        if reply.has_content():
            result.bytes_up += record_nbytes(reply.content)
        if on_reply is not None:
            on_reply(reply)

    for message_id, message in sent.items():
        if message_id not in pushed:
            receive(Message(Error(code=NO_REPLY_CODE, reason="the message could not be pushed to the node"),
                            reply_to=message))
    while pending and time.monotonic() < deadline:
        check_stop(stop)
        replies = list(grid.pull_messages(list(pending)))
        for reply in replies:
            message_id = reply.metadata.reply_to_message_id
            if message_id not in pending:
                continue
            del pending[message_id]
            receive(_from_destination(reply, sent[message_id]))
        if pending and not replies:
            time.sleep(POLL_INTERVAL)
    for message_id in pending:
        receive(Message(Error(code=NO_REPLY_CODE, reason=f"no reply within {timeout:.0f} s"),
                        reply_to=sent[message_id]))
    if pending:
        log.warning("%d client(s) did not reply within %.0f s", len(pending), timeout)
    result.seconds = time.perf_counter() - started
    return result


def _from_destination(reply: Message, message: Message) -> Message:
    """``reply`` as coming from ``message``'s destination: the SuperLink answers for a node it lost."""
    if reply.metadata.src_node_id == message.metadata.dst_node_id:
        return reply
    error = reply.error if reply.has_error() else Error(code=ErrorCode.UNKNOWN, reason="reply from another node")
    log.warning("node %d: %s", message.metadata.dst_node_id, first_line(error.reason))
    return Message(error, reply_to=message)


def first_line(reason: str | None) -> str:
    """The first line of an error reply's reason (Flower allows none)."""
    lines = (reason or "").strip().splitlines()
    return lines[0] if lines else "no reason given"


def is_lost(reply: Message) -> bool:
    """Whether ``reply`` says its node was lost (unavailable, or silent until the timeout)."""
    return reply.has_error() and reply.error.code in LOST_CODES
