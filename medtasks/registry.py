"""Task registry: task names to :class:`~medtasks.base.Task` classes.

Built-in tasks are imported lazily (a client process imports only the task it
trains). A scenario may also name any importable class as ``"pkg.module:Class"``.

A module that sits beside the scenario file needs no ``PYTHONPATH``: loading the scenario
(:func:`locate_task_module`) writes its folder into the name, ``"/abs/folder/module:Class"``, so the
resolved scenario that travels to every client, and the ``scenario.yaml`` of the run directory, say where
it is. :func:`get_task_class` puts that folder at the front of ``sys.path`` before importing the module,
in whichever process resolves the name: the one that loaded the scenario, a worker of the processes
engine, a Ray actor, a resumed run. Where the folder does not exist (a hospital machine of a deployment,
a Ray cluster node without the coordinator's file system), the module is imported by name and must be
installed there (``pip install``, or ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
import os
import sys
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover - a runtime import would load torch before any task is asked for
    from medtasks.base import Task

BUILTIN_TASKS: dict[str, str] = {
    "segmentation": "medtasks.segmentation:SegmentationTask",
    "ct": "medtasks.ct.task:CTReconstructionTask",
    "mil": "medtasks.mil.task:MILTask",
    "tabular": "medtasks.tabular:TabularTask",
    "digits": "medtasks.digits:DigitsTask",
}


class UnknownTaskError(LookupError):
    """A task name that is neither built in nor an importable ``module:Class``."""


@cache
def get_task_class(name: str) -> type[Task]:
    """The task class registered as ``name`` or importable as ``"pkg.module:Class"`` (or
    ``"/folder/pkg.module:Class"``, the module looked for in that folder first).

    Raises
    ------
    UnknownTaskError
        with the allowed names, when ``name`` cannot be resolved.
    """
    target = BUILTIN_TASKS.get(name, name)
    if ":" not in target:
        allowed = ", ".join(sorted(BUILTIN_TASKS))
        raise UnknownTaskError(f"unknown task '{name}' (allowed: {allowed}, or 'pkg.module:Class')")
    location, _, class_name = target.rpartition(":")
    folder, module_name = os.path.split(location)
    try:
        module = _import_module(module_name, Path(folder) if folder else None)
        task_class = getattr(module, class_name)
    except (ImportError, AttributeError) as error:
        raise UnknownTaskError(f"cannot import task '{target}': {error}") from None
    missing = [attr for attr in ("Params", "models", "primary_metric", "higher_is_better") if not hasattr(task_class, attr)]
    if missing:
        raise UnknownTaskError(f"task '{target}' does not implement the Task protocol (missing: {', '.join(missing)})")
    return task_class


def locate_task_module(name: str, folder: Path) -> str:
    """``name`` with ``folder`` written in front when it names a ``module:Class`` whose top-level module
    (``module.py`` or the package ``module/``) sits in ``folder``; otherwise ``name`` unchanged.

    A built-in name, or one that already carries a folder, is returned as it is.
    """
    if name in BUILTIN_TASKS or ":" not in name:
        return name
    location = name.rpartition(":")[0]
    if os.path.dirname(location):
        return name
    top = location.partition(".")[0]
    if (folder / f"{top}.py").is_file() or (folder / top / "__init__.py").is_file():
        return f"{folder.resolve() / location}:{name.rpartition(':')[2]}"
    return name


def _import_module(module_name: str, folder: Path | None) -> ModuleType:
    """Import ``module_name``, first from ``folder`` (put at the front of ``sys.path``) when it is a folder.

    Raises
    ------
    ImportError
        the module cannot be imported, or one of that name is already imported from elsewhere.
    """
    if folder is None or not folder.is_dir():
        return importlib.import_module(module_name)
    loaded = getattr(sys.modules.get(module_name.partition(".")[0]), "__file__", None)
    if loaded and not Path(loaded).resolve().is_relative_to(folder.resolve()):
        raise ImportError(f"a module '{module_name}' is already imported from {loaded}; rename the one in {folder}")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    return importlib.import_module(module_name)
