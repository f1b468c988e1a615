"""Pictures of what the global model does: a round plug-in that draws examples every k rounds, and at the end.

``output.examples_every: k`` draws the global model's output on a few test images after every k-th round
(``plots/examples/round-NNN.png``); every run with plots draws ``plots/examples.png`` at the end. The images
come from the server's test set, else site 0's validation split, and the task draws them
(:meth:`medtasks.base.Task.plot_examples`). Strategies without one complete global model (local-only,
pFedHN, FedBN, FedPer) have nothing to draw.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord

from medtasks.base import Task
from server.pipeline import Round, RoundPlugin

log = logging.getLogger("medfed")


class ExamplePlots(RoundPlugin):
    """Draws the global model's output on test images (a round plug-in at ``round done``).

    Parameters
    ----------
    task : Task
        The scenario's task (its test data and its drawing).
    model_with : callable
        Arrays → the server's evaluation model loaded with them.
    folder : Path
        The run directory's ``plots/``.
    every : int or None
        ``output.examples_every``: draw after every k-th round (``None``: only at the end).
    complete : bool
        Whether the strategy's global model is a complete model (:attr:`strategies.base.Algorithm.central_evaluation`).
    """

    def __init__(self, task: Task, model_with: Callable[[ArrayRecord], torch.nn.Module], folder: Path, *,
                 every: int | None, complete: bool) -> None:
        self.task, self.model_with, self.folder, self.every, self.complete = task, model_with, folder, every, complete

    def round_done(self, round_: Round) -> None:
        if self.every and round_.number % self.every == 0:
            self.draw(round_.arrays, self.folder / "examples" / f"round-{round_.number:03d}.png")

    def draw(self, arrays: ArrayRecord, path: Path) -> None:
        """The global model ``arrays`` on a few test images, into ``path`` (a failure is a warning, never the run's)."""
        if len(arrays) == 0 or not self.complete:
            return
        try:
            dataset = self.task.server_data()
            if dataset is None:
                dataset = self.task.client_data(0).val
            path.parent.mkdir(parents=True, exist_ok=True)
            self.task.plot_examples(self.model_with(arrays), dataset, path)
        except Exception as error:  # a picture must not lose the run's results
            log.warning("could not draw example predictions: %s", error)
