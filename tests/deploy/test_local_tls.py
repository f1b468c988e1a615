"""The Deployment Engine on this machine: a SuperLink and two SuperNodes as separate processes on 127.0.0.1, with
TLS and SuperNode authentication, set up with ``medfed deploy`` and run with ``medfed run --engine deployment``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from server.credentials import write_hospital_key
from server.results import RunDirectory
from tests.deploy.federation import (
    TWO_SMALL_ROUNDS,
    LocalFederation,
    assert_same_run,
    last_checkpoint_round,
    run_deployed,
    run_inprocess,
    timing_report,
)

pytestmark = pytest.mark.slow

REFUSAL_TIMEOUT = 30.0  # seconds; measured: an unregistered SuperNode exits after 1.7 s
RUN_TIMEOUT = 300.0  # seconds for a few small deployed rounds (measured: about 35 s a round)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    with LocalFederation(tmp_path_factory.mktemp("federation")) as started:
        yield started.start()


def test_a_two_round_scenario_writes_the_inprocess_engines_run_directory(
        federation: LocalFederation, tmp_path: Path, record_property) -> None:
    deployed = run_deployed(federation, tmp_path / "deployed")
    local = run_inprocess(tmp_path / "inprocess")
    for key, value in timing_report(deployed, local).items():
        record_property(key, value)
        print(f"{key}: {value}")
    assert yaml.safe_load((deployed.run_dir.path / "scenario.yaml").read_text())["engine"]["backend"] == "deployment"
    assert_same_run(deployed.run_dir, local)


def test_an_unregistered_node_is_refused_and_the_registered_ones_stay_online(
        federation: LocalFederation, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    write_hospital_key(stranger, "stranger")

    party = federation.start_node(2, private_key=stranger, wait=False)
    try:
        code = party.process.wait(timeout=REFUSAL_TIMEOUT)
    finally:
        party.stop()
    assert code != 0
    assert "Failed to activate SuperNode" in party.log_text()
    status = federation.medfed("deploy", "status", str(federation.federation.folder), timeout=60)
    assert status.returncode == 0, status.stdout
    assert "2 of 2 hospitals online" in status.stdout


def test_a_failing_serverapp_exits_1_with_flowers_reason(federation: LocalFederation, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # output.dir below a file: the ServerApp cannot create the run directory
    result = federation.medfed("run", "--engine", "deployment", "--federation", str(federation.federation.folder),
                               *federation.quickstart_sets(["partition.clients=2", f"output.dir={blocker / 'runs'}"]),
                               timeout=120)
    assert result.returncode == 1, result.stdout[-3000:]
    errors = [line for line in result.stdout.splitlines() if line.startswith("medfed: error: ")]
    assert len(errors) == 1 and "ended finished:failed: ServerApp failed" in errors[0], result.stdout[-3000:]
    print(errors[0])


def test_a_run_whose_serverapp_died_is_resumed_from_its_last_checkpoint(
        federation: LocalFederation, tmp_path: Path) -> None:
    output, log, folder = tmp_path / "runs", tmp_path / "first.log", str(federation.federation.folder)
    overrides = [*TWO_SMALL_ROUNDS, f"output.dir={output}"]
    launcher = federation.start_medfed("run", "--engine", "deployment", "--federation", folder,
                                       *federation.quickstart_sets(overrides), log=log)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while last_checkpoint_round(output) < 1:
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.5)
        federation.kill_serverapp()
        assert launcher.wait(timeout=RUN_TIMEOUT) == 1  # the launcher reports the failed run
    finally:
        if launcher.poll() is None:
            launcher.kill()
    run_dir = RunDirectory.open(next(output.glob("*/*")))
    before = run_dir.read_metrics()
    assert {record["round"] for record in before} == {1}  # killed in round 2

    resumed = federation.medfed("run", "--resume", str(run_dir.path), "--engine", "deployment",
                                "--federation", folder, timeout=RUN_TIMEOUT)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    records = run_dir.read_metrics()
    assert [r["round"] for r in records if r["phase"] == "train"] == [1, 2]
    assert records[:len(before)] == before  # round 1 as first written, once
    assert yaml.safe_load((run_dir.path / "summary.json").read_text())["rounds_completed"] == 2
