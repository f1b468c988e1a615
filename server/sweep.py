"""``medfed sweep``, planning and running: a grid of settings × seeds expanded into validated cells, each run.

    medfed sweep SCENARIO [--set K=V ...] --grid KEY=V1,V2[,...] [--grid ...] [--seeds 0,1,2]
                 [--engine E] [--out DIR] [--dry-run]

The cells are the Cartesian product of every ``--grid`` axis and the seeds. A cell is
the scenario loaded with ``--set`` and then the cell's assignments as further ``--set``
overrides (:func:`server.scenario.load`), so a grid value is parsed exactly like a
``--set`` value (YAML: ``null``, ``0.1``, ``adam``, ``{mechanism: none}``); commas separate values except
inside brackets, braces and quotes (:func:`split_values`).
Every cell is built and validated before the first one runs: an invalid cell is one
line naming its assignments, and nothing is written.

The cells then run one after the other (:func:`run_cells`), each into a normal run
directory (``scenario.yaml``, ``metrics.jsonl``, ``summary.json``, ...) named from its
assignments inside the sweep folder::

    <output.dir>/<name>-sweep-<YYYYmmdd-HHMMSS>/     (or --out DIR)
      local.lr=0.01,seed=0/                          one run directory per cell
      local.lr=0.1,seed=0/

A cell that fails (the run stops with an error) is recorded with its reason and the
sweep goes on; Ctrl-C stops after recording the cell it interrupted (resumable with
``medfed run --resume``). The tables and the plot of the results are
:mod:`server.sweep_report`'s job.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from server.compare import AttackResult, finite_number, format_cell
from server.results import RunDirectory
from server.scenario import Scenario, ScenarioError, load

__all__ = [
    "Axis", "CellResult", "Plan", "PlannedCell", "SweepError", "SweepOutcome", "parse_axis", "parse_seeds",
    "plan_sweep", "run_cells",
]

log = logging.getLogger("medfed")

VALUE_SEPARATOR = ","
SEED_KEY = "seed"
RUNNABLE_ENGINES = ("simulation", "inprocess", "processes")
_TIMESTAMP = "%Y%m%d-%H%M%S"
_MAX_NAME = 100  # the scenario name's limit (medtasks.scenario.Scenario.name)
_MAX_FOLDER = 150
_DIGEST_CHARS = 8
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
_UNSAFE_FOLDER = re.compile(r"[^A-Za-z0-9._=,+-]+")

Runner = Callable[[Scenario, RunDirectory], dict[str, Any]]
"""Runs one scenario into a run directory and returns its summary (``server.engines.run_scenario``)."""


class SweepError(ValueError):
    """A sweep that cannot start (bad ``--grid``/``--seeds``/``--out``, or an invalid cell); one line."""


# --- the grid ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    """One ``--grid KEY=V1,V2`` option: a scenario key path and the value texts it takes (as typed)."""

    key: str
    texts: tuple[str, ...]


def parse_axis(option: str) -> Axis:
    """``"KEY=V1,V2,..."`` → :class:`Axis`.

    Raises
    ------
    SweepError
        no ``=``, an empty key or value, a value given twice, or the key ``seed`` (use ``--seeds``).
    """
    key, sep, text = option.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SweepError(f"--grid '{option}': expected KEY=V1,V2,...")
    if key == SEED_KEY:
        raise SweepError(f"--grid {key}: give the seeds with --seeds S1,S2,...")
    texts = tuple(value.strip() for value in split_values(text))
    if not all(texts):
        raise SweepError(f"--grid {key}: empty value in '{text}' (write null for no value; a value holds "
                         f"'{VALUE_SEPARATOR}' only inside [...] or {{...}})")
    if len(set(texts)) < len(texts):
        raise SweepError(f"--grid {key}: a value is given twice in '{text}'")
    return Axis(key, texts)


def split_values(text: str) -> list[str]:
    """The values of ``V1,V2,...``, split at the commas outside brackets, braces and quotes, so a value can be a
    YAML list or mapping: ``{mechanism: none},{mechanism: dpsgd, params: {noise_multiplier: 1.0}}`` is two values.

    Raises
    ------
    SweepError
        Brackets or quotes that do not close.
    """
    values, depth, quote, start = [], 0, "", 0
    for index, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == VALUE_SEPARATOR and depth == 0:
            values.append(text[start:index])
            start = index + 1
        if depth < 0:
            break
    if depth != 0 or quote:
        raise SweepError(f"--grid value list '{text}': brackets or quotes do not close")
    return [*values, text[start:]]


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` → ``[0, 1, 2]``.

    Raises
    ------
    SweepError
        a seed that is not a non-negative integer, or one given twice.
    """
    try:
        seeds = [int(value) for value in text.split(VALUE_SEPARATOR)]
    except ValueError:
        raise SweepError(f"--seeds '{text}': expected integers such as 0,1,2") from None
    if any(seed < 0 for seed in seeds) or len(set(seeds)) < len(seeds):
        raise SweepError(f"--seeds '{text}': seeds must be distinct non-negative integers")
    return seeds


@dataclass
class PlannedCell:
    """One validated cell of the sweep.

    Attributes
    ----------
    texts : dict[str, str]
        Grid key → the value as typed (what the overrides were built from).
    values : dict[str, Any]
        Grid key → the value in the resolved scenario (what ran: ``null`` → None, ``0.1`` → 0.1).
    seed : int
        The cell's seed.
    scenario : Scenario
        The resolved scenario, named ``<name>-<slug of the assignments>``.
    folder : str
        The cell's run directory inside the sweep folder, named from the assignments.
    """

    texts: dict[str, str]
    values: dict[str, Any]
    seed: int
    scenario: Scenario
    folder: str = ""

    @property
    def label(self) -> str:
        """The assignments, e.g. ``local.lr=0.01,seed=0``."""
        return VALUE_SEPARATOR.join([*(f"{key}={text}" for key, text in self.texts.items()), f"{SEED_KEY}={self.seed}"])

    @property
    def group(self) -> str:
        """The assignments without the seed (the cells a mean over seeds is taken of); ``all`` for none."""
        return VALUE_SEPARATOR.join(f"{key}={text}" for key, text in self.texts.items()) or "all"


@dataclass
class Plan:
    """What a sweep will run: the validated cells, and the folder they will go to."""

    scenario_path: str
    overrides: list[str]
    axes: list[Axis]
    seeds: list[int] | None  # None: the scenario's own
    engine: str | None
    base_name: str
    cells: list[PlannedCell]
    folder: Path
    folder_given: bool  # --out DIR: used as it is, else a fresh timestamped folder

    def describe(self) -> str:
        """The cells, one line each (``--dry-run``)."""
        lines = [f"{len(self.cells)} cells, into {self.folder}:"]
        lines += [f"  {cell.folder}  ({cell.scenario.name}, engine {cell.scenario.engine.backend})"
                  for cell in self.cells]
        return "\n".join(lines)

    def create_folder(self) -> Path:
        """Make the sweep folder (a new one: ``-1``, ``-2``, ... when the timestamped one exists).

        Raises
        ------
        SweepError
            it cannot be made.
        """
        try:
            if self.folder_given:
                self.folder.mkdir(parents=True, exist_ok=True)
                return self.folder
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            stem, k = self.folder.name, 0
            while True:
                try:
                    self.folder.mkdir()
                    return self.folder
                except FileExistsError:
                    k += 1
                    self.folder = self.folder.with_name(f"{stem}-{k}")
        except OSError as error:
            raise SweepError(f"cannot create the sweep folder {self.folder}: {error.strerror or error}") from None


def plan_sweep(scenario_path: str | Path, overrides: Sequence[str], grid: Sequence[str], seeds: str | None = None,
               *, engine: str | None = None, out: str | Path | None = None, now: datetime | None = None) -> Plan:
    """Expand and validate every cell of a sweep; writes nothing.

    Parameters
    ----------
    scenario_path : str or Path
        The scenario file.
    overrides : sequence of str
        ``--set KEY=VALUE`` options, applied to every cell before its assignments.
    grid : sequence of str
        ``--grid KEY=V1,V2`` options; the cells are their Cartesian product (× the seeds), first key slowest.
    seeds : str or None
        ``--seeds 0,1,2``; None: the scenario's seed.
    engine : str or None
        ``--engine``; None: each cell's ``engine.backend``.
    out : str, Path or None
        ``--out DIR`` (must not hold files yet); None: ``<output.dir>/<name>-sweep-<YYYYmmdd-HHMMSS>``.
    now : datetime or None
        The timestamp of the default folder (default: now).

    Returns
    -------
    Plan
        The cells, each a resolved scenario named ``<name>-<slug>`` with its own run directory name.

    Raises
    ------
    SweepError
        A bad option, a key given twice in ``--grid``, an engine that cannot run here, or an invalid cell (the
        message names the cell's assignments and the scenario's own one-line error).
    """
    if engine is not None and engine not in RUNNABLE_ENGINES:
        raise SweepError(f"--engine {engine}: a sweep runs on {' or '.join(RUNNABLE_ENGINES)}")
    axes = [parse_axis(option) for option in grid]
    keys = [axis.key for axis in axes]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise SweepError(f"--grid {repeated[0]}: the key is given twice (one --grid per key, values comma-separated)")
    seed_list = parse_seeds(seeds) if seeds is not None else None
    cell_seeds: list[int | None] = list(seed_list) if seed_list is not None else [None]
    cells = [_build_cell(scenario_path, overrides, dict(zip(keys, combination)), seed, engine)
             for combination in itertools.product(*(axis.texts for axis in axes))
             for seed in cell_seeds]
    base_name = cells[0].scenario.name
    _name_cells(cells)
    if out is not None:
        folder, given = Path(out), True
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise SweepError(f"--out {folder}: exists and is not an empty folder (choose a new one)")
    else:
        stamp = (now or datetime.now()).strftime(_TIMESTAMP)
        folder, given = Path(cells[0].scenario.output.dir) / f"{base_name}-sweep-{stamp}", False
    return Plan(str(scenario_path), list(overrides), axes, seed_list, engine, base_name, cells, folder, given)


def _build_cell(scenario_path: str | Path, overrides: Sequence[str], texts: dict[str, str], seed: int | None,
                engine: str | None) -> PlannedCell:
    """Load the scenario with ``overrides``, then ``texts`` and ``seed`` as further overrides; one line if invalid."""
    assignments = [f"{key}={text}" for key, text in texts.items()]
    seeding = [f"{SEED_KEY}={seed}"] if seed is not None else []
    described = VALUE_SEPARATOR.join(assignments + seeding) or "(no assignments)"
    try:
        engine_override = [f"engine.backend={engine}"] if engine is not None else []  # checked as the engine that runs
        scenario = load(scenario_path, [*overrides, *engine_override, *assignments, *seeding])
    except ScenarioError as error:
        raise SweepError(f"cell {described}: {error}") from None
    if scenario.engine.backend not in RUNNABLE_ENGINES:
        raise SweepError(f"cell {described}: engine.backend '{scenario.engine.backend}' cannot run in a sweep "
                         f"(choose --engine {'|'.join(RUNNABLE_ENGINES)})")
    resolved = scenario.model_dump(mode="json")
    values = {key: _value_at(resolved, key, text) for key, text in texts.items()}
    return PlannedCell(texts=texts, values=values, seed=scenario.seed, scenario=scenario)


def _value_at(resolved: dict[str, Any], key: str, text: str) -> Any:
    """The value at ``key`` (``a.b.c``) in the resolved scenario; ``text`` where the path is not there."""
    node: Any = resolved
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return text
        node = node[part]
    return node


def _name_cells(cells: list[PlannedCell]) -> None:
    """Give each cell its scenario name (``<name>-<slug>``, e.g. ``tiny-lr-0.01_seed-0``, at most 100
    characters) and its folder name (the assignments, e.g. ``local.lr=0.01,seed=0``), both unique: a digest
    of the label replaces the end where slugs collide or are too long."""
    names: set[str] = set()
    folders: set[str] = set()
    for cell in cells:
        digest = hashlib.blake2b(cell.label.encode(), digest_size=_DIGEST_CHARS // 2).hexdigest()
        slug = "_".join([*(f"{key.rsplit('.', 1)[-1]}-{text}" for key, text in cell.texts.items()),
                         f"{SEED_KEY}-{cell.seed}"])
        name = f"{cell.scenario.name}-{_UNSAFE_NAME.sub('-', slug)}"
        if len(name) > _MAX_NAME or name in names:
            name = f"{name[:_MAX_NAME - _DIGEST_CHARS - 1]}-{digest}"
        folder = _UNSAFE_FOLDER.sub("-", cell.label).lstrip(".-")
        if len(folder) > _MAX_FOLDER or folder in folders:
            folder = f"{folder[:_MAX_FOLDER - _DIGEST_CHARS - 1]}-{digest}"
        cell.scenario.name = name  # validated on assignment against the schema's name pattern
        cell.folder = folder
        names.add(name)
        folders.add(folder)


# --- running ---------------------------------------------------------------------------------------------
@dataclass
class CellResult:
    """What one cell gave.

    Attributes
    ----------
    status : str
        ``ok``, ``failed`` (``reason`` says why), ``interrupted`` (Ctrl-C; resumable) or ``not run``.
    main_metric, main_phase, main_value :
        The task's primary metric, the phase it is read from (``central`` where the run evaluates centrally,
        else ``evaluate``) and its value in the last round.
    epsilon : float or None
        ε of the run (``summary.json``'s ``privacy.epsilon``), None without differential privacy.
    attack : AttackResult or None
        The attack block of ``summary.json``, None without an attack.
    seconds : float or None
        Wall time of the cell.
    """

    cell: PlannedCell
    status: str = "not run"
    reason: str | None = None
    run_dir: Path | None = None
    main_metric: str | None = None
    main_phase: str | None = None
    main_value: float | None = None
    epsilon: float | None = None
    attack: AttackResult | None = None
    seconds: float | None = None

    def read_summary(self, summary: dict[str, Any]) -> None:
        """Take the headline numbers from a run's ``summary.json`` content."""
        best = summary.get("best") or {}
        final = summary.get("final") or {}
        metric = best.get("metric")
        phase = next((p for p in ("central", "evaluate") if metric in (final.get(p) or {})), None)
        self.main_metric, self.main_phase = metric, phase
        self.main_value = finite_number(final[phase][metric]) if phase is not None else None
        privacy = summary.get("privacy")
        privacy = privacy if isinstance(privacy, dict) else {}
        self.epsilon = finite_number(privacy.get("epsilon", summary.get("epsilon")))
        self.attack = AttackResult.from_summary(summary)


@dataclass
class SweepOutcome:
    """The results of every cell (in plan order) and the files written."""

    results: list[CellResult]
    files: list[Path] = field(default_factory=list)
    markdown: str = ""

    @property
    def interrupted(self) -> bool:
        return any(result.status == "interrupted" for result in self.results)

    @property
    def failed(self) -> list[CellResult]:
        return [result for result in self.results if result.status == "failed"]


def run_cells(plan: Plan, folder: Path, runner: Runner) -> list[CellResult]:
    """Run the cells one after the other into ``folder``.

    A cell whose run raises is recorded as failed (one line) and the sweep goes on; Ctrl-C stops the sweep
    after recording the cell it interrupted (the cells after it stay ``not run``).

    Parameters
    ----------
    plan : Plan
        From :func:`plan_sweep`.
    folder : Path
        The sweep folder (:meth:`Plan.create_folder`).
    runner : Runner
        What ``medfed run`` runs a scenario with (``server.engines.run_scenario`` with a progress display).

    Returns
    -------
    list of CellResult
        Every cell's result, in plan order.
    """
    results = [CellResult(cell) for cell in plan.cells]
    for index, result in enumerate(results, start=1):
        log.info("sweep cell %d/%d: %s", index, len(results), result.cell.label)
        try:
            _run_cell(result, folder, runner)
        except KeyboardInterrupt:
            result.status = "interrupted"
            result.reason = _interrupted(result.run_dir)
            log.warning("sweep interrupted in cell %s; writing the tables of what ran", result.cell.label)
            break
        log.info("sweep cell %d/%d: %s", index, len(results), _one_line(result))
    return results


def _interrupted(run_dir: Path | None) -> str:
    """Why a cell stopped and what to do: resume it from its checkpoint, or run it again (none written yet)."""
    if run_dir is None:
        return "interrupted"
    if RunDirectory.open(run_dir).has_checkpoint():
        return f"interrupted; resume with: medfed run --resume {run_dir}"
    return f"interrupted before its first checkpoint; run it again with: medfed run {run_dir / 'scenario.yaml'}"


def _run_cell(result: CellResult, folder: Path, runner: Runner) -> None:
    """Make the cell's run directory and run it; any error becomes ``failed`` with a one-line reason."""
    started = time.perf_counter()
    try:
        path = folder / result.cell.folder
        path.mkdir()
        RunDirectory(path).write_scenario(result.cell.scenario.to_yaml())
        result.run_dir = path
        result.read_summary(runner(result.cell.scenario, RunDirectory.open(path)))
        result.status = "ok"
    except Exception as error:  # a cell's failure must not end the sweep
        log.debug("sweep cell %s failed", result.cell.label, exc_info=True)
        result.status = "failed"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
        result.reason = f"{type(error).__name__}: {reason}" if reason else type(error).__name__
    finally:
        result.seconds = time.perf_counter() - started


def _one_line(result: CellResult) -> str:
    if result.status != "ok":
        return f"{result.status}: {result.reason}"
    parts = [f"{result.main_phase} {result.main_metric} {format_cell(result.main_value)}"]
    if result.epsilon is not None:
        parts.append(f"ε {format_cell(result.epsilon)}")
    if result.attack is not None:
        parts.append(f"attack {result.attack.kind} {result.attack.headline} {format_cell(result.attack.value)}")
    return f"ok: {', '.join(parts)} ({format_cell(result.seconds)} s)"
