"""``engine.address``: the simulation engine on an existing Ray cluster, with the metrics of the in-process engine.

The slow test starts a real two-node cluster on this machine (a head and a second raylet, each with one CPU),
runs the small quickstart on it and stops both nodes; the fast ones check the Ray arguments and the refusals.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.cli import main
from server.engines import EngineError, reach_cluster, simulation_backend_config
from server.scenario import ScenarioError, load
from tests.helpers import QUICKSTART, SMALL, run, small_scenario, without_timing
from tests.server.test_engines import medfed_command, ray_tmpdir, run_lines, stop_group

__all__ = ["ray_tmpdir"]  # the fixture, imported for the tests below

RAY = Path(sys.executable).parent / "ray"


# --- the Ray arguments ----------------------------------------------------------------------------------
def test_on_a_cluster_ray_joins_it_without_resource_counts_and_clients_keep_theirs(tmp_path: Path) -> None:
    engine = small_scenario(tmp_path, "engine.backend=simulation", "engine.address=10.0.0.5:6379",
                            "engine.cpus_per_client=2", "engine.gpus_per_client=0.5").engine
    config = simulation_backend_config(engine)
    assert config["init_args"]["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in config["init_args"] and "num_gpus" not in config["init_args"]  # Ray refuses them
    assert config["client_resources"] == {"num_cpus": 2, "num_gpus": 0.5}  # what places each client's actor


def test_without_an_address_the_scenario_sent_to_clients_is_unchanged(tmp_path: Path) -> None:
    scenario = small_scenario(tmp_path, "engine.backend=simulation")
    assert scenario.engine.address is None
    assert "address" not in json.loads(scenario.to_json())["engine"]  # bytes_down as before the key existed
    joined = small_scenario(tmp_path, "engine.backend=simulation", "engine.address=auto")
    assert json.loads(joined.to_json())["engine"]["address"] == "auto"


@pytest.mark.parametrize("address", ["auto", "10.0.0.5:6379", "head.example.org:6379", "[::1]:6379"])
def test_a_cluster_address_is_auto_or_host_and_port(tmp_path: Path, address: str) -> None:
    scenario = small_scenario(tmp_path, "engine.backend=simulation", f"engine.address={address}")
    assert scenario.engine.address == address


@pytest.mark.parametrize("address", ["head", "head:port", ":6379", "head:70000", "ray://head:10001", "local"])
def test_a_malformed_cluster_address_is_refused_naming_the_key(tmp_path: Path, address: str) -> None:
    with pytest.raises(ScenarioError, match=r"engine\.address: '.*' is no Ray cluster address \(allowed: auto"):
        small_scenario(tmp_path, "engine.backend=simulation", f"engine.address={address}")


@pytest.mark.parametrize("backend", ["inprocess", "deployment"])
def test_a_cluster_address_for_another_engine_is_refused_in_one_line(
        tmp_path: Path, backend: str, capsys: pytest.CaptureFixture[str]) -> None:
    sets = [f"--set={item}" for item in (*SMALL, f"output.dir={tmp_path}", f"engine.backend={backend}",
                                         "engine.address=auto")]
    assert main(["validate", str(QUICKSTART), *sets]) == 2
    assert main(["run", str(QUICKSTART), *sets]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert f"engine.address: a Ray cluster runs the simulation engine only, not backend '{backend}'" in lines[0]
    assert not any(tmp_path.iterdir())  # no run directory


# --- a cluster that cannot be reached -------------------------------------------------------------------
def closed_port() -> int:
    """A local TCP port where nothing listens (just released by this process)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_cluster_is_one_engine_error_within_seconds() -> None:
    started = time.monotonic()
    with pytest.raises(EngineError, match=r"no Ray cluster answers at .*:1 \(engine.address 127.0.0.1:1; "):
        reach_cluster("127.0.0.1:1", timeout=2)
    assert time.monotonic() - started < 5


def test_an_unreachable_cluster_ends_the_run_at_once_with_one_line(tmp_path: Path,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    started = time.monotonic()
    code = main(["run", str(QUICKSTART), *[f"--set={item}" for item in SMALL], f"--set=output.dir={tmp_path}",
                 "--set=engine.backend=simulation", f"--set=engine.address=127.0.0.1:{port}"])
    assert code == 1
    assert time.monotonic() - started < 30  # not ray.init's retries (about twelve minutes)
    lines = run_lines(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert "the simulation engine failed: no Ray cluster answers at" in lines[0]
    assert f"engine.address 127.0.0.1:{port}; ConnectionRefusedError" in lines[0]


# --- a real two-node cluster ----------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port free on this machine now, for one of the test cluster's servers."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


def start_raylet(env: dict[str, str], *arguments: str) -> subprocess.Popen[bytes]:
    """``ray start ... --block`` with one CPU, in a session of its own (stopped with its process group).

    Every port a second node on the same machine would share with the first is chosen free.
    """
    command = [str(RAY), "start", *arguments, "--num-cpus=1", f"--dashboard-agent-listen-port={free_port()}",
               "--disable-usage-stats", "--block"]
    return subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def alive_nodes(address: str, env: dict[str, str]) -> int:
    """How many nodes ``ray status`` lists as active in the cluster at ``address`` (0 if it does not answer)."""
    try:
        status = subprocess.run([str(RAY), "status", f"--address={address}"], env=env, capture_output=True,
                                text=True, timeout=30).stdout
    except subprocess.TimeoutExpired:
        return 0
    active = status.partition("Active:")[2].partition("Pending:")[0]
    return len(re.findall(r"^\s*\d+ node_[0-9a-f]+\s*$", active, flags=re.MULTILINE))


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail saying ``what`` did not happen within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert condition(), f"{what} within {seconds:g} s"


@contextlib.contextmanager
def two_node_cluster(ray_tmpdir: Path) -> Iterator[tuple[str, dict[str, str], list[subprocess.Popen[bytes]]]]:
    """A Ray head and a second raylet on this machine: (the head's address, the environment, both processes)."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir)}  # never the machine's /tmp/ray
    address_file = ray_tmpdir / "ray" / "ray_current_cluster"
    nodes = [start_raylet(env, "--head", f"--port={free_port()}", "--include-dashboard=false",
                          f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}")]
    try:
        wait_for(address_file.exists, 60, "the head node started")
        address = address_file.read_text().strip()
        nodes.append(start_raylet(env, f"--address={address}"))
        wait_for(lambda: alive_nodes(address, env) == 2, 90, "the second node joined")
        yield address, env, nodes
    finally:
        for node in nodes:
            stop_group(node.pid)


def actor_groups() -> set[int]:
    """The process groups of this machine's running Flower client actors (``ray::ClientAppActor``)."""
    groups = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if cmdline.read_bytes().startswith(b"ray::ClientAppActor"):
                groups.add(os.getpgid(int(cmdline.parent.name)))
    return groups


def run_watching_actors(command: list[str], env: dict[str, str], seconds: float) -> tuple[int, str, set[int]]:
    """Run ``command``; its exit code, its stderr, and the process groups its client actors ran in."""
    groups: set[int] = set()
    with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as process:
        try:
            deadline = time.monotonic() + seconds
            while process.poll() is None and time.monotonic() < deadline:
                groups |= actor_groups()
                time.sleep(0.2)
            _, stderr = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            stop_group(process.pid)
    return process.returncode, stderr, groups


def read_run(out: Path) -> tuple[list[dict], int]:
    """The metrics of the one run under ``out`` and the length of the scenario JSON its messages carried."""
    (run_dir,) = out.glob("*/*/")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return without_timing(metrics), len(load(run_dir / "scenario.yaml").to_json())


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="process groups are read from /proc")
def test_a_two_node_ray_cluster_runs_the_scenario_with_the_in_process_metrics(tmp_path: Path,
                                                                             ray_tmpdir: Path) -> None:
    with two_node_cluster(ray_tmpdir) as (address, env, nodes):
        command = medfed_command(tmp_path / "cluster", "strategy.rounds=2", f"engine.address={address}")
        code, stderr, groups = run_watching_actors(command, env, 240)
        assert code == 0, stderr[-3000:]
        assert f"Ray cluster: {address}" in stderr
        assert groups == {node.pid for node in nodes}  # a client actor on each node: the actors fill the cluster
        assert all(node.poll() is None for node in nodes) and alive_nodes(address, env) == 2  # left running
    cluster, cluster_json = read_run(tmp_path / "cluster")
    reference = run(small_scenario(tmp_path, "strategy.rounds=2"))
    inprocess = without_timing(reference.read_metrics())
    extra = cluster_json - len(load(reference.path / "scenario.yaml").to_json())  # the scenario travels in messages
    assert len(cluster) == len(inprocess) == 6
    for joined, alone in zip(cluster, inprocess):
        assert joined.pop("bytes_down") - alone.pop("bytes_down") == extra * len(alone["clients"])
        assert joined == alone
