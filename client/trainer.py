"""The local training loop every client runs, with the strategy's hooks.

One round of local training (ClientUpdate of FedAvg, McMahan et al. 2017,
"Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017, arXiv:1602.05629, Algorithm 1):

    for e = 1..E:  for each mini-batch b:  w ← w − η ∇(F_k(w; b) [+ rule terms])

The algorithm-specific parts (FedProx term, SCAFFOLD correction, ...) come from
the :class:`~strategies.base.ClientRule`; the task supplies the loss; an optional
:class:`privacy.PrivateTraining` mechanism (DP-SGD) replaces optimiser and loader.
Training runs on the model's device: every batch is moved there before the task sees it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from medtasks.base import PooledSites, Task
from medtasks.placement import model_device, to_device
from medtasks.scenario import LocalSection
from privacy import PrivateTraining
from strategies.base import ClientRule


class NonFiniteLossError(FloatingPointError):
    """The local loss became NaN or infinite (diverging training or corrupt data)."""


@dataclass(frozen=True)
class FitResult:
    """Outcome of one round of local training."""

    loss: float  # mean task loss (before rule terms) over the steps that saw examples (0 if none did)
    steps: int  # optimiser steps actually taken, noise-only DP steps included (K in SCAFFOLD's option II)
    num_examples: int  # |P_k|, the aggregation weight n_k


def dataset_size(dataset: Dataset) -> int:
    """``len(dataset)``: the tasks' datasets are map-style and define ``__len__`` (``Dataset`` does not declare it)."""
    return len(cast(Sized, dataset))


class _SiteBatches(Sampler[list[int]]):
    """Batches of ``batch_size`` indices into a :class:`PooledSites`, never mixing sites."""

    def __init__(self, pooled: PooledSites, batch_size: int, generator: torch.Generator) -> None:
        self.pooled, self.batch_size, self.generator = pooled, batch_size, generator

    def _batches(self) -> list[list[int]]:
        batches, start = [], 0
        for end in self.pooled.cumulative_sizes:
            order = (start + torch.randperm(end - start, generator=self.generator)).tolist()
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            start = end
        return [batches[i] for i in torch.randperm(len(batches), generator=self.generator).tolist()]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return sum(math.ceil(dataset_size(site) / self.batch_size) for site in self.pooled.datasets)


def make_loader(dataset: Dataset, batch_size: int, generator: torch.Generator) -> DataLoader:
    """Shuffled mini-batches of ``dataset`` (site by site for a :class:`PooledSites` that asks for it)."""
    if isinstance(dataset, PooledSites) and dataset.by_site:
        return DataLoader(dataset, batch_sampler=_SiteBatches(dataset, batch_size, generator))
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def build_optimizer(model: torch.nn.Module, local: LocalSection) -> torch.optim.Optimizer:
    """The optimiser named by ``local.optimizer`` with ``lr``, ``momentum``, ``weight_decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if local.optimizer == "sgd":
        return torch.optim.SGD(params, lr=local.lr, momentum=local.momentum, weight_decay=local.weight_decay)
    if local.optimizer == "adam":
        return torch.optim.Adam(params, lr=local.lr, weight_decay=local.weight_decay)
    return torch.optim.AdamW(params, lr=local.lr, weight_decay=local.weight_decay)


def fit(
    model: torch.nn.Module,
    task: Task,
    dataset: Dataset,
    local: LocalSection,
    rule: ClientRule,
    generator: torch.Generator,
    private: PrivateTraining | None = None,
) -> FitResult:
    """Train ``model`` in place for ``local.epochs`` epochs (at most ``local.max_steps`` steps).

    Parameters
    ----------
    model : torch.nn.Module
        the model to train, updated in place, on the device it is on (each batch is moved there).
    task : Task
        supplies the loss (:meth:`medtasks.base.Task.loss`), given batches on the model's device.
    dataset : Dataset
        the site's training samples.
    local : LocalSection
        the scenario's ``local`` section (epochs, step cap, batch size, optimiser).
    rule : ClientRule
        the strategy's client-side hooks (:class:`~strategies.base.ClientRule`).
    generator : torch.Generator
        shuffling stream, derived from (seed, round, partition) by the caller.
    private : PrivateTraining | None
        sample-level DP-SGD (e.g. Opacus), which replaces the optimiser and the
        loader by private ones (per-sample clipping and noise, Poisson sampling). An
        empty Poisson batch takes its noise-only step (it counts in ``steps`` and in
        ``local.max_steps``); the mean loss is over the steps that saw examples.

    Returns
    -------
    FitResult
        mean loss, steps taken and number of training examples.

    Raises
    ------
    NonFiniteLossError
        when a loss is NaN/inf (the step is not applied).
    """
    loader = make_loader(dataset, local.batch_size, generator)
    optimizer = build_optimizer(model, local)
    if private is not None:
        optimizer, loader = private.attach(model, optimizer, loader)
    model.train()
    device = model_device(model)
    total_loss, loss_steps, steps = 0.0, 0, 0
    for batch in epoch_batches(loader, local.epochs, local.max_steps):
        steps += 1
        if private is not None and private.is_empty(batch):
            private.noise_step(optimizer)
            continue
        total_loss += _gradient_step(model, task, rule, optimizer, to_device(batch, device), steps,
                                     private=private is not None)
        loss_steps += 1
    return FitResult(loss=total_loss / max(loss_steps, 1), steps=steps, num_examples=dataset_size(dataset))


def epoch_batches(loader: DataLoader, epochs: int, max_steps: int | None) -> Iterator[Any]:
    """The batches of ``epochs`` passes over ``loader``, stopping after ``max_steps`` of them."""
    taken = 0
    for _ in range(epochs):
        for batch in loader:
            yield batch
            taken += 1
            if max_steps is not None and taken >= max_steps:
                return


def _gradient_step(model: torch.nn.Module, task: Task, rule: ClientRule, optimizer: torch.optim.Optimizer,
                   batch: Any, step: int, *, private: bool) -> float:
    """One optimiser step on ``batch``; returns the task loss (before rule terms).

    Under a private mechanism ``rule.after_backward`` is left to the mechanism
    (:class:`privacy.PrivateTraining`), which applies it after the noise.

    Raises
    ------
    NonFiniteLossError
        when the loss is NaN/inf (the step is not applied).
    """
    optimizer.zero_grad(set_to_none=True)
    task_loss = task.loss(model, batch)
    value = task_loss.item()
    if not math.isfinite(value):
        raise NonFiniteLossError(f"local loss became {value} at step {step}")
    rule.loss(model, task_loss).backward()
    if not private:
        rule.after_backward(model)
    optimizer.step()
    return value
