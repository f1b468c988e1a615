r"""Privacy accounting shared by the mechanisms: the history of Gaussian steps and its ε(δ).

A history is a list of entries (σ, q, steps): ``steps`` applications of the
Poisson-subsampled Gaussian mechanism with noise multiplier σ (noise standard
deviation σ times the sensitivity) and sampling rate q. DP-SGD
(:mod:`privacy.dpsgd`) adds one entry per local round of a node (q = the batch's
sampling rate); client-level central DP (:mod:`privacy.central`) adds one step
per federated round (q = the cohort's share of the sites); NbAFL (:mod:`privacy.nbafl`)
reports the RDP ε of its calibrated noise through :func:`epsilon` too, so every
mechanism uses one RDP path and one order grid. ε(δ) of the whole history comes
from one of Opacus's accountants:

* ``"rdp"``: Rényi DP (Mironov 2017, arXiv:1702.07476; subsampled Gaussian of
  Mironov, Talwar & Zhang 2019, arXiv:1908.10530). RDP of order α adds up over
  steps, ε(δ) = min_α [RDP_α + log(1/δ)/(α − 1)]: conservative and fast.
* ``"prv"``: privacy loss random variables composed numerically by FFT (Gopi,
  Lee & Wutschitz 2021, arXiv:2106.02848): a tighter upper bound, slower.

Consecutive entries with the same (σ, q) are merged exactly as Opacus's
accountants merge their own steps (:func:`merge_history`), so a history built
round by round and an accountant that saw every step hold the same list and
give the same ε. Opacus is imported only when ε is computed.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from opacus.accountants import IAccountant

Accountant = Literal["rdp", "prv"]
"""The accountants a scenario can select."""

Entry = tuple[float, float, int]
"""One accountant entry: (noise multiplier σ, sampling rate q, number of steps)."""


BUDGET_EXHAUSTED_CODE = 901
"""Error code of a site's train reply that refuses to train because its privacy budget is spent (any
:class:`BudgetExhausted`); the round loop tells it from other failures by this code, not by its text."""


class BudgetExhausted(RuntimeError):
    """A privacy budget (a site's or the run's) does not allow another round: the typed outcome every
    mechanism raises, whatever its analysis."""


class PrivacyBudgetExhausted(BudgetExhausted):
    """The next round would take ε (a node's, or the run's) past ``target_epsilon``.

    Attributes
    ----------
    spent : float
        ε of the history so far.
    next_epsilon : float
        ε the history would have after the next round.
    target : float
        The budget.
    """

    def __init__(self, spent: float, next_epsilon: float, target: float, delta: float) -> None:
        self.spent, self.next_epsilon, self.target = spent, next_epsilon, target
        super().__init__(
            f"privacy budget spent: ε = {spent:.4g} so far, the next round would reach "
            f"{next_epsilon:.4g} > target_epsilon {target:g} (δ = {delta:g})"
        )



def merge_history(history: Sequence[Entry], entries: Sequence[Entry]) -> list[Entry]:
    """``history`` followed by ``entries``, merging consecutive entries of equal (σ, q).

    Opacus's accountants merge their own steps the same way, so a history built
    round by round equals the one an accountant that saw every step would hold.
    """
    merged = [(float(s), float(q), int(n)) for s, q, n in history]
    for sigma, rate, steps in entries:
        if steps <= 0:
            continue
        if merged and merged[-1][0] == float(sigma) and merged[-1][1] == float(rate):
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + int(steps))
        else:
            merged.append((float(sigma), float(rate), int(steps)))
    return merged



def make_accountant(history: Sequence[Entry], accountant: Accountant) -> IAccountant:
    """A fresh Opacus accountant (``RDPAccountant`` or ``PRVAccountant``) holding ``history``."""
    from opacus.accountants import create_accountant

    fresh = create_accountant(mechanism=accountant)
    fresh.history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    return fresh


def epsilon(history: Sequence[Entry], delta: float, accountant: Accountant = "rdp") -> float:
    """ε(δ) of the composition of every step in ``history`` (0 when empty, ∞ if some σ = 0).

    RDP composes additively and linearly in the number of steps (Mironov 2017,
    Prop. 1): ε_RDP(α) = Σ_entries steps · ε_step(α; σ, q). The per-step curve of a
    (σ, q) pair is computed once per process (:func:`_rdp_per_step`), which is what
    Opacus's ``RDPAccountant`` computes for every entry on every call; the result is
    the same number, without recomputing the series each round for every site. PRV
    composes numerically (a fraction of a second per call), so its results are cached
    per history: a run asks for the same ε in several records of a round.
    """
    steps = tuple((float(s), float(q), int(n)) for s, q, n in history if n > 0)
    if accountant == "prv":
        return _prv_epsilon(steps, float(delta))
    return _epsilon(steps, delta, accountant)


@functools.lru_cache(maxsize=512)
def _prv_epsilon(steps: tuple[Entry, ...], delta: float) -> float:
    return _epsilon(steps, delta, "prv")


def _epsilon(steps: Sequence[Entry], delta: float, accountant: Accountant) -> float:
    if not steps:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in steps):
        return math.inf
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(np.asarray(_rdp_per_step(float(s), float(q))) * int(n) for s, q, n in steps)
        with warnings.catch_warnings():  # an optimum at the grid's end gives a looser bound, still a valid one
            warnings.filterwarnings("ignore", message="Optimal order is the")
            return float(get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)[0])
    return float(make_accountant(steps, accountant).get_epsilon(delta=delta))


@functools.lru_cache(maxsize=256)
def _rdp_per_step(sigma: float, sample_rate: float) -> tuple[float, ...]:
    """ε_RDP(α) of one subsampled Gaussian step at Opacus's default orders α."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def budget_left(history: Sequence[Entry], delta: float, accountant: Accountant,
                target_epsilon: float) -> float:
    """``target_epsilon − ε(history)`` (negative once the budget is overspent)."""
    return target_epsilon - epsilon(history, delta, accountant)


def check_budget(history: Sequence[Entry], next_round: Sequence[Entry], *, delta: float,
                 accountant: Accountant, target_epsilon: float) -> float:
    """ε after ``next_round`` if it stays within ``target_epsilon``.

    Raises
    ------
    PrivacyBudgetExhausted
        If ε(history + next_round) > target_epsilon.
    """
    after = epsilon(merge_history(history, next_round), delta, accountant)
    if after > target_epsilon:
        raise PrivacyBudgetExhausted(epsilon(history, delta, accountant), after, target_epsilon, delta)
    return after


@functools.lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: Accountant = "rdp") -> float:
    """The σ for which ``steps`` steps at sampling rate q give ε ≤ ``target_epsilon``.

    Opacus's binary search (``get_noise_multiplier``, tolerance 0.01 in ε); the
    result is the upper end of the bracket, so ε(σ) ≤ target. Cached per process:
    every round of a node asks for the same σ (PRV searches take seconds).

    Raises
    ------
    ValueError
        If no σ ≤ 10⁶ reaches the target.
    """
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():  # the search probes huge σ, whose best RDP order is the largest one
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=sample_rate, steps=steps, accountant=accountant))
