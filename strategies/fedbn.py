"""FedBN: federated learning on non-IID features via local batch normalization.

Li et al., "FedBN: Federated Learning on Non-IID Features via Local Batch
Normalization", ICLR 2021 (arXiv:2102.07623): keeping BatchNorm local accounts for
feature shift (scanners, stains, doses: P_k(x) differs while P(y|x) is shared).

Every BatchNorm tensor of site k — affine γ_k, β_k and the running statistics
μ_k, σ²_k, ``num_batches_tracked`` — stays in the site's node state and is never
sent; the server averages the other tensors only (Algorithm 1 of the paper):

    w^{t+1} = Σ_{k∈S_t} (n_k / m_t) w_k^{t},   m_t = Σ_{k∈S_t} n_k,   w ∌ BatchNorm tensors

(float64, partition-id order), or the scenario's ``defense`` rule over the same
tensors (:mod:`strategies.aggregation`; the BatchNorm tensors stay local either
way). The first round starts every site's BatchNorm from
the global initial model. FedBN is personalization with "all BatchNorm layers" as
the personal layers, so both halves reuse :mod:`strategies.fedper`.

A model without BatchNorm is a configuration error (FedBN would be FedAvg).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

from strategies.base import (
    Algorithm,
    StrategyContext,
    StrategyParams,
    batchnorm_tensor_names,
)
from strategies.fedper import (
    FedPer,
    FedPerClient,
    build_partial_strategy,
    template_model,
)

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario

LOCAL_BN_STATE_KEY = "fedbn-local-bn"


class FedBNParams(StrategyParams):
    """``strategy.params`` of ``fedbn`` (none)."""


class FedBN(FedPer):
    r"""FedAvg over the non-BatchNorm tensors; each site keeps all its BatchNorm tensors.

    .. math:: w^{t+1} = \sum_{k \in S_t} \frac{n_k}{m_t} w_k, \quad w \cap \mathrm{BN} = \emptyset

    The clients MUST keep γ, β, μ, σ² and ``num_batches_tracked`` of every
    BatchNorm layer local and send the rest (:class:`FedBNClient` does).

    ``central_evaluation`` is off: the global model has no BatchNorm tensors of its
    own (any choice — the initial ones, an average of the sites' — would be a
    model no site trained and FedBN does not define), so FedBN is judged by
    federated evaluation, each site scoring w + its own BatchNorm on its own
    validation split (the paper's per-client test accuracy).
    """

    label: ClassVar[str] = "FedBN"


class FedBNClient(FedPerClient):
    """Client half: every BatchNorm tensor lives in the node state and never travels up."""

    state_key: ClassVar[str] = LOCAL_BN_STATE_KEY

    def local_names(self, model: torch.nn.Module) -> set[str]:
        """Weight, bias, running mean/variance and counter of every BatchNorm layer."""
        return batchnorm_tensor_names(model)


def build_strategy(context: StrategyContext) -> FedBN:
    """Server half from a scenario."""
    return build_partial_strategy(context, FedBN, batchnorm_tensor_names(context.model))


def check_compatible(scenario: Scenario) -> None:
    """FedBN needs BatchNorm layers in the task's model (one-line ``ValueError`` otherwise)."""
    if not batchnorm_tensor_names(template_model(scenario)):
        task = scenario.task
        raise ValueError(
            f"strategy.name: fedbn keeps BatchNorm layers local, but the model of task '{task.name}' "
            f"(task.model: {task.model or 'default'}, task.params.norm: {task.params.get('norm', 'unset')}) "
            "has no BatchNorm layer; choose a task.model or task.params with BatchNorm (e.g. norm: batch)"
        )


ALGORITHM = Algorithm(
    name="fedbn", Params=FedBNParams, build_strategy=build_strategy, client_rule=FedBNClient,
    check_compatible=check_compatible, label="FedBN", central_evaluation=False,
)
