"""Multi-class 2D segmentation of abdominal slices with a U-Net (Ronneberger et al. 2015,
arXiv:1505.04597), as a :class:`medtasks.base.Task` with the non-IID kinds of
:mod:`medtasks.partition`.

Data sources (``data.source``):

* ``"synthetic"``: phantoms from :mod:`.synthetic` with 4 classes (background,
  organ, organ2, lesion). The per-image label used for label skew is
  "the image contains a lesion": site ``k`` draws lesion presence from its
  ``P_k(y) = (1 - p_k, p_k)``, with ``p_k = lesion_prevalence`` unless the
  partition kind is ``label_skew``. Site ``k`` generates its ``n_k`` images from
  the stream ``numpy_rng(seed, "segmentation", "site", k)``; the last
  ``max(1, round(val_fraction · n_k))`` are its validation set.
  ``data.server_samples > 0`` gives the server a test set with neutral
  acquisition and annotator and the base prevalence, from the stream
  ``(seed, "segmentation", "server")``.
* ``"folder"``: real images and masks read by :func:`medtasks.io.load_image_mask_pairs`
  from each data folder (:mod:`medtasks.sites`: ``data.path``, the hospital folders of
  ``data.sites``, ``data.test_path``), padded to square and resampled to ``image_size``
  (bilinear for images, nearest for masks), normalised per image by robust
  min-max to ``[0, 1]``. ``num_classes`` is read from the masks of every folder
  together (as stored, before resampling): ``L = max label + 1``, background included,
  and the labels found must be exactly ``0..L-1``. A ``task.params.num_classes`` given in
  the scenario is used instead (it may exceed the labels found in each folder, never fall
  below them). The label used for label skew is "the image contains the last class". A
  pool (``data.sites: split``) is split with :func:`medtasks.partition.split_indices` by
  case (patient, :func:`medtasks.io.case_id`), so a patient's slices stay at one site; a
  hospital folder is its site whole. Each site holds out whole cases for validation;
  ``feature_skew`` / ``concept_shift`` then apply the same acquisition / annotator
  transforms as the synthetic data. ``data.test_path`` is the server's test set, read
  whole and unshifted; ``data.server_samples`` is refused for folder data.

``ClientData.stats`` (written to ``partitions.json``): ``n_train``, ``n_val``,
``label_histogram`` (images without / with the last class in their *annotated*
mask, train + val), ``pixel_class_fractions`` (``[C]``), ``acquisition``,
``annotator`` and ``label_distribution`` (the drawn ``P_k(y)`` for synthetic
sites, the empirical one for folder sites); folder sites add ``cases``
(``{"train": [...], "val": [...]}``, the sorted case ids of each split) and hospital
sites their ``folder``. :meth:`SegmentationTask.server_stats` describes a test folder.

``data.params`` must be empty for both sources. Generated and loaded data are
cached per process (as the task is, ``client/cache.py``), so repeated calls are free.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence, Sized
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
from pydantic import Field, field_serializer, model_validator
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medtasks import io, sites
from medtasks.base import ClientData, DataError, TaskContext, TaskParams, checked_params
from medtasks.partition import (
    SiteProfile,
    cases_by_split,
    draw_site_profiles,
    holdout_size,
    label_histogram,
    neutral_values,
    order_by_group,
)
from medtasks.plotting import save_example_figure
from medtasks.seeding import numpy_rng
from medtasks.segmentation import synthetic
from medtasks.segmentation.losses import LossFn, LossName, build_loss
from medtasks.segmentation.metrics import SegmentationMetrics
from medtasks.segmentation.model import NormName, build_unet, check_group_norm

EVAL_BATCH_SIZE = 32
PLOT_ROWS = 4
_CACHE_SIZE = 16
_CACHE: OrderedDict[str, Any] = OrderedDict()


class SegmentationParams(TaskParams):
    """``task.params`` of the segmentation task."""

    image_size: int = Field(
        64, ge=32, description="Image side in pixels; a multiple of 8 and of 2^(len(channels) − 1)."
    )
    num_classes: int = Field(
        synthetic.NUM_CLASSES,
        ge=2,
        description="Labels in the masks, background included. Unset: 4 for synthetic data (the "
        "only value it takes), max mask label + 1 for folder data (read from the masks).",
    )
    channels: tuple[int, ...] = Field(
        (8, 16, 32, 64), min_length=2, description="U-Net widths, one per level."
    )
    norm: NormName = Field("batch", description="Normalisation layer: batch, instance or group.")
    num_groups: int = Field(
        4, ge=1, description="Groups of GroupNorm (norm=group); divides every width and num_classes."
    )
    loss: LossName = Field("dice_ce", description="Training loss (see medtasks.segmentation.losses).")
    tversky_alpha: float = Field(0.3, ge=0, description="Tversky weight of false positives.")
    tversky_beta: float = Field(0.7, ge=0, description="Tversky weight of false negatives.")
    focal_gamma: float = Field(2.0, ge=0, description="Focal-loss focusing exponent.")
    lesion_prevalence: float = Field(
        0.5, ge=0, le=1, description="Base P(image has a lesion) of synthetic sites."
    )

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        """``num_classes: null`` (how a resolved scenario writes it when unset) leaves it unset."""
        if isinstance(data, Mapping) and "num_classes" in data and data["num_classes"] is None:
            return {key: value for key, value in data.items() if key != "num_classes"}
        return data

    @field_serializer("num_classes")
    def _dump_num_classes(self, value: int) -> int | None:
        """``None`` when unset, so the folder task still reads it from the masks after a round trip."""
        return value if self.num_classes_set else None

    @property
    def num_classes_set(self) -> bool:
        """Whether the scenario sets ``num_classes`` (else its default stands for synthetic data)."""
        return "num_classes" in self.model_fields_set

    @model_validator(mode="after")
    def _check_architecture(self) -> SegmentationParams:
        if any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        factor = max(8, 2 ** (len(self.channels) - 1))
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of {factor} "
                f"(8 and 2**(len(channels)-1) for channels={self.channels})"
            )
        if self.norm == "group":
            check_group_norm(self.channels, self.num_classes, self.num_groups)
        if self.tversky_alpha + self.tversky_beta <= 0:
            raise ValueError("tversky_alpha + tversky_beta must be positive")
        return self


def _cached(key: str, build: Callable[[], Any]) -> Any:
    """Per-process LRU cache of generated / loaded data."""
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = build()
    _CACHE[key] = value
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def _dataset(images: np.ndarray, masks: np.ndarray) -> TensorDataset:
    """``(image [1, S, S] float32, mask [S, S] int64)`` samples from ``[N, S, S]`` arrays."""
    return TensorDataset(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1),
        torch.from_numpy(np.ascontiguousarray(masks, dtype=np.int64)),
    )


@dataclasses.dataclass(frozen=True)
class _FolderPool:
    """Every sample of a data folder, resampled and normalised.

    Attributes
    ----------
    images : np.ndarray
        ``[N, S, S]`` float32.
    masks : np.ndarray
        ``[N, S, S]`` int64.
    cases : np.ndarray
        ``[N]`` the case (patient) of each sample (:func:`medtasks.io.case_id`).
    labels : tuple[int, ...]
        the sorted labels found in the stored masks (before resampling, which may drop
        a small structure).
    """

    images: np.ndarray
    masks: np.ndarray
    cases: np.ndarray
    labels: tuple[int, ...]


def folder_num_classes(labels: Sequence[int], given: int | None, path: str) -> int:
    """The number of classes ``L`` of a folder whose masks hold ``labels`` (sorted, non-empty).

    ``L = given`` when the scenario sets ``task.params.num_classes`` (every label must be
    below it), else ``L = max(labels) + 1`` with ``labels`` exactly ``0..L-1``.

    Raises
    ------
    DataError
        a label ``>= given``; inferred labels with a gap; masks holding background only.
    """
    top = int(max(labels))
    if given is not None:
        if top >= given:
            raise DataError(
                f"task.params.num_classes={given} but the masks in {path} hold label {top} "
                "(labels must lie in 0..num_classes-1)"
            )
        return given
    missing = sorted(set(range(top + 1)) - {int(v) for v in labels})
    if missing:
        raise DataError(
            f"the masks in {path} hold labels {[int(v) for v in labels]} (max label {top}) but never "
            f"{missing}: labels must be 0..L-1; relabel the masks or set task.params.num_classes"
        )
    if top < 1:
        raise DataError(f"the masks in {path} hold only background (label 0); at least one foreground label is needed")
    return top + 1


def _contains_last_class(masks: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-image label for label skew: ``[N]`` int, 1 if the mask holds class ``C - 1``."""
    return (masks == num_classes - 1).reshape(len(masks), -1).any(axis=1).astype(np.int64)


class SegmentationTask:
    """2D multi-class segmentation with a MONAI U-Net; primary metric: mean foreground Dice.

    Batches are ``(images [B, 1, S, S] float32, masks [B, S, S] int64)``. :meth:`evaluate`
    returns ``loss``, ``dice`` (mean over foreground classes), ``dice_<class>`` per
    foreground class and ``hd95`` (pixels); see :mod:`.metrics` for empty-class rules.
    """

    name: ClassVar[str] = "segmentation"
    Params: ClassVar[type[TaskParams]] = SegmentationParams
    models: ClassVar[tuple[str, ...]] = ("unet",)
    primary_metric: ClassVar[str] = "dice"
    higher_is_better: ClassVar[bool] = True
    metric_units: ClassVar[dict[str, str]] = {"hd95": "px"}  # the data carry no pixel spacing: never mm
    reads_hospital_folders: ClassVar[bool] = True  # data.sites and data.test_path (medtasks.sites)
    SYNTHETIC_NUM_CLASSES: ClassVar[int] = synthetic.NUM_CLASSES

    def __init__(self, ctx: TaskContext) -> None:
        params = cast(SegmentationParams, checked_params(type(self), ctx))  # an instance of self.Params
        if ctx.data.source == "synthetic":
            if params.num_classes != self.SYNTHETIC_NUM_CLASSES:
                raise ValueError(
                    f"synthetic segmentation data has {self.SYNTHETIC_NUM_CLASSES} classes "
                    f"{synthetic.CLASS_NAMES}; got task.params.num_classes={params.num_classes}"
                )
        elif ctx.data.source == "folder":
            sites.check_data(type(self), ctx)
        else:
            raise ValueError(
                f"unknown data.source {ctx.data.source!r} for segmentation; use synthetic or folder"
            )
        self.ctx = ctx
        self.params: SegmentationParams = params
        self._loss_fn: LossFn | None = None
        #: Site profiles of synthetic data (``None`` for folder data, whose sites are index splits).
        self.profiles: list[SiteProfile] | None = None
        if ctx.data.source == "synthetic":
            self.profiles = draw_site_profiles(
                ctx.partition.kind,
                ctx.partition.params,
                num_clients=ctx.partition.clients,
                samples_per_client=ctx.data.samples_per_client,
                label_prior=[1.0 - params.lesion_prevalence, params.lesion_prevalence],
                acquisition_space=synthetic.ACQUISITION_SPACE,
                annotator_space=synthetic.ANNOTATOR_SPACE,
                seed=ctx.seed,
            )

    @functools.cached_property
    def num_classes(self) -> int:
        """``C``, background included: 4 for synthetic data; for folder data the
        ``task.params.num_classes`` the scenario sets, else read from the masks
        (:meth:`_folder_classes`, which loads the folder on first use)."""
        if self.ctx.data.source == "synthetic" or self.params.num_classes_set:
            return self.params.num_classes
        return self._folder_classes()

    def _folder_classes(self) -> int:
        """The class count of every folder the sites and the server read together (:func:`folder_num_classes`
        of the union of their labels; a given ``num_classes`` is checked against each folder), checked
        against the U-Net's groups."""
        given = self.params.num_classes if self.params.num_classes_set else None
        folders = sites.data_folders(self.ctx.data)
        found = [self._folder_pool(folder).labels for folder in folders]
        if given is not None:
            for folder, labels in zip(folders, found):
                folder_num_classes(labels, given, folder)
        union = sorted({label for labels in found for label in labels})
        num_classes = folder_num_classes(union, given, ", ".join(folders))
        if self.params.norm == "group":
            check_group_norm(self.params.channels, num_classes, self.params.num_groups)
        return num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        """Names of the foreground classes ``1..C-1`` (the ``dice_<name>`` metrics)."""
        if self.ctx.data.source == "synthetic":
            return synthetic.CLASS_NAMES[1:]
        return tuple(f"class{c}" for c in range(1, self.num_classes))

    @property
    def class_labels(self) -> tuple[str, ...]:
        """Legend entries of the classes ``0..C-1`` in example pictures: ``k: name`` (synthetic data), else
        ``class k`` (a folder's labels have no names)."""
        if self.ctx.data.source == "synthetic":
            return tuple(f"{k}: {name}" for k, name in enumerate(synthetic.CLASS_NAMES))
        return ("0: background", *(f"class {k}" for k in range(1, self.num_classes)))

    # ------------------------------------------------------------------ model, loss

    def build_model(self) -> nn.Module:
        """A U-Net (:func:`.model.build_unet`) initialised from the scenario seed."""
        p = self.params
        return build_unet(self.num_classes, p.channels, p.norm, p.num_groups, seed=self.ctx.seed)

    @property
    def loss_fn(self) -> LossFn:
        """The configured loss ``(logits [B, C, S, S], masks [B, S, S]) -> scalar`` (built once)."""
        if self._loss_fn is None:
            p = self.params
            self._loss_fn = build_loss(
                p.loss,
                self.num_classes,
                tversky_alpha=p.tversky_alpha,
                tversky_beta=p.tversky_beta,
                focal_gamma=p.focal_gamma,
            )
        return self._loss_fn

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Training loss of ``model`` on ``batch = (images [B, 1, S, S], masks [B, S, S])``."""
        images, masks = batch[0], batch[1]
        return self.loss_fn(model(images), masks)

    # ------------------------------------------------------------------ data

    def _cache_key(self, *what: Any) -> str:
        """Cache key of this task's data item ``what`` (scenario sections + seed + item)."""
        ctx = self.ctx
        parts: list[Any] = [self.name, self.params.model_dump(mode="json"), dataclasses.asdict(ctx.data)]
        parts += [dataclasses.asdict(ctx.partition), ctx.seed, *what]
        return json.dumps(parts, sort_keys=True, default=str)

    def client_data(self, partition_id: int) -> ClientData:
        """Train/validation data and ``partitions.json`` statistics of site ``partition_id``."""
        if not 0 <= partition_id < self.ctx.partition.clients:
            raise ValueError(f"partition_id {partition_id} outside [0, {self.ctx.partition.clients})")
        build = self._synthetic_site if self.ctx.data.source == "synthetic" else self._folder_site
        return _cached(self._cache_key("client", partition_id), lambda: build(partition_id))

    def server_data(self) -> Dataset | None:
        """Central test set: every slice of ``data.test_path`` as stored (folder data), the neutral
        synthetic site of ``server_samples > 0`` images, else ``None``."""
        if self.ctx.data.test_path:
            return _cached(self._cache_key("server"), self._test_set)
        n = self.ctx.data.server_samples
        if self.ctx.data.source != "synthetic" or n <= 0:
            return None

        def build() -> Dataset:
            rng = numpy_rng(self.ctx.seed, "segmentation", "server")
            samples = synthetic.generate(rng, n, self.params.image_size, self.params.lesion_prevalence)
            return _dataset(samples.images, samples.masks)

        return _cached(self._cache_key("server"), build)

    def _synthetic_site(self, partition_id: int) -> ClientData:
        assert self.profiles is not None
        profile = self.profiles[partition_id]
        rng = numpy_rng(self.ctx.seed, "segmentation", "site", partition_id)
        samples = synthetic.generate(
            rng,
            profile.n_samples,
            self.params.image_size,
            profile.label_distribution[1],
            profile.acquisition,
            profile.annotator,
        )
        return self._split_site(samples.images, samples.masks, profile.to_json(), partition_id)

    def server_stats(self) -> dict[str, Any] | None:
        """The test folder's description for ``partitions.json`` (``None`` without ``data.test_path``):
        ``folder``, ``n``, ``cases`` and ``label_histogram`` (images without / with the last class)."""
        if not self.ctx.data.test_path:
            return None
        pool = self._folder_pool(self.ctx.data.test_path)
        return {
            "folder": self.ctx.data.test_path,
            "n": len(pool.masks),
            "cases": sorted({str(case) for case in pool.cases}),
            "label_histogram": label_histogram(_contains_last_class(pool.masks, self.num_classes), 2),
        }

    def _test_set(self) -> Dataset:
        """Every slice of ``data.test_path``, neither shifted nor relabelled."""
        assert self.ctx.data.test_path is not None
        return self.folder_dataset(self.ctx.data.test_path)

    def folder_dataset(self, folder: str) -> Dataset:
        """Every slice of ``folder`` (the layout of one site's folder, :mod:`medtasks.io`), neither shifted nor
        relabelled: how ``data.test_path`` is read, and what ``medfed evaluate --data`` evaluates on.

        Raises
        ------
        DataError
            the folder cannot be read, or its masks hold a label the model has no class for.
        """
        pool = self._folder_pool(folder)
        if self.ctx.data.source == "folder":
            self._folder_classes()  # the scenario's folders fit the model
        if max(pool.labels) >= self.num_classes:
            raise DataError(f"{folder}: masks hold label {max(pool.labels)}, but the model has {self.num_classes} "
                            f"classes (0..{self.num_classes - 1})")
        return _dataset(pool.images, pool.masks)

    def predict_files(self, model: nn.Module, input_path: str | Path, output_path: str | Path) -> list[Path]:
        """Segment new images into ``<case>_mask.nii.gz`` files (:mod:`medtasks.segmentation.predict`)."""
        from medtasks.segmentation.predict import predict_masks

        return predict_masks(model, input_path, output_path, image_size=self.params.image_size,
                             num_classes=self.num_classes)

    def _folder_pool(self, folder: str) -> _FolderPool:
        """All samples of ``folder``, resampled and normalised, with their cases and the labels found."""

        def build() -> _FolderPool:
            images, masks, _, cases = io.load_image_mask_pairs(folder)
            size = self.params.image_size
            pairs = [io.resample(io.normalize_intensity(x), y, size) for x, y in zip(images, masks)]
            labels = np.unique(np.concatenate([np.unique(y) for y in masks]))
            return _FolderPool(
                images=np.stack([x for x, _ in pairs]),
                masks=np.stack([y for _, y in pairs]),
                cases=np.asarray(cases),
                labels=tuple(int(v) for v in labels),
            )

        key = json.dumps([str(Path(folder).resolve()), self.params.image_size])
        return _cached(key, build)

    def _folder_shift(self, partition_id: int, labels: np.ndarray) -> dict[str, dict[str, float]]:
        """Acquisition and annotator of a folder site (neutral unless the kind shifts them)."""
        part = self.ctx.partition
        if part.kind not in ("feature_skew", "concept_shift"):
            return {
                "acquisition": neutral_values(synthetic.ACQUISITION_SPACE),
                "annotator": neutral_values(synthetic.ANNOTATOR_SPACE),
            }
        profile = draw_site_profiles(
            part.kind,
            part.params,
            num_clients=part.clients,
            samples_per_client=max(1, len(labels) // part.clients),
            label_prior=label_histogram(labels, 2),
            acquisition_space=synthetic.ACQUISITION_SPACE,
            annotator_space=synthetic.ANNOTATOR_SPACE,
            seed=self.ctx.seed,
        )[partition_id]
        return {"acquisition": profile.acquisition, "annotator": profile.annotator}

    def _pool_labels(self, folder: str) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, cases)`` of a folder's samples: "contains the last class" (label skew) and the patient."""
        pool = self._folder_pool(folder)
        return _contains_last_class(pool.masks, self.num_classes), pool.cases

    def _folder_site(self, partition_id: int) -> ClientData:
        """Site ``partition_id``'s cases (its share of the pool, or its hospital folder), shifted as the
        partition kind says; a hospital site's statistics name its ``folder``."""
        self._folder_classes()  # the labels fit a given num_classes
        ctx = self.ctx
        folder, rows = sites.site_rows(ctx.data, ctx.partition, ctx.seed, partition_id, self._pool_labels, "samples")
        pool = self._folder_pool(folder)
        labels, _ = self._pool_labels(folder)
        rng = numpy_rng(ctx.seed, "segmentation", "site", partition_id)
        indices = order_by_group(rows, pool.cases, rng)
        shift = self._folder_shift(partition_id, labels)
        images, masks = synthetic.shift_samples(
            pool.images[indices],
            pool.masks[indices],
            shift["acquisition"],
            shift["annotator"],
            rng,
            self.num_classes,
        )
        lesion_share = float(labels[indices].mean()) if len(indices) else 0.0
        info = {"label_distribution": [1.0 - lesion_share, lesion_share], **shift}
        site = self._split_site(images, masks, info, partition_id, pool.cases[indices])
        if sites.natural_sites(ctx.data):
            site.stats["folder"] = folder
        return site

    def _split_site(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        info: dict[str, Any],
        partition_id: int,
        cases: np.ndarray | None = None,
    ) -> ClientData:
        """Hold out the last ``max(1, round(val_fraction · n))`` samples and describe the site.

        With ``cases`` the hold-out grows to whole cases (:func:`medtasks.partition.holdout_size`)
        and ``stats["cases"]`` records the case ids of each split.

        Parameters
        ----------
        images : np.ndarray
            ``[n, S, S]`` float32.
        masks : np.ndarray
            ``[n, S, S]`` int64.
        info : dict[str, Any]
            ``acquisition``, ``annotator`` and ``label_distribution`` of the site.
        partition_id : int
            the site (for error messages).
        cases : np.ndarray | None
            ``[n]`` the case of each sample, each case contiguous; ``None`` for synthetic data.
        """
        n = len(images)
        try:
            n_val = holdout_size(n, self.ctx.data.val_fraction, cases)
        except ValueError as error:
            raise DataError(f"site {partition_id} {error}") from None
        pixel_counts = np.bincount(masks.ravel(), minlength=self.num_classes)
        stats = {
            "n_train": n - n_val,
            "n_val": n_val,
            "label_histogram": label_histogram(_contains_last_class(masks, self.num_classes), 2),
            "pixel_class_fractions": [float(c) for c in pixel_counts / max(1, pixel_counts.sum())],
            "acquisition": {k: float(v) for k, v in info["acquisition"].items()},
            "annotator": {k: float(v) for k, v in info["annotator"].items()},
            "label_distribution": [float(p) for p in info["label_distribution"]],
        }
        if cases is not None:
            stats["cases"] = cases_by_split(cases, n_val)
        return ClientData(
            train=_dataset(images[: n - n_val], masks[: n - n_val]),
            val=_dataset(images[n - n_val :], masks[n - n_val :]),
            stats=stats,
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Loss, Dice and HD95 of ``model`` on ``dataset`` (batches of 32, no gradients).

        Returns
        -------
        dict[str, float]
            ``loss`` (sample mean), ``dice`` (mean foreground Dice), ``dice_<class>``,
            ``hd95`` (pixels); NaN where a metric is undefined on the whole dataset.
        """
        loader = DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, shuffle=False)
        metrics = SegmentationMetrics(self.num_classes)
        device = next(model.parameters()).device
        total_loss, count = 0.0, 0
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for images, masks in loader:
                    images, masks = images.to(device), masks.to(device)
                    logits = model(images)
                    total_loss += float(self.loss_fn(logits, masks)) * len(images)
                    count += len(images)
                    metrics(logits.argmax(dim=1), masks)
        finally:
            model.train(was_training)
        if count == 0:
            raise DataError("cannot evaluate the segmentation task on an empty dataset")
        result = metrics.aggregate()
        return {
            "loss": total_loss / count,
            "dice": float(result["dice"]),
            **{f"dice_{name}": float(v) for name, v in zip(self.class_names, result["dice_per_class"])},
            "hd95": float(result["hd95"]),
        }

    def plot_examples(self, model: nn.Module, dataset: Dataset, path: Path, *, title: str = "") -> None:
        """Save a PNG: one row per sample (up to 4): image | ground truth | prediction, under ``title``,
        with a legend of the classes' colours."""
        n = len(cast(Sized, dataset))  # the task's datasets are map-style, with a len
        samples = [dataset[i] for i in range(min(PLOT_ROWS, n))]
        if not samples:
            raise DataError("cannot plot examples of an empty dataset")
        images = torch.stack([s[0] for s in samples])
        masks = torch.stack([s[1] for s in samples])
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                pred = model(images.to(next(model.parameters()).device)).argmax(dim=1).cpu()
        finally:
            model.train(was_training)
        figure = plot_overlays(images[:, 0].numpy(), masks.numpy(), pred.numpy(), self.class_labels)
        save_example_figure(figure, Path(path), title=title)


OVERLAY_PALETTE = ("tab:red", "tab:green", "gold", "tab:cyan", "tab:purple", "tab:orange", "tab:pink")
"""Colours of the foreground classes ``1, 2, ...`` (repeating), the same in ground truth and prediction."""


def class_colours(num_classes: int) -> list[str]:
    """The overlay colour of each class ``0..C-1``: ``"none"`` for the background, then :data:`OVERLAY_PALETTE`."""
    return ["none", *(OVERLAY_PALETTE[(c - 1) % len(OVERLAY_PALETTE)] for c in range(1, num_classes))]


def plot_overlays(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, class_labels: Sequence[str]) -> Any:
    """Rows of image | truth overlay | prediction overlay, and a legend of the classes' colours.

    Parameters
    ----------
    images : np.ndarray
        ``[N, S, S]`` float.
    truth : np.ndarray
        ``[N, S, S]`` integer labels.
    pred : np.ndarray
        ``[N, S, S]`` integer labels.
    class_labels : sequence of str
        The legend entry of each class ``0..C-1`` (``C`` classes).

    Returns
    -------
    matplotlib.figure.Figure
        The picture (not yet saved).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    from medtasks.segmentation.metrics import dice_per_class

    num_classes = len(class_labels)
    colours = class_colours(num_classes)
    overlay_style = {"cmap": ListedColormap(colours), "vmin": 0, "vmax": num_classes - 1, "alpha": 0.5}
    dice = dice_per_class(torch.from_numpy(pred), torch.from_numpy(truth), num_classes).nanmean(dim=1)
    figure = Figure(figsize=(7.5, 2.5 * len(images)))
    axes = figure.subplots(len(images), 3, squeeze=False)
    for row, (image, true_mask, pred_mask) in enumerate(zip(images, truth, pred)):
        titles = ("image", "ground truth", f"prediction (Dice {float(dice[row]):.2f})")
        for ax, overlay, title in zip(axes[row], (None, true_mask, pred_mask), titles):
            ax.imshow(image, cmap="gray")
            if overlay is not None:
                ax.imshow(np.ma.masked_equal(overlay, 0), interpolation="nearest", **overlay_style)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    handles = [Patch(facecolor=colour, alpha=1.0 if colour == "none" else 0.5, edgecolor="gray", label=label)
               for colour, label in zip(colours, class_labels)]
    figure.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(num_classes, 4),
                  fontsize="small", title="classes (no overlay: background)", title_fontsize="small")
    return figure
