"""The GAN attack: a malicious site learns what another site's class looks like (``attack.kind: gan``).

Hitaj, Ateniese & Perez-Cruz 2017, "Deep Models Under the GAN: Information Leakage from Collaborative Deep
Learning", ACM CCS (arXiv:1702.07464). The attacker takes part in training like any site, but in each attack
round its client half (:class:`GanSite`):

1. drops every sample of the target class ``c`` (``attack.params.target_class``, a class of the victims) from its
   own training data: the attacker holds none of it (the scenario should also use a partition where it holds
   none, e.g. ``label_skew`` with ``classes_per_client``; whatever it held is removed here);
2. takes the received global model w_t as the discriminator D (a frozen copy) and trains its generator G for
   ``generator_steps`` Adam steps of batch ``batch`` so that D classifies G's output as ``c`` (Sec. 4.3, Alg. 1):
   ``min_G E_z[-log softmax(D(G(z)))_c]``, i.e. ``max_G log D_c(G(z))``, ``z ~ N(0, I)``;
3. adds ``fakes`` images ``G(z)`` labelled ``f`` (``fake_label``) to its training data and trains on them
   locally as usual. The paper labels the fakes with an extra "artificial" class; the task's model here has a
   fixed set of 10 classes, so ``f`` is an existing class the attacker holds (by default the one it holds most
   samples of). The global model then learns that G's output is ``f``, not ``c``, and the victims, training on
   real samples of ``c``, must push it to tell real ``c`` apart: each round's D is a sharper critic of ``c``.

G's weights (:mod:`privacy.attacks.generator`, seeded from ``(seed, "gan", pid)``) persist across rounds in the
node's state (the ``ArrayRecord`` :data:`GENERATOR_STATE_KEY`); Adam restarts every round. The site also adds
``samples`` generated images to its reply for the experimenter (the side record :data:`SAMPLES_RECORD`, removed
by the server's attack plug-in before anything else sees the reply).

The server half (:class:`GanObserver`) scores those samples each attack round:

* ``target_share``: the share that an independently trained classifier assigns to ``c`` (chance: 10%). The
  classifier is multinomial logistic regression on flattened pixels fitted once, lazily, on the whole task pool
  (all 1,797 digits): a different model family from the federated model, trained on data the attacker never
  holds (class ``c``), deterministic (a convex problem, no seed) and never shown the federated weights, so its
  verdict is not the discriminator's own bias; it classifies the pool at about 98%;
* ``ssim``: the mean best-match SSIM of a sample to the pool's real images of ``c``
  (:func:`privacy.attacks.image_metrics.best_match_ssim`);
* ``baseline_share`` and ``baseline_ssim``: the same for the untrained generator (its seeded initial weights)
  on the same latent codes, the number to beat; ``discriminator_share``: the share the received global model
  (D itself) assigns to ``c`` (it falls once the fakes labelled ``f`` are learnt, while ``target_share`` may
  stay high: G still draws a ``c``, the shared model has only learnt that these drawings are ``f``);
  ``generator_loss``: G's last ``L(G)`` on the site (sent in the side record);

and draws an image grid of the samples per round (``plots/attack/gan-round<t>-site<pid>.png``). Records have
victim ``"global"`` (the class is learnt from the shared model) and the attacker's partition id.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from collections.abc import Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, RecordDict
from pydantic import Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

from medtasks.digits import NUM_CLASSES
from medtasks.seeding import torch_generator
from privacy.attacks.base import (
    SIDE_RECORD_PREFIX,
    Attack,
    AttackParams,
    AttackSetting,
    Observation,
    Outcome,
    model_sent,
)
from privacy.attacks.generator import Generator, build_generator, generate
from privacy.attacks.image_metrics import best_match_ssim

if TYPE_CHECKING:  # pragma: no cover
    from sklearn.linear_model import LogisticRegression

    from medtasks.scenario import Scenario
    from strategies.base import Algorithm

log = logging.getLogger("medfed")

KIND = "gan"
GENERATOR_STATE_KEY = "medfed-gan-generator"
"""The node-state ``ArrayRecord`` holding G's weights between rounds."""
SAMPLES_RECORD = f"{SIDE_RECORD_PREFIX}samples"
"""The reply's side record: ``"samples"`` (``[N, C, S, S]`` generated images), ``"fake_label"`` (``[]``) and
``"generator_loss"`` (``[]``)."""
TASKS = ("digits",)
"""Tasks the attack runs on: image classification with a pool of real images to score against."""


class GanParams(AttackParams):
    """``attack.params`` of the GAN attack."""

    target_class: int = Field(..., ge=0, description="c: the victims' class whose representatives G learns to draw")
    fake_label: int | None = Field(
        None, ge=0, description="f: the label of the injected fakes (a class the attacker holds; null = the class "
        "it holds most samples of, other than target_class)")
    generator_steps: int = Field(200, ge=1, le=100_000, description="Adam steps on G per attack round")
    batch: int = Field(64, ge=1, le=4096, description="latent codes per generator step")
    lr: float = Field(2e-3, gt=0, le=1, description="Adam learning rate of G (betas 0.5, 0.999 as in DCGAN)")
    latent: int = Field(64, ge=1, le=1024, description="size of G's latent code z ~ N(0, I)")
    width: int = Field(32, ge=1, le=512, description="G's channels after its first upsampling (2×width before)")
    fakes: int = Field(100, ge=0, le=100_000, description="generated images labelled fake_label added to the "
                       "attacker's training data each attack round (0: G learns but never feeds back)")
    samples: int = Field(64, ge=1, le=1024, description="generated images sent to the experimenter per round")


class ImagePoolTask(Protocol):
    """What the attack needs of a task: its image shape, its classes and its whole pool of real images."""

    num_classes: int
    image_shape: tuple[int, int, int]

    def pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x [N, C, S, S] in [0, 1], y [N] int64)``."""
        ...


def _params(setting: AttackSetting) -> GanParams:
    return cast(GanParams, setting.params)


def _new_generator(setting: AttackSetting, partition_id: int) -> Generator:
    """The attacker's G before any training: weights from the stream ``(seed, "gan", pid)``."""
    params, task = _params(setting), cast(ImagePoolTask, setting.task)
    return build_generator(params.latent, task.image_shape, params.width, setting.scenario.seed, KIND, partition_id)


# --- the malicious site ----------------------------------------------------------------------------------------
def labels_of(dataset: Dataset) -> np.ndarray:
    """The labels ``[N]`` of a dataset of ``(x, y)`` samples (``y`` a scalar class)."""
    size = len(cast(Sized, dataset))
    return np.asarray([int(dataset[i][1]) for i in range(size)], dtype=np.int64)


def default_fake_label(labels: np.ndarray, target_class: int, num_classes: int) -> int:
    """The attacker's default fake label: the class other than ``target_class`` it holds most samples of
    (the smallest such class on ties; ``(target_class + 1) mod num_classes`` when it holds none).

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` the attacker's training labels.
    """
    counts = Counter(int(label) for label in labels if int(label) != target_class)
    if not counts:
        return (target_class + 1) % num_classes
    return min(counts, key=lambda label: (-counts[label], label))


def train_generator(generator: Generator, discriminator: nn.Module, target_class: int, steps: int, batch: int,
                    lr: float, latents: torch.Generator) -> float:
    """Train G so that the frozen D classifies its output as ``target_class`` (Hitaj et al. 2017, Alg. 1).

    Each Adam step (betas 0.5, 0.999) on ``L(G) = -1/B Σ_b log softmax(D(G(z_b)))_c``, ``z_b ~ N(0, I)`` drawn
    from ``latents``, i.e. gradient ascent on ``log D_c(G(z))``. D's weights are not changed.

    Parameters
    ----------
    generator : Generator
        G, trained in place.
    discriminator : nn.Module
        D: ``[B, C, S, S]`` → logits ``[B, K]``; a CPU copy of it is used in eval mode without gradients to its
        weights (on whatever device the site trains).
    target_class : int
        c.
    steps, batch : int
        Adam steps and latent codes per step.
    lr : float
        Adam's learning rate.
    latents : torch.Generator
        The stream of ``z``.

    Returns
    -------
    float
        ``L(G)`` of the last step.
    """
    discriminator = copy.deepcopy(discriminator).cpu().eval()  # G, its latents and its fakes live on the CPU
    discriminator.requires_grad_(False)
    optimizer = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    generator.train()
    target = torch.full((batch,), target_class, dtype=torch.long)
    loss = torch.tensor(math.nan)
    for _ in range(steps):
        z = torch.randn(batch, generator.latent, generator=latents)
        loss = F.cross_entropy(discriminator(generator(z)), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


class GanSite:
    """The attacker's client half for one round (:class:`privacy.attacks.base.ClientAttack`)."""

    def __init__(self, setting: AttackSetting, server_round: int, partition_id: int) -> None:
        self.setting, self.params = setting, _params(setting)
        self.round, self.pid, self.seed = server_round, partition_id, setting.scenario.seed
        self.generator: Generator | None = None
        self.generator_loss = math.nan
        self.fake_label: int | None = self.params.fake_label

    def _load_generator(self, state: RecordDict) -> Generator:
        generator = _new_generator(self.setting, self.pid)
        if GENERATOR_STATE_KEY in state.array_records:
            generator.load_state_dict(state.array_records[GENERATOR_STATE_KEY].to_torch_state_dict())
        return generator

    def training_data(self, dataset: Dataset, model: nn.Module, state: RecordDict) -> Dataset:
        """The site's data without class c, plus ``fakes`` images of the freshly trained G labelled f.

        ``model`` (w_t) is the discriminator; G is loaded from and saved back to ``state``.
        """
        params = self.params
        task = cast(ImagePoolTask, self.setting.task)
        labels = labels_of(dataset)
        kept = Subset(dataset, np.flatnonzero(labels != params.target_class).tolist())
        if self.fake_label is None:
            self.fake_label = default_fake_label(labels, params.target_class, task.num_classes)
        self.generator = self._load_generator(state)
        latents = torch_generator(self.seed, KIND, self.round, self.pid, "latent")
        self.generator_loss = train_generator(self.generator, model, params.target_class, params.generator_steps,
                                              params.batch, params.lr, latents)
        state[GENERATOR_STATE_KEY] = ArrayRecord(self.generator.state_dict())
        if params.fakes == 0:
            return kept
        fakes = generate(self.generator, params.fakes, self.seed, KIND, self.round, self.pid, "fakes")
        fake_labels = torch.full((params.fakes,), self.fake_label, dtype=torch.long)
        return ConcatDataset([kept, TensorDataset(fakes, fake_labels)])

    def tamper(self, records: dict[str, Any], model: nn.Module, received: RecordDict,
               state: RecordDict) -> dict[str, Any]:
        """The reply plus the side record :data:`SAMPLES_RECORD`: ``samples`` images ``[N, C, S, S]`` of G, f and
        G's last loss."""
        generator = self.generator if self.generator is not None else self._load_generator(state)
        fake_label = self.fake_label if self.fake_label is not None else -1
        samples = generate(generator, self.params.samples, self.seed, KIND, self.round, self.pid, "samples")
        side = ArrayRecord({"samples": samples, "fake_label": torch.tensor(fake_label, dtype=torch.long),
                            "generator_loss": torch.tensor(self.generator_loss, dtype=torch.float32)})
        return {**records, SAMPLES_RECORD: side}


# --- the experimenter's view ---------------------------------------------------------------------------------
def fit_pool_classifier(x: torch.Tensor, y: torch.Tensor) -> LogisticRegression:
    """The independent judge: multinomial logistic regression ``p(k | x) = softmax(W vec(x) + b)_k`` fitted on
    ``x [N, C, S, S]``, ``y [N]`` (L-BFGS, L2 penalty C = 1), on one BLAS thread (the same numbers on every
    machine, and no oversubscription beside the clients' torch threads)."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return LogisticRegression(max_iter=1000).fit(x.flatten(1).numpy(), y.numpy())


def class_share(classifier: LogisticRegression, images: torch.Tensor, target_class: int) -> float:
    """Share of ``images [N, C, S, S]`` that ``classifier`` assigns to ``target_class`` (argmax of p(k | x))."""
    return float(np.mean(classifier.predict(images.flatten(1).numpy()) == target_class))


def model_share(model: nn.Module, images: torch.Tensor, target_class: int) -> float:
    """Share of ``images [N, C, S, S]`` whose logits under ``model`` (eval mode) peak at ``target_class``."""
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(dim=1) == target_class).float().mean())


def draw_samples(samples: torch.Tensor, title: str, path: Path) -> None:
    """A PNG grid of ``samples [N, 1, S, S]`` (grey, 0 = white) at ``path``."""
    from matplotlib.figure import Figure

    count = samples.shape[0]
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    figure = Figure(figsize=(columns * 0.8, rows * 0.8 + 0.6))
    axes = figure.subplots(rows, columns, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < count:
            ax.imshow(samples[i, 0].numpy(), cmap="gray_r", vmin=0.0, vmax=1.0)
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")


class GanObserver:
    """The server half (:class:`privacy.attacks.base.ServerAttack`): scores the attacker's samples."""

    def __init__(self, setting: AttackSetting) -> None:
        self.setting, self.params = setting, _params(setting)
        self.task = cast(ImagePoolTask, setting.task)
        self._classifier: LogisticRegression | None = None
        self._references: torch.Tensor | None = None

    def _judge(self) -> tuple[LogisticRegression, torch.Tensor]:
        """The pool classifier and the pool's images of c, built on first use."""
        if self._classifier is None or self._references is None:
            x, y = self.task.pool()
            self._classifier = fit_pool_classifier(x, y)
            self._references = x[y == self.params.target_class]
        return self._classifier, self._references

    def _scores(self, images: torch.Tensor) -> tuple[float, float]:
        classifier, references = self._judge()
        return (class_share(classifier, images, self.params.target_class),
                float(best_match_ssim(images, references).mean()))

    def observe(self, observation: Observation) -> list[Outcome]:
        """Score the samples in an attacker's reply (nothing for a reply without them)."""
        record = observation.side.get(SAMPLES_RECORD)
        pid, server_round = observation.partition_id, observation.round
        if not isinstance(record, ArrayRecord):
            log.warning("attack gan: site %d's reply in round %d carries no %s record", pid, server_round,
                        SAMPLES_RECORD)
            return []
        tensors = record.to_torch_state_dict()
        samples, fake_label = tensors["samples"].float(), int(tensors["fake_label"])
        generator_loss = float(tensors["generator_loss"])
        expected = (self.params.samples, *self.task.image_shape)
        if tuple(samples.shape) != expected or not bool(torch.isfinite(samples).all()):
            log.warning("attack gan: site %d's samples have shape %s (expected %s) or non-finite values; ignored",
                        pid, tuple(samples.shape), expected)
            return []
        seed, target = self.setting.scenario.seed, self.params.target_class
        untrained = _new_generator(self.setting, pid)
        baseline = generate(untrained, self.params.samples, seed, KIND, server_round, pid, "samples")
        share, similarity = self._scores(samples)
        baseline_share, baseline_similarity = self._scores(baseline)
        metrics = {"target_share": share, "ssim": similarity, "baseline_share": baseline_share,
                   "baseline_ssim": baseline_similarity,
                   "discriminator_share": model_share(model_sent(self.setting.task, observation.sent), samples, target),
                   "generator_loss": generator_loss, "target_class": float(target), "fake_label": float(fake_label)}
        if self.setting.plots is not None:
            title = (f"GAN attack, round {server_round}, site {pid}: target class {target} "
                     f"(share {share:.0%}, SSIM {similarity:.2f}), fakes labelled {fake_label}")
            draw_samples(samples, title, self.setting.plots / f"{KIND}-round{server_round:03d}-site{pid}.png")
        return [Outcome(victim="global", attacker=pid, metrics=metrics)]

    def after_round(self, server_round: int, model: nn.Module | None) -> list[Outcome]:
        """Nothing: the samples are scored when the attacker's reply arrives."""
        return []


# --- registry entry ----------------------------------------------------------------------------------------------
def check_compatible(scenario: Scenario, algorithm: Algorithm, params: AttackParams) -> None:
    """Refuse tasks without an image pool, strategies without a shared model, and impossible classes."""
    gan = cast(GanParams, params)
    if scenario.task.name not in TASKS:
        raise ValueError(f"task.name: the GAN attack runs on image classification with a pool of real images "
                         f"({', '.join(TASKS)}), not '{scenario.task.name}'")
    if algorithm.combine in ("none", "pooled"):
        raise ValueError(f"strategy.name: the GAN attack needs a shared model as its discriminator; "
                         f"'{scenario.strategy.name}' shares none (combine '{algorithm.combine}')")
    for key, value in (("target_class", gan.target_class), ("fake_label", gan.fake_label)):
        if value is not None and value >= NUM_CLASSES:
            raise ValueError(f"attack.params.{key}: {value} is not a class of the task (0..{NUM_CLASSES - 1})")
    if gan.fake_label == gan.target_class:
        raise ValueError(f"attack.params.fake_label: the fakes need a label other than target_class "
                         f"({gan.target_class})")


ATTACK = Attack(
    name=KIND,
    label="GAN attack (Hitaj et al. 2017)",
    Params=GanParams,
    headline="target_share",
    needs="attackers",
    server_half=GanObserver,
    client_half=GanSite,
    check_compatible=check_compatible,
)
