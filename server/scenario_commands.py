"""The ``medfed`` commands that read or write scenario files, without running them.

    medfed validate FILE ... [--set key.path=value ...]
    medfed list [FOLDER] [--wide]
    medfed show FILE [--set key.path=value ...]
    medfed init [FILE] [--task segmentation|ct|mil|tabular|digits] [--strategy NAME] [--force]

Each prints its result on stdout; an invalid scenario or option is one line on stderr and exit code 2
(:mod:`server.exits`); :mod:`server.cli` is the entry point.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from server.exits import EXIT_INVALID, EXIT_OK
from server.exits import fail as _fail
from server.scaffold import STARTERS

if TYPE_CHECKING:  # pragma: no cover
    from rich.table import Table
    from rich.text import Text

    from server.scenario import Scenario

DEFAULT_FOLDER = "scenarios"
DEFAULT_FILE = "scenario.yaml"
DEFAULT_TASK = "segmentation"
DESCRIPTION_WIDTH = 40  # the fewest characters of a description `medfed list` shows without --wide
TABLE_WIDTH = 120  # the narrowest table `medfed list` draws, whatever the terminal


def add_scenario_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``validate``, ``list``, ``show`` and ``init`` to the ``medfed`` subcommands."""
    validate = commands.add_parser("validate", help="check scenario files without running them")
    validate.add_argument("files", nargs="+", help="scenario YAML files")
    _add_overrides(validate)
    validate.set_defaults(handler=_validate)

    listing = commands.add_parser("list", help="table of the scenarios in a folder")
    listing.add_argument("folder", nargs="?", default=DEFAULT_FOLDER,
                         help=f"folder of scenario files (default: {DEFAULT_FOLDER})")
    listing.add_argument("--wide", action="store_true", help="show whole descriptions (default: shortened to fit)")
    listing.set_defaults(handler=_list)

    show = commands.add_parser("show", help="print a scenario as a run resolves it: every default, --set applied")
    show.add_argument("file", help="scenario YAML file")
    _add_overrides(show)
    show.set_defaults(handler=_show)

    init = commands.add_parser("init", help="write a starter scenario file for a task")
    init.add_argument("file", nargs="?", default=DEFAULT_FILE, help=f"the file to write (default: {DEFAULT_FILE})")
    init.add_argument("--task", choices=sorted(STARTERS), default=DEFAULT_TASK,
                      help=f"the task (default: {DEFAULT_TASK}); the starter is its shipped scenario")
    init.add_argument("--strategy", metavar="NAME", help="strategy.name (default: the shipped scenario's)")
    init.add_argument("--force", action="store_true", help="replace FILE if it exists")
    init.set_defaults(handler=_init)


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a scenario key, as for medfed run (repeatable)")


def _validate(args: argparse.Namespace) -> int:
    from server import scenario as scenario_module

    status = EXIT_OK
    for file in args.files:
        try:
            scenario = scenario_module.load(file, args.overrides)
        except scenario_module.ScenarioError as error:
            print(f"medfed: error: {error}", file=sys.stderr)
            status = EXIT_INVALID
            continue
        print(f"ok {file} ({scenario.task.name}, {scenario.partition.kind}, {scenario.strategy.name})")
    return status


def _list(args: argparse.Namespace) -> int:
    """``medfed list``: one row per scenario file; a file that does not load shows its error (exit 2)."""
    from rich.console import Console
    from rich.table import Table

    from server import scenario as scenario_module

    folder = Path(args.folder)
    if not folder.is_dir():
        return _fail(f"scenario folder not found: {folder}", EXIT_INVALID)
    loaded: dict[str, Scenario | scenario_module.ScenarioError] = {}
    for file in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
        try:
            loaded[file.name] = scenario_module.load(file)
        except scenario_module.ScenarioError as error:
            loaded[file.name] = error
    with_attack = any(not isinstance(s, Exception) and s.attack is not None for s in loaded.values())
    table = Table(title=f"scenarios in {folder}")
    for column in _list_columns(with_attack):
        table.add_column(column, no_wrap=True, overflow="ellipsis")
    for name, scenario in loaded.items():
        table.add_row(*_list_row(name, scenario, with_attack))
    description = table.columns[1]
    description.max_width = None if args.wide else DESCRIPTION_WIDTH
    console = Console(width=max(TABLE_WIDTH, Console().width, _full_width(table)))
    if not args.wide:  # the description takes the width the other columns leave, at least DESCRIPTION_WIDTH
        description.max_width, description.ratio, table.expand = None, 1, True
    console.print(table)
    return EXIT_INVALID if any(isinstance(s, Exception) for s in loaded.values()) else EXIT_OK


def _full_width(table: Table) -> int:
    """The width ``table`` needs to show every cell whole (its description column at most ``max_width``)."""
    from rich.console import Console
    from rich.measure import Measurement

    console = Console(width=sys.maxsize)
    return Measurement.get(console, console.options, table).maximum


def _list_columns(with_attack: bool) -> list[str]:
    return ["file", "description", "task", "partition", "clients", "strategy", "privacy",
            *(["attack"] if with_attack else []), "rounds", "engine"]


def _list_row(name: str, scenario: Scenario | Exception, with_attack: bool) -> list[str | Text]:
    """The cells of one ``medfed list`` row: the scenario's settings, or its error in the description column."""
    from rich.text import Text

    if isinstance(scenario, Exception):  # wrapped whole: a shortened error would not say what is wrong
        error = Text(f"invalid: {scenario}", style="red", no_wrap=False, overflow="fold")
        return [name, error, *[""] * (len(_list_columns(with_attack)) - 2)]
    attack = [scenario.attack.kind if scenario.attack is not None else ""] if with_attack else []
    return [name, Text(scenario.description), scenario.task.name, scenario.partition.kind,
            str(scenario.partition.clients), scenario.strategy.name, scenario.privacy.mechanism, *attack,
            str(scenario.strategy.rounds), scenario.engine.backend]


def _show(args: argparse.Namespace) -> int:
    """``medfed show``: the resolved scenario, as a run writes it to its ``scenario.yaml``."""
    from server import scenario as scenario_module

    try:
        scenario = scenario_module.load(args.file, args.overrides)
    except scenario_module.ScenarioError as error:
        return _fail(str(error), EXIT_INVALID)
    print(scenario.to_yaml(), end="")
    return EXIT_OK


def _init(args: argparse.Namespace) -> int:
    """``medfed init``: write a starter scenario; an existing file only with ``--force``."""
    from server.scaffold import starter_scenario
    from server.scenario import ScenarioError

    path = Path(args.file)
    if path.exists() and not args.force:
        return _fail(f"{path} exists; add --force to replace it", EXIT_INVALID)
    try:
        text = starter_scenario(path, args.task, args.strategy)
        path.write_text(text, encoding="utf-8")
    except ScenarioError as error:
        return _fail(str(error), EXIT_INVALID)
    except OSError as error:
        return _fail(f"{path}: cannot write: {error.strerror or error}", EXIT_INVALID)
    print(f"wrote {path}; check it with: medfed validate {path}; run it with: medfed run {path}")
    return EXIT_OK
