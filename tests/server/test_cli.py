"""The ``medfed`` conveniences: --version, -v anywhere, list's columns, show, init, task modules beside a scenario."""

from __future__ import annotations

import logging
import re
import shutil
import sys
from importlib import metadata
from pathlib import Path

import pytest
import yaml

from medtasks.registry import UnknownTaskError, get_task_class, locate_task_module
from server import scaffold
from server.cli import EXIT_INVALID, _parser, main
from server.results import RunDirectory
from server.scenario import load
from tests.helpers import GRADIENT_DESCENT, QUADRATIC, ROOT
from tests.server.test_sweep import tiny_tabular
from tests.strategies.toy_tasks import QuadraticTask

VERSION_LINE = re.compile(r"medfed \d+\.\d+\.\d+\S* \(torch \S+, flwr \S+, opacus \S+, monai \S+, python \d+\.\d+\.\d+\)")


# --- medfed --version -----------------------------------------------------------------------------------
def test_version_names_medfed_its_libraries_and_python(capsys) -> None:
    with pytest.raises(SystemExit) as leaving:
        main(["--version"])
    assert leaving.value.code == 0
    out = capsys.readouterr().out.strip()
    assert VERSION_LINE.fullmatch(out), out
    assert out.startswith(f"medfed {metadata.version('medfed')} (torch {metadata.version('torch')}, ")


def test_version_of_a_source_tree_that_is_not_installed_comes_from_pyproject(monkeypatch) -> None:
    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(scaffold.metadata, "version", not_installed)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{scaffold.medfed_version()}"' in pyproject
    assert "torch not installed" in scaffold.version_line()


# --- -v before or after the command ---------------------------------------------------------------------
@pytest.mark.parametrize("before", [True, False], ids=["before", "after"])
def test_verbose_before_or_after_the_command_turns_on_debug_logging(before: bool, tmp_path: Path) -> None:
    command = ["validate", str(tiny_tabular(tmp_path))]
    assert main(["-v", *command] if before else [*command, "-v"]) == 0
    assert logging.getLogger("medfed").level == logging.DEBUG
    assert logging.getLogger("flwr").level == logging.DEBUG
    assert main(command) == 0
    assert logging.getLogger("medfed").level == logging.INFO


@pytest.mark.parametrize("argv", [["deploy", "status", "x", "-v"], ["superlink", "stop", "--verbose"],
                                  ["compare", "a", "-v"], ["-v", "compare", "a"], ["init", "-v"]])
def test_every_command_accepts_verbose_after_it(argv: list[str]) -> None:
    assert _parser().parse_args(argv).verbose is True


# --- medfed list ----------------------------------------------------------------------------------------
@pytest.fixture
def listed_folder(tmp_path: Path) -> Path:
    """A digits scenario with a long description, a label-flipping attack on the tabular task, an invalid file."""
    folder = tmp_path / "scenarios"
    folder.mkdir()
    digits = yaml.safe_load((ROOT / "scenarios" / "digits-iid.yaml").read_text())
    digits["description"] = "A description long enough to be shortened: " + "words " * 20 + "THE END"
    (folder / "digits.yaml").write_text(yaml.safe_dump(digits))
    shutil.copy(ROOT / "scenarios" / "attack-label-flip-tabular.yaml", folder)
    (folder / "broken.yaml").write_text("name: broken\ntask: {name: no-such-task}\n")
    return folder


def test_list_shows_description_strategy_privacy_attack_and_invalid_files(listed_folder: Path, capsys) -> None:
    assert main(["list", str(listed_folder)]) == EXIT_INVALID  # today's code for a folder with an invalid file
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "file" in line)
    assert re.search(r"file.*description.*task.*strategy.*privacy.*attack.*rounds.*engine", header), header
    assert "A description long enough" in out and "THE END" not in out  # shortened to fit
    assert "label_flip" in out and "fedavg" in out and "none" in out
    error_cells = " ".join(" ".join(re.findall(r"^│[^│]*│([^│]*)│", out, re.M)).split())  # descriptions, wrapped
    assert "invalid: " in error_cells and "partition: required key is missing (and 1 more problem)" in error_cells


def test_list_wide_shows_whole_descriptions_and_no_attack_column_without_attacks(listed_folder: Path,
                                                                                 capsys) -> None:
    for name in ("attack-label-flip-tabular.yaml", "broken.yaml"):
        (listed_folder / name).unlink()
    assert main(["list", str(listed_folder), "--wide"]) == 0
    out = capsys.readouterr().out
    assert "THE END" in out
    assert "attack" not in out and "privacy" in out


# --- medfed show ----------------------------------------------------------------------------------------
def test_show_prints_the_resolved_scenario_that_loads_back_equal(tmp_path: Path, capsys) -> None:
    source = tiny_tabular(tmp_path)
    assert main(["show", str(source), "--set", "strategy.rounds=3"]) == 0
    shown = tmp_path / "shown.yaml"
    shown.write_text(capsys.readouterr().out)
    resolved = load(source, ["strategy.rounds=3"])
    assert load(shown) == resolved and shown.read_text() == resolved.to_yaml()
    assert yaml.safe_load(shown.read_text())["task"]["params"]["num_classes"] == 3  # the params, resolved


def test_show_of_an_invalid_scenario_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["show", str(tiny_tabular(tmp_path)), "--set", "strategy.rounds=0"]) == EXIT_INVALID
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1 and "strategy.rounds" in captured.err


# --- medfed init ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", sorted(scaffold.STARTERS))
def test_init_writes_a_starter_that_validates(task: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / f"my {task}.yaml"
    assert main(["init", str(path), "--task", task]) == 0
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    text = path.read_text()
    assert text.startswith("#") and f"medfed run {path}" in text
    scenario = load(path)
    assert scenario.name == f"my-{task}" and scenario.task.name == task


def test_init_refuses_to_overwrite_without_force(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--task", "tabular", "--strategy", "fedmedian"]) == 0
    written = (tmp_path / "scenario.yaml").read_text()
    starter = load(tmp_path / "scenario.yaml")
    assert starter.strategy.name == "fedmedian" and starter.description.endswith("[strategy fedmedian set by medfed init]")
    assert main(["init", "--task", "digits"]) == EXIT_INVALID
    assert "scenario.yaml exists; add --force" in capsys.readouterr().err
    assert (tmp_path / "scenario.yaml").read_text() == written
    assert main(["init", "--task", "digits", "--force"]) == 0
    assert load(tmp_path / "scenario.yaml").task.name == "digits"


def test_init_with_an_unknown_strategy_writes_nothing(tmp_path: Path, capsys) -> None:
    assert main(["init", str(tmp_path / "s.yaml"), "--strategy", "fedmagic"]) == EXIT_INVALID
    assert "strategy.name" in capsys.readouterr().err and not (tmp_path / "s.yaml").exists()


# --- a task module beside the scenario file -------------------------------------------------------------
@pytest.fixture
def clean_imports(tmp_path: Path, monkeypatch):
    """After the test: sys.path as it was, no module of ``tmp_path`` imported, task names resolved afresh."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    get_task_class.cache_clear()
    yield
    for name, module in list(sys.modules.items()):
        if Path(getattr(module, "__file__", None) or "/").is_relative_to(tmp_path):
            del sys.modules[name]
    get_task_class.cache_clear()


def _beside(folder: Path, module: str) -> Path:
    """A scenario file in ``folder`` whose task, ``module:SiteTask``, is a module written next to it."""
    (folder / f"{module}.py").write_text(
        "from tests.strategies.toy_tasks import QuadraticTask\n\n\nclass SiteTask(QuadraticTask):\n    pass\n")
    scenario = {
        "name": "custom", "task": {"name": f"{module}:SiteTask", "model": "linear"},
        "data": {"samples_per_client": 20}, "partition": {"clients": 2},
        "strategy": {"name": "fedavg", "rounds": 2}, "local": GRADIENT_DESCENT,
        "engine": {"backend": "inprocess"}, "output": {"dir": str(folder / "runs"), "plots": False},
    }
    path = folder / "custom.yaml"
    path.write_text(yaml.safe_dump(scenario))
    return path


def test_a_task_module_beside_the_scenario_runs_without_pythonpath(tmp_path: Path, clean_imports) -> None:
    path = _beside(tmp_path, "beside_scenario_task")
    assert str(tmp_path) not in sys.path and "beside_scenario_task" not in sys.modules
    assert main(["run", str(path)]) == 0
    run_dir = RunDirectory.open(next((tmp_path / "runs" / "custom").iterdir()))
    saved = yaml.safe_load((run_dir.path / "scenario.yaml").read_text())
    assert saved["task"]["name"] == f"{tmp_path}/beside_scenario_task:SiteTask"  # where the module is, for every node
    assert run_dir.read_summary()["rounds_completed"] == 2
    sys.path.remove(str(tmp_path))  # a fresh client process: the saved name alone finds the module
    del sys.modules["beside_scenario_task"]
    get_task_class.cache_clear()
    resumed = load(run_dir.path / "scenario.yaml")
    assert resumed.task.name == saved["task"]["name"] and str(tmp_path) in sys.path
    assert issubclass(get_task_class(resumed.task.name), QuadraticTask)


def test_only_a_module_beside_the_scenario_gets_its_folder(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text("")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    assert locate_task_module("mine:Task", tmp_path) == f"{tmp_path}/mine:Task"
    assert locate_task_module("pkg.sub:Task", tmp_path) == f"{tmp_path}/pkg.sub:Task"
    for unchanged in ("tabular", QUADRATIC, "/elsewhere/mine:Task", "absent:Task"):
        assert locate_task_module(unchanged, tmp_path) == unchanged


def test_a_folder_that_is_not_here_imports_the_installed_module(tmp_path: Path, clean_imports) -> None:
    assert get_task_class(f"{tmp_path / 'absent'}/{QUADRATIC}") is QuadraticTask  # e.g. on a hospital's machine


def test_a_module_beside_the_scenario_may_not_shadow_one_already_imported(tmp_path: Path, clean_imports) -> None:
    (tmp_path / "json.py").write_text("class Task:\n    pass\n")
    with pytest.raises(UnknownTaskError, match="a module 'json' is already imported from"):
        get_task_class(f"{tmp_path}/json:Task")
