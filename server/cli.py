"""The ``medfed`` command.

    medfed run SCENARIO.yaml [--set key.path=value ...] [--engine inprocess|processes|simulation]
    medfed run SCENARIO.yaml [--set key.path=value ...] --engine deployment --federation NAME
    medfed run --resume RUN_DIR [--set strategy.rounds=N] [--engine deployment --federation NAME]
    medfed validate|list|show|init ...   (scenario files, not run; see server/scenario_commands.py)
    medfed compare RUN_DIR ... [--target VALUE] [--out FILE|DIR] [--markdown]
    medfed report RUN_DIR [RUN_DIR ...] [--out FILE]   (one HTML page; see server/report.py)
    medfed sweep SCENARIO.yaml [--set K=V ...] --grid KEY=V1,V2 [--grid ...] [--seeds 0,1,2] [--engine E]
                 [--out DIR] [--dry-run]   (see server/sweep.py and server/sweep_report.py)
    medfed evaluate RUN_DIR [--data FOLDER] [--model best|last] [--site K] [--json]
    medfed predict RUN_DIR INPUT OUTPUT [--model best|last] [--site K]   (see server/use_model.py)
    medfed deploy init|commands|register|status NAME ...   (see server/deploy.py)
    medfed superlink stop   (the local SuperLink `flwr run .` left running; see server/local_superlink.py)
    medfed --version

``-v``/``--verbose`` (debug logging) goes before or after the command: ``medfed -v run s.yaml`` is
``medfed run s.yaml -v``.

Exit codes: 0 success, 1 a run failed (one line says why; for a sweep: a cell failed), 2 invalid input
(scenario, option or file), 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, NoReturn, TextIO

from server.exits import EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, EXIT_RUN_FAILED
from server.exits import fail as _fail
from server.scenario_commands import add_scenario_commands

if TYPE_CHECKING:  # pragma: no cover
    from server.results import RunDirectory
    from server.scenario import Scenario

THREAD_GRACE_SECONDS = 3.0  # how long the command waits, on its way out, for threads an engine left behind
ROUNDS_KEY = "strategy.rounds"  # the one key a resumed run may change (more rounds for a finished run)
DEPLOYED_ROUND_TIMEOUT_HINT = 600  # seconds: above it, a deployed run is told a hung hospital would stall it

log = logging.getLogger("medfed")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``medfed`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("medfed: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # output piped into a reader that stopped (``| head``): not an error
        sys.stdout = open(os.devnull, "w")
        return EXIT_OK


def console_main() -> NoReturn:
    """The ``medfed`` console script: :func:`main`, then :func:`leave` with its exit code.

    A Ctrl-C that reaches past :func:`main` (a library re-raising one it deferred) still ends with one line.
    """
    try:
        code = main()
    except KeyboardInterrupt:
        print("medfed: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    leave(code)


def leave(code: int, grace: float = THREAD_GRACE_SECONDS) -> NoReturn:
    """Exit with ``code``, even when an engine left a thread that can never finish.

    After Ctrl-C (or an engine failure) on the simulation engine, Flower's worker threads can stay
    blocked in ``ray.get`` on actors that are gone; Python's exit would wait for them forever. By then
    the run directory is complete (its files are written atomically) and the one-line report printed, so
    after ``grace`` seconds the process ends without them (``os._exit``, output flushed first).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the last line is printed: a further Ctrl-C changes nothing
    deadline = time.monotonic() + grace
    for thread in _waited_threads():
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in _waited_threads()):
        log.debug("leaving %d engine threads behind", len(_waited_threads()))
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(code)
    sys.exit(code)


def _waited_threads() -> list[threading.Thread]:
    """The live threads Python's exit would wait for (non-daemon ones, including thread-pool workers)."""
    return [thread for thread in threading.enumerate()
            if thread is not threading.main_thread() and not thread.daemon and thread.is_alive()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfed", description="Federated learning simulations for medical imaging.")
    parser.add_argument("--version", action=_VersionAction, help="print the versions of medfed, its main libraries "
                                                                  "and Python, and exit")
    _add_verbose(parser, default=False)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run a scenario and write a run directory")
    run.add_argument("scenario", nargs="?", help="scenario YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a scenario key, e.g. --set strategy.rounds=5 (repeatable)")
    run.add_argument("--engine", choices=["processes", "simulation", "inprocess", "deployment"],
                     help="override engine.backend")
    run.add_argument("--federation", metavar="NAME",
                     help="with --engine deployment: the federation (medfed deploy init) to run on")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    run.set_defaults(handler=_run)

    add_scenario_commands(commands)

    compare = commands.add_parser("compare", help="table and curves of several runs side by side")
    compare.add_argument("runs", nargs="+", help="run directories (e.g. runs/seg-iid/* runs/seg-local-only/*)")
    compare.add_argument("--target", type=float, help="also report rounds and MB until the primary metric reaches this")
    compare.add_argument("--out", metavar="FILE|DIR",
                         help="where to draw the curves: a file, or a folder to hold compare.png (created if missing; "
                              "default: compare.png in the deepest folder that holds every run)")
    compare.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    compare.set_defaults(handler=_compare)

    report = commands.add_parser("report", help="one self-contained HTML page of one run, or of several side by side")
    report.add_argument("runs", nargs="+", help="run directories")
    report.add_argument("--out", metavar="FILE", help="the page (default: RUN_DIR/report.html; for several runs, "
                                                       "report.html in the deepest folder that holds them all)")
    report.set_defaults(handler=_report)

    _add_sweep_parser(commands)
    _add_model_parsers(commands)
    _add_deploy_parser(commands)
    _accept_verbose_after_commands(parser)
    return parser


class _VersionAction(argparse.Action):
    """``--version``: print :func:`server.scaffold.version_line` on stdout and exit 0 (looked up only when asked)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        from server.scaffold import version_line

        print(version_line())
        parser.exit(EXIT_OK)


def _add_verbose(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug logging (Flower and client details)")


def _accept_verbose_after_commands(parser: argparse.ArgumentParser) -> None:
    """Give every command's parser, nested ones included (``deploy init``), the ``-v`` of the main parser.

    Its default is left out (``SUPPRESS``), so a command's parser sets ``verbose`` only when ``-v`` follows the
    command and ``medfed -v run s.yaml`` stays verbose.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in dict.fromkeys(action.choices.values()):  # once each, aliases or not
                _add_verbose(command, default=argparse.SUPPRESS)
                _accept_verbose_after_commands(command)


def _add_sweep_parser(commands: argparse._SubParsersAction) -> None:
    """``medfed sweep``: one run per cell of a grid of settings × seeds (:mod:`server.sweep`)."""
    sweep = commands.add_parser(
        "sweep", help="run a scenario over a grid of settings and seeds; tables and a privacy/utility plot",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run SCENARIO once per cell of the Cartesian product of every --grid and the seeds, one\n"
                    "after the other, each into its own run directory in the sweep folder; then write\n"
                    "sweep.json, sweep.csv, sweep.md and privacy_utility.png there and print the table.\n"
                    "Every cell is validated before the first one runs. A failed cell is recorded and the\n"
                    "sweep goes on (exit 1).",
        epilog="examples:\n"
               "  medfed sweep s.yaml --grid local.lr=0.01,0.1 --grid defense.norm_bound=null,1.0,0.1\n"
               "  medfed sweep s.yaml --set privacy.mechanism=dpsgd --grid privacy.params.target_epsilon=1,4,16 "
               "--seeds 0,1,2")
    sweep.add_argument("scenario", help="scenario YAML file")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a scenario key in every cell, as for medfed run (repeatable)")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                       help="a key and its values, one cell each; values are parsed like --set values (YAML: null, "
                            "0.1, adam, {mechanism: none}); commas inside [...] or {...} belong to the value (repeatable, one "
                            "--grid per key)")
    sweep.add_argument("--seeds", metavar="S1,S2", help="run every cell with each of these seeds "
                                                        "(default: the scenario's seed)")
    sweep.add_argument("--engine", choices=["processes", "simulation", "inprocess"],
                       help="override engine.backend of every cell")
    sweep.add_argument("--out", metavar="DIR", help="the sweep folder, new or empty "
                                                    "(default: <output.dir>/<name>-sweep-<YYYYmmdd-HHMMSS>)")
    sweep.add_argument("--dry-run", action="store_true", help="validate and list the cells; run nothing")
    sweep.set_defaults(handler=_sweep)


def _add_model_parsers(commands: argparse._SubParsersAction) -> None:
    """``evaluate`` and ``predict``: use a run's trained model (see server/use_model.py)."""
    evaluate = commands.add_parser("evaluate", help="score a run's trained model on its test set or on a data folder")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    evaluate.add_argument("--data", metavar="FOLDER",
                          help="evaluate on this folder (the layout of one site's folder) instead of the run's test set")
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_model_choice(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    predict = commands.add_parser("predict", help="apply a run's trained model to new inputs")
    predict.add_argument("run_dir", metavar="RUN_DIR", help="a run directory")
    predict.add_argument("input", metavar="INPUT", help="a file or folder of inputs, as the task reads them")
    predict.add_argument("output", metavar="OUTPUT", help="folder for the outputs (created if missing)")
    _add_model_choice(predict)
    predict.set_defaults(handler=_predict)


def _add_model_choice(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="which", choices=["best", "last"], default="best",
                        help="checkpoints/model_best.pt (default) or model_last.pt")
    parser.add_argument("--site", type=int, metavar="K",
                        help="site K's own model (strategies with a model per site: FedBN, FedPer, pFedHN, local)")


def _add_deploy_parser(commands: argparse._SubParsersAction) -> None:
    """``medfed deploy init|commands|register|status``: set up and watch a federation (:mod:`server.deploy`)."""
    deploy = commands.add_parser("deploy", help="set up a SuperLink and one SuperNode per hospital (TLS, registration)")
    actions = deploy.add_subparsers(dest="deploy_action", required=True)
    init = actions.add_parser("init", help="write a federation folder: CA, server certificate, hospital keys")
    init.add_argument("name", help="federation name (also the Flower CLI connection name)")
    init.add_argument("--address", action="append", default=[], metavar="HOST:PORT",
                      help="the SuperLink's address as the hospitals reach it (repeatable: several names, one port)")
    hospitals = init.add_mutually_exclusive_group()
    hospitals.add_argument("--hospitals", type=int, metavar="N", help="N hospitals named hospital-0 ... hospital-N-1")
    hospitals.add_argument("--hospital", action="append", metavar="NAME",
                           help="one hospital (repeatable; partition ids follow the order)")
    init.add_argument("--dir", help="federation folder (default: ~/.medfed/deploy/NAME, or $MEDFED_DEPLOY_HOME/NAME)")
    init.add_argument("--force", action="store_true", help="replace an existing federation (new CA and keys)")
    for action, help_text in (("commands", "print the start commands for the SuperLink and every hospital"),
                              ("register", "register every hospital's public key at the running SuperLink"),
                              ("status", "which hospitals are online (exit 0 only if all are)")):
        parser = actions.add_parser(action, help=help_text)
        parser.add_argument("name", help="federation name, or the path of a federation folder")
    deploy.set_defaults(handler=_deploy)
    superlink = commands.add_parser("superlink", help="the local SuperLink that `flwr run .` starts in the background")
    superlink_actions = superlink.add_subparsers(dest="superlink_action", required=True)
    superlink_actions.add_parser("stop", help="stop this FLWR_HOME's local SuperLink (and no other)")
    superlink.set_defaults(handler=_superlink)


def _configure_logging(verbose: bool) -> None:
    """medfed's own lines on stderr (through rich on a terminal, so they don't tear the progress bar).

    Flower, Ray and other libraries only show errors unless ``--verbose``.
    """
    from rich.console import Console
    from rich.logging import RichHandler

    global _CONSOLE
    _CONSOLE = Console(stderr=True)
    if _CONSOLE.is_terminal:
        handler: logging.Handler = RichHandler(console=_CONSOLE, show_time=False, show_path=False, markup=False)
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
    medfed_log = logging.getLogger("medfed")
    medfed_log.handlers[:] = [handler]
    medfed_log.setLevel(logging.DEBUG if verbose else logging.INFO)
    medfed_log.propagate = False
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)
    import flwr.supercore.logger  # noqa: F401 - it sets its logger's level when imported; set ours after

    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.DEBUG if verbose else logging.ERROR)
    flwr_log.propagate = False


_CONSOLE = None


class _StderrHandler(logging.StreamHandler):
    """A stream handler that writes to whatever ``sys.stderr`` is now (not the one it was created with)."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass


def _run(args: argparse.Namespace) -> int:
    from server import scenario as scenario_module
    from server.results import RunDirectory, RunDirectoryError

    if (args.engine == "deployment") != bool(args.federation):
        return _fail("--engine deployment and --federation NAME go together", EXIT_INVALID)
    if args.resume:
        return _resume(args)
    if args.federation:
        return _run_deployed(args)
    if not args.scenario:
        return _fail("run needs a scenario file (or --resume RUN_DIR)", EXIT_INVALID)
    try:
        scenario = scenario_module.load(args.scenario, [*args.overrides, *_engine_override(args.engine)])
    except scenario_module.ScenarioError as error:
        return _fail(str(error), EXIT_INVALID)
    refused = _check_before_running(scenario, args.engine, args.scenario)
    if refused is not None:
        return refused
    try:
        run_dir = RunDirectory.create(scenario.output.dir, scenario.name)
        run_dir.write_scenario(scenario.to_yaml())
    except (RunDirectoryError, OSError) as error:
        return _fail(f"output.dir: {error}", EXIT_INVALID)
    try:
        with run_dir.lock():
            return _execute(scenario, run_dir, resume=False)
    except RunDirectoryError as error:  # only the lock's: _execute reports its own
        return _fail(str(error), EXIT_INVALID)


def _engine_override(engine: str | None) -> list[str]:
    """``--engine E`` as the override ``engine.backend=E``, so the scenario's checks see the engine that runs it."""
    return [f"engine.backend={engine}"] if engine else []


def _check_before_running(scenario: Scenario,
                          engine: Literal["simulation", "inprocess", "processes", "deployment"] | None,
                          where: str) -> int | None:
    """Apply ``--engine`` and check what must hold before a run starts; the exit code of a refusal, else None."""
    if engine:
        scenario.engine.backend = engine
    if scenario.engine.backend == "deployment":
        return _fail("engine.backend 'deployment' runs with --engine deployment --federation NAME "
                     "(or choose --engine simulation|inprocess|processes)", EXIT_INVALID)
    from client.cache import task_for
    from medtasks.base import DataError

    try:
        task_for(scenario)  # data that cannot be built is a configuration error: no run directory for it
    except DataError as error:
        return _fail(f"{where}: data: {error}", EXIT_INVALID)
    return None


class _Resumption(NamedTuple):
    """What ``--resume`` continues: the scenario, whether ``--set`` gave it more rounds, and, for a run that
    is finished, the line that says so (then nothing runs)."""

    scenario: Scenario
    extended: bool
    finished: str | None


def _resumption(run_dir: RunDirectory, overrides: Sequence[str]) -> _Resumption:
    """The saved scenario of ``run_dir`` with ``overrides``, which may only raise ``strategy.rounds``.

    Raises
    ------
    ScenarioError
        An override of another key, fewer rounds than the run has completed, or more rounds where a privacy
        mechanism calibrated its noise to the saved number of rounds.
    RunDirectoryError
        No checkpoint yet (the run stopped before its first one): nothing to resume.
    """
    from server import scenario as scenario_module
    from server.results import SCENARIO_FILE, RunDirectoryError

    for override in overrides:
        key = override.partition("=")[0].strip()
        if key != ROUNDS_KEY:
            raise scenario_module.ScenarioError(
                f"--set {key}: {key} cannot change when a run is resumed; only {ROUNDS_KEY} can (--set {ROUNDS_KEY}=N)")
    saved = scenario_module.load(run_dir.path / SCENARIO_FILE)
    scenario = scenario_module.load(run_dir.path / SCENARIO_FILE, overrides) if overrides else saved
    if not run_dir.has_checkpoint():
        raise RunDirectoryError(f"{run_dir.path} has no checkpoint yet: nothing to resume; {_run_again(run_dir)}")
    done, rounds = run_dir.load_checkpoint().round, scenario.strategy.rounds
    extended = rounds != saved.strategy.rounds
    if extended and rounds <= done:
        raise scenario_module.ScenarioError(
            f"{ROUNDS_KEY}={rounds}: the run has already completed {done} rounds; give more than {done}")
    if extended and _calibrated_to_rounds(saved):
        raise scenario_module.ScenarioError(
            f"{ROUNDS_KEY} cannot change for privacy.mechanism {saved.privacy.mechanism}: its noise was calibrated "
            f"to the run's {saved.strategy.rounds} rounds")
    summary = run_dir.read_summary()
    if summary is None or extended:
        return _Resumption(scenario, extended, None)
    return _Resumption(scenario, False, f"medfed: {run_dir.path} is finished ({summary.get('rounds_completed')} of "
                                        f"{rounds} rounds); to run more rounds: medfed run --resume {run_dir.path} "
                                        f"--set {ROUNDS_KEY}=N")


def _calibrated_to_rounds(scenario: Scenario) -> bool:
    """Whether the privacy mechanism's noise depends on ``strategy.rounds``: NbAFL's always (T in its σ,
    Wei et al. 2020, IEEE TIFS, arXiv:1911.00222), DP-SGD's and central DP's when calibrated to a
    ``target_epsilon`` instead of a given ``noise_multiplier``. More rounds would break that calibration."""
    privacy = scenario.privacy
    if privacy.mechanism == "none":
        return False
    return privacy.mechanism == "nbafl" or privacy.params.get("noise_multiplier") is None


def _resume(args: argparse.Namespace) -> int:
    """``medfed run --resume RUN_DIR [--set strategy.rounds=N]``, holding the run directory's lock throughout."""
    from server import scenario as scenario_module
    from server.results import RunDirectory, RunDirectoryError

    try:
        run_dir = RunDirectory.open(args.resume)
        if args.scenario:
            return _fail(f"--resume takes the scenario saved in {run_dir.path}; drop SCENARIO", EXIT_INVALID)
        with run_dir.lock():
            resumption = _resumption(run_dir, args.overrides)
            if resumption.finished:
                print(resumption.finished)
                return EXIT_OK
            if args.federation:
                return _run_deployed(args, run_dir, resumption)
            scenario, resolved = resumption.scenario, resumption.scenario.to_yaml()
            refused = _check_before_running(scenario, args.engine, str(run_dir.path))
            if refused is not None:
                return refused
            _continue_with(run_dir, resumption, resolved)
            return _execute(scenario, run_dir, resume=True)
    except (scenario_module.ScenarioError, RunDirectoryError) as error:
        return _fail(str(error), EXIT_INVALID)


def _continue_with(run_dir: RunDirectory, resumption: _Resumption, resolved: str) -> None:
    """A run given more rounds keeps them (a later ``--resume`` goes on to them); its summary is no longer final."""
    if resumption.extended:
        run_dir.write_scenario(resolved)
        run_dir.discard_summary()


def _run_again(run_dir: RunDirectory) -> str:
    return f"run it again with: medfed run {run_dir.path / 'scenario.yaml'}"


def _next_step(run_dir: RunDirectory) -> str:
    """What to do after a run stopped: resume it from its checkpoint, or (none written yet) run it again."""
    if run_dir.has_checkpoint():
        return f"resume with: medfed run --resume {run_dir.path}"
    return f"no checkpoint yet, so nothing to resume; {_run_again(run_dir)}"


def _execute(scenario: Scenario, run_dir: RunDirectory, *, resume: bool) -> int:
    """Run ``scenario`` into ``run_dir``; Ctrl-C at any moment, even while the engine is still being imported,
    ends with the one line saying what to do next."""
    try:
        return _run_engine(scenario, run_dir, resume=resume)
    except KeyboardInterrupt:
        print(f"medfed: interrupted; {_next_step(run_dir)}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_engine(scenario: Scenario, run_dir: RunDirectory, *, resume: bool) -> int:
    from medtasks.base import DataError
    from server.engines import run_scenario
    from server.federation import FederationError, InputError
    from server.progress import make_progress
    from server.results import RunDirectoryError

    log.info("medfed: %s | task %s | %s x %d clients | %s | %d rounds | engine %s",
             scenario.name, scenario.task.name, scenario.partition.kind, scenario.partition.clients,
             scenario.strategy.name, scenario.strategy.rounds, scenario.engine.backend)
    log.info("run directory: %s", run_dir.path)
    try:
        summary = run_scenario(scenario, run_dir, make_progress(console=_CONSOLE), resume=resume)
    except (DataError, InputError) as error:  # the input: neither a resume nor the same run again can help
        reason = f"data: {error}" if isinstance(error, DataError) else str(error)
        if not resume and run_dir.remove_if_unstarted():
            reason += " (no run directory is kept: it held no results)"
        return _fail(reason, EXIT_INVALID)
    except (FederationError, RunDirectoryError) as error:
        return _fail(f"{error} (results so far are in {run_dir.path}; {_next_step(run_dir)})", EXIT_RUN_FAILED)
    _print_summary(summary, run_dir.path)
    return EXIT_OK


def _run_deployed(args: argparse.Namespace, run_dir: RunDirectory | None = None,
                  resumption: _Resumption | None = None) -> int:
    """``medfed run X.yaml --engine deployment --federation NAME``: validate here, run on the federation.

    With ``--resume`` (:func:`_resume` holds the run directory's lock and gives ``run_dir`` and ``resumption``),
    the ServerApp continues that run directory, on this machine, the coordinating site's.
    """
    from server import scenario as scenario_module
    from server.federation_folder import DeployError, find_federation
    from server.federation_setup import UNKNOWN_HOSPITAL, node_statuses
    from server.launch import deployed_scenario, launch
    from server.results import RunDirectoryError

    resume = run_dir.path.resolve() if run_dir is not None else None
    try:
        federation = find_federation(args.federation)
        if resumption is not None:
            scenario = resumption.scenario
        elif not args.scenario:
            return _fail("run needs a scenario file (or --resume RUN_DIR)", EXIT_INVALID)
        else:
            scenario = scenario_module.load(args.scenario, [*args.overrides, *_engine_override("deployment")])
        resolved = scenario.to_yaml()
        scenario = deployed_scenario(scenario, federation)
    except (scenario_module.ScenarioError, RunDirectoryError) as error:
        return _fail(str(error), EXIT_INVALID)
    except DeployError as error:
        return _fail(str(error), error.exit_code)
    if run_dir is not None and resumption is not None:
        _continue_with(run_dir, resumption, resolved)
    log.info("medfed: %s | task %s | %s x %d hospitals | %s | %d rounds | federation %s (%s)",
             scenario.name, scenario.task.name, scenario.partition.kind, scenario.partition.clients,
             scenario.strategy.name, scenario.strategy.rounds, federation.name, federation.address)
    if scenario.output.checkpoint_node_state:
        log.warning("output.checkpoint_node_state is true: every round copies each hospital's node state to the "
                    "coordinating site (set it to false to keep that state at the hospitals)")
    if scenario.strategy.round_timeout > DEPLOYED_ROUND_TIMEOUT_HINT:
        log.warning("strategy.round_timeout is %.0f s: a hospital that hangs (alive, not answering) holds every "
                    "phase that long; consider --set strategy.round_timeout=%d (a crashed node is reported within "
                    "about a minute anyway)", scenario.strategy.round_timeout, DEPLOYED_ROUND_TIMEOUT_HINT)
    try:
        offline = [row.hospital for row in node_statuses(federation)
                   if row.status != "online" and row.hospital != UNKNOWN_HOSPITAL]
        if offline:
            log.warning("not online yet: %s (the run waits for every hospital)", ", ".join(offline))
        launched = launch(scenario, federation, resume=resume)
    except DeployError as error:
        return _fail(str(error), error.exit_code)
    except KeyboardInterrupt:
        print("medfed: interrupted; the run was stopped at the SuperLink", file=sys.stderr)
        return EXIT_INTERRUPTED
    where = launched.run_directory or f"{scenario.output.dir}/{scenario.name}/<timestamp>"
    print(f"run {launched.run_id} {launched.status}")
    print(f"results: {where} (on the SuperLink's machine)")
    return EXIT_OK


def _sweep(args: argparse.Namespace) -> int:
    """``medfed sweep``: validate every cell, then run them through :func:`server.engines.run_scenario`."""
    from server.sweep import SweepError, plan_sweep
    from server.sweep_report import run_sweep

    try:
        plan = plan_sweep(args.scenario, args.overrides, args.grid, args.seeds, engine=args.engine, out=args.out)
        if args.dry_run:
            print(plan.describe())
            return EXIT_OK
        folder = plan.create_folder()
    except SweepError as error:
        return _fail(str(error), EXIT_INVALID)
    log.info("sweep: %d cells of %s into %s", len(plan.cells), args.scenario, folder)
    outcome = run_sweep(plan, folder, _run_cell)
    print(outcome.markdown, end="")
    print(f"results: {folder}")
    if outcome.interrupted:
        print(f"medfed: interrupted; the tables of what ran are in {folder}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.failed:
        return _fail(f"{len(outcome.failed)} of {len(outcome.results)} cells failed (see {folder / 'sweep.md'})",
                     EXIT_RUN_FAILED)
    return EXIT_OK


def _run_cell(scenario: Scenario, run_dir: RunDirectory) -> dict:
    """One sweep cell, run as ``medfed run`` runs a scenario: its engine, a progress display, the summary."""
    from server.engines import run_scenario
    from server.progress import make_progress

    with run_dir.lock():  # a --resume of this cell while the sweep runs it is refused
        return run_scenario(scenario, run_dir, make_progress(console=_CONSOLE))


def _deploy(args: argparse.Namespace) -> int:
    from server import deploy
    from server.federation_folder import DeployError

    try:
        return getattr(deploy, f"command_{args.deploy_action}")(args)
    except DeployError as error:
        return _fail(str(error), error.exit_code)


def _superlink(args: argparse.Namespace) -> int:
    """``medfed superlink stop``: end exactly the local SuperLink of this ``FLWR_HOME`` (:mod:`server.local_superlink`)."""
    from server import local_superlink

    try:
        links = local_superlink.find()
    except local_superlink.LocalSuperLinkError as error:
        return _fail(str(error), EXIT_INVALID)
    if not links:
        print(f"no local SuperLink runs for {local_superlink.database()}")
        return EXIT_OK
    for link in links:
        if local_superlink.stop(link):
            print(f"stopped the local SuperLink (pid {link.pid}, port {link.port})")
    return EXIT_OK


def _print_summary(summary: dict, path: Path) -> None:
    final = summary.get("final", {})
    parts = []
    for phase in ("evaluate", "central"):
        metrics = final.get(phase) or {}
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)) and k != "num-examples")
        if shown:
            parts.append(f"{phase}: {shown}")
    privacy = summary.get("privacy") or {}
    if privacy.get("epsilon") is not None:
        basis = privacy.get("basis") or (
            "weakest site" if "epsilon_per_client" in privacy else f"{privacy.get('mechanism')} calibration")
        parts.append(f"privacy: ε {privacy['epsilon']:.3g} (δ {privacy.get('delta', '?')}, {basis})")
    print(f"done in {summary.get('seconds', 0):.1f} s | " + " | ".join(parts))
    print(f"results: {path}")


def _compare(args: argparse.Namespace) -> int:
    from server.compare import (
        CompareError,
        comparison_rows,
        evaluation_note,
        figure_path,
        load_runs,
        markdown_table,
        plot_comparison,
        print_table,
    )

    try:
        runs = load_runs(args.runs)
        figure = figure_path(args.out, [run.path for run in runs])
    except CompareError as error:
        return _fail(str(error), EXIT_INVALID)
    rows = comparison_rows(runs, args.target)
    if args.markdown:
        print(markdown_table(rows) + "\n")
    else:
        print_table(rows, title=f"{len(runs)} runs")
    print(evaluation_note(runs, args.target))
    unfinished = [run.label for run in runs if run.seconds is None]
    if unfinished:
        log.warning("not finished (no summary.json): %s", ", ".join(unfinished))
    try:
        print(f"curves: {plot_comparison(runs, figure)}")
    except OSError as error:
        return _fail(f"cannot write the figure {figure} ({error.strerror or error}); choose --out FILE|DIR", EXIT_INVALID)
    return EXIT_OK


def _report(args: argparse.Namespace) -> int:
    from server.report import ReportError, write_report

    try:
        print(f"report: {write_report(args.runs, args.out)}")
    except ReportError as error:
        return _fail(str(error), EXIT_INVALID)
    return EXIT_OK


def _evaluate(args: argparse.Namespace) -> int:
    import json

    from medtasks.base import DataError
    from server.use_model import UseError, evaluate_run, metrics_table

    try:
        evaluation = evaluate_run(args.run_dir, data=args.data, which=args.which, site=args.site)
    except (UseError, DataError) as error:
        return _fail(str(error), EXIT_INVALID)
    print(json.dumps(evaluation.to_json(), indent=2) if args.json else metrics_table(evaluation))
    if not args.json:
        print(f"examples: {evaluation.folder}")
    return EXIT_OK


def _predict(args: argparse.Namespace) -> int:
    from medtasks.base import DataError
    from server.use_model import UseError, predict_run

    try:
        written = predict_run(args.run_dir, args.input, args.output, which=args.which, site=args.site)
    except (UseError, DataError) as error:
        return _fail(str(error), EXIT_INVALID)
    print(f"wrote {len(written)} files to {args.output}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    console_main()
