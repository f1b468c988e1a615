"""The server's round loop: discovery, train → evaluate → central evaluation, results.

It drives any Flower Message-API strategy through its four methods
(``configure_train``, ``aggregate_train``, ``configure_evaluate``,
``aggregate_evaluate``) exactly like ``Strategy.start`` does, and adds what a
research platform needs around them: a discovery (query) round that maps random
node ids to partition ids, per-client metrics and bytes in ``metrics.jsonl``,
checkpoints every round, ``--resume``, live progress, and a clear stop when a
round cannot be completed. The loop is the same on every engine: it only sees a
``Grid``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

import privacy
from client.app import INFO_KEY, PARTITION_ID_KEY
from client.cache import task_for
from client.state import EXPORT_ACTION, IMPORT_ACTION, from_plain, to_plain
from medtasks.base import Task
from medtasks.seeding import seed_everything
from privacy.accounting import PrivacyBudgetExhausted
from server.progress import Progress
from server.results import Checkpoint, RunDirectory, build_summary
from server.scenario import Scenario
from strategies import get_algorithm
from strategies.base import (
    CONFIG_KEY,
    METRICS_KEY,
    ROUND_KEY,
    SCENARIO_KEY,
    Cohort,
    Personalized,
    StrategyContext,
    load_into,
)

log = logging.getLogger("medfed")

DISCOVERY_TIMEOUT = 600.0
POLL_INTERVAL = 0.05


class FederationError(RuntimeError):
    """A run that cannot go on (too few clients answered, no usable update); one-line message."""


class BudgetSpent(Exception):
    """The privacy budget ends the run: the round's training is not used, earlier rounds stand."""


class RunInterrupted(KeyboardInterrupt):
    """The run was asked to stop (Ctrl-C reaching another thread); the last checkpoint stays resumable."""


def _check(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RunInterrupted("run stopped on request")


@dataclass
class Exchange:
    """The replies of one phase and what travelled."""

    replies: list[Message] = field(default_factory=list)
    bytes_down: int = 0
    bytes_up: int = 0
    seconds: float = 0.0


def record_nbytes(content: RecordDict) -> int:
    """Payload bytes of a message: serialised arrays plus config/metric values."""
    total = 0
    for record in content.array_records.values():
        total += sum(len(array.data) for array in record.values())
    for record in [*content.config_records.values(), *content.metric_records.values()]:
        for key, value in record.items():
            total += len(key) + (len(value.encode()) if isinstance(value, str) else 8)
    return total


NO_REPLY_CODE = 900  # Error code of the reply :func:`exchange` records for a node that did not answer in time
LOST_CODES = frozenset({ErrorCode.NODE_UNAVAILABLE, NO_REPLY_CODE})
"""Error codes that mean the node itself was lost (not a failure of its ClientApp)."""


def exchange(grid: Grid, messages: Iterable[Message], timeout: float,
             on_reply: Callable[[Message], None] | None = None, stop: threading.Event | None = None) -> Exchange:
    """Push ``messages``, pull replies as they arrive (calling ``on_reply``) until all are in or ``timeout``.

    Every message gets exactly one reply, attributed to the node it was sent to:

    * an error reply the SuperLink made for a node that stopped heartbeating (``Node Unavailable``, sent
      from the SuperLink's own node id) is re-addressed as coming from that node;
    * a node that has not answered when ``timeout`` passes, or whose message could not be pushed, gets an
      error reply with :data:`NO_REPLY_CODE`.

    Raises:
        RunInterrupted: as soon as ``stop`` is set.
    """
    started = time.perf_counter()
    messages = list(messages)
    result = Exchange(bytes_down=sum(record_nbytes(m.content) for m in messages))
    pushed = set(grid.push_messages(messages))  # Flower's grids (and ours) also set each message's id in place
    sent = {message.metadata.message_id: message for message in messages}
    pending = dict.fromkeys(mid for mid in sent if mid in pushed)  # ordered: in-process runs go in partition order
    deadline = time.monotonic() + timeout

    def receive(reply: Message) -> None:
        result.replies.append(reply)
        if reply.has_content():
            result.bytes_up += record_nbytes(reply.content)
        if on_reply is not None:
            on_reply(reply)

    for message_id, message in sent.items():
        if message_id not in pushed:
            receive(Message(Error(code=NO_REPLY_CODE, reason="the message could not be pushed to the node"),
                            reply_to=message))
    while pending and time.monotonic() < deadline:
        _check(stop)
        replies = list(grid.pull_messages(list(pending)))
        for reply in replies:
            message_id = reply.metadata.reply_to_message_id
            if message_id not in pending:
                continue
            del pending[message_id]
            receive(_from_destination(reply, sent[message_id]))
        if pending and not replies:
            time.sleep(POLL_INTERVAL)
    for message_id in pending:
        receive(Message(Error(code=NO_REPLY_CODE, reason=f"no reply within {timeout:.0f} s"),
                        reply_to=sent[message_id]))
    if pending:
        log.warning("%d client(s) did not reply within %.0f s", len(pending), timeout)
    result.seconds = time.perf_counter() - started
    return result


def _from_destination(reply: Message, message: Message) -> Message:
    """``reply`` as coming from ``message``'s destination: the SuperLink answers for a node it lost."""
    if reply.metadata.src_node_id == message.metadata.dst_node_id:
        return reply
    error = reply.error if reply.has_error() else Error(code=ErrorCode.UNKNOWN, reason="reply from another node")
    log.warning("node %d: %s", message.metadata.dst_node_id, error.reason.strip().splitlines()[0])
    return Message(error, reply_to=message)


def is_lost(reply: Message) -> bool:
    """Whether ``reply`` says its node was lost (unavailable, or silent until the timeout)."""
    return reply.has_error() and reply.error.code in LOST_CODES


def discover(grid: Grid, scenario: Scenario, timeout: float = DISCOVERY_TIMEOUT,
             stop: threading.Event | None = None) -> tuple[Cohort, dict[int, Any]]:
    """Query round: wait for ``partition.clients`` nodes, learn node id → partition id and each site's statistics."""
    expected = scenario.partition.clients
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < expected:
        _check(stop)
        if time.monotonic() > deadline:
            raise FederationError(f"only {len(list(grid.get_node_ids()))} of {expected} clients connected within {timeout:.0f} s")
        time.sleep(0.5)
    config = ConfigRecord({SCENARIO_KEY: scenario.to_json()})
    messages = [
        Message(RecordDict({CONFIG_KEY: config}), dst_node_id=node, message_type=MessageType.QUERY)
        for node in sorted(grid.get_node_ids())
    ]
    replies = exchange(grid, messages, timeout, stop=stop).replies
    failed = [reply.error.reason for reply in replies if reply.has_error()]
    if failed:
        raise FederationError(f"a client could not prepare its data: {failed[0]}")
    node_to_partition: dict[int, int] = {}
    stats: dict[int, Any] = {}
    for reply in replies:
        info = reply.content[INFO_KEY]
        pid = int(info[PARTITION_ID_KEY])
        node_to_partition[reply.metadata.src_node_id] = pid
        stats[pid] = json.loads(str(info["stats"]))
    missing = sorted(set(range(expected)) - set(stats))
    if missing:
        raise FederationError(f"no client holds partition(s) {missing} (got {sorted(stats)})")
    return Cohort(node_to_partition=node_to_partition, seed=scenario.seed), dict(sorted(stats.items()))


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


def export_node_states(grid: Grid, cohort: Cohort, timeout: float,
                       stop: threading.Event | None = None) -> dict[str, Any]:
    """Each node's persistent state as plain data, keyed by partition id (for a checkpoint)."""
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type=f"{MessageType.QUERY}.{EXPORT_ACTION}")
        for node in sorted(cohort.node_to_partition)
    ]
    states: dict[str, Any] = {}
    for reply in exchange(grid, messages, timeout, stop=stop).replies:
        pid = cohort.partition_of(reply)
        if reply.has_error():
            log.warning("client %d could not export its state (%s); a resume would restart it empty",
                        pid, reply.error.reason)
            continue
        states[str(pid)] = to_plain(reply.content)
    return dict(sorted(states.items(), key=lambda item: int(item[0])))


def import_node_states(grid: Grid, cohort: Cohort, states: dict[str, Any], timeout: float,
                       stop: threading.Event | None = None) -> None:
    """Give every node back the persistent state saved in a checkpoint."""
    nodes = cohort.partition_to_node
    messages = [
        Message(from_plain(plain), dst_node_id=nodes[int(pid)], message_type=f"{MessageType.QUERY}.{IMPORT_ACTION}")
        for pid, plain in states.items()
    ]
    replies = exchange(grid, messages, timeout, stop=stop).replies
    failed = [reply.error.reason for reply in replies if reply.has_error()]
    if failed:
        raise FederationError(f"a client could not restore its state from the checkpoint: {failed[0]}")


class Federation:
    """One run of a scenario on a grid, writing into a run directory.

    Args:
        scenario: the resolved scenario.
        run_dir: where results go (created by the caller).
        progress: live display.
        resume: continue from the run directory's last checkpoint.
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
        self._epsilons: dict[str, float] = {}  # partition id → its latest reported ε (DP runs)
        self._server_privacy: privacy.ServerPrivacy | None = None  # the mechanism's server half, if it has one
        self._accounting = privacy.accounting_fields(scenario)  # δ and accountant beside every record's ε
        self._site_lines = scenario.engine.backend == "deployment"  # one log line per site and round (operators)
        self._lost: dict[int, int] = {}  # partition id → round its node was lost in (until it answers again)
        self._node_states: dict[str, Any] = {}  # partition id → its latest state exported into a checkpoint

    # --- the run ----------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict[str, Any]:
        """Run all rounds; returns the summary written to ``summary.json``."""
        scenario = self.scenario
        started = time.perf_counter()
        seed_everything(scenario.seed, "server")
        cohort, stats = discover(grid, scenario, stop=self.stop)
        if not self.resume:
            self.run_dir.write_partitions({"kind": scenario.partition.kind, "clients": {str(k): v for k, v in stats.items()}})
        try:
            self._server_privacy = privacy.server_privacy(scenario, stats)
        except ValueError as error:
            raise FederationError(str(error)) from None

        algorithm = get_algorithm(scenario.strategy.name)
        template = self.task.build_model()
        strategy = algorithm.build_strategy(
            StrategyContext(scenario, algorithm.Params.model_validate(scenario.strategy.params), cohort, template)
        )
        strategy.summary()
        if self._server_privacy is not None:
            self._server_privacy.summary()
        self._global_model_complete = getattr(strategy, "central_evaluation", True)
        arrays, checkpoint = ArrayRecord(template.state_dict()), None
        first_round = 1
        if self.resume:
            checkpoint = self.run_dir.load_checkpoint()
            arrays = ArrayRecord(checkpoint.arrays)
            if hasattr(strategy, "load_state_dict"):
                strategy.load_state_dict(checkpoint.strategy_state)
            first_round = checkpoint.round + 1
            self.run_dir.truncate_metrics(checkpoint.round)
            for record in self.run_dir.read_metrics():
                self._note_epsilons(record)
            node_states = checkpoint.extra.get("node_states")
            self._node_states.update(node_states or {})
            if node_states:
                import_node_states(grid, cohort, node_states, scenario.strategy.round_timeout, self.stop)
            elif scenario.output.checkpoint_node_state is False:
                log.warning("resuming without node state (output.checkpoint_node_state is off): clients restart empty")
            log.info("resuming %s after round %d", self.run_dir.path, checkpoint.round)

        total = scenario.strategy.rounds
        self.progress.start(total_rounds=total, first_round=first_round)
        completed = first_round - 1
        try:
            for server_round in range(first_round, total + 1):
                arrays, headline = self._round(grid, strategy, cohort, server_round, arrays)
                checkpoint = self._checkpoint(grid, strategy, cohort, server_round, arrays, headline, checkpoint)
                self.progress.round_done(server_round, headline)
                completed = server_round
        except BudgetSpent as reason:
            log.info("%s; the run ends after round %d", reason, completed)
        finally:
            self.progress.close()

        return self._finish(arrays, checkpoint, time.perf_counter() - started, completed)

    def _round(self, grid: Grid, strategy: Any, cohort: Cohort, server_round: int,
               arrays: ArrayRecord) -> tuple[ArrayRecord, dict[str, float]]:
        """Train, aggregate, evaluate (federated and central); the new global arrays and headline metrics."""
        scenario = self.scenario
        if self._lost:
            self._welcome_back(grid, cohort, server_round)
        config = ConfigRecord({SCENARIO_KEY: self.scenario_json, ROUND_KEY: server_round})
        if self._server_privacy is not None:
            try:
                self._server_privacy.configure(config, server_round)
            except PrivacyBudgetExhausted as spent:
                raise BudgetSpent(f"round {server_round}: {spent}") from None
        messages = list(strategy.configure_train(server_round, arrays, config, grid))
        done = self._phase(grid, cohort, server_round, "train", messages)
        reasons = [r.error.reason for r in done.replies if r.has_error()]
        spent = [reason for reason in reasons if reason.startswith(privacy.BUDGET_ERRORS)]
        if spent and scenario.privacy.params.get("on_exhausted") == "stop-run":
            self._record(server_round, "train", cohort, done, None)  # who ran out, before the run ends
            raise BudgetSpent(f"round {server_round}: a client's privacy budget is spent (on_exhausted: stop-run)")
        if self._server_privacy is not None:
            self._server_privacy.before_aggregate(done.replies, arrays, server_round, cohort)
        new_arrays, train_metrics = strategy.aggregate_train(server_round, done.replies)
        succeeded = sum(1 for reply in done.replies if reply.has_content())
        if new_arrays is None or succeeded < scenario.strategy.min_clients:
            if spent and len(spent) == len(reasons):
                self._record(server_round, "train", cohort, done, None)
                raise BudgetSpent(f"round {server_round}: too few clients have privacy budget left to train")
            detail = f"; first failure: {reasons[0]}" if reasons else ""
            raise FederationError(
                f"round {server_round}: {succeeded} of {len(messages)} clients returned a usable update, "
                f"strategy.min_clients is {scenario.strategy.min_clients}{detail}"
            )
        arrays = new_arrays
        if self._server_privacy is not None:
            arrays = self._server_privacy.after_aggregate(arrays, server_round)
        self._record(server_round, "train", cohort, done, train_metrics)
        headline = {"train loss": _metric(train_metrics, "loss"), "ε": self._run_epsilon()}

        if server_round % scenario.strategy.evaluate_every == 0 or server_round == scenario.strategy.rounds:
            messages = list(strategy.configure_evaluate(server_round, arrays, ConfigRecord(dict(config)), grid))
            if messages:
                done = self._phase(grid, cohort, server_round, "evaluate", messages)
                metrics = strategy.aggregate_evaluate(server_round, done.replies)
                self._record(server_round, "evaluate", cohort, done, metrics)
                headline[self.task.primary_metric] = _metric(metrics, self.task.primary_metric)
            central = self._central_evaluation(server_round, cohort, arrays, strategy)
            if central is not None:
                headline[f"central {self.task.primary_metric}"] = central.get(self.task.primary_metric)
        every = scenario.output.examples_every
        if scenario.output.plots and every and server_round % every == 0:
            self._draw_examples(arrays, self.run_dir.plots / "examples" / f"round-{server_round:03d}.png")
        return arrays, {key: value for key, value in headline.items() if value is not None}

    def _phase(self, grid: Grid, cohort: Cohort, server_round: int, phase: str, messages: list[Message]) -> Exchange:
        self.progress.phase(server_round, phase, len(messages))
        done = exchange(
            grid,
            messages,
            self.scenario.strategy.round_timeout,
            lambda reply: self.progress.client_done(server_round, phase, cohort.partition_of(reply)),
            self.stop,
        )
        for reply in done.replies:
            pid = cohort.partition_of(reply)
            if is_lost(reply) and pid not in self._lost:
                self._lost[pid] = server_round
                log.warning("round %d %s: site %d lost (%s); the run goes on without it until it answers again",
                            server_round, phase, pid, reply.error.reason.strip().splitlines()[0])
        return done

    def _welcome_back(self, grid: Grid, cohort: Cohort, server_round: int) -> None:
        """Give each lost site that is online again its state from the latest checkpoint holding it.

        A node that restarted has lost its ``context.state`` (SCAFFOLD's c_k, an accountant's history, NbAFL's
        exposure count); the checkpointed copy is the state the server's model is consistent with: what the
        site did in the round it was lost never reached the server. Without a copy (``checkpoint_node_state``
        off, or the site never exported) the site continues with whatever state it has.
        """
        online = set(grid.get_node_ids())
        nodes = cohort.partition_to_node
        for pid in sorted(pid for pid in self._lost if nodes[pid] in online):
            lost_in = self._lost.pop(pid)
            state = self._node_states.get(str(pid))
            if state is None:
                log.info("round %d: site %d (lost in round %d) is online; no checkpointed state to restore",
                         server_round, pid, lost_in)
                continue
            try:
                import_node_states(grid, cohort, {str(pid): state}, self.scenario.strategy.round_timeout, self.stop)
            except FederationError as error:
                self._lost[pid] = lost_in
                log.warning("round %d: site %d is still unreachable (%s)", server_round, pid, error)
                continue
            log.info("round %d: site %d (lost in round %d) is back; its state restored from the last checkpoint",
                     server_round, pid, lost_in)

    def _record(self, server_round: int, phase: str, cohort: Cohort, done: Exchange, metrics: MetricRecord | None,
                clients: dict[str, dict[str, Any]] | None = None) -> None:
        """Append one ``metrics.jsonl`` record (DESIGN.md §6); ``clients`` defaults to the replies' metrics.

        ``epsilon`` is :meth:`_run_epsilon`; with differential privacy ``delta`` and ``accountant`` say what it
        means (:func:`privacy.accounting_fields`).
        """
        record = {
            "round": server_round,
            "phase": phase,
            "clients": per_client(done.replies, cohort) if clients is None else clients,
            "aggregate": dict(metrics.items()) if metrics is not None else {},
            "bytes_up": done.bytes_up,
            "bytes_down": done.bytes_down,
            "seconds": round(done.seconds, 4),
        }
        self._note_epsilons(record)
        record["epsilon"] = self._run_epsilon()
        record.update(self._accounting)
        self.run_dir.append_metrics(record)
        if self._site_lines and phase == "train":
            for pid, metrics in record["clients"].items():
                log.info("round %d | site %s | %s", server_round, pid, _site_summary(metrics))

    def _run_epsilon(self) -> float | None:
        """The run's ε: the mechanism's server half's (NbAFL: the ε its formulas guarantee at the end), else
        the privacy spent so far by the weakest site, the largest ε any site has reported (a site keeps its
        last value in rounds it is not sampled); ``None`` without differential privacy."""
        if self._server_privacy is not None and self._server_privacy.epsilon is not None:
            return self._server_privacy.epsilon
        return max(self._epsilons.values()) if self._epsilons else None

    def _note_epsilons(self, record: dict[str, Any]) -> None:
        """Remember each site's latest ε from a train record's client metrics."""
        if record.get("phase") != "train":
            return
        for pid, metrics in record.get("clients", {}).items():
            value = metrics.get("epsilon")
            if isinstance(value, (int, float)):
                self._epsilons[pid] = float(value)

    def _central_evaluation(self, server_round: int, cohort: Cohort, arrays: ArrayRecord,
                            strategy: Any) -> dict[str, float] | None:
        """Metrics on the server's held-out set (none: no set, or no model to evaluate).

        A :class:`~strategies.base.Personalized` strategy is judged by its sites' own
        models: each is evaluated, recorded per client, and the phase's aggregate is
        their unweighted mean (every model sees the same test set). A strategy whose
        global model is incomplete by design (FedBN: BatchNorm stays at the sites) sets
        ``central_evaluation = False`` and is judged by federated evaluation only.
        """
        dataset = self.task.server_data()
        if dataset is None or not getattr(strategy, "central_evaluation", True):
            return None
        started = time.perf_counter()
        if isinstance(strategy, Personalized):
            personal = dict(sorted(strategy.personal_arrays().items()))
            if not personal:
                return None
            clients = {str(pid): self._evaluate_central(model_arrays, dataset) for pid, model_arrays in personal.items()}
            metrics = {key: float(np.nanmean([c[key] for c in clients.values()])) for key in next(iter(clients.values()))}
        elif len(arrays) == 0:
            return None
        else:
            clients, metrics = {}, self._evaluate_central(arrays, dataset)
        done = Exchange(seconds=time.perf_counter() - started)
        self._record(server_round, "central", cohort, done, MetricRecord(metrics), clients=clients)
        return metrics

    def _evaluate_central(self, arrays: ArrayRecord, dataset: Any) -> dict[str, float]:
        return {key: float(value) for key, value in self.task.evaluate(self._model_with(arrays), dataset).items()}

    def _model_with(self, arrays: ArrayRecord) -> torch.nn.Module:
        """The server's one evaluation model instance, loaded with ``arrays``."""
        if self._central_model is None:
            self._central_model = self.task.build_model()
        load_into(self._central_model, arrays.to_torch_state_dict())
        return self._central_model

    # --- checkpoints and the end ----------------------------------------------------------------
    def _checkpoint(self, grid: Grid, strategy: Any, cohort: Cohort, server_round: int, arrays: ArrayRecord,
                    headline: dict[str, float], previous: Checkpoint | None) -> Checkpoint:
        primary = headline.get(f"central {self.task.primary_metric}", headline.get(self.task.primary_metric))
        last = server_round == self.scenario.strategy.rounds
        if server_round % self.scenario.output.checkpoint_every and not last:
            return previous  # type: ignore[return-value]
        checkpoint = Checkpoint(
            round=server_round,
            arrays=arrays.to_torch_state_dict(),
            strategy_state=strategy.state_dict() if hasattr(strategy, "state_dict") else {},
            best_value=previous.best_value if previous else None,
            best_round=previous.best_round if previous else None,
            extra={},
        )
        if self.scenario.output.checkpoint_node_state:
            exported = export_node_states(grid, cohort, self.scenario.strategy.round_timeout, self.stop)
            for pid in self._lost:  # a lost node that answers has restarted empty: keep its last good state
                exported.pop(str(pid), None)
            self._node_states.update(exported)
            checkpoint.extra["node_states"] = dict(sorted(self._node_states.items(), key=lambda item: int(item[0])))
        return self.run_dir.save_checkpoint(checkpoint, primary_value=primary, higher_is_better=self.task.higher_is_better)

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
                   "privacy": self._privacy_summary()},
        )
        self.run_dir.write_summary(summary)
        if scenario.output.plots:
            self._plots(records, arrays)
        return summary

    def _privacy_summary(self) -> dict[str, Any]:
        """The mechanism, its settings, its server half's report and each site's final ε (``summary.json``)."""
        section = self.scenario.privacy
        summary: dict[str, Any] = {"mechanism": section.mechanism, **section.params}
        if self._server_privacy is not None:
            summary.update(self._server_privacy.report())
        if self._epsilons:
            summary["epsilon"] = max(self._epsilons.values())
            summary["epsilon_per_client"] = dict(sorted(self._epsilons.items(), key=lambda item: int(item[0])))
        return summary

    def _plots(self, records: list[dict], arrays: ArrayRecord) -> None:
        from server.plots import plot_metric_curves

        plot_metric_curves(records, self.run_dir.plots, primary_metric=self.task.primary_metric, title=self.scenario.name)
        self._draw_examples(arrays, self.run_dir.plots / "examples.png")

    def _draw_examples(self, arrays: ArrayRecord, path: Path) -> None:
        """The global model's output on a few test images (server set, else site 0's validation split)."""
        if len(arrays) == 0 or not self._global_model_complete:
            return  # no (complete) global model: local-only, pFedHN, FedBN, FedPer
        try:
            dataset = self.task.server_data()
            if dataset is None:
                dataset = self.task.client_data(0).val
            path.parent.mkdir(parents=True, exist_ok=True)
            self.task.plot_examples(self._model_with(arrays), dataset, path)
        except Exception as error:  # noqa: BLE001 - a picture must not lose the run's results
            log.warning("could not draw example predictions: %s", error)


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])
