"""The documentation holds: the scenario reference matches the schemas, and every relative link resolves."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server import scenario_reference

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target), not images


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of ``page``'s headings: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", page.read_text(encoding="utf-8"), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_the_scenario_reference_is_generated_from_the_current_schemas() -> None:
    assert scenario_reference.main(["--check"]) == 0, "run: python -m server.scenario_reference"
    text = scenario_reference.REFERENCE.read_text(encoding="utf-8")
    for section, _ in scenario_reference.SECTIONS:
        assert f"## `{section}`" in text
    assert "| `clients` | `int` | *required* |" in text  # a key of a section, with its type
    assert "#### `dpsgd`" in text and "| `target_epsilon` |" in text  # a mechanism's params


def test_a_stale_reference_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    stale = tmp_path / "scenario-reference.md"
    stale.write_text("# Scenario reference\n", encoding="utf-8")
    monkeypatch.setattr(scenario_reference, "REFERENCE", stale)
    assert scenario_reference.main(["--check"]) == 1
    assert "differs from the schemas" in capsys.readouterr().err
    assert scenario_reference.main([]) == 0 and scenario_reference.main(["--check"]) == 0  # rewritten


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` to a file that does not exist, or to a heading its page lacks."""
    broken = []
    for target in LINK.findall(page.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not followed (no network)
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    return broken


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_relative_link_resolves(page: Path) -> None:
    assert broken_links(page) == []


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other page\n\n## Engines and workers\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text("# Page\n[a](other.md) [b](other.md#engines-and-workers) [c](#page) [d](https://x.org/y)\n"
                    "[e](missing.md) [f](other.md#nowhere) ![img](absent.png)\n", encoding="utf-8")
    assert broken_links(page) == ["missing.md", "other.md#nowhere"]
