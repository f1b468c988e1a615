"""Lost nodes: a site whose node dies mid-round (the SuperLink answers "Node Unavailable" for it) or stays
silent past the round timeout is recorded in metrics.jsonl, the round completes with the others, and a node
that comes back rejoins later rounds with the state of the last checkpoint.

A :class:`FlakyGrid` plays the deployment runtime's part in-process: for one site in one round's training it
either answers like the SuperLink does for a node that stopped heartbeating (an error reply from the
SuperLink's own node id, after which the node restarts with an empty ``context.state``), or drops the message.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Literal

import pytest
from flwr.app import Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from client.app import app as client_app
from server.engines import InProcessGrid
from server.federation import Federation, FederationError
from server.progress import make_progress
from server.results import RunDirectory
from server.scenario import Scenario
from tests.helpers import new_run_directory, quadratic_scenario

SUPERLINK_NODE_ID = 1  # the sender of the error replies Flower's SuperLink makes for unavailable nodes


class FlakyGrid(InProcessGrid):
    """An in-process grid where site ``pid``'s node fails in round ``server_round``'s training.

    Args:
        fault: ``"unavailable"``: the SuperLink's "Node Unavailable" reply, then the node restarts empty;
            ``"silent"``: the message is never answered.
    """

    def __init__(self, num_nodes: int, *, pid: int, server_round: int,
                 fault: Literal["unavailable", "silent"]) -> None:
        super().__init__(client_app, num_nodes)
        self.node = next(node for node, context in self.contexts.items() if context.node_config["partition-id"] == pid)
        self.server_round, self.fault = server_round, fault
        self._doomed: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message in messages:
            meta = message.metadata
            if (meta.dst_node_id == self.node and meta.message_type == MessageType.TRAIN
                    and meta.group_id == str(self.server_round)):
                self._doomed[meta.message_id] = self._pending.pop(meta.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        for message_id in message_ids:
            if message_id in self._doomed and self.fault == "unavailable":
                message = self._doomed.pop(message_id)
                self.contexts[self.node].state = RecordDict()  # the node's process died: its state is gone
                reply = Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Error: Node Unavailable - no heartbeat"),
                                reply_to=message)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                return [reply]
        return super().pull_messages(message_ids)


def run_flaky(scenario: Scenario, grid: FlakyGrid) -> RunDirectory:
    run_dir = new_run_directory(scenario)
    Federation(scenario, run_dir, make_progress(interactive=False)).run(grid)
    return run_dir


def train_clients(run_dir: RunDirectory) -> list[dict]:
    return [record["clients"] for record in run_dir.read_metrics() if record["phase"] == "train"]


def flaky_scenario(tmp_path: Path, **strategy: object) -> Scenario:
    """FedAvg on the quadratic task, 3 sites, 3 rounds; a round completes with 2 of them."""
    return quadratic_scenario(tmp_path, "fedavg", rounds=3, min_clients=2, **strategy)


def test_a_node_lost_mid_round_is_recorded_the_run_goes_on_and_it_rejoins_with_its_checkpointed_state(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    grid = FlakyGrid(3, pid=1, server_round=2, fault="unavailable")
    with caplog.at_level(logging.INFO, logger="medfed"):
        run_dir = run_flaky(flaky_scenario(tmp_path), grid)
    rounds = train_clients(run_dir)
    assert len(rounds) == 3
    assert rounds[1]["1"] == {"error": "Error: Node Unavailable - no heartbeat"}
    assert {"0", "2"} <= set(rounds[1]) and all("loss" in rounds[1][pid] for pid in ("0", "2"))
    # back in round 3 with the state of the round-1 checkpoint: its second participation, not a fresh first
    assert [clients["1"].get("participations") for clients in rounds] == [1, None, 2]
    assert [clients["0"]["participations"] for clients in rounds] == [1, 2, 3]
    assert "round 2 train: site 1 lost" in caplog.text
    assert "round 3: site 1 (lost in round 2) is back; its state restored from the server's copy" in caplog.text
    assert RunDirectory.open(run_dir.path).load_checkpoint().round == 3


def test_without_node_state_in_checkpoints_a_returning_node_starts_empty(tmp_path: Path) -> None:
    scenario = flaky_scenario(tmp_path)
    scenario.output.checkpoint_node_state = False
    rounds = train_clients(run_flaky(scenario, FlakyGrid(3, pid=1, server_round=2, fault="unavailable")))
    assert [clients["1"].get("participations") for clients in rounds] == [1, None, 1]


def test_a_silent_node_is_recorded_after_the_round_timeout(tmp_path: Path) -> None:
    scenario = flaky_scenario(tmp_path, round_timeout=1.0)
    rounds = train_clients(run_flaky(scenario, FlakyGrid(3, pid=2, server_round=1, fault="silent")))
    assert rounds[0]["2"] == {"error": "no reply within 1 s"}
    assert all("loss" in clients["2"] for clients in rounds[1:])  # answered again in rounds 2 and 3


def test_too_few_sites_left_still_ends_the_run_with_one_line(tmp_path: Path) -> None:
    scenario = quadratic_scenario(tmp_path, "fedavg", rounds=2, min_clients=3)
    grid = FlakyGrid(3, pid=0, server_round=1, fault="unavailable")
    with pytest.raises(FederationError, match=r"round 1: 2 of 3 clients returned a usable update.*Node Unavailable"):
        run_flaky(scenario, grid)
