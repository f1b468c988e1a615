"""SCAFFOLD: Stochastic Controlled Averaging for federated learning.

Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning", ICML 2020 (arXiv:1910.06378), Algorithm 1.

Client drift: with several local steps on heterogeneous data, each site walks
towards its own optimum and FedAvg converges to a biased point. SCAFFOLD keeps a
server control variate c ≈ ∇F(w) and one c_k ≈ ∇F_k(w) per site and corrects
every local step (Algorithm 1 of Karimireddy et al.):

    client k ∈ S, starting from w_k = w_t, for each of its K local steps:
        w_k ← w_k − η_l (g_k(w_k) − c_k + c)                           (Alg. 1 line 10)
    c_k⁺ = ∇F_k(w_t)                                   option I        (line 12)
         = c_k − c + (w_t − w_k) / (K η_l)             option II
    reply (Δw_k, Δc_k) = (w_k − w_t, c_k⁺ − c_k);  c_k ← c_k⁺          (lines 13-14)

    server:
        w_{t+1} = w_t + η_g (1/|S|) Σ_{k∈S} Δw_k                       (line 16)
        c ← c + (|S|/N) (1/|S|) Σ_{k∈S} Δc_k                           (line 17)

c and every c_k start at zero, so c = (1/N) Σ_k c_k holds after every round
(the update adds exactly each sampled site's change). N is the number of sites,
|S| the number of usable replies of the round, K the local steps a site
actually took (``steps`` of the trainer, so ``max_steps`` and a short last
epoch are counted right), η_l = ``local.lr``, η_g = ``server_lr``.

Defenses (the scenario's ``defense`` section, :mod:`strategies.aggregation`): the
mean of the Δw_k in line 16 is what a robust rule or the norm bound replaces,

    w_{t+1} = w_t + η_g (Rule(w̃_k : k ∈ S) − w_t),   w̃_k = w_t + Δw_k min(1, C/‖Δw_k‖₂),

which is w_t + η_g Rule(Δw̃_k) since every rule offered is translation-equivariant
(Rule(w_t + Δ_k) = w_t + Rule(Δ_k); Krum's distances do not change). The control
variate keeps line 17 with the mean of ALL usable sites' Δc_k, whatever the rule:
every site that replied has already replaced its c_k by c_k⁺, so only the full
sum keeps c = (1/N) Σ_k c_k, the invariant the corrections c − c_k rely on. A
Byzantine site can therefore shift c by its Δc_k/N in one round; bounding or
filtering Δc_k would break the invariant instead (it would need the site to be
told, which Algorithm 1 has no message for).

Weighting: as in the paper, the means are unweighted, so SCAFFOLD's fixed point
minimises (1/N) Σ_k F_k(w). This equals FedAvg's objective Σ_k (n_k/n) F_k(w)
when the sites hold equally many examples; with unequal n_k the two optima
differ (the tests compute the right one for each).

Where things live:

* c travels to the sampled sites in the train message as a second ArrayRecord,
  ``"scaffold-c"``, next to w_t in ``"arrays"``; evaluation messages carry w only.
  The server keeps c in float64 and checkpoints it (:meth:`Scaffold.state_dict`).
* c_k lives in the node's ``context.state`` (``"scaffold-c-local"``), so it
  survives rounds in which the site is not sampled and, because node state is
  exported into checkpoints, ``--resume`` (with ``output.checkpoint_node_state``
  off a resumed run restarts every c_k at zero while c is restored).
* The site replies w_k (every tensor, in ``"arrays"``) and Δc_k (``"scaffold-dc"``);
  the server forms Δw_k = w_k − w_t in float64, in partition-id order.

Control variates cover the trainable parameters only. BatchNorm running
statistics are not a gradient step: the server sets them to the mean of the
sites' (``num_batches_tracked``: maximum), as FedAvg's ``bn_stats: average``.

Optimiser: option II's estimate (w_t − w_k)/(K η_l) = mean corrected gradient
holds only for plain SGD, so option II with another optimiser, momentum or
weight decay is rejected when the scenario is loaded. Option I works with any
``local.optimizer``: the corrected gradient g − c_k + c is what the optimiser
receives (Adam then rescales it; weight decay is added by the optimiser on top),
and c_k⁺ is the gradient of the task loss alone, over the full local data, at w_t.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sized
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from pydantic import Field
from torch.utils.data import DataLoader

from medtasks.placement import model_device, to_device
from strategies.aggregation import Aggregator
from strategies.base import (
    ARRAYS_KEY,
    Algorithm,
    ClientRule,
    Cohort,
    StrategyContext,
    StrategyParams,
    Upload,
    aggregate_metrics,
    trainable_parameters,
    usable_replies,
    weighted_average,
)
from strategies.fedavg import FedAvg, sampling_options

if TYPE_CHECKING:  # pragma: no cover
    from torch.utils.data import Dataset

    from medtasks.base import Task
    from medtasks.scenario import LocalSection, Scenario

log = logging.getLogger("medfed")

SERVER_VARIATE_KEY = "scaffold-c"  # c, server → client, train messages only
LOCAL_VARIATE_KEY = "scaffold-c-local"  # c_k, in the node's context.state
VARIATE_DELTA_KEY = "scaffold-dc"  # Δc_k, client → server


class ScaffoldParams(StrategyParams):
    """``strategy.params`` of ``scaffold``."""

    variate: Literal["I", "II"] = Field(
        "II", description="c_k⁺: I = ∇F_k(w_t), II = c_k − c + (w_t − w_k)/(K η_l)"
    )
    server_lr: float = Field(1.0, gt=0.0, description="η_g of w_{t+1} = w_t + η_g mean Δw_k")


# --- server half -------------------------------------------------------------------------------
class Scaffold(FedAvg):
    """FedAvg's sampling and bookkeeping with SCAFFOLD's server step and control variate.

    .. math::

        w_{t+1} = w_t + \\eta_g \\frac{1}{|S|} \\sum_{k \\in S} \\Delta w_k, \\qquad
        c \\leftarrow c + \\frac{|S|}{N} \\frac{1}{|S|} \\sum_{k \\in S} \\Delta c_k

    With a defense, the mean of the Δw_k is the aggregator's rule over the (norm-bounded) w_k, minus w_t;
    c always takes the mean of every usable Δc_k (module docstring).

    The client MUST add c − c_k to the gradient of every local step, keep c_k in
    its persistent state and reply w_k in ``"arrays"`` and Δc_k = c_k⁺ − c_k in
    ``"scaffold-dc"`` (:class:`ScaffoldClient` does).

    Parameters
    ----------
    cohort : Cohort
        Node id ↔ partition id map (N = its size) and sampling seed.
    shapes : Mapping[str, torch.Size]
        Name and shape of every trainable parameter (the tensors c covers).
    server_lr : float (default: 1.0)
        η_g, the server's step size.
    **sampling
        ``fraction_train``, ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes`` and
        ``aggregator`` as for :class:`strategies.fedavg.FedAvg`.
    """

    def __init__(self, cohort: Cohort, shapes: Mapping[str, torch.Size], *, server_lr: float = 1.0,
                 **sampling: Any) -> None:
        super().__init__(cohort, **sampling)
        self.server_lr = server_lr
        self.num_sites = len(cohort.node_to_partition)
        self.control = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
        self._current: dict[str, torch.Tensor] = {}

    def summary(self) -> None:
        """Log the configuration (what ran is in the run's log)."""
        self.log_aggregator()
        log.info("SCAFFOLD: server lr %.4g, %d sites, fraction train %.2f / evaluate %.2f, min train nodes %d",
                 self.server_lr, self.num_sites, self.fraction_train, self.fraction_evaluate, self.min_train_nodes)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send (w_t, c) to the sampled sites; c as float32 in ``"scaffold-c"``."""
        self._current = arrays.to_torch_state_dict()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        control = ArrayRecord({name: value.float() for name, value in self.control.items()})
        for message in messages:
            message.content[SERVER_VARIATE_KEY] = control
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """w_{t+1} = w_t + η_g mean_k (w_k − w_t) and c ← c + (1/N) Σ_k Δc_k over the usable replies.

        With a defense, mean_k w_k is the aggregator's rule over the norm-bounded w_k; c still takes every
        usable Δc_k. A round with too few updates for the rule changes neither (and fails).
        """
        usable = usable_replies(replies, self.cohort, "train")
        if not usable:
            return None, None
        equal = [1.0] * len(usable)
        models = [r.content.array_records[ARRAYS_KEY].to_torch_state_dict() for r in usable]
        mean_model = self.aggregate_states(server_round, models, equal, self._current)
        if mean_model is None:
            return None, None
        mean_delta = weighted_average(
            [r.content.array_records[VARIATE_DELTA_KEY].to_torch_state_dict() for r in usable], equal)
        updated = {}
        for name, current in self._current.items():
            if name in self.control:  # mean_k (w_k − w_t) = mean_k w_k − w_t (a rule: Rule(w_k) − w_t)
                step = mean_model[name].double() - current.double()
                updated[name] = (current.double() + self.server_lr * step).to(current.dtype)
            else:  # running statistics: the sites' mean
                updated[name] = mean_model[name]
        scale = len(usable) / self.num_sites
        for name, value in self.control.items():
            value += scale * mean_delta[name].double()
        return ArrayRecord(updated), aggregate_metrics(usable)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """The server control variate c (float64), for checkpoints."""
        return {"control": {name: value.clone() for name, value in self.control.items()}}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore c from :meth:`state_dict`.

        Raises
        ------
        ValueError
            If the checkpoint's c does not match the model's trainable parameters.
        """
        saved = state.get("control")
        if saved is None or set(saved) != set(self.control):
            raise ValueError("strategy_state: the checkpoint holds no SCAFFOLD control variate for this model")
        self.control = {name: torch.as_tensor(saved[name], dtype=torch.float64).clone() for name in self.control}


# --- client half -------------------------------------------------------------------------------
def full_gradient(model: torch.nn.Module, task: Task, dataset: Dataset, batch_size: int) -> dict[str, torch.Tensor]:
    """∇F_k(w) = Σ_b (|b|/n_k) ∇ℓ_b(w) over the whole local dataset, for every trainable parameter.

    ``task.loss`` is a mean over its batch, so the size-weighted sum of batch
    gradients is the gradient of the mean loss over all n_k examples (exactly,
    for models without BatchNorm). The model is in training mode, as in the
    local steps; BatchNorm running statistics are restored afterwards, so this
    pass leaves the model unchanged. Returns float32 tensors of each
    parameter's shape; the parameters' ``.grad`` is cleared.

    Raises
    ------
    ValueError
        If ``dataset`` is empty.
    TypeError
        If ``dataset`` has no length (not a map-style dataset).
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"scaffold: the training data ({type(dataset).__name__}) has no len()")
    size = len(dataset)
    if size == 0:
        raise ValueError("scaffold: this site has no training examples")
    parameters = trainable_parameters(model)
    buffers = {name: value.clone() for name, value in model.named_buffers()}
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in parameters.items()}
    model.train()
    device = model_device(model)
    for start, batch in zip(range(0, size, batch_size), DataLoader(dataset, batch_size=batch_size, shuffle=False)):
        model.zero_grad(set_to_none=True)
        task.loss(model, to_device(batch, device)).backward()
        share = min(batch_size, size - start) / size
        for name, p in parameters.items():
            if p.grad is not None:
                total[name] += share * p.grad.double()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for name, value in model.named_buffers():
            value.copy_(buffers[name])
    return {name: value.float() for name, value in total.items()}


def _beside(tensors: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` (received or stored control variates, on the CPU) on the device of the parameter of the same
    name (a name the model lacks stays where it is, for the caller's check)."""
    return {name: t.to(parameters[name].device) if name in parameters else t for name, t in tensors.items()}


class ScaffoldClient(ClientRule):
    """Client half: corrected local steps and the site's control variate c_k in ``context.state``."""

    params: ScaffoldParams
    _control: dict[str, torch.Tensor] | None = None

    def receive(self, model: torch.nn.Module, content: RecordDict, state: RecordDict) -> None:
        """Load w_t; for training also c (message) and c_k (node state, zero at first)."""
        super().receive(model, content, state)
        self._control = None
        if SERVER_VARIATE_KEY not in content:  # evaluation: w only
            return
        parameters = trainable_parameters(model)
        control = _beside(content.array_records[SERVER_VARIATE_KEY].to_torch_state_dict(), parameters)
        if set(control) != set(parameters):
            raise ValueError(f"scaffold: '{SERVER_VARIATE_KEY}' does not match the model's trainable parameters")
        local: dict[str, torch.Tensor]
        if LOCAL_VARIATE_KEY in state:
            local = _beside(state.array_records[LOCAL_VARIATE_KEY].to_torch_state_dict(), parameters)
        else:
            local = {name: torch.zeros_like(p) for name, p in parameters.items()}
        self._start = {name: p.detach().clone() for name, p in parameters.items()}
        self._control, self._local = control, local
        self._correction = {name: control[name] - local[name] for name in parameters}  # c − c_k

    def before_training(self, model: torch.nn.Module, task: Task, dataset: Dataset,
                        local: LocalSection) -> None:
        """Remember η_l; option I computes c_k⁺ = ∇F_k(w_t) on the full local data now."""
        if self._control is None:
            raise ValueError(f"scaffold: the train message carries no server control variate '{SERVER_VARIATE_KEY}'")
        self._lr = local.lr
        self._gradient_at_start = (
            full_gradient(model, task, dataset, local.batch_size) if self.params.variate == "I" else None
        )

    def after_backward(self, model: torch.nn.Module) -> None:
        """g ← g − c_k + c for every trainable parameter (Alg. 1 line 10)."""
        for name, p in trainable_parameters(model).items():
            if p.grad is None:
                p.grad = self._correction[name].clone()
            else:
                p.grad.add_(self._correction[name])

    def reply(self, model: torch.nn.Module, state: RecordDict, *, steps: int) -> dict[str, ArrayRecord]:
        """c_k⁺ (option I or II); store it as c_k; reply w_k and Δc_k = c_k⁺ − c_k.

        Raises
        ------
        ValueError
            Option II after zero local steps (K = 0), or without the server control variate c.
        FloatingPointError
            If w_k or c_k⁺ is not finite (c_k is then left unchanged).
        """
        if self._gradient_at_start is not None:
            updated = self._gradient_at_start
        else:
            if steps == 0:
                raise ValueError("scaffold: variate 'II' needs at least one local step (K = 0)")
            control = self._control
            if control is None:
                raise ValueError(f"scaffold: the train message carries no server control variate "
                                 f"'{SERVER_VARIATE_KEY}'")
            updated = {
                name: (self._local[name].double() - control[name].double()
                       + (self._start[name].double() - p.detach().double()) / (steps * self._lr)).float()
                for name, p in trainable_parameters(model).items()
            }
        model_state = model.state_dict()
        if not all(bool(torch.isfinite(t).all()) for t in [*updated.values(), *model_state.values()]
                   if t.is_floating_point()):
            raise FloatingPointError("scaffold: local model or control variate is not finite; c_k left unchanged")
        delta = {name: updated[name] - self._local[name] for name in updated}
        state[LOCAL_VARIATE_KEY] = ArrayRecord(updated)
        return {ARRAYS_KEY: ArrayRecord(model_state), VARIATE_DELTA_KEY: ArrayRecord(delta)}

    def uploads(self, model: torch.nn.Module) -> dict[str, Upload]:
        """w_k, and Δc_k over the trainable parameters, shaped like the c the server sent (option I computes it
        from the raw local data)."""
        return {
            ARRAYS_KEY: Upload("weights", frozenset(model.state_dict())),
            VARIATE_DELTA_KEY: Upload("variate-update", frozenset(trainable_parameters(model)),
                                      reference=SERVER_VARIATE_KEY, from_data=self.params.variate == "I"),
        }


def check_compatible(scenario: Scenario) -> None:
    """Option II's (w_t − w_k)/(K η_l) estimate holds for plain SGD only."""
    params = ScaffoldParams.model_validate(scenario.strategy.params)
    local = scenario.local
    if params.variate != "II":
        return
    for key, plain in (("optimizer", "sgd"), ("momentum", 0.0), ("weight_decay", 0.0)):
        value = getattr(local, key)
        if value != plain:
            raise ValueError(
                f"local.{key}: scaffold variate 'II' assumes plain SGD (optimizer sgd, momentum 0, weight_decay 0), "
                f"got {key} {value!r}; use plain SGD or strategy.params.variate 'I'"
            )


def build_strategy(context: StrategyContext) -> Scaffold:
    """Server half from a scenario."""
    shapes = {name: p.shape for name, p in trainable_parameters(context.model).items()}
    params = cast(ScaffoldParams, context.params)  # the server validates strategy.params with ALGORITHM.Params
    return Scaffold(context.cohort, shapes, server_lr=params.server_lr,
                    aggregator=Aggregator.from_scenario(context.scenario), **sampling_options(context))


ALGORITHM = Algorithm(name="scaffold", Params=ScaffoldParams, build_strategy=build_strategy,
                      client_rule=ScaffoldClient, check_compatible=check_compatible, label="SCAFFOLD")
