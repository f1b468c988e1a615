"""Where tensors live: a model's device, a task's batch moved there, a random stream there.

A client trains on the device its scenario resolves (:mod:`client.device`); the model is moved there once and
everything that meets it follows the model: the trainer moves each batch with :func:`to_device`, a client rule
puts what it received next to the parameters, and DP-SGD draws its noise from :func:`generator_on` the model's
device. On the CPU every function here returns its input itself, so CPU runs compute exactly what they computed
before devices existed.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping
from typing import Any

import torch


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model without tensors."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it on ``device``; anything that is not a tensor is left as it is.

    Parameters
    ----------
    batch : Any
        A tensor, or a list, tuple, named tuple, mapping or dataclass instance of them, nested to any depth (what
        a ``DataLoader`` collates from a task's samples: a list of tensors for the built-in tasks).
    device : torch.device
        Where the tensors go.

    Returns
    -------
    Any
        A batch of the same structure and types (a mapping becomes a ``dict``); a tensor already on ``device``
        is the same object.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        moved = {field.name: to_device(getattr(batch, field.name), device)
                 for field in dataclasses.fields(batch) if field.init}
        return dataclasses.replace(batch, **moved)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple: rebuilt field by field
        return type(batch)(*(to_device(value, device) for value in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def generator_on(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` itself when it draws on ``device``'s type, else a generator there with the same seed.

    Noise drawn on a device must come from a generator of that device (Opacus draws DP-SGD's noise on the
    parameters' device). The new generator starts from ``generator``'s initial seed, so pass a fresh one; its
    stream differs from the CPU stream of that seed (each device type has its own random number generator).
    """
    if generator.device.type == device.type:
        return generator
    moved = torch.Generator(device=device)
    moved.manual_seed(generator.initial_seed())
    return moved
