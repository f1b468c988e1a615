"""What the Flower ``Grid``\\s whose nodes run on this machine share (:class:`~server.engines.InProcessGrid`,
:class:`~server.process_engine.ProcessGrid`): a run, random node ids, messages, the blocking exchange, and a
ClientApp's exception turned into an error reply (:func:`handle`)."""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.run import Run

log = logging.getLogger("medfed")


def handle(client_app: Callable[[Message, Context], Message], message: Message, context: Context) -> Message:
    """``client_app``'s reply to ``message``; an exception escaping it becomes an error reply, as in Flower's
    runtimes (``-v`` logs its traceback)."""
    try:
        return client_app(message, context)
    except Exception as error:
        log.debug("ClientApp raised", exc_info=True)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(error).__name__}: {error}"),
                       reply_to=message)


class LocalGrid(Grid):
    """A ``Grid`` of ``num_nodes`` nodes on this machine; node k (partition id k) has ``node_ids[k]``, and
    :attr:`partitions` maps node id → partition id (discovery reads it rather than asking every node).

    Node ids are random, as Flower's are, so nothing may depend on them. Subclasses deliver the messages
    (``push_messages``, ``pull_messages``, ``get_node_ids``).
    """

    def __init__(self, num_nodes: int, run_id: int = 1) -> None:
        from flwr.supercore.task_identity import (
            TaskIdentity,  # private: Message() needs it outside a runtime
        )

        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 1
        self._run = Run.create_empty(run_id)
        self.node_ids: list[int] = random.Random(uuid.uuid4().int).sample(range(1, 2**53), num_nodes)
        self.partitions: dict[int, int] = {node: pid for pid, node in enumerate(self.node_ids)}  # node → partition

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and pull their replies until all are in or ``timeout`` seconds have passed."""
        pending = list(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            for reply in self.pull_messages(pending):
                pending.remove(reply.metadata.reply_to_message_id)
                replies.append(reply)
        return replies
