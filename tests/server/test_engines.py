"""Engines end cleanly: a private Ray instance, one line on failure or Ctrl-C, nothing left running, no hook noise."""

from __future__ import annotations

import warnings
from pathlib import Path

from server.scenario import load
from tests.helpers import ROOT, run

HOOK_WARNING = "Full backward hook is firing"


def test_dpsgd_round_emits_no_backward_hook_warning(tmp_path: Path) -> None:
    scenario = load(ROOT / "scenarios" / "tabular-dp-eps4.yaml", [
        "partition.clients=2", "data.samples_per_client=40", "data.server_samples=20", "strategy.rounds=2",
        "strategy.min_clients=2", "strategy.fraction_evaluate=1.0", "privacy.params={noise_multiplier: 1.0, delta: 1.0e-5, max_grad_norm: 1.0}",
        f"output.dir={tmp_path}",
    ])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, in every round, not only the first
        records = run(scenario).read_metrics()
    assert [r["round"] for r in records if r["phase"] == "train"] == [1, 2]  # two DP-SGD rounds ran
    hook_warnings = [str(w.message) for w in caught if HOOK_WARNING in str(w.message)]
    assert hook_warnings == []
