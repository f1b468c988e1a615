"""Per-process caches: a client process builds each task (and its data) once.

Data generation or loading is the expensive part of a client message; workers
are reused across rounds and sites (Ray actors, the in-process engine), so the
task object is cached by everything that determines its data: task, data and
partition sections and the seed (:func:`task_for`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from functools import lru_cache

from medtasks.base import Task
from medtasks.registry import get_task_class
from medtasks.scenario import Scenario

_MAX_TASKS = 4
_tasks: OrderedDict[str, Task] = OrderedDict()


def task_for(scenario: Scenario) -> Task:
    """The task of ``scenario``, built once per process for equal task/data/partition/seed."""
    key = json.dumps(
        [scenario.task.model_dump(mode="json"), scenario.data.model_dump(mode="json"),
         scenario.partition.model_dump(mode="json"), scenario.seed],
        sort_keys=True,
    )
    task = _tasks.get(key)
    if task is None:
        task = get_task_class(scenario.task.name)(scenario.task_context())
        _tasks[key] = task
        while len(_tasks) > _MAX_TASKS:
            _tasks.popitem(last=False)
    _tasks.move_to_end(key)
    return task


@lru_cache(maxsize=16)
def scenario_from_json(text: str) -> Scenario:
    """Parse the scenario a message carries (every message of a run carries the same text)."""
    return Scenario.from_json(text)
