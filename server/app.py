"""ServerApp for ``flwr run .`` (the ``[tool.flwr.app.components]`` serverapp).

``medfed run`` builds its own ServerApp around the same :class:`~server.federation.Federation`
loop (see :mod:`server.engines`); this module is the entry point when Flower's
own CLI runs the app through a SuperLink (simulation or deployment):

    flwr run . --run-config "scenario='scenarios/quickstart.yaml'"
    flwr run . --run-config "scenario='scenarios/quickstart.yaml' set='strategy.rounds=3;local.lr=0.01'"

Run-config keys (declared in ``pyproject.toml``): ``scenario`` (path of the
scenario file, relative to the app folder unless absolute) and ``set``
(``;``-separated overrides). The run directory goes to ``output.dir``
(relative to the ServerApp's working directory unless absolute).

``medfed run X.yaml --engine deployment --federation NAME`` (:mod:`server.deploy`)
instead sends the scenario it validated, resolved, as JSON in the key
``scenario-json`` (through a ``--run-config`` TOML file), so a scenario file
outside the app folder works; it then takes precedence over ``scenario`` and
``set``. Its ``engine.backend`` says ``deployment``. ``resume-dir`` (from
``medfed run --resume RUN_DIR --engine deployment``) continues that run directory
from its last checkpoint.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from server import scenario as scenario_module
from server.engines import end_ray_instance
from server.federation import Federation, FederationError
from server.launch import RESUME_KEY, RUN_DIRECTORY_PREFIX, SCENARIO_JSON_KEY
from server.progress import make_progress
from server.results import RunDirectory

APP_DIR = Path(__file__).resolve().parent.parent
SUPERNODES_SETTLE_S = 1.0
"""Seconds the simulated supernodes' count must stay unchanged before it is compared with ``partition.clients``."""
SUPERNODES_TIMEOUT_S = 15.0
"""Longest wait for the simulated supernodes to register."""

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Load the scenario the run config names (or carries) and run it on ``grid``."""
    log = logging.getLogger("medfed")
    if not log.handlers:  # Flower streams this process's output to `flwr run --stream` / `flwr log`
        log.addHandler(logging.StreamHandler(sys.stdout))
        log.setLevel(logging.INFO)
    scenario = scenario_from_run_config(context.run_config)
    if isinstance(grid, InMemoryGrid):
        stop_ray_on_exit()
    try:
        check_supernodes(grid, scenario)
    except FederationError as error:
        log.error("medfed: error: %s", error)  # one line, before any run directory exists
        return
    resume = str(context.run_config.get(RESUME_KEY, ""))
    if resume:
        run_dir = RunDirectory.open(resume)
    else:
        run_dir = RunDirectory.create(scenario.output.dir, scenario.name)
        run_dir.write_scenario(scenario.to_yaml())
    log.info("%s%s", RUN_DIRECTORY_PREFIX, run_dir.path.resolve())
    Federation(scenario, run_dir, make_progress(interactive=False), resume=bool(resume)).run(grid)


def stop_ray_on_exit() -> None:
    """Have Flower's simulation runtime stop its Ray instance when it exits, also on ``flwr stop``.

    ``flwr stop`` (or Ctrl-C) makes the ``flwr-simulation`` process leave through Flower's exit handlers
    without stopping Ray, whose agents then outlive the run, orphaned. Registered here, the ServerApp's
    process ends its Ray instance's processes on its way out (:func:`~server.engines.end_ray_instance`),
    before Flower starts counting the 5 s after which it forces the process out.
    """
    from flwr.supercore.exit import add_exit_handler

    add_exit_handler(_end_ray_undisturbed, run_before_force_exit=True)


def _end_ray_undisturbed() -> None:
    """:func:`~server.engines.end_ray_instance` with SIGINT and SIGTERM ignored meanwhile (it takes 2 s at most).

    ``flwr stop`` cuts each of the process's connections to the SuperLink, and Flower answers each cut with a
    SIGINT to the process. The first starts the exit; by then Flower has put the default handlers back, so a
    second would raise KeyboardInterrupt inside this handler and leave Ray's processes running.
    """
    ignored = {number: signal.signal(number, signal.SIG_IGN) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        end_ray_instance()
    finally:
        for number, handler in ignored.items():
            signal.signal(number, handler)


def scenario_from_run_config(run_config: dict) -> scenario_module.Scenario:
    """The resolved scenario in ``scenario-json``, else the file ``scenario`` with the ``set`` overrides."""
    shipped = str(run_config.get(SCENARIO_JSON_KEY, ""))
    if shipped:
        return scenario_module.Scenario.from_json(shipped)
    path = Path(str(run_config.get("scenario", "scenarios/quickstart.yaml")))
    if not path.is_absolute():
        path = APP_DIR / path
    overrides = [item.strip() for item in str(run_config.get("set", "")).split(";") if item.strip()]
    return scenario_module.load(path, overrides)


def check_supernodes(grid: Grid, scenario: scenario_module.Scenario, *, settle: float = SUPERNODES_SETTLE_S,
                     timeout: float = SUPERNODES_TIMEOUT_S) -> None:
    """Refuse a simulation whose number of supernodes is not ``partition.clients``.

    Flower's simulation registers its ``num-supernodes`` nodes all at once, so once their count has
    stayed the same for ``settle`` seconds it is the federation's (discovery would otherwise wait
    :data:`server.federation.DISCOVERY_TIMEOUT` for nodes that never come). A deployed federation's
    hospitals connect when they are ready: there, discovery waits as before.

    Raises
    ------
    FederationError
        One line naming both numbers and how to make them equal.
    """
    if not isinstance(grid, InMemoryGrid):
        return
    expected = scenario.partition.clients
    deadline = time.monotonic() + timeout
    count, stable_since = len(list(grid.get_node_ids())), time.monotonic()
    while time.monotonic() < deadline and (count == 0 or time.monotonic() - stable_since < settle):
        time.sleep(0.1)
        now = len(list(grid.get_node_ids()))
        if now != count:
            count, stable_since = now, time.monotonic()
    if count != expected:
        raise FederationError(
            f"the simulation has {count} supernodes (num-supernodes) but partition.clients is {expected}: run with "
            f"--federation-config \"num-supernodes={expected}\" or set partition.clients={count}"
        )
