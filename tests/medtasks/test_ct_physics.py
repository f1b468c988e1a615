"""CT physics layer: Radon operator (adjointness, autograd, agreement with scikit-image), FBP, noise model, HU, phantoms."""

from __future__ import annotations

import copy
import math
import pickle

import numpy as np
import pytest
import torch

from medtasks.ct import (
    MU_WATER,
    Geometry,
    detector_blur,
    from_hu,
    get_operator,
    noisy_measurement,
    pixel_size_cm,
    random_ellipses,
    shepp_logan,
    shepp_logan_mu,
    to_hu,
    torso_phantom,
    transmission,
)
from tests.helpers import single_torch_thread

# One thread, like a federated worker given one core: gradcheck's thousands of tiny sparse matmuls
# would each wait for a second MKL thread on a busy 2-core machine.
_one_thread = pytest.fixture(autouse=True, scope="module")(single_torch_thread)


def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() * b.double()).sum())


def _psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB with data range 1."""
    return float(10 * np.log10(1.0 / np.mean((image - reference) ** 2)))


def _disk(n: int, radius: float) -> torch.Tensor:
    offset = torch.arange(n) - n // 2
    return offset[:, None] ** 2 + offset[None, :] ** 2 <= radius**2


# ----------------------------------------------------------------------------- operator algebra


@pytest.mark.parametrize("n", [32, 64])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_adjoint_is_exact_transpose(n: int, dtype: torch.dtype, tol: float) -> None:
    op = get_operator(Geometry.sparse_view(n, 45))
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(2, 1, n, n, generator=gen, dtype=dtype)
    y = torch.randn(2, 1, 45, n, generator=gen, dtype=dtype)
    ax, aty = op(x), op.adjoint(y)
    assert ax.dtype == dtype and aty.dtype == dtype
    error = abs(_inner(ax, y) - _inner(x, aty)) / (ax.double().norm() * y.double().norm())
    assert error < tol


def test_autograd_backward_of_forward_is_adjoint_and_vice_versa() -> None:
    op = get_operator(Geometry.sparse_view(32, 20))
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 32, 32, generator=gen, requires_grad=True)
    y = torch.randn(3, 2, 20, 32, generator=gen, requires_grad=True)
    (grad_x,) = torch.autograd.grad(_inner_t(op(x), y.detach()), x)
    torch.testing.assert_close(grad_x, op.adjoint(y.detach()), rtol=0, atol=0)
    (grad_y,) = torch.autograd.grad(_inner_t(x.detach(), op.adjoint(y)), y)
    torch.testing.assert_close(grad_y, op(x.detach()), rtol=0, atol=0)


def _inner_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum()


@pytest.mark.parametrize("method", ["forward", "adjoint", "fbp", "backproject"])
def test_gradcheck_float64(method: str) -> None:
    op = get_operator(Geometry.sparse_view(16, 8))
    shape = (1, 1, 16, 16) if method == "forward" else (1, 1, 8, 16)
    z = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    assert torch.autograd.gradcheck(getattr(op, method), (z,), eps=1e-6, atol=1e-6)
    if method in ("forward", "adjoint"):
        assert torch.autograd.gradgradcheck(getattr(op, method), (z,), eps=1e-6, atol=1e-6)


def test_leading_dims_dtypes_and_shape_checks() -> None:
    op = get_operator(Geometry.sparse_view(32, 20))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    batched = op(x)
    assert batched.shape == (2, 3, 20, 32)
    torch.testing.assert_close(batched[1, 2], op(x[1, 2]))  # a bare [N, N] image works too
    torch.testing.assert_close(op(x.double()), batched.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(op.normal(x), op.adjoint(op(x)))
    assert op.fbp(batched).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError):
        op(torch.zeros(1, 1, 31, 31))
    with pytest.raises(ValueError):
        op.adjoint(torch.zeros(1, 1, 32, 20))


def test_get_operator_is_cached_per_geometry() -> None:
    a = get_operator(Geometry.sparse_view(24, 10))
    b = get_operator(Geometry(24, tuple(18.0 * k for k in range(10))))
    assert a is b
    assert get_operator(Geometry.sparse_view(24, 11)) is not a
    assert get_operator(Geometry.sparse_view(24, 10, angular_range=360.0)) is not a
    # Copies (deepcopy of a model holding it, pickling to a worker) resolve to the cached operator.
    assert copy.deepcopy(a) is a
    assert pickle.loads(pickle.dumps(a)) is a


def test_sparse_view_angles() -> None:
    g = Geometry.sparse_view(32, 4, angular_range=360.0)
    assert g.angles_deg == (0.0, 90.0, 180.0, 270.0)
    assert g.sinogram_shape == (4, 32) and g.center == 16


def test_operator_norm_matches_largest_singular_value() -> None:
    n, views = 16, 12
    op = get_operator(Geometry.sparse_view(n, views))
    basis = torch.eye(n * n, dtype=torch.float64).reshape(n * n, n, n)
    dense = op(basis).reshape(n * n, views * n).T  # column k = A e_k
    true_norm = float(torch.linalg.matrix_norm(dense, ord=2))
    assert op.operator_norm(30) == pytest.approx(true_norm, rel=1e-4)
    assert op.operator_norm(30) <= true_norm * (1 + 1e-9)  # a Rayleigh quotient never overshoots


# ----------------------------------------------------------------------------- agreement with scikit-image


def test_forward_matches_skimage_radon() -> None:
    transform = pytest.importorskip("skimage.transform")
    image = shepp_logan(64, dtype=np.float64)
    geometry = Geometry.sparse_view(64, 60)
    reference = transform.radon(image, np.array(geometry.angles_deg), circle=True).T  # skimage: [N, A]
    sinogram = get_operator(geometry)(torch.tensor(image, dtype=torch.float32)).double().numpy()
    assert np.linalg.norm(sinogram - reference) / np.linalg.norm(reference) < 1e-5


@pytest.fixture(scope="module")
def fbp_psnr() -> dict[int, tuple[float, float]]:
    """Returns ``{views: (our PSNR, skimage PSNR)}`` for the ramp FBP of skimage's Shepp–Logan resized to 128²."""
    data = pytest.importorskip("skimage.data")
    transform = pytest.importorskip("skimage.transform")
    phantom = transform.resize(data.shepp_logan_phantom(), (128, 128), anti_aliasing=True)
    result = {}
    for views in (30, 60, 180):
        geometry = Geometry.sparse_view(128, views)
        theta = np.array(geometry.angles_deg)
        sinogram = transform.radon(phantom, theta, circle=True)
        reference = transform.iradon(sinogram, theta, filter_name="ramp", circle=True)
        op = get_operator(geometry)
        ours = op.fbp(op(torch.tensor(phantom, dtype=torch.float32)), filter="ram-lak").numpy()
        result[views] = (_psnr(ours, phantom), _psnr(reference, phantom))
    return result


@pytest.mark.parametrize("views", [60, 180])
def test_fbp_psnr_matches_skimage(fbp_psnr: dict[int, tuple[float, float]], views: int) -> None:
    ours, reference = fbp_psnr[views]
    assert abs(ours - reference) < 0.5
    assert ours > 28.0  # skimage: 29.3 dB (60 views), 30.0 dB (180 views)


def test_more_views_give_better_fbp(fbp_psnr: dict[int, tuple[float, float]]) -> None:
    assert fbp_psnr[30][0] < fbp_psnr[60][0] < fbp_psnr[180][0]


@pytest.mark.parametrize("ours, theirs", [("ram-lak", "ramp"), ("shepp-logan", "shepp-logan"), ("cosine", "cosine")])
def test_fbp_filters_match_skimage_iradon(ours: str, theirs: str) -> None:
    transform = pytest.importorskip("skimage.transform")
    geometry = Geometry.sparse_view(64, 40)
    sinogram = np.random.default_rng(3).normal(size=(40, 64))
    reference = transform.iradon(sinogram.T, np.array(geometry.angles_deg), filter_name=theirs, circle=True)
    ours_image = get_operator(geometry).fbp(torch.tensor(sinogram), filter=ours).numpy()
    np.testing.assert_allclose(ours_image, reference, atol=1e-6 * np.abs(reference).max())  # float32 weights


def test_backproject_is_pixel_driven_like_skimage() -> None:
    transform = pytest.importorskip("skimage.transform")
    geometry = Geometry.sparse_view(48, 30)
    sinogram = np.random.default_rng(4).uniform(size=(30, 48))
    reference = transform.iradon(sinogram.T, np.array(geometry.angles_deg), filter_name=None, circle=True)
    op = get_operator(geometry)
    ours = op.backproject(torch.tensor(sinogram)) * (math.pi / (2 * 30)) * _disk(48, 24)
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-6 * np.abs(reference).max())  # float32 weights
    # A different discretisation from the exact transpose A^T.
    y = torch.tensor(sinogram)
    assert not torch.allclose(op.backproject(y), op.adjoint(y), atol=1e-2)


# ----------------------------------------------------------------------------- measurement model


def test_transmission_is_beer_lambert() -> None:
    sinogram = torch.tensor([[0.0, 1.0, 10.0]])
    expected = 1e4 * torch.exp(-0.5 * sinogram)
    torch.testing.assert_close(transmission(sinogram, 1e4, pixel_size_cm=0.5), expected)
    # Default pixel size: 25.6 cm field of view over N = 3 bins.
    torch.testing.assert_close(transmission(sinogram, 1e4), 1e4 * torch.exp(-pixel_size_cm(3) * sinogram))
    assert pixel_size_cm(64) == pytest.approx(0.4)


def test_poisson_noise_level_follows_dose() -> None:
    # Constant line integral Δ·p = 2: the post-log std is 1/sqrt(I0·e^-2) to first order.
    for i0 in (1e3, 1e5):
        p = torch.full((60, 64), 2.0, dtype=torch.float64)
        y = noisy_measurement(p, i0, torch.Generator().manual_seed(5), pixel_size_cm=1.0)
        assert float(y.std()) == pytest.approx(1.0 / math.sqrt(i0 * math.exp(-2.0)), rel=0.06)
        assert float(y.mean()) == pytest.approx(2.0, abs=0.01)


def test_fixed_generator_gives_identical_noise() -> None:
    p = torch.rand(4, 1, 30, 32, generator=torch.Generator().manual_seed(0))
    a = noisy_measurement(p, 1e4, torch.Generator().manual_seed(11))
    b = noisy_measurement(p, 1e4, torch.Generator().manual_seed(11))
    c = noisy_measurement(p, 1e4, torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_photon_starvation_is_clamped() -> None:
    y = noisy_measurement(torch.full((5, 8), 1e3), 1e3, torch.Generator().manual_seed(0), pixel_size_cm=1.0)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, torch.full_like(y, math.log(1e3)))  # counts 0 -> 1 -> y = ln(I0)


def test_higher_dose_gives_lower_fbp_error() -> None:
    op = get_operator(Geometry.sparse_view(64, 90))
    mu = torch.tensor(torso_phantom(64, np.random.default_rng(0)))
    clean = op(mu)
    errors = {}
    for i0 in (1e3, 1e5):
        noisy = [noisy_measurement(clean, i0, torch.Generator().manual_seed(seed)) for seed in (0, 1)]
        mse = [float(((op.fbp(y) - mu) ** 2).mean()) for y in noisy]
        errors[i0] = sum(mse) / len(mse)
    assert errors[1e5] < 0.5 * errors[1e3]


def test_each_filter_runs_and_windows_reduce_noise() -> None:
    n = 64
    op = get_operator(Geometry.sparse_view(n, 90))
    offset = torch.arange(n) - n // 2
    disk = (offset[:, None] ** 2 + offset[None, :] ** 2 <= 24**2).to(torch.float32) * MU_WATER
    noisy = noisy_measurement(op(disk), 1e4, torch.Generator().manual_seed(7))
    centre = _disk(n, 14)
    std = {}
    for name in ("ram-lak", "shepp-logan", "cosine", "hann", "hamming"):
        image = op.fbp(noisy, filter=name)
        assert image.shape == (n, n) and torch.isfinite(image).all()
        assert float(image[centre].mean()) == pytest.approx(MU_WATER, rel=0.05)  # every window keeps the DC gain
        std[name] = float(image[centre].std())
    assert std["hann"] < std["cosine"] < std["shepp-logan"] < std["ram-lak"]
    with pytest.raises(ValueError):
        op.fbp(noisy, filter="butterworth")  # type: ignore[arg-type]


def test_detector_blur() -> None:
    sinogram = torch.rand(2, 10, 40, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    assert detector_blur(sinogram, 0.0) is sinogram
    ndimage = pytest.importorskip("scipy.ndimage")
    reference = ndimage.gaussian_filter1d(sinogram.numpy(), 1.5, axis=-1, mode="nearest", truncate=4.0)
    np.testing.assert_allclose(detector_blur(sinogram, 1.5).numpy(), reference, atol=1e-12)
    flat = torch.full((3, 16), 2.5)
    torch.testing.assert_close(detector_blur(flat, 30.0), flat)  # kernel wider than the detector
    assert detector_blur(sinogram, 2.0).std() < sinogram.std()


def test_hounsfield_units() -> None:
    mu = torch.tensor([0.0, MU_WATER, 2 * MU_WATER, 0.19])
    hu = to_hu(mu)
    torch.testing.assert_close(hu[:3], torch.tensor([-1000.0, 0.0, 1000.0]))
    torch.testing.assert_close(from_hu(hu), mu)
    torch.testing.assert_close(to_hu(torch.tensor([1.0]), mu_water=1.0), torch.tensor([0.0]))
    torch.testing.assert_close(from_hu(torch.tensor([-1000.0, 0.0]), mu_water=0.25), torch.tensor([0.0, 0.25]))


# ----------------------------------------------------------------------------- phantoms


def test_shepp_logan_matches_skimage_and_units() -> None:
    data = pytest.importorskip("skimage.data")
    reference = data.shepp_logan_phantom()
    ours = shepp_logan(reference.shape[0], dtype=np.float64)
    assert np.abs(ours - reference).mean() < 0.01  # same table and orientation (only edge pixels differ)
    original = shepp_logan(64, modified=False)
    assert original.max() == pytest.approx(2.0, abs=1e-6)  # skull = 2 × water
    assert original[32, 32] == pytest.approx(1.02, abs=1e-6)  # brain, in units of water
    np.testing.assert_allclose(shepp_logan_mu(64), MU_WATER * original, rtol=1e-6)


@pytest.mark.parametrize("make", [random_ellipses, torso_phantom])
def test_random_phantoms(make) -> None:
    n = 64
    a = make(n, np.random.default_rng(3))
    assert a.shape == (n, n) and a.dtype == np.float32
    np.testing.assert_array_equal(a, make(n, np.random.default_rng(3)))
    assert not np.array_equal(a, make(n, np.random.default_rng(4)))
    assert a.min() >= 0.0 and a.max() <= 3 * MU_WATER
    assert np.all(a[~_disk(n, n // 2 - 1).numpy()] == 0)  # inside the reconstruction circle
    assert np.abs(to_hu(torch.tensor(a[n // 2 - 8 : n // 2 + 8, n // 2 - 8 : n // 2 + 8])).median()) < 1000
    normalised = make(n, np.random.default_rng(3), mu_water=1.0)
    np.testing.assert_allclose(normalised * MU_WATER, a, rtol=1e-5, atol=1e-7)


def test_torso_phantom_has_bone_and_air() -> None:
    for seed in range(4):
        hu = to_hu(torch.tensor(torso_phantom(64, np.random.default_rng(seed))))
        body = hu > -1000
        assert (hu > 500).any()  # vertebra
        assert (hu[body] < -500).any()  # lungs or bowel gas
