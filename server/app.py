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
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from server import scenario as scenario_module
from server.federation import Federation
from server.progress import make_progress
from server.results import RunDirectory

APP_DIR = Path(__file__).resolve().parent.parent

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Load the scenario named in the run config and run it on ``grid``."""
    log = logging.getLogger("medfed")
    if not log.handlers:  # Flower streams this process's output to `flwr run --stream` / `flwr log`
        log.addHandler(logging.StreamHandler(sys.stdout))
        log.setLevel(logging.INFO)
    path = Path(str(context.run_config.get("scenario", "scenarios/quickstart.yaml")))
    if not path.is_absolute():
        path = APP_DIR / path
    overrides = [item.strip() for item in str(context.run_config.get("set", "")).split(";") if item.strip()]
    scenario = scenario_module.load(path, overrides)
    run_dir = RunDirectory.create(scenario.output.dir, scenario.name)
    run_dir.write_scenario(scenario.to_yaml())
    Federation(scenario, run_dir, make_progress(interactive=False)).run(grid)
