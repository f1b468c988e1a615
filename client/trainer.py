"""The local training loop every client runs, with the strategy's hooks.

One round of local training (the lecture's client loop of FedAvg):

    for e = 1..E:  for each mini-batch b:  w ← w − η ∇(F_k(w; b) [+ rule terms])

The algorithm-specific parts (FedProx term, SCAFFOLD correction, ...) come from
the :class:`~strategies.base.ClientRule`; the task supplies the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from medtasks.base import Task
from server.scenario import LocalSection
from strategies.base import ClientRule


class NonFiniteLossError(FloatingPointError):
    """The local loss became NaN or infinite (diverging training or corrupt data)."""


@dataclass(frozen=True)
class FitResult:
    """Outcome of one round of local training."""

    loss: float  # mean task loss (before rule terms) over the steps taken
    steps: int  # optimiser steps actually taken (K in SCAFFOLD's option II)
    num_examples: int  # |P_k|, the aggregation weight n_k


class PooledSites(ConcatDataset):
    """Several sites' datasets trained on as one (the centralized baseline).

    Mini-batches mix sites like any shuffled dataset, unless ``by_site``: then every
    mini-batch holds samples of one site only, for tasks whose batches must share
    something that differs by site (a CT scanner's geometry). Each epoch then
    shuffles every site's samples, cuts them into batches and shuffles the order of
    all batches, so an epoch still visits each pooled sample exactly once.
    """

    def __init__(self, sites: list[Dataset], *, by_site: bool = False) -> None:
        super().__init__(sites)
        self.by_site = by_site


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
        return sum(math.ceil(len(site) / self.batch_size) for site in self.pooled.datasets)


class PrivateTraining(Protocol):
    """Sample-level differential privacy of the local loop (implemented in :mod:`privacy`)."""

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               loader: DataLoader) -> tuple[torch.optim.Optimizer, DataLoader]:
        """The private optimiser and loader to train ``model`` with (``model`` is trained in place)."""
        ...


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
    private: "PrivateTraining | None" = None,
) -> FitResult:
    """Train ``model`` in place for ``local.epochs`` epochs (at most ``local.max_steps`` steps).

    Args:
        generator: shuffling stream, derived from (seed, round, partition) by the caller.
        private: sample-level DP-SGD (e.g. Opacus), which replaces the optimiser and the
            loader by private ones (per-sample clipping and noise, Poisson sampling).

    Raises:
        NonFiniteLossError: when a loss is NaN/inf (the step is not applied).
    """
    loader = make_loader(dataset, local.batch_size, generator)
    optimizer = build_optimizer(model, local)
    if private is not None:
        optimizer, loader = private.attach(model, optimizer, loader)
    model.train()
    total_loss, steps = 0.0, 0
    for _ in range(local.epochs):
        for batch in loader:
            optimizer.zero_grad(set_to_none=True)
            task_loss = task.loss(model, batch)
            if not math.isfinite(task_loss.item()):
                raise NonFiniteLossError(f"local loss became {task_loss.item()} at step {steps + 1}")
            rule.loss(model, task_loss).backward()
            rule.after_backward(model)
            optimizer.step()
            total_loss += task_loss.item()
            steps += 1
            if local.max_steps is not None and steps >= local.max_steps:
                return FitResult(loss=total_loss / steps, steps=steps, num_examples=len(dataset))
    return FitResult(loss=total_loss / max(steps, 1), steps=steps, num_examples=len(dataset))
