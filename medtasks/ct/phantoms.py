"""Analytic CT phantoms: Shepp–Logan and random ellipse / torso-like slices (numpy, no scikit-image needed).

Phantoms are sums or overlays of ellipses defined in normalised coordinates ``[−1, 1]²``, with ``x``
to the right (columns) and ``y`` up (row 0 at the top). They are rasterised with ``supersample²``
sub-pixel samples per pixel, which approximates the area average and limits edge aliasing.
Everything stays inside the reconstruction circle of the Radon operator.

Units:

* :func:`shepp_logan` with ``modified=True``: the contrast-enhanced (Toft) table, values in
  ``[0, 1]``. This is the image of ``skimage.data.shepp_logan_phantom``, a display/benchmark image
  without physical units.
* :func:`shepp_logan` with ``modified=False``: the original Shepp & Logan (1974) table. Its values
  are attenuation relative to water (skull 2.0, brain 1.02, ventricles 1.0, so water = 1 and air = 0).
* :func:`shepp_logan_mu`, :func:`random_ellipses` and :func:`torso_phantom`: linear attenuation
  ``μ`` in 1/cm with water = ``mu_water`` (default :data:`~medtasks.ct.physics.MU_WATER` = 0.2 /cm).
  Pass ``mu_water=1.0`` for images normalised to water. Tissue values are set in Hounsfield units
  through ``μ = μ_water (1 + HU/1000)``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from medtasks.ct.physics import MU_WATER

__all__ = ["random_ellipses", "rasterize_ellipses", "shepp_logan", "shepp_logan_mu", "torso_phantom"]

# Columns: semi-axis a, semi-axis b, centre x0, centre y0, rotation φ (degrees, counter-clockwise).
_SHEPP_LOGAN_GEOMETRY = np.array(
    [
        [0.6900, 0.9200, 0.00, 0.0000, 0.0],
        [0.6624, 0.8740, 0.00, -0.0184, 0.0],
        [0.1100, 0.3100, 0.22, 0.0000, -18.0],
        [0.1600, 0.4100, -0.22, 0.0000, 18.0],
        [0.2100, 0.2500, 0.00, 0.3500, 0.0],
        [0.0460, 0.0460, 0.00, 0.1000, 0.0],
        [0.0460, 0.0460, 0.00, -0.1000, 0.0],
        [0.0460, 0.0230, -0.08, -0.6050, 0.0],
        [0.0230, 0.0230, 0.00, -0.6060, 0.0],
        [0.0230, 0.0460, 0.06, -0.6050, 0.0],
    ]
)
_SHEPP_LOGAN_ORIGINAL = np.array([2.0, -0.98, -0.02, -0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01])
_SHEPP_LOGAN_MODIFIED = np.array([1.0, -0.8, -0.2, -0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])


def rasterize_ellipses(
    ellipses: np.ndarray,
    n: int,
    *,
    mode: Literal["add", "paint"] = "add",
    supersample: int = 4,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Rasterises ellipses on an ``n × n`` grid covering ``[−1, 1]²``.

    A point is inside ellipse ``(v, a, b, x0, y0, φ)`` when
    ``((x' cosφ + y' sinφ)/a)² + ((−x' sinφ + y' cosφ)/b)² ≤ 1``, with ``x' = x − x0`` and ``y' = y − y0``.

    Parameters
    ----------
    ellipses : np.ndarray
        ``[K, 6]`` rows ``(value, a, b, x0, y0, φ_deg)`` in normalised coordinates.
    n : int
        Output size ``N``.
    mode : {"add", "paint"}, optional
        ``"add"`` sums the values of overlapping ellipses (Shepp–Logan style). ``"paint"``
        lets later ellipses overwrite earlier ones, so each region has its own value.
    supersample : int, optional
        Sub-samples per pixel along each axis. The output is their mean.
    dtype : np.dtype | type, optional
        Output dtype.

    Returns
    -------
    np.ndarray
        Image ``[N, N]``.
    """
    ellipses = np.asarray(ellipses, dtype=np.float64).reshape(-1, 6)
    m = n * supersample
    coord = (np.arange(m) + 0.5) / m * 2.0 - 1.0
    x, y = coord[None, :], -coord[:, None]  # columns go right, rows go down (y up)
    fine = np.zeros((m, m))
    for value, a, b, x0, y0, phi in ellipses:
        cos, sin = np.cos(np.deg2rad(phi)), np.sin(np.deg2rad(phi))
        dx, dy = x - x0, y - y0
        inside = ((dx * cos + dy * sin) / a) ** 2 + ((-dx * sin + dy * cos) / b) ** 2 <= 1.0
        if mode == "add":
            fine += value * inside
        elif mode == "paint":
            fine[inside] = value
        else:
            raise ValueError(f"mode must be 'add' or 'paint', got {mode!r}")
    return fine.reshape(n, supersample, n, supersample).mean(axis=(1, 3)).astype(dtype)


def shepp_logan(
    n: int, *, modified: bool = True, supersample: int = 4, dtype: np.dtype | type = np.float32
) -> np.ndarray:
    """Returns the Shepp–Logan head phantom ``[N, N]``.

    Parameters
    ----------
    n : int
        Image size ``N``.
    modified : bool, optional
        True gives the contrast-enhanced table in ``[0, 1]`` (scikit-image's phantom).
        False gives the original table in units of water (``μ/μ_water``).
    supersample : int, optional
        Sub-samples per pixel along each axis.
    dtype : np.dtype | type, optional
        Output dtype.
    """
    values = _SHEPP_LOGAN_MODIFIED if modified else _SHEPP_LOGAN_ORIGINAL
    table = np.column_stack([values, _SHEPP_LOGAN_GEOMETRY])
    return rasterize_ellipses(table, n, mode="add", supersample=supersample, dtype=dtype)


def shepp_logan_mu(n: int, mu_water: float = MU_WATER, *, supersample: int = 4) -> np.ndarray:
    """Returns the original Shepp–Logan phantom as ``μ`` (float32 ``[N, N]``), in the units of ``mu_water``.

    The skull is +1000 HU and the brain +20 HU.
    """
    relative = shepp_logan(n, modified=False, supersample=supersample, dtype=np.float64)
    return (mu_water * relative).astype(np.float32)


def _hu_to_mu(hu: float, mu_water: float) -> float:
    """Returns ``μ = μ_water (1 + HU/1000)``, clipped at 0."""
    return max(0.0, mu_water * (1.0 + hu / 1000.0))


def _random_inner_ellipses(
    rng: np.random.Generator, count: int, body: tuple[float, float, float], size_range: tuple[float, float]
) -> np.ndarray:
    """Draws ``count`` ellipses that lie inside the centred body ellipse ``(a, b, φ)``.

    Returns ``[count, 5]`` rows ``(a, b, x0, y0, φ)``. A centre lies at most 0.6 of the way to the
    body's edge, and a semi-axis is at most ``size_range[1] ≤ 0.4`` of the body's shorter
    semi-axis, so every ellipse stays inside the body.
    """
    a_body, b_body, phi_body = body
    short = min(a_body, b_body)
    radius = 0.6 * np.sqrt(rng.uniform(0.0, 1.0, count))
    angle = rng.uniform(0.0, 2 * np.pi, count)
    u, v = a_body * radius * np.cos(angle), b_body * radius * np.sin(angle)
    cos, sin = np.cos(np.deg2rad(phi_body)), np.sin(np.deg2rad(phi_body))
    x0, y0 = u * cos - v * sin, u * sin + v * cos
    axes = short * rng.uniform(*size_range, (count, 2))
    phi = rng.uniform(0.0, 180.0, count)
    return np.column_stack([axes, x0, y0, phi])


def random_ellipses(
    n: int,
    rng: np.random.Generator,
    *,
    num_ellipses: tuple[int, int] = (4, 10),
    hu_range: tuple[float, float] = (-300.0, 1000.0),
    mu_water: float = MU_WATER,
    supersample: int = 2,
) -> np.ndarray:
    """Returns a random ellipse phantom ``μ`` (float32 ``[N, N]``): a water-like body with painted inclusions.

    The body is a rotated ellipse with semi-axes in ``[0.6, 0.9]`` and HU in ``[−50, 50]``.
    Between ``num_ellipses[0]`` and ``num_ellipses[1]`` inclusions (inclusive), with HU drawn
    uniformly from ``hu_range``, are painted inside it.

    Parameters
    ----------
    n : int
        Image size ``N``.
    rng : np.random.Generator
        The numpy generator that all randomness comes from.
    num_ellipses : tuple[int, int], optional
        Inclusive range for the number of inclusions.
    hu_range : tuple[float, float], optional
        Inclusion values in HU.
    mu_water : float, optional
        Water's ``μ``. This sets the output units (0.2 means 1/cm, 1.0 means normalised).
    supersample : int, optional
        Sub-samples per pixel along each axis.
    """
    a, b = rng.uniform(0.6, 0.9, 2)
    phi = rng.uniform(0.0, 180.0)
    body = np.array([[_hu_to_mu(rng.uniform(-50.0, 50.0), mu_water), a, b, 0.0, 0.0, phi]])
    count = int(rng.integers(num_ellipses[0], num_ellipses[1] + 1))
    shapes = _random_inner_ellipses(rng, count, (a, b, phi), (0.05, 0.35))
    values = [_hu_to_mu(h, mu_water) for h in rng.uniform(*hu_range, count)]
    table = np.vstack([body, np.column_stack([values, shapes])])
    return rasterize_ellipses(table, n, mode="paint", supersample=supersample)


def torso_phantom(
    n: int, rng: np.random.Generator, *, mu_water: float = MU_WATER, supersample: int = 2
) -> np.ndarray:
    """Returns a random thorax- or abdomen-like axial slice ``μ`` (float32 ``[N, N]``) in the units of ``mu_water``.

    The regions are painted in this order:

    * a wide body ellipse of subcutaneous fat (−100 HU) around soft tissue (+40 HU);
    * either two lungs (−850 ± 50 HU) with a heart (+40 HU) between them, or a liver (+60 HU),
      two kidneys (+30 HU) and small bowel-gas pockets (−950 HU);
    * a vertebra (cortical ring of +1000 HU around +300 HU bone) near the back;
    * 1–3 low-contrast lesions (soft tissue ± 20–80 HU), the targets a reconstruction must keep.

    Parameters
    ----------
    n : int
        Image size ``N``.
    rng : np.random.Generator
        The numpy generator that all randomness comes from.
    mu_water : float, optional
        Water's ``μ``. This sets the output units (0.2 means 1/cm, 1.0 means normalised).
    supersample : int, optional
        Sub-samples per pixel along each axis.
    """
    rows: list[tuple[float, ...]] = []

    def add(hu: float, a: float, b: float, x0: float, y0: float, phi: float = 0.0) -> None:
        rows.append((_hu_to_mu(hu, mu_water), a, b, x0, y0, phi))

    a, b = rng.uniform(0.78, 0.9), rng.uniform(0.55, 0.72)
    tilt = rng.uniform(-8.0, 8.0)
    fat = rng.uniform(0.03, 0.08)
    add(-100.0, a, b, 0.0, 0.0, tilt)
    add(40.0, a - fat, b - fat, 0.0, 0.0, tilt)
    if rng.random() < 0.5:  # thorax
        for side in (-1.0, 1.0):  # lungs
            axes = (rng.uniform(0.25, 0.32), rng.uniform(0.32, 0.42) * b / 0.65)
            centre = (side * rng.uniform(0.33, 0.4) * a / 0.85, rng.uniform(0.0, 0.1))
            add(rng.normal(-850.0, 50.0), *axes, *centre, side * rng.uniform(0.0, 15.0))
        heart = (rng.uniform(0.17, 0.22), rng.uniform(0.14, 0.19), rng.uniform(0.0, 0.1), rng.uniform(0.05, 0.15))
        add(40.0, *heart, 30.0)
    else:  # abdomen
        liver = (rng.uniform(0.3, 0.38), rng.uniform(0.25, 0.32), -0.3 * a / 0.85, rng.uniform(0.0, 0.12))
        add(60.0, *liver, rng.uniform(-20, 20))
        for side in (-1.0, 1.0):
            add(30.0, 0.08, 0.12, side * 0.28, -0.32 * b / 0.65, side * 20.0)
        for _ in range(int(rng.integers(1, 4))):
            size = rng.uniform(0.03, 0.07)
            centre = (rng.uniform(0.05, 0.35), rng.uniform(-0.1, 0.25))
            add(-950.0, size, size * rng.uniform(0.6, 1.0), *centre, rng.uniform(0, 180))
    spine_y = -(b - fat) + rng.uniform(0.17, 0.22)
    add(1000.0, 0.11, 0.1, 0.0, spine_y)
    add(300.0, 0.08, 0.07, 0.0, spine_y)
    body = (a - fat, b - fat, tilt)
    for shape in _random_inner_ellipses(rng, int(rng.integers(1, 4)), body, (0.04, 0.1)):
        hu = 40.0 + rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 80.0)
        rows.append((_hu_to_mu(hu, mu_water), *shape))
    return rasterize_ellipses(np.array(rows), n, mode="paint", supersample=supersample)
