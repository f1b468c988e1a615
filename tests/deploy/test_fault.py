"""A hospital's SuperNode crashes (SIGKILL) during round 2 of a deployed run: the SuperLink reports it
unavailable, the round completes with the other hospital, the failure is recorded in metrics.jsonl, the node is
restarted and rejoins a later round with its checkpointed state, and every result file is complete.

The SuperLink counts a crashed node online until two 30 s heartbeats are missed and refuses its restart until
then, so the node is back 20-60 s after the kill, about when round 2 ends: it rejoins round 3 (measured), or 4."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from server.results import RunDirectory
from tests.deploy.federation import (
    TWO_SMALL_ROUNDS,
    LocalFederation,
    StartupError,
    last_checkpoint_round,
)

pytestmark = pytest.mark.slow

FOUR_ROUNDS = [*TWO_SMALL_ROUNDS, "strategy.rounds=4", "strategy.min_clients=1",
                "output.checkpoint_node_state=true"]  # checkpoints hold node state: the returning node gets it back
RUN_TIMEOUT = 480.0  # seconds for the whole run (measured: about 3 minutes)
RESTART_TIMEOUT = 150.0  # a crashed node is refused until the SuperLink has marked it offline (about 45 s)


def wait_for(condition, timeout: float, what: str, launcher: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if launcher.poll() is not None:
            raise AssertionError(f"medfed run ended ({launcher.returncode}) while waiting for {what}: "
                                 f"{log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def restart(federation: LocalFederation, k: int) -> float:
    """Start node ``k`` again, retrying while the SuperLink still counts its crashed session; seconds it took."""
    started = time.monotonic()
    while True:
        try:
            federation.start_node(k)
            return time.monotonic() - started
        except StartupError:
            if time.monotonic() - started > RESTART_TIMEOUT:
                raise
            time.sleep(3.0)


def test_a_node_killed_in_round_2_is_recorded_the_run_finishes_and_the_node_rejoins(tmp_path: Path) -> None:
    output, log = tmp_path / "runs", tmp_path / "medfed-run.log"
    with LocalFederation(tmp_path / "federation") as federation:
        federation.start()
        launcher = federation.start_medfed("run", "--engine", "deployment", "--federation",
                                           str(federation.federation.folder),
                                           *federation.quickstart_sets([*FOUR_ROUNDS, f"output.dir={output}"]), log=log)
        try:
            wait_for(lambda: last_checkpoint_round(output) >= 1, RUN_TIMEOUT, "round 1's checkpoint", launcher, log)
            time.sleep(2.0)  # round 2's training has been sent
            federation.kill_node(1)
            seconds_to_restart = restart(federation, 1)
            launcher.wait(timeout=RUN_TIMEOUT)
        finally:
            if launcher.poll() is None:
                launcher.kill()
        out = log.read_text()
        assert launcher.returncode == 0, out[-3000:]

    run_dir = RunDirectory.open(next(output.glob("*/*")))
    train = {r["round"]: r["clients"] for r in run_dir.read_metrics() if r["phase"] == "train"}
    assert sorted(train) == [1, 2, 3, 4]
    assert "Node Unavailable" in train[2]["1"]["error"] and "loss" in train[2]["0"]
    assert "round 2 | site 1 | failed: Error: Node Unavailable" in out
    back = [r for r in (3, 4) if "loss" in train[r]["1"]]
    assert back, f"site 1 never trained again (restarted {seconds_to_restart:.0f} s after the kill)"
    assert train[back[0]]["1"]["participations"] == 2  # with round 1's state: its second round, not a fresh first
    assert f"round {back[0]}: site 1 (lost in round 2) is back; its state restored" in out
    summary = json.loads((run_dir.path / "summary.json").read_text())  # complete files, not half-written ones
    assert summary["rounds_completed"] == 4 and run_dir.load_checkpoint().round == 4
    print(f"node restarted {seconds_to_restart:.0f} s after the kill, trained again in round {back[0]}")
