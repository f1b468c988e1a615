"""The peer a user would otherwise pick: Flower's own Simulation Engine running a minimal ClientApp and ServerApp.

    python -m benchmarks.performance.flower_peer SCENARIO [--set KEY=VALUE ...]

The ServerApp runs Flower's FedAvg (:class:`flwr.serverapp.strategy.FedAvg`, ``Strategy.start``) with a central
evaluation on the server's test set after each round; the ClientApp trains and evaluates with the plain loop's
functions (:func:`benchmarks.performance.baseline.train_site`, :func:`~benchmarks.performance.baseline.evaluate_site`):
the same local steps on the same task data as a medfed client, and nothing else (no discovery round, no reply
checks, no node state, no metrics file, no checkpoints). The engine gets the scenario's resources
(:func:`server.engines.simulation_backend_config`: ``engine.workers`` Ray workers of ``engine.cpus_per_client``
CPUs). Each client builds the task when it first needs it, so round 1 also builds the data.

It logs on stderr as a medfed run does, so the same parser times it
(:mod:`benchmarks.performance.child`): ``rounds 1..R of R`` when the rounds start, ``round k/R | ...`` when
round k ends; the last line on stdout is the final federated and central metrics as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, Result

from benchmarks.performance.baseline import build_task, evaluate_site, train_site
from benchmarks.performance.child import TimedRun, finished, timed_rounds
from benchmarks.performance.common import python_command, set_arguments
from medtasks.base import Task
from medtasks.scenario import Scenario

SCENARIO_KEY = "scenario"  # the resolved scenario as JSON, in every message's config
ROUND_KEY = "server-round"  # set by Flower's FedAvg in every config it sends

client_app = ClientApp()


@lru_cache(maxsize=4)
def _task(scenario_json: str) -> tuple[Scenario, Task]:
    """The scenario a message carries and its task (built once per worker process)."""
    scenario = Scenario.from_json(scenario_json)
    return scenario, build_task(scenario)


def _received(message: Message, context: Context) -> tuple[Scenario, Task, int, int, torch.nn.Module]:
    """The message's scenario, task and round, this node's site, and a model holding the weights it carries."""
    config = message.content.config_records["config"]
    scenario, task = _task(str(config[SCENARIO_KEY]))
    model = task.build_model()
    model.load_state_dict(message.content.array_records["arrays"].to_torch_state_dict())
    return scenario, task, int(str(config[ROUND_KEY])), int(context.node_config["partition-id"]), model


@client_app.train()
def train(message: Message, context: Context) -> Message:
    """Load w_t, run the site's local steps, reply with w_k and n_k."""
    scenario, task, server_round, site, model = _received(message, context)
    size = train_site(task, model, scenario, server_round, site)
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": size})})
    return Message(reply, reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """The received model's metrics on the site's validation split."""
    scenario, task, server_round, site, model = _received(message, context)
    metrics, size = evaluate_site(task, model, scenario, server_round, site)
    return Message(RecordDict({"metrics": MetricRecord({**metrics, "num-examples": size})}), reply_to=message)


def server_app(scenario: Scenario, results: list[Result]) -> ServerApp:
    """Flower's FedAvg for ``strategy.rounds`` rounds with the scenario's sampling, and a central evaluation."""
    app = ServerApp()
    rounds = scenario.strategy.rounds

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        task = build_task(scenario)
        server_set = task.server_data()
        model = task.build_model()

        def central(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            if server_round == 0:
                _say(f"rounds 1..{rounds} of {rounds}")
                return None
            model.load_state_dict(arrays.to_torch_state_dict())
            metrics = task.evaluate(model, server_set) if server_set is not None else {}
            _say(f"round {server_round}/{rounds} | " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            return MetricRecord({key: float(value) for key, value in metrics.items()})

        section = scenario.strategy
        strategy = FedAvg(fraction_train=section.fraction_train, fraction_evaluate=section.fraction_evaluate,
                          min_train_nodes=section.min_clients, min_evaluate_nodes=1,
                          min_available_nodes=scenario.partition.clients)
        config = ConfigRecord({SCENARIO_KEY: scenario.to_json()})
        results.append(strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=rounds,
                                      train_config=config, evaluate_config=ConfigRecord(dict(config)),
                                      evaluate_fn=central))

    return app


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def final_metrics(result: Result) -> dict[str, dict[str, float]]:
    """The last federated (ClientApp) and central (ServerApp) evaluation of a run."""
    def last(history: dict[int, MetricRecord]) -> dict[str, float]:
        return {key: float(str(value)) for key, value in history[max(history)].items()} if history else {}

    return {"evaluate": last(result.evaluate_metrics_clientapp), "central": last(result.evaluate_metrics_serverapp)}


def peer_run(scenario: Path, overrides: Sequence[str], *, timeout: float) -> TimedRun:
    """This program in a child process, timed from its log lines as a medfed run is (no phase split).

    Raises
    ------
    ChildFailed
        If it did not finish (its one-line reason).
    """
    child = finished(python_command(__name__, str(scenario), *set_arguments(overrides)), timeout=timeout)
    startup, walls = timed_rounds(child)
    final = json.loads(child.stdout.strip().splitlines()[-1])
    return TimedRun(child=child, startup=startup, final=final,
                    rounds=[{"round": number, "wall": wall} for number, wall in enumerate(walls, start=1)])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenario on Flower's Simulation Engine; the final metrics as JSON on stdout."""
    from flwr.simulation import run_simulation

    from server.engines import quiet_environment, simulation_backend_config
    from server.scenario import load

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", type=Path)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower's own log")
    args = parser.parse_args(argv)
    quiet_environment()
    scenario = load(args.scenario, args.overrides)
    logging.getLogger("flwr").setLevel(logging.INFO if args.verbose else logging.ERROR)
    results: list[Result] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # run_simulation is deprecated in favour of `flwr run`; it still works
        run_simulation(server_app=server_app(scenario, results), client_app=client_app,
                       num_supernodes=scenario.partition.clients,
                       backend_config=simulation_backend_config(scenario.engine))
    trained = len(results[0].train_metrics_clientapp) if results else 0
    if trained < scenario.strategy.rounds:
        _say(f"medfed: error: {trained} of {scenario.strategy.rounds} Flower rounds trained (-v: Flower's log)")
        return 1
    print(json.dumps(final_metrics(results[0])))
    return 0


if __name__ == "__main__":
    from benchmarks.performance import flower_peer  # by its name: Ray's workers unpickle the ClientApp from it

    sys.exit(flower_peer.main())
