"""Scenario files: loading, overrides, validation against the registries, and error messages.

The schema itself (:class:`~medtasks.scenario.Scenario` and its sections) lives in
:mod:`medtasks.scenario`, below every package that reads it. :func:`load` validates a file, applies ``--set a.b=value`` overrides, validates
the sections that depend on a name (``task.params`` against the task's schema,
``strategy.params`` against the algorithm's, ``partition.params`` against the
partition kind's, ``privacy.params`` against the mechanism's, ``defense.params``
against the aggregation rule's, ``attack.params`` against the attack's), refuses the
combinations a strategy, a defense, a privacy mechanism or an attack cannot run, resolves every
default and makes every data folder absolute (``data.path``, ``data.sites``, ``data.test_path``; relative
ones are relative to the scenario file), writes the folder of a task module that sits beside the scenario
file into ``task.name`` (:func:`medtasks.registry.locate_task_module`), so the resolved scenario written to a
run directory says exactly what ran, refuses folder settings the task cannot read (:func:`medtasks.sites.check_data`), and finally runs
:mod:`server.checks` (the optional modules the task needs; a DP-SGD budget that one round already exceeds).

Every problem is raised as :class:`ScenarioError` whose message is one line:
``<file>: <key.path>: <what is wrong> (allowed: ...)``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

import privacy
from medtasks import sites
from medtasks.base import DataError
from medtasks.partition import PARAMS_MODELS as PARTITION_PARAMS
from medtasks.registry import UnknownTaskError, get_task_class, locate_task_module
from medtasks.scenario import (
    AttackSection,
    DataSection,
    DefenseSection,
    EngineSection,
    LocalSection,
    OutputSection,
    PartitionSection,
    PrivacySection,
    Scenario,
    StrategySection,
    TaskSection,
)
from server import checks

__all__ = [
    "AttackSection", "DataSection", "DefenseSection", "EngineSection", "LocalSection", "OutputSection", "PartitionSection",
    "PrivacySection", "Scenario", "ScenarioError", "StrategySection", "TaskSection", "load", "validate",
]

KEY_PREFIX = re.compile(r"^[A-Za-z_]+(\.[A-Za-z_0-9\[\]]+)*: ")
"""A refusal that already starts with the scenario key it names (``data.sites: ...``)."""


class ScenarioError(ValueError):
    """An invalid scenario; ``str(error)`` is a single line naming file and key path."""


# --- loading ------------------------------------------------------------------------------
def load(path: str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """Load, override, validate and resolve a scenario file.

    Parameters
    ----------
    path : str or Path
        The YAML file.
    overrides : sequence of str
        ``"a.b=value"`` strings; ``value`` is parsed as YAML (``5``, ``0.1``, ``true``, ``[1, 2]``, ``adam``).

    Returns
    -------
    Scenario
        The validated scenario with every default resolved.

    Raises
    ------
    ScenarioError
        One line naming the file, the key path and what is allowed.
    """
    path = Path(path)
    raw = _read_yaml(path)
    for override in overrides:
        _apply_override(raw, override, path)
    return validate(raw, source=str(path), base_dir=path.parent)


def validate(raw: Mapping[str, Any], *, source: str = "<scenario>", base_dir: Path | None = None) -> Scenario:
    """Validate a scenario given as a mapping (see :func:`load`)."""
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as error:
        raise ScenarioError(f"{source}: {_describe(error, Scenario)}") from None
    if base_dir is not None:  # a task module beside the scenario file: its folder goes into task.name
        scenario.task.name = locate_task_module(scenario.task.name, base_dir)
    _resolve_named_params(scenario, source)
    if scenario.data.source == "folder":
        _resolve_data_paths(scenario, source, base_dir or Path.cwd())
    _build_task(scenario, source)
    try:
        checks.check(scenario)  # this machine's modules, and budgets that the data's sizes already rule out
    except ValueError as error:
        raise ScenarioError(f"{source}: {error}") from None
    return scenario


def _build_task(scenario: Scenario, source: str) -> None:
    """Build the task once, as every node will (its data stays unread until asked for): what its constructor
    refuses, such as a class count the synthetic data cannot have, is refused here, in one line."""
    try:
        get_task_class(scenario.task.name)(scenario.task_context())
    except ValueError as error:  # DataError included: a folder the task cannot use
        default_key = "data" if isinstance(error, DataError) else "task"
        message = str(error)
        if not KEY_PREFIX.match(message):
            message = f"{default_key}: {message}"
        raise ScenarioError(f"{source}: {message}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ScenarioError(f"{path}: scenario file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ScenarioError(f"{path}: invalid YAML: {where}{problem}") from None
    except UnicodeDecodeError:
        raise ScenarioError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise ScenarioError(f"{path}: a scenario must be a mapping of sections (got {type(raw).__name__})")
    return raw


def _apply_override(raw: dict[str, Any], override: str, path: Path) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ScenarioError(f"{path}: --set '{override}': expected key.path=value")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ScenarioError(f"{path}: --set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def _resolve_named_params(scenario: Scenario, source: str) -> None:
    """Validate the ``params`` of task, strategy, partition, privacy and defense against their own schemas,
    then the combinations the strategy, the defense and the privacy mechanism refuse."""
    from privacy import attacks
    from strategies import UnknownStrategyError, aggregation, get_algorithm

    try:
        task_class = get_task_class(scenario.task.name)
    except UnknownTaskError as error:
        raise ScenarioError(f"{source}: task.name: {error}") from None
    if scenario.task.model is not None and scenario.task.model not in task_class.models:
        raise ScenarioError(
            f"{source}: task.model: unknown model '{scenario.task.model}' (allowed: {', '.join(task_class.models)})"
        )
    try:
        algorithm = get_algorithm(scenario.strategy.name)
    except UnknownStrategyError as error:
        raise ScenarioError(f"{source}: strategy.name: {error}") from None

    Named = TaskSection | StrategySection | PartitionSection | PrivacySection | DefenseSection | AttackSection
    # (params key, its schema, its section, the key that chose the schema and its value)
    checks: list[tuple[str, type[BaseModel] | None, Named, str]] = [
        ("task.params", task_class.Params, scenario.task, f"task.name {scenario.task.name}"),
        ("strategy.params", algorithm.Params, scenario.strategy, f"strategy.name {scenario.strategy.name}"),
        ("partition.params", PARTITION_PARAMS[scenario.partition.kind], scenario.partition,
         f"partition.kind {scenario.partition.kind}"),
        ("privacy.params", _privacy_params_schema(scenario.privacy, source), scenario.privacy,
         f"privacy.mechanism {scenario.privacy.mechanism}"),
        ("defense.params", _defense_params_schema(scenario.defense, source), scenario.defense,
         f"defense.aggregation {scenario.defense.aggregation}"),
    ]
    if scenario.attack is not None:
        checks.append(("attack.params", attacks.get_attack(scenario.attack.kind).Params, scenario.attack,
                       f"attack.kind {scenario.attack.kind}"))
    for prefix, params_model, section, chosen_by in checks:
        if params_model is None:
            continue
        try:
            resolved = params_model.model_validate(section.params)
        except ValidationError as error:
            raise ScenarioError(f"{source}: {_describe(error, params_model, prefix, chosen_by)}") from None
        section.params = json.loads(resolved.model_dump_json())

    def check_defense(scenario: Scenario) -> None:
        aggregation.check_defense(scenario, algorithm.combine)

    for check_compatible in (algorithm.check_compatible, check_defense, privacy.check_compatible,
                             attacks.check_compatible):
        try:
            check_compatible(scenario)
        except ValueError as error:
            raise ScenarioError(f"{source}: {error}") from None


def _privacy_params_schema(section: PrivacySection, source: str) -> type[BaseModel] | None:
    """The schema of ``privacy.params`` (``None`` for a mechanism without params, which must be empty)."""
    schema = privacy.params_schema(section.mechanism)
    if schema is None and section.params:
        raise ScenarioError(
            f"{source}: privacy.params: mechanism '{section.mechanism}' takes no params (got "
            f"{', '.join(sorted(section.params))}); set privacy.mechanism (allowed: {', '.join(privacy.MECHANISMS)})"
        )
    return schema


def _defense_params_schema(section: DefenseSection, source: str) -> type[BaseModel] | None:
    """The schema of ``defense.params`` for ``defense.aggregation`` (``None`` for a rule without settings,
    whose params must be empty)."""
    from strategies.aggregation import RULES

    schema = RULES[section.aggregation]
    if not schema.model_fields:
        if section.params:
            with_settings = ", ".join(name for name, rule in RULES.items() if rule.model_fields)
            raise ScenarioError(
                f"{source}: defense.params: aggregation '{section.aggregation}' takes no params (got "
                f"{', '.join(sorted(section.params))}); set defense.aggregation (rules with params: {with_settings})"
            )
        return None
    return schema


def _resolve_data_paths(scenario: Scenario, source: str, base_dir: Path) -> None:
    """Make ``data.path``, the hospital folders of ``data.sites`` and ``data.test_path`` absolute (relative
    ones are relative to ``base_dir``, the scenario file's folder), so that the resolved scenario.yaml of a run
    directory still finds them on ``--resume``; then refuse what the task cannot read from them
    (:func:`medtasks.sites.check_data`)."""
    data = scenario.data
    if data.path:
        data.path = _existing_folder(data.path, base_dir, f"{source}: data.path: data folder not found")
    if isinstance(data.sites, list):
        hospitals = [_existing_folder(folder, base_dir, f"{source}: data.sites[{k}]: hospital folder not found")
                     for k, folder in enumerate(data.sites)]
        try:
            data.sites = hospitals  # validated again: two spellings of one folder are one folder twice
        except ValidationError as error:
            raise ScenarioError(f"{source}: {_describe(error, DataSection, 'data')}") from None
    if data.test_path:
        data.test_path = _existing_folder(data.test_path, base_dir, f"{source}: data.test_path: test folder not found")
    try:
        sites.check_data(get_task_class(scenario.task.name), scenario.task_context())
    except ValueError as error:
        raise ScenarioError(f"{source}: {error}") from None


def _existing_folder(path: str, base_dir: Path, missing: str) -> str:
    """``path`` as an absolute folder (a relative one below ``base_dir``); ``ScenarioError`` ``missing: <path>``
    when it is no folder."""
    folder = Path(path).expanduser()
    if not folder.is_absolute():
        folder = (base_dir / folder).resolve()
    if not folder.is_dir():
        raise ScenarioError(f"{missing}: {folder}")
    return str(folder)


def _describe(error: ValidationError, model: type | None, prefix: str = "", chosen_by: str = "") -> str:
    """Turn the first pydantic error into ``key.path: message (allowed: ...)``; an unknown key of a ``params``
    mapping also names ``chosen_by``, the key whose value chose its schema (``partition.kind iid``), since a
    ``--set`` that changes that key leaves the old choice's params behind."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    key = ".".join([prefix, *location] if prefix else location) or "<root>"
    kind, message = first["type"], first["msg"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(location[:-1], model)
        message = f"unknown key '{location[-1]}'"
        if chosen_by and len(location) == 1:  # a key of the params mapping itself
            message += f" for {chosen_by}" if allowed else f": {chosen_by} takes no params (set {prefix}={{}})"
        message += f" (allowed: {', '.join(allowed)})" if allowed else ""
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    more = len(error.errors()) - 1
    # a cross-section check names its own keys: no "<root>" before it
    described = message if key == "<root>" and kind == "value_error" else f"{key}: {message}"
    return described + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


def _allowed_keys(location: Iterable[str], model: type | None) -> list[str]:
    """Field names of the model at ``location`` below ``model`` (for 'unknown key' messages)."""
    current = model if isinstance(model, type) and issubclass(model, BaseModel) else None
    for part in location:
        if current is None:
            return []
        field = current.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        current = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return sorted(current.model_fields) if current is not None else []
