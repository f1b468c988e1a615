"""The scenario of a run in words, for ``medfed report`` (:mod:`server.report`).

Every sentence is generated from the resolved ``scenario.yaml`` a run directory holds (all defaults
filled in), so the words say exactly what ran: the task and model, the data and how it is split across
the sites (and how non-IID), the strategy and the local training, the privacy mechanism and its budget,
the defense and the attack, the engine and the seed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["describe_scenario", "settings_text"]

PARTITION_KINDS = {  # partition.kind → what it does to the sites (medtasks/partition.py)
    "iid": "independent and identically distributed: every site draws from the same distribution",
    "label_skew": "label skew: each site's class mix differs (P_k(y))",
    "quantity_skew": "quantity skew: the sites' sizes differ",
    "feature_skew": "feature skew: each site's acquisition differs (P_k(x), e.g. scanner gain, noise, dose)",
    "concept_shift": "concept shift: each site's annotator labels differently (P_k(y|x))",
}
PRIVACY_MECHANISMS = {  # privacy.mechanism → what it protects
    "dpsgd": "DP-SGD (Abadi et al. 2016): sample-level differential privacy on each site",
    "nbafl": "NbAFL (Wei et al. 2020): noise on each site's upload and on the aggregate",
    "central": "client-level DP-FedAvg (McMahan et al. 2018): the server clips each update and noises the mean",
}


def settings_text(params: Mapping[str, Any] | None) -> str:
    """``key=value, ...`` of a params mapping (``None`` values left out), or ``""`` when there are none."""
    shown = [f"{key}={_value(value)}" for key, value in (params or {}).items() if value is not None]
    return ", ".join(shown)


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _with_params(text: str, params: Mapping[str, Any] | None) -> str:
    settings = settings_text(params)
    return f"{text} ({settings})" if settings else text


def describe_scenario(scenario: Mapping[str, Any]) -> list[str]:
    """The scenario as sentences, one per aspect, in the order of the scenario file.

    Parameters
    ----------
    scenario : Mapping[str, Any]
        A resolved ``scenario.yaml``, parsed.

    Returns
    -------
    list[str]
        Plain-text sentences (not HTML-escaped).
    """
    return [
        _task(scenario.get("task") or {}),
        _data(scenario.get("data") or {}),
        _partition(scenario.get("partition") or {}),
        _strategy(scenario.get("strategy") or {}),
        _local(scenario.get("local") or {}),
        _privacy(scenario.get("privacy") or {}),
        _defense(scenario.get("defense") or {}),
        _attack(scenario.get("attack")),
        _engine(scenario.get("engine") or {}, scenario.get("seed")),
    ]


def _task(task: Mapping[str, Any]) -> str:
    return _with_params(f"Task: {task.get('name')}, model {task.get('model')}", task.get("params")) + "."


def _data(data: Mapping[str, Any]) -> str:
    if data.get("source") == "folder":
        sites = data.get("sites")
        split = "one folder per hospital" if sites == "subfolders" or isinstance(sites, list) else "one pool split"
        test = f"; the server's test set from {data.get('test_path')}" if data.get("test_path") else ""
        return f"Data: the folder {data.get('path')} ({split}){test}."
    validation = float(data.get("val_fraction") or 0)
    server = data.get("server_samples") or 0
    test = f"; the server holds {server} samples as its test set" if server else "; no server test set"
    return (f"Data: synthetic, {data.get('samples_per_client')} samples per site, {validation:.0%} of them "
            f"kept for validation{test}.")


def _partition(partition: Mapping[str, Any]) -> str:
    kind = str(partition.get("kind"))
    how = PARTITION_KINDS.get(kind, kind)
    return _with_params(f"Sites: {partition.get('clients')}, split {how}", partition.get("params")) + "."


def _strategy(strategy: Mapping[str, Any]) -> str:
    every = int(strategy.get("evaluate_every") or 1)
    evaluation = "after every round" if every == 1 else f"every {every} rounds and after the last"
    text = (f"Strategy: {strategy.get('name')} for {strategy.get('rounds')} rounds, "
            f"{float(strategy.get('fraction_train') or 0):.0%} of the sites trained per round "
            f"(at least {strategy.get('min_clients')}), "
            f"{float(strategy.get('fraction_evaluate') or 0):.0%} evaluated {evaluation}")
    return _with_params(text, strategy.get("params")) + "."


def _local(local: Mapping[str, Any]) -> str:
    steps = f" (at most {local['max_steps']} steps)" if local.get("max_steps") else ""
    epochs = local.get("epochs")
    return (f"Local training: {epochs} epoch{'s' if epochs != 1 else ''}{steps} of {local.get('optimizer')} "
            f"per round, learning rate {local.get('lr')}, batch size {local.get('batch_size')}"
            + (f", momentum {local['momentum']}" if local.get("momentum") else "")
            + (f", weight decay {local['weight_decay']}" if local.get("weight_decay") else "") + ".")


def _privacy(privacy: Mapping[str, Any]) -> str:
    mechanism = str(privacy.get("mechanism") or "none")
    if mechanism == "none":
        return "Privacy: no differential privacy."
    params = dict(privacy.get("params") or {})
    budget = []
    if params.get("target_epsilon") is not None:
        budget.append(f"target ε = {params.pop('target_epsilon')}")
    if params.get("delta") is not None:
        budget.append(f"δ = {params.pop('delta')}")
    described = PRIVACY_MECHANISMS.get(mechanism, mechanism)
    budget_text = f"; budget {', '.join(budget)}" if budget else ""
    return _with_params(f"Privacy: {described}{budget_text}", params) + "."


def _defense(defense: Mapping[str, Any]) -> str:
    rule = defense.get("aggregation") or "mean"
    extras = [f"updates bounded to norm {defense['norm_bound']}" if defense.get("norm_bound") else "",
              f"gradients pruned ({defense['prune']})" if defense.get("prune") else ""]
    extras = [extra for extra in extras if extra]
    if rule == "mean" and not extras:
        return "Defense: none (the weighted mean of the updates)."
    return _with_params(f"Defense: aggregation {rule}", defense.get("params")) + (
        f"; {', '.join(extras)}." if extras else ".")


def _attack(attack: Mapping[str, Any] | None) -> str:
    if not attack:
        return "Attack: none."
    rounds = attack.get("rounds")
    when = "every round" if rounds is None else f"rounds {', '.join(map(str, rounds))}"
    parties = [f"victims {attack['victims']}" if attack.get("victims") else "",
               f"attackers {attack['attackers']}" if attack.get("attackers") else ""]
    who = ", ".join(party for party in parties if party)
    return _with_params(f"Attack: {attack.get('kind')} in {when}{', ' + who if who else ''}",
                        attack.get("params")) + "."


def _engine(engine: Mapping[str, Any], seed: Any) -> str:
    return f"Engine: {engine.get('backend')}, device {engine.get('device')}; seed {seed}."
