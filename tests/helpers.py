"""Scaffolding shared by the end-to-end and strategy tests.

* runs: :func:`run` a scenario into a fresh run directory, :func:`interrupted_and_resumed` for ``--resume``,
  :func:`without_timing` to compare metrics that must be reproducible;
* toy scenarios on ``tests/strategies/toy_tasks.py``: :func:`toy_scenario` and its two presets
  :func:`quadratic_scenario` and :func:`blobs_scenario`, read back with :func:`final_weight` / :func:`final_accuracy`;
* task specifications: :func:`check_registered`, :func:`check_evaluate`;
* Flower messages made by hand: :func:`make_message`, :func:`reply_message`, and :func:`message_grid` for strategies
  that create their own messages.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from medtasks.registry import get_task_class
from server.cli import main
from server.engines import InProcessGrid, run_scenario
from server.progress import Progress, make_progress
from server.results import RunDirectory
from server.scenario import Scenario, ScenarioError, load, validate

QUADRATIC = "tests.strategies.toy_tasks:QuadraticTask"
BLOBS = "tests.strategies.toy_tasks:BlobsTask"
FULL_BATCH = 1000  # larger than any site of the toy tasks here
GRADIENT_DESCENT = {"epochs": 10, "batch_size": FULL_BATCH, "optimizer": "sgd", "lr": 0.3}  # 10 full-batch steps
ONE_SGD_EPOCH = {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.1}


# --- runs ----------------------------------------------------------------------------------------------
def new_run_directory(scenario: Scenario, directory: Path | None = None) -> RunDirectory:
    """A fresh run directory under ``directory`` (default: the scenario's ``output.dir``) holding scenario.yaml."""
    run_dir = RunDirectory.create(directory or scenario.output.dir, scenario.name)
    run_dir.write_scenario(scenario.to_yaml())
    return run_dir


ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "scenarios" / "quickstart.yaml"
SMALL = [  # the quickstart shrunk to seconds: 32 px images, 20 slices per site, in-process
    "task.params.image_size=32",
    "data.samples_per_client=20",
    "data.server_samples=8",
    "local.batch_size=8",
    "local.lr=0.01",
    "engine.backend=inprocess",
]


def small_scenario(tmp_path: Path, *overrides: str) -> Scenario:
    """The quickstart scenario made small (:data:`SMALL`), writing under ``tmp_path``."""
    return load(QUICKSTART, [*SMALL, f"output.dir={tmp_path / 'runs'}", *overrides])


def run(scenario: Scenario, directory: Path | None = None, *, progress: Progress | None = None) -> RunDirectory:
    """Runs ``scenario`` on its engine into :func:`new_run_directory` ``(scenario, directory)``."""
    run_dir = new_run_directory(scenario, directory)
    run_scenario(scenario, run_dir, progress or make_progress(interactive=False))
    return run_dir


class InterruptAfter:
    """A progress display that raises KeyboardInterrupt once a given round is done (Ctrl-C)."""

    def __init__(self, round_: int) -> None:
        self.inner, self.round = make_progress(interactive=False), round_

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def round_done(self, server_round: int, metrics: dict) -> None:
        self.inner.round_done(server_round, metrics)
        if server_round == self.round:
            raise KeyboardInterrupt


def interrupted_and_resumed(scenario: Scenario, after: int = 2) -> tuple[RunDirectory, RunDirectory]:
    """Runs ``scenario`` straight through, and again stopped by Ctrl-C after round ``after`` then finished by
    ``medfed run --resume``; returns (the resumed run, the uninterrupted run).

    Checks that the interrupted run's metrics stop at round ``after``, that it wrote no summary.json, and that
    ``--resume`` exits 0.
    """
    uninterrupted = run(scenario)
    interrupted = new_run_directory(scenario)
    with pytest.raises(KeyboardInterrupt):
        run_scenario(scenario, interrupted, InterruptAfter(after))
    last_round = max(r["round"] for r in interrupted.read_metrics())
    assert last_round == after, f"metrics of the interrupted run go to round {last_round}, not {after}"
    assert not (interrupted.path / "summary.json").exists(), "an interrupted run wrote summary.json"
    assert main(["run", "--resume", str(interrupted.path)]) == 0, "medfed run --resume failed"
    return interrupted, uninterrupted


def without_timing(records: list[dict]) -> list[dict]:
    """Records with wall-clock fields removed (everything else must be reproducible)."""
    cleaned = []
    for record in records:
        record = {k: v for k, v in record.items() if k != "seconds"}
        record["aggregate"] = {k: v for k, v in record["aggregate"].items() if k != "seconds"}
        record["clients"] = {pid: {k: v for k, v in m.items() if k != "seconds"} for pid, m in record["clients"].items()}
        cleaned.append(record)
    return cleaned


def write_segmentation_folder(root: Path, count: int, *, with_masks: bool = True) -> Path:
    """A user's data folder of ``count`` 40×40 ``.npy`` slices in ``images/`` (and label maps in ``masks/``)."""
    import numpy as np

    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    if with_masks:
        (root / "masks").mkdir()
    for k in range(count):
        mask = np.zeros((40, 40), dtype=np.int64)
        mask[8 + k % 5: 25, 10:28] = 1
        mask[14:18, 14:18] = 3 if k % 2 else 1
        mask[30:36, 5:12] = 2
        np.save(root / "images" / f"case{k:02d}.npy", (mask * 40 + rng.normal(0, 5, mask.shape)).astype(np.float32))
        if with_masks:
            np.save(root / "masks" / f"case{k:02d}.npy", mask)
    return root


def write_dicom(path: Path, stored: Any, slope: float = 1.0, intercept: float = 0.0, *,
                patient_id: str = "PAT-7", series: str = "") -> Path:
    """A minimal valid single-frame 16-bit DICOM file holding ``stored`` values (``[H, W]``), of patient
    ``patient_id`` (empty: no PatientID) and series ``series`` (empty: no SeriesInstanceUID)."""
    import numpy as np
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    if patient_id:
        ds.PatientID = patient_id
    if series:
        ds.SeriesInstanceUID = series
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = np.asarray(stored).astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return Path(path)


# --- toy scenarios -------------------------------------------------------------------------------------
def toy_scenario(task: str, strategy: str, *, rounds: int, clients: int, samples: int, local: Mapping[str, Any],
                 server_samples: int = 0, model: str | None = None, task_params: Mapping[str, Any] | None = None,
                 seed: int = 0, output: Mapping[str, Any] | None = None, **strategy_keys: Any) -> Scenario:
    """A scenario named ``<task>-<strategy>`` (e.g. quadratic-fedavg) on a toy task, in-process, without plots.

    Args:
        task: ``QUADRATIC``, ``BLOBS`` or another ``module:Class`` task.
        model: ``task.model`` (None: left out, i.e. the task's default).
        samples: ``data.samples_per_client``; ``clients``: ``partition.clients``.
        output: keys of the output section besides ``plots: false`` (e.g. ``dir``).
        strategy_keys: keys of the strategy section besides name and rounds (e.g. ``params``, ``fraction_train``).
    """
    task_section: dict[str, Any] = {"name": task, "params": dict(task_params or {})}
    if model is not None:
        task_section["model"] = model
    return validate({
        "name": f"{task.rsplit(':', 1)[-1].removesuffix('Task').lower()}-{strategy}",
        "seed": seed,
        "task": task_section,
        "data": {"samples_per_client": samples, "server_samples": server_samples},
        "partition": {"clients": clients},
        "strategy": {"name": strategy, "rounds": rounds, **strategy_keys},
        "local": dict(local),
        "engine": {"backend": "inprocess"},
        "output": {"plots": False, **(output or {})},
    })


def quadratic_scenario(tmp_path: Path, strategy: str, *, rounds: int = 40, clients: int = 3,
                       local: Mapping[str, Any] = GRADIENT_DESCENT, **strategy_keys: Any) -> Scenario:
    """The quadratic task's linear model, 20 + 3k examples at site k, runs under ``tmp_path/runs``.

    Default: 3 sites, 40 rounds of 10 full-batch gradient-descent steps (lr 0.3) each, enough for the baselines
    to reach their optima.
    """
    return toy_scenario(QUADRATIC, strategy, rounds=rounds, clients=clients, samples=20, local=local, model="linear",
                        output={"dir": str(tmp_path / "runs")}, **strategy_keys)


def blobs_scenario(strategy: str, params: dict[str, Any] | None = None, *, rounds: int = 1, seed: int = 0,
                   sites: int = 3, fraction_train: float = 1.0, task: str = BLOBS, **task_params: Any) -> Scenario:
    """A small scenario on the blobs task (or ``task``): 64 examples per site and 32 on the server, one SGD epoch
    (batches of 16, lr 0.1) per round, the task's default model; runs go where :func:`run` is told."""
    return toy_scenario(task, strategy, rounds=rounds, clients=sites, samples=64, server_samples=32,
                        local=ONE_SGD_EPOCH, task_params=task_params, seed=seed, fraction_train=fraction_train,
                        params=params or {})


def final_weight(run_dir: RunDirectory) -> torch.Tensor:
    """The global linear model's weight after the last round, shape (dim,), float64."""
    return run_dir.load_checkpoint().arrays["weight"].squeeze(0).double()


def final_accuracy(run_dir: RunDirectory) -> float:
    """Federated (each site's own model on its own validation split) accuracy of the last round."""
    return [r for r in run_dir.read_metrics() if r["phase"] == "evaluate"][-1]["aggregate"]["accuracy"]


# --- task specifications -------------------------------------------------------------------------------
def check_registered(task: str, task_class: type, unknown_params: Mapping[str, Any]) -> None:
    """The registry maps ``task`` to ``task_class``, and the scenario loader rejects ``task.params`` =
    ``unknown_params`` (keys the task does not know, or values it refuses) with an error naming the first key."""
    assert get_task_class(task) is task_class
    raw = {"name": "t", "task": {"name": task, "params": dict(unknown_params)}, "partition": {"clients": 2},
           "strategy": {"rounds": 1}}
    with pytest.raises(ScenarioError, match=next(iter(unknown_params))):
        validate(raw)


def check_evaluate(task: Any, model: torch.nn.Module, dataset: Any) -> dict[str, float]:
    """``task.evaluate(model, dataset)`` against one full-batch forward pass of ``model`` on ``dataset.tensors``
    (mean cross-entropy to a relative 1e-5, accuracy); returns the metrics."""
    x, y = dataset.tensors
    with torch.no_grad():
        logits = model(x)
    metrics = task.evaluate(model, dataset)
    assert metrics["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, y)), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float((logits.argmax(1) == y).float().mean()))
    return metrics


# --- Flower messages -----------------------------------------------------------------------------------
def make_message(content: RecordDict, *, src_node_id: int, dst_node_id: int, server_round: int = 1) -> Message:
    """A train message between the server (node 0) and a node, with the metadata a Flower runtime would set."""
    metadata = Metadata(run_id=1, message_id=f"m{src_node_id or dst_node_id}", src_node_id=src_node_id,
                        dst_node_id=dst_node_id, reply_to_message_id="", group_id=str(server_round),
                        created_at=time.time(), ttl=3600, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=metadata)


def reply_message(node_id: int, records: Mapping[str, ArrayRecord], *, num_examples: int, loss: float = 1.0) -> Message:
    """Node ``node_id``'s reply to round 1's train message: ``records`` plus metrics ``loss`` and ``num-examples``."""
    metrics = MetricRecord({"loss": loss, "num-examples": num_examples})
    return make_message(RecordDict({**records, "metrics": metrics}), src_node_id=node_id, dst_node_id=0)


def message_grid(num_nodes: int) -> InProcessGrid:
    """A server runtime to build messages in: Flower's ``Message(content, dst_node_id, ...)`` needs one."""
    from client.app import app

    return InProcessGrid(app, num_nodes)


def single_torch_thread() -> Iterator[None]:
    """Run with one torch thread, then restore the previous count (wrap with ``pytest.fixture``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
