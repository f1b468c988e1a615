"""Handwritten digits (scikit-learn's ``load_digits``): a small real image task for attacks and sweeps.

The pool is the 1,797 grey 8×8 images of the digits 0–9 that ship inside scikit-learn
(the test set of the UCI "Optical Recognition of Handwritten Digits" data, Alpaydin &
Kaynak 1998; nothing is downloaded). Pixels (0..16) are scaled to ``x = v / 16`` in
``[0, 1]`` and, for ``task.params.image_size`` 16 or 32, resized once with bilinear
interpolation (``align_corners=False``). Samples are ``(x [1, S, S] float32, y [] int64)``.

Splitting the pool (``data.source`` must be ``synthetic``: the data needs no folder):

* the server's test set (``data.server_samples > 0``) is taken first: a class-stratified
  hold-out drawn from the stream ``(seed, "digits", "server")`` (:func:`stratified_holdout`);
* the remaining images are split across the sites with
  :func:`medtasks.partition.split_indices` (``label_skew`` cuts each class by Dirichlet
  shares, ``quantity_skew`` gives unequal shares, the other kinds near-equal ones);
* site ``k`` shuffles its share with the stream ``(seed, "digits", "site", k)`` and keeps at
  most ``data.samples_per_client`` of it, so sweeps stay small; the last
  ``max(1, round(val_fraction · n_k))`` are its validation set.

Site shifts, drawn with :func:`medtasks.partition.draw_site_profiles` as the folder sources
of the other tasks draw them, and applied with the stream ``(seed, "digits", "site", k, "shift")``:

* ``feature_skew`` (acquisition, a site's scanner): ``x ← clip(gain·x + offset + noise·ε, 0, 1)``,
  ``ε ~ N(0, I)``; see :data:`ACQUISITION_SPACE`.
* ``concept_shift`` (annotator): label ``c`` is recorded as ``(c + 1) mod 10`` with probability
  ``confusion`` (:data:`medtasks.tabular.ANNOTATOR_SPACE`, the same coding habit as the tabular task).

Models map ``[B, 1, S, S]`` to logits ``[B, 10]``; none has BatchNorm, so all train under DP-SGD:
``lenet`` (the sigmoid LeNet of the gradient-inversion papers), ``mlp`` and ``cnn``
(:meth:`DigitsTask.build_model`).
"""

from __future__ import annotations

import functools
from collections.abc import Sized
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import numpy as np
import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset, Subset, TensorDataset

from medtasks.base import ClientData, DataError, TaskContext, TaskParams, checked_params
from medtasks.classification import classification_metrics, predict_logits
from medtasks.partition import ParamRange, draw_site_profiles, label_histogram, neutral_values, split_indices
from medtasks.plotting import save_example_figure
from medtasks.seeding import derive_seed, drawing_from, numpy_rng
from medtasks.tabular import ANNOTATOR_SPACE

NUM_CLASSES = 10
NATIVE_SIZE = 8
MAX_PIXEL = 16.0
EVAL_BATCH_SIZE = 1024
PLOT_GRID = 4  # plot_examples draws a PLOT_GRID × PLOT_GRID grid of images

#: Feature-skew parameters on pixel values in ``[0, 1]``: gain, additive offset, extra noise std.
ACQUISITION_SPACE: dict[str, ParamRange] = {
    "gain": ParamRange(low=0.5, high=1.5, neutral=1.0),
    "offset": ParamRange(low=-0.25, high=0.25, neutral=0.0),
    "noise": ParamRange(low=0.0, high=0.25, neutral=0.0),
}


class DigitsParams(TaskParams):
    """``task.params`` of the digits task."""

    image_size: Literal[8, 16, 32] = Field(
        8, description="Image side S: the native 8, or 16 / 32 by bilinear resize (32 = the DLG/iDLG LeNet input)."
    )
    hidden: int = Field(256, ge=1, description="Width of the mlp's hidden layer.")
    channels: int = Field(12, ge=1, description="Width c of the lenet's three convolutions.")


@functools.lru_cache(maxsize=3)
def load_pool(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits of scikit-learn, scaled to ``[0, 1]`` and resized to ``image_size``.

    Parameters
    ----------
    image_size : int
        ``S``; 8 keeps the native images, larger sides are bilinear resizes (``align_corners=False``).

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(x [N, 1, S, S] float32 in [0, 1], y [N] int64)``, read-only (cached per process).
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / MAX_PIXEL).unsqueeze(1)
    if image_size != NATIVE_SIZE:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images, labels = x.numpy(), np.asarray(digits.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def stratified_holdout(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` indices whose class mix follows the pool's (each class within one image of its share).

    The pool is shuffled; an image that is the ``r``-th of its class ``c`` (``n_c`` images) gets the
    key ``(r + ½) / n_c``, and the ``n`` smallest keys are taken, so every class contributes
    ``n · n_c / N`` images up to rounding.

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` integer labels.
    n : int
        images to hold out, ``0 <= n <= N``.
    rng : np.random.Generator
        the hold-out's stream.

    Returns
    -------
    np.ndarray
        ``[n]`` sorted int64 indices into ``labels``.
    """
    order = rng.permutation(labels.size)
    shuffled = labels[order]
    counts = np.bincount(shuffled)
    rank = np.empty(labels.size, dtype=np.int64)
    for c in np.flatnonzero(counts):
        rank[shuffled == c] = np.arange(counts[c])
    keys = (rank + 0.5) / counts[shuffled]
    return np.sort(order[np.argsort(keys, kind="stable")[:n]]).astype(np.int64)


def lenet(image_size: int, channels: int) -> nn.Sequential:
    """The LeNet of the gradient-inversion papers, ``[B, 1, S, S]`` → ``[B, 10]``.

    Zhu, Liu & Han 2019, "Deep Leakage from Gradients" (NeurIPS) and Zhao, Mopuri & Bilen 2020,
    "iDLG: Improved Deep Leakage from Gradients" (arXiv:2001.02610): three 5×5 convolutions (padding 2,
    strides 2, 2, 1) with sigmoid activations, no pooling and no BatchNorm (twice differentiable, as
    gradient matching needs), then one linear layer on ``c·(S/4)²`` features. Every weight and bias is
    drawn from ``U(-0.5, 0.5)``, as in the DLG/iDLG reference code: the attacks' success depends on it.
    Draws from torch's global RNG: callers fork and seed it.
    """
    model = nn.Sequential(
        nn.Conv2d(1, channels, 5, padding=2, stride=2), nn.Sigmoid(),
        nn.Conv2d(channels, channels, 5, padding=2, stride=2), nn.Sigmoid(),
        nn.Conv2d(channels, channels, 5, padding=2, stride=1), nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(channels * (image_size // 4) ** 2, NUM_CLASSES),
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.uniform_(-0.5, 0.5)
    return model


def mlp(image_size: int, hidden: int) -> nn.Sequential:
    """One hidden ReLU layer, ``[B, 1, S, S]`` → ``[B, 10]``: S² → hidden → 10 (PyTorch's default init)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(image_size * image_size, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES)
    )


def cnn(image_size: int) -> nn.Sequential:
    """A small ReLU CNN for accuracy, ``[B, 1, S, S]`` → ``[B, 10]``.

    3×3 convolutions 1 → 16 → 32 (padding 1), each followed by ReLU and a 2×2 max-pool, except that
    8×8 inputs skip the second pool; then one linear layer. No BatchNorm.
    """
    pools = 2 if image_size >= 16 else 1
    side = image_size // 2**pools
    layers: list[nn.Module] = [nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                               nn.Conv2d(16, 32, 3, padding=1), nn.ReLU()]
    if pools == 2:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * side * side, NUM_CLASSES))


class DigitsTask:
    """Ten-class classification of handwritten digits; primary metric: accuracy.

    :meth:`evaluate` returns ``loss`` (mean cross-entropy), ``accuracy`` and ``balanced_accuracy``
    (mean per-class recall over the classes present). Attacks read :attr:`num_classes`,
    :attr:`image_shape` and :meth:`pool`.
    """

    name: ClassVar[str] = "digits"
    Params: ClassVar[type[TaskParams]] = DigitsParams
    models: ClassVar[tuple[str, ...]] = ("lenet", "mlp", "cnn")
    primary_metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    DEFAULT_MODEL: ClassVar[str] = "lenet"
    num_classes: ClassVar[int] = NUM_CLASSES

    def __init__(self, ctx: TaskContext) -> None:
        params = cast(DigitsParams, checked_params(type(self), ctx))  # an instance of self.Params
        if ctx.data.source != "synthetic":
            raise DataError(f"the digits task loads the images bundled with scikit-learn and needs no folder; "
                            f"set data.source to synthetic (got {ctx.data.source!r})")
        self.ctx = ctx
        self.params: DigitsParams = params
        self.model_name: str = ctx.model or self.DEFAULT_MODEL
        #: ``(1, S, S)``: the shape of one image.
        self.image_shape: tuple[int, int, int] = (1, params.image_size, params.image_size)
        labels = load_pool(params.image_size)[1]
        n_server, clients = ctx.data.server_samples, ctx.partition.clients
        if labels.size - n_server < 2 * clients:
            raise DataError(f"data.server_samples={n_server} leaves {labels.size - n_server} of the "
                            f"{labels.size} digits for {clients} sites, which need at least 2 each")
        #: Pool indices of the server's test set, sorted (empty when ``data.server_samples`` is 0).
        self.server_indices: np.ndarray = stratified_holdout(labels, n_server, numpy_rng(ctx.seed, "digits", "server"))
        rest = np.setdiff1d(np.arange(labels.size), self.server_indices)
        try:
            parts = split_indices(labels[rest], ctx.partition.kind, ctx.partition.params,
                                  num_clients=clients, seed=ctx.seed)
        except ValueError as error:
            raise DataError(f"cannot split the {rest.size} digits left after the server's: {error}") from None
        #: Each site's share of the pool (sorted pool indices, before the ``samples_per_client`` cap).
        self.site_shares: list[np.ndarray] = [rest[part] for part in parts]
        self._sites: dict[int, ClientData] = {}
        self._server: Dataset | None = None

    # ------------------------------------------------------------------ data

    def pool(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole pool, unshifted: ``(x [N, 1, S, S] float32, y [N] int64)`` (fresh tensors)."""
        x, y = load_pool(self.params.image_size)
        return torch.tensor(x), torch.tensor(y)

    def site_indices(self, partition_id: int) -> np.ndarray:
        """Pool indices of site ``partition_id``'s samples in their order: training first, validation last.

        Its share shuffled with the stream ``(seed, "digits", "site", k)``, capped at
        ``data.samples_per_client``.
        """
        if not 0 <= partition_id < len(self.site_shares):
            raise ValueError(f"partition_id {partition_id} outside [0, {len(self.site_shares)})")
        order = numpy_rng(self.ctx.seed, "digits", "site", partition_id).permutation(self.site_shares[partition_id])
        return order[: self.ctx.data.samples_per_client]

    def site_shift(self, partition_id: int) -> tuple[dict[str, float], dict[str, float]]:
        """``(acquisition, annotator)`` of site ``partition_id``: drawn for the shifting kinds, else neutral."""
        part = self.ctx.partition
        if part.kind not in ("feature_skew", "concept_shift"):
            return neutral_values(ACQUISITION_SPACE), neutral_values(ANNOTATOR_SPACE)
        profile = draw_site_profiles(
            part.kind, part.params, num_clients=part.clients,
            samples_per_client=self.ctx.data.samples_per_client, label_prior=np.ones(NUM_CLASSES),
            acquisition_space=ACQUISITION_SPACE, annotator_space=ANNOTATOR_SPACE, seed=self.ctx.seed,
        )[partition_id]
        return profile.acquisition, profile.annotator

    def client_data(self, partition_id: int) -> ClientData:
        """Train/validation images and ``partitions.json`` statistics of site ``partition_id``.

        ``stats``: ``n_train``, ``n_val``, ``label_histogram`` (``[10]`` recorded labels, train + val),
        ``label_distribution`` (its normalised form), ``acquisition`` and ``annotator``.
        """
        if partition_id not in self._sites:
            indices = self.site_indices(partition_id)
            acquisition, annotator = self.site_shift(partition_id)
            pool_x, pool_y = load_pool(self.params.image_size)
            rng = numpy_rng(self.ctx.seed, "digits", "site", partition_id, "shift")
            x, y = shift_samples(pool_x[indices], pool_y[indices], acquisition, annotator, rng)
            n_val = max(1, round(self.ctx.data.val_fraction * len(y)))
            n_train = len(y) - n_val
            if n_train < 1:
                raise DataError(f"site {partition_id} has {len(y)} digits; it needs at least 2 "
                                "(one to train, one to validate)")
            histogram = label_histogram(y, NUM_CLASSES)
            stats = {"n_train": n_train, "n_val": n_val, "label_histogram": histogram,
                     "label_distribution": [count / len(y) for count in histogram],
                     "acquisition": dict(acquisition), "annotator": dict(annotator)}
            self._sites[partition_id] = ClientData(
                train=_dataset(x[:n_train], y[:n_train]), val=_dataset(x[n_train:], y[n_train:]), stats=stats
            )
        return self._sites[partition_id]

    def server_data(self) -> Dataset | None:
        """The server's test set (:attr:`server_indices`, unshifted), or ``None`` when ``data.server_samples`` is 0."""
        if self.server_indices.size == 0:
            return None
        if self._server is None:
            x, y = load_pool(self.params.image_size)
            self._server = _dataset(x[self.server_indices], y[self.server_indices])
        return self._server

    # ------------------------------------------------------------------ model, loss

    def build_model(self) -> nn.Module:
        """``lenet`` (:func:`lenet`), ``mlp`` (:func:`mlp`) or ``cnn`` (:func:`cnn`), ``[B, 1, S, S]`` → ``[B, 10]``.

        Weights come from the stream ``(seed, "digits", "model-init")``; torch's global RNG is left as it was.
        """
        p = self.params
        with drawing_from(derive_seed(self.ctx.seed, "digits", "model-init")):
            if self.model_name == "lenet":
                return lenet(p.image_size, p.channels)
            if self.model_name == "mlp":
                return mlp(p.image_size, p.hidden)
            return cnn(p.image_size)

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Mean cross-entropy of ``model`` on ``batch = (x [B, 1, S, S], y [B])``."""
        x, y = batch[0], batch[1]
        return F.cross_entropy(model(x), y)

    # ------------------------------------------------------------------ evaluation

    def predict(self, model: nn.Module, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[N, 10]`` of ``model`` on ``dataset`` and its labels ``[N]`` (eval mode, no gradients)."""
        return predict_logits(model, dataset, EVAL_BATCH_SIZE)

    def evaluate(self, model: nn.Module, dataset: Dataset) -> dict[str, float]:
        """``loss`` (mean cross-entropy), ``accuracy`` and ``balanced_accuracy`` on ``dataset``."""
        return classification_metrics(*self.predict(model, dataset), NUM_CLASSES)

    def plot_examples(self, model: nn.Module, dataset: Dataset, path: Path, *, title: str = "") -> None:
        """Save a PNG of the first 16 images of ``dataset`` titled true / predicted label (wrong ones in red),
        under ``title``."""
        from matplotlib.figure import Figure

        count = min(PLOT_GRID * PLOT_GRID, len(cast(Sized, dataset)))  # the task's datasets have a len
        subset = Subset(dataset, range(count))
        logits, y = self.predict(model, subset)
        x = torch.stack([subset[i][0] for i in range(count)])
        figure = Figure(figsize=(6, 6.6))
        axes = figure.subplots(PLOT_GRID, PLOT_GRID, squeeze=False)
        for i, ax in enumerate(axes.flat):
            ax.set_axis_off()
            if i < count:
                truth, predicted = int(y[i]), int(logits[i].argmax())
                ax.imshow(x[i, 0].numpy(), cmap="gray_r", vmin=0.0, vmax=1.0)
                ax.set_title(f"{truth} → {predicted}", fontsize=10, color="black" if truth == predicted else "red")
        heading = f"{self.model_name}: true → predicted"
        save_example_figure(figure, Path(path), title=f"{title}\n{heading}" if title else heading)


def shift_samples(
    x: np.ndarray,
    y: np.ndarray,
    acquisition: dict[str, float],
    annotator: dict[str, float],
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A site's acquisition and annotator applied to its images and labels.

    ``x ← clip(gain·x + offset + noise·ε, 0, 1)`` with ``ε ~ N(0, I)``, and each label ``c`` recorded
    as ``(c + 1) mod 10`` with probability ``confusion``. Neutral values return the samples unchanged.

    Parameters
    ----------
    x : np.ndarray
        ``[n, 1, S, S]`` float32 in ``[0, 1]``.
    y : np.ndarray
        ``[n]`` int64 true labels.
    acquisition : dict[str, float]
        ``gain``, ``offset``, ``noise`` (:data:`ACQUISITION_SPACE`).
    annotator : dict[str, float]
        ``confusion`` (:data:`medtasks.tabular.ANNOTATOR_SPACE`).
    rng : np.random.Generator
        the site's shift stream.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        ``(x [n, 1, S, S] float32, y [n] int64 recorded labels)``, new arrays.
    """
    noise = rng.standard_normal(x.shape)
    shifted = acquisition["gain"] * x + acquisition["offset"] + acquisition["noise"] * noise
    confused = rng.random(len(y)) < annotator["confusion"]
    recorded = np.where(confused, (y + 1) % NUM_CLASSES, y)
    return np.clip(shifted, 0.0, 1.0).astype(np.float32), recorded.astype(np.int64)


def _dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    """``(x [1, S, S] float32, y int64)`` samples from ``x [N, 1, S, S]`` and ``y [N]`` (copied)."""
    return TensorDataset(torch.tensor(x), torch.tensor(y))
