"""Slide scores and attention maps of new slides with a trained MIL model (``medfed predict``).

The input is a folder of slide folders, each holding its tile images (the layout of
:mod:`medtasks.mil.folder`; a ``labels.csv`` is not needed and is ignored), or one slide folder. Every slide is
scored whole, all its tiles in one bag (no subsampling to ``tiles_per_slide``), so every tile gets its
attention weight. Written into the output folder:

* ``scores.csv``: ``slide,probability,positive,tiles``: ``P(Y = 1) = σ(S(X))`` of the prior-free logit, the
  decision at 0.5, and the number of tiles;
* ``attention.csv``: ``slide,tile,attention``: each tile's score (the attention weight ``a_k`` for attention
  pooling; what :meth:`~medtasks.mil.models.MILModel.forward_with_attention` returns otherwise);
* ``<slide>_attention.png``: the slide's tiles beside their attention heatmap
  (:func:`medtasks.mil.plots.plot_bags`; without tile truth its third panel is blank).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import cast

import numpy as np
import torch

from medtasks.base import DataError
from medtasks.mil import folder as folder_io
from medtasks.mil.models import MILModel
from medtasks.mil.plots import plot_bags
from medtasks.mil.synthetic import UNKNOWN_TILE
from medtasks.plotting import save_example_figure

__all__ = ["ATTENTION_FILE", "SCORES_FILE", "predict_slides", "slide_folders"]

SCORES_FILE = "scores.csv"
ATTENTION_FILE = "attention.csv"


def _holds_tiles(folder: Path) -> bool:
    return any(p.is_file() and not p.name.startswith(".") and p.suffix.lower() in folder_io.TILE_EXTENSIONS
               for p in folder.iterdir())


def slide_folders(path: str | Path) -> list[Path]:
    """The slide folders of ``path``: its non-hidden sub-folders, sorted, or ``path`` itself when it holds
    tiles and no sub-folder.

    Raises
    ------
    DataError
        ``path`` is no folder, or holds neither slide folders nor tiles.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"MIL input {root} is not a folder of slide folders")
    slides = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if slides:
        return slides
    if _holds_tiles(root):
        return [root]
    raise DataError(f"{root} holds no slide folders (one sub-folder of tile images per slide)")


def _score(model: MILModel, tiles: np.ndarray) -> tuple[float, np.ndarray]:
    """``(P(Y = 1), tile scores [K])`` of one whole slide."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits, scores = model.forward_with_attention(torch.from_numpy(tiles)[None].to(device))
    finally:
        model.train(was_training)
    return float(torch.sigmoid(logits)[0]), scores[0].cpu().numpy()


def predict_slides(model: torch.nn.Module, input_path: str | Path, output_path: str | Path, *,
                   tile_size: int, normalised: bool = True) -> list[Path]:
    """Score every slide of ``input_path`` and write the files of the module docstring into ``output_path``.

    ``normalised``: the model's tile scores are attention weights summing to 1 per slide (their colour scale:
    :func:`medtasks.mil.plots.attention_scale`), not tile probabilities.

    Returns
    -------
    list[Path]
        ``scores.csv``, ``attention.csv`` and one ``<slide>_attention.png`` per slide.
    """
    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    scores_rows, attention_rows, written = [], [], []
    for slide in slide_folders(input_path):
        names, tiles = folder_io.slide_tiles(slide, tile_size)
        probability, attention = _score(cast(MILModel, model), tiles)
        scores_rows.append([slide.name, f"{probability:.6f}", int(probability >= 0.5), len(names)])
        attention_rows += [[slide.name, name, f"{float(a):.6f}"] for name, a in zip(names, attention)]
        picture = out / f"{slide.name}_attention.png"
        figure = plot_bags(tiles[None], attention[None], np.full((1, len(names)), UNKNOWN_TILE),
                           np.array([probability]), normalised=normalised)
        save_example_figure(figure, picture, title=slide.name)
        written.append(picture)
    for name, header, rows in ((SCORES_FILE, ["slide", "probability", "positive", "tiles"], scores_rows),
                               (ATTENTION_FILE, ["slide", "tile", "attention"], attention_rows)):
        with open(out / name, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([header, *rows])
        written.insert(0, out / name)
    return written
