"""Every privacy mechanism with every strategy: a combination the mechanism can protect runs a round and reports
ε, the others are refused at load time with one line that says why.

Which cells are allowed is decided in one place, :mod:`privacy.compatibility`, from what each algorithm declares;
these tests run what it allows, check the refusals it gives, hold the table of docs/privacy.md to the one it generates, and
pin a few cells by hand so the check is not circular.

Runs use the blobs toy task without BatchNorm (with it for FedBN), 3 sites of 64 examples, one round.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from privacy import compatibility
from server.scenario import Scenario, validate
from strategies import BUILTIN_ALGORITHMS
from tests.helpers import blobs_scenario, run

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "privacy.md"

STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    # the table's row label → (strategy.name, strategy.params) of the blobs runs
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

CELLS = [(mechanism, column) for mechanism in MECHANISMS for column in STRATEGIES]

SPOT_CHECKS: dict[tuple[str, str], bool] = {
    # written out by hand, independently of privacy.compatibility
    ("dpsgd", "fedavg"): True,
    ("dpsgd", "scaffold I"): False,
    ("dpsgd", "scaffold II"): True,
    ("dpsgd", "fedbn"): False,
    ("nbafl", "fedprox"): True,
    ("nbafl", "pfedhn"): False,
    ("nbafl", "krum"): False,
    ("central", "pfedhn"): True,
    ("central", "fedsgd"): False,
    ("central", "local"): False,
}


def scenario_for(mechanism: str, column: str) -> dict[str, Any]:
    """The raw scenario of one cell (validated by the caller)."""
    name, params = STRATEGIES[column]
    base = blobs_scenario(name, params, norm="batch" if name == "fedbn" else "none")
    raw = json.loads(base.to_json())
    raw["privacy"] = {"mechanism": mechanism, "params": MECHANISMS[mechanism]}
    return raw


def plain_scenario(column: str) -> Scenario:
    """The cell's scenario without privacy (what the verdict is asked about)."""
    name, params = STRATEGIES[column]
    return blobs_scenario(name, params, norm="batch" if name == "fedbn" else "none")


@pytest.mark.parametrize("mechanism, column", CELLS, ids=[f"{m}-{c.replace(' ', '')}" for m, c in CELLS])
def test_each_combination_runs_or_is_refused_in_one_line(mechanism: str, column: str, tmp_path: Path) -> None:
    decided = compatibility.verdict(plain_scenario(column), mechanism)
    raw = scenario_for(mechanism, column)
    if not decided.allowed:
        with pytest.raises(ValueError) as refused:
            validate(raw)
        message = str(refused.value)
        assert decided.reason in message and f"privacy.mechanism {mechanism}" in message
        assert len(message.strip().splitlines()) == 1, message
        return
    scenario: Scenario = validate(raw)
    run_dir = run(scenario, tmp_path)
    summary = json.loads((run_dir.path / "summary.json").read_text())
    assert summary["rounds_completed"] == 1
    train = [record for record in run_dir.read_metrics() if record["phase"] == "train"]
    assert len(train) == 1 and train[0]["aggregate"] and train[0]["epsilon"] > 0
    assert summary["privacy"]["mechanism"] == mechanism and summary["privacy"]["epsilon"] > 0


@pytest.mark.parametrize("cell, allowed", SPOT_CHECKS.items(), ids=[f"{m}-{c}" for m, c in SPOT_CHECKS])
def test_spot_checks_written_by_hand(cell: tuple[str, str], allowed: bool) -> None:
    mechanism, column = cell
    assert compatibility.verdict(plain_scenario(column), mechanism).allowed == allowed
    if not allowed:
        with pytest.raises(ValueError, match=f"privacy.mechanism {mechanism}"):
            validate(scenario_for(mechanism, column))


def test_the_refusals_keep_their_reasons() -> None:
    phrases = {
        ("dpsgd", "scaffold I"): "computed from the raw local data",
        ("dpsgd", "fedbn"): "FedBN keeps BatchNorm local",
        ("nbafl", "fedsgd"): "uploads gradients, not weights",
        ("nbafl", "scaffold II"): "control-variate update",
        ("nbafl", "pfedhn"): "uploads the update",
        ("nbafl", "bulyan"): "robust rule",
        ("nbafl", "local"): "no weights are aggregated",
        ("nbafl", "centralized"): "the data are pooled",
        ("central", "fedsgd"): "use strategy fedavg",
        ("central", "scaffold I"): "control-variate update",
        ("central", "fedmedian"): "robust rule",
        ("central", "local"): "nothing is aggregated",
        ("central", "centralized"): "no site updates to clip",
    }
    for (mechanism, column), phrase in phrases.items():
        reason = compatibility.verdict(plain_scenario(column), mechanism).reason
        assert reason is not None and phrase in reason, (mechanism, column, reason)
        assert reason.startswith(("strategy ", "privacy.mechanism ")) and f"privacy.mechanism {mechanism}" in reason


def page_table() -> str:
    """The "Privacy mechanism × strategy" table of ``docs/privacy.md``, as it stands."""
    text = PAGE.read_text()
    lines = text[text.index("## Privacy mechanism × strategy"):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    return "\n".join(lines[start:end]) + "\n"


@pytest.fixture(scope="module")
def generated() -> str:
    return compatibility.markdown_table()


def test_the_privacy_page_holds_the_generated_table(generated: str) -> None:
    assert page_table() == generated, "regenerate it with: python -m privacy.compatibility"
    assert "python -m privacy.compatibility" in PAGE.read_text()


def test_the_generated_table_agrees_with_the_cells_run_here(generated: str) -> None:
    rows = {}
    for line in generated.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = dict(zip(compatibility.PROTECTING, cells[1:]))
    assert list(rows) == list(STRATEGIES)
    for mechanism, column in CELLS:
        shown = rows[column][mechanism]
        assert shown == "yes" or re.match(r"no: \S", shown), shown
        assert (shown == "yes") == compatibility.verdict(plain_scenario(column), mechanism).allowed, (mechanism, column)


def test_no_strategy_name_is_written_into_the_privacy_package() -> None:
    source = (ROOT / "privacy" / "compatibility.py").read_text()
    rows = source[source.index("TABLE_ROWS:"):source.index('"""The privacy page\'s table rows')]
    for path in sorted((ROOT / "privacy").glob("*.py")):
        text = path.read_text()
        if path.name == "compatibility.py":
            text = text.replace(rows, "")  # the table's row labels: presentation, no decision reads them
        for name in BUILTIN_ALGORITHMS:
            assert not re.search(rf"[\"']{name}[\"'](?!\s*:)", text), (path.name, name)  # a key is no name
