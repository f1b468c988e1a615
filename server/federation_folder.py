"""The federation folder: everything the coordinating site of a deployed federation needs, on disk.

A federation folder (default ``~/.medfed/deploy/NAME``, or ``$MEDFED_DEPLOY_HOME/NAME``) holds:

* ``ca.crt`` / ``ca.key``: the federation's own certificate authority (ECDSA P-384; :mod:`server.credentials`
  makes the certificates and keys);
* ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by that CA, whose subject alternative
  names are every address the hospitals dial plus 127.0.0.1 (the SuperLink's own SuperExec dials it);
* ``hospital-K`` / ``hospital-K.pub``: one SuperNode authentication key pair per hospital (ECDSA P-384, OpenSSH
  format); only registered public keys may join;
* ``federation.json``: name, SuperLink address(es), hospitals with their partition ids and, once registered,
  their node ids; ``superlink.db`` is the SuperLink's database (registrations survive restarts).

Private keys are written with mode 0600, the folder with mode 0700. :class:`FederationFolder` reads and writes
the manifest; :func:`create_federation_folder` writes a new folder (:func:`server.federation_setup.init_federation`
also adds the Flower CLI connection). This module is the base of the deployment modules
(:mod:`server.flower_cli`, :mod:`server.federation_setup`, :mod:`server.launch`, :mod:`server.deploy`), so it
also holds their two error types.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from server.credentials import (
    certificate_pem,
    is_ip,
    make_ca,
    make_server_certificate,
    private_key_pem,
    write_file,
    write_hospital_key,
)

MANIFEST, CA_CERT, CA_KEY = "federation.json", "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY, DATABASE = "server.pem", "server.key", "superlink.db"
LOOPBACK = "127.0.0.1"  # the SuperLink's SuperExec dials it when the SuperLink binds 0.0.0.0
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")  # also a bare TOML key and a file name


class DeployError(Exception):
    """Invalid input or setup (exit code 2); ``str(error)`` is one line."""

    exit_code = 2


class SuperLinkError(DeployError):
    """The SuperLink refused, is unreachable, or a run failed (exit code 1)."""

    exit_code = 1


@dataclass(frozen=True)
class Hospital:
    """One site: its name (also its key files' name), its partition id and, once registered, its node id."""

    name: str
    partition_id: int
    node_id: int | None = None


@dataclass(frozen=True)
class FederationFolder:
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
    def load(cls, folder: Path) -> FederationFolder:
        """Read ``folder/federation.json``.

        Raises
        ------
        DeployError
            The manifest is missing or malformed.
        """
        try:
            manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
            return cls(name=manifest["name"], folder=folder.resolve(), addresses=tuple(manifest["addresses"]),
                       hospitals=tuple(Hospital(**hospital) for hospital in manifest["hospitals"]))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise DeployError(f"{folder / MANIFEST}: not a readable federation manifest ({error})") from None


def deploy_home() -> Path:
    """Where named federation folders live: ``$MEDFED_DEPLOY_HOME`` or ``~/.medfed/deploy``."""
    return Path(os.environ.get("MEDFED_DEPLOY_HOME") or Path.home() / ".medfed" / "deploy").expanduser()


def find_federation(reference: str) -> FederationFolder:
    """The federation named ``reference`` (in :func:`deploy_home`), or the federation folder at that path.

    Raises
    ------
    DeployError
        No federation folder by that name or at that path.
    """
    folder = Path(reference).expanduser()
    if not (folder / MANIFEST).is_file():
        if not NAME_PATTERN.match(reference):
            raise DeployError(f"no federation folder at {folder} (no {MANIFEST})")
        folder = deploy_home() / reference
    if not (folder / MANIFEST).is_file():
        raise DeployError(f"unknown federation '{reference}': no {folder / MANIFEST} "
                          f"(create it with: medfed deploy init {reference} --address HOST:PORT --hospitals N)")
    return FederationFolder.load(folder)


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[IPv6]:PORT``) as (host, port).

    Raises
    ------
    DeployError
        ``address`` is not ``HOST:PORT`` with an IP address or DNS name and a port in 1..65535.
    """
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


def create_federation_folder(name: str, addresses: Sequence[str], hospitals: Sequence[str], *,
                             folder: Path | None = None, force: bool = False) -> FederationFolder:
    """Write a new federation folder: the CA, the SuperLink's certificate, the hospitals' keys and the manifest.

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

    Returns
    -------
    FederationFolder
        The new federation folder (its manifest saved).

    Raises
    ------
    DeployError
        Invalid names or addresses, or an existing folder without ``force``.
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
    federation = FederationFolder(name, folder, tuple(addresses),
                                  tuple(Hospital(hospital, k) for k, hospital in enumerate(hospitals)))
    _write_credentials(federation, hosts)
    federation.save()
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


def _write_credentials(federation: FederationFolder, hosts: Sequence[str]) -> None:
    """The CA, the SuperLink's certificate for ``hosts`` + 127.0.0.1, and one key pair per hospital."""
    ca_key, ca_cert = make_ca(f"medfed {federation.name} CA")
    server_key, server_cert = make_server_certificate(ca_key, ca_cert, [*hosts, LOOPBACK])
    write_file(federation.path(CA_KEY), private_key_pem(ca_key), private=True)
    write_file(federation.path(CA_CERT), certificate_pem(ca_cert))
    write_file(federation.path(SERVER_KEY), private_key_pem(server_key), private=True)
    write_file(federation.path(SERVER_CERT), certificate_pem(server_cert))
    for hospital in federation.hospitals:
        write_hospital_key(federation.private_key(hospital), hospital.name)
