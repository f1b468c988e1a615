"""The generated scenario reference describes every key, with types and defaults as a scenario file writes them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import BaseModel, Field

from server import scaffold, scenario_reference
from server.scenario_reference import reference_markdown

ROW = re.compile(r"^\| `(?P<key>[^`]+)` \|")
"""A row of a key table (the header row's first cell is not in code)."""
CELL_BORDER = re.compile(r"(?<!\\)\|")
"""A pipe between two cells (an escaped one, ``\\|``, belongs to a cell's text)."""


def undescribed_keys(page: str) -> list[str]:
    """``heading: key`` of every row of ``page``'s key tables whose description cell is empty."""
    heading, found = "", []
    for line in page.splitlines():
        if line.startswith("#"):
            heading = line.lstrip("# ")
        elif (row := ROW.match(line)) and not CELL_BORDER.split(line)[-2].strip():
            found.append(f"{heading}: {row['key']}")
    return found


class Shapes(BaseModel):
    """``shapes``: one key of each kind of annotation the schemas use."""

    sites: Literal["split", "subfolders"] | list[str] = Field("split", description="a mode or a list")
    secure_mode: Literal[False] = Field(False, description="only false")
    boost: Annotated[float, Field(gt=0.0)] | Literal["auto"] | None = Field(None, description="a bounded float")
    channels: tuple[int, ...] = Field((8, 16), description="widths")
    trackers: tuple[Literal["mlflow", "tensorboard"], ...] = Field((), description="names")
    params: dict[str, Any] = Field(default_factory=dict, description="runs go to <dir>/<name>/")
    bare: int = 3


@pytest.fixture
def shapes_page(monkeypatch: pytest.MonkeyPatch) -> str:
    """The reference with :class:`Shapes` as one more section."""
    monkeypatch.setattr(scenario_reference, "SECTIONS", (*scenario_reference.SECTIONS, ("shapes", Shapes)))
    return reference_markdown()


def test_every_key_of_the_reference_has_a_description() -> None:
    page = reference_markdown()
    assert len([line for line in page.splitlines() if ROW.match(line)]) > 100  # the tables were read
    assert undescribed_keys(page) == []


def test_a_key_without_a_description_is_found(shapes_page: str) -> None:
    assert undescribed_keys(shapes_page) == ["`shapes`: bare"]


@pytest.mark.parametrize("row", [
    "| `sites` | `split \\| subfolders \\| list[str]` | `split` |",
    "| `secure_mode` | `false` | `false` |",
    "| `boost` | `float \\| auto \\| None` | `null` |",
    "| `channels` | `list[int]` | `[8, 16]` |",
    "| `trackers` | `list[mlflow \\| tensorboard]` | `[]` |",
    "| `params` | `dict[str, Any]` | `{}` | runs go to \\<dir>/\\<name>/ |",
])
def test_types_and_defaults_are_spelled_as_a_scenario_file_writes_them(shapes_page: str, row: str) -> None:
    section = shapes_page.split("## `shapes`")[1].split("\n## ")[0]
    assert f"\n{row}" in section


@pytest.mark.parametrize("spelling", ["Union[", "Optional[", "Literal[", "Annotated[", "FieldInfo", "typing.",
                                      "NoneType", "<class", "tuple["])
def test_no_python_typing_spelling_reaches_the_page(spelling: str) -> None:
    assert spelling not in reference_markdown()


def test_a_starter_scenario_points_to_the_reference(tmp_path: Path) -> None:
    text = scaffold.starter_scenario(tmp_path / "mine.yaml", "tabular")
    page = scenario_reference.REFERENCE.relative_to(scaffold.ROOT).as_posix()
    assert f"# Reference: {page} (every key);" in text and scenario_reference.REFERENCE.is_file()
