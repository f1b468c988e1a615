"""The plain PyTorch loop medfed is measured against: FedAvg written out by hand on the same task objects.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data",
arXiv:1602.05629, Algorithm 1), one round:

    for each sampled site k:  w_k ← E local epochs of mini-batch steps from w_t on site k's training split
    w_{t+1} = Σ_k (n_k / m) w_k,   m = Σ_k n_k

then the global model is evaluated on the sampled sites' validation splits (example-weighted mean) and on the
server's test set. Nothing else happens: no messages, no copies, no metrics file, no checkpoints. The loop does
the same work as a medfed client and server, step for step: the same task object
(``get_task_class(name)(scenario.task_context())``), the same sampled sites
(:meth:`strategies.base.Cohort.sample`), the same random streams (``seed_everything`` per site and round, the
``(seed, "batches", round, site)`` shuffling generator), the same loader (:func:`client.trainer.make_loader`,
:func:`client.trainer.epoch_batches`), optimiser (:func:`client.trainer.build_optimizer`) and float64 weighted
average in partition-id order (:func:`strategies.base.weighted_average`). A FedAvg scenario without privacy,
defense or attack therefore ends with the same global weights as medfed's run of it, bit for bit
(``tests/test_benchmarks.py``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

from client.device import client_device
from client.trainer import build_optimizer, dataset_size, epoch_batches, make_loader
from medtasks.base import Task
from medtasks.placement import model_device, to_device
from medtasks.registry import get_task_class
from medtasks.scenario import Scenario
from medtasks.seeding import seed_everything, torch_generator
from strategies.base import Cohort, weighted_average

Metrics = dict[str, float]


@dataclass
class PlainRun:
    """What the plain loop measured and ended with.

    Attributes
    ----------
    round_seconds : list of float
        Wall-clock seconds of each round (training, averaging, evaluations).
    weights : dict of str to torch.Tensor
        The final global model's state dict.
    evaluate : dict of str to float
        The last federated evaluation (example-weighted mean over the sampled sites).
    central : dict of str to float
        The last evaluation on the server's test set (empty without one).
    """

    round_seconds: list[float] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    evaluate: Metrics = field(default_factory=dict)
    central: Metrics = field(default_factory=dict)


def check_plain_fedavg(scenario: Scenario) -> None:
    """Refuse a scenario the plain loop would not run as medfed does.

    Raises
    ------
    ValueError
        For another strategy, FedProx, a privacy mechanism, a defense or an attack.
    """
    plain = (scenario.strategy.name == "fedavg" and not scenario.strategy.params.get("proximal_mu")
             and scenario.strategy.params.get("bn_stats", "average") == "average"
             and scenario.privacy.mechanism == "none" and scenario.defense.aggregation == "mean"
             and scenario.defense.norm_bound is None and scenario.defense.prune is None and scenario.attack is None)
    if not plain:
        raise ValueError(f"{scenario.name}: the plain loop runs FedAvg without privacy, defense or attack only")


def build_task(scenario: Scenario) -> Task:
    """A new task object of ``scenario`` (its own, not medfed's per-process cache)."""
    return get_task_class(scenario.task.name)(scenario.task_context())


def train_site(task: Task, model: torch.nn.Module, scenario: Scenario, server_round: int, site: int) -> int:
    """One round of local training of ``model`` on ``site``'s training split; returns n_k.

    The steps of a medfed client (:func:`client.trainer.fit` with FedAvg's rule): ``local.epochs`` passes of
    shuffled mini-batches, at most ``local.max_steps`` steps, the scenario's optimiser, fresh each round.
    """
    local = scenario.local
    torch.set_num_threads(scenario.engine.cpus_per_client)
    seed_everything(scenario.seed, "train", server_round, site)
    dataset = task.client_data(site).train
    loader = make_loader(dataset, local.batch_size, torch_generator(scenario.seed, "batches", server_round, site))
    optimizer = build_optimizer(model, local)
    device = model_device(model)
    model.train()
    for batch in epoch_batches(loader, local.epochs, local.max_steps):
        optimizer.zero_grad(set_to_none=True)
        loss = task.loss(model, to_device(batch, device))
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"site {site}: local loss became {loss.item()} in round {server_round}")
        loss.backward()
        optimizer.step()
    return dataset_size(dataset)


def evaluate_site(task: Task, model: torch.nn.Module, scenario: Scenario, server_round: int,
                  site: int) -> tuple[Metrics, int]:
    """``model``'s metrics on ``site``'s validation split, and the split's size."""
    seed_everything(scenario.seed, "evaluate", server_round, site)
    val = task.client_data(site).val
    return {key: float(value) for key, value in task.evaluate(model, val).items()}, dataset_size(val)


def weighted_metrics(results: list[tuple[Metrics, int]]) -> Metrics:
    """Σ_k n_k m_k / Σ_k n_k for every metric, leaving out the sites where a metric is not finite."""
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for metrics, n in results:
        for key, value in metrics.items():
            if math.isfinite(value):
                sums[key] = sums.get(key, 0.0) + n * value
                counts[key] = counts.get(key, 0.0) + n
    return {key: sums[key] / counts[key] for key in sums if counts[key] > 0}


def run_plain_fedavg(scenario: Scenario, on_round: Callable[[int], None] | None = None) -> PlainRun:
    """``strategy.rounds`` rounds of FedAvg on ``scenario``'s task, in this process, one site after the other.

    Every site's data is built before the first round (medfed builds it in its discovery round), so the
    round times hold the rounds' work only.

    Parameters
    ----------
    scenario : Scenario
        A FedAvg scenario without privacy, defense or attack (:func:`check_plain_fedavg`).
    on_round : callable, optional
        Called with the round number after each round.

    Returns
    -------
    PlainRun
        Round times, final weights and the last evaluations.
    """
    check_plain_fedavg(scenario)
    task = build_task(scenario)
    sites = list(range(scenario.partition.clients))
    for site in sites:
        task.client_data(site)
    server_set = task.server_data()
    model = task.build_model().to(client_device(scenario.engine))
    cohort = Cohort(node_to_partition={site: site for site in sites}, seed=scenario.seed)
    run = PlainRun(weights=_cpu_copy(task.build_model().state_dict()))
    strategy = scenario.strategy
    for server_round in range(1, strategy.rounds + 1):
        started = time.perf_counter()
        run.weights = _train_round(task, model, scenario, cohort, server_round, run.weights)
        if server_round % strategy.evaluate_every == 0 or server_round == strategy.rounds:
            _evaluate_round(task, model, scenario, cohort, server_round, run, server_set)
        run.round_seconds.append(time.perf_counter() - started)
        if on_round is not None:
            on_round(server_round)
    return run


def _train_round(task: Task, model: torch.nn.Module, scenario: Scenario, cohort: Cohort, server_round: int,
                 weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """w_{t+1}: every sampled site trains from w_t, then the float64 weighted average in partition-id order."""
    strategy = scenario.strategy
    states, sizes = [], []
    for site in cohort.sample(server_round, strategy.fraction_train, strategy.min_clients, "train"):
        model.load_state_dict(weights)
        sizes.append(train_site(task, model, scenario, server_round, site))
        states.append(_cpu_copy(model.state_dict()))
    return weighted_average(states, sizes)


def _evaluate_round(task: Task, model: torch.nn.Module, scenario: Scenario, cohort: Cohort, server_round: int,
                    run: PlainRun, server_set: Dataset | None) -> None:
    """The global model on the sampled sites' validation splits, then on the server's test set."""
    model.load_state_dict(run.weights)
    fraction = scenario.strategy.fraction_evaluate
    if fraction > 0:
        sampled = cohort.sample(server_round, fraction, 1, "evaluate")
        run.evaluate = weighted_metrics([evaluate_site(task, model, scenario, server_round, site)
                                         for site in sampled])
    if server_set is not None:
        run.central = {key: float(value) for key, value in task.evaluate(model, server_set).items()}


def _cpu_copy(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}
