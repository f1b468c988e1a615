"""The server's round loop: discovery, then each round as a pipeline of named points, then the results.

It drives any Flower Message-API strategy through its four methods (``configure_train``,
``aggregate_train``, ``configure_evaluate``, ``aggregate_evaluate``) as ``Strategy.start`` does, and adds
what a research platform needs around them: a discovery (query) round that maps random node ids to
partition ids, the round's plug-in points (:mod:`server.pipeline`: reply checks, node states, the privacy
mechanism's server half), per-client metrics and bytes in ``metrics.jsonl``, checkpoints, ``--resume``,
live progress, and a clear stop when a round cannot be completed. The loop is the same on every engine: it
only sees a ``Grid``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
)
from flwr.serverapp import Grid

from client.cache import task_for
from medtasks.base import Task
from medtasks.seeding import seed_everything
from server.attack_round import AttackRound, attack_plugin
from server.discovery import DISCOVERY_TIMEOUT, InputError, SiteStats, describes_every_site, discover
from server.example_plots import ExamplePlots, SiteModels
from server.exchange import (
    Exchange,
    RunInterrupted,
    exchange,
    record_nbytes,
)
from server.node_states import NodeStates
from server.pipeline import BudgetSpent, FederationError, Plugins, Round, RoundPlugin
from server.privacy_round import PrivacyRound
from server.progress import Progress
from server.replies import ReplyCheck
from server.results import Checkpoint, RunDirectory, build_summary
from server.scenario import Scenario
from server.tracking import Tracking
from strategies import get_algorithm
from strategies.base import (
    METRICS_KEY,
    ROUND_KEY,
    SCENARIO_KEY,
    Cohort,
    Personalized,
    Stateful,
    StrategyContext,
    load_into,
)

__all__ = ["DISCOVERY_TIMEOUT", "BudgetSpent", "Federation", "FederationError", "InputError", "RunInterrupted", "discover",
           "per_client", "record_nbytes"]

log = logging.getLogger("medfed")

class Central(NamedTuple):
    """The server's evaluation on its held-out set, as the ``central`` record holds it."""

    clients: dict[str, dict[str, float]]  # each site's own model (Personalized strategies), else empty
    metrics: dict[str, float]
    seconds: float


def _site_summary(metrics: dict[str, Any]) -> str:
    """One site's train outcome in a few words: its error, or its loss, examples and seconds."""
    if "error" in metrics:
        return f"failed: {str(metrics['error']).strip().splitlines()[0]}"
    parts = [f"loss {metrics['loss']:.4g}" if isinstance(metrics.get("loss"), (int, float)) else None,
             f"{int(metrics['num-examples'])} examples" if "num-examples" in metrics else None,
             f"{metrics['seconds']:.1f} s" if isinstance(metrics.get("seconds"), (int, float)) else None]
    return "ok, " + ", ".join(part for part in parts if part)


def per_client(replies: list[Message], cohort: Cohort) -> dict[str, dict[str, Any]]:
    """Per-partition metrics of a phase (``{"error": reason}`` for failed clients)."""
    clients: dict[str, dict[str, Any]] = {}
    for reply in sorted(replies, key=cohort.partition_of):
        pid = str(cohort.partition_of(reply))
        if reply.has_error():
            clients[pid] = {"error": reply.error.reason}
        else:
            clients[pid] = {key: value for key, value in reply.content[METRICS_KEY].items()}
    return clients


class Federation:
    """One run of a scenario on a grid, writing into a run directory.

    Parameters
    ----------
    scenario : Scenario
        The resolved scenario.
    run_dir : RunDirectory
        Where results go (created by the caller).
    progress : Progress
        Live display.
    resume : bool
        Continue from the run directory's last checkpoint.
    """

    def __init__(self, scenario: Scenario, run_dir: RunDirectory, progress: Progress, *, resume: bool = False) -> None:
        self.scenario = scenario
        self.run_dir = run_dir
        self.progress = progress
        self.resume = resume
        self.task: Task = task_for(scenario)
        self.scenario_json = scenario.to_json()  # travels in every message; serialise once
        self.stop = threading.Event()  # set by an engine whose ServerApp runs in another thread (Ctrl-C)
        self._central_model: torch.nn.Module | None = None
        self._global_model_complete = True  # False for strategies whose global model lacks the sites' own layers
        self._site_lines = scenario.engine.backend == "deployment"  # one log line per site and round (operators)
        self.overlap_central_evaluation = False  # the engine's clients run elsewhere: evaluate centrally meanwhile
        self.privacy: PrivacyRound | None = None
        self.sites = SiteStats(scenario)  # each site's statistics, from discovery (:mod:`server.discovery`)
        self.attack: AttackRound | None = None
        self.plugins = Plugins([])
        self._examples: ExamplePlots | None = None  # the model's pictures (:meth:`run` builds it)
        self._started = time.perf_counter()
        self._earlier_seconds = 0.0  # the run's time before this part (a resumed run's earlier parts)

    # --- the run ----------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict[str, Any]:
        """Run all rounds; returns the summary written to ``summary.json``.

        The plug-ins see every record as it is written (``recorded``) and the run's end (``run_ended``: the
        summary, or ``None`` when the run stops early).
        """
        summary: dict[str, Any] | None = None
        self.run_dir.observers.append(self._recorded)
        try:
            summary = self._run(grid)
            return summary
        finally:
            self.run_dir.observers.remove(self._recorded)
            self.plugins.run_ended(summary)

    def _recorded(self, record: dict[str, Any]) -> None:
        self.plugins.recorded(record)

    def _run(self, grid: Grid) -> dict[str, Any]:
        scenario = self.scenario
        self._started = time.perf_counter()
        seed_everything(scenario.seed, "server")
        cohort, self.sites = discover(grid, scenario, stop=self.stop)
        if self.resume and not describes_every_site(scenario):  # the sites an earlier part described
            self.sites.known.update({int(pid): site for pid, site in self.run_dir.read_partitions().get("clients", {}).items()})
        if not self.resume:
            self.run_dir.write_partitions(self._partitions(self.sites.known))
        stats = self.sites.known  # filled in as sites are first sampled, in a large federation
        self.privacy = PrivacyRound(scenario, stats)

        algorithm = get_algorithm(scenario.strategy.name)
        params = algorithm.Params.model_validate(scenario.strategy.params)
        template = self.task.build_model()
        strategy = algorithm.build_strategy(StrategyContext(scenario, params, cohort, template))
        strategy.summary()
        self.privacy.summary()
        node_states = NodeStates(cohort, keep_copies=scenario.output.checkpoint_node_state,
                                 timeout=scenario.strategy.round_timeout, stop=self.stop)
        rule = algorithm.client_rule(params)
        checks = ReplyCheck(cohort, rule.uploads(template), stats,
                            bounded=scenario.strategy.example_counts == "bounded", pooled=algorithm.combine == "pooled")
        self._global_model_complete = algorithm.central_evaluation
        # the attack first: it sees what the server receives, and removes what an attacker added for the experimenter
        self.attack = attack_plugin(scenario, self.task, rule, template, self.run_dir, self._model_with,
                                    complete=self._global_model_complete)
        plugins: list[RoundPlugin] = [*([self.attack] if self.attack else []), checks, node_states, self.privacy]
        self._examples = ExamplePlots(self.task, self._model_with, self.run_dir.plots,
                                      every=scenario.output.examples_every, complete=self._global_model_complete,
                                      sites=SiteModels(strategy, rule, node_states.copies, template), title=scenario.name)
        if scenario.output.trackers:  # first: its trackers open at the round's start, whatever ends it
            plugins.insert(0, Tracking(scenario, self.run_dir))
        if scenario.output.plots and scenario.output.examples_every:
            plugins.append(self._examples)
        self.plugins = Plugins(plugins)
        arrays, checkpoint = ArrayRecord(template.state_dict()), None
        first_round = 1
        if self.resume:
            checkpoint = self.run_dir.load_checkpoint()
            arrays = ArrayRecord(checkpoint.arrays)
            if isinstance(strategy, Stateful):
                strategy.load_state_dict(checkpoint.strategy_state)
            first_round = checkpoint.round + 1
            self._earlier_seconds = checkpoint.seconds
            self.run_dir.truncate_metrics(checkpoint.round)
            self.plugins.resume(checkpoint.extra, self.run_dir.read_metrics())
            if not node_states.restore(grid, checkpoint.extra) and not scenario.output.checkpoint_node_state:
                log.warning("resuming without node state (output.checkpoint_node_state is off): clients restart empty")
            log.info("resuming %s after round %d", self.run_dir.path, checkpoint.round)

        total = scenario.strategy.rounds
        self.progress.start(total_rounds=total, first_round=first_round)
        completed = first_round - 1
        try:
            for server_round in range(first_round, total + 1):
                round_ = self.run_round(Round(server_round, arrays, self._config(server_round), cohort, grid), strategy)
                arrays = round_.arrays
                checkpoint = self._checkpoint(strategy, round_, checkpoint)
                self.progress.round_done(server_round, {key: value for key, value in round_.headline.items()
                                                        if value is not None})
                completed = server_round
        except BudgetSpent as reason:
            log.info("%s; the run ends after round %d", reason, completed)
        finally:
            self.progress.close()

        return self._finish(arrays, checkpoint, self._seconds(), completed)

    def _seconds(self) -> float:
        """Wall-clock seconds of the whole run so far: this part, plus the parts before a ``--resume``."""
        return self._earlier_seconds + time.perf_counter() - self._started

    def _config(self, server_round: int) -> ConfigRecord:
        return ConfigRecord({SCENARIO_KEY: self.scenario_json, ROUND_KEY: server_round})

    def run_round(self, round_: Round, strategy: Any) -> Round:
        """One round, point by point (:mod:`server.pipeline`): configure, exchange, inspect, aggregate,
        after-aggregate, evaluate, record."""
        plugins, t = self.plugins, round_.number
        plugins.configure(round_)                                     # σ for the sites, the run's budget
        round_.messages = list(strategy.configure_train(t, round_.arrays, round_.config, round_.grid))
        round_.train = train = self._phase(round_, "train", round_.messages)  # exchange + inspect
        plugins.before_aggregate(round_)                              # e.g. the server's clip of each update
        aggregated, round_.train_metrics = strategy.aggregate_train(t, train.replies)
        usable = sum(1 for reply in train.replies if not reply.has_error())
        if aggregated is None or usable < self.scenario.strategy.min_clients:
            raise self._too_few_updates(round_, train, usable)
        round_.arrays = aggregated
        plugins.after_aggregate(round_)                               # e.g. noise on the aggregate
        self._record(t, "train", round_.cohort, train, round_.train_metrics)
        round_.headline = {"train loss": _metric(round_.train_metrics, "loss"),
                           "ε": self.privacy.run_epsilon() if self.privacy is not None else None}
        if t % self.scenario.strategy.evaluate_every == 0 or t == self.scenario.strategy.rounds:
            self._evaluate(round_, strategy)
        plugins.round_done(round_)                                    # e.g. example pictures every k rounds
        return round_

    def _too_few_updates(self, round_: Round, train: Exchange, usable: int) -> FederationError:
        """Why the run ends: the budget's doing (raises :class:`BudgetSpent`), else the error to raise."""
        try:
            self.plugins.aggregate_failed(round_)
        except BudgetSpent:
            self._record(round_.number, "train", round_.cohort, train, None)
            raise
        reasons = [reply.error.reason for reply in train.replies if reply.has_error()]
        detail = f"; first failure: {reasons[0]}" if reasons else ""
        return FederationError(
            f"round {round_.number}: {usable} of {len(round_.messages)} clients returned a usable update, "
            f"strategy.min_clients is {self.scenario.strategy.min_clients}{detail}"
        )

    def _evaluate(self, round_: Round, strategy: Any) -> None:
        """Federated evaluation on the sites' validation splits, then the server's own test set.

        With :attr:`overlap_central_evaluation` the server evaluates its test set while the sites evaluate
        theirs; the records and their numbers are the same either way (the central evaluation is deterministic
        given the model, and draws nothing from the run's random streams).
        """
        t, primary = round_.number, self.task.primary_metric
        messages = list(strategy.configure_evaluate(t, round_.arrays, ConfigRecord(dict(round_.config)), round_.grid))
        central = self._central_evaluation(round_.arrays, strategy, alongside=self.overlap_central_evaluation)
        if messages:
            done = self._phase(round_, "evaluate", messages)
            metrics = strategy.aggregate_evaluate(t, done.replies)
            self._record(t, "evaluate", round_.cohort, done, metrics)
            round_.headline[primary] = _metric(metrics, primary)
        result = central()
        if result is not None:
            self._record(t, "central", round_.cohort, Exchange(seconds=result.seconds),
                         MetricRecord(dict(result.metrics.items())), clients=result.clients)
            round_.headline[f"central {primary}"] = result.metrics.get(primary)

    def _phase(self, round_: Round, phase: str, messages: list[Message]) -> Exchange:
        """Send a phase's messages, collect one reply per message, and let the plug-ins inspect them."""
        t, cohort = round_.number, round_.cohort
        self.progress.phase(t, phase, len(messages))
        if self.sites.describe(round_.grid, cohort, [message.metadata.dst_node_id for message in messages]):
            self.run_dir.write_partitions(self._partitions(self.sites.known))  # the sites described so far
        done = exchange(
            round_.grid,
            messages,
            self.scenario.strategy.round_timeout,
            lambda reply: self.progress.client_done(t, phase, cohort.partition_of(reply)),
            self.stop,
        )
        try:
            self.plugins.inspect(round_, phase, done, messages)
        except BudgetSpent as spent:
            if spent.record_train:  # who ran out, before the run ends
                self._record(t, phase, cohort, done, None)
            raise
        return done

    def _record(self, server_round: int, phase: str, cohort: Cohort, done: Exchange, metrics: MetricRecord | None,
                clients: dict[str, dict[str, Any]] | None = None) -> None:
        """Append one ``metrics.jsonl`` record; ``clients`` defaults to the replies' metrics.

        Its ``epsilon`` is the run's so far, with ``delta`` and ``accountant`` saying what it means
        (:meth:`server.privacy_round.PrivacyRound.stamp`).
        """
        record: dict[str, Any] = {
            "round": server_round,
            "phase": phase,
            "clients": per_client(done.replies, cohort) if clients is None else clients,
            "aggregate": dict(metrics.items()) if metrics is not None else {},
            "bytes_up": done.bytes_up,
            "bytes_down": done.bytes_down,
            "seconds": round(done.seconds, 4),
        }
        if self.privacy is not None:
            self.privacy.stamp(record)
        self.run_dir.append_metrics(record)
        if self._site_lines and phase == "train":
            for pid, site_metrics in record["clients"].items():
                log.info("round %d | site %s | %s", server_round, pid, _site_summary(site_metrics))

    def _partitions(self, stats: dict[int, Any]) -> dict[str, Any]:
        """What ``partitions.json`` holds: the partition kind, each site's statistics and, when the task
        describes its central test set (an optional ``server_stats()``, e.g. a test folder), ``"server"``."""
        partitions: dict[str, Any] = {"kind": self.scenario.partition.kind,
                                      "clients": {str(k): stats[k] for k in sorted(stats)}}
        server_stats = getattr(self.task, "server_stats", None)
        described = server_stats() if server_stats is not None else None
        if described is not None:
            partitions["server"] = described
        return partitions

    def _central_evaluation(self, arrays: ArrayRecord, strategy: Any, *, alongside: bool) -> Callable[[], Central | None]:
        """The server's evaluation on its held-out set: a call that returns it (None: no set, or no model).

        ``alongside``: the models are read from the strategy now, in this thread, and evaluated in a thread of
        their own; the call waits for the result. Otherwise the call does it all.
        """
        if not alongside:
            return lambda: self._evaluate_centrally(self._central_models(arrays, strategy))
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medfed-central")
        future = pool.submit(self._evaluate_centrally, self._central_models(arrays, strategy))
        pool.shutdown(wait=False)  # its thread ends with this one evaluation
        return future.result

    def _central_models(self, arrays: ArrayRecord, strategy: Any) -> ArrayRecord | dict[str, ArrayRecord] | None:
        """What the server's held-out set judges: the global model, or partition id → that site's own model
        (none: no set, or no model to evaluate).

        A :class:`~strategies.base.Personalized` strategy is judged by its sites' own
        models: each is evaluated, recorded per client, and the phase's aggregate is
        their unweighted mean (every model sees the same test set). A strategy whose
        global model is incomplete by design (FedBN: BatchNorm stays at the sites) declares
        ``central_evaluation=False`` in its :class:`~strategies.base.Algorithm` and is judged by
        federated evaluation only.
        """
        if self.task.server_data() is None or not self._global_model_complete:
            return None
        if isinstance(strategy, Personalized):
            return {str(pid): model_arrays for pid, model_arrays in sorted(strategy.personal_arrays().items())} or None
        return arrays if len(arrays) else None

    def _evaluate_centrally(self, models: ArrayRecord | dict[str, ArrayRecord] | None) -> Central | None:
        """:meth:`_central_models`'s ``models`` evaluated on the server's held-out set."""
        if models is None:
            return None
        started, dataset = time.perf_counter(), self.task.server_data()
        if isinstance(models, ArrayRecord):
            clients, metrics = {}, self._evaluate_central(models, dataset)
        else:
            clients = {pid: self._evaluate_central(model_arrays, dataset) for pid, model_arrays in models.items()}
            metrics = {key: float(np.nanmean([c[key] for c in clients.values()])) for key in next(iter(clients.values()))}
        return Central(clients, metrics, time.perf_counter() - started)

    def _evaluate_central(self, arrays: ArrayRecord, dataset: Any) -> dict[str, float]:
        return {key: float(value) for key, value in self.task.evaluate(self._model_with(arrays), dataset).items()}

    def _model_with(self, arrays: ArrayRecord) -> torch.nn.Module:
        """The server's one evaluation model instance, loaded with ``arrays``."""
        if self._central_model is None:
            self._central_model = self.task.build_model()
        load_into(self._central_model, arrays.to_torch_state_dict())
        return self._central_model

    # --- checkpoints and the end ----------------------------------------------------------------
    def _checkpoint(self, strategy: Any, round_: Round, previous: Checkpoint | None) -> Checkpoint | None:
        headline, server_round = round_.headline, round_.number
        keys = (f"central {self.task.primary_metric}", self.task.primary_metric)  # central set first, if it has one
        primary = next((value for key in keys if (value := headline.get(key)) is not None), None)
        last = server_round == self.scenario.strategy.rounds
        if server_round % self.scenario.output.checkpoint_every and not last:
            return previous
        checkpoint = Checkpoint(
            round=server_round,
            arrays=round_.arrays.to_torch_state_dict(),
            strategy_state=strategy.state_dict() if isinstance(strategy, Stateful) else {},
            best_value=previous.best_value if previous else None,
            best_round=previous.best_round if previous else None,
            extra=self.plugins.checkpoint(),
            seconds=self._seconds(),
        )
        own_site_models = isinstance(strategy, Personalized) or not self._global_model_complete
        return self.run_dir.save_checkpoint(checkpoint, primary_value=primary, higher_is_better=self.task.higher_is_better,
                                            keep_best_state=own_site_models)

    def _finish(self, arrays: ArrayRecord, checkpoint: Checkpoint | None, seconds: float,
                completed: int) -> dict[str, Any]:
        scenario = self.scenario
        records = self.run_dir.read_metrics()
        summary = build_summary(
            records,
            primary_metric=self.task.primary_metric,
            higher_is_better=self.task.higher_is_better,
            seed=scenario.seed,
            seconds=seconds,
            rounds_completed=completed,
            extra={"scenario": scenario.name, "task": scenario.task.name, "strategy": scenario.strategy.name,
                   "partition": scenario.partition.kind, "clients": scenario.partition.clients,
                   "privacy": self.plugins.report(),
                   **({"attack": self.attack.summary()} if self.attack is not None else {})},
        )
        self.run_dir.write_summary(summary)
        if scenario.output.plots:
            self._plots(records, arrays)
        return summary

    def _plots(self, records: list[dict], arrays: ArrayRecord) -> None:
        from server.plots import metric_units, plot_metric_curves
        from server.report import write_run_report

        plot_metric_curves(records, self.run_dir.plots, primary_metric=self.task.primary_metric, title=self.scenario.name,
                           units=metric_units(self.task), target_epsilon=self.scenario.privacy.params.get("target_epsilon"))
        if self._examples is not None:
            last_round = max((rec["round"] for rec in records if isinstance(rec.get("round"), int)), default=0)
            self._examples.draw(arrays, self.run_dir.plots / "examples.png", last_round)
        write_run_report(self.run_dir.path)  # a failure is one warning: the run's results are on disk already


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    value = metrics.get(key) if metrics is not None else None
    return float(value) if isinstance(value, (int, float)) else None
