"""Clients train where ``engine.device`` says, and everything that meets the model follows it there.

This machine may have no GPU, so the placement is checked on PyTorch's ``meta`` device, which runs
shapes without data: a tensor left on the CPU next to a meta model is caught as it would be next to a
CUDA one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from torch.utils.data import TensorDataset

from client.device import client_device, resolve_device
from client.trainer import fit
from medtasks.scenario import EngineSection, LocalSection, Scenario
from strategies import get_algorithm
from strategies.base import ClientRule, StrategyParams, trainable_parameters
from strategies.scaffold import LOCAL_VARIATE_KEY, SERVER_VARIATE_KEY
from tests.helpers import run, small_scenario, without_timing

META = torch.device("meta")


def cuda_available(monkeypatch: pytest.MonkeyPatch, available: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)


# --- which device ---------------------------------------------------------------------------------------
def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_available(monkeypatch, False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu")
    with pytest.raises(ValueError, match=r"^engine\.device: 'cuda' but this machine has no CUDA device"):
        resolve_device("cuda")


def test_with_cuda_auto_and_cuda_are_the_first_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_available(monkeypatch, True)  # only a device object is made: nothing is allocated
    assert resolve_device("auto") == torch.device("cuda") == resolve_device("cuda")
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_simulation_client_without_a_gpu_share_trains_auto_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda_available(monkeypatch, True)
    assert client_device(EngineSection(backend="simulation")) == torch.device("cpu")
    assert client_device(EngineSection(backend="simulation", gpus_per_client=0.5)) == torch.device("cuda")
    assert client_device(EngineSection(backend="inprocess")) == torch.device("cuda")
    assert client_device(EngineSection(backend="deployment", device="cpu")) == torch.device("cpu")


def test_device_settings_travel_to_clients_only_when_set(tmp_path: Path) -> None:
    sent = json.loads(small_scenario(tmp_path).to_json())["engine"]
    assert sorted(sent) == ["backend", "cpus_per_client", "workers"]  # the bytes sent before devices existed
    for setting in ("engine.gpus_per_client=0.5", "engine.device=cpu"):
        scenario = small_scenario(tmp_path, setting)
        assert Scenario.from_json(scenario.to_json()).engine == scenario.engine != EngineSection(backend="inprocess")


def test_a_cpu_run_gives_the_same_metrics_as_the_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a machine without CUDA ``auto`` is the CPU: the same numbers, bit for bit (the messages are longer by
    the setting they carry)."""
    cuda_available(monkeypatch, False)
    runs = [without_timing(run(small_scenario(tmp_path, "strategy.rounds=1", "output.plots=false", *device))
                           .read_metrics()) for device in ([], ["engine.device=cpu"])]
    assert [r.pop("bytes_down") for r in runs[0]] != [r.pop("bytes_down") for r in runs[1]]
    assert runs[0] == runs[1]
    assert [r["phase"] for r in runs[0]][:2] == ["train", "evaluate"] and all(r["clients"] for r in runs[0][:2])


# --- everything follows the model -----------------------------------------------------------------------
class Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden, self.out = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


class RecordingTask:
    """Cross-entropy of the classifier; notes the device of every tensor of every batch it is given."""

    def __init__(self) -> None:
        self.devices: list[torch.device] = []

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        self.devices += [tensor.device for tensor in batch]
        x, y = batch
        return F.cross_entropy(model(x), y)


class DataFreeLoss(RecordingTask):
    """As :class:`RecordingTask`, but the loss is a CPU number (``fit`` reads it; a meta tensor holds none)."""

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor:
        super().loss(model, batch)  # the model runs on the batch: a CPU batch next to a meta model fails here
        return torch.zeros((), requires_grad=True)


def examples(count: int = 10) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(count, 3, generator=generator), torch.randint(0, 2, (count,), generator=generator))


def test_fit_hands_the_task_every_batch_on_the_model_device() -> None:
    task, local = DataFreeLoss(), LocalSection(batch_size=4, epochs=2)
    result = fit(Classifier().to(META), task, examples(10), local, ClientRule(StrategyParams()),
                 torch.Generator().manual_seed(0))
    assert result.steps == 6  # 2 epochs of 3 batches
    assert task.devices == [META] * 12  # x and y of each batch


def rule_after_a_step(name: str, params: dict[str, Any]) -> tuple[ClientRule, torch.nn.Module]:
    """The client rule of ``name`` after receive, before_training and after_backward with a model on meta; the
    message and the node state hold CPU tensors, as they arrive."""
    algorithm = get_algorithm(name)
    rule = algorithm.client_rule(algorithm.Params.model_validate(params))
    model = Classifier()
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "config": ConfigRecord({})})
    state = RecordDict()
    if name == "scaffold":
        zeros = {key: torch.zeros_like(p) for key, p in trainable_parameters(model).items()}
        content[SERVER_VARIATE_KEY] = ArrayRecord(zeros)
        state[LOCAL_VARIATE_KEY] = ArrayRecord(zeros)  # c_k of an earlier round
    model.to(META)
    rule.receive(model, content, state)
    rule.before_training(model, RecordingTask(), examples(), LocalSection(batch_size=4, optimizer="sgd"))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    rule.after_backward(model)
    return rule, model


def tensors_in(value: Any) -> list[torch.Tensor]:
    """Every tensor held by ``value``: its attributes, mappings and sequences, nested."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for item in value.values() for t in tensors_in(item)]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in tensors_in(item)]
    if hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
        return tensors_in(vars(value))
    return []


@pytest.mark.parametrize(("name", "params"), [
    ("fedavg", {"proximal_mu": 0.1}),
    ("scaffold", {"variate": "I"}),
    ("scaffold", {"variate": "II"}),
    ("fedsgd", {}),
    ("pfedhn", {}),
])
def test_every_tensor_a_client_rule_keeps_is_on_the_model_device(name: str, params: dict[str, Any]) -> None:
    rule, model = rule_after_a_step(name, params)
    kept = tensors_in(rule)
    assert kept, f"{name} kept no tensors: the check would be empty"
    assert {t.device for t in kept} <= {META}, f"{name} keeps tensors on {sorted({str(t.device) for t in kept})}"
    assert {p.grad.device for p in model.parameters() if p.grad is not None} == {META}
