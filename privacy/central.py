r"""Client-level central differential privacy: DP-FedAvg of McMahan et al. (the ``central`` mechanism).

McMahan, Ramage, Talwar & Zhang, "Learning Differentially Private Recurrent
Language Models", ICLR 2018 (arXiv:1710.06963), Algorithm 1 (DP-FedAvg) with the
fixed-size update clipping ("flat clipping") and the uniform-weight estimator.
The protected unit is a whole site: neighbouring federations differ by one
site's entire data set, and the guarantee covers every model the server
releases. A scenario selects it with
``privacy: {mechanism: central, params: {clip, noise_multiplier | target_epsilon, ...}}``
(:class:`CentralDPParams`).

Round t, with K of the N sites sampled (q = K/N), S the clipping bound and z
the noise multiplier:

    Δ_k = w_k − w_t                                   site k's update after local training
    Δ_k ← Δ_k / max(1, ‖Δ_k‖₂ / S)                    ClientUpdate's clip     CentralDPClient.protect
    w_{t+1} = w_t + (1/n) Σ_{k} Δ_k + N(0, (z S / n)² I)                        CentralDPServer
              (n = the sites whose update is aggregated, all with weight 1)

The Gaussian noise on the sum Σ_k Δ_k has standard deviation z·S, S being the
sum's L2 sensitivity when one site is added or removed; dividing by n is
post-processing. Each round is one subsampled Gaussian step with noise
multiplier z and rate q, composed over rounds by the accountant of
:mod:`privacy.accounting` (RDP or PRV): ε after t rounds is ε([(z, q, t)], δ).

How it fits the strategies: :mod:`privacy.compatibility` decides from what a
strategy declares (:meth:`strategies.base.ClientRule.uploads`,
:attr:`strategies.base.Algorithm.combine`), and :func:`privacy.compatibility.protected_upload`
names the record both halves clip:

* a record of ``"weights"`` that the server averages (combine ``average``, the
  mean rule): the site sends w_t + clip(Δ_k) over the floating-point tensors of
  that record, which must be trained parameters (a strategy that keeps some
  layers local sends only its shared ones; BatchNorm running statistics in the
  upload are refused: computed from the data, they would travel unprotected). The
  server re-clips every update against the w_t it sent (a no-op for an honest
  site), sets every site's aggregation weight to 1 (:data:`AGGREGATION_WEIGHT_KEY`:
  with FedAvg's n_k weights the sensitivity would be max_k n_k S / Σ n_k and
  depend on the data), lets the strategy average, and adds the noise to the
  tensors the sites uploaded.
* an ``"update"`` that the server uses site by site (combine ``per-site``, e.g. a
  hypernetwork step from every Δw_k separately): there is no sum to perturb.
  The server clips each Δw_k to S and adds N(0, z² S² I) to each one before the
  step: one site's contribution to the round is then a Gaussian release with
  sensitivity S and multiplier z, the same accounting as above (with K times
  the total noise of the averaged strategies). Whatever the server computes from
  those releases is post-processing.

Assumptions, stated where they matter:

* The server is trusted (central DP): it sees each site's clipped update before
  the noise. Local DP of uploads is NbAFL (:mod:`privacy.nbafl`).
* The accountants analyse Poisson sampling of sites with rate q = K/N; the
  cohort here samples exactly K sites without replacement. This is the standard
  approximation of McMahan et al. and TensorFlow Privacy; with K = N (q = 1) it
  is exact.
* δ should be well below 1/N (the summary warns otherwise).
* Train metrics (loss, the update's norm before clipping) reach the server
  unprotected, as with every mechanism here: they are for the experimenter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medtasks.seeding import torch_generator
from privacy.accounting import (
    Accountant,
    PrivacyBudgetExhausted,
    calibrate_noise,
    epsilon,
)
from privacy.compatibility import declare, protected_upload
from privacy.gaussian import add_gaussian_noise
from strategies.base import AGGREGATION_WEIGHT_KEY, METRICS_KEY, ClientRule, Cohort
from strategies.norms import clip_to_norm, l2_norm

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import LocalSection, Scenario

log = logging.getLogger("medfed")

UPDATE_NORM_METRIC = "update-norm"  # train metric: ‖Δ_k‖₂ before the clip
CLIPPED_METRIC = "clipped"  # train metric: 1 if the clip shrank the update, else 0


class CentralDPParams(BaseModel):
    """Settings of client-level central DP (the ``central`` privacy mechanism, ``privacy.params``).

    Parameters
    ----------
    clip : float
        S, the bound on the L2 norm of a site's update Δ_k (over all its uploaded floating-point tensors).
    noise_multiplier : float or None, default None
        z: the noise on the sum of updates has standard deviation z·S. 0 clips without noise (ε = ∞).
    target_epsilon : float or None, default None
        The run's budget ε at ``delta``. Without ``noise_multiplier``, z is calibrated so that ε ≤ target after
        ``strategy.rounds`` rounds; with it, the run stops before a round that would pass the target. At least
        one of the two is required.
    delta : float, default 1e-5
        δ of the (ε, δ) guarantee; should be well below 1/N.
    accountant : {"rdp", "prv"}, default "rdp"
        How ε is computed (:mod:`privacy.accounting`).
    """

    model_config = ConfigDict(extra="forbid")

    clip: float = Field(gt=0.0, allow_inf_nan=False,
                        description="S, the bound on the L2 norm of a site's update Δ_k (clipped by the site and the server)")
    noise_multiplier: float | None = Field(
        None, ge=0.0, le=1e6,
        description="z: the sum of updates gets noise of std z·S (McMahan et al. 2018; 0 = clipping only; "
                    "null = calibrated to target_epsilon)",
    )
    target_epsilon: float | None = Field(
        None, gt=0.0, allow_inf_nan=False,
        description="the run's ε budget at delta: z is calibrated to it when noise_multiplier is null; the run stops "
                    "before passing it",
    )
    delta: float = Field(1e-5, gt=0.0, lt=1.0,
                         description="δ of the (ε, δ) guarantee, in (0, 1); should be well below 1/N (N the sites)")
    accountant: Accountant = Field(
        "rdp", description="how ε is computed: rdp (Rényi DP, Mironov 2017) or prv (Gopi et al. 2021: tighter, slower)"
    )

    @model_validator(mode="after")
    def _noise_or_budget(self) -> CentralDPParams:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("central needs noise_multiplier or target_epsilon (or both)")
        return self


# --- clipping an update ------------------------------------------------------------------------
def clipped_upload(new: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor] | None,
                   clip: float) -> tuple[dict[str, torch.Tensor], float]:
    """The upload with its update clipped to ``clip``, and the update's norm before the clip.

    Parameters
    ----------
    new : Mapping[str, torch.Tensor]
        The uploaded tensors (weights w_k, or the update Δ_k itself when ``reference`` is ``None``).
    reference : Mapping[str, torch.Tensor] or None
        w_t, the weights the site started from (name → tensor; must hold every floating-point name of
        ``new``), or ``None`` for an update upload.
    clip : float
        S.

    Returns
    -------
    tuple of (dict, float)
        ``new`` with its floating-point tensors replaced by w_t + Δ_k / max(1, ‖Δ_k‖₂/S) (or the clipped
        Δ_k), integer tensors unchanged; and ‖Δ_k‖₂ (``nan`` for a non-finite update, left unclipped for the
        strategy to discard).

    Raises
    ------
    ValueError
        A floating-point tensor of ``new`` that ``reference`` lacks.
    """
    floating = [name for name, tensor in new.items() if torch.is_floating_point(tensor)]
    if reference is None:
        update = {name: new[name] for name in floating}
    else:
        missing = [name for name in floating if name not in reference]
        if missing:
            raise ValueError(f"privacy.mechanism central: uploaded tensors {missing[:3]} were not sent by the server")
        update = {name: new[name].double() - reference[name].double() for name in floating}
    norm = l2_norm(update)
    if not math.isfinite(norm):
        return dict(new), math.nan
    clipped = clip_to_norm(update, clip)
    if reference is not None:
        clipped = {name: (reference[name].double() + clipped[name]).to(new[name].dtype) for name in floating}
    return {name: clipped.get(name, tensor) for name, tensor in new.items()}, norm


# --- the client half (McMahan et al., Algorithm 1, ClientUpdate) ---------------------------------------
class CentralDPClient:
    """Client half: clip this site's update before it is sent (a :class:`privacy.ClientPrivacy`).

    Parameters
    ----------
    params : CentralDPParams
        The mechanism's settings.
    rule : ClientRule
        The strategy's client rule: its declaration (:meth:`~strategies.base.ClientRule.uploads`) says which
        record holds the weights or the update, and which received record the weights are relative to.
    """

    def __init__(self, params: CentralDPParams, rule: ClientRule) -> None:
        self.params = params
        self.rule = rule
        self._metrics: dict[str, float] = {}

    @classmethod
    def for_scenario(cls, scenario: Scenario, rule: ClientRule | None = None) -> CentralDPClient:
        """The client half of ``scenario`` (``rule``: its strategy's client rule, built here if not given)."""
        if rule is None:
            from strategies import get_algorithm

            algorithm = get_algorithm(scenario.strategy.name)
            rule = algorithm.client_rule(algorithm.Params.model_validate(scenario.strategy.params))
        return cls(CentralDPParams.model_validate(scenario.privacy.params), rule)

    def admit(self, state: RecordDict) -> None:
        """Every site may train: the budget is the run's, kept by the server."""

    def private_training(self) -> None:
        """Central DP leaves local training as it is."""
        return

    def protect(self, records: Mapping[str, Any], model: torch.nn.Module, received: RecordDict,
                state: RecordDict) -> dict[str, Any]:
        """Δ_k ← Δ_k / max(1, ‖Δ_k‖₂/S) on the upload (weights: against the w_t received in the declared
        reference record).

        Returns
        -------
        dict
            The records to send; :meth:`spend` reports the update's norm before the clip.
        """
        record, upload = protected_upload(self.rule.uploads(model))
        tensors = records[record].to_torch_state_dict()
        reference = received.array_records[upload.reference].to_torch_state_dict() if upload.kind == "weights" else None
        clipped, norm = clipped_upload(tensors, reference, self.params.clip)
        self._metrics = {UPDATE_NORM_METRIC: norm, CLIPPED_METRIC: float(norm > self.params.clip)}
        return {**records, record: ArrayRecord(clipped)}

    def spend(self, state: RecordDict) -> dict[str, float]:
        """Nothing to spend here (the server's accountant counts the round).

        Returns
        -------
        dict
            The train metrics ``update-norm`` (‖Δ_k‖₂ before the clip) and ``clipped`` (1 if the clip shrank it).
        """
        return dict(self._metrics)

    def close(self) -> None:
        """Nothing to release."""


def client_privacy(scenario: Scenario, server_round: int, partition_id: int, train_size: int,
                   local: LocalSection, rule: ClientRule) -> CentralDPClient:
    """The client half of central DP for one round of one site (:func:`privacy.client_privacy`)."""
    return CentralDPClient.for_scenario(scenario, rule)


# --- the server half (Algorithm 1, the aggregate and its noise; accounting) ----------------------------
class CentralDPServer:
    """Server half, driven by the round loop (a :class:`privacy.ServerPrivacy`).

    Parameters
    ----------
    params : CentralDPParams
        The mechanism's settings.
    upload : {"weights", "update"}
        What the strategy's sites send (its declaration, :func:`privacy.compatibility.protected_upload`).
    record : str
        The record that holds it.
    clients : int
        N.
    sampled : int
        K, the sites a round samples (q = K/N).
    rounds : int
        T, the planned rounds (what ``target_epsilon`` calibrates z for).
    seed : int
        The scenario's seed; round t's noise comes from the stream (seed, "central-dp", t[, site]).
    """

    def __init__(self, params: CentralDPParams, *, upload: str, record: str, clients: int, sampled: int,
                 rounds: int, seed: int) -> None:
        self.params = params
        self.upload = upload
        self.record = record
        self.clients = clients
        self.sampled = sampled
        self.rounds = rounds
        self.seed = seed
        self.sample_rate = sampled / clients
        if params.noise_multiplier is not None:
            self.noise_multiplier = params.noise_multiplier
        else:
            assert params.target_epsilon is not None  # the params' validator
            self.noise_multiplier = calibrate_noise(params.target_epsilon, params.delta, self.sample_rate, rounds,
                                                    params.accountant)
        self.rounds_spent = 0  # rounds whose noisy aggregate has been released
        self._aggregated: tuple[int, list[str]] = (0, [])  # this round's n and the names the sites uploaded

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> CentralDPServer:
        """The server half of ``scenario``: N = ``partition.clients``, K from the strategy's sampling."""
        section, clients = scenario.strategy, scenario.partition.clients
        record, declared = protected_upload(declare(scenario).uploads)
        upload = declared.kind
        return cls(CentralDPParams.model_validate(scenario.privacy.params), upload=upload, record=record,
                   clients=clients, sampled=Cohort.sample_size(clients, section.fraction_train, section.min_clients),
                   rounds=section.rounds, seed=scenario.seed)

    def epsilon_after(self, rounds: int) -> float:
        """ε(δ) of ``rounds`` subsampled Gaussian steps with multiplier z at rate q."""
        return epsilon([(self.noise_multiplier, self.sample_rate, rounds)], self.params.delta, self.params.accountant)

    @property
    def epsilon(self) -> float:
        """ε spent by the rounds released so far (every round's record reports it)."""
        return self.epsilon_after(self.rounds_spent)

    def summary(self) -> None:
        """Log z, q and the ε the planned rounds spend."""
        p = self.params
        log.info("client-level DP (DP-FedAvg, McMahan et al. 2018): clip S %.4g, noise multiplier z %.4g, "
                 "sampling q = %d/%d, %d rounds -> epsilon %.4g at delta %g (%s)", p.clip, self.noise_multiplier,
                 self.sampled, self.clients, self.rounds, self.epsilon_after(self.rounds), p.delta, p.accountant)
        if p.delta >= 1.0 / self.clients:
            log.warning("central DP: delta %g is not below 1/N = %.3g: a guarantee that may fail for one site in N "
                        "protects little", p.delta, 1.0 / self.clients)
        if self.sampled < self.clients:
            log.info("central DP: epsilon treats the cohort of %d sites as Poisson sampling at q = %.3g (the usual "
                     "approximation for fixed-size sampling)", self.sampled, self.sample_rate)

    def configure(self, config: ConfigRecord, server_round: int) -> None:
        """Refuse a round that would take ε past ``target_epsilon`` (only when z was given, not calibrated).

        Raises
        ------
        PrivacyBudgetExhausted
            The run's budget would be overspent by this round.
        """
        self.rounds_spent = server_round - 1  # every earlier round was released (also after --resume)
        target = self.params.target_epsilon
        if target is not None and self.params.noise_multiplier is not None:
            after = self.epsilon_after(server_round)
            if after > target:
                raise PrivacyBudgetExhausted(self.epsilon, after, target, self.params.delta)

    def before_aggregate(self, replies: list[Message], sent: ArrayRecord, server_round: int, cohort: Cohort) -> None:
        """Clip every site's update (again: the server does not rely on the sites), weight the sites equally;
        for update uploads add each site's noise N(0, z² S² I) here, there being no sum to perturb.

        Parameters
        ----------
        replies : list of Message
            The round's train replies (modified in place).
        sent : ArrayRecord
            w_t, the global arrays the round started from.
        server_round : int
            t.
        cohort : Cohort
            Node id ↔ partition id (site k's noise stream is (seed, "central-dp", t, k)).
        """
        reference = sent.to_torch_state_dict() if self.upload == "weights" else None
        count, names = 0, set[str]()
        for reply in replies:
            if not reply.has_content() or self.record not in reply.content.array_records:
                continue
            tensors = reply.content.array_records[self.record].to_torch_state_dict()
            clipped, norm = clipped_upload(tensors, reference, self.params.clip)
            if not math.isfinite(norm):
                continue  # the strategy discards non-finite updates
            if norm > self.params.clip * (1 + 1e-6):
                log.warning("central DP round %d: an update of norm %.4g > S = %.4g arrived unclipped; the server "
                            "clipped it", server_round, norm, self.params.clip)
            if self.upload == "update":
                generator = torch_generator(self.seed, "central-dp", server_round, cohort.partition_of(reply))
                floating = {name: t for name, t in clipped.items() if torch.is_floating_point(t)}
                clipped.update(add_gaussian_noise(floating, self.noise_multiplier * self.params.clip, generator))
            reply.content[self.record] = ArrayRecord(clipped)
            if METRICS_KEY in reply.content.metric_records:
                reply.content.metric_records[METRICS_KEY][AGGREGATION_WEIGHT_KEY] = 1.0
            count += 1
            names.update(name for name, t in clipped.items() if torch.is_floating_point(t))
        self._aggregated = (count, sorted(names))

    def after_aggregate(self, arrays: ArrayRecord, server_round: int) -> ArrayRecord:
        """w_{t+1} = mean + N(0, (z S / n)² I) on the tensors the sites uploaded (weights uploads)."""
        self.rounds_spent = server_round
        count, names = self._aggregated
        if self.upload != "weights" or count == 0 or self.noise_multiplier == 0.0:
            return arrays
        tensors = arrays.to_torch_state_dict()
        generator = torch_generator(self.seed, "central-dp", server_round)
        noisy = add_gaussian_noise({name: tensors[name] for name in names if name in tensors},
                                   self.noise_multiplier * self.params.clip / count, generator)
        return ArrayRecord({name: noisy.get(name, tensor) for name, tensor in tensors.items()})

    def report(self) -> dict[str, Any]:
        """The privacy block of ``summary.json``: ε spent, δ, the accountant and the noise."""
        p = self.params
        return {
            "epsilon": self.epsilon, "delta": p.delta, "accountant": p.accountant, "clip": p.clip,
            "noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "clients": self.clients,
            "sampled": self.sampled, "rounds_spent": self.rounds_spent, "target_epsilon": p.target_epsilon,
            "basis": f"client-level, {p.accountant} accountant",
        }
