"""Each site's scanner and reference, and what they make of a site's slices.

A site ``k`` differs from the neutral scanner of :class:`~medtasks.ct.params.CTParams` by the
values its :class:`~medtasks.partition.SiteProfile` draws (:func:`draw_profiles`):

* ``feature_skew``: :data:`ACQUISITION_SPACE` (number of views, dose, detector blur, angular
  coverage) gives the site's :class:`Acquisition`;
* ``concept_shift``: :data:`ANNOTATOR_SPACE` gives the width of the Gaussian that smooths the
  site's reference (:func:`reference_image`): what the site calls ground truth is the image
  regularised its own way.

:func:`simulate` measures slices with a scanner and returns them, with their references, as
:class:`Samples` on the normalised scale ``x = μ / (2 μ_water)`` (:data:`IMAGE_SCALE`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torch.utils.data import TensorDataset

from medtasks.base import PartitionSpec
from medtasks.ct.operator import FilterName, Geometry, get_operator
from medtasks.ct.params import MIN_VIEWS, CTParams
from medtasks.ct.physics import MU_WATER, noisy_measurement
from medtasks.partition import ParamRange, SiteProfile, draw_site_profiles

__all__ = [
    "ACQUISITION_SPACE",
    "ANNOTATOR_SPACE",
    "DATA_RANGE",
    "IMAGE_SCALE",
    "NORMALISED_MU_WATER",
    "Acquisition",
    "Samples",
    "draw_profiles",
    "reference_image",
    "simulate",
]

IMAGE_SCALE: float = 2.0 * MU_WATER
"""Images and sinograms are divided by ``2 μ_water``: HU ``[−1000, 1000]`` ↦ ``[0, 1]``."""
DATA_RANGE: float = 1.0
"""Data range ``R`` of every PSNR / SSIM on the normalised scale."""
NORMALISED_MU_WATER: float = MU_WATER / IMAGE_SCALE
"""Water on the normalised scale (0.5), for :func:`~medtasks.ct.metrics.rmse_hu`."""

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


def draw_profiles(
    partition: PartitionSpec, *, samples_per_client: int, label_prior: Sequence[float], seed: int
) -> list[SiteProfile]:
    """Site profiles of ``partition`` over :data:`ACQUISITION_SPACE` and :data:`ANNOTATOR_SPACE`.

    Parameters
    ----------
    partition : PartitionSpec
        The scenario's partition (kind, its parameters, number of sites).
    samples_per_client : int
        Mean number of slices per site.
    label_prior : Sequence[float]
        ``P(a)`` over the anatomy labels, which label skew departs from.
    seed : int
        The scenario seed.

    Returns
    -------
    list[SiteProfile]
        One profile per site (:func:`medtasks.partition.draw_site_profiles`).
    """
    return draw_site_profiles(
        partition.kind,
        partition.params,
        num_clients=partition.clients,
        samples_per_client=samples_per_client,
        label_prior=label_prior,
        acquisition_space=ACQUISITION_SPACE,
        annotator_space=ANNOTATOR_SPACE,
        seed=seed,
    )


@dataclass(frozen=True)
class Acquisition:
    """One site's scanner.

    Attributes
    ----------
    num_views : int
        Projections ``A``, evenly spaced over ``[0, angular_range)``.
    angular_range : float
        Degrees covered.
    dose_i0 : float
        Unattenuated photons per bin.
    detector_blur : float
        Gaussian blur along the detector, bins.
    """

    num_views: int
    angular_range: float
    dose_i0: float
    detector_blur: float

    @classmethod
    def of_site(cls, params: CTParams, values: Mapping[str, float]) -> Acquisition:
        """The scanner of a site with drawn :data:`ACQUISITION_SPACE` ``values``.

        ``A_k = max(4, round(s_k · A))``, ``range_k = c_k · range``, ``I0_k = I0 · 10^{d_k}``,
        ``σ_k = σ + b_k`` for views scale ``s``, coverage ``c``, dose offset ``d`` and blur ``b``.
        """
        return cls(
            num_views=max(MIN_VIEWS, round(params.num_views * values["views_scale"])),
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

    Parameters
    ----------
    mu : np.ndarray
        Slices ``[n, N, N]``.
    sigma : float
        The site's ``reference_smoothing``.

    Returns
    -------
    np.ndarray
        The references ``[n, N, N]`` (``mu`` itself when ``sigma`` is 0).
    """
    return ndimage.gaussian_filter(mu, sigma=(0.0, sigma, sigma)) if sigma > 0 else mu


@dataclass(frozen=True)
class Samples:
    """One site's simulated slices, normalised by :data:`IMAGE_SCALE`.

    Attributes
    ----------
    fbp : Tensor
        ``[n, 1, N, N]`` float32.
    sinogram : Tensor
        ``[n, 1, A, N]`` float32, noisy.
    target : Tensor
        ``[n, 1, N, N]`` float32, the site's reference.
    labels : np.ndarray
        ``[n]`` int64 anatomy labels.
    acquisition : Acquisition
        The scanner that measured them.
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

    Parameters
    ----------
    mu : np.ndarray
        Phantoms ``[n, N, N]`` in 1/cm.
    labels : np.ndarray
        Anatomy labels ``[n]``.
    acquisition : Acquisition
        The site's scanner.
    reference_sigma : float
        The site's reference smoothing, pixels.
    filter : FilterName
        FBP filter window.
    generator : torch.Generator
        Torch generator of the photon noise.

    Returns
    -------
    Samples
        The measured slices and their references, normalised.
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
