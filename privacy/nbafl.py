"""NbAFL ("noising before model aggregation"), DP-FedAvg with local noise, as the ``nbafl`` privacy mechanism.

Wei et al., "Federated Learning with Differential Privacy: Algorithms and
Performance Analysis", IEEE TIFS 15:3454-3469, 2020 (arXiv:1911.00222),
Algorithm 1 ("noising before model aggregation FL"). This module holds its calibration (pure
functions, :class:`NbAFLCalibration`) and both halves of the mechanism that a
scenario selects with ``privacy: {mechanism: nbafl, params: {clip, epsilon, ...}}``
(:class:`NbAFLParams`):

* :class:`NbAFLServer`, driven by the round loop: calibrates once every site's
  size is known, sends σ_U in each train config, adds n_D to the aggregate before
  it is broadcast, and reports ε;
* :class:`NbAFLClient`, applied to a site's reply: clips and perturbs the uploaded
  weights and counts the site's exposures in its node state (at most L).

NbAFL's local objective is FedProx's (``proximal_mu`` > 0 as in the paper; μ = 0 is
allowed). It protects any strategy whose sites upload only their (shared) weights
and whose server averages them with the mean; :mod:`privacy.compatibility` decides
that from what the strategy declares and refuses the rest.

Client i (Algorithm 1 of the paper, steps 2-5) minimises
F_i(w) + μ/2 ‖w − w̃^{t−1}‖², clips and perturbs its weights, and the server
averages and may add noise before it broadcasts (steps 6-7):

    w_i ← w_i / max(1, ‖w_i‖₂ / C)                              clip_weights
    w̃_i = w_i + n_U,   n_U ~ N(0, σ_U² I)                       add_gaussian_noise
    w̃  = Σ_i p_i w̃_i + n_D,   n_D ~ N(0, σ_D² I)               add_gaussian_noise

The calibration, in the paper's notation (N clients, K of them sampled per
round), with C the clipping bound,
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

What the formulas assume, and why the RDP-accounted ε (:func:`privacy.accounting.epsilon`) is reported
beside them:

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
  is the one every mechanism uses (:mod:`privacy.accounting`: the sampled
  Gaussian of Mironov, Talwar & Zhang 2019, Poisson sampling at rate K/N).

What w is in a federation (:func:`protected_names`): every floating-point tensor
of the ``"arrays"`` record a site uploads, all clipped together under one norm,
and these must be trained parameters. BatchNorm running statistics are
refused (at scenario load, :mod:`privacy.compatibility`): they are computed from
the data, so sending them unperturbed would leak it, and clipping or noising
them would break normalisation (a running variance scaled or pushed below 0).
Models with GroupNorm/InstanceNorm, or a strategy that keeps BatchNorm local, are
fine. Integer tensors (``num_batches_tracked``) would travel unchanged: they
count local steps, a function of |D_i|, the batch size and the epochs only,
equal for neighbouring data sets (one example replaced, the adjacency of
Δs_U = 2C/m), so they cost no privacy. The server adds n_D to the floating-point
tensors of the aggregate, which are the same names.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from pydantic import BaseModel, ConfigDict, Field

from medtasks.seeding import torch_generator
from privacy.accounting import BudgetExhausted
from privacy.accounting import epsilon as accounted_epsilon
from privacy.gaussian import add_gaussian_noise, protected_names
from strategies.base import (
    ARRAYS_KEY,
    CONFIG_KEY,
    ClientRule,
    Cohort,
    trainable_parameters,
)
from strategies.norms import (
    clip_to_norm as clip_weights,  # w ← w / max(1, ‖w‖₂/C), Algorithm 1 step 3
)

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import LocalSection, Scenario

log = logging.getLogger("medfed")


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

    The accounting every mechanism uses (:func:`privacy.accounting.epsilon` of the history [(z, q, steps)]):
    Rényi DP of one release is α/(2z²) at order α (Mironov 2017; Poisson-subsampled with rate q < 1:
    Mironov, Talwar & Zhang 2019), compositions add up, and the sum is converted to (ε, δ)-DP, minimised
    over Opacus's default orders. Valid for every ε, unlike the classical constant c.

    Parameters
    ----------
    sigma_over_sensitivity : float
        z = σ/Δs, > 0.
    steps : int
        The number of releases, ≥ 1.
    delta : float
        δ, in (0, 1).
    sample_rate : float, default 1.0
        q, the probability that a release includes a given site, in (0, 1].

    Returns
    -------
    float
        ε(δ).

    Raises
    ------
    ValueError
        For an input out of range.
    """
    z = _positive("sigma_over_sensitivity", sigma_over_sensitivity)
    steps, delta = _count("steps", steps), _delta(delta)
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, numbers.Real) or not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    return accounted_epsilon([(z, float(sample_rate), steps)], delta, "rdp")


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


# --- the mechanism: settings and the scenarios it can protect --------------------------------------
SIGMA_UP_KEY = "nbafl-sigma-up"
"""Train-config key of σ_U: the server computes it from every site's size, so no site needs the others'."""

EXPOSURES_KEY = "nbafl-exposures"
"""Name of the ConfigRecord ``{"count": uploads}`` in a node's ``context.state`` (kept between rounds and
checkpointed with it, :mod:`client.state`)."""

EXPOSURES_METRIC = "exposures"  # train metric: this site's uploads so far, this one included
SIGMA_UP_METRIC = "sigma-up"  # train metric: the σ_U this upload was perturbed with

class NbAFLParams(BaseModel):
    """Settings of NbAFL (the ``nbafl`` privacy mechanism, ``privacy.params``).

    Parameters
    ----------
    clip : float
        C, the bound on the L2 norm of a site's upload (all its floating-point tensors together).
    epsilon : float
        ε, the budget σ_U and σ_D are calibrated for; the formulas guarantee it at the end of the run.
    delta : float, default 1e-5
        δ of the (ε, δ) guarantee.
    exposures : int or None, default None
        L, the uploads of one site the noise is calibrated for; ``None`` means ``strategy.rounds`` (a site
        may be sampled every round). A site asked for more refuses (:class:`ExposureLimitReached`).
    on_exhausted : {"stop-client", "stop-run"}, default "stop-client"
        What a site at its L exposures stops: itself (the run goes on without it) or the whole run.
    """

    model_config = ConfigDict(extra="forbid")

    clip: float = Field(gt=0.0, allow_inf_nan=False,
                        description="C, the bound on the L2 norm of a site's upload (its floating-point tensors together)")
    epsilon: float = Field(
        gt=0.0, allow_inf_nan=False,
        description="ε the noise σ_U and σ_D are calibrated for (Wei et al. 2020); guaranteed at the end of the run",
    )
    delta: float = Field(1e-5, gt=0.0, lt=1.0, description="δ of the (ε, δ) guarantee, in (0, 1)")
    exposures: int | None = Field(
        None, ge=1, description="L, the uploads per site the noise is calibrated for; a site refuses more "
                                "(null = strategy.rounds)",
    )
    on_exhausted: Literal["stop-client", "stop-run"] = Field(
        "stop-client", description="what a site at its L exposures stops: itself (the run goes on without it) or the "
                                   "whole run"
    )

    def exposures_for(self, rounds: int) -> int:
        """L: ``exposures``, or ``rounds`` when unset."""
        return rounds if self.exposures is None else self.exposures


class ExposureLimitReached(BudgetExhausted):
    """A site asked to upload more often than the L exposures its noise was calibrated for."""

    def __init__(self, uploads: int, exposures: int, epsilon: float) -> None:
        super().__init__(
            f"NbAFL: this site has uploaded its weights {uploads} times, the L = {exposures} exposures sigma_U was "
            f"calibrated for (epsilon {epsilon:g}); another upload would exceed that privacy analysis"
        )


def check_params(scenario: Scenario) -> None:
    """Refuse settings of ``privacy.params`` that do not fit the scenario (which strategies NbAFL can protect
    is :mod:`privacy.compatibility`'s decision).

    Parameters
    ----------
    scenario : Scenario
        A scenario with ``privacy.mechanism: nbafl``.

    Raises
    ------
    ValueError
        (one line) ``exposures`` above ``strategy.rounds``: a site uploads at most once a round.
    """
    params = NbAFLParams.model_validate(scenario.privacy.params)
    if params.exposures is not None and params.exposures > scenario.strategy.rounds:
        raise ValueError(
            f"privacy.params.exposures {params.exposures} exceeds strategy.rounds {scenario.strategy.rounds} "
            "(a site uploads at most once a round)"
        )


def _replaced(tensors: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """``tensors`` in their order, those named in ``new`` replaced by it."""
    return ArrayRecord({name: new.get(name, tensor) for name, tensor in tensors.items()})


def exposures_so_far(state: RecordDict) -> int:
    """How often this node has uploaded its weights under NbAFL (0 before its first upload)."""
    if EXPOSURES_KEY not in state:
        return 0
    count = state.config_records[EXPOSURES_KEY]["count"]
    if isinstance(count, list):
        raise ValueError(f"corrupt '{EXPOSURES_KEY}' state: 'count' is a list")
    return int(count)


# --- the server half (Algorithm 1, steps 6-7) ----------------------------------------------------------
class NbAFLServer:
    """Server half of NbAFL, driven by the round loop (a :class:`privacy.ServerPrivacy`).

    Sends σ_U in every train config (:meth:`configure`) and perturbs the aggregate before it is broadcast,
    w̃ = Σ_i p_i w̃_i + n_D with n_D ~ N(0, σ_D² I) on its floating-point tensors (:meth:`after_aggregate`).

    Parameters
    ----------
    calibration : NbAFLCalibration
        The run's noise (:meth:`from_discovery` builds it from a scenario and the sites' sizes).
    seed : int
        The scenario's seed; round t's n_D comes from the stream (seed, "nbafl-downlink", t).
    sizes : Collection[int], default ()
        n_train of each site (only to warn when they differ).
    """

    def __init__(self, calibration: NbAFLCalibration, seed: int, sizes: Collection[int] = ()) -> None:
        self.calibration = calibration
        self.seed = seed
        self.sizes = sorted(sizes)

    @classmethod
    def from_discovery(cls, scenario: Scenario, stats: Mapping[int, Mapping[str, Any]]) -> NbAFLServer:
        """The calibration of ``scenario`` with m = min_i n_train,i over the sites (``stats`` from discovery).

        N = ``partition.clients``, K = the sites a round samples (:meth:`Cohort.sample_size`; Theorem 3 when
        K < N, Theorem 1 otherwise), T = ``strategy.rounds``, L = ``exposures`` or T.

        Raises
        ------
        ValueError
            (one line) if a site's statistics have no ``n_train``.
        """
        missing = sorted(pid for pid, site in stats.items() if "n_train" not in site)
        if missing:
            raise ValueError(f"privacy.mechanism nbafl needs each site's training-set size, but the data "
                             f"statistics of site(s) {missing} have no 'n_train'")
        params = NbAFLParams.model_validate(scenario.privacy.params)
        section, clients = scenario.strategy, scenario.partition.clients
        sampled = Cohort.sample_size(clients, section.fraction_train, section.min_clients)
        sizes = [int(site["n_train"]) for site in stats.values()]
        calibration = NbAFLCalibration(
            clip=params.clip, epsilon=params.epsilon, delta=params.delta, rounds=section.rounds,
            exposures=params.exposures_for(section.rounds), clients=clients, min_samples=min(sizes),
            sampled=None if sampled == clients else sampled,
        )
        return cls(calibration, scenario.seed, sizes)

    @property
    def epsilon(self) -> float:
        """The formula's ε, what NbAFL guarantees at the end of the run (each round's record reports it)."""
        return self.calibration.epsilon

    @property
    def sampled(self) -> int:
        """K, the sites a round samples."""
        cal = self.calibration
        return cal.clients if cal.sampled is None else cal.sampled

    def summary(self) -> None:
        """Log the calibration, and what weakens it in this run."""
        cal = self.calibration
        log.info("%s", cal.describe())
        if len(set(self.sizes)) > 1:
            log.warning("NbAFL: the sites' n_train differ (%d to %d) and FedAvg weighs them by size: the broadcast's "
                        "sensitivity is max_i 2C p_i/m (Lemma 1), above the 2C/(mN) sigma_D is calibrated for",
                        self.sizes[0], self.sizes[-1])
        uploads = cal.rounds * self.sampled / cal.clients
        if cal.exposures < uploads:
            log.warning("NbAFL: L = %d exposures is below the %.3g uploads a site makes on average (T K/N); a site "
                        "refuses to train once it has uploaded L times", cal.exposures, uploads)

    def configure(self, config: ConfigRecord, server_round: int) -> None:
        """Put σ_U into a round's train config (:data:`SIGMA_UP_KEY`)."""
        config[SIGMA_UP_KEY] = self.calibration.sigma_up

    def before_aggregate(self, replies: list[Message], sent: ArrayRecord, server_round: int, cohort: Cohort) -> None:
        """Nothing: the sites perturbed their uploads themselves."""

    def after_aggregate(self, arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        """w̃ = w + n_D on the aggregate's floating-point tensors (step 7), ``arrays`` itself when σ_D = 0."""
        sigma = self.calibration.sigma_down
        if sigma == 0.0:
            return arrays
        tensors = arrays.to_torch_state_dict()
        floating = {name: tensor for name, tensor in tensors.items() if torch.is_floating_point(tensor)}
        noisy = add_gaussian_noise(floating, sigma, torch_generator(self.seed, "nbafl-downlink", server_round))
        return _replaced(tensors, noisy)

    def report(self) -> dict[str, Any]:
        """The privacy block of ``summary.json``: the formula's (ε, δ) and the RDP-accounted ε of the same noise."""
        cal = self.calibration
        return {
            "epsilon": cal.epsilon, "delta": cal.delta, "epsilon_formula_proven": cal.epsilon / cal.exposures < 1,
            "epsilon_rdp_uplink": cal.epsilon_rdp_up, "epsilon_rdp_broadcast": cal.epsilon_rdp_down,
            "sigma_up": cal.sigma_up, "sigma_down": cal.sigma_down, "clip": cal.clip, "rounds": cal.rounds,
            "exposures": cal.exposures, "clients": cal.clients, "sampled": self.sampled,
            "min_samples": cal.min_samples,
        }


# --- the client half (Algorithm 1, steps 3-5) -----------------------------------------------------------
class NbAFLClient:
    """Client half of NbAFL, applied to a site's reply (a :class:`privacy.ClientPrivacy`).

    Parameters
    ----------
    params : NbAFLParams
        The mechanism's settings.
    exposures : int
        L.
    train_size : int
        |D_i|, this site's training examples: σ_U must be at least what they alone call for,
        c L (2C/|D_i|) / ε (the server computes it from m = min_j |D_j| ≤ |D_i|).
    generator : torch.Generator
        The noise stream; :meth:`for_round` derives it from (seed, "nbafl-uplink", round, partition).
    rule : ClientRule or None, default None
        The strategy's client rule, whose declaration (:meth:`~strategies.base.ClientRule.uploads`) names the
        record of weights to perturb (``None``: the plain rule's, ``"arrays"``).
    """

    def __init__(self, params: NbAFLParams, *, exposures: int, train_size: int, generator: torch.Generator,
                 rule: ClientRule | None = None) -> None:
        self.params = params
        self.exposures = exposures
        self.train_size = train_size
        self.generator = generator
        self.rule = rule
        self._sigma: float | None = None  # σ_U of the upload protect perturbed

    @classmethod
    def for_round(cls, scenario: Scenario, server_round: int, partition_id: int, train_size: int,
                  rule: ClientRule | None = None) -> NbAFLClient:
        """The client half of ``scenario`` for one round of one site (``rule``: the strategy's client rule)."""
        params = NbAFLParams.model_validate(scenario.privacy.params)
        generator = torch_generator(scenario.seed, "nbafl-uplink", server_round, partition_id)
        return cls(params, exposures=params.exposures_for(scenario.strategy.rounds), train_size=train_size,
                   generator=generator, rule=rule)

    def admit(self, state: RecordDict) -> None:
        """Let this site train unless it has uploaded L times already (checked before any training).

        Raises
        ------
        ExposureLimitReached
            After L uploads.
        """
        uploads = exposures_so_far(state)
        if uploads >= self.exposures:
            raise ExposureLimitReached(uploads, self.exposures, self.params.epsilon)

    def private_training(self) -> None:
        """NbAFL leaves local training as it is."""
        return

    def protect(self, records: Mapping[str, Any], model: torch.nn.Module, received: RecordDict,
                state: RecordDict) -> dict[str, Any]:
        """Steps 3-4 on the reply: w ← w / max(1, ‖w‖₂/C), then w̃ = w + n_U with n_U ~ N(0, σ_U² I).

        w is :func:`protected_names` of the declared record of weights (one norm over all of them).

        Returns
        -------
        dict
            The records to send.

        Raises
        ------
        ValueError
            (one line) σ_U missing from the received config or below what this site needs; another array
            record in the reply (it would travel unperturbed); floating-point tensors that are not trained.
        """
        from privacy.compatibility import protected_upload

        sigma = self._sigma_up(received.config_records[CONFIG_KEY])
        record = ARRAYS_KEY if self.rule is None else protected_upload(self.rule.uploads(model))[0]
        others = sorted(name for name, value in records.items() if isinstance(value, ArrayRecord) and name != record)
        if others:
            raise ValueError(f"privacy.mechanism nbafl: the reply also sends {others}, which NbAFL does not perturb")
        tensors = records[record].to_torch_state_dict()
        names = protected_names(tensors, trainable_parameters(model), "nbafl")
        clipped = clip_weights({name: tensors[name] for name in names}, self.params.clip)
        noisy = add_gaussian_noise(clipped, sigma, self.generator)
        self._sigma = sigma
        return {**records, record: _replaced(tensors, noisy)}

    def spend(self, state: RecordDict) -> dict[str, float]:
        """Count the upload :meth:`protect` perturbed as one exposure in ``state`` (once the reply is built).

        Returns
        -------
        dict
            The train metrics ``exposures`` (this one included) and ``sigma-up``.
        """
        assert self._sigma is not None, "spend() before protect()"
        uploads = exposures_so_far(state) + 1
        state[EXPOSURES_KEY] = ConfigRecord({"count": uploads})
        return {EXPOSURES_METRIC: uploads, SIGMA_UP_METRIC: self._sigma}

    def close(self) -> None:
        """Nothing to release."""

    def _sigma_up(self, config: ConfigRecord) -> float:
        """σ_U from the server, checked against this site's own requirement c L (2C/|D_i|) / ε."""
        if SIGMA_UP_KEY not in config:
            raise ValueError(f"privacy.mechanism nbafl: the train message has no '{SIGMA_UP_KEY}' (the server's half "
                             "of NbAFL did not run)")
        value = config[SIGMA_UP_KEY]
        if isinstance(value, list):
            raise ValueError(f"privacy.mechanism nbafl: '{SIGMA_UP_KEY}' is a list, not a number")
        sigma = float(value)
        p = self.params
        needed = uplink_sigma(p.clip, self.exposures, self.train_size, p.epsilon, p.delta)
        if not sigma >= needed * (1 - 1e-9):
            raise ValueError(f"NbAFL: the server's sigma_U {sigma:.4g} is below {needed:.4g}, what this site's "
                             f"{self.train_size} examples need for epsilon {p.epsilon:g}; nothing uploaded")
        return sigma


def client_privacy(scenario: Scenario, server_round: int, partition_id: int, train_size: int,
                   local: LocalSection, rule: ClientRule) -> NbAFLClient:
    """The client half of NbAFL for one round of one site (:func:`privacy.client_privacy`)."""
    return NbAFLClient.for_round(scenario, server_round, partition_id, train_size, rule)
