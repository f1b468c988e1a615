"""Slide classification by attention-based multiple-instance learning (DESIGN.md §4, §5b).

A slide is a bag ``X = {x_1, ..., x_K}`` of RGB tiles with one weak label ``Y``; the
model (:func:`medtasks.mil.models.build_mil_model`) scores the bag,
``S(X) = g(σ(f(x_1), ..., f(x_K)))``, with the pooling ``σ`` named by ``task.model``.

Data (``data.source == "synthetic"`` only): site ``k`` generates its ``n_k`` slides with
:func:`medtasks.mil.synthetic.generate_slides` from the stream
``numpy_rng(seed, "mil", "site", k)``; the last ``max(1, round(val_fraction · n_k))``
slides are its validation set. Site profiles come from
:func:`medtasks.partition.draw_site_profiles` with the prior
``P(Y) = (1 - positive_rate, positive_rate)``:

* ``label_skew``: site ``k`` draws its slides positive with ``p_k = P_k(Y = 1)``;
* ``quantity_skew``: ``n_k`` slides per site;
* ``feature_skew``: stain rotation / scale, brightness, blur (:data:`ACQUISITION_SPACE`);
* ``concept_shift``: the site's pathologist calls a slide positive only when its tumour
  fraction reaches ``positive_threshold`` (:data:`ANNOTATOR_SPACE`).

``data.server_samples > 0`` gives the server a test set with neutral acquisition and
annotator and the base prevalence, from the stream ``(seed, "mil", "server")``.

Samples are ``(bag [K, 3, T, T] float32, label [] float32 (annotated), tile_labels [K] int64)``.

``ClientData.stats``: ``n_train``, ``n_val``, ``label_histogram`` (``[negative, positive]``
annotated slides, train + val), ``label_distribution`` (the drawn ``P_k(Y)``),
``acquisition`` and ``annotator``. ``data.params`` must be empty. Generated slides are
cached per process (DESIGN.md §9).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medtasks.base import ClientData, DataError, TaskContext, TaskParams, checked_params
from medtasks.mil.metrics import accuracy, attention_localisation_auc, balanced_accuracy, roc_auc
from medtasks.mil.models import MILModel, build_mil_model
from medtasks.mil.synthetic import ACQUISITION_SPACE, ANNOTATOR_SPACE, Slides, generate_slides
from medtasks.partition import SiteProfile, draw_site_profiles, label_histogram
from medtasks.seeding import numpy_rng

EVAL_BATCH_SIZE = 16
PLOT_ROWS = 3


class MILParams(TaskParams):
    """``task.params`` of the MIL task."""

    tiles_per_slide: int = Field(16, ge=1, le=1024, description="Tiles per slide, K.")
    tile_size: int = Field(32, ge=8, le=256, description="Tile side in pixels, T.")
    mode: Literal["embedding", "instance"] = Field(
        "embedding", description="Pool tile embeddings (embedding) or tile logits (instance)."
    )
    feature_dim: int = Field(64, ge=1, description="Tile embedding size M.")
    attention_dim: int = Field(32, ge=1, description="Attention hidden size L.")
    norm: Literal["group", "batch", "none"] = Field("group", description="Tile-encoder normalisation.")
    positive_rate: float = Field(0.5, ge=0, le=1, description="Base P(slide holds tumour).")
    tumour_fraction_min: float = Field(0.1, gt=0, le=1, description="Least tumour-tile fraction of a positive slide.")
    tumour_fraction_max: float = Field(0.3, gt=0, le=1, description="Largest tumour-tile fraction of a positive slide.")

    @model_validator(mode="after")
    def _check_fractions(self) -> "MILParams":
        if self.tumour_fraction_min > self.tumour_fraction_max:
            raise ValueError(
                f"tumour_fraction_min ({self.tumour_fraction_min}) exceeds "
                f"tumour_fraction_max ({self.tumour_fraction_max})"
            )
        return self


@dataclass(frozen=True)
class _SlideSpec:
    """Everything that determines one set of generated slides (hashable: the cache key)."""

    seed: int
    stream: tuple[str | int, ...]
    num_slides: int
    tiles_per_slide: int
    tile_size: int
    positive_rate: float
    tumour_fraction: tuple[float, float]
    acquisition: tuple[tuple[str, float], ...] = ()
    annotator: tuple[tuple[str, float], ...] = ()


@functools.lru_cache(maxsize=16)
def _generate(spec: _SlideSpec) -> Slides:
    """The slides of ``spec`` (cached per process)."""
    return generate_slides(
        numpy_rng(spec.seed, *spec.stream),
        spec.num_slides,
        tiles_per_slide=spec.tiles_per_slide,
        tile_size=spec.tile_size,
        positive_rate=spec.positive_rate,
        tumour_fraction=spec.tumour_fraction,
        acquisition=dict(spec.acquisition) or None,
        annotator=dict(spec.annotator) or None,
    )


def _dataset(slides: Slides, rows: slice = slice(None)) -> TensorDataset:
    """``(bag [K, 3, T, T] float32, label [] float32, tile_labels [K] int64)`` samples of ``rows``."""
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(slides.tiles[rows], dtype=np.float32)),
        torch.from_numpy(slides.labels[rows].astype(np.float32)),
        torch.from_numpy(np.ascontiguousarray(slides.tile_labels[rows], dtype=np.int64)),
    )


class MILTask:
    """Weakly supervised slide classification; primary metric: bag ROC AUC.

    Batches are ``(bags [B, K, 3, T, T], labels [B], tile_labels [B, K])``. :meth:`evaluate`
    returns ``loss``, ``auc``, ``accuracy``, ``balanced_accuracy`` (threshold
    ``sigm(S) >= 0.5``) and ``attention_auc`` (localisation of tumour tiles in positive bags).
    """

    name: ClassVar[str] = "mil"
    Params: ClassVar[type[TaskParams]] = MILParams
    models: ClassVar[tuple[str, ...]] = ("attention", "gated_attention", "max", "mean")
    primary_metric: ClassVar[str] = "auc"
    higher_is_better: ClassVar[bool] = True
    DEFAULT_MODEL: ClassVar[str] = "gated_attention"

    def __init__(self, ctx: TaskContext) -> None:
        params = checked_params(type(self), ctx)
        if ctx.data.source == "folder":
            raise DataError("the MIL task reads synthetic slides only in this version")
        if ctx.data.source != "synthetic":
            raise ValueError(f"unknown data.source {ctx.data.source!r} for MIL; use synthetic")
        self.ctx = ctx
        self.params: MILParams = params
        self.pooling: str = ctx.model or self.DEFAULT_MODEL
        #: One profile per site: size, ``P_k(Y)``, acquisition and annotator.
        self.profiles: list[SiteProfile] = draw_site_profiles(
            ctx.partition.kind,
            ctx.partition.params,
            num_clients=ctx.partition.clients,
            samples_per_client=ctx.data.samples_per_client,
            label_prior=[1.0 - params.positive_rate, params.positive_rate],
            acquisition_space=ACQUISITION_SPACE,
            annotator_space=ANNOTATOR_SPACE,
            seed=ctx.seed,
        )

    # ------------------------------------------------------------------ model, loss

    def build_model(self) -> MILModel:
        """A MIL model with the configured pooling, initialised from the scenario seed."""
        p = self.params
        return build_mil_model(
            self.pooling,  # type: ignore[arg-type]
            p.mode,
            feature_dim=p.feature_dim,
            attention_dim=p.attention_dim,
            norm=p.norm,
            seed=self.ctx.seed,
        )

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Binary cross-entropy of the bag logits against the annotated labels.

        ``L = -(1/B) Σ_b [y_b log σ(S(X_b)) + (1 - y_b) log(1 - σ(S(X_b)))]`` for
        ``batch = (bags [B, K, 3, T, T], labels [B], ...)``.
        """
        bags, labels = batch[0], batch[1]
        return F.binary_cross_entropy_with_logits(model(bags), labels.to(torch.float32))

    # ------------------------------------------------------------------ data

    def _spec(self, stream: tuple[str | int, ...], num_slides: int, positive_rate: float, **shift: Any) -> _SlideSpec:
        p = self.params
        return _SlideSpec(
            seed=self.ctx.seed,
            stream=stream,
            num_slides=num_slides,
            tiles_per_slide=p.tiles_per_slide,
            tile_size=p.tile_size,
            positive_rate=float(positive_rate),
            tumour_fraction=(p.tumour_fraction_min, p.tumour_fraction_max),
            **{name: tuple(sorted(values.items())) for name, values in shift.items()},
        )

    def client_data(self, partition_id: int) -> ClientData:
        """Train/validation slides and ``partitions.json`` statistics of site ``partition_id``."""
        if not 0 <= partition_id < self.ctx.partition.clients:
            raise ValueError(f"partition_id {partition_id} outside [0, {self.ctx.partition.clients})")
        profile = self.profiles[partition_id]
        slides = _generate(
            self._spec(
                ("mil", "site", partition_id),
                profile.n_samples,
                profile.label_distribution[1],
                acquisition=profile.acquisition,
                annotator=profile.annotator,
            )
        )
        n = profile.n_samples
        n_val = max(1, int(round(self.ctx.data.val_fraction * n)))
        if n - n_val < 1:
            raise DataError(
                f"site {partition_id} has {n} slides; it needs at least 2 (one to train, one to validate)"
            )
        stats = {
            "n_train": n - n_val,
            "n_val": n_val,
            "label_histogram": label_histogram(slides.labels, 2),
            "label_distribution": [float(p) for p in profile.label_distribution],
            "acquisition": {k: float(v) for k, v in profile.acquisition.items()},
            "annotator": {k: float(v) for k, v in profile.annotator.items()},
        }
        return ClientData(
            train=_dataset(slides, slice(0, n - n_val)), val=_dataset(slides, slice(n - n_val, n)), stats=stats
        )

    def server_data(self) -> Dataset | None:
        """Central test set: a neutral site with the base prevalence, or ``None`` (``server_samples = 0``)."""
        n = self.ctx.data.server_samples
        if n <= 0:
            return None
        return _dataset(_generate(self._spec(("mil", "server"), n, self.params.positive_rate)))

    # ------------------------------------------------------------------ evaluation

    def _scores_normalised(self) -> bool:
        """Whether ``forward_with_attention`` gives weights summing to 1 per bag (not tile probabilities)."""
        return self.params.mode == "embedding" or self.pooling in ("attention", "gated_attention")

    def _predict(self, model: nn.Module, dataset: Dataset) -> tuple[Tensor, ...]:
        """Logits ``[N]``, tile scores ``[N, K]``, labels ``[N]`` and tile truth ``[N, K]`` (no gradients)."""
        loader = DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, shuffle=False)
        device = next(model.parameters()).device
        outputs: list[tuple[Tensor, ...]] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for bags, labels, tile_labels in loader:
                    logits, scores = model.forward_with_attention(bags.to(device))
                    outputs.append((logits.cpu(), scores.cpu(), labels, tile_labels))
        finally:
            model.train(was_training)
        if not outputs:
            raise DataError("cannot evaluate the MIL task on an empty dataset")
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Bag loss, ROC AUC, accuracy, balanced accuracy and attention localisation AUC.

        Returns:
            ``loss`` (mean BCE), ``auc``, ``accuracy`` and ``balanced_accuracy`` of
            ``p = σ(S(X))`` against the annotated labels, ``attention_auc``
            (:func:`attention_localisation_auc` over the positive bags); NaN where undefined.
        """
        logits, scores, labels, tile_labels = self._predict(model, dataset)
        probs = torch.sigmoid(logits)
        return {
            "loss": float(F.binary_cross_entropy_with_logits(logits, labels)),
            "auc": roc_auc(logits, labels),
            "accuracy": accuracy(probs, labels),
            "balanced_accuracy": balanced_accuracy(probs, labels),
            "attention_auc": attention_localisation_auc(
                scores, tile_labels, tile_labels.amax(dim=1), normalise=self._scores_normalised()
            ),
        }

    def plot_examples(self, model: nn.Module, dataset: Dataset, path: Path) -> None:
        """Save a PNG: one row per positive bag (up to 3): tiles | attention | tile truth.

        Falls back to the first bags when ``dataset`` holds no positive bag.
        """
        if len(dataset) == 0:
            raise DataError("cannot plot examples of an empty dataset")
        positive = [i for i in range(len(dataset)) if float(dataset[i][1]) > 0.5]
        rows = (positive or list(range(len(dataset))))[:PLOT_ROWS]
        subset = [dataset[i] for i in rows]
        logits, scores, labels, tile_labels = self._predict(model, subset)  # type: ignore[arg-type]
        bags = torch.stack([s[0] for s in subset])
        _plot_bags(bags.numpy(), scores.numpy(), tile_labels.numpy(), torch.sigmoid(logits).numpy(), Path(path))


def _grid(values: np.ndarray, columns: int) -> np.ndarray:
    """Lay ``[K, ...]`` per-tile values out on a ``[rows, columns, ...]`` grid, NaN-padded."""
    rows = math.ceil(len(values) / columns)
    grid = np.full((rows * columns, *values.shape[1:]), np.nan, dtype=np.float64)
    grid[: len(values)] = values
    return grid.reshape(rows, columns, *values.shape[1:])


def _mosaic(tiles: np.ndarray, columns: int) -> np.ndarray:
    """Tiles ``[K, 3, T, T]`` as one RGB image ``[rows·T, columns·T, 3]`` (white padding)."""
    grid = np.nan_to_num(_grid(tiles, columns), nan=1.0)  # [R, C, 3, T, T]
    rows, cols, _, size, _ = grid.shape
    return np.clip(grid.transpose(0, 3, 1, 4, 2).reshape(rows * size, cols * size, 3), 0.0, 1.0)


def _plot_bags(
    bags: np.ndarray, scores: np.ndarray, tile_labels: np.ndarray, probs: np.ndarray, path: Path
) -> None:
    """Write rows of tiles | attention heatmap | tile truth, the tiles on a ``⌈√K⌉``-column grid.

    Args:
        bags: ``[N, K, 3, T, T]`` RGB in ``[0, 1]``.
        scores: ``[N, K]`` attention weights (or tile probabilities).
        tile_labels: ``[N, K]`` 0/1 tile truth.
        probs: ``[N]`` predicted ``P(Y = 1)``.
        path: PNG file to write (parent folders are created).
    """
    from matplotlib.figure import Figure

    columns = math.ceil(math.sqrt(bags.shape[1]))
    figure = Figure(figsize=(9.0, 3.0 * len(bags)))
    axes = figure.subplots(len(bags), 3, squeeze=False)
    for row in range(len(bags)):
        attention, truth = _grid(scores[row], columns), _grid(tile_labels[row], columns)
        axes[row, 0].imshow(_mosaic(bags[row], columns))
        axes[row, 0].set_title(f"slide (P(tumour) {float(probs[row]):.2f})", fontsize=9)
        image = axes[row, 1].imshow(np.ma.masked_invalid(attention), cmap="magma", interpolation="nearest")
        figure.colorbar(image, ax=axes[row, 1], fraction=0.046)
        axes[row, 1].set_title("attention", fontsize=9)
        axes[row, 2].imshow(np.ma.masked_invalid(truth), cmap="Reds", vmin=0, vmax=1, interpolation="nearest")
        axes[row, 2].set_title("tumour tiles (truth)", fontsize=9)
        for ax in axes[row]:
            ax.set_axis_off()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
