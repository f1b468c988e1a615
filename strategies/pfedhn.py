"""Personalised Federated Hypernetworks (pFedHN).

Shamsian, Navon, Fetaya & Chechik, "Personalized Federated Learning using
Hypernetworks", ICML 2021 (arXiv:2103.04628).

The server holds a hypernetwork h_φ and one learnable embedding v_k ∈ R^d per
site; site k's model is generated, never averaged:

    w_k = h_φ(v_k),      min_{φ, v_1..v_K}  (1/K) Σ_k F_k(h_φ(v_k)).

Round t (Shamsian et al. 2021, Algorithm 1):

1. sample S_t; send each k ∈ S_t its own w_k = h_φ(v_k) (one message per site);
2. site k runs E local epochs of SGD from w_k and returns Δw_k = w̃_k − w_k;
3. the server updates φ and v_k by back-propagating Δw_k through h.

Sign of step 3: the paper writes φ ← φ − α (∇_φ w_k)ᵀ Δw_k, which would move
h_φ(v_k) *away* from the locally trained w̃_k. The authors' code (and the
derivation below) uses the opposite sign, which is what is implemented: the
server takes one optimiser step on the surrogate ½‖h_φ(v_k) − w̃_k‖² with w̃_k
held fixed, whose gradient is

    ∇_φ = (∂w_k/∂φ)ᵀ (w_k − w̃_k) = −(∂w_k/∂φ)ᵀ Δw_k,     ∇_{v_k} = −(∂w_k/∂v_k)ᵀ Δw_k.

With plain SGD at learning rate α this is φ ← φ + α (∂w_k/∂φ)ᵀ Δw_k.

Several sites per round: the round's gradient is the sum of the sites'
vector-Jacobian products, Σ_{k∈S_t} −(∂w_k/∂(φ, v))ᵀ Δw_k, and the server takes
one optimiser step. To first order in the learning rate this equals the paper's
one step per sampled client (all taken at the φ that generated the round's
models), so ``hn_lr`` keeps the paper's per-client meaning; each v_k receives
exactly its own site's product. The products are accumulated in float64 (the
whole hypernetwork is float64) in partition-id order, so the update is
deterministic.

What is generated: the model's trainable parameters only (``named_parameters``).
Buffers (BatchNorm running statistics, counters) are not a function of v_k:
generated running variances can turn negative (NaN losses). They are personal:
each site sends its buffers back after training, the server keeps the last ones
per site (initially the task model's) and returns them with w_k. No client node
state is needed.

Global model: pFedHN has none. ``aggregate_train`` returns the mean personalised
model (1/K) Σ_k h_φ(v_k) over all K sites (buffers averaged the same way,
integer counters take the maximum), which the round loop stores as
``model_last.pt`` and draws; central evaluation scores each site's own model
(:meth:`PFedHN.personal_arrays`) and reports their mean.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, cast

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from pydantic import Field
from torch import Tensor, nn

from medtasks.seeding import derive_seed, drawing_from
from strategies.base import (
    ARRAYS_KEY,
    CONFIG_KEY,
    Algorithm,
    ClientRule,
    Cohort,
    StrategyContext,
    StrategyParams,
    Upload,
    aggregate_metrics,
    usable_replies,
    weighted_average,
)
from strategies.fedavg import FedAvg, sampling_options

log = logging.getLogger("medfed")

DELTA_KEY = "delta"  # reply: Δw_k = w̃_k − w_k of every trainable parameter
BUFFERS_KEY = "buffers"  # reply: the site's buffers after training (BatchNorm running statistics)


class PFedHNParams(StrategyParams):
    """``strategy.params`` of ``pfedhn``.

    Defaults are the authors' code's (CIFAR-10, 5000 single-client steps), except
    ``head_init_std`` (see :class:`HyperNetwork`); short runs need larger steps (the
    MIL scenarios set their own). As in that code, weight decay applies to every
    embedding at every step, sampled or not.
    """

    embedding_dim: int | None = Field(None, ge=1, description="d of v_k (null: 1 + clients // 4, as in the paper)")
    hidden_dim: int = Field(100, ge=1, description="width H of the hypernetwork's trunk")
    hidden_layers: int = Field(3, ge=0, description="H×H layers after the trunk's first R^d → R^H layer")
    optimizer: Literal["sgd", "adam"] = Field("sgd", description="server optimiser of φ and v")
    hn_lr: float = Field(1e-2, gt=0.0, description="learning rate of φ (trunk and heads)")
    embed_lr: float | None = Field(None, gt=0.0, description="learning rate of the embeddings v (null: hn_lr)")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (sgd only)")
    weight_decay: float = Field(1e-3, ge=0.0, description="L2 weight decay of φ and v")
    max_grad_norm: float | None = Field(50.0, gt=0.0, description="clip the round's gradient norm (null: no clipping)")
    head_init_std: float = Field(0.01, ge=0.0, description="std of the heads' initial weights (biases start at w_0)")


# --- the hypernetwork -------------------------------------------------------------------------
class HyperNetwork(nn.Module):
    """h_φ: site embedding v_k → the target model's trainable tensors.

    Trunk (the authors' MLP): ``Linear(d, H)`` then ``hidden_layers`` × (ReLU,
    ``Linear(H, H)``), no activation after the last layer; u_k = trunk(v_k) ∈ R^H.
    One linear head per target tensor j:

        w_k^(j) = reshape(A_j u_k + b_j),   A_j ∈ R^{|w^(j)| × H}, b_j ∈ R^{|w^(j)|}.

    Initialisation: v_k ~ N(0, 1) (``nn.Embedding``'s default) and PyTorch's default
    for the trunk, as in the authors' code; the heads depart from it: b_j = w_0^(j),
    the task model's initial tensor, and A_j ~ N(0, head_init_std²), so every site
    starts near the common w_0 (where a FedAvg run starts; a norm layer's scale near
    1, not near 0) and differs from it by A_j u_k. Every tensor is float64.

    Parameters
    ----------
    targets : mapping of str to Tensor
        Name → initial value w_0 of every generated tensor (any shape).
    sites : int
        K, the number of embeddings.
    embedding_dim : int
        d.
    hidden_dim : int
        H.
    hidden_layers : int
        H×H layers after the first.
    head_init_std : float
        Std of the heads' initial weights.
    seed : int
        Seed of the initialisation.
    """

    def __init__(self, targets: Mapping[str, Tensor], sites: int, embedding_dim: int, hidden_dim: int,
                 hidden_layers: int, head_init_std: float, seed: int) -> None:
        super().__init__()
        self.names = list(targets)
        self.shapes = [tuple(value.shape) for value in targets.values()]
        with drawing_from(seed):  # default initialisers draw from the global stream
            self.embeddings = nn.Parameter(torch.randn(sites, embedding_dim, dtype=torch.float64))
            layers: list[nn.Module] = [nn.Linear(embedding_dim, hidden_dim, dtype=torch.float64)]
            for _ in range(hidden_layers):
                layers += [nn.ReLU(), nn.Linear(hidden_dim, hidden_dim, dtype=torch.float64)]
            self.trunk = nn.Sequential(*layers)
            heads = [nn.Linear(hidden_dim, value.numel(), dtype=torch.float64) for value in targets.values()]
            self.heads = nn.ModuleList(heads)
            with torch.no_grad():
                for head, value in zip(heads, targets.values()):
                    head.weight.normal_(0.0, head_init_std)  # std 0 gives zeros
                    head.bias.copy_(value.detach().reshape(-1))

    def forward(self, sites: Tensor) -> dict[str, Tensor]:
        """Generate the models of ``sites``.

        Parameters
        ----------
        sites : Tensor
            ``[B]`` int64 partition ids.

        Returns
        -------
        dict of str to Tensor
            Name → ``[B, *shape]`` float64 tensor, w_k = h_φ(v_k) for each listed site.
        """
        hidden = self.trunk(self.embeddings[sites])  # [B, H]: u_k
        return {
            name: head(hidden).reshape(len(sites), *shape)  # [B, |w^(j)|] → [B, *shape]
            for name, shape, head in zip(self.names, self.shapes, self.heads)
        }


def _optimizer(network: HyperNetwork, params: PFedHNParams) -> torch.optim.Optimizer:
    """The server optimiser: φ (trunk + heads) at ``hn_lr``, the embeddings at ``embed_lr``."""
    groups = [
        {"params": [p for name, p in network.named_parameters() if name != "embeddings"], "lr": params.hn_lr},
        {"params": [network.embeddings], "lr": params.embed_lr or params.hn_lr},
    ]
    if params.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=params.hn_lr, momentum=params.momentum, weight_decay=params.weight_decay)
    return torch.optim.Adam(groups, lr=params.hn_lr, weight_decay=params.weight_decay)


def buffer_names(model: nn.Module) -> list[str]:
    """State-dict names that are not trainable parameters (BatchNorm statistics, counters), in order."""
    parameters = {name for name, _ in model.named_parameters()}
    return [name for name in model.state_dict() if name not in parameters]


# --- server half ------------------------------------------------------------------------------
class PFedHN(FedAvg):
    """pFedHN's server: a hypernetwork generates every site's model (module docstring).

    The client MUST return Δw_k = w̃_k − w_k of every trainable parameter in the
    ``"delta"`` record and its buffers in ``"buffers"`` (:class:`PFedHNClient`).

    Parameters
    ----------
    cohort : Cohort
        Node id ↔ partition id map and sampling seed; sites are partitions 0..K−1.
    template : torch.nn.Module
        A freshly built task model: names, shapes, w_0 and the initial buffers.
    params : PFedHNParams
        Hypernetwork size, server optimiser and learning rates.
    seed : int
        Scenario seed (initialisation stream ``(seed, "pfedhn", "init")``).
    **sampling
        ``fraction_train``, ``fraction_evaluate``, ``min_train_nodes``, ``min_evaluate_nodes``
        as for :class:`strategies.fedavg.FedAvg`.
    """

    def __init__(self, cohort: Cohort, template: nn.Module, params: PFedHNParams, *, seed: int = 0,
                 **sampling: Any) -> None:
        super().__init__(cohort, **sampling)
        self.params = params
        self.sites = sorted(cohort.node_to_partition.values())
        if self.sites != list(range(len(self.sites))):
            raise ValueError(f"pFedHN needs partition ids 0..K-1, got {self.sites}")
        targets = {name: p.detach() for name, p in template.named_parameters()}
        state = template.state_dict()
        self.order = list(state)  # state-dict order of the full models sent out
        self.network = HyperNetwork(
            targets, len(self.sites), params.embedding_dim or 1 + len(self.sites) // 4, params.hidden_dim,
            params.hidden_layers, params.head_init_std, derive_seed(seed, "pfedhn", "init"),
        )
        self.optimizer = _optimizer(self.network, params)
        self.buffers: dict[int, dict[str, Tensor]] = {
            pid: {name: state[name].detach().clone() for name in buffer_names(template)} for pid in self.sites
        }

    def summary(self) -> None:
        """Log the configuration (what ran is in the run's log)."""
        p, net = self.params, self.network
        log.info(
            "pFedHN: %d sites, embedding d=%d, %d+1 trunk layers of width %d, %d heads (%d hypernetwork weights), "
            "%s lr %.3g / embeddings %.3g, fraction train %.2f / evaluate %.2f",
            len(self.sites), net.embeddings.shape[1], p.hidden_layers, p.hidden_dim, len(net.heads),
            sum(t.numel() for t in net.parameters()), p.optimizer, p.hn_lr, p.embed_lr or p.hn_lr,
            self.fraction_train, self.fraction_evaluate,
        )

    # --- generated models ---------------------------------------------------------------------
    def _generate(self, sites: list[int]) -> dict[str, Tensor]:
        """name → ``[len(sites), *shape]`` float64, w_k = h_φ(v_k) (with the autograd graph)."""
        return self.network(torch.tensor(sites, dtype=torch.int64))

    def _personal_states(self, sites: list[int]) -> dict[int, dict[str, Tensor]]:
        """Site → full float32 model state: generated parameters plus that site's buffers."""
        with torch.no_grad():
            generated = self._generate(sites)
        return {
            pid: {name: generated[name][row].float() if name in generated else self.buffers[pid][name]
                  for name in self.order}
            for row, pid in enumerate(sites)
        }

    def personal_arrays(self) -> dict[int, ArrayRecord]:
        """Partition id → h_φ(v_k) with the site's buffers, for every site (Personalized protocol)."""
        return {pid: ArrayRecord(state) for pid, state in self._personal_states(self.sites).items()}

    def _site_messages(self, nodes: list[int], config: ConfigRecord, kind: str, server_round: int) -> list[Message]:
        """One message per node holding its own site's model."""
        sites = [self.cohort.node_to_partition[node] for node in nodes]
        states = self._personal_states(sites)
        return [
            Message(RecordDict({ARRAYS_KEY: ArrayRecord(states[pid]), CONFIG_KEY: config}),
                    dst_node_id=node, message_type=kind, group_id=str(server_round))
            for node, pid in zip(nodes, sites)
        ]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Send each sampled site w_k = h_φ(v_k) (``arrays``, the mean model, is not used)."""
        nodes = self.cohort.sample(server_round, self.fraction_train, self.min_train_nodes, "train")
        return self._site_messages(nodes, config, MessageType.TRAIN, server_round)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Each evaluated site scores its own h_φ(v_k) on its validation split."""
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self.cohort.sample(server_round, self.fraction_evaluate, self.min_evaluate_nodes, "evaluate")
        return self._site_messages(nodes, config, MessageType.EVALUATE, server_round)

    # --- the update ---------------------------------------------------------------------------
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One optimiser step of φ and the round's v_k from the sites' Δw_k; returns the mean personalised model."""
        usable = [reply for reply in usable_replies(replies, self.cohort, "train") if self._complete(reply)]
        if not usable:
            return None, None
        sites = [self.cohort.partition_of(reply) for reply in usable]
        deltas = [reply.content.array_records[DELTA_KEY].to_torch_state_dict() for reply in usable]
        self.step(sites, deltas)
        for pid, reply in zip(sites, usable):
            if BUFFERS_KEY in reply.content.array_records:
                self.buffers[pid] = dict(reply.content.array_records[BUFFERS_KEY].to_torch_state_dict())
        return ArrayRecord(self.mean_model()), aggregate_metrics(usable)

    def step(self, sites: list[int], deltas: Sequence[Mapping[str, Tensor]]) -> None:
        """(φ, v) ← opt((φ, v), Σ_{k∈S} −(∂w_k/∂(φ, v))ᵀ Δw_k), one backward pass for the round.

        Parameters
        ----------
        sites : list of int
            The partition ids k ∈ S_t, in increasing order.
        deltas : sequence of mapping
            Per site, name → Δw_k^(j) = w̃_k^(j) − w_k^(j) (the target tensor's shape).
        """
        generated = self._generate(sites)  # φ is unchanged since configure_train: the w_k that were sent
        names = list(generated)
        # grad_outputs [|S|, *shape] float64: −Δw_k stacked in partition-id order (∂/∂w_k of ½‖w_k − w̃_k‖²)
        grad_outputs = [-torch.stack([delta[name].to(torch.float64) for delta in deltas]) for name in names]
        self.optimizer.zero_grad()
        torch.autograd.backward([generated[name] for name in names], grad_outputs)
        if self.params.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.params.max_grad_norm)
        self.optimizer.step()

    def _complete(self, reply: Message) -> bool:
        """Whether a reply carries Δw for exactly the generated tensors (else it is logged and left out)."""
        record = reply.content.array_records.get(DELTA_KEY)
        if record is not None and sorted(record) == sorted(self.network.names):
            return True
        log.warning("round %s train: client %d sent no '%s' record for the generated tensors; update ignored",
                    reply.metadata.group_id, self.cohort.partition_of(reply), DELTA_KEY)
        return False

    def mean_model(self) -> dict[str, Tensor]:
        """(1/K) Σ_k h_φ(v_k) over all K sites, buffers averaged alike (float64 accumulation)."""
        states = list(self._personal_states(self.sites).values())
        return weighted_average(states, [1.0] * len(states))

    # --- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """φ and v (float64 tensors), the optimiser's state and every site's buffers."""
        return {
            "hypernetwork": {name: value.clone() for name, value in self.network.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "buffers": {str(pid): dict(buffers) for pid, buffers in self.buffers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`state_dict`."""
        self.network.load_state_dict(state["hypernetwork"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.buffers = {int(pid): dict(buffers) for pid, buffers in state["buffers"].items()}


# --- client half ------------------------------------------------------------------------------
class PFedHNClient(ClientRule):
    """Client half: plain local training from w_k, reply Δw_k = w̃_k − w_k and the buffers."""

    params: PFedHNParams

    def receive(self, model: nn.Module, content: RecordDict, state: RecordDict) -> None:
        """Load w_k and this site's buffers; remember w_k to form Δw_k."""
        super().receive(model, content, state)
        self._received = {name: p.detach().clone() for name, p in model.named_parameters()}

    def reply(self, model: nn.Module, state: RecordDict, *, steps: int) -> dict[str, ArrayRecord]:
        """``"delta"``: w̃_k − w_k per trainable parameter; ``"buffers"``: the buffers after training."""
        records = {DELTA_KEY: ArrayRecord({name: p.detach() - self._received[name]
                                           for name, p in model.named_parameters()})}
        own = model.state_dict()
        buffers = {name: own[name] for name in buffer_names(model)}
        if buffers:
            records[BUFFERS_KEY] = ArrayRecord(buffers)
        return records

    def uploads(self, model: nn.Module) -> dict[str, Upload]:
        """Δw_k over every parameter, and the buffers if the model has any."""
        records = {DELTA_KEY: Upload("update", frozenset(name for name, _ in model.named_parameters()))}
        buffers = frozenset(buffer_names(model))
        if buffers:
            records[BUFFERS_KEY] = Upload("statistics", buffers)
        return records


def build_strategy(context: StrategyContext) -> PFedHN:
    """Server half from a scenario."""
    params = cast(PFedHNParams, context.params)  # the server validates strategy.params with ALGORITHM.Params
    return PFedHN(context.cohort, context.model, params, seed=context.scenario.seed, **sampling_options(context))


ALGORITHM = Algorithm(name="pfedhn", Params=PFedHNParams, build_strategy=build_strategy, client_rule=PFedHNClient,
                      combine="per-site", label="pFedHN")
