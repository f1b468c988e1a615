"""The ``processes`` engine: the ClientApps of a run in a few persistent worker processes on this machine.

:class:`ProcessGrid` is a Flower ``Grid`` for one machine's cores without Ray. It starts ``engine.workers``
worker processes when it is created (all at once, so start-up costs one interpreter and its imports). Worker
``w`` hosts the nodes whose partition id ``k`` has ``k % workers == w``, with one Flower ``Context`` per node
for the whole run, so a node's ``context.state`` stays in one process, as on the other engines.

A message goes to the worker of its destination node, and replies come back as they are ready; each worker
handles one message at a time, so up to ``workers`` run at once. Messages travel in Flower's wire format
(``flwr.common.serde``, one serialisation each way), so a worker sees what a SuperNode would receive.

Failures end as replies, never as a hang: an exception in the ClientApp is an error reply (as on the
in-process engine), and a worker that dies (killed, crashed, out of memory) makes its nodes unavailable:
the message it was handling and every later one to its nodes get Flower's "node unavailable" error reply,
which the round loop treats as lost sites (:func:`server.exchange.is_lost`). Workers ignore Ctrl-C (the
main process ends them) and exit when the main process goes; :meth:`ProcessGrid.close` ends them all.

Workers are started with ``spawn``: each re-imports the main module, so a script that runs a scenario on
this engine guards its entry point with ``if __name__ == "__main__":`` (``medfed`` and pytest do). They are
daemon processes, which may not start processes of their own (e.g. a DataLoader with ``num_workers > 0``).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from server.local_grid import LocalGrid, handle

if TYPE_CHECKING:  # pragma: no cover - a worker imports this module and needs none of the server
    from multiprocessing.process import BaseProcess

    from server.federation import Federation

log = logging.getLogger("medfed")

CLIENT_APP = "client.app:app"
START_METHOD: Final = "spawn"  # a fresh interpreter: forking a process whose torch has started threads is unsafe
STOP = b""  # tells a worker to end
PULL_WAIT = 0.2  # seconds a pull waits for a reply before it returns none (the round loop polls again)
CLOSE_TIMEOUT = 2.0  # seconds idle workers get to end on their own (after a run) before they are terminated
LOGGERS = ("medfed", "flwr")  # loggers whose levels a worker takes from the main process
ClientAppCallable = Callable[[Message, Context], Message]


def encode(message: Message) -> bytes:
    """``message`` in Flower's wire format."""
    return message_to_proto(message).SerializeToString()


def decode(data: bytes) -> Message:
    """The message :func:`encode` made ``data`` from."""
    return message_from_proto(ProtoMessage.FromString(data))


def load_client_app(path: str) -> ClientApp:
    """The ClientApp at ``module:attribute`` (e.g. ``client.app:app``)."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


# --- the worker side --------------------------------------------------------------------------------
def serve(connection: Connection, app: str, node_configs: dict[int, dict[str, int]], run_id: int,
          log_levels: dict[str, int]) -> None:
    """A worker's life: host the nodes ``node_configs`` (node id → ``node_config``) and answer each
    message on ``connection`` until :data:`STOP` comes or the main process goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's business
    _end_with_parent()
    _configure_logging(log_levels)
    contexts = {node: Context(run_id=run_id, node_id=node, node_config=dict(config), state=RecordDict(), run_config={})
                for node, config in node_configs.items()}
    client_app = _client_app_or_refusal(app)
    while data := _receive(connection):
        message = decode(data)
        connection.send_bytes(_answer(client_app, message, contexts[message.metadata.dst_node_id]))


def _answer(client_app: ClientAppCallable, message: Message, context: Context) -> bytes:
    """The encoded reply to ``message``; a reply that cannot be encoded is an error reply that says so."""
    try:
        return encode(handle(client_app, message, context))
    except Exception as error:
        reason = f"the ClientApp's reply cannot be sent: {type(error).__name__}: {error}"
        return encode(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message))


def _client_app_or_refusal(path: str) -> ClientAppCallable:
    """The ClientApp at ``path``; if it cannot be loaded, a stand-in whose every reply says why (the
    worker stays up, so no message waits for a reply that cannot come)."""
    try:
        return load_client_app(path)
    except Exception as error:
        reason = f"could not load the ClientApp {path}: {type(error).__name__}: {error}"

    def refuse(message: Message, context: Context) -> Message:
        return Message(Error(code=ErrorCode.LOAD_CLIENT_APP_EXCEPTION, reason=reason), reply_to=message)

    return refuse


def _end_with_parent() -> None:
    """End this worker as soon as the main process ends, even in the middle of a message."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="medfed-parent-watch", daemon=True).start()


def _receive(connection: Connection) -> bytes:
    """The next message's bytes; :data:`STOP` once the main process has gone."""
    try:
        return connection.recv_bytes()
    except (EOFError, OSError):
        return STOP


def _configure_logging(levels: dict[str, int]) -> None:
    """A worker logs to the terminal at the main process's levels (``-v`` shows the ClientApp's debug lines)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name, level in levels.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False


# --- the main side ----------------------------------------------------------------------------------
class _Worker:
    """One worker process, the nodes it hosts, and the thread that hands it messages one at a time.

    The thread sends a message, waits for its reply and passes it to ``deliver``. When the process has
    gone, the message in flight and every later one are answered with "node unavailable" at once.
    """

    def __init__(self, index: int, process: BaseProcess, connection: Connection, sites: list[int],
                 deliver: Callable[[Message], None]) -> None:
        self.index, self.process, self.connection, self.sites = index, process, connection, sites
        self.deliver = deliver
        self.inbox: queue.SimpleQueue[tuple[Message, bytes] | None] = queue.SimpleQueue()
        self.busy = False  # a message is in the process's hands
        self.closing = False
        self.lost: str | None = None  # why the process is gone
        self.thread = threading.Thread(target=self._feed, name=f"medfed-worker-{index}", daemon=True)
        self.thread.start()

    def _feed(self) -> None:
        while (item := self.inbox.get()) is not None:
            message, data = item
            self.deliver(self._reply(message, data))
        with contextlib.suppress(OSError):
            self.connection.send_bytes(STOP)

    def _reply(self, message: Message, data: bytes) -> Message:
        if self.lost is None:
            self.busy = True
            try:
                self.connection.send_bytes(data)
                return decode(self.connection.recv_bytes())
            except (EOFError, OSError):
                self._note_lost()
            finally:
                self.busy = False
        return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=f"Node unavailable: {self.lost}"),
                       reply_to=message)

    def _note_lost(self) -> None:
        self.process.join(1.0)  # reap it, to say how it ended
        self.lost = f"worker process {self.index} (pid {self.process.pid}) {_how_it_ended(self.process.exitcode)}"
        if not self.closing:
            log.warning("%s: site(s) %s lost", self.lost, ", ".join(map(str, self.sites)))

    def stop(self) -> None:
        """Ask the process to end once its current message is answered."""
        self.closing = True
        self.inbox.put(None)


def _how_it_ended(exitcode: int | None) -> str:
    """``ended with exit code 1``, ``was killed (SIGKILL)``, or ``stopped answering``."""
    if exitcode is None:
        return "stopped answering"
    if exitcode < 0:
        return f"was killed ({signal.Signals(-exitcode).name})"
    return f"ended with exit code {exitcode}"


class ProcessGrid(LocalGrid):
    """A Flower ``Grid`` whose nodes live in ``workers`` persistent worker processes on this machine.

    Parameters
    ----------
    num_nodes : int
        Number of nodes; node k gets ``node_config`` partition-id k (random node ids, as Flower's).
    workers : int
        Worker processes (at most ``num_nodes``); node k lives in worker ``k % workers``.
    client_app : str
        ``module:attribute`` of the ClientApp every node runs (each worker imports it).
    run_id : int
        The run id of the messages and contexts.

    Use it as a context manager, or call :meth:`close`: every worker ends with it.
    """

    def __init__(self, num_nodes: int, workers: int, client_app: str = CLIENT_APP, run_id: int = 1) -> None:
        super().__init__(num_nodes, run_id)
        self._replies: dict[str, Message] = {}
        self._arrived = threading.Condition()
        self._workers: list[_Worker] = []
        count = min(workers, num_nodes)
        try:
            with _sigint_ignored():  # a worker starts with Ctrl-C ignored, also while it imports
                for index in range(count):
                    hosted = {node: pid for node, pid in self.partitions.items() if pid % count == index}
                    self._workers.append(self._start(index, hosted, num_nodes, client_app, run_id))
        except BaseException:
            self.close()
            raise
        self._worker_of = {node: self._workers[pid % count] for node, pid in self.partitions.items()}

    def _start(self, index: int, hosted: dict[int, int], num_nodes: int, client_app: str, run_id: int) -> _Worker:
        """Worker process ``index`` hosting ``hosted`` (node id → partition id), and its feeding thread."""
        context = multiprocessing.get_context(START_METHOD)
        ours, theirs = context.Pipe()
        configs = {node: {"partition-id": pid, "num-partitions": num_nodes} for node, pid in hosted.items()}
        levels = {name: logging.getLogger(name).getEffectiveLevel() for name in LOGGERS}
        process = context.Process(target=serve, args=(theirs, client_app, configs, run_id, levels),
                                  name=f"medfed-worker-{index}", daemon=True)
        process.start()
        theirs.close()  # the worker holds the only other end: its exit is our end of file
        return _Worker(index, process, ours, sorted(hosted.values()), self._deliver)

    # --- Grid ---------------------------------------------------------------------------------
    def get_node_ids(self) -> Iterable[int]:
        """The nodes of the workers still running (a lost node is no longer listed, as in Flower)."""
        return [node for node, worker in self._worker_of.items() if worker.lost is None]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue each message for the worker of its node (serialised now: later changes do not travel)."""
        ids = []
        for message in messages:
            worker = self._worker_of.get(message.metadata.dst_node_id)
            if worker is None:
                raise ValueError(f"message for unknown node {message.metadata.dst_node_id}")
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids: the id is set in place
            worker.inbox.put((message, encode(message)))
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies to ``message_ids`` that have arrived, waiting up to :data:`PULL_WAIT` for a first one."""
        wanted = set(message_ids)
        with self._arrived:
            self._arrived.wait_for(lambda: not wanted.isdisjoint(self._replies), timeout=PULL_WAIT)
            return [self._replies.pop(mid) for mid in wanted & self._replies.keys()]

    def _deliver(self, reply: Message) -> None:
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        with self._arrived:
            self._replies[reply.metadata.reply_to_message_id] = reply
            self._arrived.notify_all()

    # --- the workers' end ---------------------------------------------------------------------
    @property
    def worker_pids(self) -> list[int]:
        """The process ids of the workers (ended ones included)."""
        return [worker.process.pid for worker in self._workers if worker.process.pid is not None]

    def close(self, grace: float = CLOSE_TIMEOUT) -> None:
        """End every worker: an idle one finishes on request within ``grace`` seconds; a busy one, or one
        that does not, is terminated (then killed)."""
        for worker in self._workers:
            worker.stop()
        deadline = time.monotonic() + grace
        for worker in self._workers:
            if not worker.busy:
                worker.process.join(max(0.0, deadline - time.monotonic()))
        for worker in self._workers:
            _end(worker.process)
            worker.thread.join(1.0)
            if not worker.thread.is_alive():
                worker.connection.close()

    def __enter__(self) -> ProcessGrid:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        """Close; after an exception (Ctrl-C, a failed run) without waiting for any worker."""
        self.close(grace=CLOSE_TIMEOUT if kind is None else 0.0)


def _end(process: BaseProcess) -> None:
    """Terminate ``process`` if it still runs, and kill it if that is not enough."""
    for stop in (process.terminate, process.kill):
        if not process.is_alive():
            break
        stop()
        process.join(1.0)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore Ctrl-C here while processes start: they inherit it, and Python keeps it ignored in them.

    Only the main thread may change signal handling; elsewhere a worker ignores Ctrl-C from its first line.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_processes(federation: Federation) -> dict[str, Any]:
    """Run ``federation`` on a :class:`ProcessGrid` of ``engine.workers`` processes; none outlives the run.

    The server evaluates its central test set while the sites evaluate theirs (the clients run elsewhere),
    with a client's share of torch threads (``engine.cpus_per_client``), as on the in-process engine: more
    would compete with the workers for the same cores.
    """
    import torch

    scenario = federation.scenario
    federation.overlap_central_evaluation = True
    threads = torch.get_num_threads()
    torch.set_num_threads(scenario.engine.cpus_per_client)
    try:
        with ProcessGrid(scenario.partition.clients, scenario.engine.workers) as grid:
            return federation.run(grid)
    finally:
        torch.set_num_threads(threads)
