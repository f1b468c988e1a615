"""Deployment on Flower's Deployment Engine: one SuperLink at the coordinating site, one SuperNode per hospital.

A **federation folder** (default ``~/.medfed/deploy/NAME``, or ``$MEDFED_DEPLOY_HOME/NAME``) holds everything
the coordinating site needs:

* ``ca.crt`` / ``ca.key``: the federation's own certificate authority (ECDSA P-384; :mod:`server.credentials`
  makes the certificates and keys);
* ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by that CA, whose subject alternative
  names are every address the hospitals dial plus 127.0.0.1 (the SuperLink's own SuperExec dials it);
* ``hospital-K`` / ``hospital-K.pub``: one SuperNode authentication key pair per hospital (ECDSA P-384, OpenSSH
  format); only registered public keys may join;
* ``federation.json``: name, SuperLink address(es), hospitals with their partition ids and, once registered,
  their node ids; ``superlink.db`` is the SuperLink's database (registrations survive restarts).

Commands (``medfed deploy ...``, handlers at the end of this module): ``init`` writes the folder and the Flower
CLI connection ``[superlink.NAME]`` in ``$FLWR_HOME/config.toml``; ``commands`` prints the exact start commands
for every machine; ``register`` registers every hospital's public key; ``status`` shows which hospitals are
online. ``medfed run X.yaml --engine deployment --federation NAME`` goes to :func:`launch`, which ships the
resolved scenario to the ServerApp (run-config key ``scenario-json``) through ``flwr run`` and checks the run's
final status (``flwr run --stream`` exits 0 even when the ServerApp fails).

Private keys are written with mode 0600. Every Flower process started from here runs with telemetry, update
checks and runtime dependency installation off, and the Python environment's ``bin`` first on ``PATH`` (Flower
starts its helper processes by name).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.credentials import (
    certificate_pem,
    is_ip,
    make_ca,
    make_server_certificate,
    private_key_pem,
    write_file,
    write_hospital_key,
)

if TYPE_CHECKING:  # pragma: no cover
    from server.scenario import Scenario

MANIFEST, CA_CERT, CA_KEY = "federation.json", "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY, DATABASE = "server.pem", "server.key", "superlink.db"
LOOPBACK = "127.0.0.1"  # the SuperLink's SuperExec dials it when the SuperLink binds 0.0.0.0
RUNTIME_PORT = 9094  # a SuperNode's local Runtime API (plain HTTP on 127.0.0.1, never leaves the machine)
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # also a bare TOML key and a file name
SCENARIO_JSON_KEY = "scenario-json"  # run-config key of the resolved scenario ([tool.flwr.app.config])
RESUME_KEY = "resume-dir"  # run-config key: the run directory a resumed run continues ([tool.flwr.app.config])
RUN_DIRECTORY_PREFIX = "run directory: "  # the ServerApp's log line naming the run directory
ALREADY_REGISTERED_CODE = "[code: 23]"  # Flower: "Public key already in use."
UNKNOWN_HOSPITAL = "?"  # a node registered at the SuperLink but not by this federation folder
FLOWER_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
CLI_TIMEOUT = 60.0  # seconds for one `flwr ... --format json` call
FINAL_STATUS_TIMEOUT = 30.0  # seconds to wait for a run's status to turn finished after its log stream ends


class DeployError(Exception):
    """Invalid input or setup (exit code 2); ``str(error)`` is one line."""

    exit_code = 2


class SuperLinkError(DeployError):
    """The SuperLink refused, is unreachable, or a run failed (exit code 1)."""

    exit_code = 1


# --- the federation folder ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Hospital:
    """One site: its name (also its key files' name), its partition id and, once registered, its node id."""

    name: str
    partition_id: int
    node_id: int | None = None


@dataclass(frozen=True)
class Federation:
    """A federation folder: the SuperLink's address(es) and the hospitals (see the module docstring)."""

    name: str
    folder: Path
    addresses: tuple[str, ...]
    hospitals: tuple[Hospital, ...]

    @property
    def address(self) -> str:
        """The address the hospitals and the CLI dial (the first one given to ``init``)."""
        return self.addresses[0]

    @property
    def port(self) -> int:
        """The SuperLink's one HTTPS port (Fleet, Control and Runtime APIs)."""
        return split_address(self.address)[1]

    def path(self, file: str) -> Path:
        """Absolute path of ``file`` in the folder."""
        return self.folder / file

    def private_key(self, hospital: Hospital) -> Path:
        """The hospital's SuperNode private key (stays with the hospital)."""
        return self.folder / hospital.name

    def public_key(self, hospital: Hospital) -> Path:
        """The hospital's public key (registered at the SuperLink)."""
        return self.folder / f"{hospital.name}.pub"

    def save(self) -> None:
        """Write ``federation.json``."""
        manifest = {"name": self.name, "addresses": list(self.addresses),
                    "hospitals": [asdict(hospital) for hospital in self.hospitals]}
        (self.folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, folder: Path) -> Federation:
        """Read ``folder/federation.json``."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            return cls(name=manifest["name"], folder=folder.resolve(), addresses=tuple(manifest["addresses"]),
                       hospitals=tuple(Hospital(**hospital) for hospital in manifest["hospitals"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DeployError(f"{folder / MANIFEST}: not a readable federation manifest ({error})") from None


def deploy_home() -> Path:
    """Where named federation folders live: ``$MEDFED_DEPLOY_HOME`` or ``~/.medfed/deploy``."""
    return Path(os.environ.get("MEDFED_DEPLOY_HOME") or Path.home() / ".medfed" / "deploy").expanduser()


def find_federation(reference: str) -> Federation:
    """The federation named ``reference`` (in :func:`deploy_home`), or the federation folder at that path."""
    folder = Path(reference).expanduser()
    if not (folder / MANIFEST).is_file():
        if not NAME_PATTERN.match(reference):
            raise DeployError(f"no federation folder at {folder} (no {MANIFEST})")
        folder = deploy_home() / reference
    if not (folder / MANIFEST).is_file():
        raise DeployError(f"unknown federation '{reference}': no {folder / MANIFEST} "
                          f"(create it with: medfed deploy init {reference} --address HOST:PORT --hospitals N)")
    return Federation.load(folder)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT``) as (host, port); raises :class:`DeployError` for anything else."""
    host, sep, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeployError(f"--address {address}: expected HOST:PORT, e.g. superlink.hospital.org:9093")
    if not is_ip(host) and not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
        raise DeployError(f"--address {address}: '{host}' is neither an IP address nor a DNS name")
    return host, int(port)


def _check_name(name: str, what: str) -> str:
    if not NAME_PATTERN.match(name):
        raise DeployError(f"{what} '{name}': use letters, digits, '-' and '_' (at most 63, starting with a letter "
                          "or digit)")
    return name


# --- init: certificates, keys, the Flower CLI connection -----------------------------------------------------
def init_federation(name: str, addresses: Sequence[str], hospitals: Sequence[str], *, folder: Path | None = None,
                    force: bool = False, flwr_home: Path | None = None) -> Federation:
    """Create a federation folder and the Flower CLI connection ``[superlink.NAME]``.

    Args:
        name: the federation (and Flower connection) name.
        addresses: ``HOST:PORT`` of the SuperLink as the hospitals reach it (several names of one machine are
            fine; they must share the port). All hosts go into the server certificate, with 127.0.0.1.
        hospitals: hospital names; hospital k gets partition id k.
        folder: where to write (default ``deploy_home() / name``).
        force: replace an existing federation folder (new CA and keys: hospitals must get new files).
        flwr_home: the Flower CLI's home (default ``$FLWR_HOME`` or ``~/.flwr``).

    Raises:
        DeployError: invalid names or addresses, or an existing folder without ``force``.
    """
    _check_name(name, "federation name")
    hosts = _hosts_of(addresses)
    if not hospitals:
        raise DeployError("a federation needs at least one hospital (--hospitals N or --hospital NAME)")
    for hospital in hospitals:
        _check_name(hospital, "hospital name")
    if len(set(hospitals)) != len(hospitals):
        raise DeployError(f"hospital names must differ (got {', '.join(hospitals)})")
    folder = _fresh_folder((folder or deploy_home() / name).expanduser().resolve(), force)
    federation = Federation(name, folder, tuple(addresses),
                            tuple(Hospital(hospital, k) for k, hospital in enumerate(hospitals)))
    _write_credentials(federation, hosts)
    federation.save()
    write_connection(federation, flwr_home or flower_home())
    return federation


def _hosts_of(addresses: Sequence[str]) -> list[str]:
    """The hosts of ``addresses`` after checking that there is at least one and that they share one port."""
    if not addresses:
        raise DeployError("give the SuperLink's address: --address HOST:PORT")
    parsed = [split_address(address) for address in addresses]
    ports = sorted({port for _, port in parsed})
    if len(ports) > 1:
        raise DeployError(f"--address: the SuperLink listens on one port (got {', '.join(map(str, ports))})")
    return [host for host, _ in parsed]


def _fresh_folder(folder: Path, force: bool) -> Path:
    """``folder``, created empty with mode 0700; an existing federation there is replaced only with ``force``."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MANIFEST).is_file():
            raise DeployError(f"{folder} exists and is not a federation folder; choose another --dir")
        if not force:
            raise DeployError(f"federation folder {folder} exists; add --force to replace it (new CA and keys)")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder.chmod(0o700)
    return folder


def _write_credentials(federation: Federation, hosts: Sequence[str]) -> None:
    """The CA, the SuperLink's certificate for ``hosts`` + 127.0.0.1, and one key pair per hospital."""
    ca_key, ca_cert = make_ca(f"medfed {federation.name} CA")
    server_key, server_cert = make_server_certificate(ca_key, ca_cert, [*hosts, LOOPBACK])
    write_file(federation.path(CA_KEY), private_key_pem(ca_key), private=True)
    write_file(federation.path(CA_CERT), certificate_pem(ca_cert))
    write_file(federation.path(SERVER_KEY), private_key_pem(server_key), private=True)
    write_file(federation.path(SERVER_CERT), certificate_pem(server_cert))
    for hospital in federation.hospitals:
        write_hospital_key(federation.private_key(hospital), hospital.name)


def flower_home() -> Path:
    """The Flower CLI's home: ``$FLWR_HOME`` or ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def write_connection(federation: Federation, flwr_home: Path) -> Path:
    """Add or replace ``[superlink.NAME]`` (address, root certificates) in ``flwr_home/config.toml``.

    Every other line of the file is kept as it is. A missing file starts from Flower's own default
    configuration, so ``flwr run .`` keeps its local default connection.
    """
    import tomli_w

    path = flwr_home / "config.toml"
    text = path.read_text(encoding="utf-8") if path.is_file() else _flower_default_config()
    entry = {"address": federation.address, "root-certificates": str(federation.path(CA_CERT))}
    if _parse_toml(text, path).get("superlink", {}).get(federation.name) is not None:
        text = _without_table(text, f"superlink.{federation.name}", path)
    block = tomli_w.dumps({"superlink": {federation.name: entry}})
    text = f"{text.rstrip()}\n\n{block}" if text.strip() else block
    if _parse_toml(text, path).get("superlink", {}).get(federation.name) != entry:
        raise DeployError(f"{path}: could not add [superlink.{federation.name}]; remove that entry and re-run")
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.medfed")
    staged.write_text(text, encoding="utf-8")
    staged.replace(path)
    return path


def _flower_default_config() -> str:
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    return DEFAULT_FLOWER_CONFIG_TOML


def _parse_toml(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise DeployError(f"{path}: invalid TOML ({error}); fix the file and re-run") from None


def _without_table(text: str, table: str, path: Path) -> str:
    """``text`` without the TOML table ``[table]`` and its sub-tables (header line to the next other header)."""
    header = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
    kept, inside, found = [], False, False
    for line in text.splitlines(keepends=True):
        match = header.match(line)
        if match:
            key = match.group(1).replace(" ", "")
            inside = key == table or key.startswith(f"{table}.")
            found = found or inside
        if not inside:
            kept.append(line)
    if not found:
        raise DeployError(f"{path}: [{table}] is not written as a table header; remove it by hand and re-run")
    return "".join(kept)


# --- the commands each machine runs ----------------------------------------------------------------------------
def superlink_command(federation: Federation, *, host: str = "0.0.0.0", database: Path | None = None) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and no runtime installs, on the federation's port."""
    return ["flower-superlink",
            "--ssl-ca-certfile", str(federation.path(CA_CERT)),
            "--ssl-certfile", str(federation.path(SERVER_CERT)),
            "--ssl-keyfile", str(federation.path(SERVER_KEY)),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(federation.port),
            "--database", str(database or federation.path(DATABASE))]


def register_command(federation: Federation, hospital: Hospital) -> list[str]:
    """``flwr supernode register`` of the hospital's public key at the federation's SuperLink."""
    return ["flwr", "supernode", "register", str(federation.public_key(hospital)), federation.name,
            "--name", hospital.name]


def supernode_command(federation: Federation, hospital: Hospital, *, files: Path | None = None,
                      data_path: str | None = None, runtime_port: int = RUNTIME_PORT) -> list[str]:
    """``flower-supernode`` for ``hospital``: dials the SuperLink over TLS and authenticates with its key.

    Args:
        files: the folder holding ``ca.crt`` and the hospital's private key (None: the current directory).
        data_path: the hospital's own data folder, passed as node config ``data-path``.
        runtime_port: the node's local Runtime API port (distinct per node on one machine).
    """
    folder = (lambda file: str(files / file)) if files else (lambda file: file)
    node_config = f"partition-id={hospital.partition_id} num-partitions={len(federation.hospitals)}"
    if data_path:
        node_config += f' data-path="{data_path}"'
    command = ["flower-supernode", "--superlink", federation.address,
               "--root-certificates", folder(CA_CERT),
               "--auth-supernode-private-key", folder(hospital.name),
               "--node-config", node_config]
    return command if runtime_port == RUNTIME_PORT else [*command, "--port", str(runtime_port)]


def environment_line() -> str:
    """The ``export`` line every machine needs before starting Flower: no telemetry, no update checks, no
    runtime dependency installation."""
    return "export " + " ".join(f"{key}={value}" for key, value in FLOWER_ENVIRONMENT.items())


def commands_text(federation: Federation) -> str:
    """Step-by-step commands for the coordinating site and every hospital, ready to copy."""
    count = len(federation.hospitals)
    lines = [
        f"# Federation '{federation.name}': SuperLink at {federation.address}, {count} hospitals, "
        f"files in {federation.folder}",
        "",
        "# 1. Every machine (coordinating site and hospitals), in the shell that starts Flower:",
        environment_line(),
        "",
        f"# 2. Coordinating site: start the SuperLink (inbound TCP {federation.port} open to the hospitals only):",
        shlex.join(superlink_command(federation)),
        "",
        "# 3. Coordinating site, once the SuperLink runs: register every hospital's public key",
        f"#    (or: medfed deploy register {federation.name})",
        *(shlex.join(register_command(federation, hospital)) for hospital in federation.hospitals),
    ]
    for step, hospital in enumerate(federation.hospitals, start=4):
        data_variant = supernode_command(federation, hospital, data_path="/path/to/local/data")
        lines += [
            "",
            f"# {step}. {hospital.name} (partition {hospital.partition_id}): copy {CA_CERT} and {hospital.name} "
            f"(its private key, nothing else) from {federation.folder} to that machine; in that folder run:",
            shlex.join(supernode_command(federation, hospital)),
            "#    or, with the hospital's own data folder:",
            "#    " + shlex.join(data_variant),
        ]
    lines += [
        "",
        "# Then, at the coordinating site:",
        f"medfed deploy status {federation.name}",
        f"medfed run SCENARIO.yaml --engine deployment --federation {federation.name} "
        f"--set partition.clients={count}",
    ]
    return "\n".join(lines)


# --- the Flower CLI ------------------------------------------------------------------------------------------
def flower_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) with :data:`FLOWER_ENVIRONMENT` (user settings win) and this
    Python environment's ``bin`` first on ``PATH``: Flower starts ``flower-superexec``, ``flwr-serverapp`` and
    ``flwr-clientapp`` by name."""
    environment = dict(os.environ if base is None else base)
    for key, value in FLOWER_ENVIRONMENT.items():
        environment.setdefault(key, value)
    environment["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), environment.get("PATH")]))
    return environment


def flwr_json(arguments: Sequence[str], federation: Federation) -> dict[str, Any]:
    """Run ``flwr ARGUMENTS --format json``; the parsed reply, or :class:`SuperLinkError` with Flower's reason."""
    try:
        result = subprocess.run(["flwr", *arguments, "--format", "json"], env=flower_environment(),
                                capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False)
    except FileNotFoundError:
        raise DeployError("the Flower CLI 'flwr' is not installed in this environment (pip install -e .)") from None
    except subprocess.TimeoutExpired:
        raise SuperLinkError(f"federation {federation.name} ({federation.address}): 'flwr {arguments[0]}' got no "
                              f"answer in {CLI_TIMEOUT:.0f} s") from None
    reply = _json_object(result.stdout)
    if reply is None:
        reason = _last_line(result.stderr or result.stdout) or f"exit status {result.returncode}"
        raise SuperLinkError(f"federation {federation.name}: 'flwr {arguments[0]}' failed: {reason}")
    if not reply.get("success"):
        raise SuperLinkError(f"federation {federation.name} ({federation.address}): "
                              f"{_last_line(reply.get('error-message', ''))}")
    return reply


def _json_object(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def register(federation: Federation, report: Callable[[str], None] = print) -> Federation:
    """Register every hospital's public key at the running SuperLink and remember the node ids.

    A key registered before is reported as such. Returns the federation with the node ids (also saved).
    """
    hospitals = []
    for hospital in federation.hospitals:
        try:
            node_id = int(flwr_json(register_command(federation, hospital)[1:], federation)["node-id"])
            report(f"{hospital.name}: registered as node {node_id}")
            hospital = replace(hospital, node_id=node_id)
        except SuperLinkError as error:
            if ALREADY_REGISTERED_CODE not in str(error):
                raise
            report(f"{hospital.name}: already registered" + (f" (node {hospital.node_id})" if hospital.node_id else ""))
        hospitals.append(hospital)
    federation = replace(federation, hospitals=tuple(hospitals))
    federation.save()
    return federation


@dataclass(frozen=True)
class NodeStatus:
    """One row of ``medfed deploy status``."""

    hospital: str
    node_id: int | None
    status: str  # online | offline | registered (never connected) | not registered | unknown
    since: str


def node_statuses(federation: Federation) -> list[NodeStatus]:
    """Every hospital's status at the SuperLink (``flwr supernode ls``), then nodes the federation folder does
    not know (registered by hand)."""
    listing = flwr_json(["supernode", "ls", federation.name], federation)["nodes"]
    nodes = {int(node["node-id"]): node for node in listing}
    rows = []
    for hospital in federation.hospitals:
        node = nodes.pop(hospital.node_id, None) if hospital.node_id is not None else None
        rows.append(_status_row(hospital.name, hospital.node_id, node))
    rows += [_status_row(UNKNOWN_HOSPITAL, node_id, node) for node_id, node in nodes.items()]
    return rows


def _status_row(hospital: str, node_id: int | None, node: Mapping[str, Any] | None) -> NodeStatus:
    if node is None:
        return NodeStatus(hospital, node_id, "unknown" if node_id else "not registered", "")
    status = str(node.get("status", "unknown"))
    since = {"online": node.get("online-at"), "offline": node.get("offline-at")}.get(status) or node.get("created-at")
    return NodeStatus(hospital, node_id, status, str(since or ""))


# --- launching a scenario ------------------------------------------------------------------------------------
def app_directory() -> Path:
    """The Flower app folder ``flwr run`` builds the FAB from: the source checkout with ``[tool.flwr.app]``."""
    folder = Path(__file__).resolve().parents[1]
    pyproject = folder / "pyproject.toml"
    try:
        has_app = "app" in tomllib.loads(pyproject.read_text(encoding="utf-8")).get("tool", {}).get("flwr", {})
    except (OSError, tomllib.TOMLDecodeError):
        has_app = False
    if not has_app:
        raise DeployError(f"{pyproject}: no Flower app ([tool.flwr.app]); deployment needs medfed's source "
                          "checkout installed with pip install -e .")
    return folder


def deployed_scenario(scenario: Scenario, federation: Federation) -> Scenario:
    """A copy of ``scenario`` for ``federation``: ``engine.backend: deployment`` and an absolute ``output.dir``.

    The ServerApp runs where the SuperLink runs, in its working directory, so a relative ``output.dir`` is resolved
    here (launch at the coordinating site, or give a path that is valid there).

    Raises:
        DeployError: ``partition.clients`` differs from the number of hospitals (the run would wait for nodes
            that do not exist).
    """
    count = len(federation.hospitals)
    if scenario.partition.clients != count:
        raise DeployError(f"partition.clients is {scenario.partition.clients} but federation '{federation.name}' "
                          f"has {count} hospitals; add --set partition.clients={count}")
    deployed = scenario.model_copy(deep=True)
    deployed.engine.backend = "deployment"
    deployed.output.dir = str(Path(scenario.output.dir).expanduser().resolve())
    return deployed


@dataclass(frozen=True)
class LaunchedRun:
    """A finished deployed run: its Flower run id, final status and run directory (None if it was not logged)."""

    run_id: int
    status: str
    run_directory: Path | None


def launch(scenario: Scenario, federation: Federation, *, resume: Path | None = None,
           echo: Callable[[str], None] = print) -> LaunchedRun:
    """Run ``scenario`` (already :func:`deployed_scenario`) on the federation through ``flwr run``.

    With ``resume`` (a run directory on the SuperLink's machine) the ServerApp continues that run from its last
    checkpoint instead of starting a new one. The ServerApp's log is passed to ``echo`` line by line. Ctrl-C
    stops the run at the SuperLink.

    Raises:
        SuperLinkError: the SuperLink refused the run or is unreachable, or the run did not complete.
    """
    with tempfile.TemporaryDirectory(prefix="medfed-run-") as folder:
        run_config = Path(folder) / "run-config.toml"
        run_config.write_text(run_config_toml(scenario, resume), encoding="utf-8")
        command = ["flwr", "run", str(app_directory()), federation.name, "--stream", "--run-config", str(run_config)]
        run_id, run_directory = _stream(command, echo, federation)
    status, details = _final_status(run_id, federation)
    if status != "finished:completed":
        raise SuperLinkError(f"run {run_id} ended {status}" + (f": {details}" if details else ""))
    return LaunchedRun(run_id, status, run_directory)


def run_config_toml(scenario: Scenario, resume: Path | None = None) -> str:
    """The ``flwr run --run-config`` file that ships ``scenario`` (TOML escapes what a command line could not),
    and the run directory to continue, if any."""
    import tomli_w

    config = {SCENARIO_JSON_KEY: scenario.to_json()}
    if resume is not None:
        config[RESUME_KEY] = str(resume)
    return tomli_w.dumps(config)


def _stream(command: list[str], echo: Callable[[str], None], federation: Federation) -> tuple[int, Path | None]:
    """Run ``flwr run --stream``, echo its output, and return (run id, run directory named in the log)."""
    run_id, run_directory, last = None, None, ""
    process = subprocess.Popen(command, env=flower_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            line = line.rstrip("\n")
            echo(line)
            last = line.strip() or last
            run_id = run_id or _run_id_in(line)
            if RUN_DIRECTORY_PREFIX in line:
                run_directory = Path(line.split(RUN_DIRECTORY_PREFIX, 1)[1].strip())
        process.wait()
    except KeyboardInterrupt:
        process.wait()
        if run_id is not None:
            subprocess.run(["flwr", "stop", str(run_id), federation.name], env=flower_environment(),
                           capture_output=True, timeout=CLI_TIMEOUT, check=False)
        raise
    if run_id is None:
        raise SuperLinkError(f"federation {federation.name}: flwr run did not start a run: "
                             f"{last or f'exit status {process.returncode}'}")
    return run_id, run_directory


def _run_id_in(line: str) -> int | None:
    match = re.search(r"Successfully started run (\d+)", line)
    return int(match.group(1)) if match else None


def _final_status(run_id: int, federation: Federation) -> tuple[str, str]:
    """(status, status details) once the run is finished (its log stream can end a moment earlier)."""
    deadline = time.monotonic() + FINAL_STATUS_TIMEOUT
    while True:
        run = flwr_json(["ls", federation.name, "--run-id", str(run_id)], federation)["runs"][0]
        status = str(run.get("status", ""))
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, _last_line(str(run.get("status-details") or ""))
        time.sleep(1.0)


# --- medfed deploy ... handlers ------------------------------------------------------------------------------
def command_init(args: argparse.Namespace) -> int:
    """``medfed deploy init NAME --address HOST:PORT [--address ...] (--hospitals N | --hospital NAME ...)``."""
    if bool(args.hospitals) == bool(args.hospital):
        raise DeployError("give either --hospitals N or one --hospital NAME per hospital")
    names = args.hospital or [f"hospital-{k}" for k in range(args.hospitals)]
    federation = init_federation(args.name, args.address, names, folder=Path(args.dir) if args.dir else None,
                                 force=args.force)
    print(f"federation {federation.name}: {len(names)} hospitals, SuperLink at {', '.join(federation.addresses)}")
    print(f"files: {federation.folder} (CA, server certificate, one key pair per hospital)")
    print(f"Flower CLI connection [superlink.{federation.name}] in {flower_home() / 'config.toml'}")
    print(f"next: medfed deploy commands {args.dir or federation.name}")
    return 0


def command_commands(args: argparse.Namespace) -> int:
    """``medfed deploy commands NAME``: print every machine's commands."""
    print(commands_text(find_federation(args.name)))
    return 0


def command_register(args: argparse.Namespace) -> int:
    """``medfed deploy register NAME``: register every hospital at the running SuperLink."""
    register(find_federation(args.name))
    return 0


def command_status(args: argparse.Namespace) -> int:
    """``medfed deploy status NAME``: a table of the hospitals' nodes; exit 0 only if every hospital is online."""
    from rich.console import Console
    from rich.table import Table

    federation = find_federation(args.name)
    rows = node_statuses(federation)
    table = Table(title=f"federation {federation.name} ({federation.address})")
    for column in ("hospital", "node id", "status", "since"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.hospital, str(row.node_id or ""), row.status, row.since)
    Console(width=max(100, Console().width)).print(table)
    online = sum(row.status == "online" for row in rows if row.hospital != UNKNOWN_HOSPITAL)
    print(f"{online} of {len(federation.hospitals)} hospitals online")
    return 0 if online == len(federation.hospitals) else 1
