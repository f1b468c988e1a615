"""The Flower CLI at the coordinating site: its connection to a federation's SuperLink, and ``flwr`` calls.

:func:`write_connection` adds the connection ``[superlink.NAME]`` (address, root certificates) to
``$FLWR_HOME/config.toml``, which ``flwr run``, ``flwr ls``, ``flwr supernode ...`` then name. :func:`flwr_json`
runs one ``flwr ... --format json`` command and turns Flower's failures into :class:`SuperLinkError`.

Every Flower process started by medfed runs with :func:`flower_environment`: telemetry, update checks and runtime
dependency installation off, and the Python environment's ``bin`` first on ``PATH`` (Flower starts its helper
processes by name).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.federation_folder import (
    CA_CERT,
    DeployError,
    FederationFolder,
    SuperLinkError,
)

FLOWER_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # a SuperExec looks for a new message's task every 0.1 s, not 1 s
}
CLI_TIMEOUT = 60.0  # seconds for one `flwr ... --format json` call


# --- the connection in config.toml ---------------------------------------------------------------------------
def flower_home() -> Path:
    """The Flower CLI's home: ``$FLWR_HOME`` or ``~/.flwr``."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr").expanduser()


def write_connection(federation: FederationFolder, flwr_home: Path) -> Path:
    """Add or replace ``[superlink.NAME]`` (address, root certificates) in ``flwr_home/config.toml``.

    Every other line of the file is kept as it is. A missing file starts from Flower's own default
    configuration, so ``flwr run .`` keeps its local default connection.

    Parameters
    ----------
    federation : FederationFolder
        The federation whose name, address and CA certificate the connection gets.
    flwr_home : Path
        The Flower CLI's home.

    Returns
    -------
    Path
        The ``config.toml`` written.

    Raises
    ------
    DeployError
        The existing ``config.toml`` is not valid TOML, or its entry for the federation cannot be replaced.
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


# --- running flwr --------------------------------------------------------------------------------------------
def flower_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start a Flower process with.

    Parameters
    ----------
    base : Mapping[str, str], optional
        The environment to start from (default: this process's environment).

    Returns
    -------
    dict[str, str]
        ``base`` with :data:`FLOWER_ENVIRONMENT` (settings already in ``base`` win) and this Python
        environment's ``bin`` first on ``PATH``: Flower starts ``flower-superexec``, ``flwr-serverapp`` and
        ``flwr-clientapp`` by name.
    """
    environment = dict(os.environ if base is None else base)
    for key, value in FLOWER_ENVIRONMENT.items():
        environment.setdefault(key, value)
    environment["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), environment.get("PATH")]))
    return environment


def flwr_json(arguments: Sequence[str], federation: FederationFolder) -> dict[str, Any]:
    """Run ``flwr ARGUMENTS --format json`` against ``federation``'s SuperLink.

    Parameters
    ----------
    arguments : Sequence[str]
        The ``flwr`` subcommand and its arguments (the connection name among them).
    federation : FederationFolder
        The federation the call goes to (named in error messages).

    Returns
    -------
    dict[str, Any]
        The parsed JSON reply.

    Raises
    ------
    DeployError
        ``flwr`` is not installed.
    SuperLinkError
        No answer within :data:`CLI_TIMEOUT`, no JSON reply, or a reply without success (Flower's reason).
    """
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
        reason = last_line(result.stderr or result.stdout) or f"exit status {result.returncode}"
        raise SuperLinkError(f"federation {federation.name}: 'flwr {arguments[0]}' failed: {reason}")
    if not reply.get("success"):
        raise SuperLinkError(f"federation {federation.name} ({federation.address}): "
                              f"{last_line(reply.get('error-message', ''))}")
    return reply


def _json_object(text: str) -> dict[str, Any] | None:
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


def last_line(text: str) -> str:
    """The last non-blank line of ``text``, stripped (``""`` if there is none): Flower's reason for a failure."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""
