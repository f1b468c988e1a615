"""Real slides from a folder: one sub-folder of tile images per slide, and a labels CSV.

Layout::

    root/
      labels.csv            header: slide,label[,positive_tiles][,patient]
      <slide>/<tile>.png    tile images: .png, .jpg / .jpeg (any mode, read as RGB) or .npy
      <slide>/<tile>.npy    ([H, W, 3] uint8 0..255, or float in [0, 1])

``labels.csv`` has one row per slide folder: ``slide`` (the sub-folder's name), ``label``
(0 or 1) and optionally ``positive_tiles``, the names (file name without extension) of the
slide's positive tiles separated by spaces or ``;`` (empty = none). With that column every
tile's truth is known (listed = 1, else 0) and attention localisation can be scored; without
it tile truth is :data:`~medtasks.mil.synthetic.UNKNOWN_TILE`. An optional ``patient`` column names
the patient (case) of each slide: the task then keeps a patient's slides together, at one site and on
one side of every split (an empty cell makes the slide its own case). Without it every slide is its
own case.

Tiles are resized to ``T × T`` (bilinear with antialiasing) and kept in ``[0, 1]``; tiles of a
slide are sorted by file name. Hidden files and other extensions are ignored. Every problem
(no folder, no or malformed CSV, a label that is not 0/1, a slide row without its folder or a
folder without its row, an empty slide folder, an unreadable or non-RGB tile, an unknown tile
in ``positive_tiles``) raises :class:`~medtasks.base.DataError` with a one-line message
naming the path.

:func:`fixed_size_bags` turns slides of different sizes into ``K``-tile bags: a slide with
more than ``K`` tiles keeps a seeded random subset of ``K`` (fixed for the run), a smaller one
is padded (``padding`` mask, as :func:`~medtasks.mil.models.pad_bags`).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medtasks.base import DataError
from medtasks.mil.synthetic import UNKNOWN_TILE

LABELS_FILE = "labels.csv"
SLIDE_COLUMN, LABEL_COLUMN, TILE_TRUTH_COLUMN, PATIENT_COLUMN = "slide", "label", "positive_tiles", "patient"
TILE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".npy")


@dataclass(frozen=True)
class SlideRow:
    """One row of ``labels.csv``: the slide's label and, if given, its positive tile names and patient
    (``""``: none given in a table with the column)."""

    label: int
    positive_tiles: frozenset[str] | None
    patient: str | None = None


@dataclass(frozen=True)
class SlideFolder:
    """Every slide of a folder.

    Attributes
    ----------
    names : tuple[str, ...]
        slide names, sorted.
    bags : tuple[np.ndarray, ...]
        per slide, ``[K_s, 3, T, T]`` float32 RGB in ``[0, 1]``.
    tile_labels : tuple[np.ndarray, ...]
        per slide, ``[K_s]`` int64 (1, 0, or ``UNKNOWN_TILE`` without truth).
    labels : np.ndarray
        ``[S]`` int64 slide labels from the CSV.
    patients : tuple[str, ...] | None
        per slide, its patient (a slide with an empty ``patient`` cell is its own), or ``None`` when
        the CSV has no ``patient`` column.
    """

    names: tuple[str, ...]
    bags: tuple[np.ndarray, ...]
    tile_labels: tuple[np.ndarray, ...]
    labels: np.ndarray
    patients: tuple[str, ...] | None = None

    @property
    def cases(self) -> np.ndarray:
        """``[S]`` the case of each slide: its patient, else the slide itself."""
        return np.asarray(self.patients if self.patients is not None else self.names)

    @property
    def has_tile_truth(self) -> bool:
        """Whether every tile's truth is known (the CSV has ``positive_tiles``)."""
        return all(bool(np.all(t != UNKNOWN_TILE)) for t in self.tile_labels)


def read_labels(path: Path) -> dict[str, SlideRow]:
    """Parse ``labels.csv`` (module docstring) into rows by slide name.

    Raises
    ------
    DataError
        missing file, missing column, empty table, duplicate slide, bad label.
    """
    if not path.is_file():
        expected = f"{SLIDE_COLUMN},{LABEL_COLUMN}[,{TILE_TRUTH_COLUMN}][,{PATIENT_COLUMN}]"
        raise DataError(f"no {path.name} in {path.parent} (columns {expected})")
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            raw_rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read {path}: {type(error).__name__}: {error}") from None
    missing = [c for c in (SLIDE_COLUMN, LABEL_COLUMN) if c not in columns]
    if missing:
        raise DataError(f"{path} lacks column(s) {', '.join(missing)} (header found: {','.join(columns) or 'none'})")
    if not raw_rows:
        raise DataError(f"{path} has a header but no slide rows")
    rows: dict[str, SlideRow] = {}
    for line, raw in enumerate(raw_rows, start=2):
        name, label = raw[SLIDE_COLUMN], raw[LABEL_COLUMN]
        if not name:
            raise DataError(f"{path}, line {line}: empty slide name")
        if name in rows:
            raise DataError(f"{path}, line {line}: slide {name!r} is listed twice")
        if label not in ("0", "1"):
            raise DataError(f"{path}, line {line}: label of slide {name!r} is {label!r}; expected 0 or 1")
        truth = None
        if TILE_TRUTH_COLUMN in columns:
            truth = frozenset(t for t in re.split(r"[;\s]+", raw.get(TILE_TRUTH_COLUMN, "")) if t)
        patient = raw.get(PATIENT_COLUMN, "") if PATIENT_COLUMN in columns else None
        rows[name] = SlideRow(int(label), truth, patient)
    return rows


def _tile_array(path: Path) -> np.ndarray:
    """A tile file as ``[H, W, 3]`` float64 in ``[0, 1]``."""
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        scale = 255.0 if array.dtype == np.uint8 else 1.0
        array = array.astype(np.float64) / scale
    else:
        from PIL import Image

        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    return array


def read_tile(path: Path, tile_size: int) -> np.ndarray:
    """One tile image resized to ``[3, T, T]`` float32 in ``[0, 1]``.

    Raises
    ------
    DataError
        unreadable file, not ``[H, W, 3]``, or values outside ``[0, 1]``.
    """
    try:
        array = _tile_array(path)
    except Exception as error:
        raise DataError(f"cannot read tile {path}: {type(error).__name__}: {error}") from None
    if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
        raise DataError(f"tile {path} has shape {array.shape}; expected an RGB image [H, W, 3]")
    if not np.all(np.isfinite(array)) or array.min() < 0 or array.max() > 1:
        raise DataError(f"tile {path} holds values outside [0, 1] (float .npy tiles must be in [0, 1])")
    tile = torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32))[None]
    if tile.shape[-2:] != (tile_size, tile_size):
        tile = F.interpolate(tile, size=(tile_size, tile_size), mode="bilinear", antialias=True, align_corners=False)
    return tile[0].clamp(0.0, 1.0).numpy()


def _tile_files(folder: Path) -> dict[str, Path]:
    """Supported, non-hidden tile files of a slide folder by name (file name without extension)."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in TILE_EXTENSIONS:
            continue
        if path.stem in files:
            raise DataError(f"two tiles named {path.stem!r} in {folder}: {files[path.stem].name} and {path.name}")
        files[path.stem] = path
    if not files:
        raise DataError(f"slide folder {folder} holds no tile images ({', '.join(TILE_EXTENSIONS)})")
    return files


def _tile_labels(files: dict[str, Path], row: SlideRow, folder: Path) -> np.ndarray:
    """``[K_s]`` int64 truth of a slide's tiles in file-name order (``UNKNOWN_TILE`` without truth)."""
    if row.positive_tiles is None:
        return np.full(len(files), UNKNOWN_TILE, dtype=np.int64)
    unknown = sorted(row.positive_tiles - set(files))
    if unknown:
        raise DataError(f"{TILE_TRUTH_COLUMN} of slide {folder.name!r} names tiles not in {folder}: {unknown[:3]}")
    return np.array([int(name in row.positive_tiles) for name in files], dtype=np.int64)


def load_slide_folder(root: str | Path, tile_size: int) -> SlideFolder:
    """Read every slide of ``root`` (layout in the module docstring).

    Parameters
    ----------
    root : str | Path
        the data folder.
    tile_size : int
        ``T``; tiles are resized to ``T × T``.

    Returns
    -------
    SlideFolder
        The slides, sorted by name.

    Raises
    ------
    DataError
        see the module docstring.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"MIL data folder {root} does not exist or is not a directory")
    rows = read_labels(root / LABELS_FILE)
    folders = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    for missing, where in ((sorted(set(rows) - folders), "rows without a folder"),
                           (sorted(folders - set(rows)), f"folders without a row in {LABELS_FILE}")):
        if missing:
            raise DataError(f"{root}: slide {where}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    names = tuple(sorted(rows))
    bags, tile_labels = [], []
    for name in names:
        files = _tile_files(root / name)
        tile_labels.append(_tile_labels(files, rows[name], root / name))
        bags.append(np.stack([read_tile(path, tile_size) for path in files.values()]))
    labels = np.array([rows[name].label for name in names], dtype=np.int64)
    patients = None
    if any(rows[name].patient is not None for name in names):
        patients = tuple(rows[name].patient or name for name in names)
    return SlideFolder(names=names, bags=tuple(bags), tile_labels=tuple(tile_labels), labels=labels, patients=patients)


def fixed_size_bags(
    folder: SlideFolder, indices: np.ndarray, tiles_per_slide: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slides ``indices`` as ``K``-tile bags, ``K = tiles_per_slide``.

    A slide with ``K_s > K`` tiles keeps ``K`` of them, drawn without replacement from
    ``rng`` (sorted); a slide with ``K_s < K`` is zero-padded.

    Returns
    -------
    tuple[np.ndarray, np.ndarray, np.ndarray]
        ``(tiles [n, K, 3, T, T] float32, tile_labels [n, K] int64, padding [n, K] bool)``,
        tile labels 0 on padding.
    """
    if tiles_per_slide < 1:
        raise ValueError(f"tiles_per_slide must be >= 1, got {tiles_per_slide}")
    size = folder.bags[0].shape[-1]
    tiles = np.zeros((len(indices), tiles_per_slide, 3, size, size), dtype=np.float32)
    tile_labels = np.zeros((len(indices), tiles_per_slide), dtype=np.int64)
    padding = np.ones((len(indices), tiles_per_slide), dtype=bool)
    for row, slide in enumerate(indices):
        bag, truth = folder.bags[slide], folder.tile_labels[slide]
        keep = np.arange(len(bag))
        if len(bag) > tiles_per_slide:
            keep = np.sort(rng.choice(len(bag), size=tiles_per_slide, replace=False))
        tiles[row, : len(keep)] = bag[keep]
        tile_labels[row, : len(keep)] = truth[keep]
        padding[row, : len(keep)] = False
    return tiles, tile_labels, padding


def slide_tiles(folder: str | Path, tile_size: int) -> tuple[tuple[str, ...], np.ndarray]:
    """Every tile of one slide folder, without labels (new slides to predict on).

    Returns
    -------
    tuple[tuple[str, ...], np.ndarray]
        ``(tile names, tiles [K, 3, T, T] float32 in [0, 1])``, sorted by file name.

    Raises
    ------
    DataError
        no tile in the folder, or an unreadable tile (:func:`read_tile`).
    """
    files = _tile_files(Path(folder))
    return tuple(files), np.stack([read_tile(path, tile_size) for path in files.values()])
