"""``python -m benchmarks.performance``: run the chosen parts, write performance.json, .md and .png, print the tables.

    python -m benchmarks.performance                      # overhead, engines and scale at full size
    python -m benchmarks.performance --quick              # the smoke version: small data, 2 rounds, a couple of minutes
    python -m benchmarks.performance --parts overhead --tasks quickstart,tabular --rounds 6 --repeats 3
    python -m benchmarks.performance --parts deployment   # a SuperLink and two SuperNodes on loopback
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.performance import deployment, engines, overhead, report, scale
from benchmarks.performance.common import CASES, ROOT, environment
from server.engines import quiet_environment

PARTS = ("overhead", "engines", "scale", "deployment")
DEFAULT_PARTS = "overhead,engines,scale"
ENGINE_TASKS = "quickstart,ct-iid"
QUICK_ENGINE_TASKS = "quickstart"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "performance"


@dataclass(frozen=True)
class Sizes:
    """The default sizes of a full run or of ``--quick``."""

    rounds: int  # per run
    repeats: int  # overhead: runs of each side
    clients: tuple[int, ...]  # scale: site counts


FULL = Sizes(rounds=4, repeats=2, clients=(10, 100, 1000, 10000))
QUICK = Sizes(rounds=2, repeats=1, clients=(10, 100))


def parse_arguments(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line, with the sizes ``--quick`` implies filled in where not given."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.performance", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the smoke version: small data, 2 rounds, fewer runs")
    parser.add_argument("--parts", default=DEFAULT_PARTS, type=_choices(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (default: {DEFAULT_PARTS})")
    parser.add_argument("--tasks", type=_choices(tuple(CASES)),
                        help=f"overhead: of {', '.join(CASES)} (default: all)")
    parser.add_argument("--engine-tasks", type=_choices(tuple(CASES)),
                        help=f"engines: the same names (default: {ENGINE_TASKS}; --quick: {QUICK_ENGINE_TASKS})")
    parser.add_argument("--rounds", type=_positive, help="rounds per run (default: 4; --quick: 2)")
    parser.add_argument("--repeats", type=_positive, help="overhead: runs of each side (default: 2; --quick: 1)")
    parser.add_argument("--clients", type=_sizes,
                        help="scale: site counts (default: 10,100,1000,10000; --quick: 10,100)")
    parser.add_argument("--timeout", type=_positive, default=1800, help="seconds per child run (default: 1800)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.rounds = args.rounds or sizes.rounds
    args.repeats = args.repeats or sizes.repeats
    args.clients = args.clients or list(sizes.clients)
    args.tasks = args.tasks or list(CASES)
    args.engine_tasks = args.engine_tasks or (QUICK_ENGINE_TASKS if args.quick else ENGINE_TASKS).split(",")
    return args


def _choices(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated list of names from ``allowed``."""

    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown) or 'empty list'} "
                                             f"(allowed: {', '.join(allowed)})")
        return names

    return parse


def _positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _sizes(text: str) -> list[int]:
    """An argparse type: comma-separated site counts."""
    return [_positive(item) for item in text.split(",") if item.strip()]


def run(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """Every chosen part's results, added to ``results`` part by part (what Ctrl-C leaves is kept)."""
    if "overhead" in args.parts:
        results["overhead"] = overhead.measure(args.tasks, rounds=args.rounds, repeats=args.repeats, quick=args.quick)
    if "engines" in args.parts:
        results["engines"] = engines.measure(args.engine_tasks, rounds=args.rounds, quick=args.quick,
                                             timeout=args.timeout)
    if "scale" in args.parts:
        results["scale"] = scale.measure(args.clients, rounds=max(args.rounds, 2), timeout=args.timeout)
    results["deployment"] = (deployment.measure(timeout=args.timeout) if "deployment" in args.parts
                             else deployment.not_measured())


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(args).items()}


def write(results: dict[str, Any], out: Path) -> str:
    """performance.json, performance.md and performance.png in ``out``; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "performance.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    text = report.markdown(results)
    (out / "performance.md").write_text(text)
    report.plot(results, out / "performance.png")
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; 0 when every measurement succeeded, 1 when one failed (its reason is in the tables)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    quiet_environment()
    results: dict[str, Any] = {"command": shlex.join(["python", "-m", "benchmarks.performance", *argv]),
                               "environment": environment(), "settings": _settings(args)}
    try:
        run(args, results)
    except KeyboardInterrupt:
        print(write(results, args.out))
        print(f"interrupted; the parts measured so far are in {args.out}", file=sys.stderr)
        return 130
    print(write(results, args.out))
    print(f"results: {args.out}")
    return 1 if failures(results) else 0


def failures(node: Any) -> int:
    """How many measurements in ``node`` (results, a part, a row) failed: the dicts holding an ``error``."""
    if isinstance(node, dict):
        return int("error" in node) + sum(failures(value) for value in node.values())
    if isinstance(node, list):
        return sum(failures(value) for value in node)
    return 0


if __name__ == "__main__":
    sys.exit(main())
