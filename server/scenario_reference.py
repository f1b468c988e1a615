"""The scenario reference (``docs/scenario-reference.md``), generated from the schemas so it cannot drift.

    python -m server.scenario_reference            # rewrite docs/scenario-reference.md
    python -m server.scenario_reference --check    # exit 1 when the file differs from the schemas

Every key of a scenario file comes from a pydantic model: the sections in :mod:`medtasks.scenario`, and the
``params`` of each task, strategy, partition kind, privacy mechanism, aggregation rule and attack from the
schema its registry names (the same schemas :mod:`server.scenario` validates a file against). The page lists
each key with its type, default and description, types and values spelled as a scenario file writes them
(``split | subfolders | list[str]``, ``false``, ``[16, 32, 64]``); ``tests/test_docs.py`` checks the file is up
to date.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

import privacy
from medtasks import scenario as schema
from medtasks.partition import PARAMS_MODELS as PARTITION_PARAMS
from medtasks.registry import BUILTIN_TASKS, get_task_class
from privacy import attacks
from strategies import BUILTIN_ALGORITHMS, get_algorithm
from strategies.aggregation import RULES

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "scenario-reference.md"
"""Where the generated page lives in the repository."""

SECTIONS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("task", schema.TaskSection), ("data", schema.DataSection), ("partition", schema.PartitionSection),
    ("strategy", schema.StrategySection), ("local", schema.LocalSection), ("privacy", schema.PrivacySection),
    ("defense", schema.DefenseSection), ("attack", schema.AttackSection), ("engine", schema.EngineSection),
    ("output", schema.OutputSection),
)
"""The scenario's sections in the order a scenario file lists them."""
CROSS_REFERENCE = re.compile(r":(?:mod|func|class|meth|data|attr):`~?([^`]+)`")
"""A Sphinx cross-reference in a docstring (its target is kept as code)."""

HEADER = """# Scenario reference

Generated from the schemas by `python -m server.scenario_reference`; do not edit by hand
(`tests/test_docs.py` fails when this page and the schemas differ). A scenario file is YAML with the
top-level keys below; `medfed show FILE` prints a file with every default filled in, and
`medfed validate FILE` checks it. Every `params` mapping is validated against the schema its `name`,
`kind`, `mechanism` or `aggregation` selects (the second half of this page).
"""


def reference_markdown() -> str:
    """The whole page: the top-level keys, each section's keys, then every selectable ``params`` schema."""
    parts = [HEADER, "## Top level", "", _table(schema.Scenario, skip={name for name, _ in SECTIONS}), ""]
    for name, section in SECTIONS:
        parts += [f"## `{name}`", "", _doc(section), "", _table(section), ""]
    parts += ["## `params` by choice", ""]
    for title, models in _params_groups():
        parts += [f"### {title}", ""]
        for choice, model in models:
            parts += [f"#### `{choice}`", ""]
            parts += [_table(model) if model is not None and model.model_fields else "No params.", ""]
    return "\n".join(parts).rstrip() + "\n"


def _params_groups() -> list[tuple[str, list[tuple[str, type[BaseModel] | None]]]]:
    """(heading, [(choice, its params schema)]) for every key whose value selects a ``params`` schema."""
    return [
        ("`task.params` by `task.name`", [(name, get_task_class(name).Params) for name in sorted(BUILTIN_TASKS)]),
        ("`strategy.params` by `strategy.name`",
         [(name, get_algorithm(name).Params) for name in sorted(BUILTIN_ALGORITHMS)]),
        ("`partition.params` by `partition.kind`", sorted(PARTITION_PARAMS.items())),
        ("`privacy.params` by `privacy.mechanism`",
         [(name, privacy.params_schema(name)) for name in privacy.MECHANISMS]),
        ("`defense.params` by `defense.aggregation`", list(RULES.items())),
        ("`attack.params` by `attack.kind`", [(kind, attacks.get_attack(kind).Params) for kind in attacks.KINDS]),
    ]


def _doc(model: type[BaseModel]) -> str:
    """A model's docstring as Markdown text: reST double backticks and cross-references (``:mod:`x```) as code."""
    text = " ".join(line.strip() for line in (model.__doc__ or "").strip().splitlines() if line.strip())
    return CROSS_REFERENCE.sub(r"`\1`", text.replace("``", "`"))


def _table(model: type[BaseModel], skip: Iterable[str] = ()) -> str:
    """A Markdown table of ``model``'s fields: key, type, default, description."""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        if name in set(skip):
            continue
        cells = (f"`{name}`", _type(field), _default(field), _prose(field.description or ""))
        rows.append("| " + " | ".join(_cell(cell) for cell in cells) + " |")
    return "\n".join(rows)


def _type(field: FieldInfo) -> str:
    """The field's annotation as code a reader of YAML follows (``int``, ``split | subfolders | list[str]``)."""
    return f"`{_type_name(field.annotation)}`"


def _type_name(annotation: Any) -> str:
    """``annotation`` without ``typing``'s spelling: a ``Literal`` as its values, a union as ``a | b``, a
    constrained type as its base type, a tuple of any length as ``list[...]`` (what YAML writes it as)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return " | ".join(_yaml(value) for value in args)
    if origin in (Union, UnionType):
        return " | ".join(_type_name(arg) for arg in args)
    if origin is tuple and args[1:] == (Ellipsis,):
        return f"list[{_type_name(args[0])}]"
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(arg) for arg in args)}]"
    return "None" if annotation is NoneType else getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    """The field's default as YAML would spell it (``null``, ``true``, ``[]``), or *required*."""
    if field.default is PydanticUndefined and field.default_factory is None:
        return "*required*"
    value: Any = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if isinstance(value, BaseModel):
        return "(section defaults)"
    return f"`{_yaml(value)}`"


def _yaml(value: Any) -> str:
    """``value`` as YAML's flow style writes it: ``null``, ``false``, ``""``, ``[16, 32]``, ``{}``, a bare word."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value or '""'
    if isinstance(value, (list, tuple)):
        return f"[{', '.join(_yaml(item) for item in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {_yaml(item)}" for key, item in value.items()) + "}"
    return str(value)


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (pipes escaped, one line)."""
    return " ".join(text.replace("|", "\\|").split())


def _prose(text: str) -> str:
    """A description as Markdown text: a placeholder such as ``<name>`` is shown, not read as an HTML tag."""
    return text.replace("<", "\\<")


def main(argv: list[str] | None = None) -> int:
    """Write the page, or with ``--check`` compare it with the schemas (exit 1 when they differ)."""
    parser = argparse.ArgumentParser(prog="python -m server.scenario_reference", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the page differs from the schemas")
    args = parser.parse_args(argv)
    text = reference_markdown()
    if args.check:
        current = REFERENCE.read_text(encoding="utf-8") if REFERENCE.is_file() else ""
        if current != text:
            print(f"{REFERENCE} differs from the schemas: run python -m server.scenario_reference", file=sys.stderr)
            return 1
        return 0
    REFERENCE.write_text(text, encoding="utf-8")
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
