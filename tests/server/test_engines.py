"""Engines end cleanly: a private Ray instance, one line within seconds when the engine fails, no hook noise."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.cli import main
from server.engines import simulation_backend_config
from server.scenario import load
from tests.helpers import QUICKSTART, ROOT, SMALL, run, small_scenario

HOOK_WARNING = "Full backward hook is firing"


def test_dpsgd_round_emits_no_backward_hook_warning(tmp_path: Path) -> None:
    scenario = load(ROOT / "scenarios" / "tabular-dp-eps4.yaml", [
        "partition.clients=2", "data.samples_per_client=40", "data.server_samples=20", "strategy.rounds=2",
        "strategy.min_clients=2", "strategy.fraction_evaluate=1.0", "privacy.params={noise_multiplier: 1.0, delta: 1.0e-5, max_grad_norm: 1.0}",
        f"output.dir={tmp_path}",
    ])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, in every round, not only the first
        records = run(scenario).read_metrics()
    assert [r["round"] for r in records if r["phase"] == "train"] == [1, 2]  # two DP-SGD rounds ran
    hook_warnings = [str(w.message) for w in caught if HOOK_WARNING in str(w.message)]
    assert hook_warnings == []


# --- the simulation engine ------------------------------------------------------------------------------
def medfed_command(out: Path, *overrides: str) -> list[str]:
    """``medfed run`` of the small quickstart on the simulation engine, as a new process."""
    sets = [f"--set={item}" for item in (*SMALL, f"output.dir={out}", "engine.backend=simulation", *overrides)]
    return [sys.executable, "-m", "server.cli", "run", str(QUICKSTART), *sets]


def run_lines(stderr: str) -> list[str]:
    """What ``medfed run`` printed besides its two opening lines (scenario, run directory)."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(("medfed: quickstart |", "run directory:"))]


def test_an_engine_failure_ends_the_run_at_once_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capfd: pytest.CaptureFixture[str]) -> None:
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise ValueError("no Ray\nfor this test")

    monkeypatch.setattr(ray, "init", refuse)
    threads = set(threading.enumerate())
    started = time.monotonic()
    code = main(["run", str(QUICKSTART), *[f"--set={item}" for item in SMALL], f"--set=output.dir={tmp_path}",
                 "--set=engine.backend=simulation"])
    assert code == 1
    assert time.monotonic() - started < 30  # not the discovery timeout (600 s)
    lines = run_lines(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert "the simulation engine failed: ValueError: no Ray for this test" in lines[0]
    deadline = time.monotonic() + 10  # the ServerApp thread and Flower's threads end too
    while {t for t in threading.enumerate() if t.is_alive()} - threads and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not {t.name for t in threading.enumerate() if t.is_alive()} - {t.name for t in threads}


def test_the_ray_init_arguments_ask_for_a_private_instance(tmp_path: Path) -> None:
    config = simulation_backend_config(small_scenario(tmp_path, "engine.workers=3").engine)
    assert config["init_args"]["address"] == "local"  # never join a running cluster unasked
    assert config["init_args"]["num_cpus"] == 3 * config["client_resources"]["num_cpus"]


def test_each_client_asks_ray_for_its_gpu_share_and_ray_for_the_workers_total(tmp_path: Path) -> None:
    default = simulation_backend_config(small_scenario(tmp_path, "engine.workers=3").engine)
    assert default["client_resources"]["num_gpus"] == 0 and default["init_args"]["num_gpus"] == 0  # as before
    shared = simulation_backend_config(small_scenario(tmp_path, "engine.workers=3", "engine.gpus_per_client=0.5").engine)
    assert shared["client_resources"]["num_gpus"] == 0.5
    assert shared["init_args"]["num_gpus"] == 2  # ⌈3 · 0.5⌉: three clients at once on two GPUs
    tenth = simulation_backend_config(small_scenario(tmp_path, "engine.workers=30", "engine.gpus_per_client=0.1").engine)
    assert tenth["init_args"]["num_gpus"] == 3  # not ⌈3.0000000000000004⌉


def process_group(pgid: int) -> list[int]:
    """The pids of process group ``pgid`` still running (zombies excluded)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def wait_until_gone(pgid: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while process_group(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return process_group(pgid)


def stop_group(pgid: int) -> None:
    """End process group ``pgid`` (one this test started in a session of its own), and nothing else."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        if not wait_until_gone(pgid, 5):
            return


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """A short private directory for Ray's sockets and address file (never the machine's /tmp/ray)."""
    directory = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process groups are read from /proc")
def test_a_running_ray_cluster_does_not_break_the_default_engine(tmp_path: Path, ray_tmpdir: Path) -> None:
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir)}  # `ray start` writes its address there: medfed would join it
    ray_bin = Path(sys.executable).parent / "ray"
    cluster = subprocess.Popen([str(ray_bin), "start", "--head", "--port=0", "--num-cpus=1", "--include-dashboard=false",
                                "--disable-usage-stats", "--block"], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 40
        while not (ray_tmpdir / "ray" / "ray_current_cluster").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (ray_tmpdir / "ray" / "ray_current_cluster").exists(), "the test's Ray cluster did not start"
        result = subprocess.run(medfed_command(tmp_path, "strategy.rounds=1"), env=env, capture_output=True,
                                text=True, timeout=120, start_new_session=True)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "When connecting to an existing cluster" not in result.stderr
        assert cluster.poll() is None  # the cluster that was there is left alone
    finally:
        stop_group(cluster.pid)


def first_file(folder: Path, pattern: str, seconds: float) -> Path | None:
    """The first file under ``folder`` matching ``pattern``, waiting up to ``seconds`` for it."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.1)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process groups are read from /proc")
def test_ctrl_c_on_the_simulation_engine_is_one_line_and_ends_every_process(tmp_path: Path) -> None:
    command = medfed_command(tmp_path, "strategy.rounds=50")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group, as a terminal's foreground job
    try:  # in round 1: Ray, its actors and Flower's worker threads all running
        assert first_file(tmp_path, "*/*/partitions.json", 120) is not None, "the run did not reach round 1"
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        _, stderr = process.communicate(timeout=30)  # never the hang at exit of Flower's blocked threads
        assert process.returncode == 130
        assert "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]
        lines = run_lines(stderr)
        assert lines[-1].startswith("medfed: interrupted; "), lines
        assert wait_until_gone(process.pid, 15) == []  # Ray's processes ended with the run
    finally:
        stop_group(process.pid)
