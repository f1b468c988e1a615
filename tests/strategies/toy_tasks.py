"""Small tasks with known answers, for testing algorithms end to end through the round loop.

Both plug into a scenario as ``task: {name: "tests.strategies.toy_tasks:QuadraticTask"}``.

* :class:`QuadraticTask`: site k holds a least-squares problem
  F_k(w) = 1/(2 n_k) ‖X_k w − y_k‖² with its own input distribution and its own
  true weights (heterogeneous, strongly convex). The federated objective
  F(w) = Σ_k (n_k/n) F_k(w) is the pooled least-squares problem, so its optimum
  w* = (Σ_k X_kᵀX_k)⁻¹ Σ_k X_kᵀ y_k is known in closed form (:meth:`QuadraticTask.optimum`).
* :class:`BlobsTask`: Gaussian-blob classification with a BatchNorm MLP; each site
  sees only some classes (label skew, ``classes_per_client``) and a site-specific
  feature shift and scale (feature skew), so BatchNorm statistics and the best
  classifier differ by site.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset, TensorDataset

from medtasks.base import ClientData, TaskContext, TaskParams


class QuadraticParams(TaskParams):
    dim: int = Field(5, ge=1)
    heterogeneity: float = Field(2.0, ge=0.0, description="spread of the sites' true weights")
    noise: float = Field(0.0, ge=0.0)


class QuadraticTask:
    """Heterogeneous least squares; a linear model without bias, loss 1/2·mean squared error."""

    name: ClassVar[str] = "quadratic"
    Params: ClassVar[type[TaskParams]] = QuadraticParams
    models: ClassVar[tuple[str, ...]] = ("linear",)
    primary_metric: ClassVar[str] = "loss"
    higher_is_better: ClassVar[bool] = False

    def __init__(self, ctx: TaskContext) -> None:
        self.params = QuadraticParams.model_validate(ctx.params.model_dump() if isinstance(ctx.params, TaskParams) else ctx.params)
        self.ctx = ctx
        rng = np.random.default_rng(ctx.seed)
        d, n = self.params.dim, ctx.data.samples_per_client
        self.sites: list[tuple[torch.Tensor, torch.Tensor]] = []
        for k in range(ctx.partition.clients):
            scale = rng.uniform(0.5, 2.0, size=d)  # each site's own input covariance
            x = rng.normal(size=(n + 3 * k, d)) * scale  # unequal sizes: weights n_k matter
            w_true = rng.normal(size=d) * self.params.heterogeneity
            y = x @ w_true + self.params.noise * rng.normal(size=len(x))
            self.sites.append((torch.tensor(x, dtype=torch.float32), torch.tensor(y[:, None], dtype=torch.float32)))

    def optimum(self, partitions: list[int] | None = None) -> torch.Tensor:
        """w* = argmin Σ_k ‖X_k w − y_k‖² over ``partitions`` (default all), shape (dim,)."""
        chosen = range(len(self.sites)) if partitions is None else partitions
        x = torch.cat([self.sites[k][0] for k in chosen]).double()
        y = torch.cat([self.sites[k][1] for k in chosen]).double()
        return torch.linalg.solve(x.T @ x, x.T @ y).squeeze(1)

    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.ctx.seed)
        return torch.nn.Linear(self.params.dim, 1, bias=False)

    def client_data(self, partition_id: int) -> ClientData:
        x, y = self.sites[partition_id]
        dataset = TensorDataset(x, y)
        return ClientData(train=dataset, val=dataset, stats={"n_train": len(x), "n_val": len(x), "label_histogram": []})

    def server_data(self) -> Dataset | None:
        x = torch.cat([site[0] for site in self.sites])
        y = torch.cat([site[1] for site in self.sites])
        return TensorDataset(x, y)

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return 0.5 * ((model(x) - y) ** 2).mean()

    def evaluate(self, model: torch.nn.Module, dataset: Dataset) -> dict[str, float]:
        x, y = dataset.tensors  # type: ignore[attr-defined]
        with torch.no_grad():
            return {"loss": float(self.loss(model, (x, y)))}

    def plot_examples(self, model: torch.nn.Module, dataset: Dataset, path: Path) -> None:
        """Nothing to draw for a toy problem."""


class BlobsParams(TaskParams):
    dim: int = Field(8, ge=2)
    classes: int = Field(4, ge=2)
    classes_per_client: int = Field(2, ge=1)
    feature_shift: float = Field(3.0, ge=0.0, description="spread of each site's input offset")
    norm: Literal["batch", "none"] = Field("batch", description="BatchNorm after the hidden layer, or nothing")


class BlobsTask:
    """Gaussian blobs, an MLP with BatchNorm (or without: ``norm: none``); label skew and per-site feature shift."""

    name: ClassVar[str] = "blobs"
    Params: ClassVar[type[TaskParams]] = BlobsParams
    models: ClassVar[tuple[str, ...]] = ("mlp",)
    primary_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True

    def __init__(self, ctx: TaskContext) -> None:
        self.params = BlobsParams.model_validate(ctx.params.model_dump() if isinstance(ctx.params, TaskParams) else ctx.params)
        self.ctx = ctx
        p = self.params
        rng = np.random.default_rng(ctx.seed)
        self.centres = rng.normal(size=(p.classes, p.dim)) * 2.0
        self.sites: list[tuple[TensorDataset, TensorDataset]] = []
        for k in range(ctx.partition.clients):
            classes = [(k + j) % p.classes for j in range(p.classes_per_client)]
            shift = rng.normal(size=p.dim) * p.feature_shift
            scale = rng.uniform(0.5, 3.0)
            self.sites.append(tuple(  # type: ignore[arg-type]
                self._draw(rng, classes, ctx.data.samples_per_client, shift, scale) for _ in range(2)
            ))
        self.server = self._draw(rng, list(range(p.classes)), max(ctx.data.server_samples, 1), np.zeros(p.dim), 1.0)

    def _draw(self, rng: np.random.Generator, classes: list[int], n: int, shift: np.ndarray, scale: float) -> TensorDataset:
        labels = rng.choice(classes, size=n)
        x = (self.centres[labels] + rng.normal(size=(n, self.params.dim))) * scale + shift
        return TensorDataset(torch.tensor(x, dtype=torch.float32), torch.tensor(labels))

    def build_model(self) -> torch.nn.Module:
        torch.manual_seed(self.ctx.seed)
        p = self.params
        norm = [torch.nn.BatchNorm1d(16)] if p.norm == "batch" else []
        return torch.nn.Sequential(torch.nn.Linear(p.dim, 16), *norm, torch.nn.ReLU(), torch.nn.Linear(16, p.classes))

    def client_data(self, partition_id: int) -> ClientData:
        train, val = self.sites[partition_id]
        histogram = torch.bincount(train.tensors[1], minlength=self.params.classes).tolist()
        return ClientData(train=train, val=val, stats={"n_train": len(train), "n_val": len(val), "label_histogram": histogram})

    def server_data(self) -> Dataset | None:
        return self.server if self.ctx.data.server_samples else None

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    def evaluate(self, model: torch.nn.Module, dataset: Dataset) -> dict[str, float]:
        x, y = dataset.tensors  # type: ignore[attr-defined]
        model.eval()
        with torch.no_grad():
            logits = model(x)
        return {"loss": float(torch.nn.functional.cross_entropy(logits, y)),
                "accuracy": float((logits.argmax(1) == y).float().mean())}

    def plot_examples(self, model: torch.nn.Module, dataset: Dataset, path: Path) -> None:
        """Nothing to draw for a toy problem."""
