"""A real federation for end-to-end tests: a SuperLink and one SuperNode per hospital, as separate processes.

:class:`LocalFederation` builds the federation folder with :func:`server.federation_setup.init_federation`, starts
every party with the commands ``medfed deploy commands`` prints (:func:`server.federation_setup.superlink_command`,
:func:`server.federation_setup.supernode_command`), registers the hospitals with ``medfed deploy register``
(:func:`server.federation_setup.register`), and tears everything down (SIGTERM, then SIGKILL, of each party's
process group). Each party has its own folder (working directory, ``FLWR_HOME``, log), and each hospital's folder
holds only what the guide tells it to copy: ``ca.crt`` and its private key.

:func:`run_deployed` runs :data:`TWO_SMALL_ROUNDS` on it, and :func:`assert_same_run` checks the result against
the in-process engine's.

The network is :class:`Loopback` (every party on 127.0.0.1, distinct ports) or :class:`Namespaces` (the SuperLink
and each hospital in their own Linux network namespace, joined by veth pairs on a bridge in the SuperLink's).

Fault tests can :meth:`LocalFederation.kill_node` and :meth:`LocalFederation.start_node` while a run goes on, and
read :attr:`LocalFederation.superlink` (``folder``, ``log``: the ServerApp runs in that folder) and
:meth:`LocalFederation.node` logs.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from server.federation_folder import CA_CERT, DATABASE, FederationFolder, Hospital
from server.federation_setup import (
    RUNTIME_PORT,
    init_federation,
    superlink_command,
    supernode_command,
)
from server.flower_cli import flower_environment
from server.results import RunDirectory, RunDirectoryError
from server.scenario import load
from tests.helpers import QUICKSTART, SMALL, run, without_timing

SUPERLINK_READY = "Uvicorn running on https://"  # the SuperLink's log once it serves HTTPS
NODE_ACTIVATED = "SuperNode ID:"  # a SuperNode's log once the SuperLink accepted it
START_TIMEOUT = 30.0  # seconds; measured: SuperLink 2.3 s, SuperNodes 3.9 s on 2 cores
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL (measured: 0.5 s for a SuperNode, 1 s for the SuperLink)


TLS_PROBE = """
import socket, ssl, sys
host, port, ca = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with socket.create_connection((host, port), timeout=5) as raw:
    ssl.create_default_context(cafile=ca).wrap_socket(raw, server_hostname=host).close()
"""  # exits 0 only after a handshake that the federation's CA verifies


class StartupError(RuntimeError):
    """A party exited, or did not become ready, while starting."""


@dataclass
class Party:
    """One process of the federation with its own folder: working directory, ``home/`` (FLWR_HOME) and ``log``."""

    name: str
    folder: Path
    process: subprocess.Popen | None = field(default=None, repr=False)
    log_start: int = 0  # where the current process's output begins in the log (a restarted party appends)

    @property
    def log(self) -> Path:
        return self.folder / f"{self.name}.log"

    @property
    def home(self) -> Path:
        return self.folder / "home"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def current_log_text(self) -> str:
        """What the current process has logged (not an earlier run's lines in the same file)."""
        return self.log_text()[self.log_start:]

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, signum: int) -> None:
        """Send ``signum`` to the party's process group (its SuperExec and app processes included)."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the process group, SIGKILL it after ``grace`` seconds, and reap the process."""
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        self.signal(signal.SIGKILL)  # also children that outlived their parent in the group
        self.process.wait()


class Loopback:
    """Every party on this machine's loopback: the SuperLink on a free port, each node's Runtime API on its own."""

    superlink_host = "127.0.0.1"
    bind_host = "127.0.0.1"

    def __init__(self) -> None:
        self.superlink_port = free_port()

    def wrap(self, party: str, command: Sequence[str]) -> list[str]:
        """``command`` as it runs for ``party`` (here: unchanged)."""
        return list(command)

    def runtime_port(self, k: int) -> int:
        return free_port()

    def close(self) -> None:
        pass


class Namespaces:
    """The SuperLink in namespace ``<tag>-l`` (10.200.0.1 on a bridge) and node k in ``<tag>-n<k>``
    (10.200.0.<k+2>), each joined to the bridge by a veth pair; ``lo`` is up in every namespace.

    Nothing routes between these namespaces and the host's, so the hospitals reach the SuperLink only over their
    veth, and the host cannot reach it at all.
    """

    superlink_host = "10.200.0.1"
    bind_host = "0.0.0.0"  # as `medfed deploy commands` prints it; only the namespace's interfaces exist
    superlink_port = 9093

    def __init__(self, nodes: int) -> None:
        self.tag = f"mf{os.getpid() % 100000}{uuid.uuid4().hex[:3]}"
        self.namespaces: list[str] = []
        try:
            self._create(nodes)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def unavailable() -> str | None:
        """Why namespaces cannot be created here (None if they can): a probe namespace is added and removed."""
        if shutil.which("ip") is None:
            return "the 'ip' command (iproute2) is not installed"
        probe = f"mfprobe{os.getpid()}"
        result = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            return f"cannot create network namespaces: {result.stderr.strip() or 'ip netns add failed'}"
        subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
        return None

    def namespace(self, party: str) -> str:
        return f"{self.tag}-l" if party == "superlink" else f"{self.tag}-n{party.removeprefix('node')}"

    def wrap(self, party: str, command: Sequence[str]) -> list[str]:
        """``command`` run inside ``party``'s namespace (``ip netns exec`` keeps the environment, PATH included)."""
        return ["ip", "netns", "exec", self.namespace(party), *command]

    def runtime_port(self, k: int) -> int:
        return RUNTIME_PORT  # one network stack per node: the default port everywhere

    def _create(self, nodes: int) -> None:
        link, bridge = self.namespace("superlink"), f"{self.tag}b"
        self._add(link)
        self._in(link, "ip", "link", "add", bridge, "type", "bridge")
        self._in(link, "ip", "addr", "add", f"{self.superlink_host}/24", "dev", bridge)
        self._in(link, "ip", "link", "set", bridge, "up")
        for k in range(nodes):
            node, outer, inner = self.namespace(f"node{k}"), f"{self.tag}l{k}", f"{self.tag}n{k}"
            self._add(node)
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", outer, "netns", link)
            _ip("link", "set", inner, "netns", node)
            self._in(link, "ip", "link", "set", outer, "master", bridge)
            self._in(link, "ip", "link", "set", outer, "up")
            self._in(node, "ip", "addr", "add", f"10.200.0.{k + 2}/24", "dev", inner)
            self._in(node, "ip", "link", "set", inner, "up")

    def _add(self, namespace: str) -> None:
        _ip("netns", "add", namespace)
        self.namespaces.append(namespace)
        self._in(namespace, "ip", "link", "set", "lo", "up")  # Flower's local APIs listen on 127.0.0.1

    @staticmethod
    def _in(namespace: str, *command: str) -> None:
        _ip("netns", "exec", namespace, *command)

    def close(self) -> None:
        """Kill whatever still runs in the namespaces, then delete them (their veths go with them)."""
        for namespace in reversed(self.namespaces):
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        self.namespaces.clear()


def _ip(*arguments: str) -> None:
    subprocess.run(["ip", *arguments], check=True, capture_output=True, text=True)


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's choice)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalFederation:
    """A federation of ``hospitals`` SuperNodes and one SuperLink under ``root``, started by :meth:`start`.

    Use as a context manager: everything started is stopped on exit, and the network is removed.

    Parameters
    ----------
    root : Path
        An empty folder (``tmp_path``); it gets ``federation/`` (the federation folder), ``cli/`` (the CLI's
        FLWR_HOME), ``superlink/`` and ``node<k>/``.
    hospitals : int, default 2
        Number of hospitals (partition ids 0..hospitals-1).
    network : Loopback or Namespaces, optional
        :class:`Loopback` (default) or :class:`Namespaces`.
    """

    name = "fed"

    def __init__(self, root: Path, hospitals: int = 2, network: Loopback | Namespaces | None = None) -> None:
        self.root = root
        self.network = network or Loopback()
        self.cli_home = root / "cli"
        self.federation = init_federation(
            self.name, [f"{self.network.superlink_host}:{self.network.superlink_port}"],
            [f"hospital-{k}" for k in range(hospitals)], folder=root / "federation", flwr_home=self.cli_home)
        self.superlink = Party("superlink", root / "superlink")
        self.nodes: dict[int, Party] = {}

    # --- lifecycle ----------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalFederation:
        """Start the SuperLink, register every hospital, and start every hospital's SuperNode."""
        self.start_superlink()
        self.register()
        for k in range(len(self.federation.hospitals)):
            self.start_node(k)
        return self

    def stop(self) -> None:
        """Stop every node, then the SuperLink (nodes deactivate themselves on SIGTERM), then the network."""
        try:
            for party in [*self.nodes.values(), self.superlink]:
                party.stop()
        finally:
            self.network.close()

    def start_superlink(self) -> Party:
        """Start the SuperLink (TLS, SuperNode authentication) and wait until it serves HTTPS."""
        command = superlink_command(self.federation, host=self.network.bind_host,
                                    database=self.superlink.folder / DATABASE)
        self._launch(self.superlink, command)
        self._wait_for(self.superlink, SUPERLINK_READY)
        return self.superlink

    def start_node(self, k: int, *, private_key: Path | None = None, wait: bool = True) -> Party:
        """Start hospital ``k``'s SuperNode (or, with ``private_key``, a node holding that key instead).

        Its folder gets ``ca.crt`` and the private key only, as a hospital's machine would. With ``wait`` this
        returns once the SuperLink accepted the node and raises :class:`StartupError` if the node exits first.
        """
        party = self.nodes.get(k) or Party(f"node{k}", self.root / f"node{k}")
        if party.running():
            raise StartupError(f"{party.name} is already running")
        hospital = self._hospital(k)
        party.folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.federation.path(CA_CERT), party.folder / CA_CERT)
        key = party.folder / hospital.name
        shutil.copy(private_key or self.federation.private_key(hospital), key)
        key.chmod(0o600)
        command = supernode_command(self.federation, hospital, files=party.folder,
                                    runtime_port=self.network.runtime_port(k))
        self.nodes[k] = party
        self._launch(party, command)
        if wait:
            self._wait_for(party, NODE_ACTIVATED)
        return party

    def kill_serverapp(self) -> int:
        """SIGKILL the ServerApp process of the run in progress (the coordinating site's crash); its pid."""
        pattern = f"flwr-serverapp --runtime-api-address [^ ]*:{self.network.superlink_port}( |$)"
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False).stdout.split()
        if len(found) != 1:
            raise StartupError(f"expected one ServerApp process, found {found or 'none'}")
        os.kill(int(found[0]), signal.SIGKILL)
        return int(found[0])

    def kill_node(self, k: int, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` (default: SIGKILL, a crash) to node ``k``'s process group and reap it."""
        party = self.nodes[k]
        party.signal(signum)
        party.process.wait(timeout=START_TIMEOUT)

    def node(self, k: int) -> Party:
        return self.nodes[k]

    # --- the CLI at the coordinating site -----------------------------------------------------------------
    def register(self) -> None:
        """``medfed deploy register`` at the coordinating site; the node ids land in the federation folder."""
        result = self.medfed("deploy", "register", str(self.federation.folder), timeout=120)
        if result.returncode != 0:
            raise StartupError(f"medfed deploy register failed: {result.stdout.strip()}")
        self.federation = FederationFolder.load(self.federation.folder)

    def medfed(self, *arguments: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
        """Run ``medfed ARGUMENTS`` at the coordinating site (in the SuperLink's namespace) with the CLI's home;
        stdout and stderr together in ``.stdout``."""
        return subprocess.run(self._medfed_command(arguments), env=self._environment(self.cli_home), cwd=self.root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout,
                              check=False)

    def start_medfed(self, *arguments: str, log: Path) -> subprocess.Popen:
        """Start ``medfed ARGUMENTS`` as :meth:`medfed` does, without waiting; stdout and stderr go to ``log`` (a
        file, not a pipe: a long run's streamed log would fill a pipe nobody reads yet and stall it)."""
        with log.open("w") as sink:
            return subprocess.Popen(self._medfed_command(arguments), env=self._environment(self.cli_home),
                                    cwd=self.root, stdout=sink, stderr=subprocess.STDOUT, text=True)

    @staticmethod
    def quickstart_sets(overrides: Sequence[str]) -> list[str]:
        """``medfed run`` arguments for the quickstart scenario with ``--set`` for each override."""
        return [str(QUICKSTART), *(argument for item in overrides for argument in ("--set", item))]

    def reaches_superlink(self, party: str | None) -> bool:
        """Whether ``party`` (``"node<k>"``, ``"superlink"``, or None: this test's own network) completes a TLS
        handshake with the SuperLink, verified against the federation's CA (a proxy that accepts any connection
        does not count)."""
        probe = [sys.executable, "-c", TLS_PROBE, self.network.superlink_host, str(self.network.superlink_port),
                 str(self.federation.path(CA_CERT))]
        command = probe if party is None else self.network.wrap(party, probe)
        return subprocess.run(command, capture_output=True, timeout=30, check=False).returncode == 0

    # --- helpers ------------------------------------------------------------------------------------------
    def _hospital(self, k: int) -> Hospital:
        hospitals = self.federation.hospitals
        return hospitals[k] if k < len(hospitals) else Hospital(f"extra-{k}", k)


    def _medfed_command(self, arguments: Sequence[str]) -> list[str]:
        return self.network.wrap("superlink", [sys.executable, "-m", "server.cli", *arguments])

    def _environment(self, home: Path) -> dict[str, str]:
        environment = flower_environment()
        environment.update(FLWR_HOME=str(home), COLUMNS="200", PYTHONUNBUFFERED="1")
        return environment

    def _launch(self, party: Party, command: list[str]) -> None:
        party.folder.mkdir(parents=True, exist_ok=True)
        party.log_start = len(party.log_text())
        with party.log.open("a") as log:
            party.process = subprocess.Popen(self.network.wrap(party.name, command), cwd=party.folder,
                                             env=self._environment(party.home), stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_for(self, party: Party, marker: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while marker not in party.current_log_text():
            if not party.running() or time.monotonic() > deadline:
                state = f"exited with {party.process.returncode}" if not party.running() else \
                    f"not ready after {timeout:.0f} s"
                party.stop()  # its SuperExec would outlive it, retrying forever
                raise StartupError(f"{party.name} {state}: {_tail(party.current_log_text())}")
            time.sleep(0.1)


def _tail(text: str, lines: int = 5) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# --- runs on a federation --------------------------------------------------------------------------------------
TWO_SMALL_ROUNDS = [  # the quickstart shrunk (tests.helpers.SMALL), 2 hospitals, 2 rounds, node state kept at the sites
    *SMALL, "local.epochs=1", "partition.clients=2", "strategy.rounds=2", "output.checkpoint_node_state=false",
    "strategy.evaluate_every=2",  # evaluate in even rounds and the last: each phase costs a message round trip
]


@dataclass(frozen=True)
class DeployedRun:
    """A run directory written through the federation, and the wall time of its ``medfed run``."""

    run_dir: RunDirectory
    wall_seconds: float
    output: str


def run_deployed(federation: LocalFederation, output_dir: Path, overrides: Sequence[str] = TWO_SMALL_ROUNDS,
                 *, timeout: float = 240.0) -> DeployedRun:
    """``medfed run quickstart.yaml --engine deployment --federation ...`` with ``overrides``, writing under
    ``output_dir``; asserts exit 0 and that the run directory it names is the one written."""
    started = time.monotonic()
    result = federation.medfed("run", "--engine", "deployment", "--federation", str(federation.federation.folder),
                               *federation.quickstart_sets([*overrides, f"output.dir={output_dir}"]), timeout=timeout)
    wall = time.monotonic() - started
    assert result.returncode == 0, f"medfed run exited {result.returncode}: {result.stdout[-3000:]}"
    run_dirs = [path for path in output_dir.glob("*/*") if path.is_dir()]
    assert len(run_dirs) == 1, f"expected one run directory under {output_dir}, found {run_dirs}"
    assert f"results: {run_dirs[0]}" in result.stdout
    return DeployedRun(RunDirectory.open(run_dirs[0]), wall, result.stdout)


def run_inprocess(output_dir: Path, overrides: Sequence[str] = TWO_SMALL_ROUNDS) -> RunDirectory:
    """The same scenario on the in-process engine, under ``output_dir``."""
    return run(load(QUICKSTART, [*overrides, "engine.backend=inprocess", f"output.dir={output_dir}"]))


def assert_same_run(deployed: RunDirectory, local: RunDirectory) -> None:
    """Same files, and the same metrics records but for wall-clock times (seeded runs are reproducible)."""
    assert _files(deployed.path) == _files(local.path)
    assert without_timing(deployed.read_metrics()) == without_timing(local.read_metrics())


def last_checkpoint_round(output: Path) -> int:
    """The round of the last checkpoint of the one run under ``output`` (0 before the first)."""
    try:
        return RunDirectory.open(next(output.glob("*/*"))).load_checkpoint().round
    except (StopIteration, RunDirectoryError):
        return 0


def _files(folder: Path) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file()}


def round_seconds(run_dir: RunDirectory) -> dict[int, float]:
    """Seconds per round: the sum of its phases' (train, evaluate, central) ``seconds`` in metrics.jsonl."""
    rounds: dict[int, float] = {}
    for record in run_dir.read_metrics():
        rounds[record["round"]] = rounds.get(record["round"], 0.0) + record["seconds"]
    return rounds


def timing_report(deployed: DeployedRun, local: RunDirectory) -> dict[str, object]:
    """Wall time of the deployed run, seconds per round on both engines, and the mean overhead per round."""
    remote, inprocess = round_seconds(deployed.run_dir), round_seconds(local)
    overhead = sum(remote[r] - inprocess[r] for r in remote) / len(remote)
    return {"deployed_wall_seconds": round(deployed.wall_seconds, 1),
            "deployed_round_seconds": json.dumps({r: round(s, 1) for r, s in remote.items()}),
            "inprocess_round_seconds": json.dumps({r: round(s, 1) for r, s in inprocess.items()}),
            "overhead_per_round_seconds": round(overhead, 1)}
