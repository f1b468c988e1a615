"""The local SuperLink that ``flwr run .`` starts in the background, found and stopped exactly.

``flwr run .`` (Flower 1.42) starts ``flower-superlink --simulation`` detached, in a session of its own,
on ``127.0.0.1:$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` (39091), with its database in
``$FLWR_HOME/local-superlink/state.db``, and leaves it running after the run. ``medfed superlink stop``
(:func:`stop`) ends that one process, the one whose command line names this ``FLWR_HOME``'s database,
and no other SuperLink of the machine (another user's, a deployment's). Its SuperExec ends with it (Flower
starts it with ``--parent-pid``); a run still going is stopped first with ``flwr stop RUN_ID``, which ends the
run's ``flwr-simulation`` process and its Ray instance (:func:`server.app.stop_ray_on_exit`).

Processes are read from ``/proc`` (Linux).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from server import processes
from server.flower_cli import flower_home

DATABASE = Path("local-superlink") / "state.db"
"""Where, under ``FLWR_HOME``, Flower keeps the local SuperLink's database."""
STOP_TIMEOUT_S = 10.0
"""Seconds a SuperLink gets to stop after SIGTERM before it is killed."""


class LocalSuperLinkError(RuntimeError):
    """The local SuperLink cannot be looked for on this system (no ``/proc``)."""


@dataclass(frozen=True)
class LocalSuperLink:
    """One running local SuperLink: its pid and the port it serves."""

    pid: int
    port: str


def database(flwr_home: Path | None = None) -> Path:
    """The local SuperLink's database under ``flwr_home`` (default: :func:`~server.flower_cli.flower_home`)."""
    return (flwr_home or flower_home()) / DATABASE


def find(flwr_home: Path | None = None, proc: Path = Path("/proc")) -> list[LocalSuperLink]:
    """The running ``flower-superlink`` processes whose ``--database`` is ``flwr_home``'s local database.

    Raises
    ------
    LocalSuperLinkError
        ``proc`` does not exist (not Linux).
    """
    if not proc.is_dir():
        raise LocalSuperLinkError(f"{proc} does not exist: medfed finds the local SuperLink through it (Linux only)")
    wanted = database(flwr_home).resolve()
    found = []
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
            if not _is_superlink(argv):
                continue
            given = Path(_option(argv, "--database") or "")
            if not given.is_absolute():  # Flower passes FLWR_HOME as it was set: relative to that process's cwd
                given = (cmdline.parent / "cwd").readlink() / given
        except OSError:  # the process ended meanwhile, or belongs to a user we may not read
            continue
        if given.resolve() == wanted:
            found.append(LocalSuperLink(pid=int(cmdline.parent.name), port=_option(argv, "--port") or "?"))
    return sorted(found, key=lambda link: link.pid)


def stop(link: LocalSuperLink, timeout: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM ``link``, SIGKILL after ``timeout`` s; returns whether it was still running when asked to stop."""
    return bool(processes.end([link.pid], timeout))


def _is_superlink(argv: list[str]) -> bool:
    """Whether ``argv`` runs ``flower-superlink`` (directly, or as ``python .../flower-superlink``)."""
    return any(Path(arg).name == "flower-superlink" for arg in argv[:2])


def _option(argv: list[str], name: str) -> str | None:
    """The value of ``name VALUE`` or ``name=VALUE`` in ``argv``."""
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    return None
