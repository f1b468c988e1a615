"""Parallel-beam Radon transform as a sparse matrix, its exact adjoint, and filtered backprojection.

Conventions (identical to ``skimage.transform.radon(circle=True)``):

* image ``[..., N, N]`` (row ``i``, column ``j``), pixel size 1, rotation centre ``c = N // 2``;
* sinogram ``[..., A, N]``: one row per angle, ``N`` detector bins with bin ``k`` at offset
  ``s = k - c`` (skimage returns the transpose, ``[N, A]``);
* only the disk inscribed in the image (radius ``N // 2``) is seen from every angle.

As for the parallel projections of Kak & Slaney, *Principles of Computerized Tomographic
Imaging* (IEEE Press 1988; SIAM 2001), ch. 3, the line ``Γ(l, θ) = {(x, y): x cosθ + y sinθ = l}``
is parametrised as ``(x, y) = l (cosθ, sinθ) + t (−sinθ, cosθ)`` and the Radon transform is

    g(l, θ) = ∫ f(l cosθ − t sinθ, l sinθ + t cosθ) dt.

Here ``x = col − c`` points right and ``y = c − row`` points up (row 0 is the top of the image).
The code runs ``t`` the other way, which leaves the integral unchanged. The integral is
discretised with unit steps in ``t`` and bilinear interpolation of the image. Every sample's four
interpolation weights go into a sparse system matrix ``A`` (``A·N`` rows, ``N²`` columns). It is
stored in float32 CSR form together with ``Aᵀ``, so ``Aᵀ`` is the exact transpose of ``A``. A
custom autograd function makes the backward of ``A`` equal to ``Aᵀ`` and the backward of ``Aᵀ``
equal to ``A``.

Filtered backprojection does not use ``Aᵀ``. It uses the pixel-driven backprojection of Kak &
Slaney (§3.3), ``f_b(x, y) = ∫_0^π g(x cosθ + y sinθ, θ) dθ``, which interpolates each projection
linearly at the pixel centres like ``skimage.transform.iradon``. The exact adjoint of a ray-driven
bilinear projector aliases high frequencies, so it is a poor choice for FBP.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F
from torch import Tensor

FilterName = Literal["ram-lak", "shepp-logan", "cosine", "hann", "hamming"]

__all__ = ["FilterName", "Geometry", "RadonOperator", "fourier_filter", "get_operator", "ramp_filter"]


@dataclass(frozen=True)
class Geometry:
    """Parallel-beam circle geometry. It is hashable, so one operator can be cached per geometry.

    Attributes
    ----------
    image_size : int
        ``N``. The image is ``N × N`` and the detector has ``N`` bins.
    angles_deg : tuple[float, ...]
        Projection angles ``θ`` in degrees (``A`` of them).
    """

    image_size: int
    angles_deg: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "angles_deg", tuple(float(a) for a in self.angles_deg))
        if self.image_size < 2:
            raise ValueError(f"image_size must be >= 2, got {self.image_size}")
        if not self.angles_deg:
            raise ValueError("a geometry needs at least one projection angle")

    @classmethod
    def sparse_view(cls, image_size: int, num_views: int, angular_range: float = 180.0) -> Geometry:
        """Returns ``num_views`` evenly spaced angles ``θ_k = k · range / num_views`` over ``[0, range)``."""
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1, got {num_views}")
        return cls(image_size, tuple(angular_range * k / num_views for k in range(num_views)))

    @property
    def num_angles(self) -> int:
        """``A``, the number of projections."""
        return len(self.angles_deg)

    @property
    def center(self) -> int:
        """The rotation centre ``c = N // 2`` (a pixel index, as in scikit-image)."""
        return self.image_size // 2

    @property
    def image_shape(self) -> tuple[int, int]:
        return (self.image_size, self.image_size)

    @property
    def sinogram_shape(self) -> tuple[int, int]:
        return (self.num_angles, self.image_size)


# ----------------------------------------------------------------------------- system matrices


def _trig(geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``cos θ`` and ``sin θ``, each of shape ``[A, 1, 1]`` in float64."""
    theta = np.deg2rad(np.asarray(geometry.angles_deg, dtype=np.float64))[:, None, None]
    return np.cos(theta), np.sin(theta)


def _projection_matrix(geometry: Geometry) -> scipy.sparse.csr_matrix:
    """Builds the ray-driven bilinear Radon matrix ``A`` (float64, ``[A·N, N²]``).

    Ray ``(θ, s)`` is sampled at ``t = −c, …, N−1−c`` at the image point
    ``col = s cosθ + t sinθ + c``, ``row = −s sinθ + t cosθ + c``. Each sample contributes
    bilinear weights to its four neighbouring pixels. Taps outside the image count as zero,
    like ``skimage.transform.warp`` with ``cval=0``.
    """
    n, c = geometry.image_size, geometry.center
    cos, sin = _trig(geometry)
    s = (np.arange(n, dtype=np.float64) - c)[None, :, None]  # detector offset, axis 1
    t = (np.arange(n, dtype=np.float64) - c)[None, None, :]  # position along the ray, axis 2
    col = s * cos + t * sin + c  # [A, N_s, N_t]
    row = -s * sin + t * cos + c
    col0, row0 = np.floor(col), np.floor(row)
    fcol, frow = col - col0, row - row0
    col0, row0 = col0.astype(np.int64), row0.astype(np.int64)
    ray = np.arange(geometry.num_angles * n).reshape(-1, n, 1)  # row index a·N + k of A

    rows, cols, vals = [], [], []
    for drow, dcol in ((0, 0), (0, 1), (1, 0), (1, 1)):
        weight = (frow if drow else 1.0 - frow) * (fcol if dcol else 1.0 - fcol)
        r, q = row0 + drow, col0 + dcol
        keep = (weight > 0) & (r >= 0) & (r < n) & (q >= 0) & (q < n)
        rows.append(np.broadcast_to(ray, keep.shape)[keep])
        cols.append(r[keep] * n + q[keep])
        vals.append(weight[keep])
    shape = (geometry.num_angles * n, n * n)
    coo = (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols)))
    matrix = scipy.sparse.csr_matrix(coo, shape=shape)
    matrix.sum_duplicates()  # the same pixel is hit by several samples of one ray
    return matrix


def _detector_padding(n: int) -> tuple[int, int]:
    """Returns the bins ``(before, after)`` that widen an ``N``-bin detector to ``⌈N√2⌉`` bins, the image diagonal.

    The centre stays where it was (new centre ``⌈N√2⌉ // 2``), as in skimage's ``iradon(circle=True)``.
    """
    diagonal = math.ceil(math.sqrt(2) * n)
    before = diagonal // 2 - n // 2
    return before, diagonal - n - before


def _backprojection_matrix(geometry: Geometry) -> scipy.sparse.csr_matrix:
    """Builds the pixel-driven backprojector ``B`` (float64, ``[N², A·D]``) for the widened detector of ``D`` bins.

    Pixel ``(row, col)`` reads projection ``θ`` at the detector offset
    ``l = (col − c) cosθ − (row − c) sinθ``, interpolated linearly between bins. It reads zero
    outside the detector, like ``numpy.interp(..., left=0, right=0)`` in skimage's ``iradon``. The
    detector is widened to the image diagonal, ``D = ⌈N√2⌉`` bins (:func:`_detector_padding`),
    because a ramp-filtered projection is not zero outside the object's shadow.
    """
    n, c = geometry.image_size, geometry.center
    before, after = _detector_padding(n)
    bins = n + before + after
    cos, sin = _trig(geometry)
    offset = np.arange(n, dtype=np.float64) - c
    # Detector bin position of every pixel, [A, row, col].
    det = offset[None, None, :] * cos - offset[None, :, None] * sin + (c + before)
    k0 = np.floor(det)
    frac = det - k0
    k0 = k0.astype(np.int64)
    angle = np.arange(geometry.num_angles).reshape(-1, 1, 1)
    pixel = np.arange(n * n).reshape(1, n, n)

    rows, cols, vals = [], [], []
    for dk in (0, 1):
        weight = frac if dk else 1.0 - frac
        k = k0 + dk
        keep = (weight > 0) & (k >= 0) & (k < bins) & (det >= 0) & (det <= bins - 1)
        rows.append(np.broadcast_to(pixel, keep.shape)[keep])
        cols.append((np.broadcast_to(angle, keep.shape) * bins + k)[keep])
        vals.append(weight[keep])
    shape = (n * n, geometry.num_angles * bins)
    coo = (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols)))
    return scipy.sparse.csr_matrix(coo, shape=shape)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """Returns a torch CSR tensor with int32 indices (half the memory of int64, and slightly faster)."""
    with warnings.catch_warnings():  # torch notes once per process that CSR support is "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(
            crow.to(torch.int32), col.to(torch.int32), values, size=size, check_invariants=False
        )


def _to_torch_csr(matrix: scipy.sparse.csr_matrix) -> Tensor:
    """Converts a scipy CSR matrix to a float32 torch CSR tensor."""
    values = torch.from_numpy(matrix.data.astype(np.float32))
    return _csr(torch.from_numpy(matrix.indptr), torch.from_numpy(matrix.indices), values, matrix.shape)


class _SparseLinearMap:
    """A linear map ``x ↦ M x`` between tensor shapes, backed by a float32 CSR matrix ``M``.

    ``Mᵀ`` is stored as its own CSR matrix, which is much faster on CPU than multiplying by a
    transposed view. Copies in float64 or on another device are made on first use and cached.

    Parameters
    ----------
    matrix : scipy.sparse.csr_matrix
        ``M`` of shape ``[prod(out_shape), prod(in_shape)]``.
    in_shape : tuple[int, ...]
        Trailing shape of the inputs, e.g. ``(N, N)`` for images.
    out_shape : tuple[int, ...]
        Trailing shape of the outputs, e.g. ``(A, N)`` for sinograms.
    transposed : scipy.sparse.csr_matrix | None, optional
        ``Mᵀ`` if it is already known. Otherwise it is computed when first needed.
    """

    def __init__(
        self,
        matrix: scipy.sparse.csr_matrix,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        transposed: scipy.sparse.csr_matrix | None = None,
    ) -> None:
        self.shapes = {False: (in_shape, out_shape), True: (out_shape, in_shape)}
        self._cache: dict[tuple[bool, torch.dtype, torch.device], Tensor] = {
            (False, torch.float32, torch.device("cpu")): _to_torch_csr(matrix)
        }
        if transposed is not None:
            self._cache[(True, torch.float32, torch.device("cpu"))] = _to_torch_csr(transposed)

    @property
    def nnz(self) -> int:
        return int(self.csr(False, torch.float32, torch.device("cpu")).values().numel())

    def csr(self, transpose: bool, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Returns ``M`` or ``Mᵀ`` as CSR in ``dtype`` on ``device``."""
        key = (transpose, dtype, device)
        if key not in self._cache:
            base_key = (transpose, torch.float32, torch.device("cpu"))
            if base_key not in self._cache:
                m = self._cache[(not transpose, torch.float32, torch.device("cpu"))]
                m_t = m.t().to_sparse_csr()  # the CSR layout of Mᵀ
                shape = (m_t.shape[0], m_t.shape[1])
                self._cache[base_key] = _csr(m_t.crow_indices(), m_t.col_indices(), m_t.values(), shape)
            self._cache[key] = self._cache[base_key].to(dtype=dtype, device=device)
        return self._cache[key]

    def matmul(self, x: Tensor, transpose: bool) -> Tensor:
        """Computes ``M x`` (or ``Mᵀ x``) over the trailing dims of ``x``, with no autograd tracking."""
        in_shape, out_shape = self.shapes[transpose]
        if tuple(x.shape[x.dim() - len(in_shape) :]) != in_shape:
            expected = ", ".join(map(str, in_shape))
            raise ValueError(f"expected a tensor of shape [..., {expected}], got {list(x.shape)}")
        lead = x.shape[: x.dim() - len(in_shape)]
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        columns = x.detach().reshape(-1, math.prod(in_shape)).to(compute).t().contiguous()
        out = (self.csr(transpose, compute, x.device) @ columns).t()  # [K, prod(out_shape)]
        return out.reshape(*lead, *out_shape).to(x.dtype if x.is_floating_point() else compute)

    def __call__(self, x: Tensor, transpose: bool = False) -> Tensor:
        """Computes ``M x`` or ``Mᵀ x``. It is differentiable: the backward of ``M`` is ``Mᵀ`` and vice versa."""
        return _SparseMatmul.apply(x, self, transpose)


class _SparseMatmul(torch.autograd.Function):
    """``y = M x`` with ``∂L/∂x = Mᵀ ∂L/∂y``. Backward calls ``apply`` again, so double backward works too."""

    @staticmethod
    def forward(ctx, x: Tensor, linear_map: _SparseLinearMap, transpose: bool) -> Tensor:
        ctx.linear_map, ctx.transpose = linear_map, transpose
        return linear_map.matmul(x, transpose)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _SparseMatmul.apply(grad, ctx.linear_map, not ctx.transpose), None, None


# ----------------------------------------------------------------------------- FBP filters


@functools.lru_cache(maxsize=64)
def _fourier_filter_np(size: int, window: str) -> np.ndarray:
    """Returns the windowed ramp filter on the ``size``-point DFT grid (see :func:`fourier_filter`)."""
    k = np.arange(size)
    dist = np.minimum(k, size - k)  # circular distance |k| to tap 0
    h = np.zeros(size)
    h[0] = 0.25
    odd = dist % 2 == 1
    h[odd] = -1.0 / (np.pi * dist[odd]) ** 2
    ramp = 2.0 * np.real(np.fft.fft(h))
    w = np.fft.fftfreq(size)  # ω in cycles per bin, [-1/2, 1/2)
    windows: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "ram-lak": np.ones_like,
        "shepp-logan": np.sinc,  # sin(πω) / (πω)
        "cosine": lambda w: np.cos(np.pi * w),
        "hann": lambda w: 0.5 * (1.0 + np.cos(2.0 * np.pi * w)),
        "hamming": lambda w: 0.54 + 0.46 * np.cos(2.0 * np.pi * w),
    }
    if window not in windows:
        raise ValueError(f"unknown FBP filter {window!r}; choose from {sorted(windows)}")
    return ramp * windows[window](w)


def fourier_filter(size: int, window: FilterName = "ram-lak") -> Tensor:
    """Returns the FBP filter ``H(ω) = |ω| · W(ω)`` sampled on a ``size``-point DFT grid, float64 ``[size]``.

    The ramp ``|ω|`` is not sampled directly. It is the DFT of the band-limited spatial kernel
    (Ram–Lak, Kak & Slaney eq. 3.61, bin spacing 1): ``h[0] = 1/4``,
    ``h[k] = −1/(πk)²`` for odd ``k``, and ``h[k] = 0`` for even ``k ≠ 0``. That kernel has no DC
    offset. It is scaled by 2 exactly as scikit-image does; the ``π / (2A)`` factor of FBP undoes it.
    The window ``W`` (``ω`` in cycles per bin) is applied to it:

    * ``ram-lak``: ``1``
    * ``shepp-logan``: ``sinc(ω) = sin(πω)/(πω)``
    * ``cosine``: ``cos(πω)``
    * ``hann``: ``(1 + cos 2πω)/2``
    * ``hamming``: ``0.54 + 0.46 cos 2πω``
    """
    return torch.tensor(_fourier_filter_np(int(size), window))  # a copy: the cached array stays intact


def _padded_length(n: int) -> int:
    """Returns the FFT length for filtering ``n`` bins: a power of two ``≥ 2n`` (at least 64), like skimage."""
    return max(64, 2 ** math.ceil(math.log2(2 * n)))


def ramp_filter(y: Tensor, window: FilterName = "ram-lak") -> Tensor:
    """Filters every projection along the detector axis: ``q = h * p`` computed as ``IFFT(FFT(p) · H)``.

    The projections are zero-padded to :func:`_padded_length`, so the convolution is linear rather
    than circular.

    Parameters
    ----------
    y : Tensor
        Sinogram ``[..., A, N]``.
    window : FilterName, optional
        The apodisation window of the ramp (see :func:`fourier_filter`).

    Returns
    -------
    Tensor
        The filtered sinogram ``[..., A, N]``, same dtype. Differentiable.
    """
    n = y.shape[-1]
    size = _padded_length(n)
    h = fourier_filter(size, window)[: size // 2 + 1].to(dtype=y.dtype, device=y.device)  # H is even and real
    return torch.fft.irfft(torch.fft.rfft(y, n=size, dim=-1) * h, n=size, dim=-1)[..., :n]


# ----------------------------------------------------------------------------- operator


class RadonOperator:
    """The parallel-beam Radon transform ``A``, its adjoint ``Aᵀ``, and FBP for one :class:`Geometry`.

    This is deliberately a plain class, not an ``nn.Module``. It has no trainable state, and a
    network that holds one should not put megabytes of system matrix into its ``state_dict``
    (which federated clients send). Pickling and ``copy.deepcopy`` go through
    :func:`get_operator`, so a copy is the cached operator of the same geometry and nothing is
    rebuilt or duplicated.

    The sparse matrices are built the first time they are needed. ``A``/``Aᵀ`` cost
    about 0.1 s at ``N = 64``, 60 angles. The backprojector is built separately on the first
    FBP. All methods accept float32 or float64 tensors with any leading dims.

    Parameters
    ----------
    geometry : Geometry
        Image size and projection angles.
    """

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = geometry
        self._norms: dict[int, float] = {}

    def __repr__(self) -> str:
        g = self.geometry
        return f"RadonOperator(N={g.image_size}, angles={g.num_angles})"

    def __reduce__(self):
        return (get_operator, (self.geometry,))

    @functools.cached_property
    def _projector(self) -> _SparseLinearMap:
        matrix = _projection_matrix(self.geometry)
        g = self.geometry
        return _SparseLinearMap(matrix, g.image_shape, g.sinogram_shape, transposed=matrix.T.tocsr())

    @functools.cached_property
    def _backprojector(self) -> _SparseLinearMap:
        matrix = _backprojection_matrix(self.geometry)
        bins = self.geometry.image_size + sum(_detector_padding(self.geometry.image_size))
        return _SparseLinearMap(matrix, (self.geometry.num_angles, bins), self.geometry.image_shape)

    def _widen(self, y: Tensor) -> Tensor:
        """Zero-pads sinogram ``[..., A, N]`` to the diagonal detector ``[..., A, D]``; objects lie inside the circle."""
        if y.shape[-1] != self.geometry.image_size:
            raise ValueError(f"expected {self.geometry.image_size} detector bins, got {list(y.shape)}")
        return F.pad(y, _detector_padding(self.geometry.image_size))

    @functools.cached_property
    def _disk(self) -> Tensor:
        """The reconstruction circle ``(i − c)² + (j − c)² ≤ (N // 2)²``, a bool tensor ``[N, N]``."""
        offset = torch.arange(self.geometry.image_size) - self.geometry.center
        return offset[:, None] ** 2 + offset[None, :] ** 2 <= self.geometry.center**2

    def forward(self, x: Tensor) -> Tensor:
        """Forward projection ``p = A x``, i.e. ``p(θ, s) = ∫ μ(s cosθ − t sinθ, s sinθ + t cosθ) dt``.

        Parameters
        ----------
        x : Tensor
            Image ``[..., N, N]`` (pixel size 1, so ``p`` is in image units × pixels).

        Returns
        -------
        Tensor
            Sinogram ``[..., A, N]``. Its gradient is ``Aᵀ`` applied to the upstream gradient.
        """
        return self._projector(x, transpose=False)

    __call__ = forward

    def adjoint(self, y: Tensor) -> Tensor:
        """The exact adjoint ``x = Aᵀ y``: the same sparse matrix, transposed, so ``⟨Ax, y⟩ = ⟨x, Aᵀy⟩``.

        Parameters
        ----------
        y : Tensor
            Sinogram ``[..., A, N]``.

        Returns
        -------
        Tensor
            Image ``[..., N, N]``. Its gradient is ``A`` applied to the upstream gradient.
        """
        return self._projector(y, transpose=True)

    def normal(self, x: Tensor) -> Tensor:
        """The normal operator ``AᵀA x`` (image ``[..., N, N]`` to image), e.g. for gradient steps on ``½‖Ax − y‖²``.

        Parameters
        ----------
        x : Tensor
            Image ``[..., N, N]``.

        Returns
        -------
        Tensor
            Image ``[..., N, N]``. Differentiable.
        """
        return self.adjoint(self.forward(x))

    def backproject(self, y: Tensor) -> Tensor:
        """Pixel-driven backprojection ``f_b(x, y) = Σ_θ g(x cosθ + y sinθ, θ)``, unscaled.

        Here ``x = col − c`` and ``y = c − row``. This is a different discretisation from
        :meth:`adjoint`, not its transpose. It interpolates each projection linearly at every pixel
        centre, as ``skimage.transform.iradon`` does, and reads zero beyond the detector.

        Parameters
        ----------
        y : Tensor
            Sinogram ``[..., A, N]``.

        Returns
        -------
        Tensor
            Image ``[..., N, N]``. Differentiable (its backward is the exact transpose of the backprojector).
        """
        return self._backprojector(self._widen(y), transpose=False)

    def fbp(self, y: Tensor, filter: FilterName = "ram-lak", circle_mask: bool = True) -> Tensor:
        """Filtered backprojection ``f = (π / 2A) · B (h * p)``, scaled like ``skimage.transform.iradon``.

        This discretises the filtered-backprojection inversion formula for parallel projections
        (Kak & Slaney, *Principles of Computerized Tomographic Imaging*, §3.3)
        ``f(x, y) = ∫_0^π ∫ G(ρ, θ) |ρ| e^{i2πρ(x cosθ + y sinθ)} dρ dθ``. The inner integral is
        :func:`ramp_filter` (``|ρ|`` times the chosen window). The outer integral is
        :meth:`backproject` with ``dθ = π / A``, and the ``1/2`` undoes the filter's factor of 2.
        The same scale is right for ``A`` angles over 360°, because each line is measured twice.

        Parameters
        ----------
        y : Tensor
            Sinogram ``[..., A, N]``.
        filter : FilterName, optional
            ``"ram-lak"`` (plain ramp), ``"shepp-logan"``, ``"cosine"``, ``"hann"`` or ``"hamming"``.
        circle_mask : bool, optional
            Zero the pixels outside the reconstruction circle (skimage's ``circle=True``).

        Returns
        -------
        Tensor
            Image ``[..., N, N]`` in the units of the image that produced ``y``. Differentiable.
        """
        filtered = ramp_filter(self._widen(y), filter)  # h * p is defined beyond the object's shadow too
        image = self._backprojector(filtered, transpose=False) * (math.pi / (2 * self.geometry.num_angles))
        if circle_mask:
            image = image * self._disk.to(device=image.device, dtype=image.dtype)
        return image

    def operator_norm(self, iterations: int = 30) -> float:
        """Estimates ``‖A‖₂ = sqrt(λ_max(AᵀA))`` by power iteration in float64.

        Gradient descent on ``½‖Ax − y‖²`` converges for step sizes ``η < 2/‖A‖₂²``. ``AᵀA`` has
        non-negative entries, so its top eigenvector is non-negative (Perron–Frobenius). The
        iteration therefore starts from the constant image, which converges quickly. Results are
        cached per ``iterations``.
        """
        if iterations not in self._norms:
            v = torch.ones(self.geometry.image_shape, dtype=torch.float64)
            v = v / v.norm()
            estimate = 0.0
            for _ in range(max(1, iterations)):
                w = self.normal(v)
                estimate = float(torch.dot(v.flatten(), w.flatten()))  # Rayleigh quotient vᵀAᵀAv
                v = w / w.norm()
            self._norms[iterations] = math.sqrt(estimate)
        return self._norms[iterations]

    def matrix_nnz(self) -> int:
        """The number of non-zeros in ``A`` (memory is about ``2 · nnz · 8`` bytes for ``A`` and ``Aᵀ``)."""
        return self._projector.nnz


@functools.lru_cache(maxsize=8)
def get_operator(geometry: Geometry) -> RadonOperator:
    """Returns the shared :class:`RadonOperator` for ``geometry``; it is cached per process.

    Equal geometries (same size and angles) get the same object, so each system matrix is built
    only once per process, as each task is (``client/cache.py``).
    """
    return RadonOperator(geometry)
