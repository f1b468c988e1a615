"""The processes engine: the in-process engine's metrics from worker processes that run sites at the same time,
keep each node's state, answer for a dead worker at once, and never outlive the run."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, ConfigRecordValues, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from server.cli import main
from server.federation import Federation, FederationError
from server.process_engine import CLOSE_TIMEOUT, ProcessGrid
from server.progress import make_progress
from server.results import RunDirectory
from server.scenario import Scenario
from tests.helpers import QUICKSTART, SMALL, blobs_scenario, new_run_directory, run, small_scenario, without_timing

TEST_APP = "tests.server.process_apps:app"
REPLY_WAIT = 30.0  # seconds a test waits for replies before it fails (never reached when the engine works)


def running(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie, ended but not reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def grids(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ProcessGrid]]:
    """Every :class:`ProcessGrid` the test creates; once it is over, none of their workers may still run."""
    created: list[ProcessGrid] = []
    create = ProcessGrid.__init__

    def recording(grid: ProcessGrid, *args: object, **kwargs: object) -> None:
        create(grid, *args, **kwargs)
        created.append(grid)

    monkeypatch.setattr(ProcessGrid, "__init__", recording)
    yield created
    survivors = [pid for grid in created for pid in grid.worker_pids if running(pid)]
    assert not survivors, f"worker processes {survivors} outlived the test"


def query(node: int, **config: ConfigRecordValues) -> Message:
    """A query message for ``node`` whose config asks :mod:`tests.server.process_apps` for something."""
    return Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=node, message_type=MessageType.QUERY)


def replies_to(grid: ProcessGrid, messages: list[Message]) -> dict[int, Message]:
    """Partition id → the reply to its message (each message to another node)."""
    replies = grid.send_and_receive(messages, timeout=REPLY_WAIT)
    return {grid.partitions[reply.metadata.src_node_id]: reply for reply in replies}


def node_of(grid: ProcessGrid, pid: int) -> int:
    return next(node for node, partition in grid.partitions.items() if partition == pid)


# --- the run: same metrics as in-process ------------------------------------------------------------
def test_processes_give_the_in_process_metrics_and_keep_node_state(tmp_path: Path, grids: list[ProcessGrid],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    central_threads: list[str] = []
    evaluate_centrally = Federation._evaluate_centrally

    def noting_thread(federation: Federation, models: object) -> object:
        central_threads.append(threading.current_thread().name)
        return evaluate_centrally(federation, models)

    inprocess = without_timing(run(small_scenario(tmp_path / "a", "strategy.rounds=2")).read_metrics())
    monkeypatch.setattr(Federation, "_evaluate_centrally", noting_thread)
    out = tmp_path / "b" / "runs"  # as long as the first run's: the scenario, which travels, has the same size
    sets = [f"--set={item}" for item in (*SMALL, "strategy.rounds=2", "engine.workers=2", f"output.dir={out}")]
    assert main(["run", str(QUICKSTART), *sets, "--engine", "processes"]) == 0
    processes = without_timing(RunDirectory(next(out.glob("quickstart/*"))).read_metrics())
    assert len(grids) == 1 and len(grids[0].worker_pids) == 2
    assert [(r["round"], r["phase"]) for r in processes] == [(t, p) for t in (1, 2) for p in ("train", "evaluate",
                                                                                                 "central")]
    assert processes == inprocess
    for record in processes:
        if record["phase"] == "train":  # context.state survived: each node counts its own rounds
            assert {m["participations"] for m in record["clients"].values()} == {record["round"]}
    assert central_threads and all(name.startswith("medfed-central") for name in central_threads)  # alongside


def test_scaffold_control_variates_stay_with_their_nodes(grids: list[ProcessGrid], tmp_path: Path) -> None:
    scenario = blobs_scenario("scaffold", rounds=3, sites=4)
    scenario.output.dir = str(tmp_path)
    processes = scenario.model_copy(deep=True)
    processes.engine.backend = "processes"
    reference = without_timing(run(scenario).read_metrics())
    assert without_timing(run(processes).read_metrics()) == reference
    assert len(grids) == 1


# --- workers: sites at the same time, errors as replies -----------------------------------------------
def test_each_worker_handles_a_message_at_the_same_time(grids: list[ProcessGrid], tmp_path: Path) -> None:
    with ProcessGrid(4, workers=2, client_app=TEST_APP) as grid:
        meeting = tmp_path / "meeting"
        meeting.mkdir()
        replies = replies_to(grid, [query(node_of(grid, pid), meet=str(meeting), of=2) for pid in (0, 1)])
        assert sorted(replies) == [0, 1]
        assert not any(reply.has_error() for reply in replies.values()), [r.error.reason for r in replies.values()
                                                                          if r.has_error()]
        handled_by = {pid: reply.content.config_records["info"]["pid"] for pid, reply in replies.items()}
        assert sorted(handled_by.values()) == sorted(grid.worker_pids)  # node k lives on worker k % 2
        again = replies_to(grid, [query(node) for node in grid.partitions])
        assert {pid: reply.content.config_records["info"]["pid"] for pid, reply in again.items()} == {
            pid: grid.worker_pids[pid % 2] for pid in range(4)}


def test_an_exception_in_the_client_app_is_an_error_reply(grids: list[ProcessGrid]) -> None:
    with ProcessGrid(2, workers=1, client_app=TEST_APP) as grid:
        replies = replies_to(grid, [query(node_of(grid, 0), fail="no data here"), query(node_of(grid, 1))])
        assert replies[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert replies[0].error.reason == "RuntimeError: no data here"
        assert not replies[1].has_error()  # the worker goes on


def test_a_client_app_that_cannot_be_loaded_is_one_line_per_reply(grids: list[ProcessGrid]) -> None:
    with ProcessGrid(1, workers=1, client_app="tests.server.no_such_module:app") as grid:
        reply = replies_to(grid, [query(node_of(grid, 0))])[0]
    assert reply.error.code == ErrorCode.LOAD_CLIENT_APP_EXCEPTION
    assert reply.error.reason.startswith("could not load the ClientApp tests.server.no_such_module:app: "
                                         "ModuleNotFoundError")


def test_workers_ignore_ctrl_c(grids: list[ProcessGrid]) -> None:
    with ProcessGrid(1, workers=1, client_app=TEST_APP) as grid:
        assert not replies_to(grid, [query(node_of(grid, 0))])[0].has_error()  # started and answering
        os.kill(grid.worker_pids[0], signal.SIGINT)
        assert not replies_to(grid, [query(node_of(grid, 0))])[0].has_error()


# --- a worker dies: its sites are lost, at once --------------------------------------------------------
def test_a_killed_worker_answers_node_unavailable_now_and_later(grids: list[ProcessGrid], tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(logging.getLogger("medfed"), "propagate", True)  # `medfed` (an earlier test) turns it off
    caplog.set_level(logging.WARNING, logger="medfed")
    with ProcessGrid(2, workers=2, client_app=TEST_APP) as grid:
        lost, kept = node_of(grid, 1), node_of(grid, 0)
        held = tmp_path / "held"
        held.mkdir()
        [message_id] = grid.push_messages([query(lost, hold=str(held))])
        deadline = time.monotonic() + REPLY_WAIT
        while not (held / "1").exists() and time.monotonic() < deadline:  # the worker is handling it
            time.sleep(0.01)
        os.kill(grid.worker_pids[1], signal.SIGKILL)
        started = time.monotonic()
        replies = replies_to(grid, [query(lost), query(kept)])
        [in_flight] = grid.pull_messages([message_id])
        assert time.monotonic() - started < 10
        for reply in (in_flight, replies[1]):
            assert reply.error.code == ErrorCode.NODE_UNAVAILABLE
            assert f"worker process 1 (pid {grid.worker_pids[1]}) was killed (SIGKILL)" in reply.error.reason
        assert not replies[0].has_error()
        assert list(grid.get_node_ids()) == [kept]
    assert "site(s) 1 lost" in caplog.text


class KillWorkerAfter:
    """A progress display that kills worker ``worker`` of ``grid`` once round ``round_`` is done."""

    def __init__(self, grid: ProcessGrid, worker: int, round_: int) -> None:
        self.inner, self.grid, self.worker, self.round = make_progress(interactive=False), grid, worker, round_

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def round_done(self, server_round: int, metrics: dict) -> None:
        self.inner.round_done(server_round, metrics)
        if server_round == self.round:
            os.kill(self.grid.worker_pids[self.worker], signal.SIGKILL)


def run_killing(scenario: Scenario, grid: ProcessGrid) -> RunDirectory:
    """Run ``scenario`` on ``grid``, killing worker 1 after round 1."""
    run_dir = new_run_directory(scenario)
    Federation(scenario, run_dir, KillWorkerAfter(grid, worker=1, round_=1)).run(grid)
    return run_dir


def test_the_run_goes_on_without_the_sites_of_a_killed_worker(grids: list[ProcessGrid], tmp_path: Path) -> None:
    scenario = blobs_scenario("fedavg", rounds=2, sites=4)
    scenario.output.dir = str(tmp_path)
    with ProcessGrid(4, workers=2) as grid:
        records = run_killing(scenario, grid).read_metrics()
    last_train = [r for r in records if r["phase"] == "train"][-1]
    assert last_train["round"] == 2
    assert sorted(pid for pid, m in last_train["clients"].items() if "error" in m) == ["1", "3"]
    assert "was killed (SIGKILL)" in last_train["clients"]["1"]["error"]
    assert last_train["aggregate"]  # the round aggregated sites 0 and 2


def test_too_few_sites_left_stop_the_run_with_the_usual_line(grids: list[ProcessGrid], tmp_path: Path) -> None:
    scenario = blobs_scenario("fedavg", rounds=2, sites=4)
    scenario.output.dir, scenario.strategy.min_clients = str(tmp_path), 3
    with ProcessGrid(4, workers=2) as grid, pytest.raises(FederationError) as stopped:
        run_killing(scenario, grid)
    assert str(stopped.value).startswith("round 2: 2 of 4 clients returned a usable update, strategy.min_clients is 3; "
                                         "first failure: Node unavailable: worker process 1")


# --- the end -------------------------------------------------------------------------------------------
def test_close_ends_a_busy_worker_at_once(grids: list[ProcessGrid], tmp_path: Path) -> None:
    grid = ProcessGrid(1, workers=1, client_app=TEST_APP)
    held = tmp_path / "held"
    held.mkdir()
    grid.push_messages([query(node_of(grid, 0), hold=str(held))])
    deadline = time.monotonic() + REPLY_WAIT
    while not (held / "0").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    grid.close()
    assert time.monotonic() - started < CLOSE_TIMEOUT  # terminated, not waited for
    assert not running(grid.worker_pids[0])


def test_an_interrupted_run_leaves_no_worker(grids: list[ProcessGrid], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(federation: Federation, grid: ProcessGrid) -> None:
        assert grid.worker_pids and all(running(pid) for pid in grid.worker_pids)
        raise KeyboardInterrupt

    monkeypatch.setattr(Federation, "run", interrupted)
    scenario = blobs_scenario("fedavg", sites=2)
    scenario.engine.backend, scenario.output.dir = "processes", str(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run(scenario)
    assert len(grids) == 1
