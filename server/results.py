"""The run directory: everything one run leaves behind (docs/outputs.md).

Layout::

    <output.dir>/<scenario name>/<YYYYmmdd-HHMMSS>[-k]/
      scenario.yaml     resolved scenario
      partitions.json   per-client statistics
      metrics.jsonl     one JSON object per round and phase
      metrics.csv       the same as a table: one row per round, phase and client (:class:`MetricsTable`)
      summary.json      final and best metrics, total time, versions, seed
      checkpoints/      model_last.pt, model_best.pt, state.pt (for --resume)
      plots/            PNGs
      .lock             held (``fcntl.flock``) by the one process running the run

One run at a time: :meth:`RunDirectory.lock` takes an exclusive, non-blocking OS
lock on ``.lock`` for as long as a run writes into the directory, so a second
``medfed run --resume`` of the same directory is refused instead of appending to
the same files. The OS drops the lock when its holder exits, even on a crash.

Durability: ``metrics.jsonl`` lines are flushed and fsync'ed as they are
written, and every other file is replaced atomically (temporary file, fsync,
``os.replace``), so an interrupted run leaves either the old or the new version
of a file, never a torn one. ``state.pt`` is self-contained (it holds the model
arrays too), so the checkpoint a resume reads is always consistent;
``model_last.pt`` and ``model_best.pt`` are plain ``state_dict`` files for users.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import platform
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["Checkpoint", "MetricsTable", "RunDirectory", "RunDirectoryBusy", "RunDirectoryError", "build_summary",
           "csv_rows"]

SCENARIO_FILE = "scenario.yaml"
PARTITIONS_FILE = "partitions.json"
METRICS_FILE = "metrics.jsonl"
METRICS_TABLE_FILE = "metrics.csv"
SUMMARY_FILE = "summary.json"
CHECKPOINTS_DIR = "checkpoints"
PLOTS_DIR = "plots"
MODEL_LAST_FILE = "model_last.pt"
MODEL_BEST_FILE = "model_best.pt"
STATE_FILE = "state.pt"
STATE_BEST_FILE = "state_best.pt"  # state.pt of the best round, for strategies with a model per site
LOCK_FILE = ".lock"

_STATE_FORMAT = 1
_TIMESTAMP = "%Y%m%d-%H%M%S"
_MAX_COLLISIONS = 10_000
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# Exact types ``torch.load(weights_only=True)`` can read back (besides tensors).
_PLAIN_TYPES = (str, int, float, bool, type(None), bytes, torch.dtype, torch.device, torch.Size)
_CONTAINER_TYPES = (dict, OrderedDict, list, tuple, set)
_VERSIONED_PACKAGES = ("torch", "flwr", "numpy", "medfed")


class RunDirectoryError(Exception):
    """A run directory cannot be created, read or resumed."""


class RunDirectoryBusy(RunDirectoryError):
    """Another process is running the run of this directory (it holds the directory's lock)."""


@dataclass
class Checkpoint:
    """What a run needs to resume after its last completed round.

    Attributes
    ----------
    round : int
        The last completed round.
    arrays : dict[str, torch.Tensor]
        Global model state (empty for purely personalised strategies).
    strategy_state : dict[str, Any]
        Whatever the strategy needs to resume; tensors and
        plain Python values (dict, list, tuple, str, int, float, bool, None).
    best_value : float | None
        Best primary metric so far, or ``None``.
    best_round : int | None
        Round of ``best_value``, or ``None``.
    extra : dict[str, Any]
        Anything else the server loop wants back (same value types).
    seconds : float
        Wall-clock time of the run up to this checkpoint, over every part of it
        (the parts before a ``--resume`` included); 0 in checkpoints written
        before this was kept.
    """

    round: int
    arrays: dict[str, torch.Tensor]
    strategy_state: dict[str, Any] = field(default_factory=dict)
    best_value: float | None = None
    best_round: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class RunDirectory:
    """One run's directory; create a new one or open an existing one to resume."""

    def __init__(self, path: Path) -> None:
        """Wraps an existing directory; use :meth:`create` or :meth:`open`."""
        self._path = path
        self._metrics_tail_checked = False
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._table = MetricsTable(path / METRICS_TABLE_FILE)
        self.observers: list[Callable[[dict], None]] = []
        """Called with every record :meth:`append_metrics` writes, once it is written (e.g. experiment trackers)."""

    def __repr__(self) -> str:
        return f"RunDirectory({str(self._path)!r})"

    # -- creation -----------------------------------------------------------------

    @classmethod
    def create(
        cls, output_dir: str | Path, scenario_name: str, now: datetime | None = None
    ) -> RunDirectory:
        """Creates ``<output_dir>/<scenario_name>/<YYYYmmdd-HHMMSS>`` (plus subfolders).

        A run never overwrites another: when the timestamped folder exists,
        ``-1``, ``-2``... is appended. Creation uses ``mkdir`` without
        ``exist_ok``, so two processes starting together still get two folders.

        Parameters
        ----------
        output_dir : str | Path
            The scenario's ``output.dir``.
        scenario_name : str
            The scenario's name; characters outside
            ``[A-Za-z0-9._-]`` are replaced with ``-``.
        now : datetime | None
            Timestamp to use (default: the current local time).

        Returns
        -------
        RunDirectory
            The new run directory.

        Raises
        ------
        RunDirectoryError
            If the name is unusable or the folder cannot be made.
        """
        parent = Path(output_dir) / _safe_name(scenario_name)
        stamp = (now or datetime.now()).strftime(_TIMESTAMP)
        try:
            parent.mkdir(parents=True, exist_ok=True)
            for k in range(_MAX_COLLISIONS):
                path = parent / (stamp if k == 0 else f"{stamp}-{k}")
                try:
                    path.mkdir()
                except FileExistsError:
                    continue
                (path / CHECKPOINTS_DIR).mkdir()
                (path / PLOTS_DIR).mkdir()
                return cls(path)
        except OSError as exc:
            raise RunDirectoryError(
                f"cannot create a run directory under {parent}: {exc.strerror or exc}"
            ) from exc
        raise RunDirectoryError(f"too many runs named {stamp} under {parent}")

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """Opens an existing run directory (for ``--resume``).

        Raises
        ------
        RunDirectoryError
            If ``path`` is not a run directory (no scenario.yaml).
        """
        path = Path(path)
        if not path.is_dir():
            raise RunDirectoryError(f"{path} is not a run directory: no such directory")
        if not (path / SCENARIO_FILE).is_file():
            raise RunDirectoryError(f"{path} is not a run directory: it has no {SCENARIO_FILE}")
        for sub in (CHECKPOINTS_DIR, PLOTS_DIR):
            (path / sub).mkdir(exist_ok=True)
        return cls(path)

    # -- one run at a time -----------------------------------------------------------

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Holds the directory's exclusive lock for the ``with`` block; re-entrant on this object.

        The lock is ``fcntl.flock`` on ``.lock`` (non-blocking), which holds
        the pid of its holder for the message a second run gets.

        Raises
        ------
        RunDirectoryBusy
            If another process (or another :class:`RunDirectory` of the same
            folder) holds it.
        """
        if self._lock_depth == 0:
            self._lock_fd = self._acquire_lock()
        self._lock_depth += 1
        try:
            yield
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                os.close(self._lock_fd)  # closing the descriptor releases the flock
                self._lock_fd = None

    def _acquire_lock(self) -> int:
        path = self._path / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirectoryError(f"cannot lock {self._path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            raise RunDirectoryBusy(
                f"{self._path} is in use by another medfed run{f' (pid {holder})' if holder else ''}; "
                "wait for it to end, or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        return fd

    # -- paths --------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The run directory."""
        return self._path

    @property
    def checkpoints(self) -> Path:
        """The ``checkpoints/`` folder."""
        return self._path / CHECKPOINTS_DIR

    @property
    def plots(self) -> Path:
        """The ``plots/`` folder."""
        return self._path / PLOTS_DIR

    @property
    def metrics_path(self) -> Path:
        """The ``metrics.jsonl`` file."""
        return self._path / METRICS_FILE

    # -- small files --------------------------------------------------------------

    def write_scenario(self, text: str) -> None:
        """Writes the resolved scenario YAML (atomically)."""
        _atomic_write(self._path / SCENARIO_FILE, lambda f: f.write(text.encode("utf-8")))

    def read_scenario_text(self) -> str:
        """Returns the resolved scenario YAML.

        Raises
        ------
        RunDirectoryError
            If it cannot be read.
        """
        path = self._path / SCENARIO_FILE
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RunDirectoryError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def write_partitions(self, partitions: dict) -> None:
        """Writes per-client statistics to ``partitions.json`` (indent 2)."""
        _write_json(self._path / PARTITIONS_FILE, partitions)

    def write_summary(self, summary: dict) -> None:
        """Writes ``summary.json`` (indent 2; NaN/inf become null)."""
        _write_json(self._path / SUMMARY_FILE, summary)

    def read_summary(self) -> dict | None:
        """Returns ``summary.json`` (written when a run finishes), or ``None`` if there is none.

        Raises
        ------
        RunDirectoryError
            If it exists but cannot be read as JSON.
        """
        return _read_json(self._path / SUMMARY_FILE)

    def read_partitions(self) -> dict:
        """Returns ``partitions.json`` (the sites described so far), or ``{}`` if there is none.

        Raises
        ------
        RunDirectoryError
            If it exists but cannot be read as JSON.
        """
        return _read_json(self._path / PARTITIONS_FILE) or {}

    def discard_summary(self) -> None:
        """Removes ``summary.json``: the run goes on (more rounds), so it no longer describes the run."""
        (self._path / SUMMARY_FILE).unlink(missing_ok=True)

    # -- metrics.jsonl ------------------------------------------------------------

    def append_metrics(self, record: dict) -> None:
        """Appends one record as a line of strict JSON, flushed and fsync'ed, and its rows to ``metrics.csv``;
        then hands it to each of :attr:`observers`.

        NaN and ±inf become ``null``; NumPy/tensor scalars become numbers. If an
        earlier process was killed mid-line, the torn line is cut off first.
        """
        line = (_dumps(record) + "\n").encode("utf-8")
        with open(self.metrics_path, "ab+") as f:
            if not self._metrics_tail_checked:
                _cut_torn_last_line(f)
                self._metrics_tail_checked = True
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._table.append(_jsonable(record), self.read_metrics)
        for observer in self.observers:
            observer(record)

    def read_metrics(self) -> list[dict]:
        """Returns all records; a truncated last line (interrupted write) is skipped.

        Raises
        ------
        RunDirectoryError
            If a line other than the last is not valid JSON.
        """
        try:
            text = self.metrics_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        lines = text.split("\n")
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                if number == len(lines):  # no newline after it: a torn write
                    break
                raise RunDirectoryError(
                    f"{self.metrics_path}:{number} is not valid JSON: {exc.msg}"
                ) from exc
        return records

    def truncate_metrics(self, last_round: int) -> None:
        """Drops records with ``round > last_round`` (rewrites the file atomically).

        Used on resume so a half-finished round is redone from scratch.
        """
        if not self.metrics_path.exists():
            return
        kept = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        payload = "".join(_dumps(r) + "\n" for r in kept).encode("utf-8")
        _atomic_write(self.metrics_path, lambda f: f.write(payload))
        self._metrics_tail_checked = True
        self._table.rebuild(kept)

    def remove_if_unstarted(self) -> bool:
        """Delete this run directory if no round has left anything in it (no checkpoint, no metrics record).

        For a new run refused by its input only once the sites read their data: the directory was made for
        it and holds nothing but its ``scenario.yaml``, so the refusal leaves no run directory behind, as
        one found before the run does. Returns whether it was deleted.
        """
        if self.has_checkpoint() or self.read_metrics():
            return False
        shutil.rmtree(self._path, ignore_errors=True)
        return not self._path.exists()

    # -- checkpoints --------------------------------------------------------------

    def has_checkpoint(self) -> bool:
        """Whether a checkpoint to resume from was written (a run stopped before its first one has none)."""
        return (self.checkpoints / STATE_FILE).is_file()

    def save_checkpoint(
        self, checkpoint: Checkpoint, *, primary_value: float | None, higher_is_better: bool,
        keep_best_state: bool = False,
    ) -> Checkpoint:
        """Saves the checkpoint of a completed round; keeps the best model.

        Writes ``model_best.pt`` (and with ``keep_best_state`` ``state_best.pt``) first
        when ``primary_value`` improves on ``checkpoint.best_value`` (NaN/None never improve), then
        ``model_last.pt``, then ``state.pt``, each atomically (temporary file and
        rename). One fsync of ``state.pt``, what ``--resume`` reads, and one of the
        folder make the round durable; the two model files, which only repeat
        ``state.pt``'s arrays for users, are left to the operating system to flush
        (a crash may leave their previous version, never a partial file).

        Parameters
        ----------
        checkpoint : Checkpoint
            State after ``checkpoint.round``.
        primary_value : float | None
            This round's primary metric, or ``None``.
        higher_is_better : bool
            Direction of the primary metric.
        keep_best_state : bool
            Also keep the best round's whole state as ``state_best.pt``: for a strategy whose sites keep
            their own models (in its state or in the nodes' states), ``model_best.pt`` alone is not the best
            round's model of each site.

        Returns
        -------
        Checkpoint
            ``checkpoint`` with ``best_value``/``best_round`` updated.

        Raises
        ------
        TypeError
            If the state holds values ``torch.load(weights_only=True)``
            could not read back (e.g. NumPy arrays); the message names the key.
        """
        _check_loadable(checkpoint.arrays, "arrays")
        _check_loadable(checkpoint.strategy_state, "strategy_state")
        _check_loadable(checkpoint.extra, "extra")
        new_best = primary_value if primary_value is not None and _improves(
            primary_value, checkpoint.best_value, higher_is_better) else None
        if new_best is not None:
            checkpoint = replace(checkpoint, best_value=float(new_best), best_round=checkpoint.round)
        state = {
            "format": _STATE_FORMAT,
            "round": int(checkpoint.round),
            "arrays": checkpoint.arrays,
            "strategy_state": checkpoint.strategy_state,
            "best_value": checkpoint.best_value,
            "best_round": checkpoint.best_round,
            "extra": checkpoint.extra,
            "seconds": float(checkpoint.seconds),
        }
        if new_best is not None:
            self._torch_save(MODEL_BEST_FILE, checkpoint.arrays, durable=False)
            if keep_best_state:
                self._torch_save(STATE_BEST_FILE, state, durable=False)
        self._torch_save(MODEL_LAST_FILE, checkpoint.arrays, durable=False)
        self._torch_save(STATE_FILE, state)
        return checkpoint

    def has_best_state(self) -> bool:
        """Whether the best round's whole state was kept (``save_checkpoint(..., keep_best_state=True)``)."""
        return (self.checkpoints / STATE_BEST_FILE).is_file()

    def load_checkpoint(self, *, best: bool = False) -> Checkpoint:
        """Loads the last checkpoint, or with ``best`` the best round's kept state (tensors on CPU).

        Raises
        ------
        RunDirectoryError
            If there is none or it cannot be read.
        """
        path = self.checkpoints / (STATE_BEST_FILE if best else STATE_FILE)
        if not path.is_file():
            raise RunDirectoryError(f"{self._path} has no checkpoint to resume from ({path})")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RunDirectoryError(f"cannot read checkpoint {path}: {exc}") from exc
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise RunDirectoryError(f"{path} is not a medfed checkpoint (format {_STATE_FORMAT})")
        return Checkpoint(
            round=state["round"],
            arrays=state["arrays"],
            strategy_state=state["strategy_state"],
            best_value=state["best_value"],
            best_round=state["best_round"],
            extra=state["extra"],
            seconds=float(state.get("seconds", 0.0)),
        )

    def _torch_save(self, name: str, obj: Any, *, durable: bool = True) -> None:
        _atomic_write(self.checkpoints / name, lambda f: torch.save(obj, f), durable=durable)


class MetricsTable:
    """``metrics.csv``: ``metrics.jsonl`` as one table, for pandas and spreadsheets.

    One row per (round, phase, client), in the records' order: first the phase's aggregate, client ``all``,
    then each site by partition id. Columns: ``round``, ``phase``, ``client``, every metric name any row has
    (sorted), then ``bytes_up``, ``bytes_down``, ``seconds``, ``epsilon``. Each row's values are its own: a
    site's row has the site's metrics (its ``seconds`` and ``epsilon`` when it reports them, ``error`` when it
    failed), the ``all`` row the aggregate and the phase's bytes, wall-clock seconds and the run's ε. An attack's
    scored attempt (:class:`privacy.attacks.base.Outcome`) is a row of phase ``attack``: client is the victim
    (a partition id, or ``global``), ``attacker`` who attacked, and its metrics are prefixed ``attack_``
    (``attack_psnr``, ``attack_auc``), so they never mix with the task's. Empty cells: not reported.

    The file is derived: rows are appended as records are written, and it is rewritten from ``metrics.jsonl``
    when a record brings a new column, when a process first appends to it, and when a resume drops records,
    so it always holds exactly the records of ``metrics.jsonl``.

    Parameters
    ----------
    path : Path
        The run directory's ``metrics.csv``.
    """

    LEADING = ("round", "phase", "client")
    TRAILING = ("bytes_up", "bytes_down", "seconds", "epsilon")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.columns: list[str] | None = None  # unknown until this process writes the file

    def append(self, record: dict, records: Callable[[], list[dict]]) -> None:
        """Add ``record``'s rows; rewrite the file from ``records()`` (every record, ``record`` last) when the
        columns are not known yet or ``record`` brings a new one."""
        rows = csv_rows(record)
        if self.columns is None or not _metric_names(rows) <= set(self.columns):
            self.rebuild(records())
            return
        with open(self.path, "a", encoding="utf-8", newline="") as f:
            self._writer(f, self.columns).writerows(rows)

    def rebuild(self, records: list[dict]) -> None:
        """Rewrite the file (atomically) with the rows of ``records``."""
        rows = [row for record in records for row in csv_rows(record)]
        columns = [*self.LEADING, *sorted(_metric_names(rows) - {*self.LEADING, *self.TRAILING}), *self.TRAILING]
        text = io.StringIO(newline="")
        writer = self._writer(text, columns)
        writer.writeheader()
        writer.writerows(rows)
        payload = text.getvalue().encode("utf-8")
        _atomic_write(self.path, lambda f: f.write(payload), durable=False)  # metrics.jsonl is the durable copy
        self.columns = columns

    @staticmethod
    def _writer(f: IO[str], columns: list[str]) -> csv.DictWriter:
        return csv.DictWriter(f, fieldnames=columns, lineterminator="\n")


def csv_rows(record: dict) -> list[dict[str, Any]]:
    """The :class:`MetricsTable` rows of one ``metrics.jsonl`` record."""
    where = {"round": record.get("round"), "phase": record.get("phase")}
    if record.get("phase") == "attack":
        metrics = {f"attack_{name}": value for name, value in (record.get("metrics") or {}).items()}
        return [{**metrics, "attacker": record.get("attacker"), "seconds": record.get("seconds"), **where,
                 "client": record.get("victim")}]
    phase_totals = {key: record.get(key) for key in MetricsTable.TRAILING}
    rows = [{**(record.get("aggregate") or {}), **phase_totals, **where, "client": "all"}]
    rows += [{**metrics, **where, "client": pid} for pid, metrics in (record.get("clients") or {}).items()]
    return rows


def _metric_names(rows: Iterable[dict[str, Any]]) -> set[str]:
    return {name for row in rows for name in row}


def build_summary(
    records: list[dict],
    *,
    primary_metric: str,
    higher_is_better: bool,
    seed: int,
    seconds: float,
    rounds_completed: int,
    extra: dict | None = None,
) -> dict:
    """Builds the content of ``summary.json`` from the metrics records.

    Parameters
    ----------
    records : list[dict]
        ``metrics.jsonl`` records, in file order.
    primary_metric : str
        The task's primary metric (e.g. ``"dice"``).
    higher_is_better : bool
        Direction of the primary metric.
    seed : int
        The scenario seed.
    seconds : float
        Total wall-clock time of the run.
    rounds_completed : int
        Number of the last completed round.
    extra : dict | None
        Merged into the top level (its keys win).

    Returns
    -------
    dict
        ``{"rounds_completed", "seconds", "seed", "final", "final_round", "best",
        "bytes_up", "bytes_down", "epsilon", "versions"}`` where ``final`` maps
        each phase present (train, evaluate, central) to the aggregate metrics
        of its last record and ``final_round`` to that record's round;
        ``best`` is ``{"metric", "higher_is_better", "phase", "value", "round"}``
        over the central phase if it reports the metric, else the evaluate
        phase (the earliest round wins ties); ``epsilon`` is the last reported
        privacy budget.
    """
    final: dict[str, dict] = {}
    final_round: dict[str, int | None] = {}
    for rec in records:
        phase = rec.get("phase", "")
        final[phase], final_round[phase] = rec.get("aggregate") or {}, rec.get("round")
    best: dict[str, Any] = {
        "metric": primary_metric,
        "higher_is_better": higher_is_better,
        "phase": None,
        "value": None,
        "round": None,
    }
    for phase in ("central", "evaluate"):
        for rec in records:
            if rec.get("phase") != phase:
                continue
            value = _finite((rec.get("aggregate") or {}).get(primary_metric))
            if _improves(value, best["value"], higher_is_better):
                best.update(phase=phase, value=value, round=rec.get("round"))
        if best["phase"] is not None:
            break
    epsilons = [rec["epsilon"] for rec in records if rec.get("epsilon") is not None]
    summary = {
        "rounds_completed": rounds_completed,
        "seconds": seconds,
        "seed": seed,
        "final": {p: final[p] for p in _phase_order(final)},
        "final_round": {p: final_round[p] for p in _phase_order(final)},
        "best": best,
        "bytes_up": sum(int(rec.get("bytes_up") or 0) for rec in records),
        "bytes_down": sum(int(rec.get("bytes_down") or 0) for rec in records),
        "epsilon": epsilons[-1] if epsilons else None,
        "versions": _versions(),
    }
    summary.update(extra or {})
    return summary


# -- helpers --------------------------------------------------------------------


def _safe_name(name: str) -> str:
    safe = _UNSAFE_NAME_CHARS.sub("-", name).strip("-")
    if not safe.strip("."):
        raise RunDirectoryError(f"scenario name {name!r} cannot name a folder")
    return safe


def _phase_order(phases: Iterable[str]) -> list[str]:
    known = ("train", "evaluate", "central")
    return sorted(phases, key=lambda p: (known.index(p) if p in known else len(known), p))


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _improves(value: float | None, best: float | None, higher_is_better: bool) -> bool:
    value = _finite(value)
    if value is None:
        return False
    if best is None:
        return True
    return value > best if higher_is_better else value < best


def _jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf as None, scalars/arrays as Python numbers/lists."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # NumPy scalars/arrays, torch tensors
        return _jsonable(obj.tolist())
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON: {obj!r}")


def _dumps(obj: Any, indent: int | None = None) -> str:
    return json.dumps(_jsonable(obj), allow_nan=False, indent=indent, ensure_ascii=False)


def _read_json(path: Path) -> Any:
    """``path`` read as JSON, ``None`` if it does not exist; a :class:`RunDirectoryError` if it cannot be read."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise RunDirectoryError(f"cannot read {path}: {exc}") from exc


def _write_json(path: Path, obj: Any) -> None:
    payload = (_dumps(obj, indent=2) + "\n").encode("utf-8")
    _atomic_write(path, lambda f: f.write(payload))


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, durable: bool = True) -> None:
    """Writes ``path`` via a temporary sibling and ``os.replace``; ``durable``: fsync the file before the rename
    and the folder after it (a later durable write to the same folder makes this rename durable too)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Makes a rename durable (best effort; not possible on every platform)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _cut_torn_last_line(f: IO[bytes], block: int = 1 << 16) -> None:
    """Truncates ``f`` after its last newline if it does not end with one."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return
    pos = end
    while pos > 0:
        start = max(0, pos - block)
        f.seek(start)
        chunk = f.read(pos - start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            f.truncate(start + newline + 1)
            return
        pos = start
    f.truncate(0)


def _check_loadable(obj: Any, where: str) -> None:
    """Raises TypeError if ``torch.load(weights_only=True)`` could not read ``obj``."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_TYPES:
        return
    if type(obj) in _CONTAINER_TYPES:
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        for key, value in items:
            if isinstance(obj, dict) and type(key) not in _PLAIN_TYPES:
                raise TypeError(f"checkpoint {where}: key {key!r} has type {type(key).__name__}")
            _check_loadable(value, f"{where}[{key!r}]")
        return
    raise TypeError(
        f"checkpoint {where} has type {type(obj).__name__}; use tensors and plain "
        "Python values (dict, list, tuple, set, str, int, float, bool, None)"
    )


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions
