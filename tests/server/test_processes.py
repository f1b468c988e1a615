"""Processes read from /proc: descendants found, ended by pid (SIGKILL for one that ignores SIGTERM); Ray's told apart."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from server import processes
from server.engines import _is_ray, end_ray_processes, ray_processes

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="processes are read from /proc")

# A child that starts a grandchild which ignores SIGTERM, prints its pid, and waits.
PARENT = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE, text=True)
grandchild.stdout.readline()
print(grandchild.pid, flush=True)
time.sleep(600)
"""


def test_descendants_are_found_and_ended_even_when_they_ignore_sigterm() -> None:
    child = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(child.stdout.readline())  # type: ignore[union-attr]
        assert set(processes.descendants(child.pid)) == {grandchild}
        assert {child.pid, grandchild} <= set(processes.descendants(processes.os.getpid()))
        assert processes.command_line(child.pid)[:2] == [sys.executable, "-c"]

        started = time.monotonic()
        assert processes.end([grandchild], timeout=0.5) == [grandchild]
        assert not processes.alive(grandchild)  # SIGTERM ignored: SIGKILL after the timeout
        assert time.monotonic() - started < 5
        assert processes.end([grandchild], timeout=0.5) == []  # already gone: nothing signalled
        assert processes.end([child.pid], timeout=5) == [child.pid]
        child.wait(timeout=5)
        assert not processes.alive(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_zombie_and_an_unknown_pid_are_not_alive(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while processes.alive(child.pid) and time.monotonic() < deadline:  # ended, not yet reaped: a zombie
        time.sleep(0.05)
    assert Path(f"/proc/{child.pid}").exists() and not processes.alive(child.pid)
    child.wait()
    assert not processes.alive(child.pid) and processes.command_line(child.pid) == []
    assert processes.descendants(1, proc=tmp_path) == []  # an empty /proc: nothing found, nothing raised


def test_ray_processes_are_told_apart_by_title_or_package_path() -> None:
    assert _is_ray(["ray::DashboardAgent"])
    assert _is_ray(["/venv/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet", "--node"])
    assert _is_ray(["/usr/bin/python3", "/venv/lib/python3.11/site-packages/ray/_private/log_monitor.py"])
    assert not _is_ray(["/usr/bin/python3", "-c", "from multiprocessing.spawn import spawn_main"])
    assert not _is_ray(["/usr/bin/python3", "train.py", "/data/ray/images"])  # a path argument past the script
    assert not _is_ray([])


def test_ray_processes_that_outlive_the_shutdown_are_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("server.engines.RAY_STOP_TIMEOUT_S", 0.5)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        assert orphan.pid not in ray_processes()  # a python child is not Ray's
        started = time.monotonic()
        end_ray_processes([orphan.pid])
        assert orphan.wait(timeout=5) is not None
        assert time.monotonic() - started < 5
    finally:
        orphan.kill()
        orphan.wait()
