"""A deployed hospital's own data: ``--node-config "partition-id=K data-path=/its/folder"`` makes the whole
folder that site's data, whatever the scenario's pool and partition say."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from client.app import app as client_app
from server.engines import InProcessGrid
from server.federation import Federation, FederationError
from server.progress import make_progress
from tests.helpers import new_run_directory, small_scenario, write_segmentation_folder


def grid_with_data_paths(paths: list[Path]) -> InProcessGrid:
    """An in-process federation whose node k was started with ``data-path=paths[k]``."""
    grid = InProcessGrid(client_app, len(paths))
    for context in grid.contexts.values():
        context.node_config["data-path"] = str(paths[int(context.node_config["partition-id"])])
    return grid


def test_each_hospital_trains_on_its_own_folder(tmp_path: Path) -> None:
    pool = write_segmentation_folder(tmp_path / "coordinator", 12)  # what the scenario names (not read by sites)
    hospitals = [write_segmentation_folder(tmp_path / f"hospital-{k}", count) for k, count in enumerate((8, 15))]
    scenario = small_scenario(tmp_path, "strategy.rounds=1", "partition.clients=2", "data.source=folder",
                              f"data.path={pool}", "data.server_samples=0", "data.val_fraction=0.25")
    run_dir = new_run_directory(scenario)
    Federation(scenario, run_dir, make_progress(interactive=False)).run(grid_with_data_paths(hospitals))
    sites = json.loads((run_dir.path / "partitions.json").read_text())["clients"]
    assert [sites[pid]["n_train"] + sites[pid]["n_val"] for pid in ("0", "1")] == [8, 15]  # the whole folders
    train = next(record for record in run_dir.read_metrics() if record["phase"] == "train")
    assert [train["clients"][pid]["num-examples"] for pid in ("0", "1")] == [sites["0"]["n_train"], sites["1"]["n_train"]]
    evaluate = next(record for record in run_dir.read_metrics() if record["phase"] == "evaluate")
    assert [evaluate["clients"][pid]["num-examples"] for pid in ("0", "1")] == [sites["0"]["n_val"], sites["1"]["n_val"]]


def test_a_missing_hospital_folder_stops_discovery_with_one_line(tmp_path: Path) -> None:
    scenario = small_scenario(tmp_path, "strategy.rounds=1", "partition.clients=2")
    grid = grid_with_data_paths([write_segmentation_folder(tmp_path / "h0", 6), tmp_path / "nowhere"])
    with pytest.raises(FederationError, match=r"a client could not prepare its data: DataError: .*nowhere") as error:
        Federation(scenario, new_run_directory(scenario), make_progress(interactive=False)).run(grid)
    assert "\n" not in str(error.value)


def test_a_hospital_folder_scenario_deploys_on_nodes_with_their_own_folders(tmp_path: Path) -> None:
    for k, count in enumerate((6, 9)):  # the hospital folders the scenario names, as the coordinator has them
        write_segmentation_folder(tmp_path / "hospitals" / f"h{k}", count)
    scenario = small_scenario(tmp_path, "strategy.rounds=1", "partition.clients=2", "partition.kind=iid",
                              "partition.params={}", "data.source=folder", f"data.path={tmp_path / 'hospitals'}",
                              "data.sites=subfolders", "data.server_samples=0")
    own = [write_segmentation_folder(tmp_path / f"node-{k}", count) for k, count in enumerate((7, 5))]
    run_dir = new_run_directory(scenario)
    Federation(scenario, run_dir, make_progress(interactive=False)).run(grid_with_data_paths(own))
    sites = json.loads((run_dir.path / "partitions.json").read_text())["clients"]
    assert [sites[pid]["n_train"] + sites[pid]["n_val"] for pid in ("0", "1")] == [7, 5]  # each node's own folder
