"""The attack plug-in exists only for a scenario with an ``attack:`` block."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

NO_ATTACK_RUN = """
import json, sys
from server.scenario import load
from server.federation import Federation
from tests.helpers import QUICKSTART, run
import server.federation as federation

plugins = []
original = federation.Plugins.__init__
def spy(self, items):
    plugins.extend(type(item).__name__ for item in items)
    original(self, items)
federation.Plugins.__init__ = spy
scenario = load(QUICKSTART, ["task.name=tabular", "task.model=logistic", "task.params={}", "partition.params={}",
                             "partition.kind=iid", "data.samples_per_client=20", "strategy.rounds=1",
                             "engine.backend=inprocess", "output.plots=false", "output.dir=" + sys.argv[1]])
run(scenario)
from privacy.attacks import MODULES
print(json.dumps({"plugins": plugins, "attack_modules": sorted(set(MODULES.values()) & set(sys.modules))}))
"""


def test_a_scenario_without_attack_installs_no_attack_and_imports_no_attack_code(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", NO_ATTACK_RUN, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert "AttackRound" not in seen["plugins"] and "ReplyCheck" in seen["plugins"]
    assert seen["attack_modules"] == []
    summary = json.loads(next(tmp_path.glob("*/*/summary.json")).read_text())
    assert "attack" not in summary
    records = [json.loads(line) for line in next(tmp_path.glob("*/*/metrics.jsonl")).read_text().splitlines()]
    assert records and all(record["phase"] != "attack" for record in records)
