"""``medfed deploy`` without a network: the federation folder (CA, server certificate, hospital keys), the Flower CLI
connection, the printed commands, and the input checks of ``medfed run --engine deployment``."""

from __future__ import annotations

import ipaddress
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.app import scenario_from_run_config
from server.cli import main
from server.federation_folder import find_federation
from server.federation_setup import environment_line, init_federation
from server.launch import RESUME_KEY, deployed_scenario, run_config_toml
from tests.deploy.federation import free_port
from tests.helpers import QUICKSTART, small_scenario


@pytest.fixture(autouse=True)
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Federation folders and the Flower CLI's config in ``tmp_path``."""
    monkeypatch.setenv("MEDFED_DEPLOY_HOME", str(tmp_path / "deploy"))
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))


def init(*arguments: str) -> int:
    return main(["deploy", "init", "net", "--address", "10.0.0.5:9093", "--address", "link.example.org:9093",
                 *arguments])


def error_line(capsys: pytest.CaptureFixture) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_the_server_certificate_is_signed_by_the_ca_for_every_address_and_loopback(tmp_path: Path) -> None:
    assert init("--hospitals", "2") == 0
    folder = tmp_path / "deploy" / "net"
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((folder / "server.pem").read_bytes())

    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("10.0.0.5"),
                                                             ipaddress.ip_address("127.0.0.1")}
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org"]


def test_each_hospital_gets_an_openssh_ecdsa_p384_key_pair(tmp_path: Path) -> None:
    assert init("--hospital", "north", "--hospital", "south") == 0
    folder = tmp_path / "deploy" / "net"
    for name in ("north", "south"):
        private = serialization.load_ssh_private_key((folder / name).read_bytes(), password=None)
        public = serialization.load_ssh_public_key((folder / f"{name}.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(private.curve, ec.SECP384R1)
        assert public.public_numbers() == private.public_key().public_numbers()
    federation = find_federation("net")
    assert [(h.name, h.partition_id) for h in federation.hospitals] == [("north", 0), ("south", 1)]


def test_private_keys_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    assert init("--hospitals", "2") == 0
    folder = tmp_path / "deploy" / "net"
    for name in ("ca.key", "server.key", "hospital-0", "hospital-1"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_the_flower_connection_is_added_and_the_other_entries_kept(tmp_path: Path) -> None:
    config = tmp_path / "flwr" / "config.toml"
    config.parent.mkdir()
    config.write_text('# mine\n[superlink]\ndefault = "other"\n\n[superlink.other]\naddress = "10.9.9.9:9093"\n'
                      'insecure = true\n')
    assert init("--hospitals", "2") == 0
    assert init("--hospitals", "3", "--force") == 0  # a second init replaces the entry, no duplicate table

    text = config.read_text()
    parsed = tomllib.loads(text)["superlink"]
    assert text.startswith("# mine\n")
    assert parsed["default"] == "other"
    assert parsed["other"] == {"address": "10.9.9.9:9093", "insecure": True}
    assert parsed["net"] == {"address": "10.0.0.5:9093",
                             "root-certificates": str(tmp_path / "deploy" / "net" / "ca.crt")}


def test_a_new_flower_config_keeps_flowers_local_default(tmp_path: Path) -> None:
    assert init("--hospitals", "1") == 0
    parsed = tomllib.loads((tmp_path / "flwr" / "config.toml").read_text())["superlink"]
    assert parsed["default"] == "local" and "net" in parsed


def test_an_existing_federation_is_kept_without_force(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert init("--hospitals", "2") == 0
    key = (tmp_path / "deploy" / "net" / "ca.key").read_bytes()
    capsys.readouterr()
    assert init("--hospitals", "2") == 2
    assert "add --force" in error_line(capsys)
    assert (tmp_path / "deploy" / "net" / "ca.key").read_bytes() == key


@pytest.mark.parametrize("arguments, message", [
    (["--address", "10.0.0.5", "--hospitals", "2"], "expected HOST:PORT"),
    (["--address", "a:1", "--address", "b:2", "--hospitals", "2"], "one port"),
    (["--address", "a:1"], "--hospitals N"),
    (["--address", "a:1", "--hospital", "x", "--hospital", "x"], "must differ"),
    (["--address", "a:1", "--hospital", "../etc"], "hospital name"),
])
def test_invalid_init_input_is_one_line(arguments: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["deploy", "init", "net", *arguments]) == 2
    assert message in error_line(capsys)


def test_commands_start_one_authenticated_supernode_per_hospital(capsys: pytest.CaptureFixture) -> None:
    assert init("--hospitals", "3") == 0
    capsys.readouterr()
    assert main(["deploy", "commands", "net"]) == 0
    lines = capsys.readouterr().out.splitlines()

    superlink = [line for line in lines if line.startswith("flower-superlink ")]
    assert len(superlink) == 1
    for flag in ("--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile", "--enable-supernode-auth",
                 "--disable-runtime-dependency-installation", "--host 0.0.0.0", "--port 9093", "--database"):
        assert flag in superlink[0]
    nodes = [line for line in lines if line.startswith("flower-supernode ")]
    assert len(nodes) == 3
    for k, line in enumerate(nodes):
        assert f"--superlink 10.0.0.5:9093 --root-certificates ca.crt --auth-supernode-private-key hospital-{k} " \
               f"--node-config 'partition-id={k} num-partitions=3'" in line
    assert sum("data-path=" in line for line in lines) == 3
    assert sum(line.startswith("flwr supernode register ") for line in lines) == 3
    assert environment_line() in lines


def test_status_of_an_unreachable_superlink_is_one_line(capsys: pytest.CaptureFixture) -> None:
    assert main(["deploy", "init", "net", "--address", f"127.0.0.1:{free_port()}", "--hospitals", "1"]) == 0
    capsys.readouterr()
    assert main(["deploy", "status", "net"]) == 1
    assert "unavailable" in error_line(capsys)


@pytest.mark.parametrize("arguments, message", [
    (["--engine", "deployment"], "go together"),
    (["--federation", "net"], "go together"),
    (["--engine", "deployment", "--federation", "nowhere"], "unknown federation 'nowhere'"),
    (["--engine", "deployment", "--federation", "net"], "add --set partition.clients=2"),  # quickstart has 4
    (["--engine", "deployment", "--federation", "net", "--set", "strategy.roundz=1"], "unknown key 'roundz'"),
    (["--set", "engine.backend=deployment"], "--federation NAME"),
    (["--engine", "deployment", "--federation", "net", "--resume", "no/such/run"], "no/such/run"),
])
def test_invalid_deployment_runs_are_one_line_exit_2(arguments: list[str], message: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    assert init("--hospitals", "2") == 0
    capsys.readouterr()
    assert main(["run", str(QUICKSTART), *arguments]) == 2
    assert message in error_line(capsys)


def test_the_deployed_scenario_travels_resolved_to_the_serverapp(tmp_path: Path) -> None:
    federation = init_federation("net", ["10.0.0.5:9093"], ["a", "b"], folder=tmp_path / "net",
                                 flwr_home=tmp_path / "flwr")
    scenario = small_scenario(tmp_path, "partition.clients=2", "output.dir=relative/runs")
    deployed = deployed_scenario(scenario, federation)

    assert deployed.engine.backend == "deployment" and scenario.engine.backend == "inprocess"
    assert Path(deployed.output.dir).is_absolute()
    run_config = tomllib.loads(run_config_toml(deployed))
    assert scenario_from_run_config({"scenario": "elsewhere.yaml", "set": "", **run_config}) == deployed
    assert RESUME_KEY not in run_config
    resumed = tomllib.loads(run_config_toml(deployed, tmp_path / "runs" / "x" / "1"))
    assert resumed[RESUME_KEY] == str(tmp_path / "runs" / "x" / "1")


def test_a_deployed_run_with_the_simulation_round_timeout_is_warned_about(capsys: pytest.CaptureFixture) -> None:
    assert init("--hospitals", "2") == 0
    capsys.readouterr()
    code = main(["run", str(QUICKSTART), "--engine", "deployment", "--federation", "net", "--set", "partition.clients=2"])
    err = capsys.readouterr().err
    assert code == 1  # nothing listens at the federation's address
    assert "strategy.round_timeout is 3600 s" in err and "--set strategy.round_timeout=600" in err
    assert "Connection to the SuperLink is unavailable" in err.strip().splitlines()[-1]


def test_ctrl_c_that_reached_medfed_alone_ends_flwr_run_and_stops_the_run(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``kill -INT`` of medfed's pid (not of its process group) leaves ``flwr run`` running: it is interrupted
    too, within the grace period, and the run is stopped at the SuperLink."""
    import subprocess
    import sys
    import time

    from server import launch

    child = [sys.executable, "-c",
             "import time; print('Successfully started run 7\\nround 1', flush=True); time.sleep(60)"]
    stopped: list[list[str]] = []
    monkeypatch.setattr(launch.subprocess, "run", lambda command, **_: stopped.append(command))
    federation = init_federation("net", ["127.0.0.1:9"], ["a"], folder=tmp_path / "net", flwr_home=tmp_path / "flwr")

    def interrupt(line: str) -> None:  # SIGINT arrives in medfed while flwr run streams the run's log
        if line == "round 1":
            raise KeyboardInterrupt

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        launch._stream(child, interrupt, federation)
    assert time.monotonic() - started < 5.0  # the child got the signal; no wait for its 60 s
    assert stopped == [["flwr", "stop", "7", "net"]]
    monkeypatch.undo()  # subprocess.run as it was, to list the processes
    assert not [line for line in subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True,
                                                check=True).stdout.splitlines() if "Successfully started run 7" in line]
