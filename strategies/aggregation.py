r"""How the server combines the sites' uploads: the mean, or a Byzantine-robust rule, after an optional norm bound.

A scenario chooses both in its ``defense`` section, for every strategy that averages (``combine: average``,
:data:`strategies.base.Combine`): FedAvg and FedProx (the weights w_k), SCAFFOLD (the model part w_k; its
control variate is not touched), FedBN and FedPer (the shared tensors), FedSGD (the model w_t − η g_k each
gradient proposes). The strategy names ``fedmedian``, ``fedtrimmedavg``, ``krum``, ``multikrum`` and
``bulyan`` are FedAvg with that rule (:data:`ROBUST_STRATEGIES`, registered in :mod:`strategies.robust`).

Every strategy aggregates through one :class:`Aggregator`, built from the scenario
(:meth:`Aggregator.from_scenario`). It takes the sites' tensors x_k (state dicts, in partition-id order), their
weights and, for the norm bound, the tensors x_t the server sent, and computes

.. math::

    \tilde x_k = x_t + \Delta_k \min\Bigl(1, \frac{C}{\lVert \Delta_k \rVert_2}\Bigr), \quad
    \Delta_k = x_k - x_t \qquad \text{(norm bound } C\text{, floating tensors only)}

    x_{t+1} = \mathrm{Rule}(\tilde x_k : k \in S_t)

Norm bound: Sun et al., "Can You Really Backdoor Federated Learning?", 2019 (arXiv:1911.07963): a scaled
(model-replacement) update is shrunk to the norm an honest update has. ‖Δ_k‖₂ is taken over every floating
tensor the site sends (parameters and floating buffers such as BatchNorm running statistics, in float64);
integer tensors (``num_batches_tracked``) are left as they are.

Rules (the maths is Flower's, :mod:`flwr.serverapp.strategy`, on float64 copies; the result takes each
tensor's dtype again, integer tensors rounded to the nearest integer; ``mean`` keeps integers' maximum):

* ``mean``: Σ_k (w_k / Σ_j w_j) x_k, accumulated in float64 in partition-id order
  (:func:`strategies.base.weighted_average`, bit-identical to the strategies before this module existed).
* ``median``: coordinate-wise median (Yin et al., ICML 2018, arXiv:1803.01498).
* ``trimmed_mean``: per coordinate, drop the ⌊βn⌋ smallest and largest values, average the rest (same paper).
* ``krum``: the x_k with the smallest score s(k) = Σ_{j ∈ N_k} ‖x_k − x_j‖², N_k its n − f − 2 nearest others
  (Blanchard et al., NeurIPS 2017, arXiv:1703.02757).
* ``multikrum``: the plain mean of the m lowest-scoring x_k (same paper). Unlike Flower's ``MultiKrum``, the
  selected updates are NOT weighted by their self-reported example counts: one selected attacker claiming
  10⁶ examples would otherwise pull the result onto its own update.
* ``bulyan``: El Mhamdi et al., ICML 2018 (arXiv:1802.07927): θ = n − 2f rounds of Krum on the remaining set
  (pick the winner, remove it), then per coordinate the mean of the β = θ − 2f selected values closest to
  their median (:func:`bulyan`, which says how this differs from Flower's ``Bulyan``).

The weights matter for ``mean`` only; the robust rules treat every site alike. Each rule states how many
updates per round it needs (:meth:`RuleParams.shortfall`): scenarios are checked against the clients sampled
per round when loaded, and a round with fewer usable updates fails with the reason in the log.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from flwr.serverapp.strategy.bulyan import aggregate_n_closest_weights
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from pydantic import BaseModel, ConfigDict, Field

from strategies.base import Cohort, weighted_average
from strategies.norms import l2_norm

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Combine

log = logging.getLogger("medfed")

ROBUST_STRATEGIES: dict[str, str] = {
    "fedmedian": "median",
    "fedtrimmedavg": "trimmed_mean",
    "krum": "krum",
    "multikrum": "multikrum",
    "bulyan": "bulyan",
}
"""Strategy name → the aggregation rule it stands for (FedAvg's clients, that rule on the server)."""


def aggregation_rule(scenario: Scenario) -> str:
    """The rule a scenario's server aggregates with: its robust strategy's, else ``defense.aggregation``.

    Parameters
    ----------
    scenario : Scenario
        A validated scenario.

    Returns
    -------
    str
        One of ``mean``, ``median``, ``trimmed_mean``, ``krum``, ``multikrum``, ``bulyan``.
    """
    return ROBUST_STRATEGIES.get(scenario.strategy.name, scenario.defense.aggregation)


# --- the rules' settings --------------------------------------------------------------------------
class RuleParams(BaseModel):
    """Settings of an aggregation rule (``defense.params``, or a robust strategy's ``strategy.params``)."""

    model_config = ConfigDict(extra="forbid")

    rule: ClassVar[str] = "mean"

    def shortfall(self, n: int, prefix: str = "defense.params") -> str | None:
        """Why ``n`` updates per round are too few for the rule, or ``None``.

        Parameters
        ----------
        n : int
            Updates per round.
        prefix : str
            Where the settings come from (``defense.params`` or ``strategy.params``), for the message.

        Returns
        -------
        str or None
            ``'<prefix>.<key>: <why>'``, one line.
        """
        return None

    def describe(self) -> str:
        """The rule and its settings, for the run's log."""
        return self.rule

    def apply(self, vectors: Vectors) -> list[np.ndarray]:
        """The robust rule on float64 ``vectors`` (``mean`` is weighted: :meth:`Aggregator.aggregate` does it)."""
        raise ValueError(f"no robust rule for {type(self).__name__}")


class MeanParams(RuleParams):
    """``mean``: Σ_k (w_k / Σ_j w_j) x_k (no settings)."""


class MedianParams(RuleParams):
    """``median``: x_{t+1}[j] = median_k x_k[j] for every coordinate j (no settings)."""

    rule: ClassVar[str] = "median"

    def apply(self, vectors: Vectors) -> list[np.ndarray]:
        return median(vectors)


class TrimmedMeanParams(RuleParams):
    """``trimmed_mean``: per coordinate, drop the ⌊βn⌋ smallest and largest values and average the rest."""

    rule: ClassVar[str] = "trimmed_mean"
    beta: float = Field(0.2, gt=0.0, lt=0.5, description="fraction trimmed at each end")

    def shortfall(self, n: int, prefix: str = "defense.params") -> str | None:
        if int(self.beta * n) < 1:
            return (f"{prefix}.beta: {self.beta} trims floor({self.beta}·{n}) = 0 of {n} updates per round "
                    f"at each end, which is the plain mean; raise beta to at least {1 / n:.3g} or sample more clients")
        return None

    def describe(self) -> str:
        return f"trimmed mean (beta {self.beta})"

    def apply(self, vectors: Vectors) -> list[np.ndarray]:
        return trimmed_mean(vectors, self.beta)


class KrumParams(RuleParams):
    """``krum``: the update with the smallest sum of squared distances to its n − f − 2 nearest others."""

    rule: ClassVar[str] = "krum"
    num_malicious_nodes: int = Field(0, ge=0, description="f, the Byzantine updates to tolerate")

    def shortfall(self, n: int, prefix: str = "defense.params") -> str | None:
        f = self.num_malicious_nodes
        if n <= 2 * f + 2:
            return (f"{prefix}.num_malicious_nodes: {self.describe()} needs n > 2f + 2 = {2 * f + 2} "
                    f"updates per round, but a round has {n}")
        return None

    def describe(self) -> str:
        return f"Krum (f = {self.num_malicious_nodes})"

    def apply(self, vectors: Vectors) -> list[np.ndarray]:
        return multikrum(vectors, self.num_malicious_nodes, 1)


class MultiKrumParams(KrumParams):
    """``multikrum``: the plain mean of the m updates with the smallest Krum scores."""

    rule: ClassVar[str] = "multikrum"
    num_nodes_to_select: int | None = Field(None, ge=1, description="m (default: n − f)")

    def selected(self, n: int) -> int:
        """m for a round of ``n`` updates."""
        return self.num_nodes_to_select or n - self.num_malicious_nodes

    def shortfall(self, n: int, prefix: str = "defense.params") -> str | None:
        problem = super().shortfall(n, prefix)
        if problem is None and self.selected(n) > n - self.num_malicious_nodes:
            return (f"{prefix}.num_nodes_to_select: {self.selected(n)} exceeds n − f = "
                    f"{n - self.num_malicious_nodes}, so a Byzantine update would always be averaged in")
        return problem

    def describe(self) -> str:
        m = self.num_nodes_to_select if self.num_nodes_to_select is not None else "n − f"
        return f"Multi-Krum (f = {self.num_malicious_nodes}, m = {m}, equal weights)"

    def apply(self, vectors: Vectors) -> list[np.ndarray]:
        return multikrum(vectors, self.num_malicious_nodes, self.selected(len(vectors)))


class BulyanParams(RuleParams):
    """``bulyan``: θ = n − 2f repeated Krum picks; per coordinate, the mean of the β = θ − 2f picked values
    closest to their median."""

    rule: ClassVar[str] = "bulyan"
    num_malicious_nodes: int = Field(0, ge=0, description="f, the Byzantine updates to tolerate")

    def shortfall(self, n: int, prefix: str = "defense.params") -> str | None:
        f = self.num_malicious_nodes
        if n < 4 * f + 3:
            return (f"{prefix}.num_malicious_nodes: {self.describe()} needs n ≥ 4f + 3 = {4 * f + 3} "
                    f"updates per round, but a round has {n}")
        return None

    def describe(self) -> str:
        return f"Bulyan (f = {self.num_malicious_nodes})"

    def apply(self, vectors: Vectors) -> list[np.ndarray]:
        return bulyan(vectors, self.num_malicious_nodes)


RULES: dict[str, type[RuleParams]] = {
    "mean": MeanParams,
    "median": MedianParams,
    "trimmed_mean": TrimmedMeanParams,
    "krum": KrumParams,
    "multikrum": MultiKrumParams,
    "bulyan": BulyanParams,
}
"""``defense.aggregation`` → the schema of its ``defense.params`` (the values of :data:`ROBUST_STRATEGIES` too)."""


# --- the rules' maths (float64 numpy arrays, one list of tensors per site, partition-id order) -----------
Vectors = Sequence[Sequence[np.ndarray]]
"""One entry per site: its tensors, in the same order for every site."""


def pairwise_squared_distances(vectors: Vectors) -> np.ndarray:
    """D[i, j] = ‖x_i − x_j‖² over all tensors, as Flower computes it (``multikrum.compute_distances``).

    .. math:: D_{ij} = \\lVert x_i \\rVert^2 + \\lVert x_j \\rVert^2 - 2\\, x_i \\cdot x_j

    Parameters
    ----------
    vectors : sequence of sequences of numpy.ndarray
        Each site's tensors (float64).

    Returns
    -------
    numpy.ndarray
        The (n, n) matrix.
    """
    flat = np.stack([np.concatenate(list(tensors), axis=None).ravel() for tensors in vectors], axis=0)
    norms = np.square(flat).sum(axis=1)
    return norms[:, None] + norms[None, :] - 2 * flat @ flat.T


def krum_ranking(distances: np.ndarray, f: int) -> np.ndarray:
    """Indices by increasing Krum score, exactly as Flower's ``select_multikrum`` orders them.

    .. math:: s(i) = \\sum_{j \\in N_i} D_{ij}, \\quad N_i = \\text{the } \\max(1, n - f - 2)
        \\text{ nearest others of } i

    Parameters
    ----------
    distances : numpy.ndarray
        The (n, n) matrix of :func:`pairwise_squared_distances` (or a principal submatrix of it).
    f : int
        Byzantine updates tolerated.

    Returns
    -------
    numpy.ndarray
        Row indices of ``distances``, lowest score first; equal scores in row order (partition-id order: the
        lower partition id first; Flower's unstable ``argsort`` may order exact ties otherwise).
    """
    num_closest = max(1, len(distances) - f - 2)
    scores = [np.sum(row[np.argsort(row)[1:num_closest + 1]]) for row in distances]
    return np.argsort(scores, kind="stable")


def median(vectors: Vectors) -> list[np.ndarray]:
    """Coordinate-wise median (Flower's ``FedMedian``: ``np.median`` over the stacked sites)."""
    return [np.asarray(np.median(np.stack(layer), axis=0)) for layer in zip(*vectors)]


def trimmed_mean(vectors: Vectors, beta: float) -> list[np.ndarray]:
    """Coordinate-wise β-trimmed mean (Flower's ``FedTrimmedAvg``: its ``trim_mean``)."""
    return [np.asarray(trim_mean(np.stack(layer), beta)) for layer in zip(*vectors)]


def multikrum(vectors: Vectors, f: int, m: int) -> list[np.ndarray]:
    """The plain mean of the m lowest-scoring updates (m = 1: Krum's pick itself).

    .. math:: x_{t+1} = \\frac{1}{m} \\sum_{i \\in M} x_i, \\quad M = \\text{the } m
        \\text{ lowest } s(i)

    The selection is Flower's (``select_multikrum``); the average is unweighted (Flower weights by
    ``num-examples``, which each site reports about itself). Summed in partition-id order.
    """
    chosen = sorted(krum_ranking(pairwise_squared_distances(vectors), f)[:m].tolist())
    if m == 1:
        return [np.array(tensor, copy=True) for tensor in vectors[chosen[0]]]
    return [np.asarray(np.mean(np.stack([vectors[i][layer] for i in chosen]), axis=0))
            for layer in range(len(vectors[0]))]


def bulyan_selection(vectors: Vectors, f: int) -> list[int]:
    """Bulyan's selection: θ = n − 2f times, the Krum winner among the remaining updates, removed from them.

    El Mhamdi et al. 2018 (arXiv:1802.07927), Sec. 4: R ← all, S ← ∅; while |S| < θ: i ← Krum(R) (scores over
    the |R| − f − 2 nearest others within R, at least 1), R ← R ∖ {i}, S ← S ∪ {i}. The distances are computed
    once. Once |R| ≤ f + 3 each score is the distance to the nearest other, so the closest pair ties; ties go to
    the lower partition id.

    Returns
    -------
    list of int
        The θ selected indices, in partition-id order.
    """
    distances = pairwise_squared_distances(vectors)
    remaining = list(range(len(vectors)))
    chosen: list[int] = []
    for _ in range(len(vectors) - 2 * f):
        sub = distances[np.ix_(remaining, remaining)]
        chosen.append(remaining.pop(int(krum_ranking(sub, f)[0])))
    return sorted(chosen)


def bulyan(vectors: Vectors, f: int) -> list[np.ndarray]:
    """Bulyan (El Mhamdi et al., ICML 2018, arXiv:1802.07927) around repeated Krum.

    .. math::

        S = \\text{θ} = n - 2f \\text{ successive Krum winners}, \\qquad
        x_{t+1}[j] = \\frac{1}{\\beta} \\sum_{i \\in B_j} x_i[j],

    B_j the β = θ − 2f members of S whose j-th coordinate is closest to median_{i∈S} x_i[j].

    Differs from Flower's ``Bulyan``, which selects the θ updates with the lowest Krum scores computed ONCE over
    all n (one-shot Multi-Krum): here each pick is Krum on what remains, as in the paper, so the scores of the
    later picks no longer count the already-picked updates as neighbours. The second stage is Flower's
    (``np.median`` and ``aggregate_n_closest_weights``).
    """
    chosen = [vectors[i] for i in bulyan_selection(vectors, f)]
    theta = len(chosen)
    medians = [np.median(np.stack(layer), axis=0) for layer in zip(*chosen)]
    return [np.asarray(a) for a in aggregate_n_closest_weights(medians, [list(v) for v in chosen], theta - 2 * f)]


# --- the norm bound -------------------------------------------------------------------------------
def update_norm(state: Mapping[str, torch.Tensor], origin: Mapping[str, torch.Tensor]) -> float:
    """‖Δ‖₂ = ‖state − origin‖₂ over the floating tensors of ``state``, in float64."""
    return l2_norm({name: value.double() - origin[name].double() for name, value in state.items()
                    if value.is_floating_point()})


def bound_update(state: Mapping[str, torch.Tensor], origin: Mapping[str, torch.Tensor],
                 bound: float) -> dict[str, torch.Tensor]:
    """origin + Δ · min(1, C / ‖Δ‖₂), Δ = state − origin over the floating tensors (float64); integer tensors as sent.

    Sun et al. 2019 (arXiv:1911.07963), "norm thresholding of updates".

    Parameters
    ----------
    state : mapping of str to torch.Tensor
        A site's tensors x_k.
    origin : mapping of str to torch.Tensor
        What the server sent, x_t (at least the names of ``state``).
    bound : float
        C > 0.

    Returns
    -------
    dict of str to torch.Tensor
        The bounded tensors, floating ones in float64.
    """
    norm = update_norm(state, origin)
    factor = 1.0 if norm <= bound else bound / norm
    bounded: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if value.is_floating_point():
            start = origin[name].double()
            bounded[name] = value.double() if factor == 1.0 else start + (value.double() - start) * factor
        else:
            bounded[name] = value
    return bounded


# --- the aggregator ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Aggregator:
    """How a strategy turns the sites' tensors into one: norm bound, then rule.

    Attributes
    ----------
    params : RuleParams
        The rule and its settings (default: ``mean``).
    norm_bound : float or None
        C of the norm bound (``None``: no bound).
    source : str
        Where the rule's settings come from (``defense.params`` or ``strategy.params``), for messages.
    """

    params: RuleParams = field(default_factory=MeanParams)
    norm_bound: float | None = None
    source: str = "defense.params"

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> Aggregator:
        """The aggregator a validated scenario asks for (a robust strategy name's rule, else ``defense``)."""
        rule = aggregation_rule(scenario)
        schema = RULES[rule]
        if scenario.strategy.name in ROBUST_STRATEGIES:
            settings = {k: v for k, v in scenario.strategy.params.items() if k in schema.model_fields}
            source = "strategy.params"
        else:
            settings, source = dict(scenario.defense.params), "defense.params"
        return cls(schema.model_validate(settings), scenario.defense.norm_bound, source)

    @property
    def rule(self) -> str:
        """The rule's name (``mean``, ``median``, ...)."""
        return self.params.rule

    @property
    def is_plain_mean(self) -> bool:
        """The mean without a norm bound: exactly :func:`strategies.base.weighted_average`."""
        return isinstance(self.params, MeanParams) and self.norm_bound is None

    def describe(self) -> str:
        """The rule, its settings and the norm bound, for the run's log."""
        bound = f", updates bounded to L2 norm {self.norm_bound:g}" if self.norm_bound is not None else ""
        return self.params.describe() + bound

    def shortfall(self, n: int) -> str | None:
        """Why ``n`` updates are too few for the rule (one line naming the key), or ``None``."""
        return self.params.shortfall(n, self.source)

    def aggregate(self, states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float],
                  origin: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """x_{t+1} = Rule(bounded x_k) for every tensor name of ``states[0]``.

        Parameters
        ----------
        states : sequence of mappings of str to torch.Tensor
            The sites' tensors x_k, in partition-id order, all with the same names.
        weights : sequence of float
            The sites' weights in the mean (ignored by the robust rules).
        origin : mapping of str to torch.Tensor, optional
            x_t, what the server sent; required when :attr:`norm_bound` is set.

        Returns
        -------
        dict of str to torch.Tensor
            One tensor per name, in the dtypes of ``states[0]``.

        Raises
        ------
        ValueError
            If the rule needs more states (:meth:`shortfall`) or the bound has no origin.
        """
        if self.is_plain_mean:
            return weighted_average(list(states), list(weights))
        problem = self.shortfall(len(states))
        if problem is not None:
            raise ValueError(problem)
        dtypes = {name: tensor.dtype for name, tensor in states[0].items()}
        if self.norm_bound is not None:
            if origin is None:
                raise ValueError("defense.norm_bound: the strategy passed no origin x_t to bound the updates by")
            states = [bound_update(state, origin, self.norm_bound) for state in states]
        if isinstance(self.params, MeanParams):
            result = weighted_average(list(states), list(weights))
            return {name: value.to(dtypes[name]) for name, value in result.items()}
        names = list(dtypes)
        vectors = [[state[name].detach().cpu().numpy().astype(np.float64) for name in names] for state in states]
        combined = self.params.apply(vectors)
        # in the dtypes the sites sent: bounded states are float64, and a float64 model would be broadcast next
        return {name: _as_tensor(value, states[0][name]).to(dtypes[name]) for name, value in zip(names, combined)}


def _as_tensor(value: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A float64 result in the shape and dtype of ``like`` (integers rounded to the nearest).

    The shape is restored explicitly: ``np.ascontiguousarray`` turns a 0-d array (BatchNorm's
    ``num_batches_tracked``) into shape (1,), which no model can load.
    """
    tensor = torch.from_numpy(np.array(value, dtype=np.float64)).reshape(like.shape)
    if not (like.dtype.is_floating_point or like.dtype.is_complex):
        tensor = torch.round(tensor)
    return tensor.to(like.dtype)


# --- scenario checks ----------------------------------------------------------------------------------
def clients_per_round(scenario: Scenario) -> int:
    """How many sites every training round samples (the cohort rule of :class:`~strategies.base.Cohort`)."""
    section = scenario.strategy
    return Cohort.sample_size(scenario.partition.clients, section.fraction_train, section.min_clients)


def check_rule(scenario: Scenario) -> None:
    """The rule in effect is possible with the clients sampled per round (one-line ``ValueError`` naming the key)."""
    aggregator = Aggregator.from_scenario(scenario)
    problem = aggregator.shortfall(clients_per_round(scenario))
    if problem is not None:
        section = scenario.strategy
        raise ValueError(f"{problem} (partition.clients {scenario.partition.clients}, strategy.fraction_train "
                         f"{section.fraction_train}, strategy.min_clients {section.min_clients})")


_NOTHING_TO_DEFEND: dict[str, str] = {
    "per-site": "uses each site's upload on its own, there is no average to make robust",
    "none": "aggregates nothing (each site trains alone)",
    "pooled": "aggregates nothing (one node trains on the pooled data)",
}


def check_defense(scenario: Scenario, combine: Combine) -> None:
    """Refuse ``defense`` settings that make no sense for the scenario (one-line ``ValueError`` naming the key).

    Parameters
    ----------
    scenario : Scenario
        With ``defense.params`` already validated against :data:`RULES`.
    combine : Combine
        How the scenario's strategy uses the uploads (:attr:`strategies.base.Algorithm.combine`).

    Raises
    ------
    ValueError
        A defense for a strategy that does not average; a rule set both by a robust strategy name and in
        ``defense``; a rule for which a round has too few clients.
    """
    defense, name = scenario.defense, scenario.strategy.name
    if defense.aggregation != "mean":
        key = "defense.aggregation"
    elif defense.params:
        key = "defense.params"
    elif defense.norm_bound is not None:
        key = "defense.norm_bound"
    else:
        key = None
    if key is not None and combine != "average":
        value = getattr(defense, key.split(".")[1])
        raise ValueError(f"{key}: {value} is not possible with strategy '{name}', which "
                         f"{_NOTHING_TO_DEFEND.get(combine, 'does not average')} (allowed: the defaults, "
                         f"aggregation mean and norm_bound null)")
    if defense.prune is not None and combine in ("none", "pooled"):
        raise ValueError(f"defense.prune: {defense.prune} is not possible with strategy '{name}', which "
                         f"{_NOTHING_TO_DEFEND[combine]}: no site's upload reaches anyone (allowed: null)")
    if name in ROBUST_STRATEGIES and key in ("defense.aggregation", "defense.params"):
        raise ValueError(f"{key}: strategy '{name}' already aggregates with {ROBUST_STRATEGIES[name]} (set in "
                         f"strategy.params); choose the rule in one place: strategy.name fedavg with "
                         f"defense.aggregation {ROBUST_STRATEGIES[name]}, or leave defense.aggregation at mean")
    if combine == "average":
        check_rule(scenario)
