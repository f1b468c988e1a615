"""What the membership-inference attacks share: who is a member, the attacked model, the ROC metrics and plot.

A membership-inference attack decides, for a candidate example ``(x, y)``, whether it was in the training data
of a model ``f`` (Shokri, Stronati, Song & Shmatikov 2017, "Membership Inference Attacks Against Machine Learning
Models", IEEE S&P). Each attack here (:mod:`privacy.attacks.loss_threshold`, :mod:`privacy.attacks.lira`) maps
every candidate to a score ``s`` (higher = "member") and is judged by the ROC curve of those scores, as Carlini et
al. 2022 (arXiv:2112.03570, Sec. 3) argue it should be: AUC, and the TPR at a low FPR (1 %, 0.1 %).

Decisions shared by both attacks (``attack.params``, :class:`MembershipParams`):

* **the attacked model** (``target``):

  - ``global``: the broadcast global model after each attack round (any observer of the broadcast can run
    this; the server half acts at ``round_done``). Every site's data is a member of it; each victim's
    training split is tested on its own: one record per victim, ``victim`` = its partition id.
  - ``site``: one victim's local model, recovered by the honest-but-curious server from its train reply at
    ``inspect`` (:func:`site_model`): a ``weights`` record is w_k, an ``update`` record gives
    w_k = w_t + Δ_k, a FedSGD ``gradient`` record gives the model one server step would make of it,
    w_k = w_t − η g_k with η the strategy's ``server_lr``. What the server receives is attacked: NbAFL's noise,
    central DP's clipping and ``defense.prune`` are part of it.

  Both record ``attacker = "server"``; which model was attacked is the run's ``attack.params.target`` (in its
  ``scenario.yaml``; record metrics are numbers only). Refused (:func:`check_membership`): ``site`` for a
  strategy whose sites send nothing the server combines (``local``, ``centralized``) or whose upload leaves
  part of the model at the site (FedPer's head, FedBN's BatchNorm layers: the site's model is not
  recoverable, and completing it with the global tensors would attack a model nobody trained); ``global``
  for a strategy without a complete global model (FedBN, FedPer) or without a global model at all (``local``).
  ``centralized`` with ``global`` is the centralised baseline: one model trained on the pooled sites.
* **members and non-members** (:func:`candidates`): members are the victim's training split; non-members are
  the server's test set (``data.server_samples`` must be > 0), which the federation never trains on and which
  follows the same distribution when the partition is ``iid``. Under ``label_skew``, ``feature_skew`` or
  ``concept_shift`` the site's data differs from the server's, and part of what the attack measures is that
  difference rather than membership. Both sides are subsampled to the same count ``n = min(members,
  non-members, max_samples)`` with the stream ``(seed, "membership", "candidates", victim)``: the same candidates in
  every round and for both attacks, and AUC 0.5 is chance.
* **tasks**: classifiers whose model outputs class logits and that expose ``predict(model, dataset) ->
  (logits [N, C], labels [N])`` (``digits``, ``tabular``); the per-example loss is the cross-entropy both use.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from pydantic import Field
from sklearn.metrics import roc_auc_score, roc_curve
from torch.nn import functional as F

from medtasks.seeding import numpy_rng
from privacy.attacks.base import AttackParams, AttackSetting, Observation, Outcome, model_sent
from strategies.base import load_into

if TYPE_CHECKING:  # pragma: no cover
    from torch.utils.data import Dataset

    from medtasks.base import Task
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm, Upload

FPR_LEVELS: dict[str, float] = {"tpr_at_1pct_fpr": 0.01, "tpr_at_0.1pct_fpr": 0.001}
"""Metric name → the false-positive rate it reads the TPR at (Carlini et al. 2022, Sec. 3)."""

MODEL_KINDS = ("weights", "update", "gradient", "statistics")
"""Upload kinds that carry part of the site's model (SCAFFOLD's control-variate update does not)."""


class MembershipParams(AttackParams):
    """``attack.params`` shared by the membership-inference attacks."""

    target: Literal["global", "site"] = Field(
        "global", description="global: the broadcast global model after the round; site: the victim's own model "
                              "from its train reply (the honest-but-curious server)")
    max_samples: int = Field(500, ge=2, le=100_000,
                             description="at most this many members and as many non-members per victim")


@dataclass(frozen=True)
class Candidates:
    """The examples a membership attack decides on.

    Attributes
    ----------
    x : torch.Tensor
        ``[2n, ...]`` inputs: the ``n`` members first, then the ``n`` non-members.
    y : torch.Tensor
        ``[2n]`` int64 labels.
    member : np.ndarray
        ``[2n]`` bool, the ground truth.
    """

    x: torch.Tensor
    y: torch.Tensor
    member: np.ndarray


# --- refusals ----------------------------------------------------------------------------------------------
def check_membership(scenario: Scenario, algorithm: Algorithm, params: AttackParams) -> None:
    """Refuse what a membership attack cannot run (one-line ``ValueError`` naming the key).

    Raises
    ------
    ValueError
        For a task without class logits, a scenario without non-members (``data.server_samples`` 0), and the
        strategies :class:`MembershipParams` ``target`` cannot attack (module docstring).
    """
    from medtasks.registry import get_task_class

    assert isinstance(params, MembershipParams)
    kind = scenario.attack.kind if scenario.attack is not None else "membership inference"
    task_class = get_task_class(scenario.task.name)
    if not callable(getattr(task_class, "predict", None)):
        raise ValueError(f"task.name: {kind} scores the class logits of a classifier with predict() "
                         f"(digits, tabular), not the {scenario.task.name} task")
    if scenario.data.server_samples == 0:
        raise ValueError(f"data.server_samples: {kind} takes its non-members from the server's test set; "
                         "set data.server_samples > 0")
    title = algorithm.title
    if params.target == "global":
        if algorithm.combine == "none":
            raise ValueError(f"attack.params.target: {title} trains no global model: each site keeps its own")
        if not algorithm.central_evaluation:
            raise ValueError(f"attack.params.target: {title}'s global model is incomplete (part of the model "
                             "stays at each site), so there is no global model to attack")
        return
    if algorithm.combine in ("none", "pooled"):
        raise ValueError(f"attack.params.target: {title} sends no per-site model to the server (allowed: global)")
    model = task_class(scenario.task_context()).build_model()
    rule = algorithm.client_rule(algorithm.Params.model_validate(scenario.strategy.params))
    missing = set(model.state_dict()) - _recoverable(rule.uploads(model))
    if missing:
        raise ValueError(f"attack.params.target: {title} keeps {', '.join(sorted(missing)[:3])}"
                         f"{' ...' if len(missing) > 3 else ''} at the site, so its model is not recoverable "
                         "from its reply (allowed: global)")


def _recoverable(uploads: dict[str, Upload]) -> set[str]:
    """The state-dict names a reply declared by ``uploads`` carries (as weights, update, gradient or statistics)."""
    return {name for upload in uploads.values() if upload.kind in MODEL_KINDS for name in upload.names}


# --- the attacked model ------------------------------------------------------------------------------------
def step_size(scenario: Scenario) -> float:
    """η of the server step w_t − η g_k for a strategy whose sites send gradients (FedSGD's ``server_lr``).

    Returns ``1.0`` for a strategy without a ``server_lr``.
    """
    from strategies import get_algorithm

    algorithm = get_algorithm(scenario.strategy.name)
    return float(getattr(algorithm.Params.model_validate(scenario.strategy.params), "server_lr", 1.0))


def site_model(task: Task, observation: Observation, eta: float) -> torch.nn.Module:
    """The victim's local model as the server can rebuild it from its train reply.

    Starting from w_t (the train message's ``"arrays"``), each declared record of the reply is applied:
    ``weights``/``statistics`` replace, ``update`` adds (w_k = w_t + Δ_k), ``gradient`` steps
    (w_k = w_t − η g_k, FedSGD's server step of McMahan et al. 2017, arXiv:1602.05629, Sec. 2).

    Parameters
    ----------
    task : Task
        Builds the model.
    observation : Observation
        The victim's reply and the message it answered.
    eta : float
        η for ``gradient`` records (:func:`step_size`).

    Returns
    -------
    torch.nn.Module
        A fresh model holding w_k.
    """
    model = model_sent(task, observation.sent)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    for record, upload in observation.uploads.items():
        if upload.kind not in MODEL_KINDS or record not in observation.reply.array_records:
            continue
        tensors = observation.reply.array_records[record].to_torch_state_dict()
        for name in upload.names & set(tensors):
            sent = tensors[name].to(state[name].dtype)
            if upload.kind == "update":
                state[name] = state[name] + sent
            elif upload.kind == "gradient":
                state[name] = state[name] - eta * sent
            else:
                state[name] = sent
    load_into(model, state)
    return model


# --- candidates --------------------------------------------------------------------------------------------
def stack(dataset: Dataset, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples ``indices`` of a dataset of ``(x, y)`` pairs as tensors ``(x [n, ...], y [n] int64)``."""
    pairs = [dataset[int(i)] for i in indices]
    return torch.stack([torch.as_tensor(x) for x, _ in pairs]), torch.as_tensor([int(y) for _, y in pairs])


def candidates(members: Dataset, non_members: Dataset, max_samples: int, rng: np.random.Generator) -> Candidates:
    """``n`` members and ``n`` class-matched non-members, ``n = min(|members|, |non_members|, max_samples)``.

    The members are a uniform draw; the non-members copy their label histogram: for each class ``c`` with
    ``n_c`` drawn members, ``min(n_c, available_c)`` non-members of class ``c``, any shortfall filled by
    non-members of other classes. Without the matching, a model's per-class loss would separate the two sides
    by their class mix alone (a small site's sample, or a label-skewed one, differs from the server's test set).

    Parameters
    ----------
    members : Dataset
        The victim's training split, ``(x, y)`` pairs.
    non_members : Dataset
        Examples from the same distribution no model trained on (the server's test set).
    max_samples : int
        The cap on ``n``.
    rng : np.random.Generator
        The candidates' stream.

    Returns
    -------
    Candidates
        Members first; sorted indices within each side.
    """
    sizes = len(members), len(non_members)  # type: ignore[arg-type]  # the tasks' datasets have a len
    n = min(*sizes, max_samples)
    if n < 1:
        raise ValueError(f"no candidates: {sizes[0]} members, {sizes[1]} non-members")
    x_in, y_in = stack(members, np.sort(rng.choice(sizes[0], n, replace=False)))
    x_all, y_all = stack(non_members, np.arange(sizes[1]))
    chosen = matched(y_in.numpy(), y_all.numpy(), rng)
    return Candidates(torch.cat([x_in, x_all[chosen]]), torch.cat([y_in, y_all[chosen]]),
                      np.concatenate([np.ones(n, dtype=bool), np.zeros(n, dtype=bool)]))


def matched(wanted: np.ndarray, pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``len(wanted)`` distinct indices into ``pool`` whose labels follow ``wanted``'s histogram where possible.

    Parameters
    ----------
    wanted : np.ndarray
        ``[n]`` labels to match.
    pool : np.ndarray
        ``[M]`` labels to draw from, ``M >= n``.
    rng : np.random.Generator
        The draw's stream.

    Returns
    -------
    np.ndarray
        ``[n]`` sorted int64 indices.
    """
    order = rng.permutation(pool.size)
    taken = np.zeros(pool.size, dtype=bool)
    for label, count in zip(*np.unique(wanted, return_counts=True), strict=True):
        same = order[pool[order] == label][:count]
        taken[same] = True
    shortfall = wanted.size - int(taken.sum())
    if shortfall:
        taken[order[~taken[order]][:shortfall]] = True
    return np.flatnonzero(taken)


def logits_of(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Class logits ``[N, C]`` of ``model`` on ``x [N, ...]`` through the task's ``predict`` (eval mode)."""
    from torch.utils.data import TensorDataset

    logits, _ = task.predict(model, TensorDataset(x, y))  # type: ignore[attr-defined]  # checked at load
    return logits.double()


def example_losses(logits: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Per-example cross-entropy ``ℓ_i = −log softmax(z_i)_{y_i}``, ``[N]`` float64, from logits ``[N, C]``."""
    return F.cross_entropy(logits, y, reduction="none").numpy()


# --- ROC metrics ---------------------------------------------------------------------------------------------
def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """The largest TPR of the ROC points ``(fpr, tpr)`` whose FPR is at most ``level`` (0 if none)."""
    allowed = fpr <= level + 1e-12
    return float(tpr[allowed].max()) if allowed.any() else 0.0


def roc_metrics(member: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """How well ``scores`` (higher = member) separate members from non-members.

    Parameters
    ----------
    member : np.ndarray
        ``[N]`` bool ground truth, both classes present.
    scores : np.ndarray
        ``[N]`` float attack scores.

    Returns
    -------
    dict of str to float
        ``auc`` (area under the ROC curve), ``tpr_at_1pct_fpr``, ``tpr_at_0.1pct_fpr`` (:func:`tpr_at_fpr`) and
        ``best_accuracy``: the balanced accuracy ½(TPR + 1 − FPR) of the best threshold.
    """
    if not np.all(np.isfinite(scores)):
        raise ValueError("membership scores must be finite")
    fpr, tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    metrics = {"auc": float(roc_auc_score(member, scores))}
    metrics.update({name: tpr_at_fpr(fpr, tpr, level) for name, level in FPR_LEVELS.items()})
    metrics["best_accuracy"] = float(np.max(0.5 * (tpr + 1.0 - fpr)))
    return metrics


def plot_roc(path: Path, member: np.ndarray, scores: np.ndarray, title: str) -> None:
    """Save the ROC curve on log-log axes (Carlini et al. 2022, Fig. 1 style) with the chance diagonal.

    FPR and TPR of 0 are drawn at half the smallest non-zero rate the candidates allow, ``1 / (2n)``.
    """
    from matplotlib.figure import Figure

    fpr, tpr, _ = roc_curve(member, scores, drop_intermediate=False)
    floor = 0.5 / max(int((~member).sum()), 1)
    figure = Figure(figsize=(4.5, 4.5))
    ax = figure.subplots()
    ax.loglog(np.maximum(fpr, floor), np.maximum(tpr, floor), label=f"attack (AUC {roc_auc_score(member, scores):.3f})")
    ax.loglog([floor, 1.0], [floor, 1.0], linestyle="--", color="grey", label="chance")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(floor, 1.0)
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")


# --- the server half both attacks share -------------------------------------------------------------------
class MembershipInference(ABC):
    """The server half of a membership attack: picks the model and the candidates, scores, records, plots.

    Subclasses implement :meth:`score`.

    Parameters
    ----------
    setting : AttackSetting
        With :class:`MembershipParams` (or a subclass) as ``params``.
    """

    kind: str = "membership"

    def __init__(self, setting: AttackSetting) -> None:
        assert isinstance(setting.params, MembershipParams) and setting.scenario.attack is not None
        self.setting, self.params = setting, setting.params
        self.scenario, self.task = setting.scenario, setting.task
        self.victims = setting.scenario.attack.victims
        self._candidates: dict[int, Candidates] = {}

    def observe(self, observation: Observation) -> list[Outcome]:
        """With ``target: site``: attack the victim's model rebuilt from its reply (:func:`site_model`)."""
        if self.params.target != "site" or observation.partition_id not in self.victims:
            return []
        model = site_model(self.task, observation, step_size(self.scenario))
        return [self.attempt(model, observation.round, observation.partition_id)]

    def after_round(self, server_round: int, model: torch.nn.Module | None) -> list[Outcome]:
        """With ``target: global``: attack the new global model once per victim."""
        if self.params.target != "global" or model is None:
            return []
        return [self.attempt(model, server_round, pid) for pid in self.victims]

    def candidates_of(self, partition_id: int) -> Candidates:
        """The victim's candidates (:func:`candidates`, stream ``(seed, "membership", "candidates", victim)``:
        the same for every membership attack, so their numbers compare), cached."""
        if partition_id not in self._candidates:
            non_members = self.task.server_data()
            if non_members is None:
                raise ValueError("data.server_samples: membership inference needs the server's test set")
            rng = numpy_rng(self.scenario.seed, "membership", "candidates", partition_id)
            self._candidates[partition_id] = candidates(self.task.client_data(partition_id).train, non_members,
                                                        self.params.max_samples, rng)
        return self._candidates[partition_id]

    def attempt(self, model: torch.nn.Module, server_round: int, partition_id: int) -> Outcome:
        """Score the victim's candidates against ``model`` and draw the ROC curve.

        Returns
        -------
        Outcome
            ``victim`` = ``partition_id``, ``attacker = "server"``; metrics: :func:`roc_metrics`, ``accuracy``
            (the best threshold's, unless the attack defines its own, e.g. Yeom's threshold), ``members``,
            ``non_members``, the mean loss of each side (``member_loss``, ``non_member_loss``: the
            generalisation gap Yeom et al. 2018 tie the leak to) and the attack's own (:meth:`score`).
        """
        model.eval()
        cands = self.candidates_of(partition_id)
        losses = example_losses(logits_of(self.task, model, cands.x, cands.y), cands.y)
        scores, extra = self.score(model, cands, losses, server_round, partition_id)
        metrics = roc_metrics(cands.member, scores)
        metrics["accuracy"] = metrics["best_accuracy"]
        metrics.update(extra)
        metrics.update({"members": float(cands.member.sum()), "non_members": float((~cands.member).sum()),
                        "member_loss": float(losses[cands.member].mean()),
                        "non_member_loss": float(losses[~cands.member].mean())})
        if self.setting.plots is not None:
            path = self.setting.plots / f"{self.kind}-round{server_round:03d}-site{partition_id}.png"
            plot_roc(path, cands.member, scores,
                     f"{self.kind}, round {server_round}, site {partition_id} ({self.params.target} model)")
        return Outcome(victim=partition_id, attacker="server", metrics=metrics)

    @abstractmethod
    def score(self, model: torch.nn.Module, cands: Candidates, losses: np.ndarray, server_round: int,
              partition_id: int) -> tuple[np.ndarray, dict[str, float]]:
        """Membership scores ``[2n]`` (higher = member) and extra metrics; ``losses`` are the per-example
        cross-entropies of ``model`` on the candidates ``[2n]``."""

