"""The performance benchmark (``python -m benchmarks.performance``): its plain PyTorch loop does medfed's work,
and its bookkeeping of times and failures says what it measured."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from benchmarks.performance.__main__ import failures
from benchmarks.performance.baseline import build_task, check_plain_fedavg, run_plain_fedavg
from benchmarks.performance.child import ChildRun, run_child, timed_rounds
from benchmarks.performance.common import SCENARIOS, numbers, split_rounds
from benchmarks.performance.engines import efficiencies
from benchmarks.performance.report import markdown
from benchmarks.performance.scale import SAMPLED, overrides
from server.scenario import load
from strategies.base import Cohort
from tests.helpers import run

TINY_TABULAR = [  # 3 sites of about 30 records, 2 rounds, every site evaluated, in-process
    "partition.clients=3", "data.samples_per_client=30", "data.server_samples=40", "strategy.rounds=2",
    "strategy.min_clients=1", "strategy.fraction_evaluate=1.0", "engine.backend=inprocess", "output.plots=false",
]


def test_the_plain_loop_ends_with_medfeds_global_weights_and_metrics_bit_for_bit(tmp_path: Path) -> None:
    scenario = load(SCENARIOS / "tabular-dp-none.yaml", [*TINY_TABULAR, f"output.dir={tmp_path}"])
    run_dir = run(scenario)
    medfed = run_dir.load_checkpoint().arrays
    plain = run_plain_fedavg(scenario)

    initial = build_task(scenario).build_model().state_dict()
    assert any(not torch.equal(plain.weights[name], initial[name]) for name in initial)  # it did train
    assert medfed.keys() == plain.weights.keys()
    for name, tensor in medfed.items():
        assert torch.equal(tensor, plain.weights[name]), name
    final = (run_dir.read_summary() or {})["final"]
    assert plain.evaluate == numbers(final["evaluate"])
    assert plain.central == numbers(final["central"])
    assert len(plain.round_seconds) == 2


@pytest.mark.parametrize("override", ["strategy.params.proximal_mu=0.1", "defense.aggregation=median",
                                      "privacy={mechanism: dpsgd, params: {noise_multiplier: 1.0}}",
                                      "strategy={name: scaffold, rounds: 2, params: {variate: I}}"])
def test_the_plain_loop_refuses_what_it_would_not_run_as_medfed_does(override: str) -> None:
    scenario = load(SCENARIOS / "tabular-dp-none.yaml", [*TINY_TABULAR, override])
    with pytest.raises(ValueError, match="the plain loop runs FedAvg without privacy, defense or attack only"):
        check_plain_fedavg(scenario)


def test_a_rounds_bookkeeping_is_its_wall_time_less_its_phases() -> None:
    rows = split_rounds([2.0, 1.5], {1: {"train": 1.0, "evaluate": 0.5, "central": 0.25},
                                     2: {"train": 1.0, "evaluate": 0.25, "central": 0.0}})
    assert [row["bookkeeping"] for row in rows] == [0.25, 0.25]
    assert [row["round"] for row in rows] == [1, 2]


def test_round_times_come_from_when_the_log_lines_arrived() -> None:
    child = ChildRun(returncode=0, seconds=9.0, lines=[
        (1.0, "run directory: runs/x/1"), (4.0, "rounds 1..2 of 2"), (6.5, "round 1/2 | train loss 0.3"),
        (7.0, "unrelated"), (8.0, "round 2/2 | train loss 0.2")])
    startup, walls = timed_rounds(child)
    assert startup == 4.0
    assert walls == [2.5, 1.5]


def test_parallel_efficiency_is_one_worker_over_twice_two_workers() -> None:
    rows = [{"task": "quickstart", "engine": "simulation", "workers": 1, "per_round": {"train": 3.0}},
            {"task": "quickstart", "engine": "simulation", "workers": 2, "per_round": {"train": 2.0}},
            {"task": "quickstart", "engine": "flower", "workers": 2, "per_round": {"wall": 2.0}},
            {"task": "quickstart", "engine": "flower", "workers": 1, "error": "RuntimeError: no Ray"}]
    assert efficiencies(rows) == [{"task": "quickstart", "engine": "simulation", "part": "train", "one_worker": 3.0,
                                   "two_workers": 2.0, "efficiency": 0.75}]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak memory is read from /proc (Linux)")
def test_a_childs_peak_memory_is_its_own_not_this_processs() -> None:
    holds = "import time; block = bytearray(64 * 2**20); time.sleep(1.0); print('done')"  # 64 MiB, touched
    child = run_child([sys.executable, "-c", holds], timeout=60)
    assert child.returncode == 0 and child.stdout == "done\n"
    assert child.memory.process is not None and child.memory.everything is not None
    assert 64 <= child.memory.process < 160  # this test's process, with torch loaded, holds far more
    assert child.memory.everything >= 64


@pytest.mark.parametrize("clients", [10, 100, 1000, 10000])
def test_the_scale_runs_sample_ten_sites_per_round(clients: int) -> None:
    sets = dict(item.split("=", 1) for item in overrides(clients, rounds=3))
    for phase, minimum in (("train", int(sets["strategy.min_clients"])), ("evaluate", 1)):
        assert Cohort.sample_size(clients, float(sets[f"strategy.fraction_{phase}"]), minimum) == SAMPLED


def test_a_failed_measurement_is_one_line_in_its_table_and_the_others_stay() -> None:
    results = {
        "command": "python -m benchmarks.performance --parts scale",
        "environment": {"date": "today", "commit": None, "python": "3.11", "torch": "2.13", "flwr": "1.42",
                        "ray": "2.55", "cpus": 2, "usable_cpus": 2, "processor": "x86_64", "platform": "Linux"},
        "scale": [{"clients": 10, "sampled": 10, "discovery_seconds": 0.5, "seconds_per_round": 0.25,
                   "peak_rss_mib": 300.0},
                  {"clients": 100, "sampled": 10, "error": "ChildFailed: exit code 1: medfed: error: boom"},
                  {"clients": 10000, "sampled": 10, "refused": "partition.clients: at most 1000"}],
    }
    text = markdown(results)
    assert "| 10 | 10 | 0.5 | 0.25 | 300 | ok |" in text
    assert "failed: ChildFailed: exit code 1: medfed: error: boom |" in text
    assert "| 10,000 | 10 |  |  |  | refused: partition.clients: at most 1000 |" in text
    assert failures(results) == 1
