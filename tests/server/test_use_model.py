"""``medfed evaluate`` and ``medfed predict`` on tiny runs made here (2 rounds, in-process)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import nibabel
import numpy as np
import pytest
import torch

from server.cli import main
from server.scenario import Scenario, validate
from tests.helpers import new_run_directory, run, small_scenario, write_segmentation_folder

ROUNDS = ["strategy.rounds=2"]


def _raw(task: str, params: dict[str, Any], tmp_path: Path, **data: Any) -> dict[str, Any]:
    return {
        "name": f"use-{task}", "task": {"name": task, "params": params},
        "data": {"samples_per_client": 8, "server_samples": 4, **data}, "partition": {"clients": 2},
        "strategy": {"rounds": 2}, "local": {"batch_size": 4}, "engine": {"backend": "inprocess"},
        "output": {"plots": False, "dir": str(tmp_path / "runs")},
    }


CT_PARAMS = {"image_size": 32, "num_views": 8, "channels": [4, 8]}
MIL_PARAMS = {"tiles_per_slide": 4, "tile_size": 16}


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("segmentation")
    return run(small_scenario(tmp_path, *ROUNDS, "output.plots=false")).path


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("ct")
    return run(validate(_raw("ct", CT_PARAMS, tmp_path))).path


@pytest.fixture(scope="module")
def mil_run(tmp_path_factory) -> Path:
    tmp_path = tmp_path_factory.mktemp("mil")
    return run(validate(_raw("mil", MIL_PARAMS, tmp_path))).path


def _evaluate(capsys, *args: str) -> dict[str, Any]:
    assert main(["evaluate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _final_central(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "summary.json").read_text())["final"]["central"]


def _same(metrics: dict[str, float | None], expected: dict[str, float | None]) -> bool:
    """Equal metrics, an undefined one (``null``) included."""
    nan = float("nan")
    return ({key: nan if metrics[key] is None else metrics[key] for key in expected}
            == pytest.approx({key: nan if value is None else value for key, value in expected.items()},
                             rel=1e-6, nan_ok=True))


def _refusal(capsys, argv: list[str]) -> str:
    """The one line a refused command prints (exit 2)."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- evaluate ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["segmentation_run", "ct_run", "mil_run"])
def test_evaluate_last_equals_the_runs_final_central_metrics(fixture, request, capsys):
    run_dir = request.getfixturevalue(fixture)
    result = _evaluate(capsys, str(run_dir), "--model", "last")
    central = _final_central(run_dir)
    metrics = result["results"]["central"]
    assert _same(metrics, central)
    assert list(Path(result["folder"]).glob("*.png")), "no example pictures"
    assert Path(result["folder"]).parent == run_dir / "evaluate"


def test_evaluate_prints_a_table_of_the_tasks_metrics(segmentation_run, capsys):
    assert main(["evaluate", str(segmentation_run)]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert header.split()[:3] == ["data", "loss", "dice"] and row.startswith("central")


def test_evaluate_on_a_segmentation_folder_reads_it_whole(segmentation_run, tmp_path, capsys):
    folder = write_segmentation_folder(tmp_path / "hospital-x", 5)
    result = _evaluate(capsys, str(segmentation_run), "--data", str(folder))
    metrics = result["results"]["hospital-x"]
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["loss"] > 0
    assert Path(result["folder"]) == segmentation_run / "evaluate" / "hospital-x"
    assert (Path(result["folder"]) / "metrics.json").is_file()


def test_evaluate_on_a_ct_folder_of_hu_slices(ct_run, tmp_path, capsys):
    folder = tmp_path / "ct-slices"
    folder.mkdir()
    for k in range(3):
        hu = np.full((40, 40), -1000.0)
        hu[10:30, 8 + k:30] = 40.0
        np.save(folder / f"p{k}.npy", hu)
    metrics = _evaluate(capsys, str(ct_run), "--data", str(folder))["results"]["ct-slices"]
    assert np.isfinite(metrics["psnr"]) and np.isfinite(metrics["psnr_fbp"])


def _write_slides(root: Path, count: int, *, labels: bool = True) -> Path:
    """``count`` slides of 3–5 ``.npy`` tiles (odd slides hold a dark tile), with ``labels.csv``."""
    rng = np.random.default_rng(0)
    rows = ["slide,label"]
    for s in range(count):
        (root / f"slide{s}").mkdir(parents=True)
        for t in range(3 + s % 3):
            tile = rng.uniform(0.6, 0.9, (20, 20, 3)) * (0.3 if s % 2 and t == 0 else 1.0)
            np.save(root / f"slide{s}" / f"t{t}.npy", tile)
        rows.append(f"slide{s},{s % 2}")
    if labels:
        (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_evaluate_on_a_mil_folder_of_slides(mil_run, tmp_path, capsys):
    folder = _write_slides(tmp_path / "slides", 6)
    metrics = _evaluate(capsys, str(mil_run), "--data", str(folder))["results"]["slides"]
    assert 0.0 <= metrics["auc"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0


def test_a_folder_that_cannot_be_read_is_one_line(segmentation_run, tmp_path, capsys):
    assert "does not exist" in _refusal(capsys, ["evaluate", str(segmentation_run), "--data", str(tmp_path / "no")])


def test_a_folder_that_is_no_run_directory_is_one_line(tmp_path, capsys):
    assert "not a run directory" in _refusal(capsys, ["evaluate", str(tmp_path)])


# --- predict -----------------------------------------------------------------------------------------
def test_predict_segments_numpy_and_nifti_images_into_masks_on_their_grid(segmentation_run, tmp_path, capsys):
    images = write_segmentation_folder(tmp_path / "data", 2, with_masks=False) / "images"
    volume = np.stack([np.load(images / "case00.npy")[:, :30]] * 3, axis=-1)  # [40, 30, 3], not square
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    nibabel.save(nibabel.Nifti1Image(volume, affine), images / "vol.nii.gz")
    assert main(["predict", str(segmentation_run), str(images), str(tmp_path / "out")]) == 0
    masks = {path.name: nibabel.load(path) for path in (tmp_path / "out").iterdir()}
    assert sorted(masks) == ["case00_mask.nii.gz", "case01_mask.nii.gz", "vol_mask.nii.gz"]
    assert masks["case00_mask.nii.gz"].shape == (40, 40)
    assert masks["vol_mask.nii.gz"].shape == (40, 30, 3)
    assert np.allclose(masks["vol_mask.nii.gz"].affine, affine)
    for image in masks.values():
        labels = np.asarray(image.dataobj)
        assert np.issubdtype(labels.dtype, np.integer) and labels.min() >= 0 and labels.max() < 4


def test_predict_one_file(segmentation_run, tmp_path, capsys):
    image = write_segmentation_folder(tmp_path / "data", 1, with_masks=False) / "images" / "case00.npy"
    assert main(["predict", str(segmentation_run), str(image), str(tmp_path / "out")]) == 0
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["case00_mask.nii.gz"]


def test_predict_reconstructs_sinograms_of_the_runs_scanner_in_hu(ct_run, tmp_path, capsys):
    from medtasks.ct.operator import Geometry, get_operator
    from medtasks.ct.physics import MU_WATER

    operator = get_operator(Geometry.sparse_view(32, 8, 180.0))
    phantom = torch.zeros(2, 32, 32)
    phantom[:, 8:24, 10:22] = MU_WATER
    sinograms = operator.forward(phantom).numpy()  # [2, 8, 32]
    (tmp_path / "in").mkdir()
    np.save(tmp_path / "in" / "one.npy", sinograms[0])
    np.save(tmp_path / "in" / "stack.npy", np.moveaxis(sinograms, 0, -1))
    assert main(["predict", str(ct_run), str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    one, stack = (nibabel.load(tmp_path / "out" / f"{name}_recon.nii.gz") for name in ("one", "stack"))
    assert one.shape == (32, 32) and stack.shape == (32, 32, 2)
    hu = np.asarray(stack.dataobj)
    assert hu.dtype == np.float32 and np.isfinite(hu).all()
    assert np.median(hu[12:20, 12:20]) > np.median(hu[:4, :4])  # water inside, air outside


def test_predict_refuses_a_sinogram_of_another_geometry(ct_run, tmp_path, capsys):
    np.save(tmp_path / "bad.npy", np.zeros((9, 32)))
    line = _refusal(capsys, ["predict", str(ct_run), str(tmp_path / "bad.npy"), str(tmp_path / "out")])
    assert "(9, 32)" in line and "(8, 32)" in line


def test_predict_scores_every_slide_and_draws_its_attention(mil_run, tmp_path, capsys):
    slides = _write_slides(tmp_path / "slides", 3, labels=False)
    assert main(["predict", str(mil_run), str(slides), str(tmp_path / "out")]) == 0
    with open(tmp_path / "out" / "scores.csv", encoding="utf-8") as handle:
        scores = list(csv.DictReader(handle))
    assert [row["slide"] for row in scores] == ["slide0", "slide1", "slide2"]
    assert all(0.0 <= float(row["probability"]) <= 1.0 for row in scores)
    with open(tmp_path / "out" / "attention.csv", encoding="utf-8") as handle:
        attention = list(csv.DictReader(handle))
    assert len(attention) == 3 + 4 + 5
    assert all((tmp_path / "out" / f"slide{s}_attention.png").is_file() for s in range(3))


@pytest.mark.parametrize("task", ["tabular", "digits"])
def test_predict_is_refused_for_tasks_without_it(task, tmp_path, capsys):
    scenario = validate(_raw(task, {}, tmp_path))
    run_dir = new_run_directory(scenario)
    line = _refusal(capsys, ["predict", str(run_dir.path), str(tmp_path), str(tmp_path / "out")])
    assert f"the {task} task cannot predict" in line


# --- a model per site --------------------------------------------------------------------------------
def _per_site_run(tmp_path: Path, *overrides: str) -> Path:
    scenario: Scenario = small_scenario(tmp_path, *ROUNDS, "output.plots=false", *overrides)
    return run(scenario).path


def test_fedbn_needs_a_site_and_evaluates_its_own_model(tmp_path, capsys):
    run_dir = _per_site_run(tmp_path, "strategy.name=fedbn", "task.params.norm=batch")
    capsys.readouterr()  # the run's log
    line = _refusal(capsys, ["evaluate", str(run_dir), "--model", "last"])
    assert "--site K" in line and "sites: 0, 1, 2, 3" in line
    site0 = _evaluate(capsys, str(run_dir), "--model", "last", "--site", "0")["results"]["central"]
    site1 = _evaluate(capsys, str(run_dir), "--model", "last", "--site", "1")["results"]["central"]
    assert site0["loss"] != site1["loss"]  # each site's own BatchNorm
    assert "no model of site 9" in _refusal(capsys, ["evaluate", str(run_dir), "--model", "last", "--site", "9"])


def test_local_only_site_model_equals_its_central_record(tmp_path, capsys):
    run_dir = _per_site_run(tmp_path, "strategy.name=local")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    central = [record for record in records if record["phase"] == "central"][-1]["clients"]["1"]
    metrics = _evaluate(capsys, str(run_dir), "--model", "last", "--site", "1")["results"]["central"]
    assert _same(metrics, central)


def test_best_gives_each_sites_model_of_the_best_round(tmp_path, capsys):
    run_dir = _per_site_run(tmp_path, "strategy.name=local", "strategy.rounds=4", "local.lr=0.01")
    best_round = json.loads((run_dir / "summary.json").read_text())["best"]["round"]
    assert best_round == 3  # not the last checkpoint's round, 4
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    central = next(r for r in records if r["phase"] == "central" and r["round"] == best_round)["clients"]["1"]
    metrics = _evaluate(capsys, str(run_dir), "--model", "best", "--site", "1")["results"]["central"]
    assert _same(metrics, central)


def test_a_global_model_refuses_a_site(segmentation_run, capsys):
    assert "leave out --site" in _refusal(capsys, ["evaluate", str(segmentation_run), "--site", "0"])
