"""Properties of the generic non-IID partitioner (medtasks.partition)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pydantic import ValidationError

from medtasks.partition import (
    KINDS,
    PARAMS_MODELS,
    LabelSkewParams,
    ParamRange,
    cases_by_split,
    draw_site_profiles,
    group_holdout,
    heterogeneity,
    holdout_size,
    label_histogram,
    order_by_group,
    split_indices,
    validate_params,
)

PRIOR = [0.5, 0.3, 0.2]
ACQ = {"scale": ParamRange(0.6, 1.4, 1.0), "noise": ParamRange(0.0, 0.2, 0.0)}
ANN = {"dilation": ParamRange(-2.0, 2.0, 0.0)}


def profiles(kind, params=None, *, seed=0, clients=6, spc=50, prior=PRIOR, **kw):
    return draw_site_profiles(
        kind,
        params or {},
        num_clients=clients,
        samples_per_client=spc,
        label_prior=prior,
        acquisition_space=kw.pop("acq", ACQ),
        annotator_space=kw.pop("ann", ANN),
        seed=seed,
    )


def balanced_pool(num_labels=10, per_label=100):
    return np.repeat(np.arange(num_labels), per_label)


def hist_heterogeneity(labels, parts, num_labels):
    return heterogeneity([label_histogram(labels[p], num_labels) for p in parts])


def check_split(parts, n, num_clients):
    assert len(parts) == num_clients
    allidx = np.concatenate(parts)
    assert allidx.size == n and np.array_equal(np.sort(allidx), np.arange(n))  # disjoint + cover
    for p in parts:
        assert np.all(np.diff(p) > 0)  # sorted


# ---------------------------------------------------------------- all kinds

KIND_PARAMS = {
    "iid": {},
    "label_skew": {"alpha": 0.5},
    "feature_skew": {"severity": 0.8},
    "concept_shift": {"severity": 0.8},
    "quantity_skew": {"alpha": 1.0},
}


@pytest.mark.parametrize("kind", KINDS)
def test_profiles_deterministic_count_and_sizes(kind):
    a = profiles(kind, KIND_PARAMS[kind], seed=3)
    b = profiles(kind, KIND_PARAMS[kind], seed=3)
    c = profiles(kind, KIND_PARAMS[kind], seed=4)
    assert a == b
    assert len(a) == 6 and [p.partition_id for p in a] == list(range(6))
    assert sum(p.n_samples for p in a) == 6 * 50
    for p in a:
        assert sum(p.label_distribution) == pytest.approx(1.0)
        json.dumps(p.to_json())  # plain JSON types
    if kind != "iid":
        assert a != c


@pytest.mark.parametrize("kind", KINDS)
def test_split_deterministic_disjoint_covering(kind):
    labels = balanced_pool(5, 40)
    a = split_indices(labels, kind, KIND_PARAMS[kind], num_clients=4, seed=1)
    b = split_indices(labels, kind, KIND_PARAMS[kind], num_clients=4, seed=1)
    c = split_indices(labels, kind, KIND_PARAMS[kind], num_clients=4, seed=2)
    check_split(a, labels.size, 4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_sizes_independent_of_acquisition_space():
    with_acq = profiles("quantity_skew", {"alpha": 0.5}, acq=ACQ)
    without = profiles("quantity_skew", {"alpha": 0.5}, acq={})
    assert [p.n_samples for p in with_acq] == [p.n_samples for p in without]
    # adding a parameter leaves the others' values unchanged
    one = profiles("feature_skew", acq={"scale": ACQ["scale"]})
    two = profiles("feature_skew", acq=ACQ)
    assert [p.acquisition["scale"] for p in one] == [p.acquisition["scale"] for p in two]


def test_fewer_samples_than_clients():
    with pytest.raises(ValueError, match="fewer samples than clients"):
        split_indices([0, 1, 0], "iid", {}, num_clients=4, seed=0)


# ---------------------------------------------------------------- iid


def test_iid():
    labels = balanced_pool(10, 100)
    parts = split_indices(labels, "iid", {}, num_clients=7, seed=0)
    check_split(parts, labels.size, 7)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert hist_heterogeneity(labels, parts, 10) < 0.1
    profs = profiles("iid")
    assert all(p.label_distribution == pytest.approx(PRIOR) for p in profs)
    assert all(p.acquisition == {"noise": 0.0, "scale": 1.0} for p in profs)
    assert all(p.annotator == {"dilation": 0.0} for p in profs)


# ---------------------------------------------------------------- label skew


def test_label_skew_alpha_controls_heterogeneity():
    prior = [0.1] * 10
    h_small = heterogeneity(
        [p.label_distribution for p in profiles("label_skew", {"alpha": 0.1}, clients=20, prior=prior)]
    )
    h_large = heterogeneity(
        [p.label_distribution for p in profiles("label_skew", {"alpha": 100}, clients=20, prior=prior)]
    )
    assert h_small > 0.5
    assert h_large < 0.1
    assert h_small > 5 * h_large


def test_label_skew_classes_per_client():
    prior = [0.2] * 5
    profs = profiles("label_skew", {"classes_per_client": 2}, clients=4, prior=prior)
    support = set()
    for p in profs:
        nz = np.flatnonzero(np.array(p.label_distribution) > 0)
        assert nz.size == 2
        assert np.array(p.label_distribution)[nz] == pytest.approx([0.5, 0.5])
        support.update(nz.tolist())
    assert support == set(range(5))
    with pytest.raises(ValueError, match="classes_per_client"):
        profiles("label_skew", {"classes_per_client": 6}, prior=prior)


def test_split_label_skew_dirichlet():
    labels = balanced_pool(10, 100)
    small = split_indices(labels, "label_skew", {"alpha": 0.1, "min_samples": 20}, num_clients=5, seed=0)
    large = split_indices(labels, "label_skew", {"alpha": 100}, num_clients=5, seed=0)
    for parts in (small, large):
        check_split(parts, labels.size, 5)
    assert min(p.size for p in small) >= 20
    h_small, h_large = hist_heterogeneity(labels, small, 10), hist_heterogeneity(labels, large, 10)
    assert h_small > 0.4 and h_large < 0.1


def test_split_label_skew_impossible_min_samples():
    labels = balanced_pool(2, 10)
    with pytest.raises(ValueError, match="min_samples"):
        split_indices(labels, "label_skew", {"alpha": 0.5, "min_samples": 6}, num_clients=4, seed=0)
    with pytest.raises(ValueError, match="attempts"):
        split_indices(labels, "label_skew", {"alpha": 0.01, "min_samples": 4}, num_clients=5, seed=0)


def test_split_label_skew_classes_per_client():
    labels = balanced_pool(6, 30)
    params = LabelSkewParams(classes_per_client=2)
    parts = split_indices(labels, "label_skew", params, num_clients=4, seed=0)
    check_split(parts, labels.size, 4)
    for p in parts:
        assert np.unique(labels[p]).size == 2
    with pytest.raises(ValueError, match="cover"):
        split_indices(labels, "label_skew", {"classes_per_client": 1}, num_clients=4, seed=0)


# ---------------------------------------------------------------- quantity skew


def cv(sizes):
    sizes = np.asarray(sizes, dtype=float)
    return sizes.std() / sizes.mean()


def test_quantity_skew_dirichlet():
    def sizes(alpha, seed):
        profs = profiles("quantity_skew", {"alpha": alpha, "min_samples": 8}, clients=10, spc=200, seed=seed)
        return [p.n_samples for p in profs]

    for seed in range(3):
        skewed, flat = sizes(0.3, seed), sizes(10.0, seed)
        assert cv(skewed) > cv(flat)
        assert min(skewed) >= 8 and sum(skewed) == 2000
    assert cv(sizes(10.0, 0)) < 0.5


def test_quantity_skew_power_law():
    profs = profiles("quantity_skew", {"distribution": "power_law", "exponent": 1.5}, clients=10, spc=1000)
    sizes = np.sort([p.n_samples for p in profs])[::-1]
    assert sizes.sum() == 10_000 and sizes.min() >= 8
    assert np.all(np.diff(sizes) < 0)
    assert sizes[0] / sizes[-1] == pytest.approx(10**1.5, rel=0.2)
    # the rank order over sites is random, not partition_id order
    assert [p.n_samples for p in profs] != sorted((p.n_samples for p in profs), reverse=True)


def test_quantity_skew_split_matches_profile_sizes():
    labels = np.zeros(600, dtype=int)
    params = {"alpha": 0.5, "min_samples": 10}
    parts = split_indices(labels, "quantity_skew", params, num_clients=6, seed=5)
    check_split(parts, 600, 6)
    profs = profiles("quantity_skew", params, clients=6, spc=100, seed=5)
    assert [p.size for p in parts] == [p.n_samples for p in profs]


def test_quantity_skew_too_few_samples():
    with pytest.raises(ValueError, match="min_samples"):
        profiles("quantity_skew", {"min_samples": 8}, clients=10, spc=5)
    with pytest.raises(ValueError, match="min_samples"):
        split_indices(np.zeros(50, dtype=int), "quantity_skew", {}, num_clients=10, seed=0)


# ---------------------------------------------------------------- feature skew / concept shift


@pytest.mark.parametrize(
    ("kind", "shifted", "neutral"), [("feature_skew", "acquisition", "annotator"), ("concept_shift", "annotator", "acquisition")]
)
def test_shift_kinds(kind, shifted, neutral):
    space = {"acquisition": ACQ, "annotator": ANN}
    neutral_values = lambda sp: {name: r.neutral for name, r in sp.items()}  # noqa: E731

    zero = profiles(kind, {"severity": 0.0})
    assert all(getattr(p, shifted) == neutral_values(space[shifted]) for p in zero)

    full = profiles(kind, {"severity": 1.0}, clients=8)
    for p in full:
        assert getattr(p, neutral) == neutral_values(space[neutral])
        assert p.label_distribution == pytest.approx(tuple(PRIOR))  # P(y) unchanged
        assert p.n_samples == 50
        for name, value in getattr(p, shifted).items():
            r = space[shifted][name]
            assert r.low <= value <= r.high
    for name in space[shifted]:
        assert len({getattr(p, shifted)[name] for p in full}) == 8

    # severity scales the distance from neutral
    half = profiles(kind, {"severity": 0.5}, clients=8)
    for f, h in zip(full, half):
        for name, value in getattr(f, shifted).items():
            mid = space[shifted][name].neutral
            assert getattr(h, shifted)[name] - mid == pytest.approx(0.5 * (value - mid))


def test_param_range_validation():
    with pytest.raises(ValueError):
        ParamRange(low=1.0, high=2.0, neutral=0.5)


# ---------------------------------------------------------------- params / stats


def test_validate_params():
    assert set(PARAMS_MODELS) == set(KINDS)
    assert validate_params("label_skew", {"alpha": 0.3}).alpha == 0.3
    assert validate_params("iid", {}) is not None
    with pytest.raises(ValidationError):
        validate_params("label_skew", {"alpah": 0.3})
    with pytest.raises(ValidationError):
        validate_params("iid", {"alpha": 0.3})
    with pytest.raises(ValidationError):
        validate_params("label_skew", {"alpha": 0})
    with pytest.raises(ValidationError):
        validate_params("feature_skew", {"severity": 1.5})
    with pytest.raises(ValidationError):
        validate_params("quantity_skew", {"distribution": "zipf"})
    with pytest.raises(ValueError, match="allowed kinds: iid, label_skew"):
        validate_params("dirichlet", {})
    with pytest.raises(ValueError, match="do not match"):
        draw_site_profiles("iid", LabelSkewParams(), num_clients=2, samples_per_client=4, label_prior=[1.0], seed=0)


def test_label_histogram_and_heterogeneity():
    assert label_histogram([0, 2, 2, 1, 2], 4) == [1, 1, 3, 0]
    with pytest.raises(ValueError):
        label_histogram([0, 3], 3)
    assert heterogeneity([[0.5, 0.5], [0.5, 0.5]]) == 0.0
    assert heterogeneity([[1, 0], [0, 1]]) == pytest.approx(0.5)
    assert heterogeneity([[10, 0], [0, 5]]) == pytest.approx(0.5)  # histograms normalised


# --------------------------------------------------------------------------- case-aware splits

GROUP_PARAMS = {"label_skew": {"alpha": 1.0, "min_samples": 1}, "quantity_skew": {"min_samples": 1}}


@pytest.mark.parametrize("kind", KINDS)
def test_singleton_groups_split_exactly_like_no_groups(kind):
    labels = np.random.default_rng(3).integers(0, 3, size=60)
    params = KIND_PARAMS[kind]
    plain = split_indices(labels, kind, params, num_clients=4, seed=5)
    grouped = split_indices(labels, kind, params, num_clients=4, seed=5, groups=[f"s{i}" for i in range(60)])
    assert all(np.array_equal(a, b) for a, b in zip(plain, grouped))


@pytest.mark.parametrize("kind", KINDS)
def test_a_case_never_sits_at_two_sites(kind):
    rng = np.random.default_rng(4)
    groups = np.repeat([f"p{g}" for g in rng.permutation(20)], rng.integers(1, 9, size=20))
    labels = rng.integers(0, 2, size=groups.size)
    parts = split_indices(labels, kind, GROUP_PARAMS.get(kind, {}), num_clients=4, seed=1, groups=groups)
    assert sorted(np.concatenate(parts).tolist()) == list(range(groups.size))
    held = [set(groups[part].tolist()) for part in parts]
    assert all(held) and sum(len(h) for h in held) == 20  # every case whole, at exactly one site


def test_cases_carry_their_majority_label_into_label_skew():
    groups = np.repeat(["a", "b", "c", "d"], 3)
    labels = np.array([0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1])  # majorities: a 0, b 1, c 0, d 1
    parts = split_indices(labels, "label_skew", {"classes_per_client": 1, "min_samples": 1},
                          num_clients=2, seed=0, groups=groups)
    assert sorted(sorted(set(groups[p].tolist())) for p in parts) == [["a", "c"], ["b", "d"]]


def test_fewer_cases_than_clients_is_one_line():
    with pytest.raises(ValueError, match=r"cannot partition 2 cases \(6 samples\) across 3 clients"):
        split_indices(np.zeros(6, int), "iid", {}, num_clients=3, seed=0, groups=list("aaabbb"))
    with pytest.raises(ValueError, match="one case per sample"):
        split_indices(np.zeros(6, int), "iid", {}, num_clients=2, seed=0, groups=list("aab"))


def test_order_by_group_keeps_cases_contiguous_and_matches_a_permutation_for_singletons():
    indices = np.array([1, 2, 3, 4, 6, 7, 8])
    groups = np.array(list("xaabbxccc"))  # pool of 9; the site holds a, b and c whole
    ordered = order_by_group(indices, groups, np.random.default_rng(0))
    names = "".join(groups[ordered])
    assert sorted(ordered.tolist()) == indices.tolist()
    runs = [c for k, c in enumerate(names) if k == 0 or names[k - 1] != c]
    assert sorted(runs) == ["a", "b", "c"]  # one run per case: each case contiguous
    singletons = np.array([f"s{i}" for i in range(10)])
    assert np.array_equal(order_by_group(indices, singletons, np.random.default_rng(2)),
                          np.random.default_rng(2).permutation(indices))


def test_holdout_takes_whole_cases_from_the_end():
    ordered = np.array(list("aaabbbbcc"))
    assert group_holdout(ordered, 1) == 2  # all of c
    assert group_holdout(ordered, 3) == 6  # c, then all of b
    assert group_holdout(ordered, 7) == 9  # nothing left to train on
    assert group_holdout(np.array(list("abcd")), 2) == 2
    assert cases_by_split(ordered, 6) == {"train": ["a"], "val": ["b", "c"]}
    assert holdout_size(9, 0.2, ordered) == 2 and holdout_size(9, 0.2) == 2
    with pytest.raises(ValueError, match="holds 1 case\\(s\\) in 4 samples; it needs at least 2 cases"):
        holdout_size(4, 0.2, np.array(list("aaaa")))
    with pytest.raises(ValueError, match="has 1 samples"):
        holdout_size(1, 0.2)
