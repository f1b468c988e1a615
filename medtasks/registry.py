"""Task registry: task names to :class:`~medtasks.base.Task` classes.

Built-in tasks are imported lazily (a client process imports only the task it
trains). A scenario may also name any importable class as ``"pkg.module:Class"``.
"""

from __future__ import annotations

import importlib
from functools import cache
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
    """The task class registered as ``name`` or importable as ``"pkg.module:Class"``.

    Raises
    ------
    UnknownTaskError
        with the allowed names, when ``name`` cannot be resolved.
    """
    target = BUILTIN_TASKS.get(name, name)
    if ":" not in target:
        allowed = ", ".join(sorted(BUILTIN_TASKS))
        raise UnknownTaskError(f"unknown task '{name}' (allowed: {allowed}, or 'pkg.module:Class')")
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        task_class = getattr(module, class_name)
    except (ImportError, AttributeError) as error:
        raise UnknownTaskError(f"cannot import task '{target}': {error}") from None
    missing = [attr for attr in ("Params", "models", "primary_metric", "higher_is_better") if not hasattr(task_class, attr)]
    if missing:
        raise UnknownTaskError(f"task '{target}' does not implement the Task protocol (missing: {', '.join(missing)})")
    return task_class
