"""A batch of every built-in task moves to a device whole; a model's device; a random stream on a device."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from client.cache import task_for
from client.trainer import make_loader
from medtasks.placement import generator_on, model_device, to_device
from server.scenario import load

ROOT = Path(__file__).resolve().parents[2]
META = torch.device("meta")
TINY = ["partition.clients=2", "strategy.min_clients=1", "data.server_samples=0", "engine.backend=inprocess"]
TASKS = {  # one scenario of each built-in task, shrunk to a few samples
    "segmentation": ("quickstart", ["task.params.image_size=32", "data.samples_per_client=8"]),
    "ct": ("ct-iid", ["task.params.image_size=32", "task.params.num_views=8", "data.samples_per_client=8"]),
    "mil": ("mil-iid", ["task.params.tiles_per_slide=4", "task.params.tile_size=16", "data.samples_per_client=8"]),
    "tabular": ("tabular-dp-none", ["data.samples_per_client=20"]),
    "digits": ("digits-iid", ["data.samples_per_client=20"]),
}


def first_training_batch(task_name: str) -> Any:
    """The first batch site 0's trainer draws, as the DataLoader collates it."""
    scenario_name, overrides = TASKS[task_name]
    scenario = load(ROOT / "scenarios" / f"{scenario_name}.yaml", [*TINY, *overrides])
    assert scenario.task.name == task_name
    dataset = task_for(scenario).client_data(0).train
    return next(iter(make_loader(dataset, 4, torch.Generator().manual_seed(0))))


@pytest.mark.parametrize("task_name", sorted(TASKS))
def test_every_tensor_of_a_task_batch_moves_to_the_device(task_name: str) -> None:
    batch = first_training_batch(task_name)
    moved = to_device(batch, META)
    assert type(moved) is type(batch) and len(moved) == len(batch) >= 2
    for before, after in zip(batch, moved):
        assert after.device == META and after.shape == before.shape and after.dtype == before.dtype


@dataclasses.dataclass(frozen=True)
class Scan:
    image: torch.Tensor
    site: str
    spacing: tuple[float, float]


class Pair(NamedTuple):
    scan: Scan
    labels: dict[str, torch.Tensor]


def test_nested_structures_keep_their_types_and_their_non_tensors() -> None:
    batch = [Pair(Scan(torch.ones(2, 3), "site-a", (0.5, 0.5)), {"mask": torch.zeros(2, dtype=torch.bool)}), 7]
    moved = to_device(batch, META)
    pair = moved[0]
    assert isinstance(pair, Pair) and isinstance(pair.scan, Scan) and moved[1] == 7
    assert pair.scan.image.device == META and pair.labels["mask"].device == META
    assert (pair.scan.site, pair.scan.spacing) == ("site-a", (0.5, 0.5))
    assert batch[0].scan.image.device == torch.device("cpu")  # the input is left as it was


def test_on_its_own_device_a_batch_is_the_same_objects() -> None:
    x, y = torch.ones(3), torch.zeros(3)
    moved = to_device((x, y), torch.device("cpu"))
    assert moved[0] is x and moved[1] is y  # no copy: CPU runs compute exactly what they did


def test_model_device_is_where_its_tensors_are() -> None:
    assert model_device(torch.nn.Linear(2, 2).to(META)) == META
    assert model_device(torch.nn.BatchNorm1d(2, affine=False).to(META)) == META  # buffers only
    assert model_device(torch.nn.ReLU()) == torch.device("cpu")


class RecordedGenerator:
    """Stands in for ``torch.Generator`` on a device this machine may not have."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seed = torch.device(device), None

    def manual_seed(self, seed: int) -> RecordedGenerator:
        self.seed = seed
        return self


def test_a_generator_moves_to_another_device_with_its_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    generator = torch.Generator().manual_seed(1234)
    assert generator_on(generator, torch.device("cpu")) is generator  # the CPU stream itself: same noise as before
    monkeypatch.setattr(torch, "Generator", RecordedGenerator)
    moved = generator_on(generator, torch.device("cuda"))
    assert isinstance(moved, RecordedGenerator) and moved.device == torch.device("cuda") and moved.seed == 1234
