"""The peak memory of a child process and of everything it started, sampled from ``/proc`` (Linux).

``ru_maxrss`` of a child (``os.wait4``, ``getrusage(RUSAGE_CHILDREN)``) cannot be used here: when the child
execs, the kernel keeps the high-water mark of the memory it was forked with, a copy of this process's, which
is hundreds of MiB once a benchmark has run a scenario in-process. ``VmHWM`` in ``/proc/PID/status`` belongs to
the program the child runs. Everything the child started (Ray's daemons and workers) is summed as proportional
set size (``Pss`` in ``/proc/PID/smaps_rollup``: a page shared by n processes counts 1/n in each), so shared
libraries count once.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

SAMPLE_SECONDS = 0.25
PROC = Path("/proc")


@dataclass(frozen=True)
class Peaks:
    """Peak memory of a child process, MiB (None where ``/proc`` could not tell).

    Attributes
    ----------
    process : float or None
        The child's own peak resident memory (``VmHWM``).
    everything : float or None
        The largest total, over the samples, of the proportional set sizes of the child and every process in its
        session (the processes it started, and theirs).
    """

    process: float | None
    everything: float | None


class MemorySampler(threading.Thread):
    """Samples a child's memory every :data:`SAMPLE_SECONDS` until :meth:`finish`.

    Parameters
    ----------
    pid : int
        The child, started as the leader of a new session (``start_new_session=True``).
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self._finished = threading.Event()
        self._own_kib: int | None = None
        self._all_kib: int | None = None

    def run(self) -> None:
        while not self._finished.is_set():
            self.sample()
            self._finished.wait(SAMPLE_SECONDS)

    def sample(self) -> None:
        """Note the child's high-water mark and the total of its session now."""
        own = field_kib(PROC / str(self.pid) / "status", "VmHWM")
        if own is not None:
            self._own_kib = max(own, self._own_kib or 0)
        sizes = [field_kib(PROC / str(pid) / "smaps_rollup", "Pss") for pid in session_members(self.pid)]
        total = sum(size for size in sizes if size is not None)
        if total:
            self._all_kib = max(total, self._all_kib or 0)

    def finish(self) -> Peaks:
        """Stop sampling; the peaks seen."""
        self._finished.set()
        self.join()
        return Peaks(process=_mib(self._own_kib), everything=_mib(self._all_kib))


def session_members(session: int) -> list[int]:
    """The processes whose session id is ``session`` (none where ``/proc`` is missing)."""
    members = []
    for entry in os.listdir(PROC) if PROC.is_dir() else ():
        if entry.isdigit():
            try:
                fields = (PROC / entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:  # it ended meanwhile
                continue
            if len(fields) > 3 and int(fields[3]) == session:  # state, ppid, pgrp, session, ...
                members.append(int(entry))
    return members


def field_kib(path: Path, name: str) -> int | None:
    """The ``name:  N kB`` line of a ``/proc`` file, in KiB (None: no such process, file or line)."""
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{name}:"):
            return int(line.split()[1])
    return None


def _mib(kib: int | None) -> float | None:
    return kib / 1024 if kib is not None else None
