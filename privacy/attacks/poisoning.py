"""What the poisoning attacks share on the sites' side: params, refusals, poisoned datasets and the boost.

Malicious sites (``attack.attackers``; :class:`PoisonedSite` is their client half) change the data they train on
(:mod:`privacy.attacks.backdoor`: a trigger and a target class on a share of their samples;
:mod:`privacy.attacks.label_flip`: relabelled samples) and may scale what they send (model replacement, Bagdasaryan, Veit, Hua, Estrin & Shmatikov 2020, "How To Backdoor
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

The triggers and sample edits are in :mod:`privacy.attacks.triggers`; the server half (the global model's success
rates and the attackers' update norms) in :mod:`privacy.attacks.poisoning_observer`, its pictures in
:mod:`privacy.attacks.poisoning_plots`. CT is refused (no trigger and target are defined for a reconstruction).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from pydantic import Field
from torch.utils.data import Dataset

from medtasks.sites import has_test_set
from privacy.attacks.base import AttackParams
from privacy.attacks.triggers import INPUT_KINDS, Edit, Sample
from strategies.base import METRICS_KEY, NUM_EXAMPLES_KEY, Upload

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm


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
    """L, the class count of a task: digits' 10, tabular's ``num_classes``, segmentation's pixel classes (background
    included; :attr:`medtasks.segmentation.task.SegmentationTask.num_classes`), MIL's 2 (bag labels negative /
    positive)."""
    name = scenario.task.name
    if name == "digits":
        from medtasks.digits import NUM_CLASSES

        return NUM_CLASSES
    if name == "mil":
        return 2
    if name == "segmentation":  # the task's own count: for folder data read from the masks unless given
        from medtasks.segmentation.task import SegmentationTask

        return SegmentationTask(scenario.task_context()).num_classes
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
    if not has_test_set(scenario.data):
        raise ValueError(f"data.server_samples: {label} measures its success on the server's test set; set it > 0 "
                         "(or, for folder data, give the test folder in data.test_path)")
    classes = num_classes(scenario)
    if params.target_class >= classes:
        raise ValueError(f"attack.params.target_class: {params.target_class} is not a class of the task (0..{classes - 1})")
    for server_round in params.poison_rounds or []:
        if not 1 <= server_round <= scenario.strategy.rounds or not section.acts_in(server_round):
            raise ValueError(f"attack.params.poison_rounds: round {server_round} is not a round of the run "
                             f"(1..{scenario.strategy.rounds}) in attack.rounds")



# --- poisoned data -----------------------------------------------------------------------------------------
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



def choose(size: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """``[size]`` bool: ``round(fraction · size)`` samples (at least one) drawn without replacement."""
    chosen = np.zeros(size, dtype=bool)
    chosen[rng.choice(size, size=max(1, round(fraction * size)), replace=False)] = True
    return chosen


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



# --- the malicious site ------------------------------------------------------------------------------------
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

