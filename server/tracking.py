"""Experiment tracking: a run's params, metrics and files also go to MLflow and TensorBoard (``output.trackers``).

:class:`Tracking` is a round plug-in (:mod:`server.pipeline`). It hands every ``metrics.jsonl`` record to each
tracker the scenario names, as scalars with the round as step (:func:`scalars`):

* ``<phase>/<metric>``: a phase's aggregate (``train/loss``, ``evaluate/dice``, ``central/psnr``), and
  ``<phase>/bytes_up``, ``<phase>/bytes_down``, ``<phase>/seconds``;
* ``<phase>/site-<pid>/<metric>``: one site's own (``evaluate/site-3/dice``);
* ``privacy/epsilon``: the run's ε after the round's training, when the scenario has differential privacy;
* ``attack/<victim>/<metric>``: an attack's scored attempt (``attack/site-0/psnr``, ``attack/global/auc``).

The trackers (:data:`TRACKERS`):

* :class:`MLflowTracker`: one MLflow experiment per scenario name, one MLflow run per run directory (named after
  it), the resolved scenario as params (key paths, ``strategy.rounds``), and at the end ``summary.json``,
  ``scenario.yaml``, ``plots/`` and ``report.html`` as artifacts. ``output.mlflow_uri`` names the tracking
  store; by default it is ``sqlite:///<output.dir>/mlflow.db`` with artifacts under ``<output.dir>/mlruns``, so
  one store holds every run of an output folder. A resumed run continues its MLflow run (the checkpoint keeps
  its id).
* :class:`TensorBoardTracker`: event files in ``<run directory>/tensorboard/`` (PyTorch's ``SummaryWriter``),
  the resolved scenario as text. A resumed run hides the events of the rounds it redoes (``purge_step``).

A tracker never breaks a run: its first error is one warning, and it is off for the rest of the run. A scenario
that names a tracker whose package is missing is refused before the run (:func:`server.checks.check_dependencies`,
with :func:`requirements`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

from medtasks.scenario import Scenario
from server.pipeline import Round, RoundPlugin
from server.results import RunDirectory

__all__ = ["TRACKERS", "MLflowTracker", "TensorBoardTracker", "Tracker", "Tracking", "flat_params", "requirements",
           "scalars"]

log = logging.getLogger("medfed")

INSTALL_HINT = 'pip install -e ".[tracking]"'
ARTIFACTS = ("summary.json", "scenario.yaml", "report.html", "plots")
"""What :class:`MLflowTracker` uploads at the end, each when it exists (files, and folders with their content)."""


# --- what is logged ---------------------------------------------------------------------------------------
def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tracker scalars of one ``metrics.jsonl`` record (see the module docstring); non-numbers are left out."""
    phase = record.get("phase")
    if phase == "attack":
        return _numbers(f"attack/{_site(record.get('victim'))}", record.get("metrics") or {})
    values = _numbers(str(phase), record.get("aggregate") or {})
    for pid, metrics in (record.get("clients") or {}).items():
        values.update(_numbers(f"{phase}/{_site(pid)}", metrics))
    values.update(_numbers(str(phase), {key: record.get(key) for key in ("bytes_up", "bytes_down", "seconds")}))
    if phase == "train":
        values.update(_numbers("privacy", {"epsilon": record.get("epsilon")}))
    return values


def _site(pid: Any) -> str:
    """``site-<pid>`` for a partition id, else the name as it is (``global``)."""
    return f"site-{pid}" if str(pid).isdigit() else str(pid)


def _numbers(prefix: str, metrics: dict[str, Any]) -> dict[str, float]:
    return {f"{prefix}/{name}": float(value) for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def flat_params(scenario: Scenario) -> dict[str, str]:
    """The resolved scenario as key paths → values (``{"strategy.rounds": "3", "task.params.image_size": "32"}``);
    a list, or an empty mapping, is one value in JSON."""
    flat: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            flat[prefix] = value if isinstance(value, str) else json.dumps(value)

    walk("", json.loads(scenario.model_dump_json()))
    return flat


# --- the trackers ---------------------------------------------------------------------------------------
class Tracker(ABC):
    """One experiment tracker: opened once per part of a run, fed scalars, closed at the end.

    Parameters
    ----------
    scenario : Scenario
        The resolved scenario.
    run_dir : RunDirectory
        The run's directory.
    """

    name: ClassVar[str]
    """The tracker's name in ``output.trackers``."""
    module: ClassVar[str]
    """The Python module it needs (checked before a run)."""

    def __init__(self, scenario: Scenario, run_dir: RunDirectory) -> None:
        self.scenario, self.run_dir = scenario, run_dir

    @abstractmethod
    def open(self, state: dict[str, Any], first_round: int) -> None:
        """Start logging; ``state`` is what :meth:`state` returned in the part of the run a resume continues
        (empty for a new run), ``first_round`` the first round this part runs."""

    @abstractmethod
    def log(self, values: dict[str, float], step: int) -> None:
        """Log scalars at step ``step`` (the round)."""

    @abstractmethod
    def close(self, summary: dict[str, Any] | None) -> None:
        """The run is over (``summary``: it completed; ``None``: it stopped early)."""

    def state(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same tracked run (plain values)."""
        return {}


class MLflowTracker(Tracker):
    """Logs to an MLflow tracking store (see the module docstring).

    The client API (``MlflowClient``) is used rather than ``mlflow.start_run``: nothing global is set, so
    several runs in one process (a sweep, the tests) never log into each other's MLflow run.
    """

    name = "mlflow"
    module = "mlflow"
    BATCH = 1000
    """Most metrics one ``log_batch`` call takes (MLflow's limit)."""
    PARAM_BATCH = 100
    """Most params one ``log_batch`` call takes (MLflow's limit)."""
    PARAM_LENGTH = 6000
    """Longest param value MLflow stores."""

    def __init__(self, scenario: Scenario, run_dir: RunDirectory) -> None:
        super().__init__(scenario, run_dir)
        self.client: Any = None
        self.run_id: str | None = None

    def open(self, state: dict[str, Any], first_round: int) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self._uri())
        self.run_id = state.get("mlflow_run_id")
        if self.run_id is not None:
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(self._experiment_id(), run_name=self.run_dir.path.name,
                                     tags={"medfed.run_dir": str(self.run_dir.path.resolve())})
        self.run_id = run.info.run_id
        self._log_params(flat_params(self.scenario))

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, step) for key, value in values.items()]
        for batch in _chunks(metrics, self.BATCH):
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self, summary: dict[str, Any] | None) -> None:
        if summary is not None:
            for name in ARTIFACTS:
                path = self.run_dir.path / name
                if path.is_dir() and any(path.iterdir()):
                    self.client.log_artifacts(self.run_id, str(path), artifact_path=name)
                elif path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "FAILED")

    def state(self) -> dict[str, Any]:
        return {"mlflow_run_id": self.run_id} if self.run_id is not None else {}

    def _output_root(self) -> Path:
        """The scenario's ``output.dir`` as this run directory sits in it (``<output.dir>/<scenario>/<run>``)."""
        return self.run_dir.path.resolve().parent.parent

    def _uri(self) -> str:
        uri = self.scenario.output.mlflow_uri
        return uri if uri is not None else f"sqlite:///{self._output_root() / 'mlflow.db'}"

    def _experiment_id(self) -> str:
        """The scenario's experiment, created on first use (artifacts beside the default store)."""
        from mlflow.exceptions import MlflowException

        name = self.scenario.name
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        artifacts = (self._output_root() / "mlruns").as_uri() if self.scenario.output.mlflow_uri is None else None
        try:
            return self.client.create_experiment(name, artifact_location=artifacts)
        except MlflowException:  # another process created it meanwhile
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, value[: self.PARAM_LENGTH]) for key, value in params.items()]
        for batch in _chunks(entries, self.PARAM_BATCH):
            self.client.log_batch(self.run_id, params=batch)


class TensorBoardTracker(Tracker):
    """Writes TensorBoard event files into ``<run directory>/tensorboard/`` (see the module docstring)."""

    name = "tensorboard"
    module = "tensorboard"
    FOLDER = "tensorboard"

    def __init__(self, scenario: Scenario, run_dir: RunDirectory) -> None:
        super().__init__(scenario, run_dir)
        self.writer: Any = None

    def open(self, state: dict[str, Any], first_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        resumed = first_round > 1
        self.writer = SummaryWriter(log_dir=str(self.run_dir.path / self.FOLDER),
                                    purge_step=first_round if resumed else None)
        if not resumed:
            scenario = "\n".join(f"    {line}" for line in self.scenario.to_yaml().splitlines())  # markdown code
            self.writer.add_text("scenario", scenario, global_step=0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a round's scalars are on disk for a TensorBoard watching the run

    def close(self, summary: dict[str, Any] | None) -> None:
        self.writer.close()


TRACKERS: dict[str, type[Tracker]] = {tracker.name: tracker for tracker in (MLflowTracker, TensorBoardTracker)}
"""Tracker name (``output.trackers``) → its class."""


def requirements(names: Sequence[str]) -> Iterator[tuple[str, str, str]]:
    """(scenario key, module, install hint) of each tracker in ``names`` (:func:`server.checks.check_dependencies`)."""
    for name in names:
        yield "output.trackers", TRACKERS[name].module, INSTALL_HINT


# --- the plug-in ----------------------------------------------------------------------------------------
class Tracking(RoundPlugin):
    """The scenario's trackers as a round plug-in: each ``metrics.jsonl`` record, the run's end, the ids a
    ``--resume`` needs.

    Trackers open at the first round of each part of the run (after :meth:`resume` gave back what the earlier
    part kept). A tracker that raises is one warning and off for the rest of the run.

    Parameters
    ----------
    scenario : Scenario
        The resolved scenario (its ``output.trackers``).
    run_dir : RunDirectory
        The run's directory.
    """

    def __init__(self, scenario: Scenario, run_dir: RunDirectory) -> None:
        self.trackers = [TRACKERS[name](scenario, run_dir) for name in scenario.output.trackers]
        self._kept: dict[str, dict[str, Any]] = {}  # tracker name → its state, from the checkpoint
        self._open = False

    def configure(self, round_: Round) -> None:
        self._start(round_.number)

    def recorded(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        step = int(record.get("round") or 0)
        self._each("log", lambda tracker: tracker.log(values, step))

    def run_ended(self, summary: dict[str, Any] | None) -> None:
        if self._open:
            self._each("close", lambda tracker: tracker.close(summary))

    def checkpoint(self) -> dict[str, Any]:
        return {"trackers": {tracker.name: tracker.state() for tracker in self.trackers}}

    def resume(self, extra: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self._kept = extra.get("trackers", {})

    def _start(self, first_round: int) -> None:
        if not self._open:
            self._open = True
            self._each("start", lambda tracker: tracker.open(self._kept.get(tracker.name, {}), first_round))

    def _each(self, doing: str, action: Callable[[Tracker], None]) -> None:
        """``action`` on every tracker still on; one that raises is switched off with one warning."""
        for tracker in list(self.trackers):
            try:
                action(tracker)
            except Exception as error:  # a tracker must never break the run
                log.warning("%s tracking failed (%s: %s); it is off for the rest of the run", tracker.name, doing,
                            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
                self.trackers.remove(tracker)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
