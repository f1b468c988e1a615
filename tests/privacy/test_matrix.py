"""Every privacy mechanism with every strategy: a combination that makes sense runs a round and reports ε, the
others are refused at load time with one line that says why. The README's table is checked against
:data:`EXPECTED`, so the documentation cannot drift from the behaviour.

Runs use the blobs toy task without BatchNorm (with it for FedBN), 3 sites of 64 examples, one round.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from server.scenario import Scenario, validate
from tests.helpers import blobs_scenario, run

README = Path(__file__).resolve().parents[2] / "README.md"

STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    # the README's column name → (strategy.name, strategy.params)
    "fedavg": ("fedavg", {}),
    "fedprox": ("fedavg", {"proximal_mu": 0.1}),
    "fedsgd": ("fedsgd", {}),
    "scaffold I": ("scaffold", {"variate": "I"}),
    "scaffold II": ("scaffold", {"variate": "II"}),
    "fedbn": ("fedbn", {}),
    "fedper": ("fedper", {"last_modules": 1}),
    "pfedhn": ("pfedhn", {}),
    "fedmedian": ("fedmedian", {}),
    "fedtrimmedavg": ("fedtrimmedavg", {"beta": 0.34}),
    "krum": ("krum", {}),
    "multikrum": ("multikrum", {}),
    "bulyan": ("bulyan", {}),
    "local": ("local", {}),
    "centralized": ("centralized", {}),
}

MECHANISMS: dict[str, dict[str, Any]] = {
    "dpsgd": {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
    "nbafl": {"clip": 10.0, "epsilon": 50.0},
    "central": {"clip": 1.0, "noise_multiplier": 1.0},
}

ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
EXPECTED: dict[str, dict[str, str]] = {
    # mechanism → column → "yes", or a phrase of the one-line refusal
    "dpsgd": {
        **dict.fromkeys(("fedavg", "fedprox", "fedsgd", "scaffold II", "fedper", "pfedhn", *ROBUST, "local",
                         "centralized"), "yes"),
        "scaffold I": "computed from the raw local data",
        "fedbn": "FedBN keeps BatchNorm local",
    },
    "nbafl": {
        **dict.fromkeys(("fedavg", "fedprox", "fedbn", "fedper"), "yes"),
        "fedsgd": "uploads gradients, not weights",
        "scaffold I": "control-variate update", "scaffold II": "control-variate update",
        "pfedhn": "uploads the update",
        **dict.fromkeys(ROBUST, "robust rule"),
        "local": "no weights are aggregated", "centralized": "the data are pooled",
    },
    "central": {
        **dict.fromkeys(("fedavg", "fedprox", "fedbn", "fedper", "pfedhn"), "yes"),
        "fedsgd": "use strategy fedavg",
        "scaffold I": "control-variate update", "scaffold II": "control-variate update",
        **dict.fromkeys(ROBUST, "robust rule"),
        "local": "nothing is aggregated", "centralized": "no site updates to clip",
    },
}

CELLS = [(mechanism, column) for mechanism in MECHANISMS for column in STRATEGIES]


def scenario_for(mechanism: str, column: str) -> dict[str, Any]:
    """The raw scenario of one cell (validated by the caller)."""
    name, params = STRATEGIES[column]
    base = blobs_scenario(name, params, norm="batch" if name == "fedbn" else "none")
    raw = json.loads(base.to_json())
    raw["privacy"] = {"mechanism": mechanism, "params": MECHANISMS[mechanism]}
    return raw


@pytest.mark.parametrize("mechanism, column", CELLS, ids=[f"{m}-{c.replace(' ', '')}" for m, c in CELLS])
def test_each_combination_runs_or_is_refused_in_one_line(mechanism: str, column: str, tmp_path: Path) -> None:
    expected = EXPECTED[mechanism][column]
    raw = scenario_for(mechanism, column)
    if expected != "yes":
        with pytest.raises(ValueError) as refused:
            validate(raw)
        message = str(refused.value)
        assert expected in message and f"privacy.mechanism {mechanism}" in message
        assert len(message.strip().splitlines()) == 1, message
        return
    scenario: Scenario = validate(raw)
    run_dir = run(scenario, tmp_path)
    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    train = [record for record in run_dir.read_metrics() if record["phase"] == "train"]
    assert len(train) == 1 and train[0]["aggregate"] and train[0]["epsilon"] > 0
    assert summary["privacy"]["mechanism"] == mechanism and summary["privacy"]["epsilon"] > 0


def readme_matrix() -> dict[str, dict[str, str]]:
    """The README's "Mechanism × strategy" table: mechanism → column → its cell ("yes" or the reason)."""
    text = README.read_text()
    section = text[text.index("### Privacy mechanism × strategy"):]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    rows = lines[start:end]
    header = [cell.strip().strip("`") for cell in rows[0].strip("|").split("|")]
    table: dict[str, dict[str, str]] = {}
    for line in rows[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        column = cells[0].strip("`")
        for mechanism, cell in zip(header[1:], cells[1:]):
            table.setdefault(mechanism, {})[column] = cell
    return table


def test_the_readme_table_says_what_the_code_does() -> None:
    table = readme_matrix()
    assert set(table) == set(MECHANISMS)
    for mechanism, cells in EXPECTED.items():
        assert set(table[mechanism]) == set(cells), mechanism
        for column, expected in cells.items():
            shown = table[mechanism][column]
            assert (shown == "yes") == (expected == "yes"), (mechanism, column, shown)
            assert shown == "yes" or re.match(r"no\b", shown), (mechanism, column, shown)
