"""NbAFL: noise calibration, weight clipping and Gaussian noise for DP-FedAvg.

Wei et al., "Federated Learning with Differential Privacy: Algorithms and
Performance Analysis", IEEE TIFS 15:3454-3469, 2020 (arXiv:1911.00222), the
lecture's "FedAVG with DP" algorithm. Pure functions only: the strategy that
uses them lives elsewhere.

Client i (Algorithm 1 of the paper; the lecture's steps 2-5) minimises
F_i(w) + μ/2 ‖w − w̃^{t−1}‖², clips and perturbs its weights, and the server
averages and may add noise before it broadcasts (steps 6-7):

    w_i ← w_i / max(1, ‖w_i‖₂ / C)                              clip_weights
    w̃_i = w_i + n_U,   n_U ~ N(0, σ_U² I)                       add_gaussian_noise
    w̃  = Σ_i p_i w̃_i + n_D,   n_D ~ N(0, σ_D² I)               add_gaussian_noise

The calibration, in the paper's notation (N clients, K of them sampled per
round; the lecture calls the number of clients K), with C the clipping bound,
m the smallest local data set, T aggregations, L exposures of one client's
weights, and the Gaussian mechanism's constant c:

    c     = sqrt(2 ln(1.25/δ))              Gaussian mechanism (preliminaries;
                                            Dwork & Roth 2014, Thm 3.22)     gaussian_constant
    Δs_U  = 2C / m                          uplink sensitivity               uplink_sensitivity
    σ_U   = c L Δs_U / ε                    uplink noise for L exposures     uplink_sigma
    σ_D   = 2cC sqrt(T² − L²N) / (m N ε)    if T > L√N, else 0  (Theorem 1)  downlink_sigma
    σ_D   = 2cC sqrt(T²/b² − L²K) / (m K ε) if T > ε/γ, else 0  (Theorem 3)  downlink_sigma_sampled
            b = −(T/ε) ln(1 − N/K + (N/K) e^{−ε/T})
            γ = −ln(1 − K/N + (K/N) e^{−ε/(L√K)})

Theorem 1 is the downlink guarantee with all N clients, Theorem 3 its K-random
scheduling variant (Theorem 2 is the convergence bound). Both follow from the
downlink sensitivity Δs_D = 2C/(mN) (Lemma 1 with p_i = 1/N): the broadcast
needs a total standard deviation of c T Δs_D / ε, the uplink noise already
gives σ_U/√N of it, and σ_D supplies the rest, which is nothing when T ≤ L√N.

What the formulas assume, and why :func:`rdp_epsilon` is reported beside them:

* The Gaussian-mechanism constant is proven only for a per-release ε < 1. σ_U
  spends ε/L on each of L exposures (basic composition, which also adds up the
  δ's: the L exposures are (ε, Lδ)-DP), so the formula is a proof only when
  ε/L < 1. :class:`NbAFLCalibration` reports the RDP-accounted ε of the same
  noise (valid for every ε) for the uplink and the broadcast.
* Δs_D = 2C/(mN) holds for uniform weights p_i = 1/N. With weighted aggregation
  p_i = |D_i|/|D| and unequal data sets, Lemma 1 gives max_i 2C p_i / m instead.
* Theorem 3 gives each round the budget ε_r = b ε / T, chosen so that
  −ln(1 − q + q e^{−ε_r}) = ε/T (q = K/N). That amplification by sampling is
  smaller than the usual bound ln(1 + q(e^{ε_r} − 1)) (q = 0.5, ε_r = 1: 0.38
  against 0.62), so it lets the server add less noise; the RDP accounting here
  uses Opacus's sampled-Gaussian analysis (Poisson sampling, rate K/N) instead.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.rdp import RDPAccountant

#: RDP orders α: Opacus's default grid widened at both ends (α near 1 for large ε, large α for small ε).
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 100 for x in range(1, 10)]
    + [float(a) for a in RDPAccountant.DEFAULT_ALPHAS]
    + [64.0, 80.0, 96.0, 128.0, 192.0, 256.0, 512.0, 1024.0]
)


# --- input checks ------------------------------------------------------------------------------
def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _delta(value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"delta must lie in (0, 1), got {value!r}")
    return float(value)


# --- calibration (Gaussian mechanism, uplink analysis, Theorems 1 and 3) ------------------------
def gaussian_constant(delta: float) -> float:
    """c = sqrt(2 ln(1.25/δ)), the Gaussian mechanism's constant (the paper's preliminaries; Dwork & Roth Thm 3.22).

    σ ≥ c Δs / ε makes one release of a query with L2 sensitivity Δs (ε, δ)-DP, proven for ε < 1.
    """
    return math.sqrt(2.0 * math.log(1.25 / _delta(delta)))


def uplink_sensitivity(clip: float, min_samples: int) -> float:
    """Δs_U = 2C / m, the L2 sensitivity of a client's clipped weights (the paper's uplink analysis).

    ``min_samples`` is m = min_i |D_i|, so the bound holds for every client.
    """
    return 2.0 * _positive("clip", clip) / _count("min_samples", min_samples)


def uplink_sigma(clip: float, exposures: int, min_samples: int, epsilon: float, delta: float) -> float:
    """σ_U = c L Δs_U / ε, the client's noise std for L exposures of its weights (the paper's uplink analysis).

    Each exposure is given ε/L (basic composition), so the classical constant c is proven when ε/L < 1.
    """
    exposures = _count("exposures", exposures)
    return gaussian_constant(delta) * exposures * uplink_sensitivity(clip, min_samples) / _positive("epsilon", epsilon)


def downlink_sigma(
    clip: float, rounds: int, exposures: int, clients: int, min_samples: int, epsilon: float, delta: float
) -> float:
    """σ_D of the server's broadcast noise with all N clients aggregated each round (paper Theorem 1).

    σ_D = 2cC sqrt(T² − L²N) / (m N ε) when T > L√N, and 0 when T ≤ L√N (the uplink noise, σ_U/√N
    in the average, already covers the T broadcasts). Assumes uniform weights p_i = 1/N (Lemma 1).
    """
    clip, epsilon = _positive("clip", clip), _positive("epsilon", epsilon)
    rounds, exposures = _count("rounds", rounds), _count("exposures", exposures)
    clients, min_samples = _count("clients", clients), _count("min_samples", min_samples)
    c = gaussian_constant(delta)
    excess = rounds**2 - exposures**2 * clients  # integers: T > L√N is decided exactly
    if excess <= 0:
        return 0.0
    return 2.0 * c * clip * math.sqrt(excess) / (min_samples * clients * epsilon)


def downlink_sigma_sampled(
    clip: float, rounds: int, exposures: int, clients: int, sampled: int, min_samples: int, epsilon: float,
    delta: float,
) -> float:
    """σ_D with K of the N clients drawn at random each round (paper Theorem 3, K-random scheduling).

    σ_D = 2cC sqrt(T²/b² − L²K) / (m K ε) when T > ε/γ, else 0, with
    b = −(T/ε) ln(1 − N/K + (N/K) e^{−ε/T}) and γ = −ln(1 − K/N + (K/N) e^{−ε/(L√K)}).
    T > ε/γ is exactly T/b > L√K, and K = N gives b = 1, γ = ε/(L√N): Theorem 1, which is returned then.
    """
    clients, sampled = _count("clients", clients), _count("sampled", sampled)
    if sampled > clients:
        raise ValueError(f"sampled must be <= clients, got sampled={sampled}, clients={clients}")
    if sampled == clients:
        return downlink_sigma(clip, rounds, exposures, clients, min_samples, epsilon, delta)
    clip, epsilon = _positive("clip", clip), _positive("epsilon", epsilon)
    rounds, exposures = _count("rounds", rounds), _count("exposures", exposures)
    min_samples = _count("min_samples", min_samples)
    c = gaussian_constant(delta)
    q = sampled / clients
    gamma = -math.log1p(q * math.expm1(-epsilon / (exposures * math.sqrt(sampled))))
    if rounds <= epsilon / gamma:
        return 0.0
    b = -(rounds / epsilon) * math.log1p(math.expm1(-epsilon / rounds) / q)
    excess = max(0.0, (rounds / b) ** 2 - exposures**2 * sampled)
    return 2.0 * c * clip * math.sqrt(excess) / (min_samples * sampled * epsilon)


# --- accounting --------------------------------------------------------------------------------
def rdp_epsilon(sigma_over_sensitivity: float, steps: int, delta: float, sample_rate: float = 1.0) -> float:
    """ε of ``steps`` compositions of the (sampled) Gaussian mechanism with noise multiplier z = σ/Δs, by RDP.

    Rényi DP of one release is α/(2z²) at order α (Mironov 2017; Poisson-subsampled with rate q < 1:
    Mironov, Talwar & Zhang 2019), compositions add up, and the sum is converted to (ε, δ)-DP with
    Balle et al. 2020, Thm 21, minimised over :data:`RDP_ORDERS` (Opacus's ``compute_rdp`` and
    ``get_privacy_spent``). Valid for every ε, unlike the classical constant c.
    """
    z = _positive("sigma_over_sensitivity", sigma_over_sensitivity)
    steps, delta = _count("steps", steps), _delta(delta)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    rdp = compute_rdp(q=float(sample_rate), noise_multiplier=z, steps=steps, orders=list(RDP_ORDERS))
    with warnings.catch_warnings():
        # An optimum at the grid's edge is still a valid (if looser) upper bound.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        epsilon, _ = get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(epsilon)


@dataclass(frozen=True)
class NbAFLCalibration:
    """NbAFL's noise for a run, and the ε it buys by the paper's formula and by RDP accounting.

    Parameters
    ----------
    clip : float
        C, the bound on the L2 norm of a client's weights (all tensors together).
    epsilon, delta : float
        The (ε, δ) target of the paper's formulas.
    rounds : int
        T, the number of aggregations (broadcasts).
    exposures : int
        L, how often one client's weights are uploaded (L = T when every client trains every round).
    clients : int
        N, the number of clients.
    min_samples : int
        m, the smallest client data set.
    sampled : int or None, default None
        K, the clients drawn per round; None means all N (Theorem 1), otherwise Theorem 3.

    Attributes
    ----------
    sigma_up, sigma_down : float
        σ_U (uplink analysis) and σ_D (Theorem 1 or 3).
    epsilon_rdp_up : float
        RDP ε of the uplink: L releases of a client's weights with z = σ_U / Δs_U.
    epsilon_rdp_down : float
        RDP ε of the broadcast: T releases of the average, z = sqrt(σ_D² + σ_U²/K) / (2C/(mK)),
        sampled with rate K/N when K < N.
    """

    clip: float
    epsilon: float
    delta: float
    rounds: int
    exposures: int
    clients: int
    min_samples: int
    sampled: int | None = None
    sigma_up: float = field(init=False)
    sigma_down: float = field(init=False)
    epsilon_rdp_up: float = field(init=False)
    epsilon_rdp_down: float = field(init=False)

    def __post_init__(self) -> None:
        k = self.clients if self.sampled is None else self.sampled
        sigma_up = uplink_sigma(self.clip, self.exposures, self.min_samples, self.epsilon, self.delta)
        sigma_down = downlink_sigma_sampled(
            self.clip, self.rounds, self.exposures, self.clients, k, self.min_samples, self.epsilon, self.delta
        )
        z_up = sigma_up / uplink_sensitivity(self.clip, self.min_samples)
        z_down = math.sqrt(sigma_down**2 + sigma_up**2 / k) / (2.0 * self.clip / (self.min_samples * k))
        object.__setattr__(self, "sigma_up", sigma_up)
        object.__setattr__(self, "sigma_down", sigma_down)
        object.__setattr__(self, "epsilon_rdp_up", rdp_epsilon(z_up, self.exposures, self.delta))
        object.__setattr__(
            self, "epsilon_rdp_down", rdp_epsilon(z_down, self.rounds, self.delta, sample_rate=k / self.clients)
        )

    def describe(self) -> str:
        """One line for the run log: inputs, σ_U, σ_D, and the formula's ε beside the RDP-accounted ones."""
        k = self.clients if self.sampled is None else self.sampled
        per_exposure = self.epsilon / self.exposures
        regime = "proven" if per_exposure < 1 else "not proven"
        return (
            f"NbAFL: C={self.clip:g}, T={self.rounds}, L={self.exposures}, N={self.clients}, K={k}, "
            f"m={self.min_samples}; sigma_U={self.sigma_up:.4g}, sigma_D={self.sigma_down:.4g}; "
            f"formula eps={self.epsilon:g} at delta={self.delta:g} (eps/L={per_exposure:.3g}: classical "
            f"Gaussian constant {regime}); RDP eps uplink={self.epsilon_rdp_up:.4g}, "
            f"broadcast={self.epsilon_rdp_down:.4g}"
        )


# --- mechanisms (Algorithm 1) ------------------------------------------------------------------
def _check_floating(tensors: Mapping[str, torch.Tensor], caller: str) -> None:
    for name, tensor in tensors.items():
        if not torch.is_floating_point(tensor):
            raise ValueError(f"{caller}: tensor {name!r} has dtype {tensor.dtype}; only floating-point tensors")


def clip_weights(tensors: Mapping[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    """w ← w / max(1, ‖w‖₂ / C), the clipping step of Algorithm 1 (the lecture's step 3).

    w is the concatenation of all given tensors: one L2 norm over every entry of every tensor (computed
    in float64), one common factor for all. Returns new tensors of the input dtypes, unchanged copies
    when ‖w‖₂ ≤ C. Pass exactly the tensors the sensitivity is meant to cover.
    """
    clip = _positive("clip", clip)
    _check_floating(tensors, "clip_weights")
    squared = sum(float(t.detach().double().pow(2).sum()) for t in tensors.values())
    norm = math.sqrt(squared)
    if norm <= clip:
        return {name: t.detach().clone() for name, t in tensors.items()}
    factor = clip / norm
    return {name: (t.detach().double() * factor).to(t.dtype) for name, t in tensors.items()}


def add_gaussian_noise(
    tensors: Mapping[str, torch.Tensor], sigma: float, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """w̃ = w + n with n ~ N(0, σ² I) on every entry: the noise of Algorithm 1 (uplink σ_U, broadcast σ_D).

    The noise is drawn in float64 from ``generator`` on the generator's device, tensor by tensor in the
    mapping's order (so a seed gives the same noise on any device), and the sum is cast back to each
    input's dtype. σ = 0 returns copies and draws nothing.
    """
    if isinstance(sigma, bool) or not isinstance(sigma, numbers.Real) or not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"sigma must be a finite number >= 0, got {sigma!r}")
    _check_floating(tensors, "add_gaussian_noise")
    if sigma == 0:
        return {name: t.detach().clone() for name, t in tensors.items()}
    noisy: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64, device=generator.device)
        noisy[name] = (t.detach().double() + float(sigma) * noise.to(t.device)).to(t.dtype)
    return noisy
