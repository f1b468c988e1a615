"""The README's two copy-paste blocks stay in step with CI and the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block_after(heading: str) -> list[str]:
    section = README.split(f"## {heading}\n", 1)[1]
    code = re.search(r"```bash\n(.*?)```", section, re.S)
    assert code, f"no bash block under '{heading}'"
    return [line for line in code.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_block_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for line in block_after("Set up and run the tests"):
        assert line in ci, f"README line missing from .ci/run: {line}"


def test_quickstart_block_installs_cpu_torch_first_and_runs_an_existing_scenario() -> None:
    lines = block_after("Set up and run the quickstart")
    assert lines[1].startswith("pip install torch==2.13.0 && pip install -e .")
    scenario = lines[-1].removeprefix("medfed run ").strip()
    assert (ROOT / scenario).is_file()
