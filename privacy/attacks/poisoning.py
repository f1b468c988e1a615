"""What the poisoning attacks share: triggers, poisoned datasets, boosted uploads and the success rates.

Malicious sites (``attack.attackers``) change the data they train on (:mod:`privacy.attacks.backdoor`: a trigger
and a target class on a share of their samples; :mod:`privacy.attacks.label_flip`: relabelled samples) and may
scale what they send (model replacement, Bagdasaryan, Veit, Hua, Estrin & Shmatikov 2020, "How To Backdoor
Federated Learning", AISTATS, arXiv:1807.00459, Eq. 3):

.. math::

    \\tilde X = \\gamma (X - G_t) + G_t, \\qquad \\gamma = n / \\eta

with :math:`G_t` the global model the site received, :math:`X` its trained model, :math:`n` the sites per round
and :math:`\\eta` the server's learning rate. Averaging :math:`G_{t+1} = G_t + \\frac{\\eta}{n}\\sum_k (L_k - G_t)`
then gives :math:`G_{t+1} \\approx X` when the honest updates :math:`L_k - G_t` nearly cancel (a model close to
convergence). :func:`boost_records` applies it per *declared* upload kind (:class:`strategies.base.Upload`):
``weights`` → :math:`w_t + \\gamma (w_k - w_t)`, ``update`` and ``gradient`` → :math:`\\gamma \\cdot` value,
``variate-update`` and ``statistics`` untouched. With a weighted mean (FedAvg's :math:`n_k/m_t`) γ = n/η is exact
for sites of equal size; a site may also lie about its size (``params.claim_examples``), which
``strategy.example_counts: bounded`` (the default) cuts to the size the server learned at discovery.

When the attack acts and when it is measured (a backdoor's durability, Sun, Kairouz, Suresh & McMahan 2019,
"Can You Really Backdoor Federated Learning?", arXiv:1911.07963): ``attack.rounds`` are the rounds the server
half *measures* the global model in (null = every round); ``params.poison_rounds`` are the rounds the malicious
sites *poison* in (null = every measured round), a subset of the measured ones. "Single shot in round 5,
measured in rounds 5..10" is ``attack.rounds: [5, 6, 7, 8, 9, 10]`` (or null) with ``poison_rounds: [5]``.

Inputs: image samples ``x [C, H, W]`` (digits, segmentation), feature vectors ``x [F]`` (tabular) and bags of
tiles ``x [K, 3, T, T]`` (MIL). The trigger of an image is a ``patch_size × patch_size`` square of value
``patch_value`` in the bottom-right corner of every channel (BadNets, Gu, Dolan-Gavitt & Garg 2017,
arXiv:1708.06733); the trigger of a feature vector sets its first ``patch_size`` features to
``patch_value · TABULAR_TRIGGER_SCALE``, a value far outside the data (the tabular task's features have unit noise
around cluster centres of spread ``separation/√F``); the trigger of a bag is the image trigger on a share of its
real (unpadded) tiles (:func:`add_bag_trigger`). :data:`INPUT_KINDS` lists the classification tasks (a label per
sample); what the backdoor's target is on segmentation (a mask edit) and MIL (a bag label) is in
:mod:`privacy.attacks.backdoor`. CT is refused (no trigger and target are defined for a reconstruction).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from pydantic import Field
from torch.utils.data import DataLoader, Dataset

from privacy.attacks.base import AttackParams, AttackSetting, Observation, Outcome
from strategies.base import METRICS_KEY, NUM_EXAMPLES_KEY, Upload

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm

InputKind = Literal["image", "vector"]

INPUT_KINDS: dict[str, InputKind] = {"digits": "image", "tabular": "vector"}
"""Classification tasks → the kind of their inputs (samples ``(x, y)`` with a class label y)."""

Sample = tuple[torch.Tensor, ...]
"""One sample of a task's dataset: ``(x, y, ...)`` (MIL: ``(bag, label, tile_labels, padding, log_odds)``)."""

TABULAR_TRIGGER_SCALE = 5.0
"""A tabular trigger feature is ``patch_value · 5``: five noise standard deviations of the tabular task."""

EVAL_BATCH = 1024
BAG_BATCH = 16  # MIL bags per forward pass
IMAGE_BATCH = 32  # segmentation images per forward pass
HISTOGRAM_EXAMPLES = 8  # triggered images drawn above the prediction histogram
MASK_ROWS = 4  # triggered segmentation images drawn


class PoisoningParams(AttackParams):
    """``attack.params`` every poisoning attack takes."""

    target_class: int = Field(0, ge=0, description="the class the poisoned samples are labelled as")
    poison_rounds: list[int] | None = Field(
        None, description="rounds the malicious sites poison in (null = every round of attack.rounds); the server "
                          "half measures in every round of attack.rounds")
    boost: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] | Literal["auto"] | None = Field(
        None, description="model replacement: scale the site's update by gamma (null = plain data poisoning, "
                          "'auto' = n/eta with n the sites per round and eta the server learning rate)")
    claim_examples: int | None = Field(
        None, ge=1, description="num-examples the malicious site claims in its reply (null = the truth)")

    def poisons_in(self, scenario: Scenario, server_round: int) -> bool:
        """Whether the malicious sites poison in round ``server_round``."""
        assert scenario.attack is not None
        if not scenario.attack.acts_in(server_round):
            return False
        return self.poison_rounds is None or server_round in self.poison_rounds


# --- tasks -------------------------------------------------------------------------------------------------
def num_classes(scenario: Scenario) -> int:
    """L, the class count of a task: digits' 10, tabular's ``num_classes``, segmentation's ``num_classes`` (pixel
    classes, background included), MIL's 2 (bag labels negative / positive)."""
    name = scenario.task.name
    if name == "digits":
        from medtasks.digits import NUM_CLASSES

        return NUM_CLASSES
    if name == "mil":
        return 2
    if name == "segmentation":
        from medtasks.segmentation.task import SegmentationParams

        return SegmentationParams.model_validate(scenario.task.params).num_classes
    from medtasks.tabular import TabularParams

    return TabularParams.model_validate(scenario.task.params).num_classes


def check_poisoning(scenario: Scenario, algorithm: Algorithm, params: PoisoningParams, label: str,
                    tasks: Collection[str] = tuple(INPUT_KINDS)) -> None:
    """Refuse what a poisoning attack cannot run (one-line ``ValueError`` naming the key).

    Tasks outside ``tasks``, strategies that average nothing or keep no complete global model, no server test set
    (the success rates are measured on it), a target class the task lacks, poison rounds outside the run or
    outside ``attack.rounds``.
    """
    section = scenario.attack
    assert section is not None
    if scenario.task.name not in tasks:
        raise ValueError(f"task.name: {label} supports the tasks {', '.join(tasks)}, not '{scenario.task.name}'")
    if algorithm.combine in ("none", "pooled"):
        raise ValueError(f"strategy.name: {label} needs a strategy that combines the sites' uploads; "
                         f"'{scenario.strategy.name}' combines nothing ({algorithm.combine})")
    if not algorithm.central_evaluation:
        raise ValueError(f"strategy.name: {label} measures the global model, and '{scenario.strategy.name}' keeps "
                         f"layers at the sites (no complete global model)")
    if scenario.data.server_samples == 0:
        raise ValueError(f"data.server_samples: {label} measures its success on the server's test set; set it > 0")
    classes = num_classes(scenario)
    if params.target_class >= classes:
        raise ValueError(f"attack.params.target_class: {params.target_class} is not a class of the task (0..{classes - 1})")
    for server_round in params.poison_rounds or []:
        if not 1 <= server_round <= scenario.strategy.rounds or not section.acts_in(server_round):
            raise ValueError(f"attack.params.poison_rounds: round {server_round} is not a round of the run "
                             f"(1..{scenario.strategy.rounds}) in attack.rounds")


def as_tensors(dataset: Dataset) -> Sample:
    """The whole of a map-style dataset, field by field: ``(x [N, ...], y [N, ...], ...)`` (every field of its
    samples stacked)."""
    fields: list[list[torch.Tensor]] = []
    for batch in DataLoader(dataset, batch_size=EVAL_BATCH, shuffle=False):
        fields = fields or [[] for _ in batch]
        for store, part in zip(fields, batch):
            store.append(part)
    return tuple(torch.cat(parts) for parts in fields)


def predict(model: torch.nn.Module, x: torch.Tensor, chunk: int = EVAL_BATCH) -> torch.Tensor:
    """Predicted classes ``argmax_c f(x)_c`` of ``model`` on ``x [N, ...]`` (eval mode, no gradients, ``chunk``
    inputs at a time): ``[N]`` for a classifier, ``[N, H, W]`` label maps for a segmenter (logits ``[N, C, H, W]``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([model(part).argmax(dim=1) for part in x.split(chunk)])
    finally:
        model.train(was_training)


def predict_bags(model: torch.nn.Module, bags: torch.Tensor, padding: torch.Tensor,
                 chunk: int = BAG_BATCH) -> torch.Tensor:
    """Predicted bag labels ``1[S(X) ≥ 0] = 1[σ(S(X)) ≥ 0.5]`` ``[N]`` int64 of a MIL model on ``bags
    [N, K, C, T, T]`` with ``padding [N, K]`` bool (the MIL task's threshold; eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = [model(part, mask if bool(mask.any()) else None)
                      for part, mask in zip(bags.split(chunk), padding.split(chunk))]
    finally:
        model.train(was_training)
    return (torch.cat(logits) >= 0).long()


# --- triggers and poisoned data ----------------------------------------------------------------------------
def add_trigger(x: torch.Tensor, kind: InputKind, patch_size: int, patch_value: float) -> torch.Tensor:
    """The inputs with the trigger stamped on them (a copy).

    Parameters
    ----------
    x : torch.Tensor
        ``[..., C, H, W]`` images (``kind`` ``"image"``) or ``[..., F]`` feature vectors (``"vector"``).
    kind : {"image", "vector"}
        Which trigger: a bottom-right ``patch_size × patch_size`` square of ``patch_value`` on every channel
        (Gu et al. 2017, BadNets), or the first ``patch_size`` features set to
        ``patch_value · TABULAR_TRIGGER_SCALE``.
    patch_size, patch_value : int, float
        Size (pixels or features) and value of the trigger.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``.
    """
    triggered = x.clone()
    if kind == "image":
        triggered[..., -patch_size:, -patch_size:] = patch_value
    else:
        triggered[..., :patch_size] = patch_value * TABULAR_TRIGGER_SCALE
    return triggered


def add_bag_trigger(bags: torch.Tensor, padding: torch.Tensor, fraction: float, patch_size: int,
                    patch_value: float) -> torch.Tensor:
    """Bags with the image trigger on a share of their real tiles (a copy).

    Bag b with :math:`K_b` real tiles gets the trigger of :func:`add_trigger` on its first
    :math:`m_b = \\max(1, \\mathrm{round}(\\text{fraction} \\cdot K_b))` real tiles (attention and mean pooling are
    permutation invariant, and the synthetic slides place their tumour tiles at random positions, so "first" is
    as good as a random choice and needs no random stream).

    Parameters
    ----------
    bags : torch.Tensor
        ``[..., K, C, T, T]`` tiles (one bag or a batch of bags).
    padding : torch.Tensor
        ``[..., K]`` bool, ``True`` where a tile is padding (never triggered).
    fraction : float
        Share of a bag's real tiles that carry the trigger, in ``(0, 1]``.
    patch_size, patch_value : int, float
        The square's side (pixels) and value.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``bags``.
    """
    real = ~padding
    rank = real.long().cumsum(dim=-1) - 1  # index of each real tile among the bag's real tiles
    wanted = (fraction * real.sum(dim=-1, keepdim=True)).round().clamp(min=1)
    chosen = real & (rank < wanted)
    triggered = bags.clone()
    triggered[chosen] = add_trigger(bags[chosen], "image", patch_size, patch_value)
    return triggered


Edit = Callable[[Sample], Sample]
"""One sample → the sample the malicious site trains on (same fields, shapes and dtypes)."""


class EditedDataset(Dataset):
    """A site's dataset with ``edit`` applied to the samples at ``chosen`` (the others as they are).

    Parameters
    ----------
    base : Dataset
        Map-style, samples ``(x, y, ...)`` of tensors.
    chosen : np.ndarray
        ``[len(base)]`` bool, which samples are edited.
    edit : Edit
        What happens to a chosen sample.
    repeat : int
        The dataset is ``repeat`` copies of itself (a malicious site training longer per round, as the
        attacker of Bagdasaryan et al. 2020 trains more local epochs than the honest sites).
    """

    def __init__(self, base: Dataset, chosen: np.ndarray, edit: Edit, repeat: int = 1) -> None:
        self.base, self.chosen, self.edit, self.repeat = base, chosen, edit, repeat
        self.size = len(chosen)

    def __len__(self) -> int:
        return self.size * self.repeat

    def __getitem__(self, index: int) -> Sample:
        index %= self.size
        sample = tuple(torch.as_tensor(field) for field in self.base[index])
        return self.edit(sample) if self.chosen[index] else sample


def relabelled(sample: Sample, y: torch.Tensor | float) -> Sample:
    """``sample`` with its scalar label (field 1, shape ``[]``) replaced by the value ``y``, in the label's dtype."""
    return (sample[0], torch.full_like(sample[1], float(y)), *sample[2:])


# --- model replacement -------------------------------------------------------------------------------------
def boost_factor(boost: float | str | None, scenario: Scenario) -> float | None:
    """γ of :func:`boost_records`: ``None``, the number, or ``"auto"`` = n/η (Bagdasaryan et al. 2020, Eq. 3).

    n is the sites per round (:func:`strategies.aggregation.clients_per_round`), η the server learning rate:
    ``strategy.params.server_lr`` where the strategy has one (FedSGD, SCAFFOLD), else 1 (averaging).
    """
    if boost is None:
        return None
    if boost != "auto":
        return float(boost)
    from strategies.aggregation import clients_per_round

    eta = float(scenario.strategy.params.get("server_lr", 1.0))
    return clients_per_round(scenario) / eta


def boost_records(records: Mapping[str, Any], uploads: Mapping[str, Upload], received: RecordDict,
                  gamma: float, parameters: Collection[str] | None = None) -> dict[str, Any]:
    """The reply's records with the site's contribution scaled by γ, per declared upload kind.

    ``weights``: :math:`\\tilde w = w_t + \\gamma (w_k - w_t)` (Bagdasaryan et al. 2020, Eq. 3; :math:`w_t` from the
    upload's ``reference`` record of the train message); ``update`` and ``gradient``: :math:`\\gamma \\cdot v`;
    ``variate-update`` and ``statistics``: unchanged. Only floating tensors named in ``parameters`` change
    (counters and running statistics stay as trained: extrapolating BatchNorm's running variance γ-fold can make
    it negative, which broke a boosted segmentation U-Net with γ = 4: the global Dice fell to 0).

    Parameters
    ----------
    records : mapping of str to ArrayRecord
        The reply's records (tensors of any shape).
    uploads : mapping of str to Upload
        What the strategy declares each record holds.
    received : RecordDict
        The train message's content.
    gamma : float
        γ.
    parameters : collection of str, optional
        The names of the tensors to boost (the model's learnable parameters); ``None``: every floating tensor.

    Returns
    -------
    dict
        New records (the others as they were).
    """
    boosted = dict(records)
    for name, upload in uploads.items():
        if name not in records or upload.kind not in ("weights", "update", "gradient"):
            continue
        tensors = cast(ArrayRecord, records[name]).to_torch_state_dict()
        origin = (received.array_records[upload.reference].to_torch_state_dict() if upload.kind == "weights"
                  else {})
        scaled = {}
        for key, value in tensors.items():
            if not value.is_floating_point() or (parameters is not None and key not in parameters):
                scaled[key] = value
            elif upload.kind == "weights":
                scaled[key] = origin[key] + gamma * (value - origin[key])
            else:
                scaled[key] = gamma * value
        boosted[name] = ArrayRecord(scaled)
    return boosted


def update_norm(content: RecordDict, sent: RecordDict, uploads: Mapping[str, Upload]) -> float:
    """‖Δ‖₂ of a reply over its ``weights`` (w_k − w_t), ``update`` and ``gradient`` records (floating tensors)."""
    total = 0.0
    for name, upload in uploads.items():
        if upload.kind not in ("weights", "update", "gradient") or name not in content.array_records:
            continue
        tensors = content.array_records[name].to_torch_state_dict()
        origin = sent.array_records[upload.reference].to_torch_state_dict() if upload.kind == "weights" else {}
        for key, value in tensors.items():
            if value.is_floating_point():
                delta = value.double() - origin[key].double() if key in origin else value.double()
                total += float(delta.square().sum())
    return total ** 0.5


class PoisonedSite:
    """The client half of a poisoning attack: poisoned data in, a boosted update (and a claimed size) out.

    Parameters
    ----------
    poison : callable
        ``dataset → poisoned dataset`` (identity in a round it does not poison).
    gamma : float or None
        The boost of :func:`boost_records` (None: send as trained).
    claim_examples : int or None
        The ``num-examples`` the reply claims (None: the truth).
    scenario : Scenario
        Its strategy's client rule declares the uploads.
    """

    def __init__(self, poison: Callable[[Dataset], Dataset], gamma: float | None, claim_examples: int | None,
                 scenario: Scenario) -> None:
        self.poison, self.gamma, self.claim_examples, self.scenario = poison, gamma, claim_examples, scenario

    def training_data(self, dataset: Dataset, model: torch.nn.Module, state: RecordDict) -> Dataset:
        """The poisoned dataset."""
        return self.poison(dataset)

    def tamper(self, records: dict[str, Any], model: torch.nn.Module, received: RecordDict,
               state: RecordDict) -> dict[str, Any]:
        """The boosted records, plus a ``metrics`` record with the claimed ``num-examples`` if it lies."""
        if self.gamma is not None:
            from strategies import get_algorithm

            algorithm = get_algorithm(self.scenario.strategy.name)
            uploads = algorithm.client_rule(algorithm.Params.model_validate(self.scenario.strategy.params)).uploads(model)
            parameters = {name for name, _ in model.named_parameters()}
            records = boost_records(records, uploads, received, self.gamma, parameters)
        if self.claim_examples is not None:
            records = {**records, METRICS_KEY: MetricRecord({NUM_EXAMPLES_KEY: self.claim_examples})}
        return records


def choose(size: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``[size]`` bool: ``round(fraction · size)`` samples (at least one) drawn without replacement."""
    chosen = np.zeros(size, dtype=bool)
    chosen[rng.choice(size, size=max(1, round(fraction * size)), replace=False)] = True
    return chosen


# --- the server half ---------------------------------------------------------------------------------------
Score = Callable[[torch.nn.Module, int], dict[str, float]]
"""``(global model, round) → metrics`` of the attack's success (it may draw a picture)."""


class PoisoningObserver:
    """The server half: the attackers' update norms at ``inspect``, the global model's success rates after a round.

    Parameters
    ----------
    setting : AttackSetting
        The scenario, validated params (a :class:`PoisoningParams`) and task.
    score : Score
        The success rates of the global model.
    """

    def __init__(self, setting: AttackSetting, score: Score) -> None:
        self.setting, self.score = setting, score
        self.params = cast(PoisoningParams, setting.params)
        section = setting.scenario.attack
        assert section is not None
        self.attackers = section.attackers
        self.gamma = boost_factor(self.params.boost, setting.scenario)

    def observe(self, observation: Observation) -> list[Outcome]:
        """The attacker's ‖Δ‖₂ as the server receives it, whether it poisoned, and its boost γ (1 without)."""
        poisoned = self.params.poisons_in(self.setting.scenario, observation.round)
        norm = update_norm(observation.reply, observation.sent, observation.uploads)
        gamma = self.gamma if poisoned and self.gamma is not None else 1.0
        return [Outcome(victim="global", attacker=observation.partition_id,
                        metrics={"update_norm": norm, "poisoned": float(poisoned), "boost": gamma})]

    def after_round(self, server_round: int, model: torch.nn.Module | None) -> list[Outcome]:
        """The global model's success rates (attacker: the first malicious site; ``attackers``: how many)."""
        if model is None:
            return []
        metrics = self.score(model, server_round)
        metrics["attackers"] = float(len(self.attackers))
        metrics["poisoned"] = float(self.params.poisons_in(self.setting.scenario, server_round))
        return [Outcome(victim="global", attacker=self.attackers[0], metrics=metrics)]


def plot_predictions(path: Path, title: str, predicted: torch.Tensor, classes: int, target: int,
                     examples: torch.Tensor | None = None) -> None:
    """Save a histogram of the predicted classes on the attacked test inputs (target class in red), with a row of
    the attacked images above it when ``examples`` ``[K, C, H, W]`` is given (grey for one channel, RGB for
    three)."""
    from matplotlib.figure import Figure

    shown = 0 if examples is None else min(HISTOGRAM_EXAMPLES, len(examples))
    figure = Figure(figsize=(max(6.0, 0.8 * shown), 4.5 if shown else 3.5))
    grid = figure.add_gridspec(2 if shown else 1, max(shown, 1), height_ratios=[1, 2] if shown else [1])
    for k in range(shown):
        axis = figure.add_subplot(grid[0, k])
        assert examples is not None
        if examples.shape[1] == 3:
            axis.imshow(examples[k].permute(1, 2, 0).clamp(0.0, 1.0).numpy())
        else:
            axis.imshow(examples[k, 0].numpy(), cmap="gray", vmin=0.0, vmax=1.0)
        axis.set_axis_off()
    axis = figure.add_subplot(grid[-1, :])
    counts = np.bincount(predicted.numpy(), minlength=classes)
    axis.bar(range(classes), counts, color=["tab:red" if c == target else "tab:gray" for c in range(classes)])
    axis.set_xlabel("predicted class")
    axis.set_ylabel("test inputs")
    axis.set_xticks(range(classes))
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def plot_masks(path: Path, title: str, images: torch.Tensor, truth: torch.Tensor, clean: torch.Tensor,
               triggered: torch.Tensor, classes: int) -> None:
    """Save rows of triggered image | true mask | prediction without the trigger | prediction with it.

    Parameters
    ----------
    path : Path
        The PNG (parent folders are created).
    title : str
        The figure's title.
    images : torch.Tensor
        ``[N, C, H, W]`` triggered images (channel 0 is drawn); up to :data:`MASK_ROWS` rows.
    truth, clean, triggered : torch.Tensor
        ``[N, H, W]`` int label maps: the true masks and the predictions on the clean and triggered images.
    classes : int
        C, background included (label 0 is drawn transparent).
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    palette = ["tab:red", "tab:green", "gold", "tab:cyan", "tab:purple", "tab:orange", "tab:pink"]
    colours = ListedColormap(["none"] + [palette[(c - 1) % len(palette)] for c in range(1, classes)])
    rows = min(MASK_ROWS, len(images))
    figure = Figure(figsize=(10.0, 2.5 * max(rows, 1)))
    axes = figure.subplots(max(rows, 1), 4, squeeze=False)
    titles = ("triggered image", "true mask", "prediction, clean", "prediction, triggered")
    for row in range(rows):
        for axis, overlay, name in zip(axes[row], (None, truth[row], clean[row], triggered[row]), titles):
            axis.imshow(images[row, 0].numpy(), cmap="gray")
            if overlay is not None:
                axis.imshow(np.ma.masked_equal(overlay.numpy(), 0), cmap=colours, vmin=0, vmax=classes - 1,
                            alpha=0.5, interpolation="nearest")
            axis.set_title(name, fontsize=9)
            axis.set_axis_off()
    figure.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)


def plot_path(setting: AttackSetting, kind: str, server_round: int) -> Path | None:
    """``<plots>/<kind>-round<t>-global.png``, or ``None`` when the run draws no pictures."""
    if setting.plots is None:
        return None
    return setting.plots / f"{kind}-round{server_round:03d}-global.png"
