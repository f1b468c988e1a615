"""What every task's example picture shares: its heading and its PNG file.

matplotlib is imported by the callers, lazily; these helpers only take a ``Figure``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["EXAMPLES_DPI", "save_example_figure"]

EXAMPLES_DPI = 100


def save_example_figure(figure: Any, path: Path, *, title: str = "") -> Any:
    """Write ``figure`` to the PNG ``path`` (parent folders are created) under the heading ``title``.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        The picture.
    path : Path
        PNG file to write.
    title : str
        The heading (which model, round and data set: :class:`server.example_plots.ExamplePlots`); none if empty.

    Returns
    -------
    matplotlib.figure.Figure
        ``figure``, for tests that read its axes back.
    """
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=EXAMPLES_DPI, bbox_inches="tight")
    return figure
