"""HTML pieces of ``medfed report`` (:mod:`server.report`): escaped text, tables, inline images, the page.

The page is self-contained: its style sheet is inline, every image is a ``data:image/png;base64`` URI,
and it has no script at all, so it opens the same from a laptop, a hospital's file share or an e-mail.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

from server.compare import format_cell

__all__ = ["details", "element", "figure", "page", "png_file", "table", "text"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #aaa; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; } td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; } pre { background: #f7f7f7; padding: 0.5em; overflow-x: auto; }
.unfinished { background: #fff3cd; border: 1px solid #e0b000; padding: 0.5em; font-weight: bold; }
.note { color: #555; font-size: 0.9em; } code { background: #f0f0f0; padding: 0 0.2em; }
"""


def text(value: Any) -> str:
    """``value`` as escaped HTML text."""
    return escape(str(value))


def element(tag: str, content: str = "", **attributes: Any) -> str:
    """``<tag attributes>content</tag>``; ``content`` is HTML already, attribute values are escaped
    (``class_`` gives ``class``)."""
    attrs = "".join(f' {name.rstrip("_")}="{escape(str(value))}"' for name, value in attributes.items())
    return f"<{tag}{attrs}>{content}</{tag}>"


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table of plain values (numbers to 4 significant digits, ``None`` as an em dash)."""
    head = element("tr", "".join(element("th", text(column)) for column in columns))
    body = "".join(element("tr", "".join(_cell(value) for value in row)) for row in rows)
    return element("table", element("thead", head) + element("tbody", body))


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return element("td", text(format_cell(value)), **({"class_": "number"} if numeric else {}))


def figure(png: bytes, caption: str) -> str:
    """An inline PNG with its caption."""
    source = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return element("figure", f'<img src="{source}" alt="{text(caption)}">' + element("figcaption", text(caption)))


def png_file(path: Path, caption: str | None = None) -> str:
    """The PNG file ``path`` inlined as a :func:`figure` (captioned with its name by default)."""
    return figure(path.read_bytes(), caption or path.name)


def details(summary: str, content: str) -> str:
    """A collapsed block: ``summary`` (plain text) shown, ``content`` (HTML) on a click."""
    return element("details", element("summary", text(summary)) + content)


def page(title: str, body: str) -> str:
    """The whole document."""
    head = '<meta charset="utf-8">' + element("title", text(title)) + element("style", STYLE)
    return "<!DOCTYPE html>\n" + element("html", element("head", head) + element("body", body), lang="en") + "\n"
