"""Lost nodes: a site whose node dies mid-round (the SuperLink answers "Node Unavailable" for it) or stays
silent past the round timeout is recorded in metrics.jsonl, the round completes with the others, and a node
that comes back rejoins later rounds with its own state, or, if it restarted with an older one, with the
server's copy of the state it had when the server last used its update.

A :class:`FlakyGrid` plays the deployment runtime's part in-process: for one site in one round's training (or
evaluation) it either answers like the SuperLink does for a node that stopped heartbeating (an error reply from
the SuperLink's own node id, after which the node restarts with an empty ``context.state``), or drops the message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import pytest
import torch
from flwr.app import Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from client.app import app as client_app
from server.engines import InProcessGrid
from server.federation import Federation, FederationError
from server.progress import make_progress
from server.results import RunDirectory
from server.scenario import Scenario
from strategies.scaffold import LOCAL_VARIATE_KEY
from tests.helpers import blobs_scenario, new_run_directory, quadratic_scenario
from tests.privacy.common import with_privacy

SUPERLINK_NODE_ID = 1  # the sender of the error replies Flower's SuperLink makes for unavailable nodes


class FlakyGrid(InProcessGrid):
    """An in-process grid where site ``pid``'s node fails in round ``server_round``'s training.

    Parameters
    ----------
    fault : {"unavailable", "silent"}
        ``"unavailable"``: the SuperLink's "Node Unavailable" reply, then the node restarts empty;
        ``"silent"``: the message is never answered.
    phase : str
        The message type that fails (train, default, or evaluate).
    """

    def __init__(self, num_nodes: int, *, pid: int, server_round: int,
                 fault: Literal["unavailable", "silent"], phase: str = MessageType.TRAIN) -> None:
        super().__init__(client_app, num_nodes)
        self.node = next(node for node, context in self.contexts.items() if context.node_config["partition-id"] == pid)
        self.server_round, self.fault, self.phase = server_round, fault, phase
        self._doomed: dict[str, Message] = {}

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for message in messages:
            meta = message.metadata
            if (meta.dst_node_id == self.node and meta.message_type == self.phase
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


# --- the state a returning site continues with ---------------------------------------------------------------
@pytest.mark.parametrize("fault", ["silent", "unavailable"])
def test_a_site_missing_only_evaluation_keeps_the_epsilon_of_every_update_it_released(
        tmp_path: Path, fault: Literal["silent", "unavailable"]) -> None:
    """DP-SGD: the site's train reply of round 2 was aggregated, only its evaluation was lost. Its accountant
    must still hold round 2's steps: its ε equals that of a site of the same size that never missed anything.
    (Before the fix its node state was rolled back to round 1's checkpoint and it reported a smaller ε.)"""
    scenario = with_privacy(blobs_scenario("fedavg", rounds=4, norm="none"), "dpsgd", noise_multiplier=1.0,
                            max_grad_norm=1.0)
    scenario.output.dir = str(tmp_path / "runs")
    scenario.strategy.round_timeout = 8.0  # a silent evaluation costs this long; training must fit in it
    grid = FlakyGrid(3, pid=1, server_round=2, fault=fault, phase=MessageType.EVALUATE)
    run_dir = run_flaky(scenario, grid)
    evaluate = [record["clients"] for record in run_dir.read_metrics() if record["phase"] == "evaluate"]
    assert "error" in evaluate[1]["1"] and "error" not in evaluate[1]["0"]
    rounds = train_clients(run_dir)
    assert [clients["1"]["participations"] for clients in rounds] == [1, 2, 3, 4]
    assert rounds[-1]["1"]["epsilon"] == pytest.approx(rounds[-1]["0"]["epsilon"], rel=1e-12)
    assert rounds[-1]["1"]["epsilon"] > rounds[1]["1"]["epsilon"] > 0


def test_scaffold_c_stays_the_mean_of_the_sites_c_k_when_a_site_is_lost_between_checkpoints(tmp_path: Path) -> None:
    """checkpoint_every 3, site 1's node restarts in round 5: it must come back with the c_k of round 4 (the last
    one whose Δc_k the server used), not round 3's checkpoint, so that c = (1/N) Σ_k c_k still holds."""
    scenario = quadratic_scenario(tmp_path, "scaffold", rounds=6, min_clients=2, params={"variate": "II"},
                                  local={"epochs": 1, "batch_size": 8, "optimizer": "sgd", "lr": 0.05})
    scenario.output.checkpoint_every = 3
    run_dir = run_flaky(scenario, FlakyGrid(3, pid=1, server_round=5, fault="unavailable"))
    rounds = train_clients(run_dir)
    assert "error" in rounds[4]["1"] and [clients["1"].get("participations") for clients in rounds] == [1, 2, 3, 4,
                                                                                                          None, 5]
    checkpoint = RunDirectory.open(run_dir.path).load_checkpoint()
    control = checkpoint.strategy_state["control"]["weight"].double()
    local = [plain["arrays"][LOCAL_VARIATE_KEY]["weight"].double() for plain in checkpoint.extra["node_states"].values()]
    assert len(local) == 3
    assert torch.allclose(control, sum(local) / 3, atol=1e-6)
