"""Using a run's trained model: ``medfed evaluate`` and ``medfed predict``.

    medfed evaluate RUN_DIR [--data FOLDER] [--model best|last] [--site K] [--json]
    medfed predict RUN_DIR INPUT OUTPUT [--model best|last] [--site K]

Both rebuild the run's task and model from its ``scenario.yaml`` and load a checkpoint
(``checkpoints/model_best.pt`` or ``model_last.pt``, :mod:`server.results`):

* a strategy with one complete global model (FedAvg, FedProx, SCAFFOLD, FedSGD, ...) is used as it is;
  ``--site`` is refused;
* a strategy that ends with a model per site needs ``--site K``: a :class:`~strategies.base.Personalized`
  strategy (local-only, pFedHN) keeps every site's model in its server state (``state.pt``); a strategy whose
  global model lacks the sites' own layers (FedBN, FedPer: ``central_evaluation=False``) gives site ``K`` the
  global tensors plus the layers its node state holds (``state.pt`` extra ``node_states``, kept when
  ``output.checkpoint_node_state`` is on). The run keeps its best round's whole state for them
  (``state_best.pt``), so ``--model best`` gives each site's model of that round.

``evaluate`` scores the model on the run's central test set (the task's ``server_data()``, rebuilt from the
scenario: synthetic data regenerated from the seed, folder data read from ``data.test_path``), else on each
site's validation split (site ``K``'s only, with ``--site K``), or with ``--data FOLDER`` on that folder read
whole by the task's ``folder_dataset`` (the reader of ``data.test_path``). It prints the task's metrics and
writes ``metrics.json`` and the example pictures (``task.plot_examples``) to
``RUN_DIR/evaluate/<data folder name, or timestamp>/``.

``predict`` applies the model to new inputs with the task's optional ``predict_files(model, input_path,
output_path)`` (:mod:`medtasks.prediction`); a task without it is refused in one line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from medtasks.base import Task
from server.example_plots import accepts_title
from server.results import MODEL_BEST_FILE, MODEL_LAST_FILE, SCENARIO_FILE, Checkpoint, RunDirectory
from server.scenario import Scenario

__all__ = ["Evaluation", "ModelChoice", "TrainedRun", "UseError", "evaluate_run", "open_run", "predict_run"]

ModelChoice = Literal["best", "last"]
MODEL_FILES: dict[str, str] = {"best": MODEL_BEST_FILE, "last": MODEL_LAST_FILE}
EVALUATE_DIR = "evaluate"
METRICS_FILE = "metrics.json"
PREDICT_METHOD = "predict_files"  # the task's optional method (medtasks.prediction)


class UseError(ValueError):
    """A run, a choice of model or an input that cannot be used (one line; exit code 2)."""


@dataclass
class TrainedRun:
    """A finished (or checkpointed) run: its directory, scenario and task."""

    run_dir: RunDirectory
    scenario: Scenario
    task: Task

    def model(self, which: ModelChoice, site: int | None) -> torch.nn.Module:
        """The task's model loaded with the checkpoint ``which``: the global model, or site ``site``'s own.

        Raises
        ------
        UseError
            no such checkpoint; ``site`` missing for a strategy with a model per site, or given for one with a
            global model; a site without a saved model.
        """
        from strategies.base import load_into

        sites = _SiteModels(self, which)
        if site is None and sites.kind is not None:
            raise UseError(f"strategy {self.scenario.strategy.name} keeps a model per site: choose one with "
                           f"--site K (sites: {sites.listing()})")
        if site is not None and sites.kind is None:
            raise UseError(f"--site: strategy {self.scenario.strategy.name} trains one global model for every "
                           "site; leave out --site")
        tensors = sites.tensors(site) if site is not None else self.global_tensors(which)
        model = self.task.build_model()
        load_into(model, tensors)
        return model

    def global_tensors(self, which: ModelChoice) -> dict[str, torch.Tensor]:
        """The state dict of ``checkpoints/model_<which>.pt``."""
        path = self.run_dir.checkpoints / MODEL_FILES[which]
        if not path.is_file():
            raise UseError(f"{self.run_dir.path} has no {MODEL_FILES[which]}: the run stopped before its first "
                           "checkpoint")
        return torch.load(path, map_location="cpu", weights_only=True)


class _SiteModels:
    """Where each site's own model lives for the run's strategy (module docstring); ``kind`` is ``None`` for a
    strategy with one global model."""

    def __init__(self, run: TrainedRun, which: ModelChoice) -> None:
        from server.node_states import NODE_STATES_KEY
        from strategies import get_algorithm
        from strategies.base import Cohort, Personalized, Stateful, StrategyContext

        self.run = run
        scenario = run.scenario
        algorithm = get_algorithm(scenario.strategy.name)
        params = algorithm.Params.model_validate(scenario.strategy.params)
        cohort = Cohort({pid: pid for pid in range(scenario.partition.clients)}, scenario.seed)
        strategy = algorithm.build_strategy(StrategyContext(scenario, params, cohort, run.task.build_model()))
        self.state_key: str | None = getattr(algorithm.client_rule(params), "state_key", None)
        self.which = which
        self.checkpoint = _checkpoint(run.run_dir, which)
        extra = self.checkpoint.extra if self.checkpoint is not None else {}
        self.node_states: Mapping[str, Any] = extra.get(NODE_STATES_KEY) or {}
        self.personal: Personalized | None = strategy if isinstance(strategy, Personalized) else None
        self.kind: str | None = "personal" if self.personal is not None else None
        if self.kind is None and not algorithm.central_evaluation:
            self.kind = "partial"
        if isinstance(strategy, Stateful) and self.checkpoint is not None:
            strategy.load_state_dict(self.checkpoint.strategy_state)

    def available(self) -> list[int]:
        """The sites whose own model was saved."""
        if self.checkpoint is None:
            return []
        if self.personal is not None:
            return sorted(self.personal.personal_arrays())
        return sorted(int(pid) for pid, state in self.node_states.items()
                      if self.state_key in state.get("arrays", {}))

    def listing(self) -> str:
        sites = self.available()
        if sites:
            return ", ".join(str(pid) for pid in sites)
        if self.kind == "partial" and not self.run.scenario.output.checkpoint_node_state:
            return "none saved: output.checkpoint_node_state was off"
        return "none saved yet"

    def tensors(self, site: int) -> dict[str, torch.Tensor]:
        """Site ``site``'s full state dict, of the checkpoint these models were read for."""
        if site not in self.available():
            raise UseError(f"--site {site}: no model of site {site} in {self.run.run_dir.path} "
                           f"(sites: {self.listing()})")
        assert self.checkpoint is not None
        if self.which == "best" and self.checkpoint.best_round != self.checkpoint.round:  # no state_best.pt
            raise UseError(f"--model best: this run kept the sites' own models for its last checkpoint (round "
                           f"{self.checkpoint.round}) only, and the best round is {self.checkpoint.best_round}; "
                           "use --model last")
        if self.personal is not None:
            return dict(self.personal.personal_arrays()[site].to_torch_state_dict())
        assert self.state_key is not None
        return {**self.run.global_tensors(self.which), **self.node_states[str(site)]["arrays"][self.state_key]}


def _checkpoint(run_dir: RunDirectory, which: ModelChoice) -> Checkpoint | None:
    """The checkpoint whose state holds the sites' models of ``which``: the best round's kept state
    (``state_best.pt``) for ``best`` where the run wrote one, else the last checkpoint (``None``: none yet)."""
    if which == "best" and run_dir.has_best_state():
        return run_dir.load_checkpoint(best=True)
    return run_dir.load_checkpoint() if run_dir.has_checkpoint() else None


def open_run(path: str | Path) -> TrainedRun:
    """The run directory at ``path`` with its scenario and task, built as the run built them.

    Raises
    ------
    UseError
        not a run directory, or its scenario no longer loads.
    """
    from client.cache import task_for
    from server.results import RunDirectoryError
    from server.scenario import ScenarioError, load

    try:
        run_dir = RunDirectory.open(path)
        scenario = load(run_dir.path / SCENARIO_FILE)
    except (RunDirectoryError, ScenarioError) as error:
        raise UseError(str(error)) from None
    return TrainedRun(run_dir, scenario, task_for(scenario))


@dataclass
class Evaluation:
    """What ``medfed evaluate`` found: metrics per evaluation set, and where its files went."""

    model: ModelChoice
    site: int | None
    results: dict[str, dict[str, float]]
    folder: Path

    def to_json(self) -> dict[str, Any]:
        """As ``metrics.json`` and ``--json`` write it: an undefined (NaN) metric is ``null``, as in ``summary.json``."""
        results = {label: {key: None if math.isnan(value) else value for key, value in metrics.items()}
                   for label, metrics in self.results.items()}
        return {"model": self.model, "site": self.site, "results": results, "folder": str(self.folder)}


def evaluation_sets(run: TrainedRun, data: str | Path | None, site: int | None) -> dict[str, Dataset]:
    """Label → dataset that ``medfed evaluate`` scores (module docstring).

    Raises
    ------
    UseError
        ``--data`` for a task that reads no folder of its own layout.
    """
    task = run.task
    if data is not None:
        reader = getattr(task, "folder_dataset", None)
        if reader is None:
            raise UseError(f"--data: the {run.scenario.task.name} task reads no evaluation folder")
        return {Path(data).name: reader(str(data))}
    central = task.server_data()
    if central is not None:
        return {"central": central}
    sites = [site] if site is not None else range(run.scenario.partition.clients)
    return {f"site {pid} validation": task.client_data(pid).val for pid in sites}


def evaluate_run(path: str | Path, *, data: str | Path | None = None, which: ModelChoice = "best",
                 site: int | None = None) -> Evaluation:
    """``medfed evaluate``: score the run's model, write ``metrics.json`` and example pictures.

    Raises
    ------
    UseError
        see :meth:`TrainedRun.model` and :func:`evaluation_sets`.
    DataError
        the evaluation data cannot be read.
    """
    run = open_run(path)
    model = run.model(which, site)
    sets = evaluation_sets(run, data, site)
    name = Path(data).name if data is not None else datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = run.run_dir.path / EVALUATE_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    results = {label: {key: float(value) for key, value in run.task.evaluate(model, dataset).items()}
               for label, dataset in sets.items()}
    whose = "global model" if site is None else f"site {site}'s own model"
    for label, dataset in sets.items():
        heading = f"{run.scenario.name} — {which} {whose} on {label}"
        if accepts_title(run.task.plot_examples):
            run.task.plot_examples(model, dataset, folder / f"{_file_name(label)}.png", title=heading)  # type: ignore[call-arg]
        else:
            run.task.plot_examples(model, dataset, folder / f"{_file_name(label)}.png")
    evaluation = Evaluation(which, site, results, folder)
    (folder / METRICS_FILE).write_text(json.dumps(evaluation.to_json(), indent=2) + "\n", encoding="utf-8")
    return evaluation


def predict_run(path: str | Path, input_path: str | Path, output_path: str | Path, *, which: ModelChoice = "best",
                site: int | None = None) -> list[Path]:
    """``medfed predict``: the files the task's ``predict`` wrote into ``output_path``.

    Raises
    ------
    UseError
        the task has no ``predict``, or see :meth:`TrainedRun.model`.
    DataError
        the inputs cannot be read.
    """
    run = open_run(path)
    predict = getattr(run.task, PREDICT_METHOD, None)
    if predict is None:
        raise UseError(f"the {run.scenario.task.name} task cannot predict: it has no {PREDICT_METHOD}(model, "
                       "input_path, output_path) method")
    return list(predict(run.model(which, site), input_path, output_path))


def metrics_table(evaluation: Evaluation) -> str:
    """The metrics as an aligned text table: one row per evaluation set, one column per metric."""
    keys = list(dict.fromkeys(key for metrics in evaluation.results.values() for key in metrics))
    rows = [["data", *keys]] + [[label, *(f"{metrics.get(key, float('nan')):.4g}" for key in keys)]
                                for label, metrics in evaluation.results.items()]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows)


def _file_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label).strip("_") or "examples"
