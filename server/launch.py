"""Launching a scenario on a deployed federation: ``medfed run X.yaml --engine deployment --federation NAME``.

:func:`deployed_scenario` fits the validated scenario to the federation; :func:`launch` ships it, resolved, to the
ServerApp (:mod:`server.app`, run-config key ``scenario-json``, through a ``--run-config`` TOML file) with
``flwr run --stream``, echoes the ServerApp's log, and checks the run's final status (``flwr run --stream`` exits 0
even when the ServerApp fails).

The run-config keys and the log line naming the run directory are the contract with :mod:`server.app`, which
imports them from here.
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server.federation_folder import DeployError, FederationFolder, SuperLinkError
from server.flower_cli import CLI_TIMEOUT, flower_environment, flwr_json, last_line

if TYPE_CHECKING:  # pragma: no cover
    from server.scenario import Scenario

SCENARIO_JSON_KEY = "scenario-json"  # run-config key of the resolved scenario ([tool.flwr.app.config])
RESUME_KEY = "resume-dir"  # run-config key: the run directory a resumed run continues ([tool.flwr.app.config])
RUN_DIRECTORY_PREFIX = "run directory: "  # the ServerApp's log line naming the run directory
FINAL_STATUS_TIMEOUT = 30.0  # seconds to wait for a run's status to turn finished after its log stream ends
INTERRUPT_GRACE = 10.0  # seconds flwr run gets to end after Ctrl-C before it is killed


def app_directory() -> Path:
    """The Flower app folder ``flwr run`` builds the FAB from: the source checkout with ``[tool.flwr.app]``.

    Raises
    ------
    DeployError
        medfed is not installed from its source checkout (no ``pyproject.toml`` with ``[tool.flwr.app]``).
    """
    folder = Path(__file__).resolve().parents[1]
    pyproject = folder / "pyproject.toml"
    try:
        has_app = "app" in tomllib.loads(pyproject.read_text(encoding="utf-8")).get("tool", {}).get("flwr", {})
    except (OSError, tomllib.TOMLDecodeError):
        has_app = False
    if not has_app:
        raise DeployError(f"{pyproject}: no Flower app ([tool.flwr.app]); deployment needs medfed's source "
                          "checkout installed with pip install -e .")
    return folder


def deployed_scenario(scenario: Scenario, federation: FederationFolder) -> Scenario:
    """A copy of ``scenario`` for ``federation``: ``engine.backend: deployment`` and an absolute ``output.dir``.

    The ServerApp runs where the SuperLink runs, in its working directory, so a relative ``output.dir`` is resolved
    here (launch at the coordinating site, or give a path that is valid there).

    Parameters
    ----------
    scenario : Scenario
        The validated scenario (left unchanged).
    federation : FederationFolder
        The federation to run on.

    Returns
    -------
    Scenario
        The copy to launch.

    Raises
    ------
    DeployError
        ``partition.clients`` differs from the number of hospitals (the run would wait for nodes that do not
        exist).
    """
    count = len(federation.hospitals)
    if scenario.partition.clients != count:
        raise DeployError(f"partition.clients is {scenario.partition.clients} but federation '{federation.name}' "
                          f"has {count} hospitals; add --set partition.clients={count}")
    deployed = scenario.model_copy(deep=True)
    deployed.engine.backend = "deployment"
    deployed.output.dir = str(Path(scenario.output.dir).expanduser().resolve())
    return deployed


@dataclass(frozen=True)
class LaunchedRun:
    """A finished deployed run: its Flower run id, final status and run directory (None if it was not logged)."""

    run_id: int
    status: str
    run_directory: Path | None


def launch(scenario: Scenario, federation: FederationFolder, *, resume: Path | None = None,
           echo: Callable[[str], None] = print) -> LaunchedRun:
    """Run ``scenario`` (already :func:`deployed_scenario`) on the federation through ``flwr run``.

    Ctrl-C stops the run at the SuperLink.

    Parameters
    ----------
    scenario : Scenario
        The scenario, as :func:`deployed_scenario` returned it.
    federation : FederationFolder
        The federation to run on (its Flower CLI connection names the SuperLink).
    resume : Path, optional
        A run directory on the SuperLink's machine: the ServerApp continues that run from its last checkpoint
        instead of starting a new one.
    echo : Callable[[str], None], default print
        Gets the ServerApp's log line by line.

    Returns
    -------
    LaunchedRun
        The completed run.

    Raises
    ------
    SuperLinkError
        The SuperLink refused the run or is unreachable, or the run did not complete.
    """
    with tempfile.TemporaryDirectory(prefix="medfed-run-") as folder:
        run_config = Path(folder) / "run-config.toml"
        run_config.write_text(run_config_toml(scenario, resume), encoding="utf-8")
        command = ["flwr", "run", str(app_directory()), federation.name, "--stream", "--run-config", str(run_config)]
        run_id, run_directory = _stream(command, echo, federation)
    status, details = _final_status(run_id, federation)
    if status != "finished:completed":
        raise SuperLinkError(f"run {run_id} ended {status}" + (f": {details}" if details else ""))
    return LaunchedRun(run_id, status, run_directory)


def run_config_toml(scenario: Scenario, resume: Path | None = None) -> str:
    """The ``flwr run --run-config`` file that ships ``scenario`` (TOML escapes what a command line could not),
    and the run directory to continue, if any."""
    import tomli_w

    config = {SCENARIO_JSON_KEY: scenario.to_json()}
    if resume is not None:
        config[RESUME_KEY] = str(resume)
    return tomli_w.dumps(config)


def _stream(command: list[str], echo: Callable[[str], None],
            federation: FederationFolder) -> tuple[int, Path | None]:
    """Run ``flwr run --stream``, echo its output, and return (run id, run directory named in the log)."""
    run_id, run_directory, last = None, None, ""
    process = subprocess.Popen(command, env=flower_environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, bufsize=1)
    try:
        for line in process.stdout:  # type: ignore[union-attr]
            line = line.rstrip("\n")
            echo(line)
            last = line.strip() or last
            run_id = run_id or _run_id_in(line)
            if RUN_DIRECTORY_PREFIX in line:
                run_directory = Path(line.split(RUN_DIRECTORY_PREFIX, 1)[1].strip())
        process.wait()
    except KeyboardInterrupt:
        _interrupt(process)
        if run_id is not None:
            subprocess.run(["flwr", "stop", str(run_id), federation.name], env=flower_environment(),
                           capture_output=True, timeout=CLI_TIMEOUT, check=False)
        raise
    if run_id is None:
        raise SuperLinkError(f"federation {federation.name}: flwr run did not start a run: "
                             f"{last or f'exit status {process.returncode}'}")
    return run_id, run_directory


def _interrupt(process: subprocess.Popen[str]) -> None:
    """End ``flwr run`` after Ctrl-C. In a terminal it got the SIGINT too; a ``kill -INT`` of medfed's pid alone
    (a script, a service manager) did not reach it, so it is sent one, and killed if it has not ended within
    :data:`INTERRUPT_GRACE` seconds."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=INTERRUPT_GRACE)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _run_id_in(line: str) -> int | None:
    match = re.search(r"Successfully started run (\d+)", line)
    return int(match.group(1)) if match else None


def _final_status(run_id: int, federation: FederationFolder) -> tuple[str, str]:
    """(status, status details) once the run is finished (its log stream can end a moment earlier)."""
    deadline = time.monotonic() + FINAL_STATUS_TIMEOUT
    while True:
        run = flwr_json(["ls", federation.name, "--run-id", str(run_id)], federation)["runs"][0]
        status = str(run.get("status", ""))
        if status.startswith("finished") or time.monotonic() > deadline:
            return status, last_line(str(run.get("status-details") or ""))
        time.sleep(1.0)
