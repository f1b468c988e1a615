"""The gradient a victim's reply reveals to an honest-but-curious server.

In an attack round the server takes a victim's train reply and recovers the gradient it reveals
(:func:`observed_gradient`):

* FedSGD's ``"gradient"`` upload g_k = ∇F_k(w_t) is used as is;
* a ``"weights"`` upload w_k (FedAvg, FedProx, SCAFFOLD, FedBN's and FedPer's shared tensors) after K local steps
  of learning rate η gives g ≈ (w_t − w_k) / (K η) (Geiping et al. 2020, Sec. 6: exact for one plain SGD step);
  an ``"update"`` upload Δ_k = w_k − w_t gives g ≈ −Δ_k / (K η). K is the reply's ``steps`` metric and η the
  site's ``local.lr``. Parameters the upload does not contain (FedBN's BatchNorm tensors, FedPer's head) are not
  matched.

References
----------
Geiping, Bauermeister, Dröge, Moeller 2020, "Inverting Gradients - How easy is it to break privacy in federated
learning?", NeurIPS (arXiv:2003.14053).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from privacy.attacks.base import Observation

GRADIENT_KINDS = ("gradient", "weights", "update")
"""Upload kinds the server can read a gradient from."""


@dataclass
class ObservedGradient:
    """What a victim's reply reveals about ∇F_k(w_t).

    Attributes
    ----------
    gradient : dict of str to torch.Tensor
        g per matched parameter name (shapes of the parameters): the gradient itself, or Δw/(Kη).
    kind : str
        The upload kind it was read from (``"gradient"``, ``"weights"``, ``"update"``).
    steps : int
        K, the local steps the site took (1 for a gradient).
    lr : float
        η, the site's local learning rate.
    """

    gradient: dict[str, torch.Tensor]
    kind: str
    steps: int
    lr: float

    @property
    def names(self) -> list[str]:
        """The matched parameter names, in the model's order."""
        return list(self.gradient)

    def descent(self) -> dict[str, torch.Tensor]:
        """w_t − w_k = K η g: the change the site's local steps made (what the multi-step variant matches)."""
        return {name: value * (self.steps * self.lr) for name, value in self.gradient.items()}


def observed_gradient(observation: Observation, model: nn.Module) -> ObservedGradient:
    """Read g from the victim's reply (module docstring); only trainable parameters the upload holds.

    Parameters
    ----------
    observation : Observation
        The victim's reply and the message it answered.
    model : nn.Module
        The model at w_t (its parameter order sets the order of the result).

    Raises
    ------
    ValueError
        If no upload of a gradient kind holds any of the model's parameters.
    """
    parameters = dict(model.named_parameters())
    for record, upload in observation.uploads.items():
        if upload.kind not in GRADIENT_KINDS or record not in observation.reply.array_records:
            continue
        sent = observation.reply.array_records[record].to_torch_state_dict()
        names = [name for name in parameters if name in sent]
        if not names:
            continue
        if upload.kind == "gradient":
            gradient = {name: sent[name].float() for name in names}
            return ObservedGradient(gradient, "gradient", 1, 1.0)
        steps = int(observation.reply.metric_records["metrics"]["steps"])  # type: ignore[arg-type]
        scale = 1.0 / (max(steps, 1) * observation.local.lr)
        sign = 1.0 if upload.kind == "weights" else -1.0  # weights: w_t − w_k; update: Δ = w_k − w_t
        gradient = {name: sign * scale * (parameters[name].detach().float() - sent[name].float())
                    if upload.kind == "weights" else sign * scale * sent[name].float() for name in names}
        return ObservedGradient(gradient, upload.kind, max(steps, 1), observation.local.lr)
    raise ValueError(f"round {observation.round}, site {observation.partition_id}: the reply holds no gradient, "
                     f"update or weights of the model's parameters")
