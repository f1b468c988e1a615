"""One broken or hostile hospital cannot stop or steer the federation: every train reply is checked against
what the algorithm declares it uploads before the strategy sees it (:mod:`server.replies`).

A :class:`TamperingGrid` changes site 1's train replies on their way to the server, as a faulty or malicious
site would: a tensor of the wrong shape, a tensor missing, a negative or huge example count. Blobs task,
4 sites, FedAvg, 2 rounds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from client.app import app as client_app
from server.engines import InProcessGrid
from server.exchange import NO_REPLY_CODE
from server.federation import Federation
from server.progress import make_progress
from server.replies import MALFORMED_CODE, ReplyCheck
from server.results import RunDirectory
from server.scenario import Scenario
from strategies.base import Upload
from tests.helpers import blobs_scenario, new_run_directory, without_timing

Tamper = Callable[[RecordDict], None]


class TamperingGrid(InProcessGrid):
    """An in-process grid whose site ``pid`` has every train reply changed by ``tamper`` before the server reads it."""

    def __init__(self, num_nodes: int, pid: int, tamper: Tamper) -> None:
        super().__init__(client_app, num_nodes)
        self.node = next(node for node, context in self.contexts.items() if context.node_config["partition-id"] == pid)
        self.tamper = tamper
        self._train: set[str] = set()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(super().push_messages(messages))
        self._train |= {m.metadata.message_id for m in messages
                        if m.metadata.message_type == MessageType.TRAIN and m.metadata.dst_node_id == self.node}
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        for reply in replies:
            if reply.metadata.reply_to_message_id in self._train and reply.has_content():
                self.tamper(reply.content)
        return replies


def scenario_for(tmp_path: Path, **strategy: object) -> Scenario:
    scenario = blobs_scenario("fedavg", rounds=2, sites=4, norm="none")
    scenario.output.dir = str(tmp_path / "runs")
    for key, value in strategy.items():
        setattr(scenario.strategy, key, value)
    return scenario


def run_tampered(scenario: Scenario, tamper: Tamper | None) -> RunDirectory:
    run_dir = new_run_directory(scenario)
    grid = TamperingGrid(4, pid=1, tamper=tamper) if tamper else InProcessGrid(client_app, 4)
    Federation(scenario, run_dir, make_progress(interactive=False)).run(grid)
    return run_dir


def wrong_shape(content: RecordDict) -> None:
    arrays = content["arrays"]
    first = next(iter(arrays))
    content["arrays"] = ArrayRecord({key: (Array(np.zeros(3, dtype=np.float32)) if key == first else value)
                                     for key, value in arrays.items()})


def missing_tensor(content: RecordDict) -> None:
    arrays = content["arrays"]
    content["arrays"] = ArrayRecord(dict(list(arrays.items())[:-1]))


def examples(count: float) -> Tamper:
    def tamper(content: RecordDict) -> None:
        content["metrics"]["num-examples"] = count
    return tamper


def weight(value: float) -> Tamper:
    def tamper(content: RecordDict) -> None:
        content["metrics"]["aggregation-weight"] = value
    return tamper


def train_records(run_dir: RunDirectory) -> list[dict]:
    return [record for record in run_dir.read_metrics() if record["phase"] == "train"]


@pytest.mark.parametrize("tamper, reason", [
    (wrong_shape, "is float32 [3] where float32"),
    (missing_tensor, "is missing"),
    (examples(-50), "'num-examples' is -50, not a whole number of at least 1"),
    (examples(2.5), "not a whole number"),
    (weight(1e12), "'aggregation-weight' is the server's to set"),
], ids=["wrong-shape", "missing-tensor", "negative-count", "fractional-count", "own-aggregation-weight"])
def test_a_malformed_update_is_dropped_and_recorded_and_the_run_goes_on(tmp_path: Path, tamper: Tamper,
                                                                       reason: str) -> None:
    run_dir = run_tampered(scenario_for(tmp_path), tamper)
    records = train_records(run_dir)
    assert len(records) == 2
    for record in records:
        error = record["clients"]["1"]["error"]
        assert error.startswith("malformed reply: ") and reason in error, error
        assert all("loss" in record["clients"][pid] for pid in ("0", "2", "3"))
    # the global model is the average of the three honest sites: the run equals one where site 1 failed outright
    assert records[-1]["aggregate"]["num-examples"] == 3 * records[-1]["clients"]["0"]["num-examples"]


def test_an_inflated_example_count_is_cut_to_the_size_known_from_discovery(tmp_path: Path) -> None:
    honest = run_tampered(scenario_for(tmp_path), None)
    inflated = run_tampered(scenario_for(tmp_path), examples(10**12))
    # weighted as its real size: every number of the run is the honest run's
    assert without_timing(inflated.read_metrics()) == without_timing(honest.read_metrics())


def test_self_reported_counts_can_be_trusted_on_request_and_then_one_site_takes_over(tmp_path: Path) -> None:
    honest = run_tampered(scenario_for(tmp_path, example_counts="reported"), None)
    inflated = run_tampered(scenario_for(tmp_path, example_counts="reported"), examples(10**12))
    weight = inflated.load_checkpoint().arrays
    honest_weight = honest.load_checkpoint().arrays
    assert train_records(inflated)[0]["clients"]["1"]["num-examples"] == 10**12
    assert any(not np.allclose(weight[key].numpy(), honest_weight[key].numpy()) for key in weight)


def test_too_few_usable_updates_counts_the_dropped_ones_as_failed(tmp_path: Path) -> None:
    from server.federation import FederationError

    with pytest.raises(FederationError, match=r"round 1: 3 of 4 clients returned a usable update, "
                                              r"strategy.min_clients is 4; first failure: malformed reply"):
        run_tampered(scenario_for(tmp_path, min_clients=4), wrong_shape)


def test_reply_check_names_each_problem_in_one_line() -> None:
    sent = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros((2, 2), dtype=np.float32))})})
    check = ReplyCheck(cohort=None, uploads={"arrays": Upload("weights", frozenset({"w"}))},  # type: ignore[arg-type]
                       stats={0: {"n_train": 10, "n_val": 3}})

    def reply(arrays: dict, count: float = 5) -> RecordDict:
        record = ArrayRecord({key: Array(value) for key, value in arrays.items()})
        return RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": count})})

    ok = reply({"w": np.ones((2, 2), dtype=np.float32)})
    assert check.problem(ok, sent, "train", 0) is None
    assert "non-finite" in check.problem(reply({"w": np.full((2, 2), np.nan, dtype=np.float32)}), sent, "train", 0)
    assert "float64 [2, 2] where float32 [2, 2]" in check.problem(reply({"w": np.ones((2, 2))}), sent, "train", 0)
    assert "unexpected tensor 'arrays.v'" in check.problem(
        reply({"w": np.ones((2, 2), dtype=np.float32), "v": np.ones(1, dtype=np.float32)}), sent, "train", 0)
    big = reply({"w": np.ones((2, 2), dtype=np.float32)}, 10**6)
    assert check.problem(big, sent, "train", 0) is None and big["metrics"]["num-examples"] == 10
    evaluate = RecordDict({"metrics": reply({}, 10**6)["metrics"]})
    assert check.problem(evaluate, sent, "evaluate", 0) is None and evaluate["metrics"]["num-examples"] == 3
    assert MALFORMED_CODE != NO_REPLY_CODE
