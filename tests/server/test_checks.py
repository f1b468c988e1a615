"""Checks before a run starts: optional modules, a privacy budget one round already exceeds, a device the machine
or the engine cannot give, and a runtime that reports one line per cause rather than one per site."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import Context, Error, Message, RecordDict
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from client.app import app as client_app
from server import app as server_app
from server import scenario as scenario_module
from server.cli import EXIT_INVALID, main
from server.engines import InProcessGrid
from strategies.base import Cohort, describe_sites, usable_replies
from tests.helpers import ROOT, make_message

TABULAR = {
    "name": "budget",
    "task": {"name": "tabular", "params": {"num_features": 8, "num_classes": 3, "hidden": 8}},
    "data": {"source": "synthetic", "samples_per_client": 50, "val_fraction": 0.2},
    "partition": {"clients": 3, "kind": "iid"},
    "strategy": {"rounds": 5},
    "local": {"batch_size": 8},  # 40 training examples per site: q = 1/5, 5 steps per round
}

IHC = {
    "name": "ihc",
    "task": {"name": "mil", "model": "attention", "params": {"tile_source": "skimage_ihc", "tiles_per_slide": 4,
                                                              "tile_size": 16}},
    "data": {"source": "synthetic", "samples_per_client": 8},
    "partition": {"clients": 2, "kind": "iid"},
    "strategy": {"rounds": 1},
}


def _write(tmp_path: Path, raw: dict, **privacy: object) -> Path:
    content = {**raw, "output": {"dir": str(tmp_path / "runs")}}
    if privacy:
        content["privacy"] = privacy
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def _refused(command: str, path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``medfed <command> path``; assert exit 2, one line on stderr and no run directory; that line."""
    assert main([command, str(path)]) == EXIT_INVALID
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (path.parent / "runs").exists()
    return err


# --- (a) optional modules a task declares -------------------------------------------------------------
@pytest.mark.parametrize("command", ["validate", "run"])
def test_missing_optional_module_is_refused_naming_the_setting(command: str, tmp_path: Path, capsys,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)  # as if scikit-image were not installed
    err = _refused(command, _write(tmp_path, IHC), capsys)
    assert "task.params.tile_source" in err and "'skimage'" in err and "pip install scikit-image" in err


def test_a_task_that_declares_no_module_is_not_refused(tmp_path: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "skimage", None)
    rendered = {**IHC, "task": {**IHC["task"], "params": {**IHC["task"]["params"], "tile_source": "rendered"}}}
    assert main(["validate", str(_write(tmp_path, rendered))]) == 0
    assert capsys.readouterr().err == ""


# --- (b) a privacy budget one round already exceeds -----------------------------------------------------
@pytest.mark.parametrize("command", ["validate", "run"])
def test_dpsgd_budget_that_one_round_exceeds_is_refused(command: str, tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, TABULAR, mechanism="dpsgd", params={"noise_multiplier": 1.0, "target_epsilon": 4.0})
    err = _refused(command, path, capsys)
    assert "privacy.params: one round already spends more than target_epsilon 4 at 3 of 3 sites" in err
    assert "sampling rate 0.2, 5 steps" in err and "resume" not in err


def test_dpsgd_budget_that_fits_one_round_or_is_calibrated_is_valid(tmp_path: Path, capsys) -> None:
    for params in ({"noise_multiplier": 1.0, "target_epsilon": 5.0}, {"target_epsilon": 4.0}):
        path = _write(tmp_path, TABULAR, mechanism="dpsgd", params=params)
        assert main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_central_dp_budget_that_one_round_exceeds_is_refused(tmp_path: Path, capsys) -> None:
    params = {"clip": 1.0, "noise_multiplier": 0.5, "target_epsilon": 1.0}
    err = _refused("validate", _write(tmp_path, TABULAR, mechanism="central", params=params), capsys)
    assert "privacy.params: one round already spends ε = " in err and "target_epsilon 1 " in err
    fits = {**params, "noise_multiplier": 20.0}
    assert main(["validate", str(_write(tmp_path, TABULAR, mechanism="central", params=fits))]) == 0


# --- (c) a device the machine or the engine cannot give ------------------------------------------------
def _with_engine(**engine: object) -> dict:
    return {**TABULAR, "engine": engine}


@pytest.mark.parametrize("backend", ["simulation", "inprocess"])
def test_cuda_on_a_machine_without_it_is_refused_for_the_local_engines(backend: str, tmp_path: Path, capsys,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _refused("validate", _write(tmp_path, _with_engine(backend=backend, device="cuda", gpus_per_client=1)),
                   capsys)
    assert "engine.device: 'cuda' but this machine has no CUDA device" in err and "use auto or cpu" in err


def test_a_deployment_leaves_the_device_to_each_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    scenario = scenario_module.validate(_with_engine(backend="deployment", device="cuda"))
    assert scenario.engine.device == "cuda"


def test_cuda_in_simulation_without_a_gpu_share_is_refused_with_the_key_to_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(scenario_module.ScenarioError, match=r"engine\.gpus_per_client: device 'cuda' in simulation"):
        scenario_module.validate(_with_engine(backend="simulation", device="cuda"))
    for engine in ({"backend": "simulation", "gpus_per_client": 0.5}, {"backend": "inprocess"}):
        assert scenario_module.validate(_with_engine(device="cuda", **engine)).engine.device == "cuda"


def test_a_gpu_share_with_device_cpu_is_refused() -> None:
    with pytest.raises(scenario_module.ScenarioError,
                       match=r"^<scenario>: engine: gpus_per_client 0.5 reserves GPUs that device 'cpu' never uses"):
        scenario_module.validate(_with_engine(device="cpu", gpus_per_client=0.5))


def test_a_gpu_share_above_one_is_whole_gpus() -> None:
    with pytest.raises(scenario_module.ScenarioError, match=r"^<scenario>: engine\.gpus_per_client: a share above 1 "
                                                            r"is a whole number of GPUs \(Ray's rule\), got 1\.5$"):
        scenario_module.validate(_with_engine(gpus_per_client=1.5))
    assert scenario_module.validate(_with_engine(gpus_per_client=2)).engine.gpus_per_client == 2


# --- the runtime: one line per cause ----------------------------------------------------------------------
def _failed_reply(node: int, reason: str) -> Message:
    return Message(Error(code=901, reason=reason), reply_to=make_message(RecordDict(), src_node_id=0, dst_node_id=node))


def test_sites_failing_for_the_same_reason_give_one_line(caplog: pytest.LogCaptureFixture) -> None:
    cohort = Cohort(node_to_partition={100 + pid: pid for pid in range(50)}, seed=0)
    spent = "PrivacyBudgetExhausted: privacy budget spent"
    replies = [_failed_reply(100 + pid, spent) for pid in range(49)] + [_failed_reply(149, "other")]
    with caplog.at_level(logging.WARNING, logger="medfed"):
        assert usable_replies(replies, cohort, "train") == []
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [f"round 1 train: 49 clients (0-48) failed: {spent}", "round 1 train: client 49 failed: other"]


def test_describe_sites_writes_runs_as_ranges() -> None:
    assert describe_sites([4, 0, 1, 2, 7, 8]) == "6 clients (0-2, 4, 7-8)"
    assert describe_sites([3]) == "client 3"


# --- (d) `flwr run .` with a num-supernodes that is not partition.clients ----------------------------------
class SimulatedGrid(InMemoryGrid):
    """Flower's simulation grid with ``nodes`` registered supernodes (nothing else is used here)."""

    def __init__(self, nodes: int) -> None:  # no link state: only the node count is asked for
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return [100 + k for k in range(self.nodes)]


def test_flwr_run_with_other_num_supernodes_ends_at_once_with_one_line(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    settings = f"partition.clients=3;output.dir={tmp_path / 'runs'}"
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config={"scenario": "scenarios/quickstart.yaml", "set": settings})
    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="medfed"):
        server_app.main(SimulatedGrid(5), context)
    assert time.monotonic() - started < 10
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1 and "5 supernodes" in errors[0] and "partition.clients is 3" in errors[0]
    assert "num-supernodes=3" in errors[0] and not (tmp_path / "runs").exists()


def test_supernode_check_passes_equal_counts_and_leaves_deployments_to_discovery() -> None:
    scenario = scenario_module.load(ROOT / "scenarios" / "quickstart.yaml", ["partition.clients=3"])
    server_app.check_supernodes(SimulatedGrid(3), scenario, settle=0.2)
    server_app.check_supernodes(InProcessGrid(client_app, 2), scenario, settle=0.2)  # not a simulation: no check


# --- the engine a run is started on is the one the checks see -----------------------------------------------
def test_the_device_checks_see_the_engine_given_on_the_command_line(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from server.sweep import SweepError, plan_sweep

    quickstart = ROOT / "scenarios" / "quickstart.yaml"  # engine.backend: simulation in the file
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(SweepError, match="engine.gpus_per_client"):  # simulation without a GPU share
        plan_sweep(quickstart, ["engine.device=cuda"], ["local.epochs=1,2"], engine="simulation")
    assert len(plan_sweep(quickstart, ["engine.device=cuda"], ["local.epochs=1,2"], engine="inprocess").cells) == 2

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine: the hospitals' are not checked
    code = main(["run", str(quickstart), "--set", "engine.device=cuda", "--engine", "deployment",
                 "--federation", "no-such-federation"])
    assert code == EXIT_INVALID
    error = capsys.readouterr().err
    assert "no-such-federation" in error and "engine.device" not in error
