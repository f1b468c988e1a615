"""The device a client trains and evaluates on: ``engine.device`` resolved on the client's own machine.

``auto`` is CUDA where the machine has it, else the CPU; ``cpu`` is the CPU; ``cuda`` is the first CUDA device
the process sees, and an error on a machine without one. In simulation, Ray gives a client's actor its GPU
share (``engine.gpus_per_client``) and sets ``CUDA_VISIBLE_DEVICES`` for it, so that first device is the one
Ray assigned; a client without a share runs ``auto`` on the CPU (:func:`client_device`).
"""

from __future__ import annotations

import torch

from medtasks.scenario import EngineSection

DEVICE_SETTINGS = ("auto", "cpu", "cuda")
"""The values of ``engine.device``."""


def resolve_device(setting: str) -> torch.device:
    """The device ``setting`` (an ``engine.device`` value) names on this machine.

    Parameters
    ----------
    setting : str
        ``auto``, ``cpu`` or ``cuda``.

    Returns
    -------
    torch.device
        ``cuda`` (the process's first CUDA device) or ``cpu``; nothing is allocated.

    Raises
    ------
    ValueError
        ``cuda`` on a machine without CUDA, or an unknown setting (one line naming ``engine.device``).
    """
    if setting not in DEVICE_SETTINGS:
        raise ValueError(f"engine.device: unknown device {setting!r} (allowed: {', '.join(DEVICE_SETTINGS)})")
    if setting == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if setting == "cuda":
        raise ValueError("engine.device: 'cuda' but this machine has no CUDA device (torch.cuda.is_available() is "
                         "False); use auto or cpu")
    return torch.device("cpu")


def client_device(engine: EngineSection) -> torch.device:
    """The device a client of ``engine`` trains and evaluates on (:func:`resolve_device` of ``engine.device``).

    A simulation client without a GPU share (``gpus_per_client: 0``) resolves ``auto`` to the CPU: Ray
    reserved no GPU for it, and several such clients on one GPU would share it unaccounted.
    """
    if engine.device == "auto" and engine.backend == "simulation" and engine.gpus_per_client == 0:
        return torch.device("cpu")
    return resolve_device(engine.device)
