"""Generic non-IID partitioning shared by every task.

The kinds follow the taxonomy of non-IID data in federated learning of Kairouz et al.
2021, "Advances and Open Problems in Federated Learning", §3.1 (arXiv:1912.04977), and
the partitioning strategies benchmarked by Li et al. 2022, "Federated Learning on
Non-IID Data Silos: An Experimental Study" (ICDE 2022, arXiv:2102.02079). Writing ``P_k`` for the data distribution of site ``k``:

* ``iid``: every site draws from the same ``P(x, y)``.
* ``feature_skew``: ``P_k(x)`` differs while ``P(y|x)`` is shared (scanner,
  dose, contrast, noise, stain colour). Each site gets its own *acquisition*
  parameters, which the task applies to its images.
* ``label_skew``: ``P_k(y)`` differs (lesion prevalence, class mix): either
  ``p_k ~ Dir(alpha·1_L)`` per site or a fixed number of classes per site.
  Hsu, Qi & Brown 2019, "Measuring the effects of non-identical data
  distribution for federated visual classification", arXiv:1909.06335.
* ``concept_shift``: ``P_k(y|x)`` differs (inter-reader / annotator
  variability). Each site gets its own *annotator* parameters, which the
  task applies to its labels.
* ``quantity_skew``: site sizes ``n_k`` differ (Dirichlet or power-law shares).

Two entry points:

* :func:`draw_site_profiles` for synthetic data: one :class:`SiteProfile`
  per site (size, ``P_k(y)``, acquisition and annotator parameters); the task
  generates each site's samples from its profile.
* :func:`split_indices` for a pool of existing samples (a real data folder):
  one sorted index array per site. Given ``groups`` (the case, i.e. patient, of each
  sample) it splits whole cases, so slices of one patient never sit at two sites;
  :func:`order_by_group` and :func:`group_holdout` then keep a site's cases whole
  across its train/validation split too.

Everything is deterministic given ``seed``. Each purpose draws from its own
stream ``numpy_rng(seed, "partition", purpose)``, so that, e.g., adding an
acquisition parameter does not change the site sizes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from medtasks.seeding import numpy_rng

Kind = Literal["iid", "label_skew", "feature_skew", "concept_shift", "quantity_skew"]
KINDS: tuple[str, ...] = get_args(Kind)

#: Resampling attempts of the per-class Dirichlet split before giving up.
MAX_SPLIT_ATTEMPTS = 200


# --------------------------------------------------------------------------- params


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IIDParams(_Params):
    """``iid``: no parameters."""


class LabelSkewParams(_Params):
    """``label_skew``: site label distributions ``P_k(y)`` differ."""

    alpha: float = Field(
        0.5,
        gt=0,
        description="Dirichlet concentration: p_k ~ Dir(alpha·1_L). Small = more skew "
        "(0.1 ≈ one or two labels per site), large = close to iid (100).",
    )
    classes_per_client: int | None = Field(
        None,
        ge=1,
        description="If set, each site sees exactly this many label values, uniformly, "
        "assigned so every label is covered when clients × classes_per_client >= labels; "
        "alpha is then ignored.",
    )
    min_samples: int = Field(
        2, ge=1, description="Minimum samples per site when splitting an existing pool."
    )


class QuantitySkewParams(_Params):
    """``quantity_skew``: site sizes ``n_k`` differ."""

    distribution: Literal["dirichlet", "power_law"] = Field(
        "dirichlet",
        description="dirichlet: shares ~ Dir(alpha·1_K); "
        "power_law: share ∝ rank^-exponent over a random order of sites.",
    )
    alpha: float = Field(
        1.0, gt=0, description="Dirichlet concentration of the site shares (small = more skew)."
    )
    exponent: float = Field(
        1.5, gt=0, description="Power-law (Zipf-like) exponent of the site shares."
    )
    min_samples: int = Field(8, ge=1, description="Minimum samples per site.")


class FeatureSkewParams(_Params):
    """``feature_skew``: site acquisition parameters differ (``P_k(x)``)."""

    severity: float = Field(
        0.8,
        ge=0,
        le=1,
        description="0 = every site is the neutral acquisition, "
        "1 = values span the task's full range.",
    )


class ConceptShiftParams(_Params):
    """``concept_shift``: site annotator parameters differ (``P_k(y|x)``)."""

    severity: float = Field(
        0.8,
        ge=0,
        le=1,
        description="0 = every site annotates neutrally, 1 = values span the task's full range.",
    )


PARAMS_MODELS: dict[str, type[BaseModel]] = {
    "iid": IIDParams,
    "label_skew": LabelSkewParams,
    "feature_skew": FeatureSkewParams,
    "concept_shift": ConceptShiftParams,
    "quantity_skew": QuantitySkewParams,
}


def validate_params(kind: str, params: Mapping[str, Any] | None) -> BaseModel:
    """Validate ``partition.params`` for ``kind``.

    Parameters
    ----------
    kind : str
        one of :data:`KINDS`.
    params : Mapping[str, Any] | None
        the raw parameters (``None`` = defaults).

    Returns
    -------
    BaseModel
        The validated parameters model (an instance of ``PARAMS_MODELS[kind]``).

    Raises
    ------
    ValueError
        unknown ``kind`` (the message lists the allowed kinds).
    pydantic.ValidationError
        unknown keys or out-of-range values.
    """
    if kind not in PARAMS_MODELS:
        raise ValueError(
            f"unknown partition kind {kind!r}; allowed kinds: {', '.join(KINDS)}"
        )
    return PARAMS_MODELS[kind].model_validate(dict(params or {}))


def _as_params(kind: str, params: Mapping[str, Any] | BaseModel | None) -> BaseModel:
    """``params`` as the validated model of ``kind`` (validating raw mappings)."""
    if isinstance(params, BaseModel):
        validate_params(kind, {})  # unknown-kind check
        if not isinstance(params, PARAMS_MODELS[kind]):
            raise ValueError(
                f"partition params of type {type(params).__name__} do not match kind "
                f"{kind!r} (expected {PARAMS_MODELS[kind].__name__})"
            )
        return params
    return validate_params(kind, params)


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class ParamRange:
    """Range of one per-site parameter a task exposes.

    E.g. ``ParamRange(low=0.6, high=1.4, neutral=1.0)`` for an intensity scale.

    Attributes
    ----------
    low : float
        smallest value a site may get.
    high : float
        largest value a site may get.
    neutral : float
        the unshifted value (used by every site unless the kind shifts it).
    """

    low: float
    high: float
    neutral: float

    def __post_init__(self) -> None:
        values = (self.low, self.neutral, self.high)
        if not all(np.isfinite(v) for v in values):
            raise ValueError(f"ParamRange values must be finite, got {self}")
        if not self.low <= self.neutral <= self.high:
            raise ValueError(f"ParamRange needs low <= neutral <= high, got {self}")


def neutral_values(space: Mapping[str, ParamRange]) -> dict[str, float]:
    """Every parameter of ``space`` at its neutral value: an unshifted site."""
    return {name: float(value_range.neutral) for name, value_range in space.items()}


def resolve_site_params(
    params: Mapping[str, float] | None, space: Mapping[str, ParamRange], what: str
) -> dict[str, float]:
    """Every parameter of ``space``, taken from ``params`` or its neutral value.

    Tasks call this on a site's acquisition / annotator parameters before applying them.

    Raises
    ------
    ValueError
        ``params`` names a parameter that ``space`` lacks.
    """
    params = params or {}
    unknown = set(params) - set(space)
    if unknown:
        raise ValueError(f"unknown {what} parameters {sorted(unknown)}; known: {sorted(space)}")
    return {**neutral_values(space), **{name: float(value) for name, value in params.items()}}


@dataclass(frozen=True)
class SiteProfile:
    """What one synthetic site looks like.

    Attributes
    ----------
    partition_id : int
        the site's 0-based index.
    n_samples : int
        train + validation samples the site holds.
    label_distribution : tuple[float, ...]
        ``P_k(y)`` over the task's ``L`` labels (sums to 1).
    acquisition : dict[str, float]
        feature-skew parameters (neutral unless ``kind == "feature_skew"``).
    annotator : dict[str, float]
        concept-shift parameters (neutral unless ``kind == "concept_shift"``).
    """

    partition_id: int
    n_samples: int
    label_distribution: tuple[float, ...]
    acquisition: dict[str, float]
    annotator: dict[str, float]

    def to_json(self) -> dict[str, Any]:
        """The profile as plain JSON types (full-precision floats)."""
        return {
            "partition_id": int(self.partition_id),
            "n_samples": int(self.n_samples),
            "label_distribution": [float(p) for p in self.label_distribution],
            "acquisition": {k: float(v) for k, v in self.acquisition.items()},
            "annotator": {k: float(v) for k, v in self.annotator.items()},
        }


def _check_clients(num_clients: int, total: int) -> None:
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if total < num_clients:
        raise ValueError(
            f"cannot partition {total} samples across {num_clients} clients "
            "(fewer samples than clients)"
        )


def _equal_sizes(num_clients: int, total: int) -> np.ndarray:
    """Near-equal sizes: ``total // K`` each, the first ``total % K`` sites get one more."""
    sizes = np.full(num_clients, total // num_clients, dtype=np.int64)
    sizes[: total % num_clients] += 1
    return sizes


def _draw_sizes(
    params: QuantitySkewParams, num_clients: int, total: int, seed: int
) -> np.ndarray:
    """Quantity-skewed site sizes, shape ``(K,)``, summing to ``total``.

    Shares ``s`` are ``Dir(alpha·1_K)`` or ``s_{π(r)} ∝ r^-exponent`` for ranks
    ``r = 1..K`` over a random permutation ``π`` of the sites. Each site gets
    ``min_samples`` plus its share of the remaining ``total - K·min_samples``,
    rounded by the largest-remainder method so the sizes sum to ``total``.
    """
    floor = num_clients * params.min_samples
    if total < floor:
        raise ValueError(
            f"quantity_skew needs at least num_clients * min_samples = {num_clients} * "
            f"{params.min_samples} = {floor} samples, got {total}"
        )
    rng = numpy_rng(seed, "partition", "sizes")
    if params.distribution == "dirichlet":
        shares = rng.dirichlet(np.full(num_clients, params.alpha))
    else:
        order = rng.permutation(num_clients)
        shares = np.empty(num_clients)
        shares[order] = np.arange(1, num_clients + 1, dtype=float) ** -params.exponent
    shares = shares / shares.sum()
    return params.min_samples + _largest_remainder(shares, total - floor)


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Integer parts of ``shares * total`` summing to ``total`` (Hamilton's method)."""
    exact = shares * total
    counts = np.floor(exact).astype(np.int64)
    missing = total - int(counts.sum())
    if missing > 0:
        counts[np.argsort(-(exact - counts), kind="stable")[:missing]] += 1
    return counts


def _sizes(kind: str, params: BaseModel, num_clients: int, total: int, seed: int) -> np.ndarray:
    """Site sizes for ``kind``: quantity-skewed or near-equal."""
    _check_clients(num_clients, total)
    if kind == "quantity_skew":
        assert isinstance(params, QuantitySkewParams)
        return _draw_sizes(params, num_clients, total, seed)
    return _equal_sizes(num_clients, total)


def _class_assignment(
    num_clients: int, num_labels: int, classes_per_client: int, seed: int
) -> list[np.ndarray]:
    """The ``c`` label indices each site holds, shape ``(K,)`` of ``(c,)`` arrays.

    Site ``k`` holds ``π[(k·c + j) mod L]`` for ``j < c``, with ``π`` a seeded
    permutation of the labels: distinct labels per site (``c <= L``), and every
    label is held by some site when ``K·c >= L``.
    """
    if classes_per_client > num_labels:
        raise ValueError(
            f"classes_per_client={classes_per_client} exceeds the number of labels ({num_labels})"
        )
    perm = numpy_rng(seed, "partition", "labels").permutation(num_labels)
    return [
        np.sort(perm[(k * classes_per_client + np.arange(classes_per_client)) % num_labels])
        for k in range(num_clients)
    ]


def _label_distributions(
    params: LabelSkewParams, num_clients: int, num_labels: int, seed: int
) -> np.ndarray:
    """Label-skewed ``P_k(y)``, shape ``(K, L)``.

    ``p_k ~ Dir(alpha·1_L)``, or uniform over the ``c`` labels of :func:`_class_assignment`.
    """
    if params.classes_per_client is not None:
        dists = np.zeros((num_clients, num_labels))
        held = _class_assignment(num_clients, num_labels, params.classes_per_client, seed)
        for k, labels in enumerate(held):
            dists[k, labels] = 1.0 / len(labels)
        return dists
    rng = numpy_rng(seed, "partition", "labels")
    dists = rng.dirichlet(np.full(num_labels, params.alpha), size=num_clients)
    return dists / dists.sum(axis=1, keepdims=True)


def _site_values(
    space: Mapping[str, ParamRange],
    num_clients: int,
    severity: float | None,
    seed: int,
    purpose: str,
) -> list[dict[str, float]]:
    """Per-site parameter values: ``v = neutral + severity·(u - neutral)``, ``u ~ U(low, high)``.

    ``severity=None`` gives every site the neutral values. Each parameter draws
    from its own stream ``(seed, "partition", purpose, name)``, so adding a
    parameter leaves the others unchanged. Values always lie in ``[low, high]``.
    """
    values: list[dict[str, float]] = [{} for _ in range(num_clients)]
    for name in sorted(space):
        rng_range = space[name]
        if severity is None:
            column = np.full(num_clients, rng_range.neutral)
        else:
            u = numpy_rng(seed, "partition", purpose, name).uniform(
                rng_range.low, rng_range.high, size=num_clients
            )
            column = rng_range.neutral + severity * (u - rng_range.neutral)
            column = np.clip(column, rng_range.low, rng_range.high)
        for k in range(num_clients):
            values[k][name] = float(column[k])
    return values


def draw_site_profiles(
    kind: str,
    params: Mapping[str, Any] | BaseModel,
    *,
    num_clients: int,
    samples_per_client: int,
    label_prior: Sequence[float] | np.ndarray,
    acquisition_space: Mapping[str, ParamRange] = {},
    annotator_space: Mapping[str, ParamRange] = {},
    seed: int,
) -> list[SiteProfile]:
    """Draw one :class:`SiteProfile` per site for a synthetic task.

    With ``N = num_clients * samples_per_client``:

    * sizes: ``N / K`` each; for ``quantity_skew``, ``n_k = m + round(s_k·(N - K·m))``
      with shares ``s ~ Dir(alpha·1_K)`` or ``s ∝ rank^-exponent``, ``m = min_samples``,
      largest-remainder rounding so ``Σ n_k = N``.
    * ``P_k(y)``: the normalised ``label_prior``; for ``label_skew``,
      ``p_k ~ Dir(alpha·1_L)`` (Hsu et al. 2019, arXiv:1909.06335) or uniform
      over ``classes_per_client`` labels from a seeded cyclic assignment.
    * acquisition (``feature_skew``) / annotator (``concept_shift``) parameters:
      ``v_k = neutral + severity·(u_k - neutral)``, ``u_k ~ U(low, high)``;
      neutral for the other kinds.

    Parameters
    ----------
    kind : str
        one of :data:`KINDS`.
    params : Mapping[str, Any] | BaseModel
        the kind's parameters (raw mapping or validated model).
    num_clients : int
        number of sites ``K``.
    samples_per_client : int
        mean site size; ``N = K * samples_per_client``.
    label_prior : Sequence[float] | np.ndarray
        the task's ``P(y)``, shape ``(L,)``, non-negative (normalised here).
    acquisition_space : Mapping[str, ParamRange]
        feature-skew parameters the task exposes, by name.
    annotator_space : Mapping[str, ParamRange]
        concept-shift parameters the task exposes, by name.
    seed : int
        the scenario seed.

    Returns
    -------
    list[SiteProfile]
        ``K`` profiles, ordered by ``partition_id``.

    Raises
    ------
    ValueError
        unknown kind, bad prior, too few samples, or
        ``classes_per_client > L``.
    pydantic.ValidationError
        invalid ``params``.
    """
    model = _as_params(kind, params)
    prior = np.asarray(label_prior, dtype=float)
    if prior.ndim != 1 or prior.size == 0 or np.any(prior < 0) or not prior.sum() > 0:
        raise ValueError(
            "label_prior must be a non-empty non-negative vector with a positive sum, "
            f"got {list(label_prior)}"
        )
    if samples_per_client < 1:
        raise ValueError(f"samples_per_client must be >= 1, got {samples_per_client}")
    prior = prior / prior.sum()

    sizes = _sizes(kind, model, num_clients, num_clients * samples_per_client, seed)
    if isinstance(model, LabelSkewParams):
        dists = _label_distributions(model, num_clients, prior.size, seed)
    else:
        dists = np.tile(prior, (num_clients, 1))
    severity = getattr(model, "severity", None)
    acq_severity = severity if kind == "feature_skew" else None
    ann_severity = severity if kind == "concept_shift" else None
    acquisition = _site_values(acquisition_space, num_clients, acq_severity, seed, "acquisition")
    annotator = _site_values(annotator_space, num_clients, ann_severity, seed, "annotator")
    return [
        SiteProfile(
            partition_id=k,
            n_samples=int(sizes[k]),
            label_distribution=tuple(float(p) for p in dists[k]),
            acquisition=acquisition[k],
            annotator=annotator[k],
        )
        for k in range(num_clients)
    ]


# --------------------------------------------------------------------------- index splits


def _dirichlet_label_split(
    labels: np.ndarray, classes: np.ndarray, params: LabelSkewParams, num_clients: int, seed: int
) -> list[list[np.ndarray]]:
    """Per-class Dirichlet split: for each class ``c``, ``q_c ~ Dir(alpha·1_K)`` over sites.

    The class's shuffled samples are cut at ``cumsum(q_c)·n_c``. The whole split is
    redrawn until every site holds ``>= min_samples`` (at most
    :data:`MAX_SPLIT_ATTEMPTS` times).
    """
    rng = numpy_rng(seed, "partition", "labels")
    for _ in range(MAX_SPLIT_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            q = rng.dirichlet(np.full(num_clients, params.alpha))
            cuts = np.round(np.cumsum(q)[:-1] * idx.size).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        if min(sum(p.size for p in site) for site in parts) >= params.min_samples:
            return parts
    raise ValueError(
        f"label_skew split failed: no Dirichlet(alpha={params.alpha}) draw gave every one of "
        f"{num_clients} clients >= {params.min_samples} samples in {MAX_SPLIT_ATTEMPTS} "
        "attempts; raise alpha, lower min_samples or use fewer clients"
    )


def _classes_split(
    labels: np.ndarray, classes: np.ndarray, params: LabelSkewParams, num_clients: int, seed: int
) -> list[list[np.ndarray]]:
    """Each class's shuffled samples split evenly among the sites that hold the class."""
    assert params.classes_per_client is not None
    held = _class_assignment(num_clients, classes.size, params.classes_per_client, seed)
    holders = [[k for k in range(num_clients) if j in held[k]] for j in range(classes.size)]
    if any(not h for h in holders):
        raise ValueError(
            f"classes_per_client={params.classes_per_client} with {num_clients} clients cannot "
            f"cover all {classes.size} classes (need clients * classes_per_client >= classes)"
        )
    rng = numpy_rng(seed, "partition", "split")
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for j, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, chunk in zip(holders[j], np.array_split(idx, len(holders[j]))):
            parts[k].append(chunk)
    smallest = min(sum(p.size for p in site) for site in parts)
    if smallest < params.min_samples:
        raise ValueError(
            f"label_skew split with classes_per_client={params.classes_per_client} leaves a "
            f"client with {smallest} < min_samples={params.min_samples} samples"
        )
    return parts


def split_indices(
    labels: Sequence[int] | np.ndarray,
    kind: str,
    params: Mapping[str, Any] | BaseModel,
    *,
    num_clients: int,
    seed: int,
    groups: Sequence[str] | np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split an existing pool of ``N`` samples across ``K`` sites.

    * ``iid``, ``feature_skew``, ``concept_shift``: a seeded permutation cut into
      near-equal parts (the shift itself is applied by the task from the
      site profiles).
    * ``label_skew``: for each class, site proportions ``q_c ~ Dir(alpha·1_K)``
      (the per-class variant of Hsu et al. 2019, arXiv:1909.06335), redrawn until
      every site has ``>= min_samples``; or, with ``classes_per_client``, each
      class split evenly among the sites holding it.
    * ``quantity_skew``: sizes as in :func:`draw_site_profiles` with ``N = len(labels)``,
      taken as contiguous chunks of a seeded permutation.

    With ``groups`` the units split are the ``G`` cases instead of the samples
    (:func:`_group_units`): each case carries the most frequent label of its samples,
    the rules above apply to cases (sizes and ``min_samples`` count cases), and each
    site gets every sample of its cases. When every sample is its own case this is
    exactly the split without ``groups``.

    Parameters
    ----------
    labels : Sequence[int] | np.ndarray
        integer label of each sample, shape ``(N,)``.
    kind : str
        one of :data:`KINDS`.
    params : Mapping[str, Any] | BaseModel
        the kind's parameters (raw mapping or validated model).
    num_clients : int
        number of sites ``K``.
    seed : int
        the scenario seed.
    groups : Sequence[str] | np.ndarray | None
        the case (patient) of each sample, shape ``(N,)``; ``None``: every sample is its
        own case.

    Returns
    -------
    list[np.ndarray]
        ``K`` sorted ``int64`` index arrays, disjoint, together covering ``range(N)``.

    Raises
    ------
    ValueError
        unknown kind, fewer samples (cases) than clients, or a split that
        cannot satisfy the kind's constraints.
    pydantic.ValidationError
        invalid ``params``.
    """
    model = _as_params(kind, params)
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {y.shape}")
    if groups is not None:
        unit, unit_labels = _group_units(y, groups)
        if unit_labels.size < num_clients:
            raise ValueError(
                f"cannot partition {unit_labels.size} cases ({y.size} samples) across {num_clients} "
                "clients: the samples of one case (patient) stay at one site"
            )
        unit_parts = split_indices(unit_labels, kind, model, num_clients=num_clients, seed=seed)
        return [np.flatnonzero(np.isin(unit, part)).astype(np.int64) for part in unit_parts]
    sizes = _sizes(kind, model, num_clients, y.size, seed)

    if isinstance(model, LabelSkewParams):
        if y.size < num_clients * model.min_samples:
            raise ValueError(
                f"label_skew needs at least num_clients * min_samples = {num_clients} * "
                f"{model.min_samples} samples, got {y.size}"
            )
        classes = np.unique(y)
        split = _classes_split if model.classes_per_client is not None else _dirichlet_label_split
        parts = split(y, classes, model, num_clients, seed)
        return [np.sort(np.concatenate(site)).astype(np.int64) for site in parts]

    perm = numpy_rng(seed, "partition", "split").permutation(y.size)
    return [np.sort(chunk).astype(np.int64) for chunk in np.split(perm, np.cumsum(sizes)[:-1])]


def _group_units(labels: np.ndarray, groups: Sequence[str] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cases as split units: ``(unit of each sample [N], label of each unit [G])``.

    Units are numbered in the order of their first sample, so singleton cases are numbered
    like the samples; a unit's label is the most frequent label of its samples (the
    smallest such label on ties).

    Raises
    ------
    ValueError
        ``groups`` and ``labels`` differ in length.
    """
    names = np.asarray(groups)
    if names.shape != labels.shape:
        raise ValueError(f"groups must give one case per sample: shape {names.shape} vs labels {labels.shape}")
    _, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    unit = rank[inverse.ravel()]
    values, label_index = np.unique(labels, return_inverse=True)
    counts = np.zeros((first.size, values.size), dtype=np.int64)
    np.add.at(counts, (unit, label_index.ravel()), 1)
    return unit, values[np.argmax(counts, axis=1)]  # argmax: the first (smallest) label on ties


def order_by_group(
    indices: np.ndarray, groups: Sequence[str] | np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """A site's samples ``indices`` (sorted, ``[n]``) ordered case by case.

    The site's cases, numbered in order of their first sample, are put in the order
    ``rng.permutation``; each case's samples keep their index order. When every sample
    is its own case this is ``rng.permutation(indices)``.

    Parameters
    ----------
    indices : np.ndarray
        ``[n]`` sorted indices into the pool (a part of :func:`split_indices`).
    groups : Sequence[str] | np.ndarray
        ``[N]`` the case of every pool sample.
    rng : np.random.Generator
        the site's stream.

    Returns
    -------
    np.ndarray
        ``[n]`` int64, a permutation of ``indices`` with each case contiguous.
    """
    names = np.asarray(groups)[indices]
    _, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    cases_in_order = np.argsort(first, kind="stable")  # case number -> unique-name index
    order = rng.permutation(cases_in_order.size)
    rank = np.empty(first.size, dtype=np.int64)
    rank[cases_in_order[order]] = np.arange(first.size)
    return np.asarray(indices)[np.argsort(rank[inverse.ravel()], kind="stable")].astype(np.int64)


def group_holdout(ordered_groups: Sequence[str] | np.ndarray, n_val: int) -> int:
    """How many trailing samples form the validation set when cases must stay whole.

    Whole cases are taken from the end of ``ordered_groups`` (contiguous cases, as
    :func:`order_by_group` gives) until at least ``n_val`` samples are held out. With
    singleton cases this is ``n_val``.

    Parameters
    ----------
    ordered_groups : Sequence[str] | np.ndarray
        ``[n]`` the case of each of a site's samples, in the site's order.
    n_val : int
        the wanted number of validation samples (``>= 1``).

    Returns
    -------
    int
        the number of validation samples, ``>= n_val``; equal to ``n`` when the site has
        too few cases to keep one for training.
    """
    names = np.asarray(ordered_groups)
    n = names.size
    held = min(n_val, n)
    while 0 < held < n and names[n - held] == names[n - held - 1]:
        held += 1
    return held


def holdout_size(n: int, val_fraction: float, ordered_groups: Sequence[str] | np.ndarray | None = None) -> int:
    """Validation size of a site of ``n`` samples: ``max(1, round(val_fraction · n))``, grown to
    whole cases (:func:`group_holdout`) when ``ordered_groups`` (``[n]``) gives each sample's case.

    Raises
    ------
    ValueError
        nothing (no sample, or no case) is left to train on.
    """
    n_val = max(1, round(val_fraction * n))
    if ordered_groups is not None:
        n_val = group_holdout(ordered_groups, n_val)
        if n - n_val < 1:
            cases = len(set(np.asarray(ordered_groups).tolist()))
            raise ValueError(
                f"holds {cases} case(s) in {n} samples; it needs at least 2 cases (one to train, one to "
                "validate): use fewer sites or more cases"
            )
    if n - n_val < 1:
        raise ValueError(f"has {n} samples; it needs at least 2 (one to train, one to validate)")
    return n_val


def cases_by_split(ordered_groups: Sequence[str] | np.ndarray, n_val: int) -> dict[str, list[str]]:
    """The sorted case ids of a site's training (all but the last ``n_val``) and validation samples.

    Returns
    -------
    dict[str, list[str]]
        ``{"train": [...], "val": [...]}`` (written to ``partitions.json``).
    """
    names = [str(name) for name in np.asarray(ordered_groups)]
    cut = len(names) - n_val
    return {"train": sorted(set(names[:cut])), "val": sorted(set(names[cut:]))}


# --------------------------------------------------------------------------- statistics


def label_histogram(labels: Sequence[int] | np.ndarray, num_labels: int) -> list[int]:
    """Counts of each label ``0..num_labels-1``, as a list of ``num_labels`` ints.

    Raises
    ------
    ValueError
        a label outside ``[0, num_labels)``.
    """
    y = np.asarray(labels, dtype=np.int64).ravel()
    if y.size and (y.min() < 0 or y.max() >= num_labels):
        raise ValueError(f"labels must lie in [0, {num_labels}), got range [{y.min()}, {y.max()}]")
    return [int(c) for c in np.bincount(y, minlength=num_labels)]


def heterogeneity(distributions: Sequence[Sequence[float]]) -> float:
    """Mean total-variation distance to the average label distribution.

    ``H = (1/K) Σ_k TV(p_k, p̄)`` with ``TV(p, q) = ½ Σ_y |p(y) - q(y)|`` and
    ``p̄ = (1/K) Σ_k p_k``. Rows are normalised first, so histograms work too.
    0 means identical label distributions (iid); the maximum is ``1 - 1/K``.

    Parameters
    ----------
    distributions : Sequence[Sequence[float]]
        shape ``(K, L)``, one non-negative row per site.

    Raises
    ------
    ValueError
        empty input or a row summing to zero.
    """
    p = np.asarray(distributions, dtype=float)
    if p.ndim != 2 or p.size == 0:
        raise ValueError(f"distributions must be a non-empty (K, L) array, got shape {p.shape}")
    totals = p.sum(axis=1, keepdims=True)
    if np.any(totals <= 0):
        raise ValueError("every distribution must have a positive sum")
    p = p / totals
    return float(np.mean(0.5 * np.abs(p - p.mean(axis=0)).sum(axis=1)))
