"""The robust strategy names: FedAvg's two halves with a Byzantine-robust rule of :mod:`strategies.aggregation`.

* ``fedmedian``: coordinate-wise median (Yin et al., ICML 2018, arXiv:1803.01498).
* ``fedtrimmedavg``: coordinate-wise β-trimmed mean (same paper).
* ``krum`` / ``multikrum``: the update(s) closest to their n − f − 2 nearest neighbours (Blanchard et al.,
  NeurIPS 2017, arXiv:1703.02757); Multi-Krum averages its m picks with equal weights.
* ``bulyan``: θ = n − 2f repeated Krum picks, then per coordinate the mean of the β = θ − 2f values closest to
  their median (El Mhamdi et al., ICML 2018, arXiv:1802.07927).

Each name is an alias: ``strategy.name: krum`` with ``strategy.params: {num_malicious_nodes: 1}`` runs exactly
what ``strategy.name: fedavg`` with ``defense: {aggregation: krum, params: {num_malicious_nodes: 1}}`` runs.
Its ``strategy.params`` are FedAvg's (``proximal_mu``, ``bn_stats``: the clients train as for FedAvg) plus the
rule's own, and the scenario is checked up front for enough clients per round (Krum: n > 2f + 2; Bulyan:
n ≥ 4f + 3; trimmed mean: ⌊βn⌋ ≥ 1; Multi-Krum: m ≤ n − f). ``defense.norm_bound`` combines with them;
``defense.aggregation`` must then stay ``mean`` (the rule is chosen in one place).
"""

from __future__ import annotations

from dataclasses import replace

from strategies import fedavg
from strategies.aggregation import (
    BulyanParams,
    KrumParams,
    MedianParams,
    MultiKrumParams,
    TrimmedMeanParams,
    check_rule,
)
from strategies.base import Algorithm
from strategies.fedavg import FedAvgParams


class FedMedianParams(FedAvgParams, MedianParams):
    """``strategy.params`` of ``fedmedian``: FedAvg's."""


class FedTrimmedAvgParams(FedAvgParams, TrimmedMeanParams):
    """``strategy.params`` of ``fedtrimmedavg``: FedAvg's and ``beta``."""


class FedKrumParams(FedAvgParams, KrumParams):
    """``strategy.params`` of ``krum``: FedAvg's and ``num_malicious_nodes``."""


class FedMultiKrumParams(FedAvgParams, MultiKrumParams):
    """``strategy.params`` of ``multikrum``: FedAvg's, ``num_malicious_nodes`` and ``num_nodes_to_select``."""


class FedBulyanParams(FedAvgParams, BulyanParams):
    """``strategy.params`` of ``bulyan``: FedAvg's and ``num_malicious_nodes``."""


def _alias(name: str, params: type[FedAvgParams]) -> Algorithm:
    """FedAvg's :data:`~strategies.fedavg.ALGORITHM` under ``name``; its server half reads the rule from the
    scenario (:meth:`strategies.aggregation.Aggregator.from_scenario`)."""
    return replace(fedavg.ALGORITHM, name=name, Params=params, check_compatible=check_rule)


FEDMEDIAN = _alias("fedmedian", FedMedianParams)
FEDTRIMMEDAVG = _alias("fedtrimmedavg", FedTrimmedAvgParams)
KRUM = _alias("krum", FedKrumParams)
MULTIKRUM = _alias("multikrum", FedMultiKrumParams)
BULYAN = _alias("bulyan", FedBulyanParams)
