"""ClientApp: the Message-API handlers every hospital runs (docs/architecture.md).

* ``query``: tell the server which partition this node holds and describe its data
  (written to ``partitions.json``).
* ``train``: load the received model, train locally with the strategy's hooks,
  reply with the records the strategy asks for and the training metrics. The
  scenario's privacy mechanism takes part through its client half
  (:func:`privacy.client_privacy`, a :class:`privacy.ClientPrivacy`): it may refuse
  the round (a spent budget is an error reply with code
  :data:`privacy.accounting.BUDGET_EXHAUSTED_CODE`), replace the optimiser and
  loader (DP-SGD), transform the reply (NbAFL's clipping and noise, central DP's
  clipped update) and add its metrics (e.g. the node's ε so far).
* ``evaluate``: evaluate the received (or personalised) model on the local
  validation split.
* ``query.export_state`` / ``query.import_state``: copy this node's persistent
  state out for a checkpoint, or back in on ``--resume`` (:mod:`client.state`).

The node learns everything from the message (the resolved scenario travels in the
``config`` record) plus its own ``node_config``: ``partition-id``, and optionally
``data-path``, the hospital's own data folder (:func:`site_data`). State that must
survive between rounds lives in ``context.state`` (kept by Flower per node).
The model trains and evaluates on the device ``engine.device`` names on this node's machine
(:mod:`client.device`); the reply's records hold CPU arrays.
Any failure becomes an error reply with a one-line reason, which the server logs
and leaves out of the aggregate.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ConfigRecord, ConfigRecordValues, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

import privacy
from client.cache import scenario_from_json, task_for
from client.device import client_device
from client.state import EXPORT_ACTION, IMPORT_ACTION, replace_state
from client.trainer import dataset_size, fit
from medtasks.base import DataError
from medtasks.scenario import Scenario
from medtasks.seeding import seed_everything, torch_generator
from privacy.accounting import BUDGET_EXHAUSTED_CODE, BudgetExhausted
from privacy.attacks import client_attack
from strategies import get_algorithm
from strategies.base import (
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    ROUND_KEY,
    SCENARIO_KEY,
    ClientRule,
)
from strategies.pruning import prune_records

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.base import Task

log = logging.getLogger("medfed")

PARTITION_ID_KEY = "partition-id"
DATA_PATH_KEY = "data-path"  # node_config: the hospital's own data folder (deployment)
PARTICIPATION_KEY = "medfed-participation"
INFO_KEY = "info"
WANT_KEY = "want"  # a query's config: what the server asks for (absent: partition id and statistics)
WANT_PARTITION_ID = "partition-id"  # the partition id alone (discovery of a large federation)
CLIENT_ERROR_CODE = 1

app = ClientApp()


def partition_id(context: Context) -> int:
    """This node's partition id from its ``node_config``.

    Raises
    ------
    DataError
        The node was started without one (its configuration, so the run stops as for bad input).
    """
    try:
        return int(context.node_config[PARTITION_ID_KEY])
    except KeyError:
        raise DataError(
            "node_config has no 'partition-id' (start the SuperNode with --node-config 'partition-id=K')"
        ) from None


def _replying_errors(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    """Turn any exception into an error reply with a one-line reason (logged in full at debug level)."""

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as error:
            log.debug("client handler %s failed", handler.__name__, exc_info=True)
            reason = f"{type(error).__name__}: {error}".splitlines()[0]
            code = BUDGET_EXHAUSTED_CODE if isinstance(error, BudgetExhausted) else CLIENT_ERROR_CODE
            return Message(Error(code=code, reason=reason), reply_to=message)

    return wrapper


def _prepare(message: Message, context: Context, purpose: str) -> tuple[Scenario, int, int]:
    """Scenario, partition id and round of a message; threads and seeds set for it."""
    config = message.content.config_records[CONFIG_KEY]
    scenario = scenario_from_json(str(config[SCENARIO_KEY]))
    pid = partition_id(context)
    server_round = _config_int(config.get(ROUND_KEY, 0), ROUND_KEY)
    torch.set_num_threads(scenario.engine.cpus_per_client)
    seed_everything(scenario.seed, purpose, server_round, pid)
    return scenario, pid, server_round


def _config_int(value: ConfigRecordValues, key: str) -> int:
    """``int(value)`` for a scalar config value (a ValueError for a list)."""
    if isinstance(value, list):
        raise ValueError(f"config value '{key}' is a list, not a number")
    return int(value)


def site_data(scenario: Scenario, context: Context, pid: int) -> tuple[Task, int, int]:
    """The task holding this node's data, its index in that task, and the number of sites the task has.

    Normally the scenario's task and partition ``pid`` of ``partition.clients``. A hospital whose SuperNode
    was started with ``--node-config "partition-id=K data-path=/its/data"`` trains and evaluates on its own
    folder instead: the whole folder is this site (split into train/val by ``data.val_fraction``), read with
    the task's folder loader; nothing but its statistics leaves the node.
    """
    path = context.node_config.get(DATA_PATH_KEY)
    if not path:
        return task_for(scenario), pid, scenario.partition.clients
    local = scenario.model_copy(deep=True)
    local.data.path = str(Path(str(path)).expanduser())  # before the source: a folder source needs a path
    local.data.source, local.data.server_samples = "folder", 0
    local.data.sites, local.data.test_path = "split", None  # its own folder, whole: no hospital folders, no test set
    local.partition.clients, local.partition.kind, local.partition.params = 1, "iid", {}
    return task_for(local), 0, 1


def _model_on_device(task: Task, scenario: Scenario) -> torch.nn.Module:
    """A fresh model of ``task`` (initialised on the CPU, as everywhere) on the device this client trains and
    evaluates on (:func:`client.device.client_device`); what it sends back becomes CPU arrays in its records."""
    return task.build_model().to(client_device(scenario.engine))


def _client_rule(scenario: Scenario) -> ClientRule:
    algorithm = get_algorithm(scenario.strategy.name)
    return algorithm.client_rule(algorithm.Params.model_validate(scenario.strategy.params))


def _count_participation(context: Context) -> int:
    """Rounds this node has trained in, this one included (kept in the node's persistent state)."""
    if PARTICIPATION_KEY in context.state:
        count = _config_int(context.state.config_records[PARTICIPATION_KEY]["rounds"], "rounds") + 1
    else:
        count = 1
    context.state[PARTICIPATION_KEY] = ConfigRecord({"rounds": count})
    return count


@app.query()
@_replying_errors
def query(message: Message, context: Context) -> Message:
    """Reply with this node's partition id and its data statistics (the partition id only, without building
    any data, when the query's config asks for just that: :data:`WANT_KEY`)."""
    if message.content.config_records[CONFIG_KEY].get(WANT_KEY) == WANT_PARTITION_ID:
        return Message(RecordDict({INFO_KEY: ConfigRecord({PARTITION_ID_KEY: partition_id(context)})}),
                       reply_to=message)
    scenario, pid, _ = _prepare(message, context, "query")
    task, index, _ = site_data(scenario, context, pid)
    stats = task.client_data(index).stats
    info = ConfigRecord({PARTITION_ID_KEY: pid, "stats": json.dumps(stats)})
    return Message(RecordDict({INFO_KEY: info}), reply_to=message)


@app.train()
@_replying_errors
def train(message: Message, context: Context) -> Message:
    """One round of local training on this site's data, with the scenario's privacy mechanism taking part."""
    started = time.perf_counter()
    scenario, pid, server_round = _prepare(message, context, "train")
    task, index, sites = site_data(scenario, context, pid)
    model = _model_on_device(task, scenario)
    rule = _client_rule(scenario)
    dataset = rule.training_data(task, index, sites)
    rule.receive(model, message.content, context.state)
    attack = client_attack(scenario, server_round, pid, task)  # None unless this site is malicious this round
    if attack is not None:
        dataset = attack.training_data(dataset, model, context.state)
    local = rule.local_section(scenario.local, dataset_size(dataset))
    rule.before_training(model, task, dataset, local)
    generator = torch_generator(scenario.seed, "batches", server_round, pid)
    mechanism = privacy.client_privacy(scenario, server_round, pid, dataset_size(dataset), local, rule)
    mechanism.admit(context.state)
    with contextlib.closing(mechanism):  # e.g. Opacus's hooks on the model
        result = fit(model, task, dataset, local, rule, generator, mechanism.private_training())
        records = rule.reply(model, context.state, steps=result.steps)
        if scenario.defense.prune is not None:
            records = prune_records(records, rule.uploads(model), message.content, scenario.defense.prune)
        records = mechanism.protect(records, model, message.content, context.state)
        privacy_metrics = mechanism.spend(context.state)  # only once the reply is built: a failed round costs nothing
    if attack is not None:
        records = attack.tamper(records, model, message.content, context.state)
    metrics = MetricRecord(
        {
            "loss": result.loss,
            "steps": result.steps,
            "participations": _count_participation(context),
            NUM_EXAMPLES_KEY: result.num_examples,
            **privacy_metrics,
            "seconds": time.perf_counter() - started,
        }
    )
    if METRICS_KEY in records:  # a malicious site's claims (e.g. an inflated num-examples) replace the truth
        metrics.update(records.pop(METRICS_KEY))
    return Message(RecordDict({**records, METRICS_KEY: metrics}), reply_to=message)


@app.evaluate()
@_replying_errors
def evaluate(message: Message, context: Context) -> Message:
    """Metrics of the received model (as this site's rule personalises it) on the local validation split."""
    scenario, pid, _ = _prepare(message, context, "evaluate")
    task, index, _ = site_data(scenario, context, pid)
    data = task.client_data(index)
    model = _model_on_device(task, scenario)
    _client_rule(scenario).receive(model, message.content, context.state)
    metrics = task.evaluate(model, data.val)
    record = MetricRecord({key: float(value) for key, value in metrics.items()})
    record[NUM_EXAMPLES_KEY] = dataset_size(data.val)
    return Message(RecordDict({METRICS_KEY: record}), reply_to=message)


@app.query(EXPORT_ACTION)
@_replying_errors
def export_state(message: Message, context: Context) -> Message:
    """Reply with a copy of this node's persistent state (for the server's checkpoint)."""
    return Message(RecordDict(dict(context.state.items())), reply_to=message)


@app.query(IMPORT_ACTION)
@_replying_errors
def import_state(message: Message, context: Context) -> Message:
    """Restore this node's persistent state from a checkpoint (``--resume``)."""
    replace_state(context.state, message.content)
    return Message(RecordDict(), reply_to=message)
