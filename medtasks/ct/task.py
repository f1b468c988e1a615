"""Sparse-view CT reconstruction: learn to turn a noisy, undersampled FBP into the reference image.

Images are normalised to ``x = μ / (2 μ_water)``: the Hounsfield window ``[−1000, 1000]`` maps to
``[0, 1]`` (air 0, water 0.5, cortical bone 1), and every PSNR / SSIM uses the data range
:data:`DATA_RANGE` ``= 1`` on that scale, without clipping. Sinograms are normalised the same
way (``y / (2 μ_water)``), so ``A x ≈ y`` holds in the network's units too.

Data sources (``data.source``):

* ``"synthetic"``: site ``k`` draws the anatomy ``a_i ~ P_k(a)`` of each of its ``n_k`` slices
  from the stream ``numpy_rng(seed, "ct", "site", k)`` and rasterises a random phantom of that
  anatomy (:data:`ANATOMIES`: ``torso_phantom`` thorax or abdomen slices, or ``random_ellipses``),
  in 1/cm. The anatomy is the label used for label skew; ``P(a)`` is uniform over the anatomies of
  ``task.params.phantom``. The site's scanner (:class:`Acquisition`) then measures it:
  ``y = −ln(Poisson(blur(I0 · exp(−Δ A μ))) / I0) / Δ`` with
  :func:`~medtasks.ct.physics.noisy_measurement`, noise from
  ``torch_generator(seed, "ct", "noise", "site", k)``, and ``x_FBP = FBP(y)``. The target is the
  site's reference image (the phantom, smoothed by the site's reference filter under concept
  shift). The last ``max(1, round(val_fraction · n_k))`` slices are the site's validation set.
  ``data.server_samples > 0`` gives the server a test set from the stream
  ``(seed, "ct", "server")`` with the neutral scanner and reference and the base anatomy mix.

  With ``task.params.phantom: packaged`` the slices are real instead: augmented patches of the
  CT images that the distributions in ``task.params.slice_packages`` install
  (:mod:`medtasks.ct.realdata`: ``pydicom``, and the optional ``pydicom-data``). The label
  is the source slice's anatomy (head, thorax, abdomen: those the packages hold). Sites cut
  their patches from the ``"train"`` region of every slice, the server's test set from the
  held-out ``"test"`` region, so no test pixel is ever trained on. Everything else (scanners,
  references, partition) is as above.
* ``"folder"``: real slices in HU read by :func:`_load_ct_slices` from ``data.path``, converted
  to μ, resampled to ``image_size`` and cut to the scanner's field of view (the inscribed
  circle). The label is "thorax" when the slice contains lungs (:func:`anatomy_label`), "other"
  otherwise. The pool is split with :func:`~medtasks.partition.split_indices`, then every site
  measures its slices as above. There is no server test set.

Non-IID kinds (DESIGN.md §5b): ``feature_skew`` draws per-site scanners from
:data:`ACQUISITION_SPACE` (number of views, dose, detector blur, angular coverage);
``label_skew`` the anatomy mix; ``quantity_skew`` the number of slices; ``concept_shift`` the
per-site reference from :data:`ANNOTATOR_SPACE` (what the site calls ground truth is the image
smoothed by a Gaussian of its own width, as if regularised differently).

Samples are ``(fbp [1, N, N], sinogram [1, A_k, N], target [1, N, N], geometry [2])`` with
``geometry = (views_k, angular_range_k)`` in float64. All samples of one site share a geometry;
:meth:`CTReconstructionTask.loss` and :meth:`~CTReconstructionTask.evaluate` rebuild the operator
from it (:func:`~medtasks.ct.operator.get_operator` caches one per geometry), so batches must not
mix sites with different scanners.

``ClientData.stats``: ``n_train``, ``n_val``, ``label_names``, ``label_histogram`` (anatomy counts,
train + val), ``label_distribution``, ``acquisition`` (the drawn values plus the resulting
``num_views``, ``angular_range_deg``, ``dose_i0`` and ``detector_blur_bins``), ``annotator``
(plus ``reference_sigma_px``) and ``fbp_psnr`` (mean FBP PSNR of the site, dB).

``data.params`` must be empty. Simulated sites are cached per process (DESIGN.md §9).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from scipy import ndimage
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medtasks import io
from medtasks.base import ClientData, DataError, TaskContext, TaskParams, checked_params
from medtasks.ct import realdata
from medtasks.ct.metrics import psnr, rmse_hu, ssim
from medtasks.ct.models import FBPConvNet, UnrolledProximalGradient
from medtasks.ct.operator import FilterName, Geometry, RadonOperator, get_operator
from medtasks.ct.phantoms import random_ellipses, torso_phantom
from medtasks.ct.physics import MU_WATER, noisy_measurement
from medtasks.partition import ParamRange, SiteProfile, draw_site_profiles, label_histogram, neutral_values, split_indices
from medtasks.seeding import numpy_rng, torch_generator
from medtasks.segmentation.model import NormName, check_group_norm

IMAGE_SCALE: float = 2.0 * MU_WATER
"""Images and sinograms are divided by ``2 μ_water``: HU ``[−1000, 1000]`` ↦ ``[0, 1]``."""
DATA_RANGE: float = 1.0
"""Data range ``R`` of every PSNR / SSIM on the normalised scale."""
NORMALISED_MU_WATER: float = MU_WATER / IMAGE_SCALE
"""Water on the normalised scale (0.5), for :func:`~medtasks.ct.metrics.rmse_hu`."""
MIN_VIEWS = 4
"""Fewest projections a site's scanner takes."""
EVAL_BATCH_SIZE = 32
PLOT_ROWS = 4
PLOT_WINDOW = (0.25, 0.75)
"""Display window of the pictures on the normalised scale (HU ``[−500, 500]``)."""
LUNG_FRACTION = 0.1
"""A slice is a thorax when more than this fraction of its body is below −500 HU (lungs)."""
MAX_PHANTOM_ATTEMPTS = 64
_LUNG_THRESHOLD_MU = MU_WATER * (1.0 - 500.0 / 1000.0)  # μ at −500 HU

PhantomName = Literal["torso", "ellipses", "mixed", "packaged"]

#: Anatomy labels each generated phantom family draws from (label skew changes their mix); the
#: labels of ``"packaged"`` are those of its slices (:func:`anatomy_names`).
ANATOMIES: dict[str, tuple[str, ...]] = {
    "torso": ("thorax", "abdomen"),
    "ellipses": ("ellipses",),
    "mixed": ("thorax", "abdomen", "ellipses"),
}
#: Labels of folder data (:func:`anatomy_label`).
FOLDER_LABELS: tuple[str, ...] = ("thorax", "other")

#: Feature-skew (scanner) parameters; see :meth:`Acquisition.of_site`.
ACQUISITION_SPACE: dict[str, ParamRange] = {
    # Factor on task.params.num_views (rounded, at least MIN_VIEWS).
    "views_scale": ParamRange(0.5, 1.5, 1.0),
    # log10 of the factor on task.params.dose_i0.
    "log10_dose_offset": ParamRange(-1.5, 0.5, 0.0),
    # Detector blur in bins added to task.params.detector_blur.
    "detector_blur": ParamRange(0.0, 1.5, 0.0),
    # Fraction of task.params.angular_range covered (limited angle; 150° of 180° at the low end).
    "angular_coverage": ParamRange(150.0 / 180.0, 1.0, 1.0),
}

#: Concept-shift (reference) parameters; see :func:`reference_image`.
ANNOTATOR_SPACE: dict[str, ParamRange] = {
    # Gaussian sigma in pixels of the site's reference ("ground truth") regularisation.
    "reference_smoothing": ParamRange(0.0, 1.2, 0.0),
}


class CTParams(TaskParams):
    """``task.params`` of the CT reconstruction task."""

    image_size: int = Field(64, ge=16, description="Image side N in pixels (and detector bins).")
    num_views: int = Field(30, ge=MIN_VIEWS, description="Projections of the neutral scanner (sparse view).")
    angular_range: float = Field(180.0, gt=0, le=360, description="Angular range of the neutral scanner, degrees.")
    dose_i0: float = Field(1e5, gt=0, description="Unattenuated photons per detector bin of the neutral scanner.")
    detector_blur: float = Field(0.0, ge=0, description="Gaussian detector blur of the neutral scanner, bins.")
    phantom: PhantomName = Field(
        "torso",
        description="Anatomy family: torso (thorax/abdomen), ellipses, mixed (all three), or packaged "
        "(augmented patches of real CT slices shipped by slice_packages).",
    )
    slice_packages: tuple[realdata.Package, ...] = Field(
        ("pydicom",),
        min_length=1,
        description="Distributions whose real CT slices phantom=packaged uses: pydicom (2 slices, always "
        "installed) and pydicom-data (4 more, optional: pip install pydicom-data).",
    )
    filter: FilterName = Field("ram-lak", description="FBP filter window.")
    channels: tuple[int, ...] = Field((16, 32, 64), min_length=2, description="FBPConvNet U-Net widths.")
    norm: NormName = Field("instance", description="FBPConvNet normalisation: instance, batch or group.")
    num_groups: int = Field(4, ge=1, description="GroupNorm groups (norm=group); divides every width.")
    unrolled_iterations: int = Field(5, ge=1, le=50, description="Iterations K of the unrolled network.")
    prox_channels: int = Field(32, ge=1, description="Hidden channels of each unrolled proximal CNN.")
    shared_weights: bool = Field(False, description="One proximal CNN for all unrolled iterations.")
    loss: Literal["mse", "l1"] = Field("mse", description="Training loss on the normalised images.")

    @model_validator(mode="after")
    def _check(self) -> "CTParams":
        if any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be positive, got {self.channels}")
        factor = 2 ** (len(self.channels) - 1)
        if self.image_size % factor:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of {factor} (2**(len(channels)-1) "
                f"for channels={self.channels})"
            )
        if self.norm == "group":
            check_group_norm(self.channels, self.channels[0], self.num_groups)
        return self


# ----------------------------------------------------------------------------- scanner and reference


@dataclass(frozen=True)
class Acquisition:
    """One site's scanner.

    Attributes:
        num_views: projections ``A``, evenly spaced over ``[0, angular_range)``.
        angular_range: degrees covered.
        dose_i0: unattenuated photons per bin.
        detector_blur: Gaussian blur along the detector, bins.
    """

    num_views: int
    angular_range: float
    dose_i0: float
    detector_blur: float

    @classmethod
    def of_site(cls, params: CTParams, values: Mapping[str, float]) -> "Acquisition":
        """The scanner of a site with drawn :data:`ACQUISITION_SPACE` ``values``.

        ``A_k = max(4, round(s_k · A))``, ``range_k = c_k · range``, ``I0_k = I0 · 10^{d_k}``,
        ``σ_k = σ + b_k`` for views scale ``s``, coverage ``c``, dose offset ``d`` and blur ``b``.
        """
        return cls(
            num_views=max(MIN_VIEWS, int(round(params.num_views * values["views_scale"]))),
            angular_range=float(params.angular_range * values["angular_coverage"]),
            dose_i0=float(params.dose_i0 * 10.0 ** values["log10_dose_offset"]),
            detector_blur=float(params.detector_blur + values["detector_blur"]),
        )

    def geometry(self, image_size: int) -> Geometry:
        """The sparse-view geometry of this scanner for ``N = image_size``."""
        return Geometry.sparse_view(image_size, self.num_views, self.angular_range)

    def to_json(self) -> dict[str, float]:
        """The scanner as it is written to ``partitions.json``."""
        return {
            "num_views": self.num_views,
            "angular_range_deg": self.angular_range,
            "dose_i0": self.dose_i0,
            "detector_blur_bins": self.detector_blur,
        }


def reference_image(mu: np.ndarray, sigma: float) -> np.ndarray:
    """A site's reference: ``μ * G_σ`` (Gaussian of ``sigma`` pixels over each slice), or ``μ`` at 0.

    Args:
        mu: ``[n, N, N]``.
        sigma: the site's ``reference_smoothing``.
    """
    return ndimage.gaussian_filter(mu, sigma=(0.0, sigma, sigma)) if sigma > 0 else mu


# ----------------------------------------------------------------------------- phantoms and labels


def anatomy_label(mu: np.ndarray) -> int:
    """0 (thorax) if the slice holds lungs, else 1 (abdomen / other).

    The body is the set of pixels above −500 HU, filled along rows and columns (exact for a
    convex outline); the slice is a thorax when more than :data:`LUNG_FRACTION` of the body lies
    below −500 HU. On ``torso_phantom`` slices the fraction is ≥ 0.27 for thoraces and ≤ 0.02
    for abdomens (bowel gas).

    Args:
        mu: one slice ``[H, W]`` in 1/cm.
    """
    dense = mu > _LUNG_THRESHOLD_MU

    def span(mask: np.ndarray, axis: int) -> np.ndarray:  # between the first and last True of each line
        forward = np.logical_or.accumulate(mask, axis=axis)
        backward = np.flip(np.logical_or.accumulate(np.flip(mask, axis), axis=axis), axis)
        return forward & backward

    body = span(dense, 0) & span(dense, 1)
    if not body.any():
        return 1
    return 0 if (body & ~dense).sum() > LUNG_FRACTION * body.sum() else 1


def anatomy_names(params: CTParams) -> tuple[str, ...]:
    """The anatomy labels of synthetic data with ``params.phantom`` (and its ``slice_packages``)."""
    if params.phantom == "packaged":
        return realdata.anatomies(params.slice_packages)
    return ANATOMIES[params.phantom]


@functools.lru_cache(maxsize=4)
def _packaged_pool(packages: tuple[str, ...]) -> dict[str, tuple[realdata.PatchSource, ...]]:
    """The packaged slices of ``packages`` as ``μ`` in 1/cm, ready for patches, by anatomy (cached per process)."""
    pool: dict[str, list[realdata.PatchSource]] = {}
    for item in realdata.load_slices(packages):
        pool.setdefault(item.entry.anatomy, []).append(realdata.PatchSource(realdata.hu_to_mu(item.hu)))
    return {anatomy: tuple(sources) for anatomy, sources in pool.items()}


def draw_packaged(
    rng: np.random.Generator, anatomy: str, image_size: int, region: realdata.Region, packages: tuple[str, ...]
) -> np.ndarray:
    """A patch ``μ`` (float32 ``[N, N]``, 1/cm) of a real slice of ``anatomy``, cut from ``region``.

    The slice is uniform among the packaged slices of that anatomy; the patch is drawn and rendered
    by its :class:`~medtasks.ct.realdata.PatchSource`.
    """
    sources = _packaged_pool(packages)[anatomy]
    source = sources[int(rng.integers(len(sources)))]
    return source.render(source.draw(rng, region, image_size), image_size)


def draw_phantom(rng: np.random.Generator, anatomy: str, image_size: int) -> np.ndarray:
    """A random phantom ``μ`` (float32 ``[N, N]``, 1/cm) of the given anatomy.

    ``"ellipses"`` is :func:`~medtasks.ct.phantoms.random_ellipses`. Thorax and abdomen slices are
    :func:`~medtasks.ct.phantoms.torso_phantom` draws kept when :func:`anatomy_label` agrees
    (rejection sampling; half the draws are kept).
    """
    if anatomy == "ellipses":
        return random_ellipses(image_size, rng)
    wanted = ("thorax", "abdomen").index(anatomy)
    for _ in range(MAX_PHANTOM_ATTEMPTS):
        mu = torso_phantom(image_size, rng)
        if anatomy_label(mu) == wanted:
            return mu
    raise RuntimeError(f"no {anatomy} slice in {MAX_PHANTOM_ATTEMPTS} torso_phantom draws")


# ----------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class Samples:
    """One site's simulated slices, normalised by :data:`IMAGE_SCALE`.

    Attributes:
        fbp: ``[n, 1, N, N]`` float32.
        sinogram: ``[n, 1, A, N]`` float32, noisy.
        target: ``[n, 1, N, N]`` float32, the site's reference.
        labels: ``[n]`` int64 anatomy labels.
        acquisition: the scanner that measured them.
    """

    fbp: Tensor
    sinogram: Tensor
    target: Tensor
    labels: np.ndarray
    acquisition: Acquisition

    def dataset(self, rows: slice) -> TensorDataset:
        """``(fbp, sinogram, target, geometry [2] float64)`` samples of ``rows``."""
        a = self.acquisition
        n = len(self.fbp[rows])
        geometry = torch.tensor([float(a.num_views), a.angular_range], dtype=torch.float64).repeat(n, 1)
        return TensorDataset(self.fbp[rows], self.sinogram[rows], self.target[rows], geometry)


def simulate(
    mu: np.ndarray,
    labels: np.ndarray,
    acquisition: Acquisition,
    reference_sigma: float,
    filter: FilterName,
    generator: torch.Generator,
) -> Samples:
    """Measures slices with a site's scanner and builds the site's targets.

    ``y = noisy_measurement(A μ, I0, blur)``, ``x_FBP = FBP(y)``, ``target = reference_image(μ, σ)``;
    all three are divided by :data:`IMAGE_SCALE`.

    Args:
        mu: phantoms ``[n, N, N]`` in 1/cm.
        labels: anatomy labels ``[n]``.
        acquisition: the site's scanner.
        reference_sigma: the site's reference smoothing, pixels.
        filter: FBP filter window.
        generator: torch generator of the photon noise.
    """
    operator = get_operator(acquisition.geometry(mu.shape[-1]))
    phantoms = torch.from_numpy(np.ascontiguousarray(mu, dtype=np.float32))
    with torch.no_grad():
        clean = operator.forward(phantoms)
        noisy = noisy_measurement(clean, acquisition.dose_i0, generator, blur_sigma=acquisition.detector_blur)
        fbp = operator.fbp(noisy, filter)
    target = torch.from_numpy(np.ascontiguousarray(reference_image(mu, reference_sigma), dtype=np.float32))
    return Samples(
        fbp=(fbp / IMAGE_SCALE).unsqueeze(1).contiguous(),
        sinogram=(noisy / IMAGE_SCALE).unsqueeze(1).contiguous(),
        target=(target / IMAGE_SCALE).unsqueeze(1).contiguous(),
        labels=np.asarray(labels, dtype=np.int64),
        acquisition=acquisition,
    )


@dataclass(frozen=True)
class _SyntheticSite:
    """Everything that determines a synthetic site's samples (hashable: the cache key)."""

    seed: int
    stream: tuple[str | int, ...]
    n_samples: int
    image_size: int
    anatomies: tuple[str, ...]
    label_distribution: tuple[float, ...]
    acquisition: Acquisition
    reference_sigma: float
    filter: FilterName
    packages: tuple[str, ...] = ()
    """Distributions of the real slices (``phantom: packaged``); empty for generated phantoms."""
    region: realdata.Region = "train"
    """Region of the real slices the patches come from."""


@functools.lru_cache(maxsize=16)
def _synthetic_samples(site: _SyntheticSite) -> Samples:
    """Draws the site's anatomies and phantoms (or real patches), then simulates them (cached per process)."""
    rng = numpy_rng(site.seed, "ct", *site.stream)
    labels = rng.choice(len(site.anatomies), size=site.n_samples, p=np.asarray(site.label_distribution))
    if site.packages:
        mu = np.stack(
            [draw_packaged(rng, site.anatomies[y], site.image_size, site.region, site.packages) for y in labels]
        )
    else:
        mu = np.stack([draw_phantom(rng, site.anatomies[y], site.image_size) for y in labels])
    generator = torch_generator(site.seed, "ct", "noise", *site.stream)
    return simulate(mu, labels, site.acquisition, site.reference_sigma, site.filter, generator)


# ----------------------------------------------------------------------------- folder data


def _load_ct_slices(folder: str | Path) -> list[np.ndarray]:
    """All slices in HU from a folder of ``.npy`` / ``.dcm`` files (also NIfTI), sorted by file name.

    DICOM values are ``RescaleSlope · stored + RescaleIntercept`` (:func:`medtasks.io.read_array`);
    NumPy files must already hold HU. A 3D file gives one slice per index of its last axis.

    Raises:
        DataError: missing folder, no slice files, or an unreadable file.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"CT data folder {root} does not exist or is not a directory")
    files = [
        p for p in sorted(root.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(io.EXTENSIONS)
    ]
    if not files:
        raise DataError(f"no CT slices ({', '.join(io.EXTENSIONS)}) in {root}")
    slices: list[np.ndarray] = []
    for path in files:
        array = io.read_array(path)
        slices.extend([array] if array.ndim == 2 else [array[..., k] for k in range(array.shape[-1])])
    return slices


def slice_to_mu(hu: np.ndarray, image_size: int) -> np.ndarray:
    """One HU slice as ``μ`` (float32 ``[N, N]``, 1/cm) inside the scanner's field of view.

    ``μ = μ_water (1 + max(h, −1000) / 1000)``, padded with air to a square, resampled bilinearly to
    ``N × N`` and zeroed outside the inscribed circle (the region every projection sees).
    """
    mu = realdata.hu_to_mu(hu)
    side = max(mu.shape)
    pad = [((side - s) // 2, (side - s + 1) // 2) for s in mu.shape]
    mu = np.pad(mu, pad, constant_values=0.0)
    if side != image_size:
        mu = ndimage.zoom(mu, image_size / side, order=1, grid_mode=True, mode="nearest")
    return np.clip(mu * realdata.field_of_view_disk(image_size), 0.0, None).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _folder_pool(path: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All slices of ``path`` as ``μ [n, N, N]`` and their labels ``[n]`` (cached per process)."""
    mu = np.stack([slice_to_mu(hu, image_size) for hu in _load_ct_slices(path)])
    return mu, np.array([anatomy_label(m) for m in mu], dtype=np.int64)


@dataclass(frozen=True)
class _FolderSite:
    """Everything that determines a folder site's samples (hashable: the cache key)."""

    path: str
    image_size: int
    indices: tuple[int, ...]
    acquisition: Acquisition
    reference_sigma: float
    filter: FilterName
    seed: int
    partition_id: int


@functools.lru_cache(maxsize=16)
def _folder_samples(site: _FolderSite) -> Samples:
    """A folder site's slices measured by its scanner (cached per process)."""
    mu, labels = _folder_pool(site.path, site.image_size)
    rows = np.asarray(site.indices, dtype=np.int64)
    generator = torch_generator(site.seed, "ct", "noise", "site", site.partition_id)
    return simulate(mu[rows], labels[rows], site.acquisition, site.reference_sigma, site.filter, generator)


# ----------------------------------------------------------------------------- the task


def _batch_operator(geometry: Tensor, image_size: int) -> RadonOperator:
    """The operator of a batch whose rows all hold the same ``(views, angular_range)``, ``[B, 2]``."""
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

    def __init__(self, ctx: TaskContext) -> None:
        params = checked_params(type(self), ctx)
        if ctx.data.source not in ("synthetic", "folder"):
            raise ValueError(f"unknown data.source {ctx.data.source!r} for ct; use synthetic or folder")
        if ctx.data.source == "folder" and not ctx.data.path:
            raise DataError("data.source 'folder' needs data.path")
        self.ctx = ctx
        self.params: CTParams = params
        self.model_name: str = ctx.model or self.models[0]
        self.label_names = anatomy_names(params) if ctx.data.source == "synthetic" else FOLDER_LABELS
        if ctx.data.source == "synthetic" and params.phantom == "packaged":
            realdata.load_slices(params.slice_packages)  # a missing package fails here, in one line
        #: Site profiles of synthetic data (``None`` for folder data, whose sites are index splits).
        self.profiles: list[SiteProfile] | None = None
        if ctx.data.source == "synthetic":
            self.profiles = self._draw_profiles(ctx.data.samples_per_client, [1.0] * len(self.label_names))

    def _draw_profiles(self, samples_per_client: int, label_prior: list[float]) -> list[SiteProfile]:
        """Site profiles of the scenario's partition over this task's acquisition / annotator spaces."""
        part = self.ctx.partition
        return draw_site_profiles(
            part.kind,
            part.params,
            num_clients=part.clients,
            samples_per_client=samples_per_client,
            label_prior=label_prior,
            acquisition_space=ACQUISITION_SPACE,
            annotator_space=ANNOTATOR_SPACE,
            seed=self.ctx.seed,
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
            samples = _synthetic_samples(self._site(("site", partition_id), profile))
            info = {"label_distribution": list(profile.label_distribution)}
            return self._split(samples, profile.acquisition, profile.annotator, info, partition_id)
        return self._folder_site(partition_id)

    def server_data(self) -> Dataset | None:
        """Central test set (synthetic source with ``server_samples > 0``): neutral scanner and reference."""
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
        samples = _synthetic_samples(self._site(("server",), neutral, region="test"))
        return samples.dataset(slice(None))

    def _site(
        self, stream: tuple[str | int, ...], profile: SiteProfile, region: realdata.Region = "train"
    ) -> _SyntheticSite:
        """The cache key of a synthetic site drawn from ``numpy_rng(seed, "ct", *stream)``.

        ``region`` says which part of the real slices the patches of ``phantom: packaged`` come from.
        """
        p = self.params
        packaged = p.phantom == "packaged"
        return _SyntheticSite(
            seed=self.ctx.seed,
            stream=stream,
            n_samples=profile.n_samples,
            image_size=p.image_size,
            anatomies=self.label_names,
            label_distribution=profile.label_distribution,
            acquisition=Acquisition.of_site(p, profile.acquisition),
            reference_sigma=float(profile.annotator["reference_smoothing"]),
            filter=p.filter,
            packages=tuple(p.slice_packages) if packaged else (),
            region=region,
        )

    def _folder_site(self, partition_id: int) -> ClientData:
        """Site ``partition_id``'s share of the folder pool, measured by its scanner."""
        p, part, seed = self.params, self.ctx.partition, self.ctx.seed
        mu, labels = _folder_pool(str(Path(self.ctx.data.path or "").resolve()), p.image_size)
        try:
            parts = split_indices(labels, part.kind, part.params, num_clients=part.clients, seed=seed)
        except ValueError as error:
            raise DataError(f"cannot split the {len(labels)} slices of {self.ctx.data.path}: {error}") from None
        indices = numpy_rng(seed, "ct", "site", partition_id).permutation(parts[partition_id])
        if part.kind in ("feature_skew", "concept_shift"):
            profile = self._draw_profiles(max(1, len(labels) // part.clients), label_histogram(labels, 2))
            acquisition, annotator = profile[partition_id].acquisition, profile[partition_id].annotator
        else:
            acquisition, annotator = neutral_values(ACQUISITION_SPACE), neutral_values(ANNOTATOR_SPACE)
        site = _FolderSite(
            path=str(Path(self.ctx.data.path or "").resolve()),
            image_size=p.image_size,
            indices=tuple(int(i) for i in indices),
            acquisition=Acquisition.of_site(p, acquisition),
            reference_sigma=float(annotator["reference_smoothing"]),
            filter=p.filter,
            seed=seed,
            partition_id=partition_id,
        )
        samples = _folder_samples(site)
        share = float(labels[indices].mean()) if len(indices) else 0.0
        info = {"label_distribution": [1.0 - share, share]}
        return self._split(samples, acquisition, annotator, info, partition_id)

    def _split(
        self,
        samples: Samples,
        acquisition: Mapping[str, float],
        annotator: Mapping[str, float],
        info: dict[str, Any],
        partition_id: int,
    ) -> ClientData:
        """Hold out the last ``max(1, round(val_fraction · n))`` slices and describe the site."""
        n = len(samples.labels)
        n_val = max(1, int(round(self.ctx.data.val_fraction * n)))
        if n - n_val < 1:
            raise DataError(f"site {partition_id} has {n} slices; it needs at least 2 (one to train, one to validate)")
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

    def plot_examples(self, model: nn.Module, dataset: Dataset, path: Path) -> None:
        """Save a PNG: one row per slice (up to 4): ground truth | FBP | network | |error| (HU)."""
        rows = min(PLOT_ROWS, len(dataset))
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
        _plot_reconstructions(target[:, 0], fbp[:, 0], prediction[:, 0], Path(path))


def _plot_reconstructions(target: Tensor, fbp: Tensor, prediction: Tensor, path: Path) -> None:
    """Write rows of ground truth | FBP | network | |network − truth| to ``path``.

    Args:
        target: ``[R, N, N]`` normalised references.
        fbp: ``[R, N, N]`` normalised FBPs.
        prediction: ``[R, N, N]`` normalised network outputs.
        path: PNG file to write (parent folders are created).
    """
    from matplotlib.figure import Figure

    psnr_fbp = psnr(fbp, target, DATA_RANGE)
    psnr_net = psnr(prediction, target, DATA_RANGE)
    error_hu = (prediction - target).abs() * (1000.0 / NORMALISED_MU_WATER)  # |Δh| = 2000 |Δx|
    vmin, vmax = PLOT_WINDOW
    figure = Figure(figsize=(10, 2.5 * len(target)))
    axes = figure.subplots(len(target), 4, squeeze=False)
    for row in range(len(target)):
        panels = (
            (target[row], "ground truth", {"cmap": "gray", "vmin": vmin, "vmax": vmax}),
            (fbp[row], f"FBP ({float(psnr_fbp[row]):.1f} dB)", {"cmap": "gray", "vmin": vmin, "vmax": vmax}),
            (prediction[row], f"network ({float(psnr_net[row]):.1f} dB)", {"cmap": "gray", "vmin": vmin, "vmax": vmax}),
            (error_hu[row], "|error| (HU, 0–200)", {"cmap": "magma", "vmin": 0.0, "vmax": 200.0}),
        )
        for ax, (image, title, style) in zip(axes[row], panels):
            ax.imshow(image.numpy(), **style)
            ax.set_title(title, fontsize=9)
            ax.set_axis_off()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
