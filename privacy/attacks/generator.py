"""The GAN attacker's generator: a small DCGAN-style network from a latent code to an image of the task.

Radford, Metz & Chintala 2016, "Unsupervised Representation Learning with Deep Convolutional Generative
Adversarial Networks" (ICLR, arXiv:1511.06434): a linear projection of ``z`` to a ``2w × S/4 × S/4`` feature
map, then two stride-2 transposed convolutions (kernel 4, padding 1) that double the side twice, ReLU between
them and a sigmoid at the end, so images lie in ``[0, 1]`` like the task's. Unlike DCGAN it has no BatchNorm:
the attacker trains G against a frozen discriminator without real data, and BatchNorm's running statistics made
the images drawn in eval mode differ from those G was trained on (the discriminator then rejected them). Used by
:mod:`privacy.attacks.gan` (Hitaj et al. 2017).
"""

from __future__ import annotations

import torch
from torch import nn

from medtasks.seeding import derive_seed, drawing_from, torch_generator

UPSAMPLINGS = 2
"""Stride-2 transposed convolutions: the projection's side is ``S / 2**UPSAMPLINGS``."""


class Generator(nn.Module):
    """``G: z [B, latent] → x [B, C, S, S]`` in ``[0, 1]``.

    Parameters
    ----------
    latent : int
        Size of the latent code ``z ~ N(0, I)``.
    image_shape : tuple of int
        ``(C, S, S)``, ``S`` divisible by 4.
    width : int
        ``w``: channels after the first upsampling (``2w`` before it).
    """

    def __init__(self, latent: int, image_shape: tuple[int, int, int], width: int) -> None:
        super().__init__()
        channels, side, other = image_shape
        if side != other or side % 2**UPSAMPLINGS:
            raise ValueError(f"the generator makes square images with a side divisible by {2**UPSAMPLINGS}, "
                             f"got {image_shape}")
        self.latent, self.width, self.start = latent, width, side // 2**UPSAMPLINGS
        self.project = nn.Linear(latent, 2 * width * self.start**2)
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(width, channels, 4, stride=2, padding=1), nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Images ``[B, C, S, S]`` in ``[0, 1]`` of latent codes ``z [B, latent]``."""
        return self.body(self.project(z).view(-1, 2 * self.width, self.start, self.start))


def build_generator(latent: int, image_shape: tuple[int, int, int], width: int, seed: int,
                    *keys: str | int) -> Generator:
    """A :class:`Generator` whose initial weights come from the stream ``(seed, *keys)`` (PyTorch's default
    initialisation drawn from it); torch's global RNG is left as it was."""
    with drawing_from(derive_seed(seed, *keys)):
        return Generator(latent, image_shape, width)


def generate(generator: Generator, count: int, seed: int, *keys: str | int) -> torch.Tensor:
    """``count`` images ``[count, C, S, S]`` of ``generator`` from latent codes ``z ~ N(0, I)`` of the stream
    ``(seed, *keys)``; no gradients."""
    z = torch.randn(count, generator.latent, generator=torch_generator(seed, *keys))
    with torch.no_grad():
        return generator(z)
