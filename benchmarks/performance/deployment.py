"""Part ``deployment`` (off by default): per-round latency of a real deployment on this machine's loopback, and
where it goes.

It reuses the end-to-end tests' federation (``tests/deploy/federation.py``, so it needs the test extras): a
SuperLink and two SuperNodes as separate processes with TLS and node authentication, set up as ``medfed deploy``
prescribes, and the quickstart shrunk to seconds (``TWO_SMALL_ROUNDS``: 32 px, 20 slices per site, 2 rounds) run
with ``medfed run --engine deployment``, then the same scenario on the in-process engine. Per round and phase
(``metrics.jsonl`` seconds): the deployed and in-process times, and of the deployed train phase the slowest
site's own training time (its reply's ``seconds``) and the rest, the messaging (Flower's polling, a new ClientApp
process per message, TLS).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.performance.common import PHASES, one_line, phase_seconds
from server.results import RunDirectory


def measure(*, timeout: float) -> dict[str, Any]:
    """The deployed run's set-up, wall time and per-round split beside the in-process engine's."""
    try:
        from tests.deploy.federation import TWO_SMALL_ROUNDS, LocalFederation, run_deployed, run_inprocess
    except ImportError as error:
        return {"note": f"not measured here: the test scaffolding could not be imported ({one_line(error)})"}
    with tempfile.TemporaryDirectory(prefix="medfed-performance-") as directory:
        root = Path(directory)
        (root / "parties").mkdir()
        with LocalFederation(root / "parties") as federation:
            started = time.perf_counter()
            federation.start()
            setup = time.perf_counter() - started
            deployed = run_deployed(federation, root / "deployed", timeout=timeout)
        local = run_inprocess(root / "inprocess")
        shown = [item for item in TWO_SMALL_ROUNDS if not item.startswith("engine.backend=")]  # --engine decides
        return {"scenario": "quickstart.yaml " + " ".join(f"--set {item}" for item in shown),
                "federation_start_seconds": setup, "wall_seconds": deployed.wall_seconds,
                "rounds": where_it_goes(deployed.run_dir, local)}


def where_it_goes(deployed: RunDirectory, local: RunDirectory) -> list[dict[str, float]]:
    """Per round: each phase deployed and in-process, and the deployed train phase's compute and messaging."""
    remote, here = phase_seconds(deployed.read_metrics()), phase_seconds(local.read_metrics())
    compute = slowest_site_training(deployed)
    rows = []
    for number, phases in sorted(remote.items()):
        row: dict[str, float] = {"round": number}
        for phase in PHASES:
            row[f"deployed_{phase}"] = phases[phase]
            row[f"inprocess_{phase}"] = here.get(number, {}).get(phase, 0.0)
        row["deployed_site_training"] = compute.get(number, 0.0)
        row["deployed_train_messaging"] = phases["train"] - row["deployed_site_training"]
        rows.append(row)
    return rows


def slowest_site_training(run_dir: RunDirectory) -> dict[int, float]:
    """Per round, the longest of the sites' own training times (the train replies' ``seconds``)."""
    slowest: dict[int, float] = {}
    for record in run_dir.read_metrics():
        if record.get("phase") == "train":
            seconds = [site["seconds"] for site in record["clients"].values() if "seconds" in site]
            slowest[int(record["round"])] = max(seconds, default=0.0)
    return slowest


def not_measured() -> dict[str, Any]:
    """The entry of a run without this part."""
    return {"note": "not measured here (python -m benchmarks.performance --parts deployment measures it)"}
