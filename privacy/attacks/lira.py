"""The likelihood-ratio attack with reference models (``attack.kind: lira``).

Carlini, Chien, Nasr, Song, Terzis & Tramèr 2022, "Membership Inference Attacks From First Principles", IEEE S&P
(arXiv:2112.03570). Some examples are hard to fit whether or not they are members, others are easy; a single
loss threshold (:mod:`privacy.attacks.loss_threshold`) confuses the two. LiRA calibrates each example against
reference ("shadow") models trained with and without it:

1. **Population and references.** The candidates (the victim's members and as many non-members, see
   :mod:`privacy.attacks.membership`) are the population. The attacker trains ``references`` models of the
   task's architecture on random halves of it (:func:`inclusion`: every candidate is IN for exactly ⌊R/2⌋ of
   them, OUT for the rest; Sec. 4.2 "online"). No extra data is used (the paper's optional data augmentation
   queries are skipped too). Each reference starts from the federation's initial model w_0 (the server built
   it) and mimics the target's training (:func:`recipe`): the task's loss, the scenario's local optimiser,
   learning rate, momentum, weight decay and batch size, for as many steps as the target took on the victim's
   data by round t (t rounds of the strategy's local schedule; FedSGD: t full-batch steps of size
   ``server_lr``) — or ``reference_epochs`` epochs. References train without DP, whatever the federation
   uses: the attacker is not bound by the sites' mechanism.
2. **Statistic.** The logit-scaled confidence of the true class (Eq. 4), computed stably from the logits z:

       φ(f, x, y) = log( p_y / (1 − p_y) ) = z_y − log Σ_{j≠y} exp z_j       (:func:`logit_confidence`)

3. **Test.** Per example, Gaussians are fitted to φ over the IN references (μ_in, σ_in) and the OUT ones
   (μ_out, σ_out). ``variant: online`` (Algorithm 1) scores the target's φ by the likelihood ratio

       Λ = log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²),

   ``variant: offline`` (Sec. VI-C) by the one-sided test against the OUT Gaussian only, Λ = (φ − μ_out)/σ_out
   (monotone in 1 − Pr[Z > φ], Z ~ N(μ_out, σ_out²)). With ``fixed_variance`` (default; Sec. VI-C "fixed
   variance", better with few references) one σ is shared by every example, in and out: the root mean square of
   all references' φ around their example's μ_in or μ_out; otherwise each example has its own σ_in, σ_out.

Seeds: the inclusion matrix from ``(seed, "lira", "inclusion", victim)``, reference r's batches from
``(seed, "lira", victim, r)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from medtasks.scenario import LocalSection, Scenario
from medtasks.seeding import numpy_rng, torch_generator
from privacy.attacks.base import Attack, AttackSetting
from privacy.attacks.membership import (
    Candidates,
    MembershipInference,
    MembershipParams,
    check_membership,
    logits_of,
    step_size,
)

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)
MIN_STD = 1e-6  # floor on σ: a reference set whose φ do not vary must not divide by zero


class LiRAParams(MembershipParams):
    """``attack.params`` of ``lira`` (plus the shared ones of :class:`MembershipParams`)."""

    references: int = Field(16, ge=2, le=256, description="reference models trained by the attacker")
    variant: Literal["online", "offline"] = Field(
        "online", description="online: likelihood ratio of the IN and OUT Gaussians; offline: OUT Gaussian only")
    fixed_variance: bool = Field(True, description="one σ for every example (Carlini et al. 2022, Sec. VI-C)")
    reference_epochs: int | None = Field(
        None, ge=1, le=100_000,
        description="epochs per reference (null = as many steps as the target took: rounds × local schedule)")
    reference_lr: float | None = Field(None, gt=0.0, le=10.0,
                                       description="learning rate (null = the target's: local.lr, FedSGD's server_lr)")
    reference_batch_size: int | None = Field(None, ge=1, le=65_536,
                                             description="batch size (null = the target's local.batch_size)")


@dataclass(frozen=True)
class Recipe:
    """How a reference model is trained: the local optimiser's settings and the number of steps."""

    local: LocalSection
    steps: int


def logit_confidence(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """φ = log(p_y / (1 − p_y)) = z_y − logsumexp_{j≠y} z_j (Carlini et al. 2022, Eq. 4).

    Parameters
    ----------
    logits : torch.Tensor
        ``[N, C]`` class logits z.
    y : torch.Tensor
        ``[N]`` int64 true classes.

    Returns
    -------
    np.ndarray
        ``[N]`` float64 φ, finite even where p_y rounds to 0 or 1.
    """
    z = logits.double()
    true = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], -math.inf)
    return (true - torch.logsumexp(others, dim=1)).numpy()


def inclusion(references: int, population: int, rng: np.random.Generator) -> np.ndarray:
    """Which candidates each reference trains on (Carlini et al. 2022, Sec. IV-B, online; as in their code).

    For each candidate the R references are ranked by independent uniforms and the ⌈R/2⌉ lowest ranks hold it:
    every candidate is IN for exactly ⌈R/2⌉ references and OUT for ⌊R/2⌋, and each reference holds about N/2.

    Parameters
    ----------
    references : int
        R.
    population : int
        N candidates.
    rng : np.random.Generator
        The inclusion stream.

    Returns
    -------
    np.ndarray
        ``keep [R, N]`` bool.
    """
    ranks = rng.random((references, population)).argsort(axis=0).argsort(axis=0)
    return ranks < references / 2


def recipe(scenario: Scenario, params: LiRAParams, server_round: int, train_size: int,
           model: torch.nn.Module) -> Recipe:
    """The references' training, mimicking the target's (module docstring, step 1).

    Parameters
    ----------
    scenario : Scenario
        Its ``local`` section and strategy (the strategy's local schedule, e.g. FedSGD's one full-batch step).
    params : LiRAParams
        ``reference_epochs``, ``reference_lr``, ``reference_batch_size`` override the mimicry.
    server_round : int
        t: the target has trained t rounds.
    train_size : int
        Examples per reference (about half the population).
    model : torch.nn.Module
        A model of the task (the layout the strategy's uploads are declared for).

    Returns
    -------
    Recipe
        Optimiser settings and total steps ``t · min(max_steps, epochs · ⌈m/B⌉)``, or
        ``reference_epochs · ⌈m/B⌉``.
    """
    from strategies import get_algorithm

    algorithm = get_algorithm(scenario.strategy.name)
    rule = algorithm.client_rule(algorithm.Params.model_validate(scenario.strategy.params))
    local = rule.local_section(scenario.local, train_size)
    sends_gradients = any(upload.kind == "gradient" for upload in rule.uploads(model).values())
    lr = params.reference_lr or (step_size(scenario) if sends_gradients else local.lr)
    batch_size = min(params.reference_batch_size or local.batch_size, train_size)
    per_epoch = math.ceil(train_size / batch_size)
    if params.reference_epochs is not None:
        steps = params.reference_epochs * per_epoch
    else:
        per_round = local.epochs * per_epoch
        steps = server_round * min(per_round, local.max_steps or per_round)
    return Recipe(local.model_copy(update={"lr": lr, "batch_size": batch_size}), steps)


def build_optimizer(model: torch.nn.Module, local: LocalSection) -> torch.optim.Optimizer:
    """The optimiser ``local.optimizer`` (SGD with momentum, Adam, AdamW) with ``lr`` and ``weight_decay``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if local.optimizer == "sgd":
        return torch.optim.SGD(params, lr=local.lr, momentum=local.momentum, weight_decay=local.weight_decay)
    optimizer = torch.optim.Adam if local.optimizer == "adam" else torch.optim.AdamW
    return optimizer(params, lr=local.lr, weight_decay=local.weight_decay)


def train_reference(model: torch.nn.Module, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
                    x: torch.Tensor, y: torch.Tensor, plan: Recipe, generator: torch.Generator) -> torch.nn.Module:
    """Train ``model`` in place on ``(x [m, ...], y [m])`` for ``plan.steps`` mini-batch steps of ``loss_fn``.

    Each epoch is a fresh permutation from ``generator`` cut into batches of ``plan.local.batch_size`` (the last
    one smaller); ``loss_fn(model, (x_b, y_b))`` is the task's mean loss, minimised by :func:`build_optimizer`.
    """
    optimizer = build_optimizer(model, plan.local)
    model.train()
    taken, size = 0, plan.local.batch_size
    while taken < plan.steps:
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), size):
            batch = order[start:start + size]
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model, (x[batch], y[batch])).backward()
            optimizer.step()
            taken += 1
            if taken >= plan.steps:
                break
    model.eval()
    return model


def lira_scores(phi: np.ndarray, reference_phi: np.ndarray, keep: np.ndarray, *,
                variant: Literal["online", "offline"] = "online", fixed_variance: bool = True) -> np.ndarray:
    """LiRA's membership scores (module docstring, step 3).

    Parameters
    ----------
    phi : np.ndarray
        ``[N]`` φ of the target model on the candidates.
    reference_phi : np.ndarray
        ``[R, N]`` φ of each reference on each candidate.
    keep : np.ndarray
        ``[R, N]`` bool: candidate n was IN reference r's training data (:func:`inclusion`); every candidate
        needs at least one OUT reference, and one IN reference for ``online`` (two each without fixed variance).
    variant : {"online", "offline"}
        Likelihood ratio Λ = log N(φ; μ_in, σ_in²) − log N(φ; μ_out, σ_out²), or Λ = (φ − μ_out) / σ_out.
    fixed_variance : bool
        One σ for every example (pooled over IN and OUT residuals) instead of per-example σ_in, σ_out.

    Returns
    -------
    np.ndarray
        ``[N]`` scores, higher = member.
    """
    n_in, n_out = keep.sum(axis=0), (~keep).sum(axis=0)
    if n_out.min() < 1 or (variant == "online" and n_in.min() < 1):
        raise ValueError("every candidate needs OUT references (and IN references for the online variant)")
    mu_in = np.where(keep, reference_phi, 0.0).sum(axis=0) / np.maximum(n_in, 1)
    mu_out = np.where(keep, 0.0, reference_phi).sum(axis=0) / n_out
    residual = reference_phi - np.where(keep, mu_in, mu_out)
    if fixed_variance:
        used = np.ones_like(keep) if variant == "online" else ~keep
        sd_in = sd_out = np.full(phi.shape, max(math.sqrt(float((residual[used] ** 2).mean())), MIN_STD))
    else:
        sd_in = np.sqrt(np.where(keep, residual**2, 0.0).sum(axis=0) / np.maximum(n_in - 1, 1))
        sd_out = np.sqrt(np.where(keep, 0.0, residual**2).sum(axis=0) / np.maximum(n_out - 1, 1))
        sd_in, sd_out = np.maximum(sd_in, MIN_STD), np.maximum(sd_out, MIN_STD)
    if variant == "offline":
        return (phi - mu_out) / sd_out
    return gaussian_log_pdf(phi, mu_in, sd_in) - gaussian_log_pdf(phi, mu_out, sd_out)


def gaussian_log_pdf(value: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """log N(value; mean, std²) elementwise: −½((v − μ)/σ)² − log σ − ½ log 2π."""
    return -0.5 * ((value - mean) / std) ** 2 - np.log(std) - LOG_SQRT_2PI


class LiRA(MembershipInference):
    """The server half: trains the references for each attack, then scores the target's φ."""

    kind = "lira"

    def score(self, model: torch.nn.Module, cands: Candidates, losses: np.ndarray, server_round: int,
              partition_id: int) -> tuple[np.ndarray, dict[str, float]]:
        """LiRA scores ``[2n]``; extra metrics ``references`` and ``reference_epochs`` (the references'
        training length in epochs of their ~n examples)."""
        params = self.params
        assert isinstance(params, LiRAParams)
        seed, population = self.scenario.seed, len(cands.y)
        keep = inclusion(params.references, population, numpy_rng(seed, "lira", "inclusion", partition_id))
        plan = recipe(self.scenario, params, server_round, max(int(keep.sum(axis=1).mean()), 1),
                      self.task.build_model())
        reference_phi = np.empty((params.references, population))
        with torch.random.fork_rng(devices=[]):
            for r in range(params.references):
                inside = torch.from_numpy(np.flatnonzero(keep[r]))
                reference = train_reference(self.task.build_model(), self.task.loss, cands.x[inside],
                                            cands.y[inside], plan, torch_generator(seed, "lira", partition_id, r))
                reference_phi[r] = logit_confidence(logits_of(self.task, reference, cands.x, cands.y), cands.y)
        phi = logit_confidence(logits_of(self.task, model, cands.x, cands.y), cands.y)
        scores = lira_scores(phi, reference_phi, keep, variant=params.variant, fixed_variance=params.fixed_variance)
        batches = math.ceil(population / 2 / plan.local.batch_size)
        return scores, {"references": float(params.references), "reference_epochs": plan.steps / batches}


def server_half(setting: AttackSetting) -> LiRA:
    """The server half of ``lira``."""
    return LiRA(setting)


ATTACK = Attack(
    name="lira", label="LiRA (Carlini et al. 2022)", Params=LiRAParams, headline="auc", needs="victims",
    server_half=server_half, check_compatible=check_membership,
)
