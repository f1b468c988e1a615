"""``medfed report``: one self-contained HTML page per run (or several side by side), written at the end of every
run with plots; its sections, inline images, baselines, the "not finished" mark, and the page in a real browser."""

from __future__ import annotations

import base64
import binascii
import logging
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from server.cli import main
from server.report import REPORT_FILE, build_report, write_run_report
from server.report_data import RunFiles, baselines, read_run
from server.scenario import load
from tests.helpers import ROOT, run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_SECTIONS = {"Scenario", "Sites", "Metrics", "Privacy", "Examples", "Results"}  # a DP run without an attack
TABULAR = [  # tabular-dp-eps4 shrunk to a second: 4 sites of 40 samples, 2 rounds, plots on
    "strategy.rounds=2", "partition.clients=4", "strategy.min_clients=2", "data.samples_per_client=40",
    "data.server_samples=100", "engine.backend=inprocess", "output.plots=true",
]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list[Path]:
    """A DP-SGD run and the same scenario without privacy, each of which wrote its own report.html."""
    folder = tmp_path_factory.mktemp("report")
    scenario = ROOT / "scenarios" / "tabular-dp-eps4.yaml"
    return [run(load(scenario, [*TABULAR, f"output.dir={folder}", *extra])).path
            for extra in ([], ["privacy.mechanism=none", "privacy.params={}"])]


class Page(HTMLParser):
    """What the tests read of a page: headings, image sources, link targets, scripts, paragraphs' text."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.headings: list[str] = []
        self.sources: list[str] = []
        self.links: list[str] = []
        self.scripts = 0
        self._heading: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag in ("h1", "h2", "h3"):
            self._heading = []
        self.sources += [values["src"] or ""] if "src" in values else []
        self.links += [values["href"] or ""] if "href" in values else []
        self.scripts += tag == "script"

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._heading.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append("".join(self._heading))
            self._heading = None


def test_a_run_with_plots_writes_its_report_at_the_end(two_runs: list[Path]) -> None:
    page = Page((two_runs[0] / REPORT_FILE).read_text(encoding="utf-8"))
    assert RUN_SECTIONS <= set(page.headings)
    assert "Privacy" not in Page((two_runs[1] / REPORT_FILE).read_text(encoding="utf-8")).headings


def test_the_page_is_self_contained_every_image_an_inline_png(two_runs: list[Path]) -> None:
    page = Page(build_report([two_runs[0]]))
    assert len(page.sources) >= 5  # sites, training loss, each evaluation metric, ε, examples
    for source in page.sources:
        assert source.startswith("data:image/png;base64,"), source[:40]
        assert base64.b64decode(source.split(",", 1)[1], validate=True).startswith(PNG_MAGIC)
    assert not [target for target in page.sources + page.links if "http://" in target or "https://" in target]
    assert page.scripts == 0


def test_the_scenario_is_told_in_words_beside_the_whole_yaml(two_runs: list[Path]) -> None:
    html = build_report([two_runs[0]])
    for words in ("DP-SGD", "target ε = 4.0", "label skew", "fedavg for 2 rounds", "seed 0", "<details>"):
        assert words in html, words
    assert "max_grad_norm: 1.0" in html  # the resolved scenario.yaml, whole


def test_accuracy_is_read_against_chance_auc_against_one_half_and_ct_against_fbp(two_runs: list[Path]) -> None:
    tabular = read_run(two_runs[0])
    assert [b.value for b in baselines(tabular, "accuracy")] == [pytest.approx(0.1)]  # 10 classes
    assert [b.value for b in baselines(tabular, "auc")] == [0.5]
    assert baselines(tabular, "loss") == []
    records = [{"round": 1, "phase": "central", "aggregate": {"psnr": 31.0, "psnr_fbp": 27.5}}]
    ct = RunFiles(tabular.path, {"task": {"name": "ct"}}, "", {}, records, None, primary="psnr")
    (fbp,) = baselines(ct, "psnr")
    assert fbp.curve == {1: 27.5} and "FBP" in fbp.label


def test_a_run_without_summary_is_reported_as_not_finished(two_runs: list[Path], tmp_path: Path) -> None:
    unfinished = Path(shutil.copytree(two_runs[0], tmp_path / "run"))
    (unfinished / "summary.json").unlink()
    html = build_report([unfinished])
    assert "not finished" in html and f"medfed run --resume {unfinished}" in html
    assert {"Metrics", "Sites", "Results"} <= set(Page(html).headings)


def test_a_large_federation_says_its_table_holds_the_described_sites_only(two_runs: list[Path],
                                                                          tmp_path: Path) -> None:
    large = Path(shutil.copytree(two_runs[0], tmp_path / "run"))
    scenario = yaml.safe_load((large / "scenario.yaml").read_text())
    scenario["partition"]["clients"] = 5000
    (large / "scenario.yaml").write_text(yaml.safe_dump(scenario, sort_keys=False))
    assert "describes 4 of 5000 sites" in build_report([large])


def test_several_runs_start_with_the_compare_table(two_runs: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "both.html"
    assert main(["report", *map(str, two_runs), "--out", str(out)]) == 0
    assert f"report: {out}" in capsys.readouterr().out
    page = Page(out.read_text(encoding="utf-8"))
    assert page.headings[1] == "Comparison"
    labels = [heading for heading in page.headings if heading.startswith("tabular-dp-eps4 | privacy.")]
    assert len(labels) == 2  # each run's section under its compare label


def test_a_folder_that_is_not_a_run_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "not a readable run directory" in error and len(error.splitlines()) == 1


def test_a_report_that_cannot_be_written_is_one_warning_not_an_error(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="medfed"):
        assert write_run_report(tmp_path / "missing") is None
    assert [record.message for record in caplog.records if "no report.html" in record.message]


def _browser() -> str | None:
    return next((found for name in ("chromium", "chromium-browser", "google-chrome")
                 if (found := shutil.which(name))), None)


@pytest.mark.skipif(_browser() is None, reason="no chromium, chromium-browser or google-chrome on PATH "
                                               "(apt-get install -y chromium)")
def test_the_page_loads_in_a_headless_browser_without_console_errors(two_runs: list[Path], tmp_path: Path) -> None:
    import matplotlib.image

    page = (two_runs[0] / REPORT_FILE).resolve().as_uri()
    flags = [str(_browser()), "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=120, check=True)
    assert not [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert RUN_SECTIONS <= set(Page(dom.stdout).headings)
    shot = tmp_path / "page.png"
    subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,4000", page], capture_output=True,
                   timeout=120, check=True)
    try:
        pixels = matplotlib.image.imread(shot)
    except (OSError, SyntaxError, binascii.Error) as error:
        pytest.fail(f"the screenshot is not a PNG: {error}")
    assert pixels.shape[:2] == (4000, 1280)
    assert pixels[..., :3].std() > 0.05  # not blank: text and figures on the white page
