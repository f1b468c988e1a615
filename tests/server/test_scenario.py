"""Scenario files: every shipped scenario is valid; malformed ones fail with one clear line and exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from server import scenario as scenario_module
from server.cli import EXIT_INVALID, main

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "scenarios").glob("*.yaml"))

VALID = {
    "name": "t",
    "task": {"name": "segmentation", "params": {"image_size": 32}},
    "partition": {"clients": 2, "kind": "iid"},
    "strategy": {"rounds": 1},
}


def _write(tmp_path: Path, content: object, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def _with(**changes: object) -> dict:
    """VALID with dotted keys replaced (a value of ... deletes the key)."""
    import copy

    raw = copy.deepcopy(VALID)
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        if value is ...:
            node.pop(last)
        else:
            node[last] = value
    return raw


def dpsgd(**params: object) -> dict:
    """A ``privacy`` section for DP-SGD with ``params``."""
    return {"mechanism": "dpsgd", "params": params}


def nbafl(**params: object) -> dict:
    """A ``privacy`` section for NbAFL with C = 1, ε = 10 and ``params``."""
    return {"mechanism": "nbafl", "params": {"clip": 1.0, "epsilon": 10.0, **params}}


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.name for p in SCENARIOS])
def test_every_shipped_scenario_is_valid(path: Path) -> None:
    scenario = scenario_module.load(path)
    assert scenario.name


def test_defaults_are_resolved_and_round_trip(tmp_path: Path) -> None:
    scenario = scenario_module.load(_write(tmp_path, VALID))
    assert scenario.local.batch_size == 16 and scenario.engine.backend == "processes"
    assert scenario.task.params["norm"] == "batch"  # the task's own default, filled in
    assert scenario.strategy.params == {"proximal_mu": 0.0, "bn_stats": "average"}
    again = scenario_module.load(_write(tmp_path, scenario.to_yaml(), "resolved.yaml"))
    assert again == scenario
    assert scenario_module.Scenario.from_json(scenario.to_json()) == scenario


@pytest.mark.parametrize("engine", [{"address": "auto"}, {"gpus_per_client": 0.5}])
def test_ray_settings_without_a_backend_mean_the_simulation_engine(tmp_path: Path, engine: dict) -> None:
    scenario = scenario_module.load(_write(tmp_path, {**VALID, "engine": engine}))
    assert scenario.engine.backend == "simulation"
    assert scenario_module.load(_write(tmp_path, {**VALID, "engine": {}}, "plain.yaml")).engine.backend == "processes"
    with pytest.raises(scenario_module.ScenarioError, match="a Ray cluster runs the simulation engine only, not backend 'processes'"):
        scenario_module.load(_write(tmp_path, {**VALID, "engine": {"backend": "processes", "address": "auto"}},
                                    "named.yaml"))


def test_dpsgd_params_are_resolved_and_round_trip(tmp_path: Path) -> None:
    raw = _with(task__params__norm="group", privacy=dpsgd(target_epsilon=8))
    scenario = scenario_module.load(_write(tmp_path, raw))
    assert scenario.privacy.params["target_epsilon"] == 8.0 and scenario.privacy.params["noise_multiplier"] is None
    assert scenario.privacy.params["delta"] == 1e-5 and scenario.privacy.params["accountant"] == "rdp"
    assert scenario_module.load(_write(tmp_path, scenario.to_yaml(), "resolved.yaml")) == scenario
    assert scenario_module.load(_write(tmp_path, VALID)).privacy.params == {}


def test_defense_params_are_resolved_and_round_trip(tmp_path: Path) -> None:
    raw = _with(partition__clients=7, strategy__name="scaffold", local={"optimizer": "sgd"},
                defense={"aggregation": "bulyan", "params": {"num_malicious_nodes": 1}, "norm_bound": 2.5})
    scenario = scenario_module.load(_write(tmp_path, raw))
    assert scenario.defense.params == {"num_malicious_nodes": 1} and scenario.defense.norm_bound == 2.5
    assert scenario_module.load(_write(tmp_path, scenario.to_yaml(), "resolved.yaml")) == scenario
    assert scenario_module.Scenario.from_json(scenario.to_json()) == scenario
    multikrum = scenario_module.load(_write(tmp_path, _with(partition__clients=5, defense={"aggregation": "multikrum"})))
    assert multikrum.defense.params == {"num_malicious_nodes": 0, "num_nodes_to_select": None}


def test_overrides_parse_yaml_values_and_create_sections(tmp_path: Path) -> None:
    path = _write(tmp_path, VALID)
    scenario = scenario_module.load(path, ["strategy.rounds=7", "local.lr=0.05", "task.params.norm=group"])
    assert scenario.strategy.rounds == 7 and scenario.local.lr == 0.05 and scenario.task.params["norm"] == "group"
    with pytest.raises(scenario_module.ScenarioError, match="strategy.rounds"):
        scenario_module.load(path, ["strategy.rounds=0"])
    with pytest.raises(scenario_module.ScenarioError, match="expected key.path=value"):
        scenario_module.load(path, ["strategy.rounds"])


MALFORMED = {
    "unknown_top_key": (_with(epochs=3), "epochs: unknown key 'epochs' (allowed: attack, data"),
    "unknown_nested_key": (_with(strategy__roundz=3), "strategy.roundz: unknown key 'roundz' (allowed: evaluate_every"),
    "wrong_type": (_with(strategy__rounds="ten"), "strategy.rounds: Input should be a valid integer"),
    "out_of_range": (_with(partition__clients=0), "partition.clients: Input should be greater than or equal to 1"),
    "bad_choice": (_with(partition__kind="extreme"), "partition.kind: Input should be 'iid', 'label_skew'"),
    "missing_section": (_with(task=...), "task: required key is missing"),
    "unknown_task": (_with(task__name="radiology"), "task.name: unknown task 'radiology' (allowed: "),
    "bad_task_param": (_with(task__params__norm="layer"), "task.params.norm: Input should be 'batch', 'instance' or 'group'"),
    "bad_partition_param": (_with(partition__kind="label_skew", partition__params={"alpha": -1}),
                            "partition.params.alpha: Input should be greater than 0"),
    "unknown_strategy": (_with(strategy__name="fedmagic"), "strategy.name: unknown strategy 'fedmagic' (allowed: bulyan, centralized, fedavg, fedbn"),
    "min_clients_above_clients": (_with(strategy__min_clients=5), "strategy.min_clients (5) exceeds partition.clients (2)"),
    "missing_data_folder": (_with(data={"source": "folder", "path": "no/such/dir"}), "data.path: data folder not found"),
    "not_a_mapping": ("- just\n- a list\n", "a scenario must be a mapping of sections"),
    "invalid_yaml": ("name: t\ntask: {name: segmentation\n", "invalid YAML: line"),
    "attack_unknown_kind": (_with(attack={"kind": "fgsm"}), "attack.kind: Input should be 'dlg', 'idlg'"),
    "attack_victim_outside": (_with(attack={"kind": "dlg", "victims": [2]}),
                              ": attack.victims: partition ids [2] do not exist (partition.clients 2: ids 0..1)"),
    "attack_round_outside": (_with(attack={"kind": "dlg", "victims": [0], "rounds": [0, 99]}),
                             ": attack.rounds: [0, 99] outside the run's rounds 1..1"),
    "attack_repeated_victim": (_with(attack={"kind": "dlg", "victims": [1, 1]}), "attack.victims: "),
    "unimportable_custom_task": (_with(task__name="no_such_pkg.mod:Task"), "task.name: cannot import task 'no_such_pkg.mod:Task'"),
    "unknown_task_param": (_with(task__params__depth=3), "task.params.depth: unknown key 'depth' for task.name segmentation (allowed: channels, focal_gamma"),
    "bad_optimizer": (_with(local={"optimizer": "lbfgs"}), "local.optimizer: Input should be 'sgd', 'adam' or 'adamw'"),
    "unknown_privacy_mechanism": (_with(privacy={"mechanism": "magic"}),
                                  "privacy.mechanism: Input should be 'none', 'dpsgd', 'nbafl' or 'central'"),
    "privacy_params_without_mechanism": (_with(privacy={"params": {"noise_multiplier": 1.0}}),
                                         "privacy.params: mechanism 'none' takes no params (got noise_multiplier)"),
    "unknown_dpsgd_param": (_with(task__params__norm="group", privacy=dpsgd(noise_multiplier=1, clip=1)),
                            "privacy.params.clip: unknown key 'clip' for privacy.mechanism dpsgd (allowed: accountant, delta, max_grad_norm"),
    "bad_dpsgd_param": (_with(task__params__norm="group", privacy=dpsgd(noise_multiplier=1, delta=2)),
                        "privacy.params.delta: Input should be less than 1"),
    "dpsgd_without_noise_or_budget": (_with(task__params__norm="group", privacy=dpsgd()),
                                      "privacy.params: dpsgd needs noise_multiplier or target_epsilon"),
    "dpsgd_with_batch_norm": (_with(privacy=dpsgd(noise_multiplier=1)),
                              "privacy.mechanism dpsgd with task.params.norm: batch: DP-SGD cannot"),
    "mil_with_dpsgd": (_with(task={"name": "mil"}, privacy=dpsgd(noise_multiplier=1)),
                       "privacy.mechanism dpsgd: task 'mil' cannot give per-example gradients"),
    "fedbn_with_dpsgd": (_with(strategy__name="fedbn", privacy=dpsgd(noise_multiplier=1)),
                         "strategy fedbn with privacy.mechanism dpsgd: FedBN keeps BatchNorm local"),
    "scaffold_variate_one_with_dpsgd": (_with(task__params__norm="group", strategy__name="scaffold",
                                              strategy__params={"variate": "I"}, privacy=dpsgd(noise_multiplier=1)),
                                        "strategy scaffold with variate I and privacy.mechanism dpsgd"),
    "scaffold_with_nbafl": (_with(task__params__norm="group", strategy__name="scaffold", local={"optimizer": "sgd"},
                                  privacy=nbafl()),
                            "strategy scaffold with privacy.mechanism nbafl: SCAFFOLD's control-variate update"),
    "fedsgd_with_nbafl": (_with(task__params__norm="group", strategy__name="fedsgd", privacy=nbafl()),
                          "strategy fedsgd with privacy.mechanism nbafl: FedSGD uploads gradients, not weights"),
    "fedmedian_with_nbafl": (_with(task__params__norm="group", strategy__name="fedmedian", privacy=nbafl()),
                             "strategy fedmedian with privacy.mechanism nbafl: it aggregates with a robust rule"),
    "unknown_nbafl_param": (_with(task__params__norm="group", privacy=nbafl(max_grad_norm=1)),
                            "privacy.params.max_grad_norm: unknown key 'max_grad_norm' for privacy.mechanism nbafl (allowed: clip, delta, "
                            "epsilon, exposures, on_exhausted)"),
    "nbafl_without_epsilon": (_with(task__params__norm="group", privacy={"mechanism": "nbafl", "params": {"clip": 1}}),
                              "privacy.params.epsilon: required key is missing"),
    "nbafl_exposures_above_rounds": (_with(task__params__norm="group", privacy=nbafl(exposures=2)),
                                     "privacy.params.exposures 2 exceeds strategy.rounds 1"),
    "nbafl_uploading_batchnorm_statistics": (_with(privacy=nbafl()),
                                             "privacy.mechanism nbafl: the upload holds floating-point tensors that "
                                             "are not trained parameters"),
    "unknown_defense_rule": (_with(defense={"aggregation": "geomed"}),
                             "defense.aggregation: Input should be 'mean', 'median', 'trimmed_mean', 'krum', "
                             "'multikrum' or 'bulyan'"),
    "defense_params_for_a_rule_without_settings": (_with(defense={"params": {"beta": 0.1}}),
                                                   "defense.params: aggregation 'mean' takes no params (got beta)"),
    "unknown_defense_param": (_with(defense={"aggregation": "bulyan", "params": {"beta": 0.1}}),
                              "defense.params.beta: unknown key 'beta' for defense.aggregation bulyan (allowed: num_malicious_nodes)"),
    "params_left_by_another_kind": (_with(partition__kind="iid", partition__params={"severity": 0.8}),
                                   "partition.params.severity: unknown key 'severity': partition.kind iid takes no "
                                   "params (set partition.params={})"),
    "bad_defense_param": (_with(defense={"aggregation": "trimmed_mean", "params": {"beta": 0.5}}),
                          "defense.params.beta: Input should be less than 0.5"),
    "bad_norm_bound": (_with(defense={"norm_bound": 0}), "defense.norm_bound: Input should be greater than 0"),
    "krum_defense_with_too_few_clients": (_with(defense={"aggregation": "krum"}),
                                          "defense.params.num_malicious_nodes: Krum (f = 0) needs n > 2f + 2 = 2 "
                                          "updates per round, but a round has 2 (partition.clients 2"),
    "defense_with_a_robust_strategy": (_with(strategy__name="fedmedian", defense={"aggregation": "median"}),
                                       "defense.aggregation: strategy 'fedmedian' already aggregates with median"),
    "defense_with_local": (_with(strategy__name="local", defense={"norm_bound": 1.0}),
                           "defense.norm_bound: 1.0 is not possible with strategy 'local', which aggregates nothing"),
    "defense_with_centralized": (_with(strategy__name="centralized", defense={"aggregation": "median"}),
                                 "defense.aggregation: median is not possible with strategy 'centralized'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_scenario_gives_one_line_and_exit_2(case: str, tmp_path: Path, capsys) -> None:
    content, expected = MALFORMED[case]
    path = _write(tmp_path, content)
    assert main(["validate", str(path)]) == EXIT_INVALID
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err and expected in err, err
    assert "Traceback" not in err


def test_missing_file_gives_one_line(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path / "absent.yaml")]) == EXIT_INVALID
    err = capsys.readouterr().err.strip()
    assert err.endswith("absent.yaml: scenario file not found") and len(err.splitlines()) == 1


def test_invalid_scenario_creates_no_run_directory(tmp_path: Path, capsys) -> None:
    path = _write(tmp_path, _with(strategy__rounds=0, output={"dir": str(tmp_path / "runs")}))
    assert main(["run", str(path)]) == EXIT_INVALID
    assert not (tmp_path / "runs").exists()
    assert "strategy.rounds" in capsys.readouterr().err


def test_list_shows_every_scenario(capsys) -> None:
    assert main(["list", str(ROOT / "scenarios")]) == 0
    out = capsys.readouterr().out
    for path in SCENARIOS:
        assert path.name in out


def test_resume_of_a_folder_that_is_not_a_run_gives_one_line(tmp_path: Path, capsys) -> None:
    assert main(["run", "--resume", str(tmp_path)]) == EXIT_INVALID
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path) in err, err


def test_unwritable_output_dir_gives_one_line(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    path = _write(tmp_path, _with(output={"dir": str(blocker / "runs")}))
    assert main(["run", str(path)]) == EXIT_INVALID
    err = capsys.readouterr().err.strip()
    assert "output.dir: cannot create a run directory" in err and len(err.splitlines()) == 1, err


def test_what_a_task_refuses_when_built_is_refused_by_validate_in_one_line(tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    quickstart = yaml.safe_load((Path(__file__).parents[2] / "scenarios" / "quickstart.yaml").read_text())
    quickstart["task"]["params"]["num_classes"] = 3  # synthetic segmentation data has exactly four
    quickstart["output"] = {"dir": str(tmp_path / "runs")}
    path = tmp_path / "three-classes.yaml"
    path.write_text(yaml.safe_dump(quickstart))
    for command in (["validate", str(path)], ["run", str(path), "--engine", "inprocess"]):
        assert main(command) == EXIT_INVALID
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "task: synthetic segmentation data has 4 classes" in lines[0], lines
    assert not (tmp_path / "runs").exists()
