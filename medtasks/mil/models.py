"""Deep MIL models: a tile encoder, permutation-invariant pooling, and the two MIL approaches.

Deep MIL (Ilse et al. 2018, §2, arXiv:1802.04712) scores a bag ``X = {x_1, ..., x_K}`` as

.. math:: S(X) = g_\\psi\\big(\\sigma(f_\\theta(x_1), \\dots, f_\\theta(x_K))\\big),

with ``σ`` a symmetric (permutation-invariant) MIL pooling function, as
Theorem 1 (``S(X) = g(Σ_{x∈X} f(x))``) and Theorem 2 (``g(max_{x∈X} f(x))``) of Ilse
et al. 2018 require. Two approaches (Ilse et al. 2018, §2.3, after Wang et al. 2018,
"Revisiting multiple instance neural networks", Pattern Recognition 74):

* ``"instance"``: ``f`` is an instance classifier giving a logit ``s_k`` per tile,
  ``σ`` pools the instance logits, ``g`` is the identity.
* ``"embedding"``: ``f`` maps tiles to embeddings ``h_k ∈ R^M``, ``σ`` pools them
  into a bag embedding ``z``, ``g`` is a bag classifier.

Pooling functions (Ilse, Tomczak & Welling 2018, "Attention-based Deep Multiple
Instance Learning", arXiv:1802.04712): mean, max, attention
``a_k = exp(wᵀ tanh(V h_k)) / Σ_j exp(wᵀ tanh(V h_j))``, ``σ = Σ_k a_k h_k``, and
its gated variant ``a_k ∝ exp(wᵀ (tanh(V h_k) ⊙ sigm(U h_k)))``.

Bags of different sizes are padded to a common ``K`` (:func:`pad_bags`) with a
``key_padding_mask [B, K]`` bool, ``True`` = padding (PyTorch's convention, as in
``nn.MultiheadAttention``): padded tiles are not encoded, get zero weight and do
not change the pooled value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch import Tensor, nn

from medtasks.seeding import derive_seed, seed_torch

PoolingName = Literal["max", "mean", "attention", "gated_attention"]
Mode = Literal["embedding", "instance"]
NormName = Literal["batch", "group", "none"]

POOLING_NAMES: tuple[str, ...] = ("max", "mean", "attention", "gated_attention")
MODES: tuple[str, ...] = ("embedding", "instance")


# --------------------------------------------------------------------------- masks


def check_mask(key_padding_mask: Tensor | None, batch: int, tiles: int) -> Tensor | None:
    """Validate a key-padding mask.

    Parameters
    ----------
    key_padding_mask : Tensor | None
        ``[B, K]`` bool, ``True`` = padded tile, or ``None``.
    batch : int
        ``B``.
    tiles : int
        ``K``.

    Returns
    -------
    Tensor | None
        The mask (``None`` stays ``None``).

    Raises
    ------
    ValueError
        wrong shape or dtype, or a bag with every tile padded.
    """
    if key_padding_mask is None:
        return None
    if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, tiles):
        raise ValueError(
            f"key_padding_mask must be a bool tensor of shape ({batch}, {tiles}), got "
            f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
        )
    if bool(key_padding_mask.all(dim=1).any()):
        raise ValueError("every bag needs at least one unpadded tile")
    return key_padding_mask


def pad_bags(bags: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack bags of different sizes, zero-padding to the largest.

    Parameters
    ----------
    bags : Sequence[Tensor]
        ``B`` tensors ``[K_b, ...]`` (same trailing shape), ``K_b >= 1``.

    Returns
    -------
    tuple[Tensor, Tensor]
        ``(bags [B, K, ...], key_padding_mask [B, K] bool)``, ``K = max_b K_b``,
        ``True`` where a tile is padding.
    """
    if not bags or any(b.shape[0] < 1 for b in bags):
        raise ValueError("pad_bags needs at least one bag, each with at least one tile")
    sizes = torch.tensor([b.shape[0] for b in bags])
    padded = nn.utils.rnn.pad_sequence(list(bags), batch_first=True)
    mask = torch.arange(int(sizes.max()))[None, :] >= sizes[:, None]
    return padded, mask


def _valid(key_padding_mask: Tensor | None, like: Tensor) -> Tensor:
    """``[B, K]`` float, 1 for real tiles, 0 for padding (``like`` is ``[B, K, ...]``)."""
    if key_padding_mask is None:
        return like.new_ones(like.shape[:2])
    return (~key_padding_mask).to(like.dtype)


# --------------------------------------------------------------------------- encoder


def _norm_layer(norm: NormName, channels: int, num_groups: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    if norm == "group":
        return nn.GroupNorm(num_groups, channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; choose batch, group or none")


class TileEncoder(nn.Module):
    """Small CNN ``f_θ``: tiles ``[N, 3, T, T]`` to embeddings ``h = f_θ(x) ∈ R^M``, ``[N, M]``.

    Input: the optical density ``OD = -log(max(x, 1/255))`` (Beer–Lambert, linear in
    the stain concentrations; set ``optical_density=False`` to use RGB). Then
    blocks of ``conv3×3 → norm → ReLU`` with ``2×2`` max-pooling after all but the
    last, global average *and* max pooling (how much of each pattern, and its
    strongest single occurrence), and ``h = W [avg; max] + b``. With the default
    widths ``(16, 32, 48, 64)`` and ``M = 64``: about 55k parameters.

    Normalisation: ``"group"`` (default; per-tile statistics, so FedBN-neutral and
    DP-SGD-compatible), ``"batch"`` or ``"none"``. ``num_groups=1`` by default: a
    per-tile norm with many groups (``→`` InstanceNorm) erases the per-channel
    response levels that encode nuclear density and size, and learned markedly
    slower on :mod:`medtasks.mil.synthetic` bags; one group keeps the ratios
    between channels. ``"batch"`` learns fastest of all but couples the tiles of
    a batch (and is rejected by Opacus).

    Parameters
    ----------
    feature_dim : int
        ``M``.
    widths : Sequence[int]
        channel widths of the conv blocks.
    norm : NormName
        ``"group"``, ``"batch"`` or ``"none"``.
    num_groups : int
        groups of ``GroupNorm``; must divide every width.
    optical_density : bool
        feed ``-log x`` instead of ``x``.
    """

    def __init__(
        self,
        feature_dim: int = 64,
        widths: Sequence[int] = (16, 32, 48, 64),
        norm: NormName = "group",
        num_groups: int = 1,
        optical_density: bool = True,
    ) -> None:
        super().__init__()
        if norm == "group" and any(w % num_groups for w in widths):
            raise ValueError(f"num_groups={num_groups} must divide every width {tuple(widths)}")
        layers: list[nn.Module] = []
        in_channels = 3
        for i, width in enumerate(widths):
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none"),
                _norm_layer(norm, width, num_groups),
                nn.ReLU(),
            ]
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.project = nn.Linear(2 * in_channels, feature_dim)
        self.feature_dim = feature_dim
        self.optical_density = optical_density

    def forward(self, tiles: Tensor) -> Tensor:
        """Embed tiles.

        Parameters
        ----------
        tiles : Tensor
            ``[N, 3, T, T]`` RGB in ``[0, 1]``.

        Returns
        -------
        Tensor
            ``[N, M]`` embeddings ``h_k = f_θ(x_k)``.
        """
        if self.optical_density:
            tiles = -torch.log(tiles.clamp_min(1.0 / 255.0))
        maps = self.features(tiles)
        return self.project(torch.cat([maps.mean(dim=(2, 3)), maps.amax(dim=(2, 3))], dim=1))


# --------------------------------------------------------------------------- pooling


class MeanPooling(nn.Module):
    """``σ(h_1..h_K) = (1/K) Σ_k h_k`` (Theorem 1's sum, normalised), over unpadded tiles."""

    def forward(self, h: Tensor, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pool a batch of bags.

        Parameters
        ----------
        h : Tensor
            ``[B, K, F]`` instance embeddings (or ``F = 1`` instance logits).
        key_padding_mask : Tensor | None
            ``[B, K]`` bool, ``True`` = padding.

        Returns
        -------
        tuple[Tensor, Tensor]
            ``(z [B, F], weights [B, K])``: the mean and the uniform weights ``1/K``
            (0 on padding), so ``z = Σ_k weights_k h_k``.
        """
        mask = check_mask(key_padding_mask, h.shape[0], h.shape[1])
        valid = _valid(mask, h)
        weights = valid / valid.sum(dim=1, keepdim=True)
        return torch.einsum("bk,bkf->bf", weights, h), weights


class MaxPooling(nn.Module):
    """``σ(h_1..h_K) = max_k h_k`` per feature (Theorem 2), over unpadded tiles."""

    def forward(self, h: Tensor, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pool a batch of bags.

        Parameters
        ----------
        h : Tensor
            ``[B, K, F]`` instance embeddings (or ``F = 1`` instance logits).
        key_padding_mask : Tensor | None
            ``[B, K]`` bool, ``True`` = padding.

        Returns
        -------
        tuple[Tensor, Tensor]
            ``(z [B, F], weights [B, K])``: the per-feature maximum and each tile's
            share of the features it wins, ``(1/F) Σ_f 1[k = argmax_j h_jf]``
            (one-hot for ``F = 1``; 0 on padding).
        """
        mask = check_mask(key_padding_mask, h.shape[0], h.shape[1])
        if mask is not None:
            h = h.masked_fill(mask[:, :, None], float("-inf"))
        z, winner = h.max(dim=1)
        wins = nn.functional.one_hot(winner, h.shape[1]).to(z.dtype)  # [B, F, K]
        return z, wins.mean(dim=1)


class AttentionPooling(nn.Module):
    """Attention-based MIL pooling (Ilse et al. 2018, eq. 8–9, arXiv:1802.04712).

    .. math::
        a_k = \\frac{\\exp(w^\\top \\tanh(V h_k))}{\\sum_{j=1}^K \\exp(w^\\top \\tanh(V h_j))},
        \\qquad \\sigma(h_1, \\dots, h_K) = \\sum_{k=1}^K a_k h_k,

    ``V ∈ R^{L×M}``, ``w ∈ R^{L×1}`` (bias-free, as in the equation). Padded
    tiles are left out of the softmax (``a_k = 0``).

    Parameters
    ----------
    feature_dim : int
        ``M``.
    attention_dim : int
        ``L``.
    """

    def __init__(self, feature_dim: int, attention_dim: int = 32) -> None:
        super().__init__()
        self.V = nn.Linear(feature_dim, attention_dim, bias=False)
        self.w = nn.Linear(attention_dim, 1, bias=False)

    def hidden(self, h: Tensor) -> Tensor:
        """``tanh(V h_k)``, ``[B, K, L]``."""
        return torch.tanh(self.V(h))

    def attention(self, h: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Attention weights ``a_k = softmax_k(wᵀ hidden(h_k))`` over unpadded tiles.

        Parameters
        ----------
        h : Tensor
            ``[B, K, M]`` instance embeddings.
        key_padding_mask : Tensor | None
            ``[B, K]`` bool, ``True`` = padding.

        Returns
        -------
        Tensor
            ``[B, K]`` weights, summing to 1 per bag, 0 on padding.
        """
        mask = check_mask(key_padding_mask, h.shape[0], h.shape[1])
        scores = self.w(self.hidden(h)).squeeze(-1)  # wᵀ tanh(V h_k): [B, K]
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.softmax(scores, dim=1)

    def forward(self, h: Tensor, key_padding_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Pool a batch of bags.

        Parameters
        ----------
        h : Tensor
            ``[B, K, M]`` instance embeddings.
        key_padding_mask : Tensor | None
            ``[B, K]`` bool, ``True`` = padding.

        Returns
        -------
        tuple[Tensor, Tensor]
            ``(z [B, M], a [B, K])`` with ``z = Σ_k a_k h_k``.
        """
        a = self.attention(h, key_padding_mask)
        return torch.einsum("bk,bkm->bm", a, h), a


class GatedAttentionPooling(AttentionPooling):
    """Gated attention MIL pooling (Ilse et al. 2018, eq. 10, arXiv:1802.04712).

    .. math::
        a_k = \\frac{\\exp(w^\\top (\\tanh(V h_k) \\odot \\mathrm{sigm}(U h_k)))}
                    {\\sum_{j=1}^K \\exp(w^\\top (\\tanh(V h_j) \\odot \\mathrm{sigm}(U h_j)))},

    ``U ∈ R^{L×M}``; the gate lets the attention model non-linear interactions
    that ``tanh`` alone (nearly linear for small ``x``) cannot.
    """

    def __init__(self, feature_dim: int, attention_dim: int = 32) -> None:
        super().__init__(feature_dim, attention_dim)
        self.U = nn.Linear(feature_dim, attention_dim, bias=False)

    def hidden(self, h: Tensor) -> Tensor:
        """``tanh(V h_k) ⊙ sigm(U h_k)``, ``[B, K, L]``."""
        return torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))


# --------------------------------------------------------------------------- model


class MILOutput(NamedTuple):
    """Everything a forward pass computes.

    Attributes
    ----------
    logits : Tensor
        ``[B]`` bag logits ``S(X)``.
    weights : Tensor
        ``[B, K]`` pooling weights (attention ``a_k``; uniform for mean;
        the argmax share for max), 0 on padding.
    instance_logits : Tensor | None
        ``[B, K]`` tile logits ``s_k`` (instance mode), else ``None``.
    """

    logits: Tensor
    weights: Tensor
    instance_logits: Tensor | None


class MILModel(nn.Module):
    """Deep MIL bag classifier ``S(X) = g(σ(f(x_1), ..., f(x_K)))``.

    * ``mode="embedding"``: ``z = σ(h_1..h_K)``, ``S(X) = g(z) = cᵀ z + c_0``.
    * ``mode="instance"``: ``s_k = cᵀ h_k + c_0`` per tile, then
      ``S(X) = max_k s_k`` (max), ``(1/K) Σ_k s_k`` (mean), or
      ``Σ_k a_k s_k`` with ``a_k`` the (gated) attention of the embeddings
      ``h_k`` (attention pooling over instance logits).

    Parameters
    ----------
    encoder : TileEncoder
        ``f_θ``, ``[N, 3, T, T] -> [N, M]``, with attribute ``feature_dim``.
    pooling : nn.Module
        one of :class:`MeanPooling`, :class:`MaxPooling`,
        :class:`AttentionPooling`, :class:`GatedAttentionPooling`.
    mode : Mode
        ``"embedding"`` or ``"instance"``.
    """

    def __init__(self, encoder: TileEncoder, pooling: nn.Module, mode: Mode = "embedding") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown MIL mode {mode!r}; choose embedding or instance")
        self.encoder = encoder
        self.pooling = pooling
        self.mode = mode
        self.classifier = nn.Linear(encoder.feature_dim, 1)

    def embed(self, bags: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Encode the unpadded tiles of a batch of bags.

        Parameters
        ----------
        bags : Tensor
            ``[B, K, 3, T, T]``.
        key_padding_mask : Tensor | None
            ``[B, K]`` bool, ``True`` = padding (not encoded).

        Returns
        -------
        Tensor
            ``[B, K, M]`` embeddings ``h_k``, zero on padding.
        """
        batch, tiles = bags.shape[:2]
        mask = check_mask(key_padding_mask, batch, tiles)
        flat = bags.reshape(batch * tiles, *bags.shape[2:])
        if mask is None:
            return self.encoder(flat).reshape(batch, tiles, -1)
        index = torch.nonzero(~mask.reshape(-1)).squeeze(1)
        h = self.encoder(flat[index])
        full = h.new_zeros(batch * tiles, h.shape[1]).index_copy(0, index, h)
        return full.reshape(batch, tiles, -1)

    def forward_detailed(self, bags: Tensor, key_padding_mask: Tensor | None = None) -> MILOutput:
        """Bag logits with pooling weights and instance logits.

        Parameters
        ----------
        bags : Tensor
            ``[B, K, 3, T, T]``.
        key_padding_mask : Tensor | None
            ``[B, K]`` bool, ``True`` = padding.

        Returns
        -------
        MILOutput
            :class:`MILOutput`.
        """
        h = self.embed(bags, key_padding_mask)
        if self.mode == "embedding":
            z, weights = self.pooling(h, key_padding_mask)
            return MILOutput(self.classifier(z).squeeze(-1), weights, None)
        instance_logits = self.classifier(h).squeeze(-1)  # s_k: [B, K]
        if isinstance(self.pooling, AttentionPooling):
            weights = self.pooling.attention(h, key_padding_mask)
            logits = (weights * instance_logits).sum(dim=1)
        else:
            pooled, weights = self.pooling(instance_logits.unsqueeze(-1), key_padding_mask)
            logits = pooled.squeeze(-1)
        return MILOutput(logits, weights, instance_logits)

    def forward(self, bags: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """Bag logits ``S(X)``, ``[B]``, for bags ``[B, K, 3, T, T]``."""
        return self.forward_detailed(bags, key_padding_mask).logits

    def forward_with_attention(
        self, bags: Tensor, key_padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Bag logits and per-tile scores for localisation.

        Parameters
        ----------
        bags : Tensor
            ``[B, K, 3, T, T]``.
        key_padding_mask : Tensor | None
            ``[B, K]`` bool, ``True`` = padding.

        Returns
        -------
        tuple[Tensor, Tensor]
            ``(logits [B], scores [B, K])``: the attention weights ``a_k`` for
            (gated) attention pooling in either mode; the instance probabilities
            ``sigm(s_k)`` for instance-mode max/mean; the pooling weights
            (:class:`MILOutput`) for embedding-mode max/mean. 0 on padding.
        """
        out = self.forward_detailed(bags, key_padding_mask)
        if out.instance_logits is None or isinstance(self.pooling, AttentionPooling):
            return out.logits, out.weights
        probs = torch.sigmoid(out.instance_logits)
        if key_padding_mask is not None:
            probs = probs.masked_fill(key_padding_mask, 0.0)
        return out.logits, probs


def build_mil_model(
    pooling: PoolingName,
    mode: Mode,
    *,
    feature_dim: int = 64,
    attention_dim: int = 32,
    norm: NormName = "group",
    seed: int = 0,
) -> MILModel:
    """A freshly initialised MIL model, identical for identical arguments.

    Weights are drawn from ``torch.manual_seed(derive_seed(seed, "model-init"))``
    inside ``torch.random.fork_rng``, so the global torch RNG is left untouched.

    Parameters
    ----------
    pooling : PoolingName
        ``"max"``, ``"mean"``, ``"attention"`` or ``"gated_attention"``.
    mode : Mode
        ``"embedding"`` or ``"instance"`` (see :class:`MILModel`).
    feature_dim : int
        embedding size ``M``.
    attention_dim : int
        attention hidden size ``L``.
    norm : NormName
        encoder normalisation, ``"group"``, ``"batch"`` or ``"none"``.
    seed : int
        scenario seed.

    Returns
    -------
    MILModel
        The model: ``[B, K, 3, T, T]`` bags to ``[B]`` logits.

    Raises
    ------
    ValueError
        unknown pooling, mode or norm.
    """
    if pooling not in POOLING_NAMES:
        raise ValueError(f"unknown MIL pooling {pooling!r}; choose one of {', '.join(POOLING_NAMES)}")
    with torch.random.fork_rng(devices=[]):
        seed_torch(derive_seed(seed, "model-init"))
        builders: dict[str, Callable[[], nn.Module]] = {
            "max": MaxPooling,
            "mean": MeanPooling,
            "attention": lambda: AttentionPooling(feature_dim, attention_dim),
            "gated_attention": lambda: GatedAttentionPooling(feature_dim, attention_dim),
        }
        pool = builders[pooling]()
        return MILModel(TileEncoder(feature_dim, norm=norm), pool, mode)
