"""The benchmark's results as markdown tables (``performance.md``) and one figure (``performance.png``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.performance.common import PHASES

Row = dict[str, Any]


def markdown(results: dict[str, Any]) -> str:
    """Every measured part as a markdown section, after a header naming the command, machine and versions."""
    sections = [_header(results)]
    writers: dict[str, Callable[[Any], list[str]]] = {
        "overhead": _overhead, "engines": _engines, "scale": _scale, "deployment": _deployment}
    for part, write in writers.items():
        if part in results:
            sections.append("\n".join(write(results[part])))
    return "\n\n".join(sections) + "\n"


def _header(results: dict[str, Any]) -> str:
    env = results["environment"]
    return (f"# medfed performance\n\n`{results['command']}`, {env['date']}, commit {env['commit'] or 'unknown'}: "
            f"Python {env['python']}, torch {env['torch']}, flwr {env['flwr']}, ray {env['ray']}; "
            f"{env['cpus']} CPUs ({env['usable_cpus']} usable), {env['processor']}, {env['platform']}.")


def _table(head: Sequence[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(row) + " |" for row in rows)]


def number(value: Any, digits: int = 3) -> str:
    """``value`` to ``digits`` significant digits, or ``–`` when there is none."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}g}"


def _failed(row: Row) -> str | None:
    return f"failed: {row['error']}" if "error" in row else None


def _final(final: dict[str, dict[str, float]], metric: str) -> str:
    phase = "central" if metric in final.get("central", {}) else "evaluate"
    return f"{phase} {metric} {number(final.get(phase, {}).get(metric), 5)}"


def _overhead(rows: list[Row]) -> list[str]:
    lines = ["## Overhead: medfed in-process against a plain PyTorch loop", "",
             "Seconds per round, median of the rounds after the first. The plain loop does the same local steps, "
             "evaluations and FedAvg on the same task objects (`benchmarks/performance/baseline.py`).", ""]
    head = ["task", "scenario", "rounds", "medfed s/round", "of which bookkeeping", "plain loop s/round", "overhead",
            "medfed final", "plain loop final", "largest metric difference"]
    return lines + _table(head, _body(rows, lambda row: [row["label"], f"`{row['scenario']}`", str(row["rounds"])],
                                      _overhead_cells, len(head) - 3))


def _overhead_cells(row: Row) -> list[str]:
    overhead = row["overhead_percent"]
    return [number(row["medfed_seconds_per_round"]), number(row["medfed_split"]["bookkeeping"]),
            number(row["plain_seconds_per_round"]), "–" if overhead is None else f"{overhead:+.1f} %",
            _final(row["medfed_final"], row["primary_metric"]), _final(row["plain_final"], row["primary_metric"]),
            number(row["largest_metric_difference"], 2)]


def _body(rows: list[Row], first: Callable[[Row], list[str]], cells: Callable[[Row], list[str]],
          width: int) -> list[list[str]]:
    """One table row per row: its ``first`` cells, then its measured ``cells`` (``width`` of them) or its failure."""
    return [[*first(row), *([failed, *[""] * (width - 1)] if (failed := _failed(row)) else cells(row))]
            for row in rows]


def _engines(part: dict[str, Any]) -> list[str]:
    lines = ["## Engines", "",
             f"{part['rounds']} rounds per run, each in its own process. Start-up: process start to round 1 "
             "(imports, the engine, discovery). Per round: median of the rounds after the first, split into the "
             "`metrics.jsonl` phases and bookkeeping (the rest of the round). `flower`: Flower's Simulation Engine "
             "with a minimal ClientApp doing the same local steps (no split). Peak memory: the run's process "
             "(resident), and all the processes it started (proportional set size, Ray's included).", ""]
    head = ["task", "engine", "workers", "start-up s", "s/round", *PHASES, "bookkeeping",
            "peak MiB: process / all"]
    lines += _table(head, _body(part["rows"], lambda row: [row["label"], row["engine"], str(row["workers"])],
                                _engine_cells, len(head) - 3))
    lines += ["", "Parallel efficiency T(1 worker) / (2 × T(2 workers)):", ""]
    if not part["efficiency"]:
        lines.append("not measured (it needs runs with 1 and with 2 workers; `--quick` has only 2)")
    else:
        lines += _table(["task", "engine", "of", "1 worker s", "2 workers s", "efficiency"],
                        [[row["task"], row["engine"], row["part"], number(row["one_worker"]),
                          number(row["two_workers"]), f"{100 * row['efficiency']:.0f} %"]
                         for row in part["efficiency"]])
    return lines + [f"\n{note}" for note in part["notes"]]


def _engine_cells(row: Row) -> list[str]:
    split = row["per_round"]
    return [number(row["startup_seconds"]), *(number(split[key]) for key in ("wall", *PHASES, "bookkeeping")),
            f"{number(row['peak_rss_mib'], 4)} / {number(row['peak_total_mib'], 4)}"]


def _scale(rows: list[Row]) -> list[str]:
    lines = ["## Scale: tabular, 10 sites sampled per round, in-process", "",
             "Discovery: up to 1,000 sites, building every site's data and the query round to all of them; above, "
             "the partition ids only (each site is described when first sampled). Peak RSS: the run's process.", ""]
    body = []
    for row in rows:
        status = _failed(row) or (f"refused: {row['refused']}" if "refused" in row else "ok")
        measured = "refused" not in row and "error" not in row
        body.append([f"{row['clients']:,}", str(row["sampled"]),
                     *(number(row.get(key)) if measured else "" for key in ("discovery_seconds", "seconds_per_round")),
                     number(row.get("peak_rss_mib"), 4) if measured else "", status])
    return lines + _table(["sites", "sampled", "discovery s", "s/round", "peak RSS MiB", "status"], body)


def _deployment(part: dict[str, Any]) -> list[str]:
    lines = ["## Deployment: a SuperLink and two SuperNodes on loopback", ""]
    if "rounds" not in part:
        return [*lines, _failed(part) or part.get("note", "not measured here")]
    lines += [f"`{part['scenario']}`. Federation start {number(part['federation_start_seconds'])} s, deployed run "
              f"{number(part['wall_seconds'])} s in all. Seconds per phase; of the deployed train phase, the "
              "slowest site's own training and the rest (messaging).", ""]
    body = [[str(row["round"]), *(f"{number(row[f'deployed_{phase}'])} / {number(row[f'inprocess_{phase}'])}"
                                  for phase in PHASES),
             number(row["deployed_site_training"]), number(row["deployed_train_messaging"])] for row in part["rounds"]]
    return lines + _table(["round", *(f"{phase} deployed / in-process" for phase in PHASES), "site training",
                           "messaging"], body)


def plot(results: dict[str, Any], path: Path) -> None:
    """``performance.png``: one panel per measured part: the overhead, the engines' seconds per round by phase,
    and the scale curves."""
    from matplotlib.figure import Figure

    measured = [
        (_plot_overhead, [row for row in results.get("overhead", []) if row.get("overhead_percent") is not None]),
        (_plot_engines, [row for row in results.get("engines", {}).get("rows", []) if "per_round" in row]),
        (_plot_scale, [row for row in results.get("scale", []) if row.get("seconds_per_round") is not None]),
    ]
    panels = [(draw, rows) for draw, rows in measured if rows]
    figure = Figure(figsize=(5.5 * max(len(panels), 1), 4.8), layout="constrained")
    if not panels:
        figure.text(0.5, 0.5, "nothing measured", ha="center")
    for axes, (draw, rows) in zip(figure.subplots(1, len(panels), squeeze=False)[0] if panels else [], panels):
        draw(axes, rows)
    figure.savefig(path, dpi=110)


def _plot_overhead(axes: Any, rows: list[Row]) -> None:
    positions = range(len(rows))
    axes.bar([p - 0.2 for p in positions], [row["medfed_seconds_per_round"] for row in rows], 0.4, label="medfed")
    axes.bar([p + 0.2 for p in positions], [row["plain_seconds_per_round"] for row in rows], 0.4, label="plain loop")
    for p, row in zip(positions, rows):
        axes.annotate(f"{row['overhead_percent']:+.0f} %", (p, row["medfed_seconds_per_round"]), ha="center",
                      va="bottom", fontsize=8)
    axes.set_xticks(list(positions), [row["label"] for row in rows])
    axes.set(title="in-process vs plain PyTorch loop", ylabel="seconds per round")
    axes.legend()


def _plot_engines(axes: Any, rows: list[Row]) -> None:
    labels = [f"{row['label']}\n{row['engine']} ×{row['workers']}" for row in rows]
    bottom = [0.0] * len(rows)
    for part in (*PHASES, "bookkeeping"):
        heights = [row["per_round"].get(part) or 0.0 for row in rows]
        axes.bar(labels, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    unsplit = [(label, row["per_round"]["wall"]) for label, row in zip(labels, rows)
               if row["per_round"].get("train") is None]
    if unsplit:
        axes.bar(*zip(*unsplit), label="round (no split)", hatch="//", fill=False)
    axes.set(title="seconds per round by engine", ylabel="seconds per round")
    axes.tick_params(axis="x", labelsize=7, rotation=90)
    axes.legend(fontsize=7)


def _plot_scale(axes: Any, rows: list[Row]) -> None:
    clients = [row["clients"] for row in rows]
    axes.plot(clients, [row["seconds_per_round"] for row in rows], "o-", label="seconds per round")
    axes.plot(clients, [row["discovery_seconds"] for row in rows], "s--", label="discovery seconds")
    axes.set(xscale="log", xlabel="sites (10 sampled per round)", ylabel="seconds",
             title="tabular, in-process: scale")
    memory = axes.twinx()
    memory.plot(clients, [row["peak_rss_mib"] for row in rows], "^:", color="tab:red", label="peak RSS")
    memory.set_ylabel("peak RSS, MiB")
    axes.legend(loc="upper left", fontsize=8)
    memory.legend(loc="lower right", fontsize=8)
