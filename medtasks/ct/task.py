"""Sparse-view CT reconstruction: learn to turn a noisy, undersampled FBP into the reference image.

This module holds the task class, :class:`CTReconstructionTask` (registered as ``"ct"``), which
wires together:

* :mod:`medtasks.ct.params`: ``task.params`` (:class:`~medtasks.ct.params.CTParams`);
* :mod:`medtasks.ct.scanner`: each site's scanner and reference, drawn from its site profile, the
  measurement ``y = −ln(Poisson(blur(I0 · exp(−Δ A μ))) / I0) / Δ``, ``x_FBP = FBP(y)``, and the
  normalised scale;
* :mod:`medtasks.ct.anatomy`: the anatomy labels;
* :mod:`medtasks.ct.synthetic` (``data.source: synthetic``: random phantoms, or with
  ``task.params.phantom: packaged`` patches of real slices from :mod:`medtasks.ct.realdata`) and
  :mod:`medtasks.ct.folder` (``data.source: folder``: slices in HU at ``data.path``): the data;
* :mod:`medtasks.ct.models`: FBPConvNet (Jin et al. 2017, "Deep Convolutional Neural Network for
  Inverse Problems in Imaging") and the unrolled (learned) proximal gradient network (Adler &
  Öktem 2017, 2018);
* :mod:`medtasks.ct.metrics` (PSNR, SSIM, RMSE in HU) and :mod:`medtasks.ct.plots` (example
  pictures).

Non-IID kinds (:mod:`medtasks.partition`): ``feature_skew`` draws each site's scanner from
:data:`~medtasks.ct.scanner.ACQUISITION_SPACE` (number of views, dose, detector blur, angular
coverage); ``concept_shift`` its reference from :data:`~medtasks.ct.scanner.ANNOTATOR_SPACE`
(what the site calls ground truth is the image smoothed by a Gaussian of its own width, as if
regularised differently); ``label_skew`` the anatomy mix; ``quantity_skew`` the number of slices.

Images are normalised to ``x = μ / (2 μ_water)``: the Hounsfield window ``[−1000, 1000]`` maps to
``[0, 1]`` (air 0, water 0.5, cortical bone 1), and every PSNR / SSIM uses the data range
:data:`~medtasks.ct.scanner.DATA_RANGE` ``= 1`` on that scale, without clipping. Sinograms are
normalised the same way (``y / (2 μ_water)``), so ``A x ≈ y`` holds in the network's units too.

Each site's last ``max(1, round(val_fraction · n_k))`` slices are its validation set. A folder pool
(``data.sites: split``) is split by case (patient, :mod:`medtasks.ct.folder`): a patient's slices stay
at one site; a hospital folder of ``data.sites`` (:mod:`medtasks.sites`) is its site whole, and its
``stats["folder"]`` names it. The validation set grows to whole cases (``stats["cases"]`` lists the
case ids of each split). ``data.server_samples > 0`` gives the server a test set (synthetic data only)
from the stream ``(seed, "ct", "server")`` with the neutral scanner and reference and the base anatomy
mix; for folder data ``data.test_path`` is the test set, every slice measured by the neutral scanner.

Samples are ``(fbp [1, N, N], sinogram [1, A_k, N], target [1, N, N], geometry [2])`` with
``geometry = (views_k, angular_range_k)`` in float64. All samples of one site share a geometry;
:meth:`CTReconstructionTask.loss` and :meth:`~CTReconstructionTask.evaluate` rebuild the operator
from it (:func:`~medtasks.ct.operator.get_operator` caches one per geometry), so batches must not
mix sites with different scanners.

``ClientData.stats``: ``n_train``, ``n_val``, ``label_names``, ``label_histogram`` (anatomy counts,
train + val), ``label_distribution``, ``acquisition`` (the drawn values plus the resulting
``num_views``, ``angular_range_deg``, ``dose_i0`` and ``detector_blur_bins``), ``annotator``
(plus ``reference_sigma_px``) and ``fbp_psnr`` (mean FBP PSNR of the site, dB).

``data.params`` must be empty. Simulated sites are cached per process, as the task is
(``client/cache.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sized
from pathlib import Path
from typing import Any, ClassVar, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from medtasks import sites
from medtasks.base import ClientData, DataError, TaskContext, TaskParams, checked_params
from medtasks.ct import folder, realdata, synthetic
from medtasks.ct.anatomy import FOLDER_LABELS, anatomy_names
from medtasks.ct.metrics import psnr, rmse_hu, ssim
from medtasks.ct.models import FBPConvNet, UnrolledProximalGradient
from medtasks.ct.operator import Geometry, RadonOperator, get_operator
from medtasks.ct.params import CTParams
from medtasks.ct.plots import PLOT_ROWS, plot_reconstructions
from medtasks.ct.scanner import (
    ACQUISITION_SPACE,
    ANNOTATOR_SPACE,
    DATA_RANGE,
    NORMALISED_MU_WATER,
    Samples,
    draw_profiles,
)
from medtasks.partition import (
    SiteProfile,
    cases_by_split,
    holdout_size,
    label_histogram,
    neutral_values,
    order_by_group,
)
from medtasks.plotting import save_example_figure
from medtasks.seeding import numpy_rng

__all__ = ["EVAL_BATCH_SIZE", "CTReconstructionTask"]

EVAL_BATCH_SIZE = 32
"""Slices per batch in :meth:`CTReconstructionTask.evaluate`."""


def _batch_operator(geometry: Tensor, image_size: int) -> RadonOperator:
    """The operator of a batch whose rows all hold the same ``(views, angular_range)``, ``[B, 2]``.

    Raises
    ------
    ValueError
        The rows hold different geometries (the batch mixes sites with different scanners).
    """
    if not bool((geometry == geometry[:1]).all()):
        raise ValueError(
            "a CT batch must share one scanner geometry, got "
            f"{sorted({tuple(g) for g in geometry.tolist()})}; batch each site's samples separately"
        )
    views, angular_range = geometry[0].tolist()
    return get_operator(Geometry.sparse_view(image_size, int(views), float(angular_range)))


class CTReconstructionTask:
    """Sparse-view CT reconstruction (FBPConvNet or unrolled proximal gradient); primary metric: PSNR.

    Batches are ``(fbp [B, 1, N, N], sinogram [B, 1, A, N], target [B, 1, N, N], geometry [B, 2])``
    on the normalised scale (module docstring). :meth:`evaluate` returns ``loss``, ``psnr``,
    ``ssim``, ``rmse_hu`` of the network and ``psnr_fbp``, ``ssim_fbp`` of the plain FBP on the
    same slices, each the mean over slices.
    """

    name: ClassVar[str] = "ct"
    batches_within_site: ClassVar[bool] = True  # a batch shares one scanner geometry (the centralized baseline)
    Params: ClassVar[type[TaskParams]] = CTParams
    models: ClassVar[tuple[str, ...]] = ("fbpconvnet", "unrolled")
    primary_metric: ClassVar[str] = "psnr"
    higher_is_better: ClassVar[bool] = True
    metric_units: ClassVar[dict[str, str]] = {"psnr": "dB", "psnr_fbp": "dB", "rmse_hu": "HU"}
    reads_hospital_folders: ClassVar[bool] = True  # data.sites and data.test_path (medtasks.sites)

    def __init__(self, ctx: TaskContext) -> None:
        params = cast(CTParams, checked_params(type(self), ctx))  # an instance of self.Params
        if ctx.data.source not in ("synthetic", "folder"):
            raise ValueError(f"unknown data.source {ctx.data.source!r} for ct; use synthetic or folder")
        if ctx.data.source == "folder":
            sites.check_data(type(self), ctx)
        self.ctx = ctx
        self.params: CTParams = params
        self.model_name: str = ctx.model or self.models[0]
        self.label_names = anatomy_names(params) if ctx.data.source == "synthetic" else FOLDER_LABELS
        if ctx.data.source == "synthetic" and params.phantom == "packaged":
            realdata.load_slices(params.slice_packages)  # a missing package fails here, in one line
        #: Site profiles of synthetic data (``None`` for folder data, whose sites are index splits).
        self.profiles: list[SiteProfile] | None = None
        if ctx.data.source == "synthetic":
            self.profiles = draw_profiles(
                ctx.partition,
                samples_per_client=ctx.data.samples_per_client,
                label_prior=[1.0] * len(self.label_names),
                seed=ctx.seed,
            )

    # ------------------------------------------------------------------ model, loss

    def build_model(self) -> nn.Module:
        """The configured network, initialised from the scenario seed."""
        p, seed = self.params, self.ctx.seed
        if self.model_name == "unrolled":
            return UnrolledProximalGradient(p.unrolled_iterations, p.prox_channels, p.shared_weights, seed=seed)
        return FBPConvNet(p.channels, p.norm, p.num_groups, seed=seed)

    def _reconstruct(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``(x̂, x_FBP, target)`` of a batch, each ``[B, 1, N, N]``, on the model's device."""
        device = next(model.parameters()).device
        fbp, sinogram, target, geometry = (t.to(device) for t in batch[:4])
        operator = _batch_operator(geometry, self.params.image_size)
        return model(fbp, sinogram, operator), fbp, target

    def _loss(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Mean ``(x̂ − x)²`` (mse) or ``|x̂ − x|`` (l1) over pixels and batch."""
        return F.mse_loss(prediction, target) if self.params.loss == "mse" else F.l1_loss(prediction, target)

    def loss(self, model: nn.Module, batch: Any) -> Tensor:
        """Training loss of ``model`` on one batch (see the class docstring)."""
        prediction, _, target = self._reconstruct(model, batch)
        return self._loss(prediction, target)

    # ------------------------------------------------------------------ data

    def client_data(self, partition_id: int) -> ClientData:
        """Train/validation data and ``partitions.json`` statistics of site ``partition_id``."""
        if not 0 <= partition_id < self.ctx.partition.clients:
            raise ValueError(f"partition_id {partition_id} outside [0, {self.ctx.partition.clients})")
        if self.ctx.data.source == "synthetic":
            assert self.profiles is not None
            profile = self.profiles[partition_id]
            samples = synthetic.site_samples(
                self.params, profile, anatomies=self.label_names, seed=self.ctx.seed, stream=("site", partition_id)
            )
            info = {"label_distribution": list(profile.label_distribution)}
            return self._split(samples, profile.acquisition, profile.annotator, info, partition_id)
        return self._folder_site(partition_id)

    def server_data(self) -> Dataset | None:
        """Central test set, measured by the neutral scanner with the neutral reference: every slice of
        ``data.test_path`` (folder data), or ``server_samples > 0`` synthetic slices; else ``None``."""
        if self.ctx.data.test_path:
            return self._test_samples().dataset(slice(None))
        n = self.ctx.data.server_samples
        if self.ctx.data.source != "synthetic" or n <= 0:
            return None
        neutral = SiteProfile(
            partition_id=-1,
            n_samples=n,
            label_distribution=tuple([1.0 / len(self.label_names)] * len(self.label_names)),
            acquisition=neutral_values(ACQUISITION_SPACE),
            annotator=neutral_values(ANNOTATOR_SPACE),
        )
        samples = synthetic.site_samples(
            self.params, neutral, anatomies=self.label_names, seed=self.ctx.seed, stream=("server",), region="test"
        )
        return samples.dataset(slice(None))

    def server_stats(self) -> dict[str, Any] | None:
        """The test folder's description for ``partitions.json`` (``None`` without ``data.test_path``):
        ``folder``, ``n``, ``cases``, ``label_names`` and ``label_histogram``."""
        if not self.ctx.data.test_path:
            return None
        _, labels, cases = self._pool(self.ctx.data.test_path)
        return {
            "folder": self.ctx.data.test_path,
            "n": len(labels),
            "cases": sorted({str(case) for case in cases}),
            "label_names": list(self.label_names),
            "label_histogram": label_histogram(labels, len(self.label_names)),
        }

    def _pool(self, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(μ, labels, cases)`` of every slice of the folder ``path`` (:func:`~medtasks.ct.folder.folder_pool`)."""
        return folder.folder_pool(str(Path(path).resolve()), self.params.image_size)

    def _pool_labels(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """``(labels, cases)`` of the folder ``path``."""
        return self._pool(path)[1:]

    def _test_samples(self) -> Samples:
        """Every slice of ``data.test_path`` measured by the neutral scanner (noise stream ``"server"``)."""
        return self._neutral_samples(self.ctx.data.test_path or "")

    def _neutral_samples(self, path: str) -> Samples:
        """Every slice of the folder ``path`` measured by the neutral scanner (noise stream ``"server"``)."""
        resolved = str(Path(path).resolve())
        labels = self._pool(resolved)[1]
        neutral = neutral_values(ACQUISITION_SPACE), neutral_values(ANNOTATOR_SPACE)
        return folder.site_samples(resolved, self.params, np.arange(len(labels)), *neutral, seed=self.ctx.seed,
                                   stream=("server",))

    def folder_dataset(self, path: str) -> Dataset:
        """Every slice of the folder ``path`` (HU slices, :mod:`medtasks.ct.folder`) measured as the central test
        set is: how ``data.test_path`` is read, and what ``medfed evaluate --data`` evaluates on."""
        return self._neutral_samples(path).dataset(slice(None))

    def predict_files(self, model: nn.Module, input_path: str | Path, output_path: str | Path) -> list[Path]:
        """Reconstruct new sinograms into ``<case>_recon.nii.gz`` files in HU (:mod:`medtasks.ct.predict`)."""
        from medtasks.ct.predict import predict_reconstructions

        return predict_reconstructions(model, input_path, output_path, self.params)

    def _folder_site(self, partition_id: int) -> ClientData:
        """Site ``partition_id``'s slices (its share of the pool, or its hospital folder), measured by its
        scanner; a hospital site's statistics name its ``folder``."""
        p, part, seed = self.params, self.ctx.partition, self.ctx.seed
        site_folder, rows = sites.site_rows(self.ctx.data, part, seed, partition_id, self._pool_labels, "slices")
        path = str(Path(site_folder).resolve())
        labels, cases = self._pool_labels(path)
        indices = order_by_group(rows, cases, numpy_rng(seed, "ct", "site", partition_id))
        if part.kind in ("feature_skew", "concept_shift"):
            profiles = draw_profiles(
                part, samples_per_client=max(1, len(labels) // part.clients), label_prior=label_histogram(labels, 2), seed=seed
            )
            acquisition, annotator = profiles[partition_id].acquisition, profiles[partition_id].annotator
        else:
            acquisition, annotator = neutral_values(ACQUISITION_SPACE), neutral_values(ANNOTATOR_SPACE)
        samples = folder.site_samples(path, p, indices, acquisition, annotator, seed=seed, stream=("site", partition_id))
        share = float(labels[indices].mean()) if len(indices) else 0.0
        info = {"label_distribution": [1.0 - share, share]}
        site = self._split(samples, acquisition, annotator, info, partition_id, cases[indices])
        if sites.natural_sites(self.ctx.data):
            site.stats["folder"] = site_folder
        return site

    def _split(
        self,
        samples: Samples,
        acquisition: Mapping[str, float],
        annotator: Mapping[str, float],
        info: dict[str, Any],
        partition_id: int,
        cases: np.ndarray | None = None,
    ) -> ClientData:
        """Hold out the last ``max(1, round(val_fraction · n))`` slices and describe the site.

        With ``cases`` (``[n]``, each case contiguous) the hold-out grows to whole cases
        (:func:`medtasks.partition.holdout_size`) and ``stats["cases"]`` records them.
        """
        n = len(samples.labels)
        try:
            n_val = holdout_size(n, self.ctx.data.val_fraction, cases)
        except ValueError as error:
            raise DataError(f"site {partition_id} {error}") from None
        fbp_psnr = psnr(samples.fbp, samples.target, DATA_RANGE).mean()
        stats = {
            "n_train": n - n_val,
            "n_val": n_val,
            "label_names": list(self.label_names),
            "label_histogram": label_histogram(samples.labels, len(self.label_names)),
            "label_distribution": [float(v) for v in info["label_distribution"]],
            "acquisition": {**{k: float(v) for k, v in acquisition.items()}, **samples.acquisition.to_json()},
            "annotator": {
                **{k: float(v) for k, v in annotator.items()},
                "reference_sigma_px": float(annotator["reference_smoothing"]),
            },
            "fbp_psnr": float(fbp_psnr),
        }
        if cases is not None:
            stats["cases"] = cases_by_split(cases, n_val)
        return ClientData(
            train=samples.dataset(slice(0, n - n_val)), val=samples.dataset(slice(n - n_val, n)), stats=stats
        )

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """Loss, PSNR, SSIM and RMSE (HU) of ``model``, and PSNR/SSIM of the FBP, on ``dataset``.

        Batches of 32 without gradients; every metric is the mean over slices (loss: of the
        per-batch losses weighted by batch size).
        """
        loader = DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, shuffle=False)
        sums = dict.fromkeys(("loss", "psnr", "ssim", "rmse_hu", "psnr_fbp", "ssim_fbp"), 0.0)
        count = 0
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for batch in loader:
                    prediction, fbp, target = self._reconstruct(model, batch)
                    b = len(target)
                    sums["loss"] += float(self._loss(prediction, target)) * b
                    sums["psnr"] += float(psnr(prediction, target, DATA_RANGE).sum())
                    sums["ssim"] += float(ssim(prediction, target, DATA_RANGE).sum())
                    sums["rmse_hu"] += float(rmse_hu(prediction, target, NORMALISED_MU_WATER).sum())
                    sums["psnr_fbp"] += float(psnr(fbp, target, DATA_RANGE).sum())
                    sums["ssim_fbp"] += float(ssim(fbp, target, DATA_RANGE).sum())
                    count += b
        finally:
            model.train(was_training)
        if count == 0:
            raise DataError("cannot evaluate the CT task on an empty dataset")
        return {name: total / count for name, total in sums.items()}

    def plot_examples(self, model: nn.Module, dataset: Dataset, path: Path, *, title: str = "") -> None:
        """Save a PNG: one row per slice (up to 4): ground truth | FBP | network | |error| (HU), under ``title``."""
        rows = min(PLOT_ROWS, len(cast(Sized, dataset)))  # the task's datasets are map-style, with a len
        if rows == 0:
            raise DataError("cannot plot examples of an empty dataset")
        batch = next(iter(DataLoader(dataset, batch_size=rows, shuffle=False)))
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                prediction, fbp, target = (t.cpu() for t in self._reconstruct(model, batch))
        finally:
            model.train(was_training)
        save_example_figure(plot_reconstructions(target[:, 0], fbp[:, 0], prediction[:, 0]), Path(path), title=title)

