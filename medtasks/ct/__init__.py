"""CT physics layer: a sparse parallel-beam Radon operator (``A``, exact ``Aᵀ``, FBP), the measurement
model (Beer–Lambert, Poisson noise, detector blur, HU), and analytic phantoms.

Units: images hold μ in 1/cm (water = :data:`MU_WATER` = 0.2 /cm). Sinograms are ``A μ`` with a
step of one pixel. The physical line integral is ``Δ · A μ`` with pixel size ``Δ = 25.6 cm / N``
(see :mod:`medtasks.ct.physics`).

On top of it: image-quality metrics (:mod:`.metrics`), reconstruction networks (:mod:`.models`),
real CT slices that installed packages ship (:mod:`.realdata`) and the federated task
(:mod:`.task`, registered as ``"ct"``) with its parameters (:mod:`.params`), per-site scanners
(:mod:`.scanner`), anatomy labels (:mod:`.anatomy`), data sources (:mod:`.synthetic`,
:mod:`.folder`) and pictures (:mod:`.plots`).
"""

from medtasks.ct.metrics import psnr, rmse_hu, ssim
from medtasks.ct.models import FBPConvNet, ProximalCNN, UnrolledProximalGradient
from medtasks.ct.operator import (
    FilterName,
    Geometry,
    RadonOperator,
    fourier_filter,
    get_operator,
    ramp_filter,
)
from medtasks.ct.params import CTParams
from medtasks.ct.phantoms import (
    random_ellipses,
    rasterize_ellipses,
    shepp_logan,
    shepp_logan_mu,
    torso_phantom,
)
from medtasks.ct.physics import (
    FIELD_OF_VIEW_CM,
    MU_WATER,
    detector_blur,
    from_hu,
    noisy_measurement,
    pixel_size_cm,
    to_hu,
    transmission,
)
from medtasks.ct.task import CTReconstructionTask

__all__ = [
    "FIELD_OF_VIEW_CM",
    "MU_WATER",
    "CTParams",
    "CTReconstructionTask",
    "FBPConvNet",
    "FilterName",
    "Geometry",
    "ProximalCNN",
    "RadonOperator",
    "UnrolledProximalGradient",
    "detector_blur",
    "fourier_filter",
    "from_hu",
    "get_operator",
    "noisy_measurement",
    "pixel_size_cm",
    "psnr",
    "ramp_filter",
    "random_ellipses",
    "rasterize_ellipses",
    "rmse_hu",
    "shepp_logan",
    "shepp_logan_mu",
    "ssim",
    "to_hu",
    "torso_phantom",
    "transmission",
]
