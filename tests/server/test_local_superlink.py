"""`medfed superlink stop` ends exactly this FLWR_HOME's local SuperLink; `flwr stop` leaves no Ray behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from server import local_superlink
from server.cli import main
from tests.helpers import QUICKSTART, ROOT, SMALL

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="processes are read from /proc")

STAND_IN = "import time\nwhile True:\n    time.sleep(0.1)\n"


@pytest.fixture
def stand_ins(tmp_path: Path) -> Iterator[list[subprocess.Popen]]:
    """Processes started as ``python .../flower-superlink ARGS`` (a sleeping script by that name); ended after."""
    script = tmp_path / "bin" / "flower-superlink"
    script.parent.mkdir()
    script.write_text(STAND_IN)
    started: list[subprocess.Popen] = []

    def start(*args: str, cwd: Path = tmp_path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, str(script), *args], cwd=cwd)
        started.append(process)
        return process

    yield start  # type: ignore[misc]
    for process in started:
        process.kill()
        process.wait()


def wait_for_cmdline(process: subprocess.Popen) -> None:
    """Until ``/proc/PID/cmdline`` shows the started command (the interpreter replaced the fork)."""
    deadline = time.monotonic() + 10
    while "flower-superlink" not in Path(f"/proc/{process.pid}/cmdline").read_bytes().decode(errors="replace"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_only_the_superlink_of_this_flwr_home_is_stopped(tmp_path: Path, stand_ins, monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    home, other_home = tmp_path / "home", tmp_path / "other"
    ours = stand_ins("--insecure", "--port", "39191", "--database", str(home / "local-superlink" / "state.db"))
    theirs = stand_ins("--port", "39091", "--database", str(other_home / "local-superlink" / "state.db"))
    deployed = stand_ins("--port", "9093")  # a deployment's SuperLink: no local database at all
    for process in (ours, theirs, deployed):
        wait_for_cmdline(process)
    monkeypatch.setenv("FLWR_HOME", str(home))

    assert local_superlink.find() == [local_superlink.LocalSuperLink(pid=ours.pid, port="39191")]
    assert main(["superlink", "stop"]) == 0
    assert capsys.readouterr().out.strip() == f"stopped the local SuperLink (pid {ours.pid}, port 39191)"
    assert ours.wait(timeout=15) is not None
    assert theirs.poll() is None and deployed.poll() is None  # every other SuperLink is left alone

    assert main(["superlink", "stop"]) == 0  # nothing left to stop: said, not an error
    assert "no local SuperLink runs for" in capsys.readouterr().out


def test_a_relative_flwr_home_is_read_from_the_superlinks_working_directory(tmp_path: Path, stand_ins,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    link = stand_ins("--database", ".flwr/local-superlink/state.db", cwd=tmp_path)
    wait_for_cmdline(link)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLWR_HOME", ".flwr")
    assert [found.pid for found in local_superlink.find()] == [link.pid]
    monkeypatch.chdir(tmp_path / "bin")  # the same relative FLWR_HOME from elsewhere names another folder
    assert local_superlink.find() == []


def test_a_system_without_proc_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(local_superlink.LocalSuperLinkError, match="Linux only"):
        local_superlink.find(tmp_path, proc=tmp_path / "proc")


# --- `flwr run .` and `flwr stop` (slow: a real local SuperLink and Ray) ----------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command) of the live (non-zombie) processes of session ``sid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, rest = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        fields = rest.split()
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append((int(stat.parent.name), head.split("(", 1)[1]))
    return found


@pytest.mark.slow
def test_flwr_stop_ends_the_run_with_its_ray_instance_and_superlink_stop_ends_the_rest(tmp_path: Path) -> None:
    flwr = Path(sys.executable).parent / "flwr"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "PATH": f"{flwr.parent}{os.pathsep}{os.environ['PATH']}",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    out = tmp_path / "runs"
    sets = ";".join([*SMALL, "strategy.rounds=200", f"output.dir={out}"])
    started = subprocess.run(
        [str(flwr), "run", ".", "--federation-config", "num-supernodes=4 client-resources-num-cpus=1 init-args-num-cpus=2",
         "--run-config", f"scenario='{QUICKSTART}' set='{sets}'"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = started.stdout.split("Successfully started run")[1].split()[0]
    links = local_superlink.find(tmp_path / "flwr-home")
    assert len(links) == 1
    try:
        deadline = time.monotonic() + 120  # Ray up and the first round under way: a checkpoint is written
        while not list(out.glob("*/*/checkpoints/*")) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert list(out.glob("*/*/checkpoints/*")), "the run did not reach its first checkpoint"
        session = _superexec_session(links[0].pid)
        before = {pid for pid, _ in session_processes(session)}
        assert len(before) > 3  # SuperExec, flwr-simulation and Ray's processes

        stopped = subprocess.run([str(flwr), "stop", run_id], cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=60)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _run_processes(before, links[0].pid):
            time.sleep(0.5)
        assert _run_processes(before, links[0].pid) == []  # flwr-simulation and every Ray process ended
        time.sleep(5)  # and no new Ray instance comes up after them (a thread's ray.get would auto-start one)
        later = {pid for pid, _ in session_processes(session)}
        assert _run_processes(later, links[0].pid) == []
    finally:
        for link in local_superlink.find(tmp_path / "flwr-home"):
            local_superlink.stop(link)
    assert local_superlink.find(tmp_path / "flwr-home") == []


def _superexec_session(superlink: int) -> int:
    """The session of the SuperExec the SuperLink started (Flower detaches it; the run's processes are in it)."""
    for child in Path(f"/proc/{superlink}/task").glob("*/children"):
        for pid in child.read_text().split():
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
    raise AssertionError("the local SuperLink has no SuperExec")


def _run_processes(started: set[int], superlink: int) -> list[tuple[int, str]]:
    """Which of the processes ``started`` (a run's) still live, besides the SuperLink and its SuperExec."""
    keep = {superlink, *(int(pid) for child in Path(f"/proc/{superlink}/task").glob("*/children")
                         for pid in child.read_text().split())}
    alive = []
    for pid in started - keep:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append((pid, Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")[:120]))
    return alive
