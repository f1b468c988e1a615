"""The Deployment Engine across separate network stacks: the SuperLink and each SuperNode in their own Linux network
namespace, joined only by veth pairs, as on separate hosts. Needs permission to create namespaces (root)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.federation import (
    LocalFederation,
    Namespaces,
    assert_same_run,
    run_deployed,
    run_inprocess,
    timing_report,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    reason = Namespaces.unavailable()
    if reason:
        pytest.skip(f"network namespaces unavailable: {reason}")
    with LocalFederation(tmp_path_factory.mktemp("federation"), network=Namespaces(2)) as started:
        yield started.start()


def test_only_the_hospitals_namespaces_reach_the_superlink(federation: LocalFederation) -> None:
    assert federation.reaches_superlink("node0")
    assert federation.reaches_superlink("node1")
    assert not federation.reaches_superlink(None), "the SuperLink is reachable from the host's network"


def test_a_two_round_scenario_runs_across_namespaces(federation: LocalFederation, tmp_path: Path,
                                                     record_property) -> None:
    deployed = run_deployed(federation, tmp_path / "deployed")
    local = run_inprocess(tmp_path / "inprocess")
    for key, value in timing_report(deployed, local).items():
        record_property(key, value)
        print(f"{key}: {value}")
    assert_same_run(deployed.run_dir, local)
