"""Time the digits poisoning attack × defense grid and print a markdown table.

Rows: the backdoor by plain data poisoning (``scenarios/attack-backdoor-digits.yaml``) and the boosted model
replacement (``scenarios/attack-model-replacement-digits.yaml``), each undefended and under the update-norm
bound and the robust rules; columns: the backdoor accuracy after the poisoning round (model replacement) or the
last round (data poisoning), the clean accuracy of the same global model, and the run's wall-clock seconds on one
torch thread. Run from the repository root: ``python benchmarks/poisoning.py``.
"""

from __future__ import annotations

import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from server.engines import run_scenario  # noqa: E402
from server.progress import make_progress  # noqa: E402
from server.results import RunDirectory  # noqa: E402
from server.scenario import load  # noqa: E402

ATTACKS = {
    "backdoor (data poisoning, every round)": "attack-backdoor-digits",
    "model replacement (γ = n/η, round 6)": "attack-model-replacement-digits",
}
DEFENSES = {
    "none": [],
    "norm bound 1.0": ["defense.norm_bound=1.0"],
    "median": ["defense.aggregation=median"],
    "trimmed mean (β 0.25)": ["defense.aggregation=trimmed_mean", "defense.params={beta: 0.25}"],
    "krum": ["defense.aggregation=krum"],
}


def measure(name: str, overrides: list[str], out: Path) -> tuple[float, float, float]:
    """(backdoor accuracy, clean accuracy, seconds) of one run; model replacement is read in its poison round."""
    scenario = load(ROOT / "scenarios" / f"{name}.yaml", [*overrides, f"output.dir={out}", "output.plots=false"])
    assert scenario.attack is not None
    run_dir = RunDirectory.create(scenario.output.dir, scenario.name)
    run_dir.write_scenario(scenario.to_yaml())
    started = time.perf_counter()
    run_scenario(scenario, run_dir, make_progress(interactive=False))
    seconds = time.perf_counter() - started
    poison_rounds = scenario.attack.params.get("poison_rounds")
    measured = poison_rounds[-1] if poison_rounds else scenario.strategy.rounds
    record = next(r for r in run_dir.read_metrics() if r["phase"] == "attack" and r["round"] == measured
                  and "backdoor_accuracy" in r["metrics"])
    return record["metrics"]["backdoor_accuracy"], record["metrics"]["clean_accuracy"], seconds


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    total = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        for attack, name in ATTACKS.items():
            for defense, overrides in DEFENSES.items():
                backdoor, clean, seconds = measure(name, overrides, Path(out))
                command = " ".join(["medfed run", f"scenarios/{name}.yaml", *(f"--set {shlex.quote(o)}" for o in overrides)])
                rows.append(f"| {attack} | {defense} | `{command}` | {backdoor:.3f} | {clean:.3f} | {seconds:.1f} |")
    print("| attack | defense | command | backdoor accuracy | clean accuracy | seconds |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\ngrid of {len(rows)} runs: {time.perf_counter() - total:.0f} s on one torch thread")


if __name__ == "__main__":
    main()
