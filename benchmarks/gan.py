"""Times the GAN attack (Hitaj et al. 2017) on the digits task and prints a markdown table.

Run from the repository root: ``python benchmarks/gan.py``. One torch thread throughout. Rows:

* the attacker's extra work in one attack round: training its generator against the received model
  (``generator_steps`` Adam steps) and drawing the fakes and samples;
* the server's scoring: the first round (fitting the independent pool classifier, then scoring) and a later one;
* the shipped scenario ``scenarios/attack-gan-digits.yaml`` end to end, and the same run without its ``attack:``
  block (the main metric without the attack).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from flwr.app import ArrayRecord, RecordDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.cache import task_for  # noqa: E402
from privacy.attacks import AttackSetting, get_attack  # noqa: E402
from privacy.attacks.base import Observation  # noqa: E402
from privacy.attacks.gan import GanObserver, GanParams, GanSite  # noqa: E402
from server.engines import run_scenario  # noqa: E402
from server.progress import make_progress  # noqa: E402
from server.results import RunDirectory  # noqa: E402
from server.scenario import Scenario, load  # noqa: E402

SCENARIO = ROOT / "scenarios" / "attack-gan-digits.yaml"
RUN_COMMAND = "medfed run scenarios/attack-gan-digits.yaml"
T = TypeVar("T")


def timed(work: Callable[[], T]) -> tuple[T, float]:
    """``work()`` and its wall-clock seconds."""
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def one_round(scenario: Scenario) -> list[tuple[str, str, str, float]]:
    """The attacker's and the server's share of one attack round, outside a run."""
    assert scenario.attack is not None
    task = task_for(scenario)
    params = GanParams.model_validate(scenario.attack.params)
    setting = AttackSetting(scenario, params, task, None)
    pid = scenario.attack.attackers[0]
    model, state = task.build_model(), RecordDict()
    site = GanSite(setting, 1, pid)
    _, train_seconds = timed(lambda: site.training_data(task.client_data(pid).train, model, state))
    records, sample_seconds = timed(lambda: site.tamper({}, model, RecordDict(), state))
    observer = GanObserver(setting)
    observation = Observation(round=1, partition_id=pid, sent=RecordDict({"arrays": ArrayRecord(model.state_dict())}),
                              reply=RecordDict(), side=records, uploads={}, local=scenario.local, batches=list,
                              members=lambda: task.client_data(pid).train)
    _, first_seconds = timed(lambda: observer.observe(observation))
    _, later_seconds = timed(lambda: observer.observe(observation))
    steps = f"{params.generator_steps} steps × batch {params.batch}"
    return [
        ("attacker: train G against w_t, draw fakes", "python benchmarks/gan.py", steps, train_seconds),
        ("attacker: draw the samples for the experimenter", "python benchmarks/gan.py",
         f"{params.samples} images", sample_seconds),
        ("server: first scoring (fit pool classifier + score)", "python benchmarks/gan.py",
         "1,797 digits, logistic regression", first_seconds),
        ("server: later scoring (share, best-match SSIM, grid off)", "python benchmarks/gan.py",
         f"{params.samples} samples × {int((task.pool()[1] == params.target_class).sum())} real images "  # type: ignore[attr-defined]
         f"of class {params.target_class}", later_seconds),
    ]


def full_run(scenario: Scenario, directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]], float]:
    """Runs ``scenario`` in process; its summary, its attack records and its seconds."""
    run_dir = RunDirectory.create(str(directory), scenario.name)
    run_dir.write_scenario(scenario.to_yaml())
    _, seconds = timed(lambda: run_scenario(scenario, run_dir, make_progress(interactive=False)))
    summary = json.loads((run_dir.path / "summary.json").read_text())
    attack = [r for r in run_dir.read_metrics() if r.get("phase") == "attack"]
    return summary, attack, seconds


def central(summary: dict[str, Any]) -> str:
    """The main metric of a run's summary: final and best accuracy on the server's test set."""
    final = summary["final"].get("central", {}).get("accuracy")
    best = summary["best"]
    return f"central accuracy final {final:.3f}, best {best['value']:.3f} (round {best['round']})"


def main() -> None:
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scenario = load(SCENARIO, [f"output.dir={tmp}"])
        rows += one_round(scenario)
        summary, records, seconds = full_run(scenario, Path(tmp) / "attack")
        shares = [r["metrics"]["target_share"] for r in records]
        baselines = [r["metrics"]["baseline_share"] for r in records]
        ssims = [r["metrics"]["ssim"] for r in records]
        rows.append((f"run with {get_attack('gan').label}, {len(records)} attack rounds", RUN_COMMAND,
                     f"target_share {statistics.mean(shares):.2f} per round {shares}; untrained G "
                     f"{statistics.mean(baselines):.2f}; SSIM {statistics.mean(ssims):.2f}; {central(summary)}", seconds))
        clean, _, clean_seconds = full_run(load(SCENARIO, [f"output.dir={tmp}", "attack="]), Path(tmp) / "none")
        rows.append(("the same run without its attack: block", f"{RUN_COMMAND} --set attack=",
                     central(clean), clean_seconds))
    print("| what | command | numbers | seconds |\n|---|---|---|---|")
    for what, command, numbers, secs in rows:
        print(f"| {what} | `{command}` | {numbers} | {secs:.2f} |")


if __name__ == "__main__":
    main()
