"""NbAFL (Wei et al., TIFS 2020): noise calibration against hand-computed values, clipping, noise, RDP accounting."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from opacus.accountants.rdp import RDPAccountant
from scipy.optimize import minimize_scalar

from privacy.accounting import epsilon
from privacy.nbafl import (
    NbAFLCalibration,
    add_gaussian_noise,
    clip_weights,
    downlink_sigma,
    downlink_sigma_sampled,
    gaussian_constant,
    rdp_epsilon,
    uplink_sensitivity,
    uplink_sigma,
)
from tests.privacy.common import total_norm

# c(0.01) = sqrt(2 ln(1.25/0.01)) = sqrt(2 ln 125) = sqrt(2 * 4.828314) = sqrt(9.656627) = 3.107511
C_001 = 3.107511

# --- calibration -------------------------------------------------------------------------------
def test_gaussian_constant_of_delta_001_is_3_1075() -> None:
    assert round(gaussian_constant(0.01), 4) == 3.1075
    assert gaussian_constant(0.01) == pytest.approx(C_001, abs=1e-6)


def test_gaussian_constant_grows_as_delta_shrinks() -> None:
    # sqrt(2 ln(1.25e5)) = sqrt(2 * 11.736069) = sqrt(23.472139) = 4.844805
    assert gaussian_constant(1e-5) == pytest.approx(4.844805, abs=1e-6)
    assert gaussian_constant(1e-5) > gaussian_constant(1e-3) > gaussian_constant(0.1)


def test_uplink_sensitivity_is_2c_over_m() -> None:
    assert uplink_sensitivity(1.5, 30) == pytest.approx(0.1)  # 2 * 1.5 / 30
    assert uplink_sensitivity(1.0, 100) == pytest.approx(0.02)  # 2 * 1 / 100


def test_uplink_sigma_hand_computed() -> None:
    # C = 1, L = 10, m = 100, eps = 5, delta = 0.01:
    # Δs_U = 2/100 = 0.02;  σ_U = c L Δs_U / ε = 3.107511 * 10 * 0.02 / 5 = 0.1243004
    assert uplink_sigma(clip=1.0, exposures=10, min_samples=100, epsilon=5.0, delta=0.01) == pytest.approx(
        0.1243004, abs=1e-7
    )
    # linear in L and C, inverse in ε and m
    assert uplink_sigma(2.0, 20, 100, 5.0, 0.01) == pytest.approx(4 * 0.1243004, abs=1e-6)
    assert uplink_sigma(1.0, 10, 200, 10.0, 0.01) == pytest.approx(0.1243004 / 4, abs=1e-7)


def test_downlink_sigma_hand_computed() -> None:
    # C = 1, T = 50, L = 10, N = 10, m = 100, eps = 5, delta = 0.01:
    # T² − L²N = 2500 − 1000 = 1500, sqrt(1500) = 38.729833
    # σ_D = 2 c C sqrt(1500) / (m N ε) = 2 * 3.107511 * 38.729833 / (100 * 10 * 5) = 240.70680 / 5000 = 0.0481414
    sigma = downlink_sigma(clip=1.0, rounds=50, exposures=10, clients=10, min_samples=100, epsilon=5.0, delta=0.01)
    assert sigma == pytest.approx(0.0481414, abs=1e-7)


def test_downlink_sigma_is_zero_up_to_t_equal_l_sqrt_n_and_positive_above() -> None:
    args = dict(clip=1.0, exposures=10, clients=10, min_samples=100, epsilon=5.0, delta=0.01)
    # L√N = 10 * sqrt(10) = 31.62
    assert downlink_sigma(rounds=1, **args) == 0.0
    assert downlink_sigma(rounds=31, **args) == 0.0
    # T = 32: 1024 − 1000 = 24, σ_D = 2 * 3.107511 * sqrt(24) / 5000 = 6.215023 * 4.898979 / 5000 = 0.0060895
    assert downlink_sigma(rounds=32, **args) == pytest.approx(0.0060895, abs=1e-7)
    # exactly on the boundary T = L√N (L = 5, N = 4: L√N = 10) no server noise is needed
    edge = dict(clip=1.0, exposures=5, clients=4, min_samples=100, epsilon=5.0, delta=0.01)
    assert downlink_sigma(rounds=10, **edge) == 0.0
    assert downlink_sigma(rounds=11, **edge) > 0.0
    # above the threshold σ_D grows with T
    sigmas = [downlink_sigma(rounds=t, **args) for t in range(32, 80)]
    assert all(a < b for a, b in zip(sigmas, sigmas[1:]))


def test_sampled_downlink_sigma_hand_computed() -> None:
    # N = 10, K = 5 (q = 0.5), T = 50, L = 10, C = 1, m = 100, eps = 5, delta = 0.01:
    # γ = −ln(1 − q + q e^{−ε/(L√K)}): ε/(L√K) = 5 / 22.36068 = 0.2236068, e^{−0.2236068} = 0.7996295,
    #     γ = −ln(0.5 + 0.5 * 0.7996295) = −ln(0.8998147) = 0.1055664;  ε/γ = 47.36357 < T
    # b = −(T/ε) ln(1 − N/K + (N/K) e^{−ε/T}) = −10 ln(−1 + 2 * 0.9048374) = −10 ln(0.8096748) = 2.1112255
    # T/b = 23.682927, (T/b)² = 560.88105, − L²K = 560.88105 − 500 = 60.88105, sqrt = 7.802631
    # σ_D = 2 c C * 7.802631 / (m K ε) = 6.215023 * 7.802631 / 2500 = 0.0193974
    sigma = downlink_sigma_sampled(
        clip=1.0, rounds=50, exposures=10, clients=10, sampled=5, min_samples=100, epsilon=5.0, delta=0.01
    )
    assert sigma == pytest.approx(0.0193974, abs=1e-7)


def test_sampled_downlink_sigma_is_zero_exactly_up_to_eps_over_gamma() -> None:
    args = dict(clip=1.0, exposures=10, clients=10, sampled=5, min_samples=100, epsilon=5.0, delta=0.01)
    threshold = 47.36357  # ε/γ from the hand computation above
    for rounds in range(1, 120):
        sigma = downlink_sigma_sampled(rounds=rounds, **args)
        assert (sigma > 0) == (rounds > threshold), rounds
    # just above the threshold the server adds little (T/b − L√K → 0 continuously)
    assert 0 < downlink_sigma_sampled(rounds=48, **args) < downlink_sigma_sampled(rounds=50, **args)


def test_sampled_downlink_sigma_with_every_client_is_theorem_1() -> None:
    for rounds in (10, 31, 32, 50, 200):
        full = downlink_sigma(1.0, rounds, 10, 10, 100, 5.0, 0.01)
        assert downlink_sigma_sampled(1.0, rounds, 10, 10, 10, 100, 5.0, 0.01) == full


# --- clipping ----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipping_never_exceeds_c_over_many_norms(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    clip = 1.5
    clipped_some = False
    for scale in np.logspace(-3, 3, 40):
        weights = {
            "conv.weight": scale * torch.randn(4, 3, 3, 3, generator=generator, dtype=dtype),
            "conv.bias": scale * torch.randn(4, generator=generator, dtype=dtype),
            "fc.weight": scale * torch.randn(10, 8, generator=generator, dtype=dtype),
        }
        before = total_norm(weights)
        after = clip_weights(weights, clip)
        assert total_norm(after) <= clip * (1 + 1e-6)
        assert all(after[name].dtype == dtype and after[name].shape == weights[name].shape for name in weights)
        if before <= clip:
            assert all(torch.equal(after[name], weights[name]) for name in weights)
        else:
            clipped_some = True
            # scaled onto the sphere of radius C, one common factor for all tensors (direction kept)
            assert total_norm(after) == pytest.approx(clip, rel=1e-6)
            for name in weights:
                torch.testing.assert_close(after[name].double(), weights[name].double() * (clip / before),
                                           rtol=1e-6, atol=1e-12)
    assert clipped_some


def test_clipping_uses_the_norm_of_all_tensors_together() -> None:
    # each tensor alone has norm 1 <= C = 1.2, together sqrt(2) > C: both are scaled by 1.2 / sqrt(2)
    weights = {"a": torch.tensor([1.0, 0.0], dtype=torch.float64), "b": torch.tensor([0.0, 1.0], dtype=torch.float64)}
    after = clip_weights(weights, 1.2)
    assert after["a"].tolist() == pytest.approx([1.2 / math.sqrt(2), 0.0])
    assert after["b"].tolist() == pytest.approx([0.0, 1.2 / math.sqrt(2)])


def test_clipping_returns_new_tensors_and_leaves_the_input_alone() -> None:
    weights = {"w": torch.full((3,), 10.0)}
    after = clip_weights(weights, 1.0)
    assert weights["w"].tolist() == [10.0, 10.0, 10.0]
    small = {"w": torch.full((3,), 0.1)}
    copy = clip_weights(small, 1.0)
    copy["w"].add_(1.0)
    assert small["w"].tolist() == pytest.approx([0.1, 0.1, 0.1])
    assert total_norm(after) == pytest.approx(1.0, rel=1e-6)


# --- noise -------------------------------------------------------------------------------------
def test_noise_has_the_requested_std_and_zero_mean() -> None:
    sigma, n = 0.37, 200_000
    generator = torch.Generator().manual_seed(1234)
    noisy = add_gaussian_noise({"w": torch.zeros(n)}, sigma, generator)["w"].double()
    assert noisy.std().item() == pytest.approx(sigma, rel=0.02)  # sampling sd of the std: σ/sqrt(2n) = 0.16 %
    assert abs(noisy.mean().item()) < 5 * sigma / math.sqrt(n)  # 5 standard errors of the mean


def test_noise_is_float64_seeded_per_entry_and_cast_back() -> None:
    x = {"a": torch.linspace(-1, 1, 7, dtype=torch.float32), "b": torch.ones(2, 3, dtype=torch.float64)}
    noisy = add_gaussian_noise(x, 0.5, torch.Generator().manual_seed(7))
    again = add_gaussian_noise(x, 0.5, torch.Generator().manual_seed(7))
    # the same draw by hand: float64 standard normals, tensor by tensor in the mapping's order
    reference = torch.Generator().manual_seed(7)
    expected_a = x["a"].double() + 0.5 * torch.randn(7, generator=reference, dtype=torch.float64)
    expected_b = x["b"] + 0.5 * torch.randn(2, 3, generator=reference, dtype=torch.float64)
    assert noisy["a"].dtype == torch.float32 and noisy["b"].dtype == torch.float64
    assert torch.equal(noisy["a"], expected_a.to(torch.float32))
    assert torch.equal(noisy["b"], expected_b)
    assert all(torch.equal(noisy[k], again[k]) for k in x)
    assert x["b"].tolist() == [[1.0] * 3] * 2  # input untouched
    other = add_gaussian_noise(x, 0.5, torch.Generator().manual_seed(8))
    assert not torch.equal(other["b"], noisy["b"])


def test_zero_noise_returns_copies() -> None:
    x = {"w": torch.arange(4, dtype=torch.float32)}
    out = add_gaussian_noise(x, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out["w"], x["w"]) and out["w"].data_ptr() != x["w"].data_ptr()


# --- RDP accounting ----------------------------------------------------------------------------
def conversion(rdp: float, alpha: float, delta: float) -> float:
    """RDP (α, rdp) → (ε, δ)-DP as Balle et al. 2020 Thm 21 (the conversion Opacus uses)."""
    return rdp - (math.log(delta) + math.log(alpha)) / (alpha - 1) + math.log((alpha - 1) / alpha)


def test_rdp_epsilon_of_one_gaussian_release_matches_alpha_over_2z2() -> None:
    z, delta = 2.0, 1e-5
    # one release, sample rate 1: RDP(α) = α / (2 z²), minimised over the orders every mechanism uses
    by_hand = min(conversion(alpha / (2 * z * z), alpha, delta) for alpha in RDPAccountant.DEFAULT_ALPHAS)
    assert rdp_epsilon(z, 1, delta) == pytest.approx(by_hand, rel=1e-12)
    # and the grid is close to the continuous optimum over α > 1 (never below it)
    best = minimize_scalar(lambda a: conversion(a / (2 * z * z), a, delta), bounds=(1.001, 2000), method="bounded")
    assert best.fun <= rdp_epsilon(z, 1, delta) <= best.fun * 1.01


def test_rdp_epsilon_composes_like_a_gaussian_with_sqrt_steps_less_noise() -> None:
    # k releases with z add up to k α/(2z²) = α / (2 (z/√k)²): one release with z/√k
    assert rdp_epsilon(3.0, 9, 1e-5) == pytest.approx(rdp_epsilon(1.0, 1, 1e-5), rel=1e-12)


def test_rdp_epsilon_falls_with_noise_and_grows_with_steps() -> None:
    by_noise = [rdp_epsilon(z, 10, 1e-5) for z in (0.5, 1.0, 2.0, 4.0, 8.0)]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:]))
    by_steps = [rdp_epsilon(1.5, steps, 1e-5) for steps in (1, 5, 25, 125)]
    assert all(a < b for a, b in zip(by_steps, by_steps[1:]))


def test_rdp_epsilon_is_the_accounting_every_mechanism_uses() -> None:
    assert rdp_epsilon(1.3, 7, 1e-5, sample_rate=0.25) == epsilon([(1.3, 0.25, 7)], 1e-5, "rdp")


def test_rdp_epsilon_is_smaller_with_subsampling() -> None:
    assert rdp_epsilon(1.0, 20, 1e-5, sample_rate=0.1) < rdp_epsilon(1.0, 20, 1e-5)


# --- the calibration record --------------------------------------------------------------------
def test_calibration_collects_the_formulas_and_the_rdp_epsilons() -> None:
    cal = NbAFLCalibration(clip=1.0, epsilon=5.0, delta=0.01, rounds=50, exposures=10, clients=10, min_samples=100)
    assert cal.sigma_up == pytest.approx(0.1243004, abs=1e-7)
    assert cal.sigma_down == pytest.approx(0.0481414, abs=1e-7)
    # uplink: L releases with z = σ_U / Δs_U = c L / ε = 3.107511 * 10 / 5 = 6.215023
    assert cal.epsilon_rdp_up == pytest.approx(rdp_epsilon(6.215023, 10, 0.01), rel=1e-5)
    # broadcast: T releases of the average, z = sqrt(σ_D² + σ_U²/N) / (2C/(mN)) = sqrt(σ_D² + σ_U²/10) / 0.002
    z_down = math.sqrt(0.0481414**2 + 0.1243004**2 / 10) / 0.002
    assert cal.epsilon_rdp_down == pytest.approx(rdp_epsilon(z_down, 50, 0.01), rel=1e-5)
    line = cal.describe()
    assert "sigma_U=0.1243" in line and "sigma_D=0.04814" in line and "eps/L=0.5" in line and "proven" in line
    assert f"uplink={cal.epsilon_rdp_up:.4g}" in line and f"broadcast={cal.epsilon_rdp_down:.4g}" in line


def test_calibration_flags_a_per_exposure_epsilon_above_one() -> None:
    # the paper's MNIST setting: N = 50, T = L = 25, ε = 60, δ = 0.01 -> ε/L = 2.4, outside the classical proof
    cal = NbAFLCalibration(clip=1.0, epsilon=60.0, delta=0.01, rounds=25, exposures=25, clients=50, min_samples=1200)
    assert cal.sigma_down == 0.0  # T = 25 <= L√N = 176.8
    assert "eps/L=2.4" in cal.describe() and "not proven" in cal.describe()
    assert math.isfinite(cal.epsilon_rdp_up) and cal.epsilon_rdp_up > 0


def test_calibration_with_sampling_uses_theorem_3_and_the_sample_rate() -> None:
    cal = NbAFLCalibration(clip=1.0, epsilon=5.0, delta=0.01, rounds=50, exposures=10, clients=10, sampled=5,
                           min_samples=100)
    assert cal.sigma_down == pytest.approx(0.0193974, abs=1e-7)
    assert "K=5" in cal.describe()
    # broadcast: z = sqrt(σ_D² + σ_U²/K) / (2C/(mK)) = sqrt(σ_D² + σ_U²/5) / 0.004, sampled with q = K/N = 0.5
    z_down = math.sqrt(0.0193974**2 + 0.1243004**2 / 5) / 0.004
    assert cal.epsilon_rdp_down == pytest.approx(rdp_epsilon(z_down, 50, 0.01, sample_rate=0.5), rel=1e-5)


# --- bad input ---------------------------------------------------------------------------------
GOOD = dict(clip=1.0, rounds=50, exposures=10, clients=10, min_samples=100, epsilon=5.0, delta=0.01)
BAD_CALLS: list[tuple[str, Callable[[], Any]]] = [
    ("delta 0", lambda: gaussian_constant(0.0)),
    ("delta 1", lambda: gaussian_constant(1.0)),
    ("clip 0", lambda: uplink_sensitivity(0.0, 10)),
    ("clip nan", lambda: uplink_sensitivity(float("nan"), 10)),
    ("m 0", lambda: uplink_sensitivity(1.0, 0)),
    ("m float", lambda: uplink_sensitivity(1.0, 10.5)),
    ("L 0", lambda: uplink_sigma(1.0, 0, 100, 5.0, 0.01)),
    ("eps < 0", lambda: uplink_sigma(1.0, 10, 100, -1.0, 0.01)),
    ("eps inf", lambda: uplink_sigma(1.0, 10, 100, math.inf, 0.01)),
    ("T 0", lambda: downlink_sigma(**{**GOOD, "rounds": 0})),
    ("N 0", lambda: downlink_sigma(**{**GOOD, "clients": 0})),
    ("T bool", lambda: downlink_sigma(**{**GOOD, "rounds": True})),
    ("K > N", lambda: downlink_sigma_sampled(**GOOD, sampled=11)),
    ("K 0", lambda: downlink_sigma_sampled(**GOOD, sampled=0)),
    ("z 0", lambda: rdp_epsilon(0.0, 1, 1e-5)),
    ("steps 0", lambda: rdp_epsilon(1.0, 0, 1e-5)),
    ("q 0", lambda: rdp_epsilon(1.0, 1, 1e-5, sample_rate=0.0)),
    ("q > 1", lambda: rdp_epsilon(1.0, 1, 1e-5, sample_rate=1.5)),
    ("clip weights C 0", lambda: clip_weights({"w": torch.ones(2)}, 0.0)),
    ("clip integer tensor", lambda: clip_weights({"n": torch.ones(2, dtype=torch.int64)}, 1.0)),
    ("noise sigma < 0", lambda: add_gaussian_noise({"w": torch.ones(2)}, -0.1, torch.Generator())),
    ("noise integer tensor",
     lambda: add_gaussian_noise({"n": torch.ones(2, dtype=torch.int64)}, 0.1, torch.Generator())),
    ("calibration K > N", lambda: NbAFLCalibration(clip=1.0, epsilon=5.0, delta=0.01, rounds=50, exposures=10,
                                                   clients=10, sampled=20, min_samples=100)),
]


@pytest.mark.parametrize("call", [call for _, call in BAD_CALLS], ids=[name for name, _ in BAD_CALLS])
def test_bad_input_raises_value_error(call: Callable[[], Any]) -> None:
    with pytest.raises(ValueError):
        call()
