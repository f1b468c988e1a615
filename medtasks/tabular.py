"""Synthetic tabular classification: a small, fast task for privacy and heterogeneity sweeps.

Each sample is a vector of ``num_features`` lab / clinical measurements and one of
``num_classes`` diagnoses. Class ``c`` is a mixture of ``clusters_per_class``
isotropic Gaussians (unit variance) whose means are drawn once per scenario from
``N(0, separation²/num_features · I)`` (stream ``(seed, "tabular", "means")``), so the
mean distance between two cluster centres is about ``separation·√2``. With more than
one cluster per class the Bayes classifier is non-linear: the ``mlp`` model can beat
``logistic``, and accuracy climbs over many rounds rather than one.

Sites (:func:`medtasks.partition.draw_site_profiles`):

* ``P_k(y)``: the uniform prior, or ``Dir(alpha)`` draws for ``label_skew``;
  ``n_k`` near-equal, or skewed for ``quantity_skew``.
* ``feature_skew`` (acquisition, a site's lab calibration): ``x ← gain·x + offset·1 + noise·ε``,
  ``ε ~ N(0, I)``; see :data:`ACQUISITION_SPACE`.
* ``concept_shift`` (annotator, a site's coding habit): each label ``c`` is recorded as
  ``(c + 1) mod L`` with probability ``confusion``; see :data:`ANNOTATOR_SPACE`.

Site ``k`` draws its ``n_k`` samples from the stream ``(seed, "tabular", "site", k)``;
the last ``max(1, round(val_fraction · n_k))`` are its validation set. The server's test
set (``data.server_samples``) has uniform labels, neutral acquisition and annotator,
from the stream ``(seed, "tabular", "server")``. ``data.source`` must be ``synthetic``.

Batches are ``(x [B, F] float32, y [B] int64)``; models map ``[B, F]`` to logits
``[B, L]``. Neither model has BatchNorm, so both train under DP-SGD.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, TensorDataset

from medtasks.base import ClientData, DataError, TaskContext, TaskParams, checked_params
from medtasks.classification import classification_metrics, confusion_matrix, predict_logits
from medtasks.partition import (
    ParamRange,
    SiteProfile,
    draw_site_profiles,
    label_histogram,
    neutral_values,
)
from medtasks.plotting import save_example_figure
from medtasks.seeding import derive_seed, drawing_from, numpy_rng

__all__ = [
    "ACQUISITION_SPACE", "ANNOTATOR_SPACE", "EVAL_BATCH_SIZE", "TabularParams", "TabularTask", "confusion_matrix",
]  # confusion_matrix lives in medtasks.classification; re-exported for older imports

ModelName = Literal["logistic", "mlp"]

#: Feature-skew parameters: per-site gain, additive offset and extra measurement noise std.
ACQUISITION_SPACE: dict[str, ParamRange] = {
    "gain": ParamRange(low=0.5, high=2.0, neutral=1.0),
    "offset": ParamRange(low=-1.5, high=1.5, neutral=0.0),
    "noise": ParamRange(low=0.0, high=1.0, neutral=0.0),
}
#: Concept-shift parameter: probability that a site records label ``c`` as ``(c + 1) mod L``.
ANNOTATOR_SPACE: dict[str, ParamRange] = {"confusion": ParamRange(low=0.0, high=0.5, neutral=0.0)}

EVAL_BATCH_SIZE = 1024


class TabularParams(TaskParams):
    """``task.params`` of the tabular task."""

    num_features: int = Field(32, ge=2, le=4096, description="Measurements per sample, F.")
    num_classes: int = Field(10, ge=2, le=1000, description="Diagnoses, L.")
    clusters_per_class: int = Field(
        2, ge=1, le=16, description="Gaussian components per class (1 = linearly separable classes)."
    )
    separation: float = Field(
        3.0, gt=0, description="Scale of the cluster centres; mean centre distance ≈ separation·√2."
    )
    hidden: int = Field(64, ge=1, description="Width of the mlp's two hidden layers.")


class TabularTask:
    """Multiclass classification of synthetic tabular records; primary metric: accuracy.

    :meth:`evaluate` returns ``loss`` (mean cross-entropy), ``accuracy`` and
    ``balanced_accuracy`` (mean per-class recall over the classes present).
    """

    name: ClassVar[str] = "tabular"
    Params: ClassVar[type[TaskParams]] = TabularParams
    models: ClassVar[tuple[str, ...]] = ("logistic", "mlp")
    primary_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    DEFAULT_MODEL: ClassVar[str] = "mlp"

    def __init__(self, ctx: TaskContext) -> None:
        params = cast(TabularParams, checked_params(type(self), ctx))  # an instance of self.Params
        if ctx.data.source != "synthetic":
            raise ValueError(f"the tabular task has synthetic data only; got data.source {ctx.data.source!r}")
        self.ctx = ctx
        self.params: TabularParams = params
        self.model_name: str = ctx.model or self.DEFAULT_MODEL
        p = params
        scale = p.separation / np.sqrt(p.num_features)
        #: Cluster centres, shape ``[L, clusters_per_class, F]``.
        self.means: np.ndarray = numpy_rng(ctx.seed, "tabular", "means").normal(
            0.0, scale, size=(p.num_classes, p.clusters_per_class, p.num_features)
        )
        #: One profile per site: size, ``P_k(y)``, acquisition and annotator.
        self.profiles: list[SiteProfile] = draw_site_profiles(
            ctx.partition.kind,
            ctx.partition.params,
            num_clients=ctx.partition.clients,
            samples_per_client=ctx.data.samples_per_client,
            label_prior=np.ones(p.num_classes),
            acquisition_space=ACQUISITION_SPACE,
            annotator_space=ANNOTATOR_SPACE,
            seed=ctx.seed,
        )
        self._sites: dict[int, ClientData] = {}
        self._server: Dataset | None = None

    # ------------------------------------------------------------------ data

    def sample(
        self,
        rng: np.random.Generator,
        n: int,
        label_distribution: np.ndarray | tuple[float, ...],
        acquisition: dict[str, float],
        annotator: dict[str, float],
    ) -> tuple[np.ndarray, np.ndarray]:
        """``n`` records of one site.

        Parameters
        ----------
        rng : np.random.Generator
            the site's stream.
        n : int
            number of records.
        label_distribution : np.ndarray | tuple[float, ...]
            ``P_k(y)``, shape ``[L]``.
        acquisition : dict[str, float]
            ``gain``, ``offset``, ``noise`` (:data:`ACQUISITION_SPACE`).
        annotator : dict[str, float]
            ``confusion`` (:data:`ANNOTATOR_SPACE`).

        Returns
        -------
        tuple[np.ndarray, np.ndarray]
            ``(x [n, F] float32, y [n] int64)``; ``y`` is the *recorded* label.
        """
        p = self.params
        y = rng.choice(p.num_classes, size=n, p=np.asarray(label_distribution) / np.sum(label_distribution))
        cluster = rng.integers(p.clusters_per_class, size=n)
        x = self.means[y, cluster] + rng.standard_normal((n, p.num_features))
        x = acquisition["gain"] * x + acquisition["offset"] + acquisition["noise"] * rng.standard_normal(x.shape)
        confused = rng.random(n) < annotator["confusion"]
        y = np.where(confused, (y + 1) % p.num_classes, y)
        return x.astype(np.float32), y.astype(np.int64)

    def client_data(self, partition_id: int) -> ClientData:
        """Train/validation records and ``partitions.json`` statistics of site ``partition_id``.

        ``stats``: ``n_train``, ``n_val``, ``label_histogram`` (``[L]`` recorded labels,
        train + val), ``label_distribution``, ``acquisition`` and ``annotator``.
        """
        if not 0 <= partition_id < len(self.profiles):
            raise ValueError(f"partition_id {partition_id} outside [0, {len(self.profiles)})")
        if partition_id not in self._sites:
            profile = self.profiles[partition_id]
            rng = numpy_rng(self.ctx.seed, "tabular", "site", partition_id)
            x, y = self.sample(rng, profile.n_samples, profile.label_distribution,
                               profile.acquisition, profile.annotator)
            n_val = max(1, round(self.ctx.data.val_fraction * len(y)))
            n_train = len(y) - n_val
            if n_train < 1:
                raise DataError(f"site {partition_id} has {len(y)} samples; it needs at least 2 "
                                "(one to train, one to validate)")
            drawn = profile.to_json()
            stats = {"n_train": n_train, "n_val": n_val,
                     "label_histogram": label_histogram(y, self.params.num_classes),
                     **{key: drawn[key] for key in ("label_distribution", "acquisition", "annotator")}}
            self._sites[partition_id] = ClientData(
                train=_dataset(x[:n_train], y[:n_train]), val=_dataset(x[n_train:], y[n_train:]), stats=stats
            )
        return self._sites[partition_id]

    def server_data(self) -> Dataset | None:
        """The central test set of ``data.server_samples`` records, or ``None`` when it is 0."""
        n = self.ctx.data.server_samples
        if n <= 0:
            return None
        if self._server is None:
            rng = numpy_rng(self.ctx.seed, "tabular", "server")
            uniform = np.ones(self.params.num_classes)
            x, y = self.sample(rng, n, uniform, neutral_values(ACQUISITION_SPACE), neutral_values(ANNOTATOR_SPACE))
            self._server = _dataset(x, y)
        return self._server

    # ------------------------------------------------------------------ model, loss

    def build_model(self) -> nn.Module:
        """``logistic`` (one linear layer) or ``mlp`` (F → hidden → hidden → L, ReLU), ``[B, F]`` → ``[B, L]``.

        Weights come from the stream ``(seed, "tabular", "model-init")``; torch's global RNG is left as it was.
        """
        p = self.params
        with drawing_from(derive_seed(self.ctx.seed, "tabular", "model-init")):
            if self.model_name == "logistic":
                return nn.Linear(p.num_features, p.num_classes)
            return nn.Sequential(
                nn.Linear(p.num_features, p.hidden), nn.ReLU(),
                nn.Linear(p.hidden, p.hidden), nn.ReLU(),
                nn.Linear(p.hidden, p.num_classes),
            )

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean cross-entropy of ``model`` on ``batch = (x [B, F], y [B])``."""
        x, y = batch[0], batch[1]
        return F.cross_entropy(model(x), y)

    # ------------------------------------------------------------------ evaluation

    def predict(self, model: nn.Module, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[N, L]`` of ``model`` on ``dataset`` and its labels ``[N]`` (eval mode, no gradients)."""
        return predict_logits(model, dataset, EVAL_BATCH_SIZE)

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """``loss`` (mean cross-entropy), ``accuracy`` and ``balanced_accuracy`` on ``dataset``."""
        return classification_metrics(*self.predict(model, dataset), self.params.num_classes)

    def plot_examples(self, model: nn.Module, dataset: Dataset, path: Path, *, title: str = "") -> None:
        """Save a PNG of the row-normalised confusion matrix of ``model`` on ``dataset``, under ``title``."""
        from matplotlib.figure import Figure

        logits, y = self.predict(model, dataset)
        matrix = confusion_matrix(logits.argmax(dim=1), y, self.params.num_classes)
        rates = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        figure = Figure(figsize=(5.5, 4.5))
        axes = figure.subplots()
        image = axes.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
        figure.colorbar(image, ax=axes, label="fraction of the true class")
        axes.set_xlabel("predicted class")
        axes.set_ylabel("true class")
        accuracy = np.trace(matrix) / max(1, matrix.sum())
        axes.set_title(f"{self.model_name}: accuracy {accuracy:.3f} on {int(matrix.sum())} records", fontsize=10)
        save_example_figure(figure, Path(path), title=title)


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    """``(x [F] float32, y int64)`` samples from ``x [N, F]`` and ``y [N]``."""
    return TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
