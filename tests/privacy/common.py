"""What the privacy tests share: a scenario with a mechanism, the records and summary of a run, a norm."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch

from server.results import RunDirectory
from server.scenario import Scenario, validate


def with_privacy(scenario: Scenario, mechanism: str, **params: Any) -> Scenario:
    """``scenario`` with ``privacy: {mechanism: mechanism, params: params}``, validated again."""
    raw = json.loads(scenario.to_json())
    raw["privacy"] = {"mechanism": mechanism, "params": params}
    return validate(raw)


def phase_records(run_dir: RunDirectory, phase: str = "train") -> list[dict]:
    """The ``metrics.jsonl`` records of one phase, in round order."""
    return [record for record in run_dir.read_metrics() if record["phase"] == phase]


def final_central_loss(run_dir: RunDirectory) -> float:
    return phase_records(run_dir, "central")[-1]["aggregate"]["loss"]


def run_summary(run_dir: RunDirectory) -> dict:
    return json.loads((run_dir.path / "summary.json").read_text())


def total_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """‖x‖₂ over every entry of every tensor, in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors.values()))
