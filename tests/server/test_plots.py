"""What a figure says: units on the axes, integer rounds, the data in titles, the FBP baseline, the ε panel,
the attention colour scale, the segmentation legend, and example pictures of runs without a global model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.colors
import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from medtasks.ct.task import CTReconstructionTask
from medtasks.mil.plots import attention_scale, plot_bags
from medtasks.segmentation import synthetic
from medtasks.segmentation.task import SegmentationTask, class_colours, plot_overlays
from server.example_plots import ExamplePlots, SiteModels, accepts_title, example_title
from server.plots import METRIC_UNITS, axis_label, metric_figures, metric_units
from tests.helpers import run, small_scenario

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _records(*, epsilon: bool = False) -> list[dict[str, Any]]:
    """Three rounds of a CT-like run: train loss; evaluate and central PSNR/RMSE with the FBP's PSNR beside."""
    records = []
    for rnd in (1, 2, 3):
        quality = {"loss": 1.0 / rnd, "psnr": 25.0 + rnd, "psnr_fbp": 24.0, "rmse_hu": 60.0 - rnd}
        for phase in ("train", "evaluate", "central"):
            aggregate = {"loss": 1.0 / rnd} if phase == "train" else quality
            clients = {} if phase == "central" else {str(k): dict(aggregate) for k in range(2)}
            record = {"round": rnd, "phase": phase, "clients": clients, "aggregate": aggregate, "epsilon": None}
            if epsilon:
                record.update(epsilon=0.8 * rnd, delta=1e-5, accountant="rdp")
            records.append(record)
    return records


def _figures(records: list[dict], **options: Any) -> dict[str, Any]:
    return dict(metric_figures(records, primary_metric="psnr", title="ct-small",
                               units=metric_units(CTReconstructionTask), **options))


def test_axes_name_the_units_the_task_declares() -> None:
    figures = _figures(_records())
    ylabel = {name: fig.axes[0].get_ylabel() for name, fig in figures.items()}
    assert ylabel["central_psnr.png"] == "psnr (dB)"
    assert ylabel["central_psnr_fbp.png"] == "psnr_fbp (dB)"
    assert ylabel["evaluate_rmse_hu.png"] == "rmse_hu (HU)"
    assert ylabel["train_loss.png"] == "loss"  # unitless
    assert [ax.get_ylabel() for ax in figures["overview.png"].axes] == ["loss", "psnr (dB)"]


def test_a_task_declares_its_units_and_the_default_table_fills_in() -> None:
    assert metric_units(SegmentationTask)["hd95"] == "px"  # the synthetic and folder data carry no spacing
    assert metric_units(object())["psnr"] == METRIC_UNITS["psnr"] == "dB"
    assert axis_label("hd95", {**METRIC_UNITS, "hd95": "mm"}) == "hd95 (mm)"  # the task's unit wins
    assert axis_label("dice_organ", METRIC_UNITS) == "dice_organ"


def test_rounds_are_integer_ticks_and_titles_name_the_data() -> None:
    figures = _figures(_records())
    for name, fig in figures.items():
        for ax in fig.axes:
            ticks = ax.get_xticks()
            assert np.allclose(ticks, np.round(ticks)), (name, ticks)
    assert figures["central_psnr.png"].axes[0].get_title() == "ct-small — central psnr (server test set)"
    assert figures["evaluate_psnr.png"].axes[0].get_title() == "ct-small — evaluate psnr (sites' validation splits)"
    legend = [text.get_text() for text in figures["overview.png"].axes[1].get_legend().get_texts()]
    assert "central (server test set)" in legend


def _dashed(ax: Any) -> dict[str, list[float]]:
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines() if line.get_linestyle() == "--"}


def test_psnr_curves_draw_the_recorded_fbp_baseline_dashed() -> None:
    figures = _figures(_records())
    assert _dashed(figures["central_psnr.png"].axes[0]) == {"FBP baseline": [24.0, 24.0, 24.0]}
    assert _dashed(figures["evaluate_rmse_hu.png"].axes[0]) == {}  # no rmse_hu_fbp recorded: nothing invented
    assert set(_dashed(figures["overview.png"].axes[1])) == {"federated evaluate: FBP baseline",
                                                             "central: FBP baseline"}


def test_a_private_run_overview_plots_epsilon_against_its_target() -> None:
    overview = _figures(_records(epsilon=True), target_epsilon=4.0)["overview.png"]
    assert len(overview.axes) == 3
    panel = overview.axes[2]
    assert panel.get_ylabel() == "ε"
    curves = {line.get_label(): list(line.get_ydata()) for line in panel.get_lines()}
    assert curves["ε spent"] == pytest.approx([0.8, 1.6, 2.4])
    assert curves["target ε = 4"] == [4.0, 4.0]
    assert len(_figures(_records())["overview.png"].axes) == 2  # no ε without DP


def test_attention_is_coloured_from_zero_to_its_maximum_with_the_uniform_level_marked() -> None:
    attention = np.array([0.2, 0.3, 0.25, 0.25, np.nan])  # 4 real tiles, 1 padded slot
    assert attention_scale(attention, normalised=True) == (0.0, 0.3, 0.25)
    assert attention_scale(attention, normalised=False) == (0.0, 1.0, None)  # tile probabilities

    bags = np.random.default_rng(0).random((1, 5, 3, 4, 4))
    padding = np.array([[False, False, False, False, True]])
    figure = plot_bags(bags, np.nan_to_num(attention)[None], np.zeros((1, 5)), np.array([0.7]), padding)
    image = figure.axes[1].get_images()[0]
    assert image.get_clim() == (0.0, 0.3)
    colorbar = image.colorbar
    assert "uniform 1/n = 0.25" in [label.get_text() for label in colorbar.ax.get_yticklabels()]


def test_segmentation_overlays_have_a_legend_of_the_class_names_in_their_colours(tmp_path: Path) -> None:
    labels = tuple(f"{k}: {name}" for k, name in enumerate(synthetic.CLASS_NAMES))
    masks = np.zeros((1, 8, 8), dtype=np.int64)
    masks[0, 2:5, 2:5] = 3
    figure = plot_overlays(np.zeros((1, 8, 8)), masks, masks, labels)
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["0: background", "1: organ", "2: organ2", "3: lesion"]
    lesion = matplotlib.colors.to_rgb(class_colours(4)[3])
    assert legend.legend_handles[3].get_facecolor()[:3] == pytest.approx(lesion)
    truth_cmap, pred_cmap = (ax.get_images()[1].get_cmap() for ax in figure.axes[1:3])
    assert truth_cmap.colors == pred_cmap.colors  # the same colour for a class in truth and prediction


def test_an_example_title_names_the_round_the_model_and_the_data() -> None:
    assert example_title("quickstart", 3, None, "the server test set") == \
        "quickstart — round 3: global model on the server test set"
    assert example_title("local", 2, 0, "site 0's validation split") == \
        "local — round 2: site 0's own model on site 0's validation split"
    assert accepts_title(SegmentationTask.plot_examples)
    assert not accepts_title(lambda model, dataset, path: None)  # a task written before titles


class _Personal:
    """A local-only-like server half: every site's model, no global one."""

    def __init__(self, models: dict[int, ArrayRecord]) -> None:
        self.models = models

    def personal_arrays(self) -> dict[int, ArrayRecord]:
        return self.models


def test_without_a_global_model_the_first_site_own_model_is_drawn(tmp_path: Path) -> None:
    template = torch.nn.Linear(2, 1)
    own = {pid: ArrayRecord({"weight": torch.full((1, 2), float(pid)), "bias": torch.zeros(1)}) for pid in (2, 1)}
    drawn: list[tuple[float, str]] = []

    class Task:
        def server_data(self) -> str:
            return "test set"

        def plot_examples(self, model: torch.nn.Module, dataset: str, path: Path, *, title: str = "") -> None:
            drawn.append((float(model.weight.detach()[0, 0]), title))

    plots = ExamplePlots(Task(), lambda arrays: template, tmp_path, every=1, complete=True,  # type: ignore[arg-type]
                         sites=SiteModels(_Personal(own), None, {}, template), title="local")  # type: ignore[arg-type]
    plots.draw(ArrayRecord(), tmp_path / "examples.png", 4)
    assert drawn == [(1.0, "local — round 4: site 1's own model on the server test set")]
    assert float(template.weight.detach()[0, 0]) != 1.0  # a copy was loaded, not the server's model


def test_a_fedbn_run_draws_examples_with_a_site_own_model(tmp_path: Path) -> None:
    scenario = small_scenario(tmp_path, "strategy.name=fedbn", "strategy.rounds=2", "output.examples_every=2",
                              "local.epochs=1")
    run_dir = run(scenario)
    for path in (run_dir.plots / "examples.png", run_dir.plots / "examples" / "round-002.png"):
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 5_000, path
