"""The contract every medical task fulfils (docs/architecture.md, "Adding a task").

A task owns its data (synthetic generator or real-data loader), its model, its
loss and its metrics. The federated machinery (server, client, strategies) only
talks to a task through :class:`Task`, so a new task plugs in without touching
them: register it in :mod:`medtasks.registry` or name it as ``"pkg.module:Class"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict
from torch.utils.data import ConcatDataset, Dataset


class TaskParams(BaseModel):
    """Base class of a task's ``task.params`` schema (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class DataSpec:
    """Where a task's data comes from (the scenario's ``data`` section).

    Attributes
    ----------
    source : str
        ``"synthetic"`` (the task's generator) or ``"folder"`` (real data at ``path``).
    path : str | None
        folder of real data, required when ``source == "folder"`` (unless ``sites`` lists the folders).
    sites : str | Sequence[str]
        where the sites of folder data come from (:mod:`medtasks.sites`): ``"split"`` (``path`` is one
        pool split by the partition), ``"subfolders"`` (every sub-folder of ``path`` is one hospital,
        one site, sorted by name) or the hospital folders themselves, one site each, in order.
    test_path : str | None
        folder read whole as the server's central test set, in the layout of one site's folder
        (``None`` = none from a folder).
    samples_per_client : int
        mean number of samples a site holds (train + validation).
    val_fraction : float
        fraction of each site's samples held out for federated evaluation.
    server_samples : int
        size of the central test set held by the server (0 = none).
    params : Mapping[str, Any]
        source-specific settings, documented by each task.
    """

    source: str = "synthetic"
    path: str | None = None
    sites: Literal["split", "subfolders"] | Sequence[str] = "split"
    test_path: str | None = None
    samples_per_client: int = 64
    val_fraction: float = 0.2
    server_samples: int = 0
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PartitionSpec:
    """How data is split across sites (the scenario's ``partition`` section)."""

    clients: int
    kind: str = "iid"
    params: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskContext:
    """Everything a task needs to build its data and model.

    Attributes
    ----------
    params : TaskParams
        the task's validated ``task.params`` (an instance of ``Task.Params``).
    model : str | None
        the model name from ``task.model`` (``None`` = the task's default).
    data : DataSpec
        the data section.
    partition : PartitionSpec
        the partition section.
    seed : int
        the scenario seed; derive streams with :mod:`medtasks.seeding`.
    """

    params: TaskParams
    model: str | None
    data: DataSpec
    partition: PartitionSpec
    seed: int


@dataclass
class ClientData:
    """One site's data.

    Attributes
    ----------
    train : Dataset
        training samples.
    val : Dataset
        held-out samples of the same site (federated evaluation).
    stats : dict[str, Any]
        JSON-serialisable description written to ``partitions.json``: at least
        ``n_train``, ``n_val`` and ``label_histogram``, plus the drawn acquisition /
        annotator parameters of the site.
    """

    train: Dataset
    val: Dataset
    stats: dict[str, Any]


def checked_params(task: type[Task], ctx: TaskContext) -> TaskParams:
    """``ctx.params`` as an instance of ``task.Params``, after the checks every task shares.

    Raises
    ------
    ValueError
        ``ctx.model`` is not one of ``task.models``, or ``data.params`` is not
        empty (no built-in task takes any).
    """
    params = ctx.params
    if not isinstance(params, task.Params):
        raw = params.model_dump() if isinstance(params, TaskParams) else dict(params or {})
        params = task.Params.model_validate(raw)
    if ctx.model not in (None, *task.models):
        raise ValueError(f"unknown {task.name} model {ctx.model!r}; available: {', '.join(task.models)}")
    if ctx.data.params:
        raise ValueError(f"the {task.name} task takes no data.params, got {sorted(ctx.data.params)}")
    return params


class DataError(ValueError):
    """Bad or missing data (a folder that does not exist, unreadable files, empty site)."""


@runtime_checkable
class Task(Protocol):
    """A medical task as the federated machinery sees it.

    Implementations take a :class:`TaskContext` in ``__init__`` and declare
    ``Params`` (a :class:`TaskParams` subclass) and ``models`` (accepted
    ``task.model`` names) as class attributes so scenario files are validated
    before anything runs.

    Optional class attribute: ``batches_within_site = True`` for a task whose
    mini-batches must not mix sites (e.g. a CT batch shares one scanner geometry);
    the centralized baseline then batches its pooled data site by site. And
    ``per_sample_gradients = False`` for a task whose layers see sub-units of an
    example (a MIL bag's tiles): sample-level DP-SGD then refuses it. And
    ``reads_hospital_folders = True`` for a folder task that reads ``data.sites`` and
    ``data.test_path`` (``pooled_test_set = True`` when its ``data.server_samples`` draws
    the test set from a pooled ``data.path``): :func:`medtasks.sites.check_data`. An optional
    method ``server_stats() -> dict | None`` describes the central test set for
    ``partitions.json`` (``"server"``: at least its size ``n``, and its ``cases``). Two more
    serve ``medfed evaluate`` and ``medfed predict`` (:mod:`medtasks.prediction`):
    ``folder_dataset(folder) -> Dataset`` reads a folder whole as an evaluation set, and
    ``predict_files(model, input_path, output_path)`` writes the model's outputs for new inputs.
    And ``metric_units: dict[str, str]`` names the unit of a metric for the plots' axes
    (``{"psnr": "dB"}``; :func:`server.plots.metric_units`).
    """

    name: ClassVar[str]
    Params: ClassVar[type[TaskParams]]
    models: ClassVar[tuple[str, ...]]
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool]

    def __init__(self, ctx: TaskContext) -> None:
        """Build the task for one scenario (validate ``ctx``; data and model are made lazily)."""

    def build_model(self) -> torch.nn.Module:
        """A freshly initialised model (deterministic given the scenario seed)."""

    def client_data(self, partition_id: int) -> ClientData:
        """The train/validation data of site ``partition_id`` (0-based)."""

    def server_data(self) -> Dataset | None:
        """The central held-out test set, or ``None`` if the scenario has none."""

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        """Scalar training loss of ``model`` on one batch from a DataLoader over ``train``."""

    def evaluate(self, model: torch.nn.Module, dataset: Dataset) -> dict[str, float]:
        """Metrics of ``model`` on ``dataset`` (must include ``primary_metric`` and ``loss``)."""

    def plot_examples(self, model: torch.nn.Module, dataset: Dataset, path: Path) -> None:
        """Save a PNG picture of the model's output on a few samples of ``dataset``.

        An implementation may take a keyword ``title: str = ""``, the picture's heading (which model, round and
        data set); :class:`server.example_plots.ExamplePlots` passes it to those that do.
        """


class PooledSites(ConcatDataset):
    """Several sites' datasets trained on as one (the centralized baseline).

    Mini-batches mix sites like any shuffled dataset, unless ``by_site``: then every
    mini-batch holds samples of one site only, for tasks whose batches must share
    something that differs by site (a CT scanner's geometry). Each epoch then
    shuffles every site's samples, cuts them into batches and shuffles the order of
    all batches, so an epoch still visits each pooled sample exactly once.
    """

    def __init__(self, sites: list[Dataset], *, by_site: bool = False) -> None:
        super().__init__(sites)
        self.by_site = by_site
