"""``medfed report``: one self-contained HTML page that gives the answer of one run, or of several side by side.

    medfed report RUN_DIR [RUN_DIR ...] [--out FILE]

For each run the page holds, from the run directory's own files: the scenario in words and the whole
resolved ``scenario.yaml`` (:mod:`server.report_text`); each site's data from ``partitions.json`` (sizes,
label histogram, the drawn acquisition and annotator parameters), as a table and a figure; every
evaluation metric against rounds per site, aggregated and central, with its unit and baseline
(:mod:`server.report_figures`); ε against rounds with the target for a run with differential privacy;
the example pictures of ``plots/``; the attack's results; the final and best metrics, the library
versions and the command that runs it again. Several runs start with the ``medfed compare`` table and
curves (:mod:`server.compare`). A run without ``summary.json`` (interrupted, or still going) gets a
page of what exists, marked "not finished".

Where things live: the run's files, curves, units and baselines in :mod:`server.report_data`, the figures
in :mod:`server.report_figures`, the HTML pieces in :mod:`server.report_html`, the words in
:mod:`server.report_text`; the sections and the page here.

Every run with plots also writes ``RUN_DIR/report.html`` when it ends (:func:`write_run_report`); a
report that cannot be written is one warning, never a failed run.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from server.compare import (
    CompareError,
    comparison_rows,
    evaluation_note,
    finite_number,
    load_runs,
    plot_comparison,
    run_directories,
)
from server.discovery import DESCRIBE_ALL_UP_TO
from server.report_data import (
    BOOKKEEPING,
    ReportError,
    RunFiles,
    aggregate_curve,
    axis_label,
    baselines,
    described_sites,
    evaluation_metrics,
    read_run,
    site_curves,
)
from server.report_figures import epsilon_figure, metric_figure, partition_figure
from server.report_html import details, element, figure, page, png_file, table, text
from server.report_text import describe_scenario, settings_text

__all__ = ["REPORT_FILE", "ReportError", "build_report", "report_path", "write_report", "write_run_report"]

REPORT_FILE = "report.html"
MAX_TABLE_SITES = 200  # more described sites: the table shows the first ones and says how many are left out
MAX_EXAMPLE_ROUNDS = 12  # more plots/examples/round-*.png: evenly spaced ones, the last included
MAX_ATTACK_PICTURES = 24

log = logging.getLogger("medfed")


# --- sections of one run ---------------------------------------------------------------------------------
def _heading(title: str) -> str:
    return element("h3", text(title))


def scenario_section(run: RunFiles) -> str:
    sentences = element("ul", "".join(element("li", text(sentence)) for sentence in describe_scenario(run.scenario)))
    return _heading("Scenario") + sentences + details("scenario.yaml (resolved)", element("pre", text(run.scenario_text)))


SITE_COLUMNS = ("n_train", "n_val", "label_histogram", "label_distribution", "acquisition", "annotator")


def _site_row(site: str, stats: Mapping[str, Any]) -> list[Any]:
    others = {key: (f"{len(value)} items" if isinstance(value, (list, dict)) else value)
              for key, value in stats.items() if key not in SITE_COLUMNS}
    histogram = stats.get("label_histogram")
    return [site, stats.get("n_train"), stats.get("n_val"), " ".join(map(str, histogram)) if histogram else None,
            settings_text(stats.get("acquisition")) or None, settings_text(stats.get("annotator")) or None,
            settings_text(others) or None]


def sites_section(run: RunFiles) -> str:
    sites = described_sites(run)
    if not sites:
        return _heading("Sites") + element("p", "no partitions.json: the run stopped before discovery", class_="note")
    declared = int((run.scenario.get("partition") or {}).get("clients") or len(sites))
    notes = []
    if len(sites) < declared:
        notes.append(f"partitions.json describes {len(sites)} of {declared} sites: above {DESCRIBE_ALL_UP_TO:,} sites "
                     "a site is described only when it is first sampled.")
    if len(sites) > MAX_TABLE_SITES:
        notes.append(f"The table shows the first {MAX_TABLE_SITES} sites.")
    if "server" in run.partitions:
        notes.append(f"The server's test set: {settings_text(run.partitions['server'])}.")
    rows = [_site_row(site, stats) for site, stats in list(sites.items())[:MAX_TABLE_SITES]]
    columns = ["site", "train", "validation", "label histogram (train)", "acquisition", "annotator", "other"]
    return (_heading("Sites") + element("p", text(f"Partition: {run.partitions.get('kind')}, {len(sites)} sites."))
            + "".join(element("p", text(note), class_="note") for note in notes)
            + figure(partition_figure(sites), "site sizes and label histograms") + table(columns, rows))


def metrics_section(run: RunFiles) -> str:
    figures = []
    loss = aggregate_curve(run.records, "train", "loss")
    if loss:
        figures.append(figure(metric_figure("training loss", "training loss", sites=site_curves(run.records, "train", "loss"),
                                            federated=loss, central={}, baselines=[],
                                            aggregate_label="aggregate (sites' mean, weighted)"),
                              "training loss per site and aggregated"))
    for metric in evaluation_metrics(run):
        png = metric_figure(metric, axis_label(run, metric), sites=site_curves(run.records, "evaluate", metric),
                            federated=aggregate_curve(run.records, "evaluate", metric),
                            central=aggregate_curve(run.records, "central", metric), baselines=baselines(run, metric))
        figures.append(figure(png, f"{metric}{' (primary)' if metric == run.primary else ''}: per site, "
                                   "federated and central evaluation"))
    if not figures:
        return _heading("Metrics") + element("p", "no rounds recorded yet (metrics.jsonl is empty)", class_="note")
    return _heading("Metrics") + "".join(figures)


def privacy_section(run: RunFiles) -> str:
    epsilon = aggregate_curve(run.records, "train", "epsilon")
    if not epsilon:
        return _heading("Privacy") + element("p", "no ε recorded yet", class_="note")
    target = ((run.scenario.get("privacy") or {}).get("params") or {}).get("target_epsilon")
    png = epsilon_figure(sites=site_curves(run.records, "train", "epsilon"), run=epsilon,
                         target=finite_number(target))
    last = [record for record in run.records if record.get("phase") == "train" and "epsilon" in record][-1]
    line = f"ε = {epsilon[max(epsilon)]:.4g} after round {max(epsilon)} (δ {last.get('delta')}, {last.get('accountant')})"
    return _heading("Privacy") + element("p", text(line)) + figure(png, "ε against rounds")


def _evenly_spaced(paths: list[Path], most: int) -> list[Path]:
    if len(paths) <= most:
        return paths
    picks = {round(i * (len(paths) - 1) / (most - 1)) for i in range(most)}
    return [paths[i] for i in sorted(picks)]


def examples_section(run: RunFiles) -> str:
    final = [run.plots / "examples.png"] if (run.plots / "examples.png").is_file() else []
    rounds = sorted((run.plots / "examples").glob("*.png"))
    shown = _evenly_spaced(rounds, MAX_EXAMPLE_ROUNDS)
    shown_names = {"examples.png", *(path.name for path in shown)}
    others = sorted(path for path in run.plots.glob("*.png") if path.name not in shown_names)
    note = (element("p", text(f"{len(shown)} of {len(rounds)} round pictures shown."), class_="note")
            if len(shown) < len(rounds) else "")
    body = "".join(png_file(path, f"examples: {path.stem}") for path in [*final, *shown]) or element(
        "p", "no example pictures in plots/", class_="note")
    other = details(f"the run's other pictures in plots/ ({len(others)})", "".join(map(png_file, others))) if others else ""
    return _heading("Examples") + note + body + other


def attack_section(run: RunFiles) -> str:
    block = (run.summary or {}).get("attack") or {}
    pictures = sorted((run.plots / "attack").glob("*.png"))
    parts = []
    if block:
        about = [(key, block.get(key)) for key in ("kind", "label", "victims", "attackers", "rounds", "headline", "records")]
        parts.append(table(["", "value"], [(key, json.dumps(value) if isinstance(value, list) else value)
                                           for key, value in about]))
        metrics = block.get("metrics") or {}
        parts.append(table(["attack metric (mean over the records)", "value"], list(metrics.items())))
    else:
        parts.append(element("p", "no attack results yet (the run did not finish)", class_="note"))
    parts += [png_file(path) for path in pictures[:MAX_ATTACK_PICTURES]]
    if len(pictures) > MAX_ATTACK_PICTURES:
        parts.append(element("p", text(f"{MAX_ATTACK_PICTURES} of {len(pictures)} pictures shown."), class_="note"))
    return _heading("Attack") + "".join(parts)


def _final_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    final = summary.get("final") or {}
    metrics = list(dict.fromkeys(m for values in final.values() for m in values if m not in BOOKKEEPING))
    rounds = summary.get("final_round") or {}
    return (["phase", "round", *metrics],
            [[phase, rounds.get(phase), *(values.get(m) for m in metrics)] for phase, values in final.items()])


def results_section(run: RunFiles) -> str:
    summary = run.summary
    command = element("p", "Run it again: " + element("code", text(f"medfed run {run.path / 'scenario.yaml'}")))
    if summary is None:
        last = max((int(record["round"]) for record in run.records), default=0)
        resume = element("p", "Continue it: " + element("code", text(f"medfed run --resume {run.path}")))
        return (_heading("Results") + element("p", text(f"not finished: no summary.json; metrics.jsonl goes to round "
                                                        f"{last}."), class_="unfinished") + command + resume)
    columns, rows = _final_rows(summary)
    best = summary.get("best") or {}
    totals = [("rounds completed", summary.get("rounds_completed")), ("seconds", summary.get("seconds")),
              ("MB up", (summary.get("bytes_up") or 0) / 1e6), ("MB down", (summary.get("bytes_down") or 0) / 1e6),
              ("best", f"{best.get('metric')} {best.get('value')} ({best.get('phase')}, round {best.get('round')})"),
              ("ε", summary.get("epsilon")), ("seed", summary.get("seed"))]
    versions = summary.get("versions") or {}
    return (_heading("Results") + table(columns, rows) + table(["", "value"], totals)
            + element("p", text("Versions: " + settings_text(versions))) + command)


def run_section(run: RunFiles, index: int, label: str) -> str:
    """One run's part of the page: its heading, then the sections that apply to it."""
    unfinished = (element("p", "not finished: the run has no summary.json; this is what it wrote so far.",
                          class_="unfinished") if run.summary is None else "")
    parts = [scenario_section(run), sites_section(run), metrics_section(run),
             privacy_section(run) if run.private else "", examples_section(run),
             attack_section(run) if run.scenario.get("attack") else "", results_section(run)]
    heading = element("h2", text(f"{label} — {run.path}"))
    return element("section", heading + unfinished + "".join(parts), id=f"run-{index}")


# --- several runs ----------------------------------------------------------------------------------------
def comparison_section(paths: Sequence[Path]) -> tuple[str, list[str]]:
    """The ``medfed compare`` table, its note and its curves, and each run's label; when the runs cannot be
    compared (e.g. different tasks), one line that says why, and the directory names as labels."""
    try:
        runs = load_runs(paths)
    except CompareError as error:
        return (element("h2", "Comparison") + element("p", text(f"no comparison: {error}"), class_="note"),
                [path.name for path in paths])
    rows = comparison_rows(runs)
    with tempfile.TemporaryDirectory() as folder:
        curves = figure(plot_comparison(runs, Path(folder) / "compare.png").read_bytes(), "the runs' curves")
    body = table(list(rows[0]), [list(row.values()) for row in rows]) + element("p", text(evaluation_note(runs)),
                                                                                class_="note")
    return element("h2", "Comparison") + body + curves, [run.label for run in runs]


def build_report(paths: Sequence[str | Path]) -> str:
    """The HTML page of the run directories ``paths`` (files among them skipped with a warning).

    Raises
    ------
    ReportError
        no run directories, or one that cannot be read.
    """
    directories = run_directories(paths)
    if not directories:
        raise ReportError("no run directories given")
    runs = [read_run(path) for path in directories]
    comparison, labels = comparison_section([run.path for run in runs]) if len(runs) > 1 else ("", [])
    labels = labels or [str(run.scenario.get("name")) for run in runs]
    title = f"medfed report: {labels[0]}" if len(runs) == 1 else f"medfed report: {len(runs)} runs"
    sections = "".join(run_section(run, index, label) for index, (run, label) in enumerate(zip(runs, labels), 1))
    return page(title, element("h1", text(title)) + comparison + sections)


def report_path(out: str | Path | None, run_paths: Sequence[Path]) -> Path:
    """Where the page goes: ``out`` (a folder: :data:`REPORT_FILE` inside it); by default the run's
    directory, or for several runs the deepest folder that holds them all."""
    if out is None:
        folder = run_paths[0] if len(run_paths) == 1 else Path(os.path.commonpath([p.resolve().parent for p in run_paths]))
        return folder / REPORT_FILE
    path = Path(out)
    return path / REPORT_FILE if path.is_dir() or not path.suffix else path


def write_report(paths: Sequence[str | Path], out: str | Path | None = None) -> Path:
    """Write the page of the runs ``paths`` (:func:`build_report`) to :func:`report_path`; returns the path.

    Raises
    ------
    ReportError
        a run cannot be read, or the page cannot be written.
    """
    html = build_report(paths)
    path = report_path(out, run_directories(paths))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html, encoding="utf-8")
    except OSError as error:
        raise ReportError(f"cannot write {path} ({error.strerror or error}); choose --out FILE") from None
    return path


def write_run_report(run_dir: str | Path) -> Path | None:
    """``RUN_DIR/report.html`` at the end of a run; a failure is one warning, never the run's failure."""
    try:
        return write_report([run_dir])
    except Exception as error:  # the run's results are on disk already; the page is a convenience
        log.warning("no report.html for %s: %s", run_dir, error)
        return None
