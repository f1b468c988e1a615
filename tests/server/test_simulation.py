"""The Ray Simulation Engine runs the same loop: same metrics as in-process, node state kept across rounds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import run, small_scenario, without_timing


def assert_close(a: object, b: object, path: str = "") -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        assert sorted(a) == sorted(b), path
        for key in a:
            assert_close(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, float) or isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), f"{path}: {a} != {b}"
    else:
        assert a == b, path


@pytest.mark.slow
def test_simulation_matches_inprocess_and_keeps_per_node_state(tmp_path: Path) -> None:
    inprocess = without_timing(run(small_scenario(tmp_path, "strategy.rounds=2")).read_metrics())
    simulation = without_timing(
        run(small_scenario(tmp_path, "strategy.rounds=2", "engine.backend=simulation")).read_metrics()
    )
    assert len(simulation) == len(inprocess) == 6
    for sim, ref in zip(simulation, inprocess):
        # the scenario travels in every message and says engine.backend: 'simulation' is one byte longer
        expected_extra = len(ref["clients"]) * (len("simulation") - len("inprocess"))
        assert sim.pop("bytes_down") - ref.pop("bytes_down") == expected_extra
        assert_close(sim, ref, f"round {sim['round']} {sim['phase']}")
    for record in simulation:
        if record["phase"] == "train":  # context.state survived: each node counts its own rounds
            assert {m["participations"] for m in record["clients"].values()} == {record["round"]}
