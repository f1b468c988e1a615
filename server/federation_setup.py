"""Setting up a deployed federation, in the order of docs/deployment.md.

:func:`init_federation` writes the federation folder (:mod:`server.federation_folder`) and the Flower CLI
connection (:mod:`server.flower_cli`); :func:`commands_text` is the step-by-step guide with every machine's exact
start commands (:func:`superlink_command`, :func:`register_command`, :func:`supernode_command`);
:func:`register` registers every hospital's public key at the running SuperLink; :func:`node_statuses` says which
hospitals are online. ``medfed deploy init|commands|register|status`` (:mod:`server.deploy`) print them.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from server.federation_folder import (
    CA_CERT,
    DATABASE,
    SERVER_CERT,
    SERVER_KEY,
    FederationFolder,
    Hospital,
    SuperLinkError,
    create_federation_folder,
)
from server.flower_cli import (
    FLOWER_ENVIRONMENT,
    flower_home,
    flwr_json,
    write_connection,
)

RUNTIME_PORT = 9094  # a SuperNode's local Runtime API (plain HTTP on 127.0.0.1, never leaves the machine)
ALREADY_REGISTERED_CODE = "[code: 23]"  # Flower: "Public key already in use."
UNKNOWN_HOSPITAL = "?"  # a node registered at the SuperLink but not by this federation folder


# --- init ----------------------------------------------------------------------------------------------------
def init_federation(name: str, addresses: Sequence[str], hospitals: Sequence[str], *, folder: Path | None = None,
                    force: bool = False, flwr_home: Path | None = None) -> FederationFolder:
    """Create a federation folder and the Flower CLI connection ``[superlink.NAME]``.

    Parameters
    ----------
    name : str
        The federation (and Flower connection) name.
    addresses : Sequence[str]
        ``HOST:PORT`` of the SuperLink as the hospitals reach it (several names of one machine are fine; they
        must share the port). All hosts go into the server certificate, with 127.0.0.1.
    hospitals : Sequence[str]
        Hospital names; hospital k gets partition id k.
    folder : Path, optional
        Where to write (default ``deploy_home() / name``).
    force : bool, default False
        Replace an existing federation folder (new CA and keys: hospitals must get new files).
    flwr_home : Path, optional
        The Flower CLI's home (default ``$FLWR_HOME`` or ``~/.flwr``).

    Returns
    -------
    FederationFolder
        The new federation folder.

    Raises
    ------
    DeployError
        Invalid names or addresses, an existing folder without ``force``, or a Flower CLI configuration that
        cannot be updated.
    """
    federation = create_federation_folder(name, addresses, hospitals, folder=folder, force=force)
    write_connection(federation, flwr_home or flower_home())
    return federation


# --- the commands each machine runs --------------------------------------------------------------------------
def superlink_command(federation: FederationFolder, *, host: str = "0.0.0.0",
                      database: Path | None = None) -> list[str]:
    """``flower-superlink`` with TLS, SuperNode authentication and no runtime installs, on the federation's port."""
    return ["flower-superlink",
            "--ssl-ca-certfile", str(federation.path(CA_CERT)),
            "--ssl-certfile", str(federation.path(SERVER_CERT)),
            "--ssl-keyfile", str(federation.path(SERVER_KEY)),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation",
            "--host", host, "--port", str(federation.port),
            "--database", str(database or federation.path(DATABASE))]


def register_command(federation: FederationFolder, hospital: Hospital) -> list[str]:
    """``flwr supernode register`` of the hospital's public key at the federation's SuperLink."""
    return ["flwr", "supernode", "register", str(federation.public_key(hospital)), federation.name,
            "--name", hospital.name]


def supernode_command(federation: FederationFolder, hospital: Hospital, *, files: Path | None = None,
                      data_path: str | None = None, runtime_port: int = RUNTIME_PORT) -> list[str]:
    """``flower-supernode`` for ``hospital``: dials the SuperLink over TLS and authenticates with its key.

    Parameters
    ----------
    federation : FederationFolder
        The federation the node joins.
    hospital : Hospital
        The hospital the node runs for.
    files : Path, optional
        The folder holding ``ca.crt`` and the hospital's private key (None: the current directory).
    data_path : str, optional
        The hospital's own data folder, passed as node config ``data-path``.
    runtime_port : int, default RUNTIME_PORT
        The node's local Runtime API port (distinct per node on one machine).

    Returns
    -------
    list[str]
        The command line.
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


def commands_text(federation: FederationFolder) -> str:
    """Step-by-step commands for the coordinating site and every hospital, ready to copy."""
    count = len(federation.hospitals)
    lines = [
        (f"# Federation '{federation.name}': SuperLink at {federation.address}, {count} hospitals, "
         f"files in {federation.folder}"),
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
            (f"# {step}. {hospital.name} (partition {hospital.partition_id}): copy {CA_CERT} and {hospital.name} "
             f"(its private key, nothing else) from {federation.folder} to that machine; in that folder run:"),
            shlex.join(supernode_command(federation, hospital)),
            "#    or, with the hospital's own data folder:",
            "#    " + shlex.join(data_variant),
        ]
    lines += [
        "",
        "# Then, at the coordinating site:",
        f"medfed deploy status {federation.name}",
        (f"medfed run SCENARIO.yaml --engine deployment --federation {federation.name} "
         f"--set partition.clients={count}"),
    ]
    return "\n".join(lines)


# --- registration and status at the SuperLink ----------------------------------------------------------------
def register(federation: FederationFolder, report: Callable[[str], None] = print) -> FederationFolder:
    """Register every hospital's public key at the running SuperLink and remember the node ids.

    Parameters
    ----------
    federation : FederationFolder
        The federation whose hospitals to register.
    report : Callable[[str], None], default print
        Gets one line per hospital (a key registered before is reported as such).

    Returns
    -------
    FederationFolder
        The federation with the node ids (also saved to its manifest).

    Raises
    ------
    SuperLinkError
        The SuperLink refused a key for another reason than an earlier registration, or is unreachable.
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


def node_statuses(federation: FederationFolder) -> list[NodeStatus]:
    """Every hospital's status at the SuperLink (``flwr supernode ls``), then nodes the federation folder does
    not know (registered by hand, hospital :data:`UNKNOWN_HOSPITAL`).

    Raises
    ------
    SuperLinkError
        The SuperLink is unreachable or refused the listing.
    """
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
