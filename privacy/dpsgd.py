r"""Sample-level DP-SGD on each client, with Opacus, and a persistent privacy accountant.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy",
arXiv:1607.00133). At every local step a batch B is drawn by Poisson sampling
(each of the n_k examples independently with probability q = 1/⌈n_k/b⌉, b the
batch size), every per-sample gradient is clipped to norm C and Gaussian noise
is added to their sum:

.. math::

    \bar g_i = g_i \cdot \min\left(1, \frac{C}{\lVert g_i \rVert_2}\right), \qquad
    \tilde g = \frac{1}{q\, n_k} \left( \sum_{i \in B} \bar g_i + \mathcal N(0, \sigma^2 C^2 I) \right)

(``q·n_k`` is Opacus's expected batch size, rounded down). The wrapped optimiser
(SGD, Adam, ...) then steps with g̃. One step is the Poisson-subsampled Gaussian
mechanism with noise multiplier σ and sampling rate q; its privacy loss is
computed by an accountant (:mod:`privacy.accounting`: RDP or PRV) over the whole
history [(σ, q, steps), ...] of the node, across rounds.

The history is plain data: it is kept in the node's ``context.state`` (a
ConfigRecord under :data:`ACCOUNTANT_KEY`), so it survives between rounds and
``--resume`` (:mod:`client.state`), and ε is recomputed from it
(:func:`privacy.accounting.epsilon`, the same number as a live Opacus accountant).

Privacy holds for what leaves the node (the trained weights and anything
computed from them). A client rule that sends anything computed from the raw
data (an upload declared ``from_data``, e.g. a control variate that is a full
local gradient, or a gradient read before the noise) breaks it: see
:mod:`privacy.compatibility` and :class:`DPSGDClient`.

The client half a site's train handler sees is :class:`DPSGDSite` (a
:class:`privacy.ClientPrivacy`): it hands the trainer a :class:`DPSGDClient` and
adds the round's steps to the node's history once the reply is built.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence, Sized
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from flwr.app import ConfigRecord, RecordDict
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medtasks.placement import generator_on, model_device
from medtasks.seeding import torch_generator
from privacy.accounting import (
    Entry,
    calibrate_noise,
    check_budget,
    epsilon,
    merge_history,
)

if TYPE_CHECKING:  # pragma: no cover
    from opacus.accountants import IAccountant
    from opacus.grad_sample import GradSampleHooks
    from opacus.optimizers import DPOptimizer
    from torch.utils.data import DataLoader

    from medtasks.scenario import LocalSection, Scenario
    from strategies.base import ClientRule

log = logging.getLogger("medfed")

ACCOUNTANT_KEY = "dpsgd-accountant"
"""Name of the ConfigRecord in ``context.state`` that holds the accountant history."""


NORM_KEY = "task.params.norm"

EPSILON_METRIC = "epsilon"  # train metric: ε(δ) this node has spent so far, all rounds included
NOISE_MULTIPLIER_METRIC = "noise-multiplier"  # train metric: σ of this round's steps


class DPSGDParams(BaseModel):
    """Settings of sample-level DP-SGD (the ``dpsgd`` privacy mechanism).

    Parameters
    ----------
    noise_multiplier : float or None, default None
        σ, the noise std relative to ``max_grad_norm``. 0 trains with clipping only
        (ε = ∞: clipping alone is not DP).
    target_epsilon : float or None, default None
        Privacy budget ε at ``delta``. Without ``noise_multiplier``, σ is calibrated
        so that ε ≤ target after the planned rounds (:func:`calibrate_noise`); in
        both cases a round that would take ε past the target is refused
        (:class:`privacy.accounting.PrivacyBudgetExhausted`). At least one of the two is required.
    max_grad_norm : float, default 1.0
        C, the per-sample clipping bound (L2 norm over all trainable parameters).
    delta : float, default 1e-5
        δ of the (ε, δ) guarantee; should be well below 1/n_k.
    accountant : {"rdp", "prv"}, default "rdp"
        How ε is computed from the history (module docstring).
    poisson_sampling : bool, default True
        Poisson batches (what the accountants assume). ``False`` keeps the
        shuffled fixed-size batches: ε is then only an approximation.
    secure_mode : False
        Opacus's cryptographically secure noise needs ``torchcsprng`` and makes
        runs unrepeatable; the noise here comes from a seeded generator.
    on_exhausted : {"stop-client", "stop-run"}, default "stop-client"
        What a spent budget stops: the client (it replies an error and the
        federation goes on without it) or the whole run (the server ends it on
        the first :class:`privacy.accounting.PrivacyBudgetExhausted` reply).
    """

    model_config = ConfigDict(extra="forbid")

    noise_multiplier: float | None = Field(
        None, ge=0.0, le=1e6,
        description="σ: noise std relative to max_grad_norm (0 = clipping only, ε = ∞; null = calibrated to "
                    "target_epsilon)",
    )
    target_epsilon: float | None = Field(
        None, gt=0.0,
        description="each site's ε budget at delta: σ is calibrated to it when noise_multiplier is null; a round past "
                    "it is refused",
    )
    max_grad_norm: float = Field(
        1.0, gt=0.0,
        description="C, the per-example clipping bound: L2 norm over all trainable parameters (Abadi et al. 2016)",
    )
    delta: float = Field(1e-5, gt=0.0, lt=1.0,
                         description="δ of the (ε, δ) guarantee, in (0, 1); should be well below 1/n_k")
    accountant: Literal["rdp", "prv"] = Field(
        "rdp", description="how ε is computed: rdp (Rényi DP, Mironov 2017) or prv (Gopi et al. 2021: tighter, slower)"
    )
    poisson_sampling: bool = Field(
        True, description="Poisson-sampled batches, as the accountants assume (false: shuffled fixed-size batches, "
                          "ε only approximate)",
    )
    secure_mode: Literal[False] = Field(
        False, description="always false: Opacus's secure noise needs torchcsprng and makes runs unrepeatable; "
                           "the noise is seeded",
    )
    on_exhausted: Literal["stop-client", "stop-run"] = Field(
        "stop-client", description="what a spent budget stops: the site (the run goes on without it) or the whole run"
    )

    @model_validator(mode="after")
    def _noise_or_budget(self) -> DPSGDParams:
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError("dpsgd needs noise_multiplier or target_epsilon (or both)")
        return self


# --- the history and its accountants --------------------------------------------------------
def save_history(state: RecordDict, history: Sequence[Entry]) -> None:
    """Store ``history`` in a node's ``context.state`` as a ConfigRecord of three lists."""
    state[ACCOUNTANT_KEY] = ConfigRecord(
        {
            "noise-multiplier": [float(entry[0]) for entry in history],
            "sample-rate": [float(entry[1]) for entry in history],
            "steps": [int(entry[2]) for entry in history],
        }
    )


def load_history(state: RecordDict) -> list[Entry]:
    """The history stored by :func:`save_history` (empty for a node that never trained)."""
    if ACCOUNTANT_KEY not in state:
        return []
    record = state.config_records[ACCOUNTANT_KEY]
    sigmas, rates, steps = (_history_list(record, key) for key in ("noise-multiplier", "sample-rate", "steps"))
    if not len(sigmas) == len(rates) == len(steps):
        lengths = f"{len(sigmas)}, {len(rates)}, {len(steps)}"
        raise ValueError(f"corrupt '{ACCOUNTANT_KEY}' state: lists of lengths {lengths}")
    return [(float(s), float(q), int(n)) for s, q, n in zip(sigmas, rates, steps)]


def _history_list(record: ConfigRecord, key: str) -> Sequence[int | float | str | bytes | bool]:
    """The list ``record[key]`` of a stored history (a ValueError if it is a scalar: the state is corrupt)."""
    value = record[key]
    if not isinstance(value, list):
        raise ValueError(f"corrupt '{ACCOUNTANT_KEY}' state: '{key}' is not a list")
    return value


def append_history(state: RecordDict, entries: Sequence[Entry]) -> list[Entry]:
    """Add one round's ``entries`` to the history in ``state``; return the whole history."""
    history = merge_history(load_history(state), entries)
    save_history(state, history)
    return history


# --- models and scenario combinations ---------------------------------------------------------
def _batchnorm_layers(model: torch.nn.Module) -> list[str]:
    return [name or type(model).__name__ for name, module in model.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)]


def _opacus_errors(model: torch.nn.Module) -> list[str]:
    """First lines of Opacus's validation errors for ``model`` (as if in training mode)."""
    from opacus.validators import ModuleValidator

    training = model.training
    model.train()
    try:
        errors = ModuleValidator.validate(model, strict=False)
    finally:
        model.train(training)
    return [str(error).splitlines()[0] for error in errors]


def check_model(model: torch.nn.Module, *, convert: bool = False) -> torch.nn.Module | None:
    """``None`` if Opacus can compute per-sample gradients of ``model`` as it is.

    BatchNorm mixes the examples of a batch (each output depends on the batch's
    mean and variance), so per-sample gradients, and hence DP-SGD, are undefined.
    Every BatchNorm counts, also those without affine parameters that Opacus's
    own validator lets through.

    Parameters
    ----------
    model : torch.nn.Module
        The model to check.
    convert : bool, default False
        Return a converted deep copy instead of raising: every BatchNorm
        becomes ``GroupNorm(gcd(32, C), C)`` (freshly initialised), then Opacus's
        other fixers run. The copy's ``state_dict`` lacks the BatchNorm running
        statistics, so in a federation the server must build the same model
        (the task's ``norm`` parameter), or received tensors will not fit.

    Returns
    -------
    torch.nn.Module or None
        ``None`` if ``model`` can be trained as it is, else the converted copy (``convert``).

    Raises
    ------
    ValueError
        (one line) naming ``task.params.norm`` for BatchNorm, or Opacus's
        reasons for other unsupported layers.
    """
    batchnorms = _batchnorm_layers(model)
    errors = [e for e in _opacus_errors(model) if "BatchNorm" not in e]
    if not batchnorms and not errors:
        return None
    if not convert:
        if batchnorms:
            shown = ", ".join(batchnorms[:3]) + (f" and {len(batchnorms) - 3} more" if len(batchnorms) > 3 else "")
            raise ValueError(
                f"DP-SGD cannot train BatchNorm layers ({shown}): per-sample gradients are undefined when each "
                f"output depends on the batch statistics; set {NORM_KEY}: group (or instance)"
            )
        raise ValueError(f"DP-SGD (Opacus) cannot train this model: {'; '.join(errors)}")
    from opacus.validators import ModuleValidator

    converted = _replace_batchnorm(model)
    converted = ModuleValidator.fix(converted)
    remaining = _opacus_errors(converted)
    if remaining:
        raise ValueError(f"DP-SGD (Opacus) cannot train this model even after conversion: {'; '.join(remaining)}")
    if batchnorms:
        log.warning("dpsgd: replaced BatchNorm layers %s by GroupNorm (the server must build the same model: %s)",
                    ", ".join(batchnorms), NORM_KEY)
    return converted


def _replace_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of ``model`` with each BatchNorm replaced by GroupNorm(gcd(32, C), C)."""
    import copy

    def group_norm(bn: torch.nn.modules.batchnorm._BatchNorm) -> torch.nn.GroupNorm:
        return torch.nn.GroupNorm(math.gcd(32, bn.num_features), bn.num_features, eps=bn.eps, affine=bn.affine)

    copied = copy.deepcopy(model)
    if isinstance(copied, torch.nn.modules.batchnorm._BatchNorm):
        return group_norm(copied)
    for parent in list(copied.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(parent, name, group_norm(child))
    return copied


# --- one round's steps and the budget check before a run ------------------------------------------------
def round_entry(params: DPSGDParams, batches: int, *, rounds: int, epochs: int, max_steps: int | None) -> Entry:
    """The accountant entry (σ, q, steps) of one round of a site whose loader has ``batches`` batches.

    q = 1/``batches`` (what Opacus uses: the expected batch size stays ~b), steps = min(epochs · batches,
    max_steps), σ = ``noise_multiplier`` or, without it, :func:`calibrate_noise` for ``rounds`` rounds of these
    steps (ε ≤ ``target_epsilon`` after the planned rounds).

    Raises
    ------
    ValueError
        ``batches`` < 1, or no σ reaches the target.
    """
    if batches < 1:
        raise ValueError("dpsgd: this site has no training examples")
    sample_rate = 1.0 / batches
    steps = epochs * batches if max_steps is None else min(epochs * batches, max_steps)
    if params.noise_multiplier is not None:
        return float(params.noise_multiplier), sample_rate, steps
    assert params.target_epsilon is not None  # the params validator guarantees one of them
    return calibrate_noise(params.target_epsilon, params.delta, sample_rate, rounds * steps,
                           params.accountant), sample_rate, steps


def check_first_round(params: DPSGDParams, sites: Mapping[int, tuple[int, LocalSection]], rounds: int) -> None:
    """Refuse a ``noise_multiplier`` whose first round already takes some site past ``target_epsilon``.

    With σ given and a target, every site computes ε(δ) of its first round (:func:`round_entry`,
    Abadi et al. 2016's subsampled Gaussian mechanism, accounted by :func:`privacy.accounting.epsilon`) and
    refuses to train past the target: such a run would stop before round 1. A calibrated σ never does
    (it is chosen so that all ``rounds`` fit).

    Parameters
    ----------
    params : DPSGDParams
        The mechanism's settings.
    sites : Mapping[int, tuple[int, LocalSection]]
        Partition id → (batches of its training loader, the local settings its rule resolved).
    rounds : int
        The planned rounds.

    Raises
    ------
    ValueError
        One line naming ``privacy.params``: how many sites are refused, the worst site's ε, σ, q and steps.
    """
    target = params.target_epsilon
    if target is None or params.noise_multiplier is None:
        return
    spent: dict[Entry, float] = {}  # sites with equal loaders share one accountant call
    over: list[tuple[float, int, Entry]] = []
    for site, (batches, local) in sorted(sites.items()):
        if batches < 1:
            continue  # a site without training data fails on its own, with its own message
        entry = round_entry(params, batches, rounds=rounds, epochs=local.epochs, max_steps=local.max_steps)
        if entry not in spent:
            spent[entry] = epsilon([entry], params.delta, params.accountant)
        if spent[entry] > target:
            over.append((spent[entry], site, entry))
    if not over:
        return
    worst, site, (sigma, rate, steps) = max(over, key=lambda item: (item[0], -item[1]))
    raise ValueError(
        f"privacy.params: one round already spends more than target_epsilon {target:g} at {len(over)} of "
        f"{len(sites)} sites (worst: site {site}, ε = {worst:.4g} at δ = {params.delta:g} from noise_multiplier "
        f"{sigma:g}, sampling rate {rate:.3g}, {steps} steps): raise noise_multiplier or target_epsilon, or drop "
        f"noise_multiplier to calibrate it"
    )


# --- the client side ----------------------------------------------------------------------------
def _first_tensor(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


# PyTorch's warning when a full backward hook fires on a module none of whose inputs requires a gradient
# (``torch.utils.hooks.BackwardHook``); see :func:`_ignore_input_gradient_warning`.
INPUT_GRADIENT_WARNING = (
    "Full backward hook is firing when gradients are computed with respect to module outputs since no inputs "
    "require gradients"
)


def _ignore_input_gradient_warning() -> None:
    """Silence PyTorch's warning about the full backward hooks Opacus attaches, and only that warning.

    Opacus computes per-sample gradients from each layer's activations (its forward hook) and the
    gradient of the layer's output (its full backward hook); it never reads the gradient of the
    layer's input. The first layer's input is the data batch, which does not require a gradient, so
    PyTorch warns at every backward pass that the hook sees only output gradients: exactly what
    Opacus needs. Making the data require a gradient would only add a backward pass to the input.
    The filter is (re)installed each time hooks are attached, so it stays in force even where a
    caller's ``warnings.catch_warnings`` replaced the filters in between.
    """
    warnings.filterwarnings("ignore", message=INPUT_GRADIENT_WARNING, category=UserWarning)


class DPSGDClient:
    """Sample-level DP-SGD for one round of one client (the trainer's ``PrivateTraining``).

    :meth:`attach` hands the model, optimiser and loader to Opacus's
    ``PrivacyEngine.make_private`` in non-wrapping mode: per-sample gradient hooks
    are registered on the layers of ``model`` itself, so the trainer keeps calling
    ``task.loss(model, batch)`` on the original object and every step still records
    ``p.grad_sample`` (shape ``[|B|, *p.shape]``). The returned ``DPOptimizer``
    ignores ``p.grad`` as left by ``backward()``: it replaces it by g̃ (module
    docstring) before stepping. Hence anything that edits ``p.grad`` between
    ``backward()`` and ``optimizer.step()`` is discarded (a control-variate correction,
    FedProx's proximal gradient, if they did it there). Terms that do not depend on the data belong in
    ``after_noise``, which runs after g̃ is in ``p.grad`` and before the wrapped
    optimiser steps; such post-processing keeps the guarantee.

    The accountant: ``prior`` is the node's history before this round
    (:func:`load_history`); :meth:`history` is this round's entries, to be added
    with :func:`append_history` once training ends.

    Parameters
    ----------
    params : DPSGDParams
        The mechanism's settings.
    generator : torch.Generator
        Noise stream, derived by the caller from (seed, round, partition).
        Poisson sampling draws from the loader's own generator. For a model on
        another device the noise comes from a generator there with the same seed
        (:func:`medtasks.placement.generator_on`): another stream, as good a one.
    prior : Sequence[Entry], default ()
        The node's accountant history before this round.
    rounds : int, default 1
        Rounds the node is expected to train in, used only to calibrate σ
        from ``target_epsilon`` (more participations than planned are refused
        once the budget is spent).
    epochs : int, default 1
        Local epochs per round.
    max_steps : int or None, default None
        Cap on local steps per round (``local.max_steps``).
    after_noise : callable or None, default None
        Called with ``model`` at every step after the private gradient
        is in ``p.grad`` and before the optimiser steps (e.g. a control-variate
        correction ``g ← g − c_k + c``).
    """

    def __init__(
        self,
        params: DPSGDParams,
        *,
        generator: torch.Generator,
        prior: Sequence[Entry] = (),
        rounds: int = 1,
        epochs: int = 1,
        max_steps: int | None = None,
        after_noise: Callable[[torch.nn.Module], None] | None = None,
    ) -> None:
        self.params = params
        self.generator = generator
        self.prior = merge_history([], prior)
        self.rounds, self.epochs, self.max_steps = rounds, epochs, max_steps
        self.after_noise = after_noise
        self.noise_multiplier: float | None = None
        self.sample_rate: float | None = None
        self._accountant: IAccountant | None = None
        self._hooks: GradSampleHooks | None = None

    def attach(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               loader: DataLoader) -> tuple[DPOptimizer, DataLoader]:
        """The private optimiser and loader to train ``model`` (in place) with this round.

        Raises
        ------
        ValueError
            For a model Opacus cannot train (:func:`check_model`).
        PrivacyBudgetExhausted
            If this round would take ε past ``target_epsilon``.
        """
        check_model(model)
        batches = len(loader)
        if batches == 0:
            raise ValueError("dpsgd: this site has no training examples")
        sigma, sample_rate, planned = round_entry(self.params, batches, rounds=self.rounds, epochs=self.epochs,
                                                  max_steps=self.max_steps)
        if self.params.target_epsilon is not None:
            check_budget(self.prior, [(sigma, sample_rate, planned)], delta=self.params.delta,
                         accountant=self.params.accountant, target_epsilon=self.params.target_epsilon)
        if sigma == 0.0:
            log.warning("dpsgd: noise_multiplier 0 clips without noise: this is not differential privacy (ε = ∞)")
        examples = len(cast(Sized, loader.dataset))  # the tasks' datasets are map-style: they define __len__
        if self.params.delta * examples > 1.0:
            log.warning("dpsgd: delta %g is not below 1/n = 1/%d", self.params.delta, examples)

        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant=self.params.accountant, secure_mode=False)
        model.train()
        hooks, private_optimizer, private_loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=sigma,
            max_grad_norm=self.params.max_grad_norm, poisson_sampling=self.params.poisson_sampling,
            noise_generator=generator_on(self.generator, model_device(model)), wrap_model=False,
        )
        _ignore_input_gradient_warning()
        count_step = private_optimizer.step_hook  # the engine's accountant, fresh for this round

        def on_private_gradient(dp_optimizer: DPOptimizer) -> None:
            count_step(dp_optimizer)
            if self.after_noise is not None:
                self.after_noise(model)

        private_optimizer.attach_step_hook(on_private_gradient)
        self.noise_multiplier, self.sample_rate = sigma, sample_rate
        self._accountant, self._hooks = engine.accountant, hooks
        return private_optimizer, private_loader

    @staticmethod
    def is_empty(batch: Any) -> bool:
        """Whether Poisson sampling drew no example: the first tensor has batch size 0, or the
        batch is an empty list (what Opacus's loader yields when the very first draw is empty)."""
        first = _first_tensor(batch)
        if first is None:
            return isinstance(batch, (list, tuple)) and len(batch) == 0
        return first.dim() > 0 and first.shape[0] == 0

    def noise_step(self, optimizer: DPOptimizer) -> None:
        """The step of an empty batch: θ moves by the noise alone, and the step is counted.

        The guarantee assumes a noisy step at every draw, empty or not (skipping
        it would reveal that the batch was empty). No forward pass is needed: the
        per-sample gradients are set to empty ``[0, *p.shape]`` tensors.
        """
        optimizer.zero_grad(set_to_none=True)
        for p in optimizer.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        optimizer.step()

    def history(self) -> list[Entry]:
        """This round's accountant entries [(σ, q, steps taken)] (empty before :meth:`attach`)."""
        if self._accountant is None:
            return []
        return merge_history([], self._accountant.history)

    def epsilon(self) -> float:
        """ε(δ) of the prior history followed by this round's steps."""
        return epsilon(merge_history(self.prior, self.history()), self.params.delta, self.params.accountant)

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample attributes from the model."""
        if self._hooks is not None:
            self._hooks.cleanup()
            self._hooks = None


# --- the client half a train handler sees ----------------------------------------------------------------
class DPSGDSite:
    """DP-SGD's client half for one round of one site (a :class:`privacy.ClientPrivacy`).

    :meth:`admit` builds the round's :class:`DPSGDClient` from the node's history, :meth:`private_training`
    hands it to the trainer, :meth:`spend` adds the round's steps to the history once the reply is built (a
    round that fails sends nothing, so it costs nothing) and :meth:`close` removes Opacus's hooks.

    Parameters
    ----------
    params : DPSGDParams
        The mechanism's settings.
    generator : torch.Generator
        The noise stream (:meth:`for_round`: (seed, "dpsgd-noise", round, partition)).
    rounds, epochs, max_steps, after_noise
        As for :class:`DPSGDClient`.
    """

    def __init__(self, params: DPSGDParams, *, generator: torch.Generator, rounds: int = 1, epochs: int = 1,
                 max_steps: int | None = None, after_noise: Callable[[torch.nn.Module], None] | None = None) -> None:
        self.params = params
        self.generator = generator
        self.rounds, self.epochs, self.max_steps, self.after_noise = rounds, epochs, max_steps, after_noise
        self.training: DPSGDClient | None = None

    @classmethod
    def for_round(cls, scenario: Scenario, server_round: int, partition_id: int, local: LocalSection,
                  rule: ClientRule) -> DPSGDSite:
        """The client half of ``scenario`` for one round of one site: its noise comes from the stream (seed,
        "dpsgd-noise", round, partition), the rule's gradient edit runs after the noise."""
        return cls(DPSGDParams.model_validate(scenario.privacy.params),
                   generator=torch_generator(scenario.seed, "dpsgd-noise", server_round, partition_id),
                   rounds=scenario.strategy.rounds, epochs=local.epochs, max_steps=local.max_steps,
                   after_noise=rule.after_backward)

    def admit(self, state: RecordDict) -> None:
        """Build the round's :class:`DPSGDClient` from the node's history (the budget is checked when it is
        attached, once the loader's sampling rate is known)."""
        self.training = DPSGDClient(self.params, generator=self.generator, prior=load_history(state),
                                    rounds=self.rounds, epochs=self.epochs, max_steps=self.max_steps,
                                    after_noise=self.after_noise)

    def private_training(self) -> DPSGDClient:
        """The trainer's private optimiser and loader maker."""
        assert self.training is not None, "private_training() before admit()"
        return self.training

    def protect(self, records: Mapping[str, Any], model: torch.nn.Module, received: RecordDict,
                state: RecordDict) -> dict[str, Any]:
        """The records as they are: everything computed from the privately trained weights is covered."""
        return dict(records)

    def spend(self, state: RecordDict) -> dict[str, float]:
        """Add this round's steps to the node's accountant history.

        Returns
        -------
        dict
            The train metrics ``epsilon`` (ε(δ) of the whole history) and ``noise-multiplier`` (σ).
        """
        training = self.private_training()
        sigma = training.noise_multiplier
        assert sigma is not None  # set when fit attached the mechanism
        history = append_history(state, training.history())
        return {EPSILON_METRIC: epsilon(history, self.params.delta, self.params.accountant),
                NOISE_MULTIPLIER_METRIC: sigma}

    def close(self) -> None:
        """Remove Opacus's hooks from the model."""
        if self.training is not None:
            self.training.close()


def client_privacy(scenario: Scenario, server_round: int, partition_id: int, train_size: int,
                   local: LocalSection, rule: ClientRule) -> DPSGDSite:
    """The client half of DP-SGD for one round of one site (:func:`privacy.client_privacy`)."""
    return DPSGDSite.for_round(scenario, server_round, partition_id, local, rule)
