"""Slide classification by attention-based multiple-instance learning (Ilse et al. 2018,
arXiv:1802.04712), as a :class:`medtasks.base.Task` with the non-IID kinds of
:mod:`medtasks.partition`.

A slide is a bag ``X = {x_1, ..., x_K}`` of RGB tiles with one weak label ``Y``; the
model (:func:`medtasks.mil.models.build_mil_model`) scores the bag,
``S(X) = g(σ(f(x_1), ..., f(x_K)))``, with the pooling ``σ`` named by ``task.model``.

Data sources:

* ``data.source: synthetic`` with ``task.params.tile_source``:

  - ``rendered`` (default): H&E-like slides of :func:`medtasks.mil.synthetic.generate_slides`;
  - ``skimage_ihc``: slides of real crops of scikit-image's bundled IHC micrograph, positive
    tiles = DAB-stained (:func:`medtasks.mil.ihc.generate_ihc_slides`; needs scikit-image).

  Site ``k`` generates its ``n_k`` slides from the stream ``numpy_rng(seed, "mil", "site", k)``.
  Site profiles come from :func:`medtasks.partition.draw_site_profiles` with the prior
  ``P(Y) = (1 - positive_rate, positive_rate)``:

  - ``label_skew``: site ``k`` draws its slides positive with ``p_k = P_k(Y = 1)``;
  - ``quantity_skew``: ``n_k`` slides per site;
  - ``feature_skew``: stain rotation / scale, brightness, blur (:data:`ACQUISITION_SPACE`, or
    :data:`~medtasks.mil.ihc.IHC_ACQUISITION_SPACE` for IHC tiles);
  - ``concept_shift``: the site's pathologist calls a slide positive only when its tumour
    fraction reaches ``positive_threshold`` (:data:`ANNOTATOR_SPACE`).

  ``data.server_samples > 0`` gives the server a test set with neutral acquisition and
  annotator and the base prevalence, from the stream ``(seed, "mil", "server")`` (IHC: from
  the image blocks no site crops from).

* ``data.source: folder``: real slides at ``data.path`` (:mod:`medtasks.mil.folder`: one
  sub-folder of tiles per slide and ``labels.csv``). ``data.server_samples`` slides, drawn
  as whole patients from ``(seed, "mil", "folder", "server")``, are the server's test set; the
  others are assigned to sites by :func:`medtasks.partition.split_indices` (``label_skew``
  splits each class by Dirichlet shares), by patient when ``labels.csv`` has a ``patient``
  column. With ``data.sites`` every hospital folder is its site whole, and ``data.test_path``
  (every slide, unshifted) is the server's test set (:mod:`medtasks.sites`). ``feature_skew``
  re-stains a site's tiles as H&E (:func:`medtasks.mil.synthetic.restain`); ``concept_shift``
  drops the positive label of a slide whose positive-tile fraction is below the site's
  threshold (needs tile truth). Bags
  have ``K = min(tiles_per_slide, largest slide of every folder)`` tiles
  (:func:`~medtasks.mil.folder.fixed_size_bags`).

Each site's last ``max(1, round(val_fraction · n_k))`` slides are its validation set, grown to
whole patients with a ``patient`` column.

Samples are ``(bag [K, 3, T, T] float32, label [] float32 (annotated), tile_labels [K] int64
(1 / 0 / -1 unknown), padding [K] bool, site_log_odds [] float32)`` (:class:`MILBatch`);
``site_log_odds`` is the site's smoothed training prior log-odds
(:func:`~medtasks.mil.losses.site_log_odds`), used by ``task.params.class_balance``.

``ClientData.stats``: ``n_train``, ``n_val``, ``label_histogram`` (``[negative, positive]``
annotated slides, train + val), ``label_distribution`` (the drawn ``P_k(Y)``; observed for
folder sites), ``train_log_odds``, ``acquisition`` and ``annotator``; with a ``patient``
column ``cases`` (the patients of each split), and for a hospital site its ``folder``
(:meth:`MILTask.server_stats` describes a test set read from a folder). ``data.params`` must be
empty. Generated slides and folder reads are cached per process (as the task is,
``client/cache.py``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple, cast

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medtasks import sites
from medtasks.base import ClientData, DataError, TaskContext, TaskParams, checked_params
from medtasks.mil import folder as folder_io
from medtasks.mil.ihc import IHC_ACQUISITION_SPACE, INSTALL_HINT, generate_ihc_slides
from medtasks.mil.losses import ClassBalance, prior_corrected_bce, site_log_odds
from medtasks.mil.metrics import (
    accuracy,
    attention_localisation_auc,
    balanced_accuracy,
    cross_fitted_balanced_accuracy,
    roc_auc,
)
from medtasks.mil.models import MILModel, build_mil_model
from medtasks.mil.plots import plot_bags
from medtasks.mil.synthetic import (
    ACQUISITION_SPACE,
    ANNOTATOR_SPACE,
    UNKNOWN_TILE,
    Slides,
    generate_slides,
    labelled_slides,
    restain,
)
from medtasks.partition import (
    ParamRange,
    SiteProfile,
    cases_by_split,
    draw_site_profiles,
    group_holdout,
    holdout_size,
    label_histogram,
    neutral_values,
    order_by_group,
)
from medtasks.plotting import save_example_figure
from medtasks.seeding import numpy_rng

EVAL_BATCH_SIZE = 16
PLOT_ROWS = 3
TileSource = Literal["rendered", "skimage_ihc"]


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
    tile_source: TileSource = Field(
        "rendered",
        description="Tiles of synthetic slides: rendered H&E-like tiles, or real crops of scikit-image's "
        "bundled immunohistochemistry image (skimage_ihc, positive = DAB-stained).",
    )
    class_balance: ClassBalance = Field(
        "none",
        description="Correct the loss for the site's own label prior: none, weight (class-balanced "
        "weights) or logit_adjust (logit adjustment); see medtasks.mil.losses.",
    )

    @model_validator(mode="after")
    def _check_fractions(self) -> MILParams:
        if self.tumour_fraction_min > self.tumour_fraction_max:
            raise ValueError(
                f"tumour_fraction_min ({self.tumour_fraction_min}) exceeds "
                f"tumour_fraction_max ({self.tumour_fraction_max})"
            )
        return self


class MILBatch(NamedTuple):
    """A batch (or sample) of the MIL task; see the module docstring for shapes."""

    bags: Tensor
    labels: Tensor
    tile_labels: Tensor
    padding: Tensor
    site_log_odds: Tensor

    @classmethod
    def of(cls, batch: Sequence[Tensor]) -> MILBatch:
        """A DataLoader batch as :class:`MILBatch`; a 3-tuple ``(bags, labels, tile_labels)`` gets
        no padding and log-odds 0 (a balanced site)."""
        if len(batch) == len(cls._fields):
            return cls(*batch)
        if len(batch) == 3:
            bags, labels, tile_labels = batch
            padding = torch.zeros(tile_labels.shape, dtype=torch.bool)
            return cls(bags, labels, tile_labels, padding, torch.zeros(labels.shape))
        raise ValueError(f"a MIL batch has {len(cls._fields)} fields {cls._fields}, got {len(batch)}")

    def mask(self) -> Tensor | None:
        """The key-padding mask for the model, or ``None`` when nothing is padded."""
        return self.padding if bool(self.padding.any()) else None


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
    tile_source: TileSource = "rendered"
    held_out: bool = False
    acquisition: tuple[tuple[str, float], ...] = ()
    annotator: tuple[tuple[str, float], ...] = ()


@functools.lru_cache(maxsize=16)
def _generate(spec: _SlideSpec) -> Slides:
    """The slides of ``spec`` (cached per process)."""
    common = {
        "tiles_per_slide": spec.tiles_per_slide,
        "tile_size": spec.tile_size,
        "positive_rate": spec.positive_rate,
        "tumour_fraction": spec.tumour_fraction,
        "acquisition": dict(spec.acquisition) or None,
        "annotator": dict(spec.annotator) or None,
    }
    rng = numpy_rng(spec.seed, *spec.stream)
    if spec.tile_source == "skimage_ihc":
        return generate_ihc_slides(rng, spec.num_slides, held_out=spec.held_out, **common)  # type: ignore[arg-type]
    return generate_slides(rng, spec.num_slides, **common)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=4)
def _read_folder(path: str, tile_size: int) -> folder_io.SlideFolder:
    """All slides of a data folder (cached per process)."""
    return folder_io.load_slide_folder(path, tile_size)


def _dataset(slides: Slides, rows: slice = slice(None), log_odds: float = 0.0) -> TensorDataset:
    """:class:`MILBatch` samples of ``rows``, each carrying the site prior ``log_odds``."""
    labels = slides.labels[rows]
    assert slides.padding is not None  # Slides.__post_init__ fills in a missing padding
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(slides.tiles[rows], dtype=np.float32)),
        torch.from_numpy(labels.astype(np.float32)),
        torch.from_numpy(np.ascontiguousarray(slides.tile_labels[rows], dtype=np.int64)),
        torch.from_numpy(np.ascontiguousarray(slides.padding[rows], dtype=bool)),
        torch.full((len(labels),), log_odds, dtype=torch.float32),
    )


class MILTask:
    """Weakly supervised slide classification; primary metric: bag ROC AUC.

    :meth:`evaluate` returns ``loss``, ``auc``, ``accuracy``, ``balanced_accuracy`` (threshold
    ``σ(S) >= 0.5``), ``balanced_accuracy_cv`` (cross-fitted threshold) and ``attention_auc``
    (localisation of positive tiles in positive bags).
    """

    name: ClassVar[str] = "mil"
    Params: ClassVar[type[TaskParams]] = MILParams
    models: ClassVar[tuple[str, ...]] = ("attention", "gated_attention", "max", "mean")
    per_sample_gradients: ClassVar[bool] = False  # the tile encoder sees tiles, not bags: no per-bag DP-SGD
    primary_metric: ClassVar[str] = "auc"
    higher_is_better: ClassVar[bool] = True
    reads_hospital_folders: ClassVar[bool] = True  # data.sites and data.test_path (medtasks.sites)
    pooled_test_set: ClassVar[bool] = True  # data.server_samples slides drawn from a pooled data.path
    DEFAULT_MODEL: ClassVar[str] = "gated_attention"

    @classmethod
    def requirements(cls, ctx: TaskContext) -> list[tuple[str, str, str]]:
        """Optional modules the scenario's data needs, checked before a run starts.

        Returns
        -------
        list of (str, str, str)
            (the scenario key that asks for it, the module to import, how to install it): scikit-image for
            ``task.params.tile_source: skimage_ihc`` (its bundled micrograph, :mod:`medtasks.mil.ihc`).
        """
        params = cast(MILParams, checked_params(cls, ctx))
        if ctx.data.source == "synthetic" and params.tile_source == "skimage_ihc":
            return [("task.params.tile_source", "skimage", INSTALL_HINT)]
        return []

    def __init__(self, ctx: TaskContext) -> None:
        params = cast(MILParams, checked_params(type(self), ctx))  # an instance of self.Params
        if ctx.data.source not in ("synthetic", "folder"):
            raise ValueError(f"unknown data.source {ctx.data.source!r} for MIL; use synthetic or folder")
        if ctx.data.source == "folder":
            sites.check_data(type(self), ctx)
            if params.tile_source != "rendered":
                raise ValueError("task.params.tile_source applies to data.source synthetic only")
        self.ctx = ctx
        self.params: MILParams = params
        self.pooling: str = ctx.model or self.DEFAULT_MODEL
        #: Feature-skew parameters of this data source.
        self.acquisition_space: dict[str, ParamRange] = (
            IHC_ACQUISITION_SPACE if params.tile_source == "skimage_ihc" else ACQUISITION_SPACE
        )
        #: One profile per site: size, ``P_k(Y)``, acquisition and annotator (synthetic data);
        #: for folder data only the shifts are used, and only for feature_skew / concept_shift.
        self.profiles: list[SiteProfile] | None = None
        if ctx.data.source == "synthetic" or ctx.partition.kind in ("feature_skew", "concept_shift"):
            self.profiles = draw_site_profiles(
                ctx.partition.kind,
                ctx.partition.params,
                num_clients=ctx.partition.clients,
                samples_per_client=ctx.data.samples_per_client,
                label_prior=[1.0 - params.positive_rate, params.positive_rate],
                acquisition_space=self.acquisition_space,
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
        """Bag loss of ``model`` on a :class:`MILBatch`.

        ``class_balance: none`` is the binary cross-entropy
        ``L = -(1/B) Σ_b [y_b log σ(S(X_b)) + (1 - y_b) log(1 - σ(S(X_b)))]``; ``weight`` and
        ``logit_adjust`` correct it for the site's prior (:func:`~medtasks.mil.losses.prior_corrected_bce`).
        """
        b = MILBatch.of(batch)
        logits = model(b.bags, b.mask())
        return prior_corrected_bce(logits, b.labels, b.site_log_odds, self.params.class_balance)

    # ------------------------------------------------------------------ data

    def _spec(self, stream: tuple[str | int, ...], num_slides: int, positive_rate: float, **shift: Any) -> _SlideSpec:
        p = self.params
        held_out = bool(shift.pop("held_out", False))
        return _SlideSpec(
            seed=self.ctx.seed,
            stream=stream,
            num_slides=num_slides,
            tiles_per_slide=p.tiles_per_slide,
            tile_size=p.tile_size,
            positive_rate=float(positive_rate),
            tumour_fraction=(p.tumour_fraction_min, p.tumour_fraction_max),
            tile_source=p.tile_source,
            held_out=held_out,
            **{name: tuple(sorted(values.items())) for name, values in shift.items()},
        )

    def _shift(self, partition_id: int) -> tuple[dict[str, float], dict[str, float]]:
        """``(acquisition, annotator)`` of a site (neutral where the partition kind does not shift them)."""
        if self.profiles is None:
            return neutral_values(self.acquisition_space), neutral_values(ANNOTATOR_SPACE)
        profile = self.profiles[partition_id]
        return dict(profile.acquisition), dict(profile.annotator)

    def client_data(self, partition_id: int) -> ClientData:
        """Train/validation slides and ``partitions.json`` statistics of site ``partition_id``."""
        if not 0 <= partition_id < self.ctx.partition.clients:
            raise ValueError(f"partition_id {partition_id} outside [0, {self.ctx.partition.clients})")
        if self.ctx.data.source == "folder":
            return self._folder_site(partition_id)
        assert self.profiles is not None
        profile = self.profiles[partition_id]
        acquisition, annotator = self._shift(partition_id)
        spec = self._spec(
            ("mil", "site", partition_id),
            profile.n_samples,
            profile.label_distribution[1],
            acquisition=acquisition,
            annotator=annotator,
        )
        return self._split_site(_generate(spec), list(profile.label_distribution), partition_id)

    def _split_site(self, slides: Slides, label_distribution: Sequence[float], partition_id: int,
                    cases: np.ndarray | None = None) -> ClientData:
        """Hold out the last ``max(1, round(val_fraction · n))`` slides and describe the site.

        With ``cases`` (``[n]``, each patient's slides contiguous) the hold-out grows to whole patients
        (:func:`medtasks.partition.holdout_size`) and ``stats["cases"]`` records them.
        """
        n = len(slides.labels)
        try:
            n_val = holdout_size(n, self.ctx.data.val_fraction, cases)
        except ValueError as error:
            raise DataError(f"site {partition_id} {error}") from None
        log_odds = site_log_odds(slides.labels[: n - n_val])
        acquisition, annotator = self._shift(partition_id)
        stats = {
            "n_train": n - n_val,
            "n_val": n_val,
            "label_histogram": label_histogram(slides.labels, 2),
            "label_distribution": [float(p) for p in label_distribution],
            "train_log_odds": float(log_odds),
            "acquisition": {k: float(v) for k, v in acquisition.items()},
            "annotator": {k: float(v) for k, v in annotator.items()},
        }
        if cases is not None:
            stats["cases"] = cases_by_split(cases, n_val)
        return ClientData(
            train=_dataset(slides, slice(0, n - n_val), log_odds),
            val=_dataset(slides, slice(n - n_val, n), log_odds),
            stats=stats,
        )

    def server_data(self) -> Dataset | None:
        """Central test set: a neutral site with the base prevalence (synthetic), every slide of
        ``data.test_path`` or the held-out slides of a pooled folder, or ``None`` (``server_samples = 0``)."""
        test = self._test_slides()
        if test is not None:
            folder, indices = test
            return _dataset(self._folder_slides(folder, indices, numpy_rng(self.ctx.seed, "mil", "server")))
        n = self.ctx.data.server_samples
        if n <= 0:
            return None
        return _dataset(_generate(self._spec(("mil", "server"), n, self.params.positive_rate, held_out=True)))

    def server_stats(self) -> dict[str, Any] | None:
        """The folder test set's description for ``partitions.json`` (``None`` when it is not read from a
        folder): ``folder``, ``n``, ``label_histogram`` and, with a ``patient`` column, ``cases``."""
        test = self._test_slides()
        if test is None:
            return None
        folder, indices = test
        data = self._folder(folder)
        stats: dict[str, Any] = {"folder": folder, "n": len(indices),
                                 "label_histogram": label_histogram(data.labels[indices], 2)}
        if data.patients is not None:
            stats["cases"] = sorted({str(case) for case in data.cases[indices]})
        return stats

    # ------------------------------------------------------------------ folder data

    def _folder(self, folder: str) -> folder_io.SlideFolder:
        """Every slide of ``folder`` (cached per process)."""
        return _read_folder(str(Path(folder).resolve()), self.params.tile_size)

    def _test_slides(self) -> tuple[str, np.ndarray] | None:
        """``(folder, slide indices)`` of the central test set when a folder holds it: every slide of
        ``data.test_path``, or the ``server_samples`` slides held out of a pooled ``data.path``."""
        data = self.ctx.data
        if data.test_path:
            return data.test_path, np.arange(len(self._folder(data.test_path).labels))
        if data.source == "folder" and data.server_samples > 0:
            return str(data.path), self._folder_split()[0]
        return None

    def _folder_split(self) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(server slide indices, per-site slide indices)`` of the pooled ``data.path``, seeded.

        The server takes whole patients from the front of a seeded order until it holds
        ``server_samples`` slides; the sites split the rest by patient (every slide its own patient
        without a ``patient`` column).
        """
        path = str(self.ctx.data.path)
        data = self._folder(path)
        labels, cases = data.labels, data.cases
        part, n_server = self.ctx.partition, self.ctx.data.server_samples
        if len(labels) - n_server < 2 * part.clients:
            raise DataError(
                f"{path} holds {len(labels)} slides: too few for {n_server} server slides "
                f"and 2 per site for {part.clients} sites"
            )
        order = order_by_group(np.arange(len(labels)), cases, numpy_rng(self.ctx.seed, "mil", "folder", "server"))
        n_first = group_holdout(cases[order][::-1], n_server)  # whole patients from the front
        server, pool = np.sort(order[:n_first]), np.sort(order[n_first:])
        grouped = cases[pool] if data.patients is not None else None
        parts = sites.split_pool(labels[pool], grouped, part, self.ctx.seed, f"slides of {path}")
        return server, [pool[p] for p in parts]

    def _site_slides(self, partition_id: int) -> tuple[str, np.ndarray]:
        """``(folder, sorted slide indices)`` of site ``partition_id``: its hospital folder whole, or its
        part of the pooled ``data.path``."""
        folders = sites.hospital_folders(self.ctx.data)
        if folders:
            return folders[partition_id], np.arange(len(self._folder(folders[partition_id]).labels))
        return str(self.ctx.data.path), self._folder_split()[1][partition_id]

    @functools.cached_property
    def _bag_size(self) -> int:
        """``K = min(tiles_per_slide, largest slide)`` over every folder the sites and the server read, so
        that bags of every site and of the test set have one size."""
        largest = max(len(bag) for folder in sites.data_folders(self.ctx.data) for bag in self._folder(folder).bags)
        return min(self.params.tiles_per_slide, largest)

    def _folder_slides(
        self,
        folder: str,
        indices: np.ndarray,
        rng: np.random.Generator,
        acquisition: dict[str, float] | None = None,
        threshold: float = 0.0,
        bag_size: int | None = None,
    ) -> Slides:
        """Slides ``indices`` of ``folder`` as :class:`Slides`: ``K``-tile bags (``K = bag_size``, default
        :attr:`_bag_size`), re-stained with ``acquisition``, the CSV label dropped where the positive fraction
        is below ``threshold``."""
        data = self._folder(folder)
        tiles, tile_labels, padding = folder_io.fixed_size_bags(data, indices, bag_size or self._bag_size, rng)
        if acquisition is not None:
            tiles = restain(tiles, acquisition)
        slides = labelled_slides(tiles, tile_labels, padding=padding)
        labels = data.labels[indices]
        if threshold > 0:
            if not data.has_tile_truth:
                raise DataError(
                    f"concept_shift on folder data needs tile truth: add a {folder_io.TILE_TRUTH_COLUMN} "
                    f"column to {Path(folder) / folder_io.LABELS_FILE}"
                )
            labels = labels * (slides.tumour_fraction >= threshold - 1e-12)
        return dataclasses.replace(slides, labels=labels.astype(np.int64))

    def _folder_site(self, partition_id: int) -> ClientData:
        """Site ``partition_id``'s slides (its part of the pool, or its hospital folder) in a seeded order,
        patient by patient, re-stained / relabelled as the partition kind says; a hospital site's statistics
        name its ``folder``, and a ``patient`` column gives its ``cases``."""
        folder, site_slides = self._site_slides(partition_id)
        data = self._folder(folder)
        rng = numpy_rng(self.ctx.seed, "mil", "site", partition_id)
        indices = order_by_group(site_slides, data.cases, rng)
        acquisition, annotator = self._shift(partition_id)
        shifted = self.ctx.partition.kind == "feature_skew"
        slides = self._folder_slides(
            folder, indices, rng, acquisition if shifted else None, annotator["positive_threshold"]
        )
        share = float(slides.labels.mean()) if len(slides.labels) else 0.0
        cases = data.cases[indices] if data.patients is not None else None
        site = self._split_site(slides, [1.0 - share, share], partition_id, cases)
        if sites.natural_sites(self.ctx.data):
            site.stats["folder"] = folder
        return site

    def folder_dataset(self, folder: str) -> Dataset:
        """Every slide of ``folder`` (the layout of :mod:`medtasks.mil.folder`, ``labels.csv`` included) as
        ``K``-tile bags drawn like the central test set's: what ``medfed evaluate --data`` evaluates on. ``K``
        is the run's bag size for folder data, else ``min(tiles_per_slide, largest slide of folder)``."""
        data = self._folder(folder)
        bag_size = None
        if self.ctx.data.source != "folder":
            bag_size = min(self.params.tiles_per_slide, max(len(bag) for bag in data.bags))
        rng = numpy_rng(self.ctx.seed, "mil", "server")
        return _dataset(self._folder_slides(folder, np.arange(len(data.labels)), rng, bag_size=bag_size))

    def predict_files(self, model: nn.Module, input_path: str | Path, output_path: str | Path) -> list[Path]:
        """Slide scores (``scores.csv``) and attention maps of new slides (:mod:`medtasks.mil.predict`)."""
        from medtasks.mil.predict import predict_slides

        return predict_slides(model, input_path, output_path, tile_size=self.params.tile_size,
                              normalised=self._scores_normalised())

    # ------------------------------------------------------------------ evaluation

    def _scores_normalised(self) -> bool:
        """Whether ``forward_with_attention`` gives weights summing to 1 per bag (not tile probabilities)."""
        return self.params.mode == "embedding" or self.pooling in ("attention", "gated_attention")

    def _predict(self, model: nn.Module, dataset: Dataset) -> tuple[Tensor, ...]:
        """Logits ``[N]``, tile scores ``[N, K]``, labels ``[N]``, tile truth ``[N, K]`` and
        padding ``[N, K]`` (no gradients)."""
        loader = DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, shuffle=False)
        device = next(model.parameters()).device
        outputs: list[tuple[Tensor, ...]] = []
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in loader:
                    b = MILBatch.of(batch)
                    mask = b.mask()
                    logits, scores = cast(MILModel, model).forward_with_attention(  # build_model's MILModel
                        b.bags.to(device), None if mask is None else mask.to(device)
                    )
                    outputs.append((logits.cpu(), scores.cpu(), b.labels, b.tile_labels, b.padding))
        finally:
            model.train(was_training)
        if not outputs:
            raise DataError("cannot evaluate the MIL task on an empty dataset")
        return tuple(torch.cat(parts) for parts in zip(*outputs))

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Bag loss, ROC AUC, accuracy, balanced accuracies and attention localisation AUC.

        Returns
        -------
        dict[str, float]
            * ``loss``: mean BCE of the prior-free logits ``S`` against the annotated labels;
            * ``auc``, ``accuracy``, ``balanced_accuracy``: of ``p = σ(S(X))``, predicting
              positive at ``p >= 0.5``;
            * ``balanced_accuracy_cv``: at a threshold chosen on the other half of ``dataset``
              (:func:`~medtasks.mil.metrics.cross_fitted_balanced_accuracy`), i.e. after
              calibrating the operating point on data labelled like ``dataset``;
            * ``attention_auc``: :func:`attention_localisation_auc` over the truly positive
              bags whose tile truth is known.

            NaN where undefined.
        """
        logits, scores, labels, tile_labels, padding = self._predict(model, dataset)
        probs = torch.sigmoid(logits)
        known = ((tile_labels != UNKNOWN_TILE) | padding).all(dim=1)
        positive_bags = ((tile_labels == 1) & ~padding).any(dim=1)
        return {
            "loss": float(F.binary_cross_entropy_with_logits(logits, labels)),
            "auc": roc_auc(logits, labels),
            "accuracy": accuracy(probs, labels),
            "balanced_accuracy": balanced_accuracy(probs, labels),
            "balanced_accuracy_cv": cross_fitted_balanced_accuracy(logits, labels),
            "attention_auc": attention_localisation_auc(
                scores[known],
                tile_labels[known].clamp(min=0),
                positive_bags[known],
                padding[known],
                normalise=self._scores_normalised(),
            ),
        }

    def plot_examples(self, model: nn.Module, dataset: Dataset, path: Path, *, title: str = "") -> None:
        """Save a PNG: one row per positive bag (up to 3): tiles | attention | tile truth, under ``title``.

        Falls back to the first bags when ``dataset`` holds no positive bag.
        """
        n = len(cast(Sized, dataset))  # the task's datasets are map-style, with a len
        if n == 0:
            raise DataError("cannot plot examples of an empty dataset")
        positive = [i for i in range(n) if float(dataset[i][1]) > 0.5]
        rows = (positive or list(range(n)))[:PLOT_ROWS]
        subset = [dataset[i] for i in rows]
        logits, scores, _, tile_labels, padding = self._predict(model, subset)  # type: ignore[arg-type]
        bags = torch.stack([s[0] for s in subset])
        figure = plot_bags(bags.numpy(), scores.numpy(), tile_labels.numpy(), torch.sigmoid(logits).numpy(),
                           padding.numpy(), normalised=self._scores_normalised())
        save_example_figure(figure, Path(path), title=title)
