"""docs/tutorial.md stays runnable: its data script writes folders the segmentation loader reads, its
scenario trains on them, and every ``medfed`` command of the page parses and names scenarios that load."""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from medtasks import io
from medtasks.segmentation.task import SegmentationTask
from server.cli import _parser, main
from server.scenario import load

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "tutorial.md").read_text(encoding="utf-8")
DATA_SCRIPT = "tutorial/make_hospitals.py"
SCENARIO = "tutorial/own-data.yaml"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
FOLDERS = (*(f"hospitals/{name}" for name in HOSPITALS), "test", "new-hospital")
SLICES, PATIENTS, CLASSES = 40, 10, 4  # per folder, as the page says


def code_blocks(language: str) -> list[str]:
    """The bodies of the page's fenced blocks of ``language``, indented ones (inside list items) included."""
    return re.findall(rf"^[ \t]*```{language}\n(.*?)^[ \t]*```", PAGE, re.S | re.M)


def block_named(language: str, file: str) -> str:
    """The one ``language`` block whose first line is the comment ``# <file>: ...``."""
    named = [block for block in code_blocks(language) if block.startswith(f"# {file}:")]
    assert len(named) == 1, f"docs/tutorial.md has {len(named)} {language} blocks for {file}"
    return named[0]


def shell_lines() -> Iterator[list[str]]:
    """Every command line of the page's bash blocks as words (continuation lines joined, comments dropped)."""
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                yield words


def medfed_commands() -> list[list[str]]:
    """The arguments of every ``medfed`` command of the page, in order."""
    return [words[1:] for words in shell_lines() if words[0] == "medfed"]


@pytest.fixture(scope="module")
def tutorial_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder in which the page's data script has run, as the page runs it (from the folder above
    ``tutorial/``), with the page's scenario file saved beside it."""
    root = tmp_path_factory.mktemp("tutorial-root")
    (root / "tutorial").mkdir()
    (root / SCENARIO).write_text(block_named("yaml", SCENARIO), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        exec(compile(block_named("python", DATA_SCRIPT), DATA_SCRIPT, "exec"), {"__name__": "__main__"})
    return root


def test_the_page_runs_the_files_it_shows() -> None:
    assert ["python", DATA_SCRIPT] in list(shell_lines())
    assert ["validate", SCENARIO] in medfed_commands() and ["run", SCENARIO] in medfed_commands()


@pytest.mark.parametrize("folder", FOLDERS)
def test_the_data_script_writes_folders_the_segmentation_loader_reads(tutorial_folder: Path, folder: str) -> None:
    images, masks, ids, cases = io.load_image_mask_pairs(tutorial_folder / "tutorial" / "data" / folder)
    assert len(images) == len(ids) == SLICES
    assert len(set(cases)) == PATIENTS  # <patient>__<slice> names group a patient's slices into one case
    assert all(image.shape == mask.shape == (64, 64) for image, mask in zip(images, masks))
    assert set().union(*(set(mask.flat) for mask in masks)) == set(range(CLASSES))


def test_the_page_scenario_makes_one_site_per_hospital_folder(tutorial_folder: Path) -> None:
    scenario = load(tutorial_folder / SCENARIO)
    assert scenario.task.name == SegmentationTask.name
    task = SegmentationTask(scenario.task_context())
    assert task.num_classes == CLASSES  # read from the masks
    for site, hospital in enumerate(HOSPITALS):
        stats = task.client_data(site).stats
        assert Path(stats["folder"]).name == hospital
        assert stats["n_train"] + stats["n_val"] == SLICES
        train, val = (set(stats["cases"][part]) for part in ("train", "val"))
        assert len(train | val) == PATIENTS and not train & val  # whole patients on each side
    test_set = task.server_data()
    assert test_set is not None and len(test_set) == SLICES  # type: ignore[arg-type]


def test_every_medfed_command_of_the_page_parses(capsys: pytest.CaptureFixture[str]) -> None:
    commands = medfed_commands()
    used = {argv[0] for argv in commands if not argv[0].startswith("-")}
    assert used >= {"run", "list", "show", "init", "validate", "evaluate", "predict", "compare", "report", "sweep"}
    for argv in commands:
        try:
            _parser().parse_args(argv)
        except SystemExit as leaving:  # --version prints and leaves with 0; a bad command with 2
            assert argv == ["--version"] and leaving.code == 0, f"medfed {shlex.join(argv)}: {capsys.readouterr().err}"


def test_every_shipped_scenario_the_page_runs_loads_with_its_settings(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # a sweep's --out, were it created, lands here
    checked = 0
    for argv in medfed_commands():
        if argv == ["--version"]:
            continue
        args = _parser().parse_args(argv)
        scenario = getattr(args, "scenario", None) or ""
        if not scenario.startswith("scenarios/"):
            continue
        if args.command == "sweep":  # every cell is built and validated, none is run
            cells = [str(ROOT / scenario) if word == scenario else word for word in argv]
            assert main([*cells, "--dry-run"]) == 0, shlex.join(argv)
            assert not any(tmp_path.iterdir())
        else:
            load(ROOT / scenario, args.overrides)
        checked += 1
    assert checked >= 10
