"""``medfed deploy init|commands|register|status``: the handlers :mod:`server.cli` dispatches to.

Deployment on Flower's Deployment Engine is one SuperLink at the coordinating site and one SuperNode per
hospital. The work is done by:

* :mod:`server.federation_folder`: the federation folder (CA, server certificate, hospital keys, manifest);
* :mod:`server.flower_cli`: the Flower CLI connection ``[superlink.NAME]`` and ``flwr ... --format json`` calls;
* :mod:`server.federation_setup`: ``init``, every machine's start commands, registration, node status;
* :mod:`server.launch`: ``medfed run X.yaml --engine deployment --federation NAME``.

``init`` writes the folder and the Flower CLI connection in ``$FLWR_HOME/config.toml``; ``commands`` prints the
exact start commands for every machine; ``register`` registers every hospital's public key; ``status`` shows which
hospitals are online. Each handler raises :class:`~server.federation_folder.DeployError` (its ``exit_code``) for
:mod:`server.cli` to report in one line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from server.federation_folder import DeployError, find_federation
from server.federation_setup import (
    UNKNOWN_HOSPITAL,
    commands_text,
    init_federation,
    node_statuses,
    register,
)
from server.flower_cli import flower_home


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
