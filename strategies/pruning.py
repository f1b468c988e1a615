"""Gradient pruning before upload: a site sends only the largest-magnitude entries of its update.

Zhu, Liu and Han, "Deep Leakage from Gradients", NeurIPS 2019 (arXiv:1906.08935), Sec. 5: pruning the
gradient entries of small magnitude to zero (as gradient compression does, Lin et al. 2018, "Deep Gradient
Compression", ICLR, arXiv:1712.01887) defends against gradient inversion once more than about 20 % of the
entries are pruned. Here, for a fraction p (``defense.prune``) and every floating tensor u of the upload,

    u'_i = u_i · 1[|u_i| ranks among the ⌈(1 − p)·|u|⌉ largest of |u|],

applied to what the update means for each declared upload kind: a gradient g_k or an update Δ_k is pruned as
sent; a site that sends weights w_k prunes its update Δ_k = w_k − w_t (running statistics in the same record
included) and sends w_t + Δ'_k. Records of statistics alone (FedSGD's) and SCAFFOLD's control-variate updates
are sent unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import ArrayRecord, RecordDict

from strategies.base import Upload

PRUNED_KINDS = frozenset({"gradient", "update", "weights"})
"""Upload kinds whose tensors are pruned (the model's change, in some form)."""


def prune_tensor(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """``values`` with all but its ⌈(1 − fraction)·n⌉ largest-magnitude entries set to 0 (same shape, dtype).

    Parameters
    ----------
    values : torch.Tensor
        Any shape, floating point.
    fraction : float
        p in [0, 1): the share of entries zeroed.
    """
    flat = values.flatten()
    keep = math.ceil((1.0 - fraction) * flat.numel())
    if keep >= flat.numel():
        return values.clone()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat.abs(), keep, sorted=False).indices] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(values.shape)


def prune_records(records: Mapping[str, Any], uploads: Mapping[str, Upload], received: RecordDict,
                  fraction: float) -> dict[str, Any]:
    """A train reply's records with every declared gradient, update or weights record pruned.

    Parameters
    ----------
    records : Mapping[str, Any]
        The reply's records (``ArrayRecord`` for tensors), as the client rule built them.
    uploads : Mapping[str, Upload]
        The rule's declaration of those records (:meth:`strategies.base.ClientRule.uploads`).
    received : RecordDict
        The train message's content: for a weights upload, w_t in its ``reference`` record.
    fraction : float
        p, ``defense.prune``.

    Returns
    -------
    dict
        The records to send; the ones not pruned are the same objects.
    """
    pruned = dict(records)
    for name, upload in uploads.items():
        if upload.kind not in PRUNED_KINDS or name not in records:
            continue
        tensors = records[name].to_torch_state_dict()
        origin = received.array_records[upload.reference].to_torch_state_dict() if upload.kind == "weights" else {}
        out: dict[str, torch.Tensor] = {}
        for key, value in tensors.items():
            if not value.is_floating_point():
                out[key] = value
            elif upload.kind == "weights":
                out[key] = origin[key] + prune_tensor(value - origin[key], fraction)
            else:
                out[key] = prune_tensor(value, fraction)
        pruned[name] = ArrayRecord(out)
    return pruned
