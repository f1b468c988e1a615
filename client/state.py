"""Per-node state: what a client keeps between rounds, and how it survives ``--resume``.

By this project's design, everything a node must remember across rounds (SCAFFOLD's
c_k, FedBN's local BatchNorm tensors, an accountant's history, the participation count)
lives in Flower's ``context.state``, a ``RecordDict`` kept per node by the engine. An
engine forgets it when the run stops, so a resumed run would restart every node from
empty state and diverge from an uninterrupted one.

To prevent that, the server asks each node for a copy of its state when it
checkpoints (``query.export_state``) and hands it back when it resumes
(``query.import_state``). :func:`to_plain` / :func:`from_plain` convert a
``RecordDict`` to plain Python (tensors, numbers, strings) for ``state.pt``.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

EXPORT_ACTION = "export_state"
IMPORT_ACTION = "import_state"


def to_plain(records: RecordDict) -> dict[str, dict[str, Any]]:
    """``{"arrays"|"configs"|"metrics": {record name: {key: value}}}`` with tensors for arrays."""
    return {
        "arrays": {name: dict(record.to_torch_state_dict()) for name, record in records.array_records.items()},
        "configs": {name: dict(record.items()) for name, record in records.config_records.items()},
        "metrics": {name: dict(record.items()) for name, record in records.metric_records.items()},
    }


def from_plain(plain: dict[str, dict[str, Any]]) -> RecordDict:
    """Inverse of :func:`to_plain`."""
    records = RecordDict()
    for name, tensors in plain.get("arrays", {}).items():
        records[name] = ArrayRecord({key: torch.as_tensor(value) for key, value in tensors.items()})
    for name, values in plain.get("configs", {}).items():
        records[name] = ConfigRecord(values)
    for name, values in plain.get("metrics", {}).items():
        records[name] = MetricRecord(values)
    return records


def replace_state(state: RecordDict, saved: RecordDict) -> None:
    """Make ``state`` (a node's ``context.state``) hold exactly the records of ``saved``."""
    for name in list(state.keys()):
        del state[name]
    for name, record in saved.items():
        state[name] = record
