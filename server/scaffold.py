"""Starter scenario files (``medfed init``) and the version line (``medfed --version``).

A starter is a shipped scenario of the chosen task (:data:`STARTERS`), renamed after the file it goes to,
optionally with another strategy, validated and resolved like any scenario, and written with every key
shown (:meth:`~medtasks.scenario.Scenario.to_yaml`) under a short header that says how to check and run it.
"""

from __future__ import annotations

import platform
import re
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SCENARIO_FOLDER = ROOT / "scenarios"
STARTERS: dict[str, str] = {
    "segmentation": "quickstart.yaml",
    "ct": "ct-iid.yaml",
    "mil": "mil-iid.yaml",
    "tabular": "tabular-dp-none.yaml",
    "digits": "digits-iid.yaml",
}
"""The shipped scenario each task's starter is made from (in the repository's ``scenarios/`` folder)."""
DISTRIBUTION = "medfed"
LIBRARIES = ("torch", "flwr", "opacus", "monai")
HEADER = """\
# {name}: a starter scenario for the {task} task (from scenarios/{starter}), every key with its value.
# Check it:  medfed validate {file}
# Run it:    medfed run {file}   (try first: --set strategy.rounds=2)
# Reference: docs/scenario-reference.md (every key); `medfed show {file}` prints it as a run resolves it.
"""


def starter_scenario(path: Path, task: str, strategy: str | None = None) -> str:
    """The text of a starter scenario for ``task``, to be written to ``path``.

    Parameters
    ----------
    path : Path
        Where it will be written; its stem becomes the scenario's name.
    task : str
        A key of :data:`STARTERS`.
    strategy : str, optional
        ``strategy.name`` instead of the shipped one (its params start from their defaults).

    Raises
    ------
    ScenarioError
        No shipped scenario for ``task`` here, or the starter does not validate (an unknown strategy,
        one the task cannot run).
    """
    from server.scenario import ScenarioError, validate

    starter = SCENARIO_FOLDER / STARTERS[task]
    if not starter.is_file():
        raise ScenarioError(f"{starter}: the starter scenario of task '{task}' is not here "
                            "(medfed init reads the repository's scenarios/ folder)")
    raw: dict[str, Any] = yaml.safe_load(starter.read_text(encoding="utf-8"))
    raw["name"] = scenario_name(path, task)
    if strategy is not None:
        raw["strategy"] = {**raw["strategy"], "name": strategy, "params": {}}
        raw["description"] = f"{raw.get('description', '')} [strategy {strategy} set by medfed init]".lstrip()
    scenario = validate(raw, source=str(path), base_dir=starter.parent)
    return HEADER.format(name=scenario.name, task=task, starter=starter.name, file=path) + scenario.to_yaml()


def scenario_name(path: Path, fallback: str) -> str:
    """``path``'s stem as a scenario name (characters the name may not hold become ``-``), else ``fallback``."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", path.stem).lstrip("._-")[:100]
    return name or fallback


def version_line() -> str:
    """``medfed X.Y.Z (torch ..., flwr ..., opacus ..., monai ..., python ...)``: what ``medfed --version`` says."""
    libraries = ", ".join(f"{name} {_installed_version(name)}" for name in LIBRARIES)
    return f"{DISTRIBUTION} {medfed_version()} ({libraries}, python {platform.python_version()})"


def medfed_version() -> str:
    """The installed distribution's version; from a source tree that is not installed, ``pyproject.toml``'s."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return str(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"])


def _installed_version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
