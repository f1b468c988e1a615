"""Discovery: small federations describe every site at once; large ones describe a site when first sampled,
with the same metrics, and no other site builds its data (10,000 sites in-process)."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Message
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from client import cache
from client.app import app as client_app
from server import discovery
from server.engines import InProcessGrid
from server.results import RunDirectory
from server.scenario import Scenario, load
from tests.helpers import ROOT, interrupted_and_resumed, run, without_timing

TABULAR = ROOT / "scenarios" / "tabular-dp-none.yaml"


def tabular(tmp_path: Path, clients: int, sampled: int, *overrides: str) -> Scenario:
    """The tabular scenario with ``clients`` small sites, ``sampled`` of them trained and evaluated per round."""
    fraction = sampled / clients
    return load(TABULAR, [f"partition.clients={clients}", "data.samples_per_client=20",
                          "data.server_samples=200", f"strategy.fraction_train={fraction}",
                          f"strategy.fraction_evaluate={fraction}", f"strategy.min_clients={sampled}",
                          "strategy.rounds=3", "output.plots=false", f"output.dir={tmp_path / 'runs'}", *overrides])


@pytest.fixture
def fresh_tasks(monkeypatch: pytest.MonkeyPatch) -> OrderedDict:
    """An empty per-process task cache: the tasks (and their sites' data) built from now on."""
    tasks: OrderedDict = OrderedDict()
    monkeypatch.setattr(cache, "_tasks", tasks)
    return tasks


def built_sites(tasks: OrderedDict) -> set[int]:
    """The sites whose data the tabular task built (it keeps each site it was asked for)."""
    return {pid for task in tasks.values() for pid in getattr(task, "_sites", {})}


def sampled_sites(run_dir: RunDirectory) -> set[int]:
    return {int(pid) for record in run_dir.read_metrics() if record["phase"] in ("train", "evaluate")
            for pid in record["clients"]}


def described_sites(run_dir: RunDirectory) -> dict[int, dict]:
    return {int(pid): site for pid, site in json.loads((run_dir.path / "partitions.json").read_text())["clients"].items()}


def test_a_large_federation_describes_only_the_sites_it_samples_with_the_same_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_tasks: OrderedDict) -> None:
    scenario = tabular(tmp_path, 40, 4)
    monkeypatch.setattr(discovery, "DESCRIBE_ALL_UP_TO", 10)  # 40 sites: a large federation here
    lazy = run(scenario)
    sampled = sampled_sites(lazy)
    assert 4 <= len(sampled) < 40
    assert set(described_sites(lazy)) == sampled  # partitions.json: the sites that took part
    assert built_sites(fresh_tasks) == sampled  # no other site built its data, not even to say its partition id

    monkeypatch.setattr(discovery, "DESCRIBE_ALL_UP_TO", 1000)  # every site described at discovery
    eager = run(scenario)
    assert without_timing(eager.read_metrics()) == without_timing(lazy.read_metrics())
    every = described_sites(eager)
    assert sorted(every) == list(range(40))
    assert {pid: every[pid] for pid in sampled} == described_sites(lazy)  # the same statistics either way


def test_a_resumed_large_federation_keeps_the_sites_described_before(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "DESCRIBE_ALL_UP_TO", 10)
    resumed, uninterrupted = interrupted_and_resumed(tabular(tmp_path, 30, 3, "strategy.rounds=4"), after=2)
    assert without_timing(resumed.read_metrics()) == without_timing(uninterrupted.read_metrics())
    assert described_sites(resumed) == described_sites(uninterrupted)  # both parts' sites


def test_nbafl_describes_every_site_of_a_large_federation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "DESCRIBE_ALL_UP_TO", 10)
    assert not discovery.describes_every_site(tabular(tmp_path, 40, 4))
    nbafl = tabular(tmp_path, 40, 4, "privacy.mechanism=nbafl", "privacy.params={epsilon: 10.0, delta: 1.0e-5, clip: 1.0}")
    assert discovery.describes_every_site(nbafl)  # its noise is calibrated from the smallest site


class Relay(Grid):
    """A grid that is not one of this machine's: messages go through, nothing else is known."""

    def __init__(self, inner: InProcessGrid) -> None:
        self.inner = inner

    @property
    def run(self) -> Run:
        return self.inner.run

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.inner.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.inner.send_and_receive(messages, timeout=timeout)


def test_a_flower_grid_is_asked_for_partition_ids_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         fresh_tasks: OrderedDict) -> None:
    monkeypatch.setattr(discovery, "DESCRIBE_ALL_UP_TO", 10)
    inner = InProcessGrid(client_app, 40)
    cohort, sites = discovery.discover(Relay(inner), tabular(tmp_path, 40, 4))
    assert dict(cohort.node_to_partition) == inner.partitions  # learned from the nodes' one-field replies
    assert sites.known == {} and built_sites(fresh_tasks) == set() and not fresh_tasks  # no data, not even a task

    node = inner.node_ids[7]
    assert sites.describe(Relay(inner), cohort, [node]) and list(sites.known) == [7]
    assert not sites.describe(Relay(inner), cohort, [node])  # described once
    assert built_sites(fresh_tasks) == {7}


def test_a_site_that_cannot_say_its_partition_id_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery, "DESCRIBE_ALL_UP_TO", 10)
    inner = InProcessGrid(client_app, 40)
    del inner.contexts[inner.node_ids[3]].node_config["partition-id"]
    with pytest.raises(discovery.InputError, match="could not say its partition id: DataError: node_config has no"):
        discovery.discover(Relay(inner), tabular(tmp_path, 40, 4))


def test_missing_partitions_are_listed_briefly() -> None:
    assert discovery._ids([1, 2]) == "[1, 2]"
    assert discovery._ids(list(range(25))) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, ... 15 more]"


def test_ten_thousand_sites_run_in_process_describing_the_sampled_ones(tmp_path: Path,
                                                                       fresh_tasks: OrderedDict) -> None:
    scenario = tabular(tmp_path, 10_000, 10, "strategy.rounds=2")
    run_dir = run(scenario)
    assert (run_dir.path / "summary.json").exists()
    sampled = sampled_sites(run_dir)
    assert 10 <= len(sampled) <= 40
    assert set(described_sites(run_dir)) == sampled == built_sites(fresh_tasks)
