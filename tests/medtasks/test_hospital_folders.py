"""One folder per hospital (``data.sites``) and a central test folder (``data.test_path``).

Each hospital folder is one site, read whole, its cases kept whole across its train/validation split;
the test folder is the server's test set. Segmentation, CT and MIL read them the same way.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from medtasks.base import DataError, DataSpec, PartitionSpec, TaskContext
from medtasks.ct.params import CTParams
from medtasks.ct.task import CTReconstructionTask
from medtasks.mil import MILParams, MILTask
from medtasks.scenario import Scenario
from medtasks.segmentation.task import SegmentationParams, SegmentationTask
from server.cli import main
from server.scenario import ScenarioError, load, validate
from tests.helpers import run, single_torch_thread
from tests.medtasks.test_mil_realdata import _write_folder

one_thread = pytest.fixture(autouse=True)(single_torch_thread)  # small models: threads only add overhead

SIDE = 32
SLICES = 2
HOSPITALS = {"a": 3, "b": 2, "c": 4}  # hospital folder -> patients


def _patients(hospital: str, count: int) -> list[str]:
    return [f"{hospital}p{j}" for j in range(count)]


# --- data folders ----------------------------------------------------------------------------------------
def _write_segmentation(folder: Path, patients: list[str], top_label: int = 1) -> None:
    """``images/`` and ``masks/`` of 2-slice NIfTI volumes, one per patient, masks labelled ``0..top_label``."""
    import nibabel

    for sub in ("images", "masks"):
        (folder / sub).mkdir(parents=True)
    for j, name in enumerate(patients):
        mask = np.zeros((SIDE, SIDE, SLICES), dtype=np.int16)
        mask[4:12, 4:28] = 1
        mask[16:24, 8:20] = top_label
        image = (mask * 50.0 + j).astype(np.float32)
        nibabel.save(nibabel.Nifti1Image(image, np.eye(4)), folder / "images" / f"{name}.nii.gz")
        nibabel.save(nibabel.Nifti1Image(mask, np.eye(4)), folder / "masks" / f"{name}.nii.gz")


def _write_ct(folder: Path, patients: list[str]) -> None:
    """One 2-slice NumPy volume in HU per patient."""
    folder.mkdir(parents=True)
    for j, name in enumerate(patients):
        hu = np.full((SIDE, SIDE, SLICES), -1000.0)
        hu[8:24, 8:24] = 40.0 + 10 * j
        np.save(folder / f"{name}.npy", hu)


def _write_mil(folder: Path, patients: list[str]) -> None:
    """Two slides per patient (one negative, one positive), ``labels.csv`` with a ``patient`` column."""
    slides = {f"{name}s{i}": (i, 4 + i, [0] if i else []) for name in patients for i in range(2)}
    _write_folder(folder, slides)
    lines = (folder / "labels.csv").read_text().splitlines()
    rows = [f"{line},{line.split(',')[0][:-2]}" for line in lines[1:]]
    (folder / "labels.csv").write_text("\n".join([lines[0] + ",patient", *rows]) + "\n")


def _segmentation(data: DataSpec, clients: int, **params: Any) -> SegmentationTask:
    return SegmentationTask(TaskContext(params=SegmentationParams(image_size=SIDE, channels=(4, 8), **params),
                                        model=None, data=data, partition=PartitionSpec(clients=clients), seed=0))


def _ct(data: DataSpec, clients: int) -> CTReconstructionTask:
    return CTReconstructionTask(TaskContext(params=CTParams(image_size=SIDE, num_views=8, channels=(4, 8)), model=None,
                                            data=data, partition=PartitionSpec(clients=clients), seed=0))


def _mil(data: DataSpec, clients: int, kind: str = "iid") -> MILTask:
    return MILTask(TaskContext(params=MILParams(tiles_per_slide=4, tile_size=8, feature_dim=8, attention_dim=4),
                               model=None, data=data, partition=PartitionSpec(clients=clients, kind=kind), seed=0))


TASKS: dict[str, tuple[Callable[[Path, list[str]], None], Callable[[DataSpec, int], Any], int]] = {
    # task -> (writer, builder, samples per patient)
    "segmentation": (_write_segmentation, _segmentation, SLICES),
    "ct": (_write_ct, _ct, SLICES),
    "mil": (_write_mil, _mil, 2),
}


def _hospitals(root: Path, task: str) -> list[str]:
    """The hospital folders ``root/a``, ``root/b``, ``root/c`` of ``task`` (plus a hidden folder to ignore)."""
    writer = TASKS[task][0]
    for hospital, count in HOSPITALS.items():
        writer(root / hospital, _patients(hospital, count))
    (root / ".cache").mkdir()
    return [str(root / hospital) for hospital in HOSPITALS]


def _folder_data(**keys: Any) -> DataSpec:
    return DataSpec(**{"source": "folder", "val_fraction": 0.25, **keys})


# --- each hospital folder is one site -------------------------------------------------------------------
@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_each_hospital_subfolder_is_one_site_with_its_cases_whole(tmp_path, task_name):
    folders = _hospitals(tmp_path, task_name)
    _, build, per_patient = TASKS[task_name]
    task = build(_folder_data(path=str(tmp_path), sites="subfolders"), 3)
    for k, (hospital, count) in enumerate(HOSPITALS.items()):
        stats = task.client_data(k).stats
        assert stats["folder"] == folders[k]
        train, val = stats["cases"]["train"], stats["cases"]["val"]
        assert sorted(train + val) == _patients(hospital, count)  # exactly hospital k's patients, each once
        assert train and val and not set(train) & set(val)
        assert stats["n_train"] + stats["n_val"] == per_patient * count
        assert stats["n_val"] == per_patient * len(val)  # whole patients held out


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_a_list_of_hospital_folders_gives_the_sites_of_subfolders(tmp_path, task_name):
    folders = _hospitals(tmp_path, task_name)
    _, build, _ = TASKS[task_name]
    by_subfolders = build(_folder_data(path=str(tmp_path), sites="subfolders"), 3)
    by_list = build(_folder_data(sites=folders), 3)  # no data.path needed
    for k in range(3):
        one, other = by_subfolders.client_data(k), by_list.client_data(k)
        assert one.stats == other.stats
        for a, b in zip(one.train.tensors + one.val.tensors, other.train.tensors + other.val.tensors):
            assert torch.equal(a, b)


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_the_test_folder_is_the_servers_test_set_whole(tmp_path, task_name):
    writer, build, per_patient = TASKS[task_name]
    folders = _hospitals(tmp_path / "hospitals", task_name)
    writer(tmp_path / "test", ["t0", "t1"])
    task = build(_folder_data(sites=folders, test_path=str(tmp_path / "test")), 3)
    test = task.server_data()
    assert len(test) == 2 * per_patient
    stats = task.server_stats()
    assert (stats["folder"], stats["n"], stats["cases"]) == (str(tmp_path / "test"), 2 * per_patient, ["t0", "t1"])
    assert task.evaluate(task.build_model(), test)["loss"] >= 0


def test_the_test_folder_holds_exactly_the_test_slices_unshifted(tmp_path):
    import nibabel

    folders = _hospitals(tmp_path / "hospitals", "segmentation")
    _write_segmentation(tmp_path / "test", ["t0"], top_label=1)
    task = _segmentation(_folder_data(sites=folders, test_path=str(tmp_path / "test")), 3)
    images, masks = task.server_data().tensors
    stored = np.asarray(nibabel.load(tmp_path / "test" / "masks" / "t0.nii.gz").get_fdata()).astype(np.int64)
    assert torch.equal(masks, torch.from_numpy(np.moveaxis(stored, -1, 0)))
    assert images.shape == (SLICES, 1, SIDE, SIDE)


def test_a_subfolder_named_by_test_path_is_no_hospital(tmp_path):
    _hospitals(tmp_path, "ct")
    _write_ct(tmp_path / "test", ["t0", "t1"])
    task = _ct(_folder_data(path=str(tmp_path), sites="subfolders", test_path=str(tmp_path / "test")), 3)
    assert [task.client_data(k).stats["folder"] for k in range(3)] == [str(tmp_path / h) for h in HOSPITALS]
    assert len(task.server_data()) == 2 * SLICES


def test_feature_skew_shifts_each_hospital(tmp_path):
    folders = _hospitals(tmp_path, "segmentation")
    data = _folder_data(sites=folders)
    plain = _segmentation(data, 3).client_data(0)
    shifted = SegmentationTask(TaskContext(
        params=SegmentationParams(image_size=SIDE, channels=(4, 8)), model=None, data=data,
        partition=PartitionSpec(clients=3, kind="feature_skew", params={"severity": 1.0}), seed=0,
    )).client_data(0)
    assert shifted.stats["cases"] == plain.stats["cases"]
    assert shifted.stats["acquisition"] != plain.stats["acquisition"]
    assert not torch.equal(shifted.train.tensors[0], plain.train.tensors[0])


@pytest.mark.parametrize("site", [3, 0])  # site 0 too: its classes are read from every hospital
def test_a_hospital_folder_that_cannot_be_read_is_one_line_naming_it(tmp_path, site):
    _hospitals(tmp_path, "segmentation")
    (tmp_path / "d").mkdir()  # an empty hospital
    task = _segmentation(_folder_data(path=str(tmp_path), sites="subfolders"), 4)
    with pytest.raises(DataError, match=f"{tmp_path / 'd'} has no images/") as error:
        task.client_data(site)
    assert "\n" not in str(error.value)


# --- every site builds the same model --------------------------------------------------------------------
def test_segmentation_classes_are_the_union_of_every_hospital(tmp_path):
    _write_segmentation(tmp_path / "a", _patients("a", 2), top_label=1)
    _write_segmentation(tmp_path / "b", _patients("b", 2), top_label=2)
    _write_segmentation(tmp_path / "c", _patients("c", 2), top_label=1)
    data = _folder_data(path=str(tmp_path), sites="subfolders")
    for k in range(3):
        task = _segmentation(data, 3)  # a fresh task per site, as on each node
        site = task.client_data(k)
        assert task.num_classes == 3
        assert len(site.stats["pixel_class_fractions"]) == 3
        assert task.build_model()(site.train.tensors[0][:1]).shape[1] == 3
    with pytest.raises(DataError, match=f"num_classes=2 but the masks in {tmp_path / 'b'} hold label 2"):
        _segmentation(data, 3, num_classes=2).client_data(0)


def test_mil_bags_have_one_size_over_every_hospital(tmp_path):
    _write_folder(tmp_path / "a", {f"a{i}": (i % 2, 2, []) for i in range(4)})
    _write_folder(tmp_path / "b", {f"b{i}": (i % 2, 3 + i, []) for i in range(4)})
    task = _mil(_folder_data(path=str(tmp_path), sites="subfolders"), 2)
    sizes = {task.client_data(k).train.tensors[0].shape[1] for k in range(2)}
    assert sizes == {4}  # K = min(tiles_per_slide 4, largest slide 6), also at the hospital of 2-tile slides


# --- MIL: a patient's slides stay together ---------------------------------------------------------------
def test_mil_patient_column_keeps_a_patients_slides_together(tmp_path):
    _write_mil(tmp_path, _patients("p", 8))  # 16 slides, 2 per patient
    data = {"source": "folder", "path": str(tmp_path), "server_samples": 3, "val_fraction": 0.25}
    scenario = validate(_raw(data, task="mil", clients=2))  # a pool's server slides: still MIL's own source
    task = _mil(DataSpec(**scenario.data.model_dump()), 2)
    server = task.server_stats()
    assert server["n"] == 4 and len(server["cases"]) == 2  # 3 slides asked: two whole patients
    held = [set(server["cases"])]
    for k in range(2):
        stats = task.client_data(k).stats
        train, val = set(stats["cases"]["train"]), set(stats["cases"]["val"])
        assert train and val and not train & val
        assert stats["n_val"] == 2 * len(val) and stats["n_train"] == 2 * len(train)
        held.append(train | val)
    assert sorted(p for group in held for p in group) == _patients("p", 8)  # every patient in one place


# --- scenarios: keys, paths, refusals --------------------------------------------------------------------
def _raw(data: dict[str, Any], *, task: str = "segmentation", clients: int = 3, kind: str = "iid",
         tmp_path: Path | None = None) -> dict[str, Any]:
    params = {"image_size": SIDE, "channels": [4, 8]} if task == "segmentation" else {}
    raw: dict[str, Any] = {
        "name": "hospitals", "task": {"name": task, "params": params}, "data": data,
        "partition": {"clients": clients, "kind": kind}, "strategy": {"rounds": 1},
        "local": {"batch_size": 4}, "engine": {"backend": "inprocess"}, "output": {"plots": False},
    }
    if tmp_path is not None:
        raw["output"]["dir"] = str(tmp_path / "runs")
    return raw


def test_a_run_on_hospital_folders_records_central_metrics_and_the_folders(tmp_path):
    folders = _hospitals(tmp_path / "hospitals", "segmentation")
    _write_segmentation(tmp_path / "test", ["t0", "t1"])
    scenario = validate(_raw({"source": "folder", "path": str(tmp_path / "hospitals"), "sites": "subfolders",
                              "test_path": str(tmp_path / "test")}, tmp_path=tmp_path))
    run_dir = run(scenario)
    central = [r for r in run_dir.read_metrics() if r["phase"] == "central"]
    assert len(central) == 1 and 0 <= central[0]["aggregate"]["dice"] <= 1
    partitions = json.loads((run_dir.path / "partitions.json").read_text())
    assert [partitions["clients"][str(k)]["folder"] for k in range(3)] == folders
    assert partitions["server"]["n"] == 2 * SLICES and partitions["server"]["cases"] == ["t0", "t1"]


def test_relative_folders_resolve_from_the_scenario_file_and_are_saved_absolute(tmp_path):
    _hospitals(tmp_path / "data", "ct")
    _write_ct(tmp_path / "data" / "test", ["t0", "t1"])
    (tmp_path / "scenarios").mkdir()
    file = tmp_path / "scenarios" / "hospitals.yaml"
    data = {"source": "folder", "sites": ["../data/a", "../data/b", "../data/c"], "test_path": "../data/test"}
    file.write_text(yaml.safe_dump(_raw(data, task="ct")))
    scenario = load(file)
    assert scenario.data.sites == [str(tmp_path / "data" / h) for h in HOSPITALS]
    assert scenario.data.test_path == str(tmp_path / "data" / "test")
    resolved = tmp_path / "run" / "scenario.yaml"  # a run directory's copy, loaded again by --resume
    resolved.parent.mkdir()
    resolved.write_text(scenario.to_yaml())
    assert load(resolved).data == scenario.data


def test_the_new_keys_travel_to_clients_only_when_set(tmp_path):
    plain = validate(_raw({"source": "synthetic"}))
    assert '"sites"' not in plain.to_json() and '"test_path"' not in plain.to_json()
    folders = _hospitals(tmp_path, "ct")
    natural = validate(_raw({"source": "folder", "sites": folders}, task="ct"))
    assert Scenario.from_json(natural.to_json()).data.sites == folders


@pytest.mark.parametrize(("task", "data", "clients", "kind", "words"), [
    ("segmentation", {"sites": "subfolders"}, 4, "iid",
     ["data.sites: 3 hospital folders in", "(a, b, c) but partition.clients is 4"]),
    ("ct", {"sites": "subfolders"}, 2, "iid", ["data.sites: 3 hospital folders", "partition.clients is 2"]),
    ("segmentation", {"sites": "subfolders"}, 3, "label_skew", ["partition.kind: 'label_skew'", "iid"]),
    ("mil", {"sites": "subfolders"}, 3, "quantity_skew", ["partition.kind: 'quantity_skew'"]),
    ("segmentation", {"server_samples": 4}, 3, "iid", ["data.server_samples", "data.test_path"]),
    ("ct", {"server_samples": 4}, 3, "iid", ["data.server_samples", "data.test_path"]),
    ("mil", {"sites": "subfolders", "server_samples": 2}, 3, "iid", ["data.server_samples", "one source"]),
    ("mil", {"test_path": "a", "server_samples": 2}, 3, "iid", ["data.server_samples", "one source"]),
    ("segmentation", {"sites": "hospitals"}, 3, "iid", ["data.sites", "split, subfolders"]),
    ("segmentation", {"sites": ["a", "missing"]}, 2, "iid", ["data.sites[1]: hospital folder not found"]),
    ("segmentation", {"test_path": "missing"}, 3, "iid", ["data.test_path: test folder not found"]),
    ("segmentation", {"sites": ["a", "./a"]}, 2, "iid", ["data.sites: lists a hospital folder twice"]),
    ("ct", {"sites": ["a", "b"], "test_path": "b"}, 2, "iid", ["data.test_path: ", "/b is also a site's folder"]),
])
def test_folder_settings_a_task_cannot_honour_are_refused_naming_the_key(tmp_path, task, data, clients, kind, words):
    _hospitals(tmp_path, task)
    raw = _raw({"source": "folder", "path": str(tmp_path), **data}, task=task, clients=clients, kind=kind)
    with pytest.raises(ScenarioError) as error:
        validate(raw, base_dir=tmp_path)
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


@pytest.mark.parametrize("key", ["sites", "test_path"])
def test_synthetic_data_has_no_hospital_or_test_folders(key):
    value = "subfolders" if key == "sites" else "somewhere"
    with pytest.raises(ScenarioError, match=f"data.{key}: .*need data.source: folder"):
        validate(_raw({"source": "synthetic", key: value}))


def test_medfed_validate_and_run_refuse_with_exit_2_and_no_run_directory(tmp_path, capsys):
    _hospitals(tmp_path / "data", "segmentation")
    file = tmp_path / "hospitals.yaml"
    raw = _raw({"source": "folder", "path": "data", "sites": "subfolders"}, clients=4, tmp_path=tmp_path)
    file.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(file)]) == 2
    assert main(["run", str(file)]) == 2
    assert "partition.clients is 4" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
