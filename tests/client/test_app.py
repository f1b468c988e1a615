"""ClientApp handlers driven directly with explicit messages, as a SuperNode would call them."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.app import app
from client.state import from_plain, to_plain
from server import scenario as scenario_module

ROOT = Path(__file__).resolve().parents[2]


def message(content: RecordDict, message_type: str) -> Message:
    metadata = Metadata(run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
                        group_id="1", created_at=time.time(), ttl=3600, message_type=message_type)
    return Message(content=content, metadata=metadata)


def context(partition_id: int = 1) -> Context:
    return Context(run_id=1, node_id=7, node_config={"partition-id": partition_id, "num-partitions": 2},
                   state=RecordDict(), run_config={})


def small_scenario() -> scenario_module.Scenario:
    return scenario_module.load(ROOT / "scenarios" / "quickstart.yaml", [
        "task.params.image_size=32", "data.samples_per_client=12", "partition.clients=2", "strategy.min_clients=1",
    ])


def test_train_reply_carries_weights_metrics_and_counts_participation_in_node_state() -> None:
    scenario = small_scenario()
    from client.cache import task_for

    model = task_for(scenario).build_model()
    config = ConfigRecord({"scenario": scenario.to_json(), "server-round": 1})
    ctx = context()
    for expected in (1, 2):
        reply = app(message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": config}),
                            MessageType.TRAIN), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        metrics = reply.content["metrics"]
        assert metrics["participations"] == expected
        assert metrics["num-examples"] == task_for(scenario).client_data(1).stats["n_train"]
        assert set(reply.content["arrays"].keys()) == set(model.state_dict().keys())


def test_a_failing_handler_replies_with_a_one_line_error() -> None:
    config = ConfigRecord({"scenario": "{not json", "server-round": 1})
    reply = app(message(RecordDict({"config": config}), MessageType.TRAIN), context())
    assert reply.has_error() and "\n" not in reply.error.reason and "ValidationError" in reply.error.reason


def test_missing_partition_id_is_explained() -> None:
    config = ConfigRecord({"scenario": small_scenario().to_json()})
    ctx = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    reply = app(message(RecordDict({"config": config}), MessageType.QUERY), ctx)
    assert reply.has_error() and reply.error.reason.startswith("DataError: node_config has no 'partition-id' (start")


def test_node_state_exports_and_imports_unchanged() -> None:
    import torch

    ctx = context()
    ctx.state["c"] = ArrayRecord({"w": torch.arange(4.0)})
    ctx.state["counter"] = ConfigRecord({"rounds": 3, "name": "site"})
    exported = app(message(RecordDict(), f"{MessageType.QUERY}.export_state"), ctx)
    plain = to_plain(exported.content)
    assert torch.equal(plain["arrays"]["c"]["w"], torch.arange(4.0)) and plain["configs"]["counter"]["rounds"] == 3

    fresh = context()
    fresh.state["stale"] = ConfigRecord({"x": 1})
    reply = app(message(from_plain(plain), f"{MessageType.QUERY}.import_state"), fresh)
    assert not reply.has_error()
    assert sorted(fresh.state.keys()) == ["c", "counter"]
    assert torch.equal(fresh.state["c"].to_torch_state_dict()["w"], torch.arange(4.0))
