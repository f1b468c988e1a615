"""The attack plug-in: the scenario's attack experiment as a participant of the round pipeline.

Installed only when a scenario has an ``attack:`` block (:func:`privacy.attacks.server_attack`). At ``inspect``
it hands every train reply of a victim or an attacker in an attack round to the attack's server half, with the
ground truth a simulation knows (the mini-batches the site drew, its training split) for scoring; it runs before
the reply checks, so it sees what the server receives and removes the records a malicious site added for the
experimenter (:data:`privacy.attacks.SIDE_RECORD_PREFIX`). At ``round_done`` the server half sees the new
global model (membership inference against it, a backdoor's success rate, the GAN attacker's samples). Both
calls run with gradients enabled (attacks optimise) and in a forked random state (the run's own streams stay
untouched). Every
scored attempt becomes one ``"phase": "attack"`` record of ``metrics.jsonl`` beside the round's main metric,
and :meth:`AttackRound.summary` is ``summary.json``'s ``"attack"`` block.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Message

from client.trainer import dataset_size, epoch_batches, make_loader
from medtasks.base import Task
from medtasks.scenario import Scenario
from medtasks.seeding import torch_generator
from privacy.attacks import SIDE_RECORD_PREFIX, ServerAttack, get_attack
from privacy.attacks.base import Observation, Outcome
from server.exchange import Exchange
from server.pipeline import Round, RoundPlugin
from server.results import RunDirectory
from strategies.base import ClientRule, Upload

log = logging.getLogger("medfed")


class AttackRound(RoundPlugin):
    """Runs the scenario's attack inside the rounds and writes what it scores.

    Parameters
    ----------
    scenario : Scenario
        With an ``attack`` section.
    attack : ServerAttack
        The attack's server half.
    task : Task
        The scenario's task (the sites' simulated data: ground truth for scoring).
    rule : ClientRule
        The strategy's client rule (what the sites train on, with which local settings, and upload).
    template : torch.nn.Module
        A model of the task (the declared uploads' layout).
    run_dir : RunDirectory
        Where the attack records go.
    model_with : callable
        ``ArrayRecord`` → the server's model loaded with it.
    complete : bool
        Whether the strategy's global model is a complete model (``False``: FedBN, FedPer).
    """

    def __init__(self, scenario: Scenario, attack: ServerAttack, task: Task, rule: ClientRule,
                 template: torch.nn.Module, run_dir: RunDirectory,
                 model_with: Callable[[ArrayRecord], torch.nn.Module], *, complete: bool) -> None:
        assert scenario.attack is not None
        self.scenario, self.section, self.attack = scenario, scenario.attack, attack
        self.task, self.rule, self.run_dir = task, rule, run_dir
        self.uploads: Mapping[str, Upload] = rule.uploads(template)
        self.model_with, self.complete = model_with, complete
        self.registered = get_attack(self.section.kind)
        self.watched = set(self.section.victims) | set(self.section.attackers)
        self._pending: list[tuple[Outcome, float]] = []
        self._written: list[dict[str, Any]] = []

    # --- the pipeline's points -------------------------------------------------------------------
    def inspect(self, round_: Round, phase: str, done: Exchange, sent: list[Message]) -> None:
        """Hand each watched site's train reply to the attack (side records removed first)."""
        if phase != "train" or not self.section.acts_in(round_.number):
            return
        for reply in sorted(done.replies, key=round_.cohort.partition_of):
            pid = round_.cohort.partition_of(reply)
            if reply.has_error() or pid not in self.watched:
                continue
            side = {name: reply.content[name] for name in list(reply.content.keys())
                    if name.startswith(SIDE_RECORD_PREFIX)}
            for name in side:
                del reply.content[name]
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]), torch.enable_grad():  # the run's streams stay where they were
                outcomes = self.attack.observe(self._observation(round_, pid, reply, side))
            self._keep(outcomes, time.perf_counter() - started)

    def round_done(self, round_: Round) -> None:
        """The attack's look at the new global model, then one record per scored attempt of the round."""
        if self.section.acts_in(round_.number) or self._pending:
            started = time.perf_counter()
            model = copy.deepcopy(self.model_with(round_.arrays)) if self.complete and len(round_.arrays) else None
            with torch.random.fork_rng(devices=[]), torch.enable_grad():
                outcomes = self.attack.after_round(round_.number, model) if self.section.acts_in(round_.number) else []
            self._keep(outcomes, time.perf_counter() - started)
        main_name, main_value = self._main_metric(round_.headline)
        for outcome, seconds in self._pending:
            record = {"round": round_.number, "phase": "attack", "kind": self.section.kind,
                      "attacker": outcome.attacker, "victim": outcome.victim,
                      "metrics": {key: float(value) for key, value in outcome.metrics.items()},
                      "main_metric": main_name, "main_value": main_value, "seconds": round(seconds, 4)}
            self.run_dir.append_metrics(record)
            self._written.append(record)
        self._pending = []

    def resume(self, extra: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """The attack records the resumed run kept (for the summary)."""
        self._written = [record for record in records if record.get("phase") == "attack"]

    # --- results ---------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """``summary.json``'s ``"attack"`` block: the attack, who, when, each metric's mean over the records
        (``metrics``) and its value in the last round that has it (``final``, the mean over that round's records)."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        last: dict[str, tuple[int, list[float]]] = {}
        for record in self._written:
            for key, value in record["metrics"].items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    sums[key] = sums.get(key, 0.0) + float(value)
                    counts[key] = counts.get(key, 0) + 1
                    if key not in last or last[key][0] < record["round"]:
                        last[key] = (record["round"], [])
                    last[key][1].append(float(value))
        return {"kind": self.section.kind, "label": self.registered.label, "attackers": self.section.attackers,
                "victims": self.section.victims, "rounds": self.section.rounds, "headline": self.registered.headline,
                "metrics": {key: sums[key] / counts[key] for key in sums},
                "final": {key: sum(values) / len(values) for key, (_, values) in last.items()},
                "records": len(self._written)}

    # --- helpers ---------------------------------------------------------------------------------
    def _keep(self, outcomes: list[Outcome], seconds: float) -> None:
        for outcome in outcomes:
            self._pending.append((outcome, seconds / max(len(outcomes), 1)))

    def _observation(self, round_: Round, pid: int, reply: Message, side: dict[str, Any]) -> Observation:
        sites = self.scenario.partition.clients
        dataset = self.rule.training_data(self.task, pid, sites)
        local = self.rule.local_section(self.scenario.local, dataset_size(dataset))

        def batches() -> list[Any]:
            generator = torch_generator(self.scenario.seed, "batches", round_.number, pid)
            loader = make_loader(dataset, local.batch_size, generator)
            return list(epoch_batches(loader, local.epochs, local.max_steps))

        return Observation(round=round_.number, partition_id=pid, sent=round_.sent_to(reply).content,
                           reply=reply.content, side=side, uploads=self.uploads, local=local,
                           batches=batches, members=lambda: self.task.client_data(pid).train)

    def _main_metric(self, headline: Mapping[str, float | None]) -> tuple[str, float | None]:
        """The task's primary metric this round: on the server's test set if it has one, else federated."""
        primary = self.task.primary_metric
        for key in (f"central {primary}", primary):
            if headline.get(key) is not None:
                return primary, headline[key]
        return primary, None


def attack_plugin(scenario: Scenario, task: Task, rule: ClientRule, template: torch.nn.Module,
                  run_dir: RunDirectory, model_with: Callable[[ArrayRecord], torch.nn.Module], *,
                  complete: bool) -> AttackRound | None:
    """The plug-in for the scenario's attack, or ``None`` without an ``attack:`` block (nothing is imported)."""
    if scenario.attack is None:
        return None
    from privacy.attacks import server_attack

    plots = Path(run_dir.plots) / "attack" if scenario.output.plots else None
    attack = server_attack(scenario, task, plots)
    assert attack is not None
    log.info("attack %s: %s | victims %s | attackers %s | rounds %s", scenario.attack.kind,
             get_attack(scenario.attack.kind).label, scenario.attack.victims, scenario.attack.attackers,
             scenario.attack.rounds or "all")
    return AttackRound(scenario, attack, task, rule, template, run_dir, model_with, complete=complete)
