"""CT physics layer: a sparse parallel-beam Radon operator (``A``, exact ``Aᵀ``, FBP), the measurement
model (Beer–Lambert, Poisson noise, detector blur, HU), and analytic phantoms.

Units: images hold μ in 1/cm (water = :data:`MU_WATER` = 0.2 /cm). Sinograms are ``A μ`` with a
step of one pixel. The physical line integral is ``Δ · A μ`` with pixel size ``Δ = 25.6 cm / N``
(see :mod:`medtasks.ct.physics`).
"""

from medtasks.ct.operator import (
    FilterName,
    Geometry,
    RadonOperator,
    fourier_filter,
    get_operator,
    ramp_filter,
)
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

__all__ = [
    "FIELD_OF_VIEW_CM",
    "MU_WATER",
    "FilterName",
    "Geometry",
    "RadonOperator",
    "detector_blur",
    "fourier_filter",
    "from_hu",
    "get_operator",
    "noisy_measurement",
    "pixel_size_cm",
    "ramp_filter",
    "random_ellipses",
    "rasterize_ellipses",
    "shepp_logan",
    "shepp_logan_mu",
    "to_hu",
    "torso_phantom",
    "transmission",
]
