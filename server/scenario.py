"""Scenario files: the pydantic schema, loading, overrides and error messages.

A scenario (YAML) describes one experiment: task, data, non-IID partition,
strategy, local training, privacy, attack, engine and output (DESIGN.md §5).
:func:`load` validates a file, applies ``--set a.b=value`` overrides, validates
the sections that depend on a name (``task.params`` against the task's schema,
``strategy.params`` against the algorithm's, ``partition.params`` against the
partition kind's, ``privacy.params`` against the mechanism's), refuses the
combinations a strategy or a privacy mechanism cannot run, and resolves every
default, so the resolved scenario written to a run directory says exactly what ran.

Every problem is raised as :class:`ScenarioError` whose message is one line:
``<file>: <key.path>: <what is wrong> (allowed: ...)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

import privacy
from medtasks.base import DataSpec, PartitionSpec, TaskContext
from medtasks.partition import KINDS, PARAMS_MODELS as PARTITION_PARAMS
from medtasks.registry import UnknownTaskError, get_task_class


class ScenarioError(ValueError):
    """An invalid scenario; ``str(error)`` is a single line naming file and key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskSection(_Section):
    """``task``: which medical task, which model, and the task's own parameters."""

    name: str = Field(description="built-in task name or 'pkg.module:Class'")
    model: str | None = Field(None, description="model name (None = the task's default)")
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the task's Params schema")


class DataSection(_Section):
    """``data``: the source of each site's samples."""

    source: Literal["synthetic", "folder"] = "synthetic"
    path: str | None = Field(None, description="data folder, required for source: folder")
    samples_per_client: int = Field(64, ge=2, le=1_000_000)
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    server_samples: int = Field(0, ge=0, le=1_000_000, description="central test set size (0 = none)")
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _folder_needs_path(self) -> "DataSection":
        if self.source == "folder" and not self.path:
            raise ValueError("source 'folder' needs data.path")
        return self


class PartitionSection(_Section):
    """``partition``: how many sites and which non-IID kind (DESIGN.md §5b)."""

    clients: int = Field(ge=1, le=1000)
    kind: Literal[KINDS] = "iid"  # type: ignore[valid-type]
    params: dict[str, Any] = Field(default_factory=dict)


class StrategySection(_Section):
    """``strategy``: the federated algorithm and its round schedule."""

    name: str = "fedavg"
    rounds: int = Field(ge=1, le=100_000)
    fraction_train: float = Field(1.0, gt=0.0, le=1.0)
    fraction_evaluate: float = Field(1.0, ge=0.0, le=1.0)
    min_clients: int = Field(1, ge=1, description="fewest successful clients a round needs")
    evaluate_every: int = Field(1, ge=1, description="federated/central evaluation every k rounds (and the last)")
    round_timeout: float = Field(3600.0, gt=0.0, description="seconds to wait for a round's replies")
    params: dict[str, Any] = Field(default_factory=dict)


class LocalSection(_Section):
    """``local``: each client's local training between two communications."""

    epochs: int = Field(1, ge=1, le=10_000)
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps per round")
    batch_size: int = Field(16, ge=1, le=65_536)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0.0, le=10.0)
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)


class PrivacySection(_Section):
    """``privacy``: the differential-privacy mechanism and its settings (:mod:`privacy`)."""

    mechanism: Literal[privacy.MECHANISMS] = "none"  # type: ignore[valid-type]
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the mechanism's Params schema")


class EngineSection(_Section):
    """``engine``: what runs the clients (DESIGN.md §1).

    ``deployment`` is a run on real SuperNodes (``medfed run --engine deployment --federation NAME``); a run
    directory's scenario.yaml records it, ``workers`` is then unused.
    """

    backend: Literal["simulation", "inprocess", "deployment"] = Field(
        "simulation", description="simulation (Ray), inprocess, or deployment (SuperNodes, needs --federation)"
    )
    workers: int = Field(2, ge=1, le=256, description="clients trained in parallel (simulation)")
    cpus_per_client: int = Field(1, ge=1, le=256, description="CPU share and torch threads per client")


class OutputSection(_Section):
    """``output``: where the run directory goes and what it keeps."""

    dir: str = "runs"
    checkpoint_every: int = Field(1, ge=1)
    checkpoint_node_state: bool = Field(
        True, description="copy each node's persistent state into checkpoints so --resume restores it"
    )
    plots: bool = True
    examples_every: int | None = Field(
        None, ge=1, description="also draw the model's output on a few test images every k rounds (plots/examples/)"
    )


class Scenario(_Section):
    """One experiment. The schema in code is the authority (DESIGN.md §5 sketches it)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100)
    description: str = ""
    seed: int = Field(0, ge=0, le=2**31 - 1)
    task: TaskSection
    data: DataSection = Field(default_factory=DataSection)
    partition: PartitionSection
    strategy: StrategySection
    local: LocalSection = Field(default_factory=LocalSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    attack: Any = Field(None, description="attack experiment (none are available in this version)")
    engine: EngineSection = Field(default_factory=EngineSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @field_validator("attack")
    @classmethod
    def _no_attacks_yet(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("attacks are not available in this version (allowed: null)")
        return None

    @model_validator(mode="after")
    def _cross_checks(self) -> "Scenario":
        if self.strategy.min_clients > self.partition.clients:
            raise ValueError(
                f"strategy.min_clients ({self.strategy.min_clients}) exceeds partition.clients ({self.partition.clients})"
            )
        return self

    # --- derived views -----------------------------------------------------------------
    def task_context(self) -> TaskContext:
        """The :class:`TaskContext` a task is built from."""
        task_class = get_task_class(self.task.name)
        return TaskContext(
            params=task_class.Params.model_validate(self.task.params),
            model=self.task.model,
            data=DataSpec(**self.data.model_dump()),
            partition=PartitionSpec(**self.partition.model_dump()),
            seed=self.seed,
        )

    def to_json(self) -> str:
        """Compact JSON (what travels to clients in messages)."""
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> "Scenario":
        """Inverse of :meth:`to_json` (the text was validated when it was produced)."""
        return cls.model_validate_json(text)

    def to_yaml(self) -> str:
        """Resolved scenario as YAML (every default filled in)."""
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)


# --- loading ------------------------------------------------------------------------------
def load(path: str | Path, overrides: Sequence[str] = ()) -> Scenario:
    """Load, override, validate and resolve a scenario file.

    Args:
        path: the YAML file.
        overrides: ``"a.b=value"`` strings; ``value`` is parsed as YAML (``5``, ``0.1``,
            ``true``, ``[1, 2]``, ``adam``).

    Raises:
        ScenarioError: one line naming the file, the key path and what is allowed.
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
    _resolve_named_params(scenario, source)
    if scenario.data.source == "folder":
        _resolve_data_path(scenario, source, base_dir or Path.cwd())
    return scenario


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
    """Validate the ``params`` of task, strategy, partition and privacy against their own schemas,
    then the combinations the strategy and the privacy mechanism refuse."""
    from strategies import UnknownStrategyError, get_algorithm

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

    checks = [
        ("task.params", task_class.Params, scenario.task),
        ("strategy.params", algorithm.Params, scenario.strategy),
        ("partition.params", PARTITION_PARAMS[scenario.partition.kind], scenario.partition),
        ("privacy.params", _privacy_params_schema(scenario.privacy, source), scenario.privacy),
    ]
    for prefix, params_model, section in checks:
        if params_model is None:
            continue
        try:
            resolved = params_model.model_validate(section.params)
        except ValidationError as error:
            raise ScenarioError(f"{source}: {_describe(error, params_model, prefix)}") from None
        section.params = json.loads(resolved.model_dump_json())
    for check_compatible in (algorithm.check_compatible, privacy.check_compatible):
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


def _resolve_data_path(scenario: Scenario, source: str, base_dir: Path) -> None:
    data_path = Path(scenario.data.path or "").expanduser()
    if not data_path.is_absolute():
        data_path = (base_dir / data_path).resolve()
    if not data_path.is_dir():
        raise ScenarioError(f"{source}: data.path: data folder not found: {data_path}")
    scenario.data.path = str(data_path)


def _describe(error: ValidationError, model: type | None, prefix: str = "") -> str:
    """Turn the first pydantic error into ``key.path: message (allowed: ...)``."""
    first = error.errors()[0]
    location = [str(part) for part in first["loc"]]
    key = ".".join([prefix, *location] if prefix else location) or "<root>"
    kind, message = first["type"], first["msg"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(location[:-1], model)
        message = f"unknown key '{location[-1]}'" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    more = len(error.errors()) - 1
    return f"{key}: {message}" + (f" (and {more} more problem{'s' if more > 1 else ''})" if more else "")


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
