"""Synthetic sites (``data.source: synthetic``): random phantoms or patches of real slices, measured.

Site ``k`` draws the anatomy ``a_i ~ P_k(a)`` of each of its ``n_k`` slices from the stream
``numpy_rng(seed, "ct", "site", k)``, then a slice of that anatomy from the same stream. The
anatomy is the label used for label skew; ``P(a)`` is uniform over the anatomies of
``task.params.phantom`` (:func:`~medtasks.ct.anatomy.anatomy_names`). The slice is:

* a generated phantom in 1/cm (:func:`draw_phantom`: ``torso_phantom`` thorax or abdomen slices,
  or ``random_ellipses``);
* with ``task.params.phantom: packaged``, an augmented patch of one of the real CT images that the
  distributions in ``task.params.slice_packages`` install (:func:`draw_packaged`,
  :mod:`medtasks.ct.realdata`), labelled with the anatomy of its source slice. Sites cut their
  patches from the ``"train"`` region of every slice, the server's test set from the held-out
  ``"test"`` region, so no test pixel is ever trained on.

The site's scanner then measures the slices with photon noise from
``torch_generator(seed, "ct", "noise", "site", k)`` (:func:`~medtasks.ct.scanner.simulate`); the
target is the site's reference image. The server's test set uses ``numpy_rng(seed, "ct",
"server")`` and ``torch_generator(seed, "ct", "noise", "server")`` instead.

Sites are cached per process (:func:`_synthetic_samples`), as the task is (``client/cache.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from medtasks.ct import realdata
from medtasks.ct.anatomy import anatomy_label
from medtasks.ct.operator import FilterName
from medtasks.ct.params import CTParams
from medtasks.ct.phantoms import random_ellipses, torso_phantom
from medtasks.ct.scanner import Acquisition, Samples, simulate
from medtasks.partition import SiteProfile
from medtasks.seeding import numpy_rng, torch_generator

__all__ = ["MAX_PHANTOM_ATTEMPTS", "draw_packaged", "draw_phantom", "site_samples"]

MAX_PHANTOM_ATTEMPTS = 64
"""Most ``torso_phantom`` draws :func:`draw_phantom` makes for one thorax or abdomen slice."""


@functools.lru_cache(maxsize=4)
def _packaged_pool(packages: tuple[str, ...]) -> dict[str, tuple[realdata.PatchSource, ...]]:
    """The packaged slices of ``packages`` as ``μ`` in 1/cm, ready for patches, by anatomy (cached per process)."""
    pool: dict[str, list[realdata.PatchSource]] = {}
    for item in realdata.load_slices(packages):
        pool.setdefault(item.entry.anatomy, []).append(realdata.PatchSource(realdata.hu_to_mu(item.hu)))
    return {anatomy: tuple(sources) for anatomy, sources in pool.items()}


def draw_packaged(
    rng: np.random.Generator, anatomy: str, image_size: int, region: realdata.Region, packages: tuple[str, ...]
) -> np.ndarray:
    """A patch ``μ`` (float32 ``[N, N]``, 1/cm) of a real slice of ``anatomy``, cut from ``region``.

    The slice is uniform among the packaged slices of that anatomy; the patch is drawn and rendered
    by its :class:`~medtasks.ct.realdata.PatchSource`.
    """
    sources = _packaged_pool(packages)[anatomy]
    source = sources[int(rng.integers(len(sources)))]
    return source.render(source.draw(rng, region, image_size), image_size)


def draw_phantom(rng: np.random.Generator, anatomy: str, image_size: int) -> np.ndarray:
    """A random phantom ``μ`` (float32 ``[N, N]``, 1/cm) of the given anatomy.

    ``"ellipses"`` is :func:`~medtasks.ct.phantoms.random_ellipses`. Thorax and abdomen slices are
    :func:`~medtasks.ct.phantoms.torso_phantom` draws kept when
    :func:`~medtasks.ct.anatomy.anatomy_label` agrees (rejection sampling; half the draws are kept).

    Raises
    ------
    RuntimeError
        No slice of ``anatomy`` in :data:`MAX_PHANTOM_ATTEMPTS` draws.
    """
    if anatomy == "ellipses":
        return random_ellipses(image_size, rng)
    wanted = ("thorax", "abdomen").index(anatomy)
    for _ in range(MAX_PHANTOM_ATTEMPTS):
        mu = torso_phantom(image_size, rng)
        if anatomy_label(mu) == wanted:
            return mu
    raise RuntimeError(f"no {anatomy} slice in {MAX_PHANTOM_ATTEMPTS} torso_phantom draws")


@dataclass(frozen=True)
class _SyntheticSite:
    """Everything that determines a synthetic site's samples (hashable: the cache key)."""

    seed: int
    stream: tuple[str | int, ...]
    n_samples: int
    image_size: int
    anatomies: tuple[str, ...]
    label_distribution: tuple[float, ...]
    acquisition: Acquisition
    reference_sigma: float
    filter: FilterName
    packages: tuple[str, ...] = ()
    """Distributions of the real slices (``phantom: packaged``); empty for generated phantoms."""
    region: realdata.Region = "train"
    """Region of the real slices the patches come from."""


@functools.lru_cache(maxsize=16)
def _synthetic_samples(site: _SyntheticSite) -> Samples:
    """Draws the site's anatomies and phantoms (or real patches), then simulates them (cached per process)."""
    rng = numpy_rng(site.seed, "ct", *site.stream)
    labels = rng.choice(len(site.anatomies), size=site.n_samples, p=np.asarray(site.label_distribution))
    if site.packages:
        mu = np.stack(
            [draw_packaged(rng, site.anatomies[y], site.image_size, site.region, site.packages) for y in labels]
        )
    else:
        mu = np.stack([draw_phantom(rng, site.anatomies[y], site.image_size) for y in labels])
    generator = torch_generator(site.seed, "ct", "noise", *site.stream)
    return simulate(mu, labels, site.acquisition, site.reference_sigma, site.filter, generator)


def site_samples(
    params: CTParams,
    profile: SiteProfile,
    *,
    anatomies: tuple[str, ...],
    seed: int,
    stream: tuple[str | int, ...],
    region: realdata.Region = "train",
) -> Samples:
    """The slices of a synthetic site drawn from ``numpy_rng(seed, "ct", *stream)``, measured by its scanner.

    Parameters
    ----------
    params : CTParams
        The task's parameters (neutral scanner, phantom family, slice packages, FBP filter).
    profile : SiteProfile
        The site's size, anatomy mix ``P_k(a)`` and scanner / reference values.
    anatomies : tuple[str, ...]
        The anatomy labels that ``profile.label_distribution`` is over.
    seed : int
        The scenario seed.
    stream : tuple[str | int, ...]
        ``("site", k)`` for site ``k``, ``("server",)`` for the server's test set.
    region : {"train", "test"}
        Which part of the real slices the patches of ``phantom: packaged`` come from.

    Returns
    -------
    Samples
        The site's slices (cached per process).
    """
    packaged = params.phantom == "packaged"
    site = _SyntheticSite(
        seed=seed,
        stream=stream,
        n_samples=profile.n_samples,
        image_size=params.image_size,
        anatomies=anatomies,
        label_distribution=profile.label_distribution,
        acquisition=Acquisition.of_site(params, profile.acquisition),
        reference_sigma=float(profile.annotator["reference_smoothing"]),
        filter=params.filter,
        packages=tuple(params.slice_packages) if packaged else (),
        region=region,
    )
    return _synthetic_samples(site)
