"""This machine's processes, read from ``/proc`` (Linux): who runs, who started whom, and ending them exactly.

medfed stops only processes it can name by pid: the local SuperLink whose database is this ``FLWR_HOME``'s
(:mod:`server.local_superlink`) and the processes of the Ray instance this process started
(:func:`server.engines.shutdown_ray`). Never by name alone: another user's or another run's processes
of the same name are left alone.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path

PROC = Path("/proc")
KILL_WAIT_S = 2.0
"""Seconds :func:`end` waits for a SIGKILLed process to be gone (the kernel ends it at once, but not instantly)."""


def command_line(pid: int, proc: Path = PROC) -> list[str]:
    """``argv`` of ``pid`` (empty when it ended or may not be read)."""
    try:
        return (proc / str(pid) / "cmdline").read_bytes().decode(errors="replace").rstrip("\0").split("\0")
    except OSError:
        return []


def alive(pid: int, proc: Path = PROC) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        state = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def descendants(pid: int, proc: Path = PROC) -> list[int]:
    """The live processes ``pid`` started, and the ones they started, and so on (``pid`` itself not included)."""
    children: dict[int, list[int]] = {}
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    waiting = list(children.get(pid, []))
    while waiting:
        child = waiting.pop()
        found.append(child)
        waiting.extend(children.get(child, []))
    return sorted(found)


def end(pids: Iterable[int], timeout: float, proc: Path = PROC) -> list[int]:
    """SIGTERM each of ``pids`` still alive, SIGKILL those alive ``timeout`` s later; returns the ones signalled."""
    signalled = [pid for pid in pids if alive(pid, proc) and _signal(pid, signal.SIGTERM)]
    wait(signalled, timeout, proc)
    killed = [pid for pid in signalled if alive(pid, proc) and _signal(pid, signal.SIGKILL)]
    wait(killed, KILL_WAIT_S, proc)
    return signalled


def wait(pids: list[int], timeout: float, proc: Path = PROC) -> None:
    """Until none of ``pids`` is alive, or ``timeout`` s passed."""
    deadline = time.monotonic() + timeout
    while any(alive(pid, proc) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)


def _signal(pid: int, number: int) -> bool:
    """Send ``number`` to ``pid``; ``False`` when it ended meanwhile."""
    try:
        os.kill(pid, number)
    except ProcessLookupError:
        return False
    return True
