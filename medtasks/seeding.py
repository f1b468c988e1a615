"""Deterministic random streams.

Every random stream of a run derives from one scenario ``seed`` plus a tuple of
keys that say what the stream is for, e.g. ``(seed, "train", round, partition_id)``.
Two streams with different keys are independent; the same keys always give the
same numbers, whichever process or engine draws them.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch

Key = int | str


def derive_seed(seed: int, *keys: Key) -> int:
    """A 63-bit integer seed derived from ``seed`` and ``keys``.

    Strings are hashed with BLAKE2 (stable across processes, unlike ``hash``),
    integers are used as they are; the result comes from ``numpy.random.SeedSequence``.
    """
    entropy = [int(seed) & 0xFFFFFFFF]
    for key in keys:
        if isinstance(key, str):
            digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
            entropy.append(int.from_bytes(digest, "little") & 0xFFFFFFFF)
        else:
            entropy.append(int(key) & 0xFFFFFFFF)
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def numpy_rng(seed: int, *keys: Key) -> np.random.Generator:
    """A NumPy generator for the stream ``(seed, *keys)``."""
    return np.random.default_rng(derive_seed(seed, *keys))


def torch_generator(seed: int, *keys: Key) -> torch.Generator:
    """A ``torch.Generator`` for the stream ``(seed, *keys)``."""
    import torch

    generator = torch.Generator()
    generator.manual_seed(derive_seed(seed, *keys))
    return generator


def seed_everything(seed: int, *keys: Key) -> None:
    """Seed Python's ``random``, NumPy's legacy global RNG and torch's default RNG.

    Used where a library draws from global state (Flower's node sampling, Opacus
    noise, dropout): call it before each message is handled so that reused
    worker processes give the same numbers as fresh ones.
    """
    derived = derive_seed(seed, *keys)
    random.seed(derived)
    np.random.seed(derived % (2**32))
    seed_torch(derived)


def seed_torch(seed: int) -> None:
    """``torch.manual_seed(seed)`` for the devices this process can use: the CPU's generator, and CUDA's where
    CUDA is available.

    ``torch.manual_seed`` also queues a seeding of every accelerator backend torch knows (CUDA, XPU, MTIA) until
    it is first used, each with a formatted stack trace: about 1.4 ms per call, and a queue that grows with every
    call on a machine without them. A client seeds several times per message, so that was a fifth of a small
    model's round. On the CPU the numbers are the same as ``torch.manual_seed``'s.
    """
    import torch

    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


@contextlib.contextmanager
def drawing_from(seed: int) -> Iterator[None]:
    """Inside the block torch's CPU generator is seeded with ``seed``; after it, torch's global RNG is as before.

    For code that draws from the global generator without taking one, such as the default initialisers of
    ``torch.nn`` layers: ``with drawing_from(derive_seed(seed, "model-init")): model = build()``.
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        yield
