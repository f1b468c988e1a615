"""Engines: what runs the ClientApps of a scenario (docs/engines.md).

* ``simulation`` — Flower's Simulation Engine (Ray): each client is a Ray actor;
  ``engine.workers`` of them train in parallel with ``engine.cpus_per_client``
  CPUs (and torch threads) each; with ``engine.address``, on an existing Ray cluster, as many at once as
  its nodes hold.
* ``inprocess`` — :class:`InProcessGrid`: a Flower ``Grid`` that calls the
  ClientApp directly, one message at a time, in this process. No Ray start-up
  (about 25 s here), so tests and small runs use it. Each node keeps its own
  ``Context`` (and so its ``context.state``) for the whole run, as in simulation.
* ``processes`` — :class:`~server.process_engine.ProcessGrid`: ``engine.workers`` persistent worker
  processes on this machine, no Ray (:mod:`server.process_engine`).
* ``flwr run .`` — the same ServerApp/ClientApp through a SuperLink
  (:mod:`server.app`); see docs/engines.md.

The engines here run the same :class:`~server.federation.Federation` loop, so a
scenario and seed give the same metrics on each (all randomness is keyed by
partition id and round, never by node id or arrival order).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import socket
import sys
import threading
import uuid
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from server import processes
from server.federation import Federation, FederationError, RunInterrupted
from server.flower_cli import FLOWER_ENVIRONMENT
from server.local_grid import LocalGrid, handle
from server.process_engine import run_processes
from server.progress import Progress
from server.results import RunDirectory
from server.scenario import EngineSection, Scenario

log = logging.getLogger("medfed")

CLUSTER_CONNECT_TIMEOUT = 5.0
"""Seconds a Ray cluster's GCS (``engine.address``) has to accept a connection before the run stops."""

QUIET_ENVIRONMENT = {
    **FLOWER_ENVIRONMENT,
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    "RAY_DEDUP_LOGS": "1",
    "PYTHONWARNINGS": "ignore",
}


def quiet_environment() -> None:
    """Telemetry, update checks and runtime installs off; Ray and warnings quiet (user settings win)."""
    for key, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


class InProcessGrid(LocalGrid):
    """A Flower ``Grid`` whose nodes are ClientApp calls in this process.

    Messages are deep-copied on the way in and out (as serialisation would), each
    node has its own persistent ``Context``, and exceptions escaping the ClientApp
    become error replies, as in Flower's runtimes.

    Parameters
    ----------
    client_app : ClientApp
        the ClientApp every node runs.
    num_nodes : int
        number of nodes; node k gets ``node_config`` partition-id k.
    """

    def __init__(self, client_app: ClientApp, num_nodes: int, run_id: int = 1) -> None:
        super().__init__(num_nodes, run_id)
        self._client_app = client_app
        self.contexts = {
            node_id: Context(
                run_id=run_id,
                node_id=node_id,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for pid, node_id in enumerate(self.node_ids)
        }
        self._pending: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            if message.metadata.dst_node_id not in self.contexts:
                raise ValueError(f"message for unknown node {message.metadata.dst_node_id}")
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Flower's grids: the id is set in place
            self._pending[message.metadata.message_id] = copy.deepcopy(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Handle the next pending message among ``message_ids`` and return its reply."""
        wanted = next((mid for mid in message_ids if mid in self._pending), None)
        if wanted is None:
            return []
        message = self._pending.pop(wanted)
        reply = copy.deepcopy(handle(self._client_app, message, self.contexts[message.metadata.dst_node_id]))
        reply.metadata.__dict__["_message_id"] = uuid.uuid4().hex
        return [reply]


def run_scenario(scenario: Scenario, run_dir: RunDirectory, progress: Progress, *, resume: bool = False,
                 backend: str | None = None) -> dict[str, Any]:
    """Run ``scenario`` on its engine (or ``backend``); returns the run summary."""
    quiet_environment()
    backend = backend or scenario.engine.backend
    federation = Federation(scenario, run_dir, progress, resume=resume)
    if backend == "inprocess":
        return _run_inprocess(federation)
    if backend == "simulation":
        return _run_simulation(federation)
    if backend == "processes":
        return run_processes(federation)
    raise ValueError(f"unknown engine '{backend}' (allowed: simulation, inprocess, processes)")


def _run_inprocess(federation: Federation) -> dict[str, Any]:
    from client.app import app as client_app

    grid = InProcessGrid(client_app, federation.scenario.partition.clients)
    return federation.run(grid)


class EngineError(FederationError):
    """The simulation engine itself failed (Ray did not start, an actor pool could not be built, ...)."""


@contextlib.contextmanager
def _flower_quiet() -> Iterator[None]:
    """Flower's engine logs each failure as tracebacks: medfed reports it as one line instead (``-v`` shows them).

    A ClientApp error still reaches the run as an error reply (``metrics.jsonl``), as on the
    in-process engine. The logger stays quiet after an engine failure or Ctrl-C, when its threads may
    still be logging; it is restored after a run that ended normally.
    """
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    if not log.isEnabledFor(logging.DEBUG):
        flwr_log.setLevel(logging.CRITICAL)
    yield
    flwr_log.setLevel(level)


class _QuietAfterStop(logging.Filter):
    """Drops the log records of a run's ServerApp thread once the run is stopped, while that thread lives.

    After Ctrl-C (or an engine failure) the ServerApp thread goes on until it next checks ``stop``; what it
    would log then (a strategy's summary line, say) would follow the command's last line. Other threads, and
    later runs in the same process, log as usual.
    """

    def __init__(self, stop: threading.Event) -> None:
        super().__init__()
        self.stop = stop
        self.server_threads: list[threading.Thread] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.stop.is_set():
            return True
        return not any(thread.ident == record.thread and thread.is_alive() for thread in self.server_threads)


RAY_CORE_PROGRAMS = ("raylet", "gcs_server")
"""Ray's own programs (not Python): the node's raylet and the head's GCS."""
RAY_STOP_TIMEOUT_S = 5.0
"""Seconds the processes of this process's Ray instance get to end after ``ray.shutdown`` before SIGTERM/SIGKILL."""


def shutdown_ray() -> None:
    """Stop the Ray instance this process started, if any: its raylet, GCS, dashboard, agents and workers.

    ``ray.shutdown`` gives the raylet one second to end gracefully, then kills it; on a loaded machine that
    second passes, and the raylet's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) outlive it,
    orphaned. And it can hang (a thread still waiting in ``ray.get``). So the Ray processes this process
    started (its descendants, :func:`ray_processes`) are noted first, ``ray.shutdown`` gets
    ``RAY_STOP_TIMEOUT_S`` s in a thread of its own, and those still running then are ended, by pid.

    On a cluster that ``engine.address`` joined, this process only disconnects: the cluster runs on (its
    processes are not this process's descendants), and the run's actors end with it.
    """
    ray = sys.modules.get("ray")  # never import Ray only to find that it is not running
    if ray is None:
        return
    _no_auto_connect()
    started = ray_processes()
    if ray.is_initialized():
        stopping = threading.Thread(target=ray.shutdown, name="medfed-ray-shutdown", daemon=True)
        stopping.start()
        stopping.join(RAY_STOP_TIMEOUT_S)  # it can hang (a Flower thread still in ray.get): its processes end below
    end_ray_processes(started)


def end_ray_instance() -> None:
    """End the Ray instance this process started by pid, its raylet and GCS last, without ``ray.shutdown``.

    For a process on its way out (Flower's exit handlers): there ``ray.shutdown`` begins by stopping the raylet,
    whereupon Ray's core worker ends this whole process at once, before the raylet's agents are stopped, which
    then run on, orphaned. Ending the agents, workers and Ray's other helpers first leaves nothing behind
    whenever the process goes.
    """
    if sys.modules.get("ray") is None:
        return
    _no_auto_connect()
    started = ray_processes()
    core = [pid for pid in started if Path(next(iter(processes.command_line(pid)), "")).name in RAY_CORE_PROGRAMS]
    processes.end([pid for pid in started if pid not in core], timeout=1.0)
    processes.end(core, timeout=1.0)


def end_ray_processes(started: list[int]) -> None:
    """Give the Ray processes ``started`` ``RAY_STOP_TIMEOUT_S`` s to end after ``ray.shutdown``, then end them
    (SIGTERM, and SIGKILL a second later)."""
    processes.wait(started, RAY_STOP_TIMEOUT_S)
    processes.end(started, timeout=1.0)


def _no_auto_connect() -> None:
    """Stop Ray from starting a new instance on its own: a thread still calling ``ray.get`` after the shutdown
    would otherwise start one, orphaned."""
    auto_init = sys.modules.get("ray._private.auto_init_hook")
    if auto_init is not None:
        setattr(auto_init, "enable_auto_connect", False)  # noqa: B010 (a module attribute Ray reads at each call)


def ray_processes() -> list[int]:
    """The Ray processes this process started: descendants run from Ray's package or titled ``ray::...``.

    Empty where processes cannot be read (no ``/proc``).
    """
    if not processes.PROC.is_dir():
        return []
    return [pid for pid in processes.descendants(os.getpid()) if _is_ray(processes.command_line(pid))]


def _is_ray(argv: list[str]) -> bool:
    """Whether ``argv`` is a Ray process: a worker or agent (``ray::NAME``), or a program in Ray's package."""
    if not argv:
        return False
    return argv[0].startswith("ray::") or any(f"{os.sep}ray{os.sep}" in arg for arg in argv[:2])


def _first_cause(error: BaseException) -> str:
    """``Type: message`` of the innermost exception ``error`` was raised from, on one line."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text}"


def simulation_backend_config(engine: EngineSection) -> dict[str, dict[str, Any]]:
    """Flower's Ray backend config for ``engine``: resources per client, and the Ray instance to run on.

    Without ``engine.address``, ``address: local`` makes ``ray.init`` start a new Ray instance for this run
    even when a Ray cluster already runs on the machine (``ray start``, ``RAY_ADDRESS``), which it would
    otherwise join, and which refuses the CPU count this run asks for. That instance gets the CPUs and GPUs
    of ``engine.workers`` clients (:func:`private_instance_resources`).

    With ``engine.address`` (``auto`` or ``HOST:PORT``), ``ray.init`` joins that cluster and is given no CPU
    or GPU count (Ray refuses them when connecting): Flower sizes its actor pool from each node's resources
    (``ray.nodes()``), so every client that fits the cluster trains at once and ``engine.workers`` is unused.

    Either way each client asks for ``engine.cpus_per_client`` CPUs and ``engine.gpus_per_client`` GPUs:
    Ray places each client's actor where those are free.
    """
    if engine.address:
        instance: dict[str, Any] = {"address": engine.address}
    else:
        instance = {"address": "local", **private_instance_resources(engine)}
    return {
        "client_resources": {"num_cpus": engine.cpus_per_client, "num_gpus": engine.gpus_per_client},
        "init_args": {**instance, "include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False},
    }


def private_instance_resources(engine: EngineSection) -> dict[str, int]:
    """``num_cpus`` and ``num_gpus`` of a private Ray instance: what ``engine.workers`` clients training at once need.

    Each client asks for ``engine.gpus_per_client`` GPUs (0 unless the scenario shares GPUs; ``device: cpu``
    with a share is refused when the scenario is loaded), and Ray gets the ``⌈workers · share⌉`` GPUs that
    ``workers`` clients training at once need; a share below 1 packs several clients on one GPU.
    """
    gpus = math.ceil(round(engine.workers * engine.gpus_per_client, 6))  # 30 × 0.1 is 3.0000000000000004
    return {"num_cpus": engine.workers * engine.cpus_per_client, "num_gpus": gpus}


def reach_cluster(address: str, timeout: float = CLUSTER_CONNECT_TIMEOUT) -> str:
    """The GCS address ``HOST:PORT`` that ``engine.address`` names, once it accepts a connection.

    ``ray.init`` retries an address where nothing answers for about twelve minutes (20 tries of 36 s) before
    it gives up; this check turns that wait into one line within ``timeout`` seconds.

    Raises
    ------
    EngineError
        No cluster found for ``auto``, or nothing accepts a TCP connection at the address within ``timeout``.
    """
    gcs = cluster_gcs_address(address)
    host, _, port = gcs.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return gcs
    except OSError as error:
        raise EngineError(f"the simulation engine failed: no Ray cluster answers at {gcs} (engine.address "
                          f"{address}; {_first_cause(error)})") from error


def cluster_gcs_address(address: str) -> str:
    """``HOST:PORT`` of the cluster ``address`` names, read as ``ray.init`` reads it.

    ``auto`` is ``RAY_ADDRESS``, else the address ``ray start`` wrote in Ray's temporary directory
    (``RAY_TMPDIR``); a ``localhost`` host becomes this machine's IP address.

    Raises
    ------
    EngineError
        ``auto`` without a cluster on this machine, or a ``RAY_ADDRESS`` that is no address.
    """
    from ray._private.services import canonicalize_bootstrap_address  # private: Ray's own reading of addresses

    try:
        return str(canonicalize_bootstrap_address(address))
    except ConnectionError:
        raise EngineError("the simulation engine failed: engine.address auto found no Ray cluster (start one with "
                          "`ray start --head`, or give its HOST:PORT)") from None
    except ValueError as error:
        raise EngineError(f"the simulation engine failed: engine.address {address}: {_first_cause(error)}") from None


def _run_simulation(federation: Federation) -> dict[str, Any]:
    """Flower's Simulation Engine (Ray) with the federation loop as the ServerApp.

    Raises
    ------
    EngineError
        If the engine failed (one line: its first cause); the ServerApp is told to stop at once
        rather than wait for replies that cannot come.
    """
    from flwr.simulation import run_simulation

    from client.app import app as client_app

    address = federation.scenario.engine.address
    if address:
        log.info("Ray cluster: %s (engine.address %s)", reach_cluster(address), address)
    results: list[dict[str, Any]] = []
    raised: list[BaseException] = []  # by the federation loop: passed on as they are
    started_ray: list[int] = []  # noted while Ray still runs; Flower shuts Ray down after the ServerApp
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        quiet_after_stop.server_threads.append(threading.current_thread())
        try:
            results.append(federation.run(grid))
        except RunInterrupted:  # Ctrl-C in the main thread or an engine failure; the main thread reports it
            log.debug("ServerApp thread stopped on request")
        except BaseException as error:
            raised.append(error)
            raise
        finally:
            started_ray.extend(ray_processes())

    quiet_after_stop = _QuietAfterStop(federation.stop)
    log.addFilter(quiet_after_stop)
    with _flower_quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=federation.scenario.partition.clients,
                backend_config=simulation_backend_config(federation.scenario.engine),
            )
        except KeyboardInterrupt:
            federation.stop.set()  # the ServerApp runs in a thread of its own: tell it to stop too
            shutdown_ray()  # Flower's worker threads may wait on actors Ctrl-C killed; release them
            raise
        except Exception as error:
            if raised and error is raised[0]:
                raise
            federation.stop.set()  # the engine is gone: the ServerApp must not wait for its replies
            raise EngineError(f"the simulation engine failed: {_first_cause(error)}") from error
        finally:
            end_ray_processes(started_ray)  # ray.shutdown gave its raylet 1 s: agents may outlive it
    log.removeFilter(quiet_after_stop)  # only a run that ended normally: the ServerApp thread is done
    if not results:
        raise EngineError("the simulation engine failed: it ended before the run finished")
    return results[0]
