"""``python -m benchmarks.results``: run the commands of every result table in ``docs/results.md``, print the tables.

    python -m benchmarks.results                          # every table: about 50 runs, about 25 minutes on 2 cores
    python -m benchmarks.results --only ct,central-dp     # some tables
    python -m benchmarks.results --out runs/results       # where the runs go (default: benchmarks/results/runs)

Each row of a table is one ``medfed`` command, run as the table shows it plus ``--set output.dir=OUT/<row's
folder>``; rows that show the same command share one run. A run that already finished in ``OUT`` (its
``summary.json`` is there and its command exited 0) is read again, not repeated, so an interrupted benchmark
continues where it stopped. The cells come from each run's ``summary.json`` and ``metrics.jsonl``, read with
:mod:`server.results` and :mod:`server.compare` (completed rounds, megabytes, the round a target was reached);
then the library versions, the commit and the machine. The Markdown also goes to ``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.performance.common import ROOT, child_environment, environment, python_command, set_arguments
from server.compare import RunView, comparison_rows, load_run
from server.results import RunDirectory

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "runs"
RECEIPT = "command.json"  # next to a row's runs: the command, its exit code, wall time and the commit it ran at
LOG = "medfed.log"  # the command's output
METRIC_NAMES = {"dice": "Dice", "psnr": "PSNR", "auc": "AUC", "accuracy": "accuracy"}
VERSIONED = ("torch", "flwr", "opacus", "monai", "scikit-learn")

log = logging.getLogger("benchmarks.results")


# --- what a table holds ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    """One row: a label, the command that produced it, and who it is compared with.

    Attributes
    ----------
    label : str
        The first cell.
    command : str
        The ``medfed run`` command as the table shows it.
    versus : str
        Rows of one table with the same ``versus`` are compared together (``medfed compare``): their
        "reached" cell uses one evaluation for all of them. Empty: compared with nothing.
    target : float | None
        The value of the primary metric the "reached" cell looks for.
    note : str
        Shown after the command (e.g. an extra to install).
    """

    label: str
    command: str
    versus: str = ""
    target: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Measured:
    """A row's finished run, as the cells read it."""

    row: Row
    run: RunView
    summary: dict[str, Any]
    wall: float | None  # seconds the command took, interpreter start-up included
    compared: dict[str, Any]  # this run's row of :func:`server.compare.comparison_rows` among its ``versus``


Cell = Callable[[Measured], str]


@dataclass(frozen=True)
class Table:
    """A named table (``--only`` NAME): a title, the label's header, the columns between label and command."""

    name: str
    title: str
    label: str
    columns: tuple[tuple[str, Cell], ...]
    rows: tuple[Row, ...]


# --- cells -------------------------------------------------------------------------------------------------
def number(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals, an em dash when missing."""
    return "—" if value is None else f"{value:.{digits}f}"


def final_value(measured: Measured, phase: str, metric: str) -> float | None:
    """The ``metric`` of ``phase`` (train, evaluate, central) in the run's last record of that phase."""
    value = ((measured.summary.get("final") or {}).get(phase) or {}).get(metric)
    return float(value) if isinstance(value, (int, float)) else None


def central_or_evaluate(measured: Measured, metric: str) -> float | None:
    """The final central ``metric``, or the sites' (federated evaluation) where the run has no central one."""
    central = final_value(measured, "central", metric)
    return central if central is not None else final_value(measured, "evaluate", metric)


def final_pair(metric: str, digits: int = 3, unit: str = "") -> Cell:
    """``evaluate / central`` of ``metric`` after the last round."""
    suffix = f" {unit}" if unit else ""
    return lambda m: (f"{number(final_value(m, 'evaluate', metric), digits)} / "
                      f"{number(final_value(m, 'central', metric), digits)}{suffix}")


def first_round_pair(metric: str) -> Cell:
    """``evaluate / central`` of ``metric`` after round 1 (an em dash where the run did not evaluate then)."""
    return lambda m: (f"{number(m.run.curve('evaluate', metric).get(1))} / "
                      f"{number(m.run.curve('central', metric).get(1))}")


def with_balanced_accuracy(cell: Cell) -> Cell:
    """``cell`` followed by the final balanced accuracy (central, else federated)."""
    return lambda m: f"{cell(m)} (balanced accuracy {number(central_or_evaluate(m, 'balanced_accuracy'), 2)})"


def central(metric: str, digits: int = 3) -> Cell:
    """The final central ``metric``."""
    return lambda m: number(final_value(m, "central", metric), digits)


def ssim_gain(m: Measured) -> str:
    """Central SSIM of the FBP input → of the network's output."""
    return f"{number(final_value(m, 'central', 'ssim_fbp'))} → {number(final_value(m, 'central', 'ssim'))}"


def engine(m: Measured) -> str:
    """The engine and, where it starts workers, how many."""
    backend, workers = m.run.settings.get("engine.backend"), m.run.settings.get("engine.workers")
    return f"{backend}, {workers} workers" if backend != "inprocess" and workers else str(backend)


def rounds(m: Measured) -> str:
    """The last completed round."""
    return str(m.compared["rounds"])


def run_time(m: Measured) -> str:
    """``seconds`` of ``summary.json``; with the command's wall time where the engine starts processes."""
    wall = f" ({m.wall:.0f} s wall)" if m.wall is not None and m.run.settings.get("engine.backend") != "inprocess" else ""
    return f"{m.summary['seconds']:.0f} s{wall}"


def strategy(m: Measured) -> str:
    """The strategy's name."""
    return m.run.strategy


def primary_final(m: Measured) -> str:
    """The primary metric, named, ``evaluate / central``; MIL adds balanced accuracy and localisation, a run
    without central evaluation each site's own value."""
    text = f"{METRIC_NAMES.get(m.run.primary, m.run.primary)} {final_pair(m.run.primary)(m)}"
    if m.run.primary == "auc":
        text += (f", balanced accuracy {number(central_or_evaluate(m, 'balanced_accuracy'), 2)}, "
                 f"localisation {number(central_or_evaluate(m, 'attention_auc'), 2)}")
    if final_value(m, "central", m.run.primary) is None:
        text += f" (per site {site_values(m)})"
    return text


def site_values(m: Measured) -> str:
    """Each site's primary metric in the run's last federated evaluation, by partition id."""
    last = [record for record in m.run.records if record.get("phase") == "evaluate"][-1:]
    sites = (last[0].get("clients") or {}) if last else {}
    return ", ".join(number(sites[pid].get(m.run.primary)) for pid in sorted(sites, key=int))


def reached(m: Measured) -> str:
    """The round (and megabytes up + down until then) at which the run first reached its row's target."""
    target = m.row.target
    if target is None:
        return "—"
    key = next(key for key in m.compared if key.startswith("rounds to "))
    phase = "central" if key.endswith("(central)") else "federated"
    goal = f"{phase} {METRIC_NAMES.get(m.run.primary, m.run.primary)} {'≥' if m.run.higher_is_better else '≤'} {target:g}"
    at = m.compared[key]
    if at is None:
        return f"never {goal} in {m.compared['rounds']} rounds"
    return f"{goal} at round {at} ({m.compared[key.replace('rounds to', 'MB to', 1)]:.0f} MB)"


def megabytes(m: Measured) -> str:
    """Megabytes sent down and up over the run."""
    return f"{m.compared['MB']:.0f}"


def epsilon(m: Measured) -> str:
    """The run's ε; NbAFL's formula ε with the RDP-accounted ε of its uplink and broadcast noise."""
    if m.run.epsilon is None:
        return "—"
    privacy = m.summary.get("privacy") or {}
    if "epsilon_rdp_uplink" in privacy:
        return (f"{m.run.epsilon:.0f} (formula; RDP: uplink {privacy['epsilon_rdp_uplink']:.1f}, "
                f"broadcast {privacy['epsilon_rdp_broadcast']:.1f})")
    return f"{m.run.epsilon:.2f}"


def train_loss(m: Measured) -> str:
    """The training loss of the last round (mean over the sites)."""
    value = final_value(m, "train", "loss")
    return "—" if value is None else f"{value:.3g}"


def noise_multiplier(m: Measured) -> str:
    """z, the noise multiplier of client-level central DP (an em dash without it)."""
    value = (m.summary.get("privacy") or {}).get("noise_multiplier")
    return "—" if value is None else f"{value:.2f}"


# --- the tables --------------------------------------------------------------------------------------------
def medfed(scenario: str, *arguments: str) -> str:
    """``medfed run scenarios/SCENARIO.yaml ARGUMENTS``, an argument the shell would split in double quotes."""
    words = ["medfed", "run", f"scenarios/{scenario}.yaml", *arguments]
    return " ".join(word if shlex.quote(word) == word else f'"{word}"' for word in words)


def inprocess(scenario: str, *arguments: str) -> str:
    """:func:`medfed` with ``--engine inprocess``."""
    return medfed(scenario, "--engine", "inprocess", *arguments)


NO_PRIVACY = ("--set", "privacy.mechanism=none", "--set", "privacy.params={}")
SMALL_SITES = ("--set", "data.samples_per_client=64")  # 48 training slices per site, as in the DP-SGD runs
SGD_AS_FOR_SCAFFOLD = ("--set", "local.optimizer=sgd", "--set", "local.lr=0.02")


def central_dp(epsilon: int) -> tuple[str, ...]:
    """``--set`` client-level central DP with clip 1 and target ε ``epsilon``."""
    return "--set", f"privacy.params={{clip: 1.0, target_epsilon: {epsilon}}}"


RUN_TIME = ("run time", run_time)
ROUNDS = ("rounds", rounds)
TABLES = (
    Table("segmentation", "Segmentation", "scenario", (
        ("engine", engine), ROUNDS, ("round-1 Dice (evaluate / central)", first_round_pair("dice")),
        ("final Dice (evaluate / central)", final_pair("dice")), RUN_TIME), (
        Row("quickstart (feature skew, 4 sites)", medfed("quickstart")),
        Row("seg-iid (4 sites)", inprocess("seg-iid")),
        Row("seg-label-skew (5 sites, α = 0.3)", inprocess("seg-label-skew")),
        Row("seg-concept-shift (4 annotator styles)", inprocess("seg-concept-shift")),
        Row("seg-quantity-skew (6 sites, power law, half sampled)", inprocess("seg-quantity-skew")),
        Row("seg-feature-skew-silobn (BN statistics local)", inprocess("seg-feature-skew-silobn")),
        Row("seg-centralized (quickstart's sites, data pooled)", inprocess("seg-centralized")),
        Row("seg-local-only (quickstart's sites, each alone; central: mean of 4 site models)",
            inprocess("seg-local-only")))),
    Table("ct", "CT reconstruction", "CT scenario", (
        ("engine", engine), ROUNDS, ("FBP PSNR (evaluate / central)", final_pair("psnr_fbp", 2, "dB")),
        ("final PSNR (evaluate / central)", final_pair("psnr", 2, "dB")), ("SSIM central (FBP → net)", ssim_gain),
        RUN_TIME), (
        Row("ct-iid (4 sites, 30 views, I0 = 1e5, FBPConvNet)", inprocess("ct-iid")),
        Row("ct-feature-skew (scanners differ)", inprocess("ct-feature-skew")),
        Row("ct-label-skew (anatomy mix, α = 0.3)", inprocess("ct-label-skew")),
        Row("ct-concept-shift (smoothed references)", inprocess("ct-concept-shift")),
        Row("ct-quantity-skew (power law)", inprocess("ct-quantity-skew")),
        Row("ct-centralized (ct-feature-skew's sites, data pooled)", inprocess("ct-centralized")),
        Row("ct-local-only (ct-feature-skew's sites, each alone; mean of 4 site models)", inprocess("ct-local-only")),
        Row("ct-real-demo (3 sites, patches of pydicom's real CT slices)", inprocess("ct-real-demo")))),
    Table("mil", "Multiple-instance learning", "MIL scenario", (
        ("engine", engine), ROUNDS, ("round-1 bag AUC (evaluate / central)", first_round_pair("auc")),
        ("final bag AUC (evaluate / central)", with_balanced_accuracy(final_pair("auc"))),
        ("attention localisation AUC (central)", central("attention_auc")), RUN_TIME), (
        Row("mil-iid (4 sites)", inprocess("mil-iid")),
        Row("mil-label-skew (4 sites, Dirichlet 0.5, gated attention)", inprocess("mil-label-skew")),
        Row("mil-feature-skew (stain, brightness, blur)", inprocess("mil-feature-skew")),
        Row("mil-concept-shift (labelling thresholds)", inprocess("mil-concept-shift")),
        Row("mil-quantity-skew (power law)", inprocess("mil-quantity-skew")),
        Row("mil-label-skew-balanced (class-balanced loss, 20 rounds)", inprocess("mil-label-skew-balanced")),
        Row("mil-centralized (mil-label-skew's sites, data pooled)", inprocess("mil-centralized")),
        Row("mil-local-only (mil-label-skew's sites, each alone; mean of 4 site models)", inprocess("mil-local-only")),
        Row("mil-ihc-demo (real IHC tiles, 4 stain-shifted sites)", inprocess("mil-ihc-demo"),
            note='(needs `pip install -e ".[ihc]"`)'))),
    Table("strategies", "Strategies compared", "scenario", (
        ("strategy", strategy), ROUNDS, ("final primary metric (evaluate / central)", primary_final),
        ("reached", reached), ("MB", megabytes), RUN_TIME), (
        Row("seg-iid", inprocess("seg-iid"), "seg-iid", 0.7),
        Row("seg-iid-fedsgd (η = 0.5, full-batch gradients)", inprocess("seg-iid-fedsgd"), "seg-iid", 0.7),
        Row("seg-feature-skew-fedavg", inprocess("seg-feature-skew-fedavg"), "seg-feature-skew"),
        Row("seg-feature-skew-fedbn", inprocess("seg-feature-skew-fedbn"), "seg-feature-skew"),
        Row("seg-centralized", inprocess("seg-centralized"), "seg-feature-skew"),
        Row("seg-local-only", inprocess("seg-local-only"), "seg-feature-skew"),
        Row("mil-label-skew (Adam)", inprocess("mil-label-skew"), "mil-label-skew", 0.9),
        Row("mil-label-skew-balanced (class-balanced loss)", inprocess("mil-label-skew-balanced"), "mil-label-skew",
            0.9),
        Row("mil-label-skew, SGD as for SCAFFOLD", inprocess("mil-label-skew", *SGD_AS_FOR_SCAFFOLD),
            "mil-label-skew", 0.9),
        Row("mil-label-skew-scaffold (option II, SGD)", inprocess("mil-label-skew-scaffold"), "mil-label-skew", 0.9),
        Row("mil-label-skew-pfedhn (central: mean of site models)", inprocess("mil-label-skew-pfedhn"),
            "mil-label-skew", 0.9),
        Row("mil-centralized", inprocess("mil-centralized"), "mil-label-skew", 0.9),
        Row("mil-local-only", inprocess("mil-local-only"), "mil-label-skew", 0.9),
        Row("mil-concept-shift", inprocess("mil-concept-shift"), "mil-concept-shift", 0.9),
        Row("mil-concept-shift-pfedhn", inprocess("mil-concept-shift-pfedhn"), "mil-concept-shift", 0.9),
        Row("mil-feature-skew", inprocess("mil-feature-skew"), "mil-feature-skew", 0.9),
        Row("mil-feature-skew-fedbn (`norm: batch`)", inprocess("mil-feature-skew-fedbn"), "mil-feature-skew",
            0.9))),
    Table("privacy", "Privacy", "run", (
        ("final Dice (evaluate / central)", final_pair("dice")), ("ε (δ = 1e-5)", epsilon), RUN_TIME), (
        Row("seg-dp-eps8 (DP-SGD, target ε 8, clip 1.0)", medfed("seg-dp-eps8")),
        Row("the same without privacy", medfed("seg-dp-none")),
        Row("seg-nbafl (NbAFL, ε = 50, C = 15, FedProx μ = 0.01, 400 slices per site, 5 rounds)",
            inprocess("seg-nbafl")),
        Row("seg-nbafl at ε = 30", inprocess("seg-nbafl", "--set", "privacy.params.epsilon=30")),
        Row("the same without privacy", inprocess("seg-nbafl", *NO_PRIVACY)),
        Row("seg-nbafl with 48 training slices per site", inprocess("seg-nbafl", *SMALL_SITES)),
        Row("the same at ε = 1000", inprocess("seg-nbafl", *SMALL_SITES, "--set", "privacy.params.epsilon=1000")))),
    Table("protection-segmentation", "Protection levels on segmentation", "run", (
        ("final Dice (evaluate / central)", final_pair("dice")), ("final train loss", train_loss), RUN_TIME), (
        Row("no privacy", medfed("seg-dp-none")),
        Row("ε = 32", medfed("seg-dp-eps32")),
        Row("ε = 8", medfed("seg-dp-eps8")),
        Row("ε = 2", medfed("seg-dp-eps2")))),
    Table("protection-tabular", "Protection levels, 50 tabular sites", "run", (
        ("final accuracy (evaluate / central)", final_pair("accuracy")), ("final train loss", train_loss),
        RUN_TIME), (
        Row("no privacy", inprocess("tabular-dp-none")),
        Row("ε = 16", inprocess("tabular-dp-eps16")),
        Row("ε = 4", inprocess("tabular-dp-eps4")),
        Row("ε = 1", inprocess("tabular-dp-eps1")))),
    Table("central-dp", "Client-level central DP", "run", (
        ("final accuracy (evaluate / central)", final_pair("accuracy")), ("z", noise_multiplier), RUN_TIME), (
        Row("no privacy", medfed("tabular-central-dp", *NO_PRIVACY)),
        Row("ε = 16", medfed("tabular-central-dp", *central_dp(16))),
        Row("ε = 4", medfed("tabular-central-dp")),
        Row("ε = 1", medfed("tabular-central-dp", *central_dp(1))),
        Row("50 sites all training (q = 1), ε = 16",
            medfed("tabular-dp-eps4", "--set", "privacy.mechanism=central", *central_dp(16))),
        Row("50 sites all training (q = 1), ε = 4",
            medfed("tabular-dp-eps4", "--set", "privacy.mechanism=central", *central_dp(4))))),
)


# --- running -----------------------------------------------------------------------------------------------
def folder_name(command: str) -> str:
    """The folder of ``command``'s runs under ``--out``: its arguments after ``scenarios/``, as a file name
    (``seg-iid-engine-inprocess``)."""
    text = command.removeprefix("medfed run ").removeprefix("scenarios/").replace(".yaml", "").replace("--", "")
    return re.sub(r"[^A-Za-z0-9._=]+", "-", text).strip("-")


def finished_run(folder: Path) -> Path | None:
    """The newest run directory under ``folder`` that finished (has ``summary.json``) by a command that exited 0."""
    if receipt(folder).get("returncode") != 0:
        return None
    runs = sorted(folder.glob("*/*/summary.json"), key=lambda path: path.stat().st_mtime)
    return runs[-1].parent if runs else None


def run_command(command: str, folder: Path) -> None:
    """Run ``command`` (``medfed ...``) with its runs under ``folder``; its output goes to ``folder/medfed.log``,
    its exit code, wall time and the commit to ``folder/command.json``."""
    arguments = shlex.split(command)
    if arguments[0] != "medfed":
        raise ValueError(f"not a medfed command: {command}")
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(folder / LOG, "w", encoding="utf-8") as output:
        returncode = subprocess.run([*python_command("server.cli", *arguments[1:]),
                                     *set_arguments([f"output.dir={folder}"])], cwd=ROOT, env=child_environment(),
                                    stdout=output, stderr=subprocess.STDOUT, check=False).returncode
    receipt = {"command": command, "returncode": returncode, "wall_seconds": time.perf_counter() - started,
               "commit": environment()["commit"]}
    (folder / RECEIPT).write_text(json.dumps(receipt, indent=2) + "\n")


def ensure_runs(tables: Sequence[Table], out: Path) -> dict[str, Path]:
    """Command → its finished run directory, for every command of ``tables``: reused from ``out`` where one
    finished there, else run now, one after the other. A command that fails is left out (its log says why)."""
    commands = list(dict.fromkeys(row.command for table in tables for row in table.rows))
    runs: dict[str, Path] = {}
    for index, command in enumerate(commands, start=1):
        folder = out / folder_name(command)
        run = finished_run(folder)
        if run is None:
            log.info("[%d/%d] %s", index, len(commands), command)
            run_command(command, folder)
            run = finished_run(folder)
        if run is None:
            log.info("[%d/%d] failed: see %s", index, len(commands), folder / LOG)
        else:
            runs[command] = run
    return runs


# --- reading -----------------------------------------------------------------------------------------------
def measure(table: Table, runs: dict[str, Path]) -> dict[Row, Measured]:
    """Every row of ``table`` whose command has a run, read and compared with the rows of its ``versus``."""
    views = {row: load_run(runs[row.command]) for row in table.rows if row.command in runs}
    groups: dict[tuple[str, float | None], list[Row]] = {}
    for row in views:
        groups.setdefault((row.versus or row.command, row.target), []).append(row)
    measured = {}
    for (_, target), rows in groups.items():
        compared = comparison_rows([views[row] for row in rows], target)
        for row, cells in zip(rows, compared):
            summary = RunDirectory.open(runs[row.command]).read_summary() or {}
            measured[row] = Measured(row, views[row], summary, wall_seconds(runs[row.command]), cells)
    return measured


def receipt(folder: Path) -> dict[str, Any]:
    """What :func:`run_command` noted in ``folder`` (a row's folder, two above its run directories); ``{}``: nothing."""
    path = folder / RECEIPT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def wall_seconds(run: Path) -> float | None:
    """The wall time of the command that made the run directory ``run``."""
    return receipt(run.parent.parent).get("wall_seconds")


def markdown(table: Table, measured: dict[Row, Measured]) -> str:
    """``table`` as Markdown, after its title; a row without a finished run says so."""
    headers = [table.label, *(header for header, _ in table.columns), "command"]
    lines = [f"**{table.title}** (`--only {table.name}`)", "", "| " + " | ".join(headers) + " |",
             "|" + "---|" * len(headers)]
    for row in table.rows:
        found = measured.get(row)
        cells = ([cell(found) for _, cell in table.columns] if found is not None
                 else ["no finished run", *("—" for _ in table.columns[1:])])
        command = f"`{row.command}`" + (f" {row.note}" if row.note else "")
        lines.append("| " + " | ".join([row.label, *cells, command]) + " |")
    return "\n".join(lines)


def versions(runs: Iterable[Path]) -> str:
    """The line of library versions, commit and machine the tables were measured with; the commits the ``runs``
    were made at where they are not (all) this one."""
    env = environment()
    libraries = ", ".join(f"{name} {_version(name)}" for name in VERSIONED)
    made = list(dict.fromkeys(str(receipt(run.parent.parent).get("commit")) for run in runs))
    runs_at = f" (runs made at {', '.join(made)})" if made and made != [env["commit"]] else ""
    return (f"Python {platform.python_version()}, {libraries}; commit {env['commit']}{runs_at}; "
            f"{env['processor']}, {env['usable_cpus']} CPUs")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def report(tables: Sequence[Table], runs: dict[str, Path]) -> str:
    """Every table as Markdown, then the versions line."""
    parts = [markdown(table, measure(table, runs)) for table in tables]
    parts.append(f"Measured with {versions(runs.values())}.")
    return "\n\n".join(parts) + "\n"


# --- the command line --------------------------------------------------------------------------------------
def chosen_tables(text: str) -> list[Table]:
    """The tables named in ``text`` (comma-separated).

    Raises
    ------
    argparse.ArgumentTypeError
        An unknown name, with the known ones.
    """
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = {table.name: table for table in TABLES}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown table {', '.join(unknown) or '(none given)'} "
                                         f"(known: {', '.join(known)})")
    return [known[name] for name in names]


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or reuse) the chosen tables' commands, print the tables; 1 when a command failed."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.results", description=__doc__.splitlines()[0])
    parser.add_argument("--only", type=chosen_tables, default=list(TABLES), metavar="NAME[,NAME]",
                        help=f"tables to run, of {', '.join(table.name for table in TABLES)} (default: all)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of the runs (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    runs = ensure_runs(args.only, args.out)
    text = report(args.only, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text, encoding="utf-8")
    print(text)
    commands = {row.command for table in args.only for row in table.rows}
    return 0 if commands <= runs.keys() else 1


if __name__ == "__main__":
    sys.exit(main())
