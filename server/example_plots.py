"""Pictures of what the trained model does: a round plug-in that draws examples every k rounds, and at the end.

``output.examples_every: k`` draws the model's output on a few test images after every k-th round
(``plots/examples/round-NNN.png``); every run with plots draws ``plots/examples.png`` at the end. The task
draws them (:meth:`medtasks.base.Task.plot_examples`), under a heading that names the round, the model and
the images: the server's test set, else the site's validation split. A strategy with one complete global
model is drawn with it (pFedHN's is the mean of the sites' models); one without (local-only, FedBN,
FedPer) with the first site's own model (:class:`SiteModels`).
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from flwr.app import ArrayRecord, RecordDict
from torch.utils.data import Dataset

from client.state import from_plain
from medtasks.base import Task
from server.pipeline import Round, RoundPlugin
from strategies.base import ARRAYS_KEY, ClientRule, Personalized, load_into

log = logging.getLogger("medfed")


class SiteModel(NamedTuple):
    """One site's own model: its partition id and the model."""

    partition_id: int
    model: torch.nn.Module


class SiteModels:
    """The first site's own model, for strategies without one complete global model.

    A :class:`~strategies.base.Personalized` strategy holds every site's model on the server (the models its
    central evaluation scores). A strategy whose sites keep some tensors (FedBN's BatchNorm, FedPer's head)
    has the global shared tensors, and the server's copy of each site's node state
    (``output.checkpoint_node_state``) holds the rest: the site's client rule puts them together, as the site
    does before it evaluates. Each model is a copy of ``template``: drawing never touches the server's
    evaluation model or a random stream.

    Parameters
    ----------
    strategy : object
        The run's server half.
    rule : ClientRule
        The run's client half (how a site loads what it received and what it kept).
    node_states : mapping
        Partition id (a string) → the server's copy of that site's plain node state
        (:attr:`server.node_states.NodeStates.copies`).
    template : torch.nn.Module
        A model of the task.
    """

    def __init__(self, strategy: Any, rule: ClientRule, node_states: Mapping[str, Any],
                 template: torch.nn.Module) -> None:
        self.strategy, self.rule, self.node_states, self.template = strategy, rule, node_states, template

    def first(self, arrays: ArrayRecord) -> SiteModel | None:
        """The lowest partition id's own model after the global ``arrays``; None when the server has none."""
        if isinstance(self.strategy, Personalized):
            personal = self.strategy.personal_arrays()
            if not personal:
                return None
            pid = min(personal)
            model = copy.deepcopy(self.template)
            load_into(model, personal[pid].to_torch_state_dict())
            return SiteModel(pid, model)
        if not self.node_states:
            return None
        pid = min(int(key) for key in self.node_states)
        model = copy.deepcopy(self.template)
        self.rule.receive(model, RecordDict({ARRAYS_KEY: arrays}), from_plain(self.node_states[str(pid)]))
        return SiteModel(pid, model)


class ExamplePlots(RoundPlugin):
    """Draws the model's output on test images (a round plug-in at ``round done``).

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
    sites : SiteModels, optional
        The sites' own models, drawn when the global model is incomplete or empty (none: nothing is drawn then).
    title : str
        The heading's prefix (the scenario's name).
    """

    def __init__(self, task: Task, model_with: Callable[[ArrayRecord], torch.nn.Module], folder: Path, *,
                 every: int | None, complete: bool, sites: SiteModels | None = None, title: str = "") -> None:
        self.task, self.model_with, self.folder, self.every, self.complete = task, model_with, folder, every, complete
        self.sites, self.title = sites, title

    def round_done(self, round_: Round) -> None:
        if self.every and round_.number % self.every == 0:
            self.draw(round_.arrays, self.folder / "examples" / f"round-{round_.number:03d}.png", round_.number)

    def draw(self, arrays: ArrayRecord, path: Path, round_number: int) -> None:
        """The model after round ``round_number`` on a few test images, into ``path`` (a failure is a warning,
        never the run's)."""
        try:
            chosen = self._model(arrays)
            if chosen is None:
                return
            model, site = chosen
            dataset, data_name = self._dataset(site)
            path.parent.mkdir(parents=True, exist_ok=True)
            heading = example_title(self.title, round_number, site, data_name)
            plot = self.task.plot_examples
            if accepts_title(plot):
                plot(model, dataset, path, title=heading)  # type: ignore[call-arg]
            else:
                plot(model, dataset, path)
        except Exception as error:  # a picture must not lose the run's results
            log.warning("could not draw example predictions: %s", error)

    def _model(self, arrays: ArrayRecord) -> tuple[torch.nn.Module, int | None] | None:
        """The model to draw and its site (None: the global model), or None when there is nothing to draw."""
        if self.complete and len(arrays) > 0:
            return self.model_with(arrays), None
        own = self.sites.first(arrays) if self.sites is not None else None
        if own is None:
            log.info("no example pictures: no complete global model, and no site model on the server")
            return None
        return own.model, own.partition_id

    def _dataset(self, site: int | None) -> tuple[Dataset, str]:
        """The images to draw and their name: the server's test set, else the site's (site 0's) validation split."""
        dataset = self.task.server_data()
        if dataset is not None:
            return dataset, "the server test set"
        pid = 0 if site is None else site
        return self.task.client_data(pid).val, f"site {pid}'s validation split"


def example_title(title: str, round_number: int, site: int | None, data_name: str) -> str:
    """The heading of an example picture: the run, the round, the model and the images.

    >>> example_title("quickstart", 3, None, "the server test set")
    'quickstart — round 3: global model on the server test set'
    >>> example_title("fedbn", 3, 1, "site 1's validation split")
    "fedbn — round 3: site 1's own model on site 1's validation split"
    """
    model = "global model" if site is None else f"site {site}'s own model"
    what = f"round {round_number}: {model} on {data_name}"
    return f"{title} — {what}" if title else what


def accepts_title(plot: Callable[..., Any]) -> bool:
    """Whether a task's ``plot_examples`` takes the keyword ``title`` (tasks written before it do not)."""
    parameters = inspect.signature(plot).parameters.values()
    return any(p.name == "title" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
