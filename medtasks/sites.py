"""Where the sites of a folder task come from: one pool split across sites, or one folder per hospital.

Real multi-site studies start from one folder per hospital, whose data differ for real (the natural
splits of FLamby, Ogier du Terrail et al. 2022, arXiv:2210.04620). ``data.sites`` says which
(:class:`medtasks.base.DataSpec`):

* ``split`` (default): ``data.path`` is one pool that :func:`medtasks.partition.split_indices`
  divides across ``partition.clients`` simulated sites, by case (:func:`split_pool`);
* ``subfolders``: every sub-folder of ``data.path``, sorted by name, is one hospital; hidden
  folders and the folder ``data.test_path`` names are left out;
* a list of folders: each is one hospital, in the list's order.

With hospital folders (:func:`hospital_folders`) site ``k`` is the ``k``-th folder, read whole, and
``partition.clients`` must equal their number. Its own train/validation split keeps cases whole
exactly as for a pooled site. ``partition.kind`` ``iid`` leaves the hospitals as they are;
``feature_skew`` and ``concept_shift`` still shift each hospital's acquisition / annotator;
``label_skew`` and ``quantity_skew`` are refused, since the hospitals' own data is the split.

``data.test_path`` is a folder in the layout of one site's folder, read whole as the server's central
test set, never shifted, in every ``sites`` mode.

A task that reads hospital folders declares ``reads_hospital_folders = True``; one whose
``data.server_samples`` draws a test set from the pooled ``data.path`` (MIL) declares
``pooled_test_set = True``. :func:`check_data` refuses what a task cannot honour, in one line naming
the key: the tasks call it when built, and :mod:`server.scenario` when it loads a scenario.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medtasks.base import DataError, DataSpec, PartitionSpec, TaskContext
from medtasks.partition import split_indices

__all__ = ["HOSPITAL_KINDS", "check_data", "data_folders", "has_test_set", "hospital_folders", "natural_sites",
           "site_rows", "split_pool"]

HOSPITAL_KINDS: tuple[str, ...] = ("iid", "feature_skew", "concept_shift")
"""``partition.kind`` values allowed with hospital folders (the others split a pool)."""


def has_test_set(data: DataSpec | Any) -> bool:
    """Whether ``data`` (a :class:`~medtasks.base.DataSpec` or the scenario's ``data`` section) gives the server a
    central test set: ``server_samples`` drawn by the task, or the folder ``test_path``."""
    return data.server_samples > 0 or data.test_path is not None


def natural_sites(data: DataSpec) -> bool:
    """Whether every site is a hospital folder (``data.sites`` is ``subfolders`` or a list)."""
    return data.sites != "split"


def hospital_folders(data: DataSpec) -> list[str]:
    """The hospital folders of ``data``, in partition-id order (empty for ``data.sites: split``).

    Raises
    ------
    DataError
        ``subfolders`` with a ``data.path`` that is no folder or holds no sub-folder.
    """
    if not natural_sites(data):
        return []
    if not isinstance(data.sites, str):
        return [str(folder) for folder in data.sites]
    root = Path(data.path or "")
    if not root.is_dir():
        raise DataError(f"data.sites: subfolders: data folder {root} does not exist or is not a directory")
    test = Path(data.test_path).resolve() if data.test_path else None
    folders = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.resolve() != test),
        key=lambda p: p.name,
    )
    if not folders:
        raise DataError(f"data.sites: subfolders: {root} holds no hospital sub-folder")
    return [str(folder) for folder in folders]


def data_folders(data: DataSpec) -> list[str]:
    """Every folder the sites and the server read: the hospital folders (else ``data.path``), then
    ``data.test_path`` if set. A setting every site must agree on (the segmentation classes, the MIL bag
    size) is read from all of them, so that every site builds the same model."""
    folders = hospital_folders(data) or [str(data.path)]
    return folders + ([data.test_path] if data.test_path else [])


def site_rows(data: DataSpec, partition: PartitionSpec, seed: int, partition_id: int,
              pool: Callable[[str], tuple[np.ndarray, np.ndarray]], what: str) -> tuple[str, np.ndarray]:
    """The folder site ``partition_id`` reads and its rows of that folder.

    Parameters
    ----------
    data : DataSpec
        the data section.
    partition : PartitionSpec
        the partition section.
    seed : int
        the scenario seed.
    partition_id : int
        the site ``k``.
    pool : Callable[[str], tuple[np.ndarray, np.ndarray]]
        a folder's ``(labels [N], cases [N])``: the label a partition kind splits by and the case
        (patient) of each of its samples.
    what : str
        what a sample is, for an error message (``"slices"``).

    Returns
    -------
    tuple[str, np.ndarray]
        ``(folder, rows)``: the ``k``-th hospital folder and all its rows; with ``data.sites: split``
        ``data.path`` and site ``k``'s part of :func:`split_pool` (sorted ``int64``).

    Raises
    ------
    DataError
        the pool cannot be split (:func:`split_pool`).
    """
    folders = hospital_folders(data)
    if folders:
        folder = folders[partition_id]
        return folder, np.arange(len(pool(folder)[0]), dtype=np.int64)
    folder = str(data.path)
    labels, cases = pool(folder)
    return folder, split_pool(labels, cases, partition, seed, f"{what} of {folder}")[partition_id]


def _names(folders: Sequence[str]) -> str:
    """The folders' own names, for a message (``a, b, c``; the first six)."""
    shown = ", ".join(Path(folder).name for folder in folders[:6])
    return shown + (", ..." if len(folders) > 6 else "")


def check_data(task: type, ctx: TaskContext) -> None:
    """Refuse the ``data`` settings ``task`` cannot honour with ``ctx.partition``.

    Parameters
    ----------
    task : type
        the task class; its optional ``reads_hospital_folders`` and ``pooled_test_set`` class attributes
        (module docstring) say what it reads.
    ctx : TaskContext
        the task's context (paths already resolved).

    Raises
    ------
    ValueError
        one line naming the key: hospital folders or ``data.test_path`` for a task that reads one pool
        only; hospital folders with a pool-splitting ``partition.kind`` or a ``partition.clients`` other
        than their number; a ``data.test_path`` that is also a site's folder; ``data.server_samples``
        where the task takes no test set from a pool, or beside another source of it.
    """
    data, partition = ctx.data, ctx.partition
    if data.source != "folder":
        return
    natural = natural_sites(data)
    if not data.path and not (natural and not isinstance(data.sites, str)):
        raise DataError("data.source 'folder' needs data.path")
    name = getattr(task, "name", task.__name__)
    if not getattr(task, "reads_hospital_folders", False):
        if natural or data.test_path:
            key = "data.sites" if natural else "data.test_path"
            raise ValueError(f"{key}: the {name} task reads one data folder (data.path); it has no hospital "
                             "folders nor test folder")
        return
    if natural:
        _check_hospitals(data, partition)
    if data.test_path:
        _check_test_held_out(data)
    if data.server_samples > 0:
        _check_server_samples(data, name, pooled=getattr(task, "pooled_test_set", False))


def _check_hospitals(data: DataSpec, partition: PartitionSpec) -> None:
    """``partition`` fits the hospital folders of ``data``: an allowed kind, one site per folder."""
    if partition.kind not in HOSPITAL_KINDS:
        raise ValueError(
            f"partition.kind: '{partition.kind}' splits one pool, but with data.sites each hospital's own "
            f"data is its site (allowed with hospital folders: {', '.join(HOSPITAL_KINDS)})"
        )
    folders = hospital_folders(data)
    if len(folders) != partition.clients:
        where = f"in {data.path} " if isinstance(data.sites, str) else ""
        counted = f"{len(folders)} hospital folder{'s' if len(folders) > 1 else ''}"
        raise ValueError(f"data.sites: {counted} {where}({_names(folders)}) but partition.clients is {partition.clients}")


def _check_test_held_out(data: DataSpec) -> None:
    """``data.test_path`` is none of the folders the sites train on."""
    test = Path(str(data.test_path)).resolve()
    if any(Path(folder).resolve() == test for folder in hospital_folders(data) or [str(data.path)]):
        raise ValueError(f"data.test_path: {data.test_path} is also a site's folder; the central test set "
                         "must be held out of every site")


def _check_server_samples(data: DataSpec, task: str, *, pooled: bool) -> None:
    """``data.server_samples > 0`` is the test set's only source, and one the task can draw."""
    if not pooled:
        raise ValueError(f"data.server_samples: the {task} task draws no test set from a data folder; give "
                         "the central test set its own folder with data.test_path (and server_samples: 0)")
    if natural_sites(data) or data.test_path:
        other = "data.test_path" if data.test_path else "the hospital folders (data.sites)"
        raise ValueError(f"data.server_samples: the central test set has one source; with {other} it is "
                         "data.test_path alone: set server_samples: 0 (and give data.test_path)")


def split_pool(labels: np.ndarray, cases: np.ndarray | None, partition: PartitionSpec, seed: int,
               what: str) -> list[np.ndarray]:
    """:func:`~medtasks.partition.split_indices` of a pool by ``partition``, whole cases per site.

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` the label each partition kind splits by.
    cases : np.ndarray | None
        ``[N]`` the case (patient) of each sample; ``None``: every sample is its own case.
    partition : PartitionSpec
        kind, its params and the number of sites.
    seed : int
        the scenario seed.
    what : str
        the pool in an error message, e.g. ``"samples of /data/liver"``.

    Raises
    ------
    DataError
        ``cannot split the <N> <what>: <why>`` (too few cases, an impossible label skew).
    """
    try:
        return split_indices(labels, partition.kind, partition.params, num_clients=partition.clients, seed=seed,
                             groups=cases)
    except ValueError as error:
        raise DataError(f"cannot split the {len(labels)} {what}: {error}") from None
