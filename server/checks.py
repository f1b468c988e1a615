"""Checks of a valid scenario against this machine and its data, before any run directory exists.

:func:`server.scenario.validate` runs them after the schema and the registries' checks, so ``medfed
validate`` and ``medfed run`` refuse the same scenarios with the same one line (exit 2):

* :func:`check_device`: ``engine.device: cuda`` for an engine that runs the clients here (simulation,
  inprocess) on a machine without CUDA, or in simulation without a GPU share (``engine.gpus_per_client``).
  Deployed nodes resolve the device on their own machines, so a deployment is not checked here.
* :func:`check_dependencies`: the optional modules a task's data needs, and those of the experiment trackers
  ``output.trackers`` names (:func:`server.tracking.requirements`). A task class declares its modules with
  an optional classmethod ``requirements(ctx: TaskContext) -> list[(key, module, install hint)]`` (e.g.
  :meth:`medtasks.mil.task.MILTask.requirements`); a module that cannot be found is refused naming the
  scenario key that asked for it.
* :func:`check_privacy_budget`: DP-SGD with both ``noise_multiplier`` and ``target_epsilon``, whose first
  round already takes a site past the target (every site would refuse to train;
  :func:`privacy.dpsgd.check_first_round`). It builds the task's data (once per process,
  :func:`client.cache.task_for`) to learn each site's loader, exactly as a site's train handler does.

Each raises ``ValueError`` with a message that starts with the key it names.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import TYPE_CHECKING

from client.device import resolve_device
from medtasks.registry import get_task_class
from server import tracking

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import LocalSection, Scenario


def check(scenario: Scenario) -> None:
    """Every check of this module, cheapest first.

    Raises
    ------
    ValueError
        One line naming the scenario key (``data: ...`` for data that cannot be built).
    """
    check_device(scenario)
    check_dependencies(scenario)
    check_privacy_budget(scenario)


def check_device(scenario: Scenario) -> None:
    """Refuse ``engine.device: cuda`` where the clients run on this machine and cannot have a GPU.

    Raises
    ------
    ValueError
        ``engine.device: ...`` on a machine without CUDA (simulation, inprocess), or ``engine.gpus_per_client:
        ...`` for a simulation without a GPU share (Ray reserves no GPU for a client without one).
    """
    engine = scenario.engine
    if engine.device != "cuda" or engine.backend == "deployment":
        return
    resolve_device(engine.device)
    if engine.backend == "simulation" and engine.gpus_per_client == 0:
        raise ValueError("engine.gpus_per_client: device 'cuda' in simulation needs a GPU share per client, and 0 "
                         "reserves none; set engine.gpus_per_client to 1 (one GPU per client) or 0.5 (two clients "
                         "per GPU)")


def module_available(name: str) -> bool:
    """Whether ``import name`` can find the module (without importing it)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package is missing, or ``sys.modules[name]`` is None
        return False


def check_dependencies(scenario: Scenario) -> None:
    """Refuse a scenario whose task or trackers need a module this machine lacks.

    Raises
    ------
    ValueError
        ``<key>: ... needs the module <module>, which is not installed (<install hint>)``.
    """
    for key, module, hint in _requirements(scenario):
        if not module_available(module):
            raise ValueError(f"{key}: this setting needs the Python module '{module}', which is not installed "
                             f"({hint})")


def _requirements(scenario: Scenario) -> Iterator[tuple[str, str, str]]:
    """(scenario key, module, install hint) of every optional module the scenario needs."""
    task_requirements = getattr(get_task_class(scenario.task.name), "requirements", None)
    if task_requirements is not None:
        yield from task_requirements(scenario.task_context())
    yield from tracking.requirements(scenario.output.trackers)


def check_privacy_budget(scenario: Scenario) -> None:
    """Refuse DP-SGD settings whose first round exceeds ``target_epsilon`` at some site.

    Raises
    ------
    ValueError
        ``privacy.params: ...`` (:func:`privacy.dpsgd.check_first_round`), or ``data: ...`` when the
        task's data cannot be built.
    """
    if scenario.privacy.mechanism != "dpsgd":
        return
    from privacy.dpsgd import DPSGDParams, check_first_round

    params = DPSGDParams.model_validate(scenario.privacy.params)
    if params.noise_multiplier is None or params.target_epsilon is None:
        return  # a calibrated σ fits every planned round; without a target nothing is refused
    check_first_round(params, site_loaders(scenario), scenario.strategy.rounds)


def site_loaders(scenario: Scenario) -> dict[int, tuple[int, LocalSection]]:
    """Partition id → (batches of its first round's training loader, its resolved local settings), as the
    train handler (:func:`client.app.train`) builds them for the strategy's client rule.

    Raises
    ------
    ValueError
        ``data: ...`` when the task cannot build its data.
    """
    from client.cache import task_for
    from client.trainer import dataset_size, make_loader
    from medtasks.base import DataError
    from medtasks.seeding import torch_generator
    from strategies import get_algorithm

    try:
        task = task_for(scenario)
    except DataError as error:
        raise ValueError(f"data: {error}") from None
    algorithm = get_algorithm(scenario.strategy.name)
    rule = algorithm.client_rule(algorithm.Params.model_validate(scenario.strategy.params))
    sites = scenario.partition.clients
    loaders: dict[int, tuple[int, LocalSection]] = {}
    for pid in range(sites):
        dataset = rule.training_data(task, pid, sites)
        local = rule.local_section(scenario.local, dataset_size(dataset))
        loader = make_loader(dataset, local.batch_size, torch_generator(scenario.seed, "batches", 1, pid))
        loaders[pid] = (len(loader), local)
    return loaders
