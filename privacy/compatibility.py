r"""Which privacy mechanism can protect which scenario, derived from what the algorithm declares.

Every decision here reads the scenario's algorithm (:func:`strategies.get_algorithm`) and a fresh model of its
task, never a list of strategy names:

* what each record of a site's train reply holds (:meth:`strategies.base.ClientRule.uploads`: weights, an
  update, a gradient, a control-variate update or statistics, and whether it is computed from the raw data);
* how the server uses those uploads (:attr:`strategies.base.Algorithm.combine`: an average, each site's on its
  own, nothing, or one node training on the pooled data);
* the aggregation rule (:func:`strategies.aggregation.aggregation_rule`: the mean or a Byzantine-robust rule);
* the model: its BatchNorm tensors, its trained parameters, its floating-point tensors.

The rules, per mechanism:

``dpsgd`` (sample-level DP-SGD, Abadi et al. 2016)
    protects what is computed from the privately trained weights, so it refuses an upload computed from the
    raw local data (``from_data``), a task whose model cannot give per-example gradients, and BatchNorm (no
    per-example gradient under batch statistics), also when the algorithm keeps BatchNorm local.
``nbafl`` (Wei et al. 2020, IEEE TIFS, "Federated Learning with Differential Privacy: Algorithms and Performance
Analysis")
    calibrates σ_U for clipped weights and σ_D for their weighted mean: it needs the sites to upload weights
    only (one record, whose floating-point tensors are trained parameters), averaged with the mean.
``central`` (client-level DP-FedAvg, McMahan et al. 2018)
    clips each site's update and perturbs their mean (combine ``average``, one weights record, the mean rule),
    or perturbs each site's update on its own (combine ``per-site``, one update record and no floating-point
    statistics beside it).

:func:`verdict` gives one mechanism's decision for a scenario, :func:`check` raises the refusal (one line,
``strategy NAME with privacy.mechanism MECH: reason``, or ``privacy.mechanism MECH ...`` for what the model or
the task rather than the strategy rules out), :func:`protected_upload` names the record a mechanism clips, and
:func:`markdown_table` renders docs/privacy.md's "Privacy mechanism × strategy" table (``python -m
privacy.compatibility`` prints it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # pragma: no cover
    from medtasks.scenario import Scenario
    from strategies.base import Algorithm, Upload

PROTECTING: tuple[str, ...] = ("dpsgd", "nbafl", "central")
"""The mechanisms that protect something (every one of :data:`privacy.MECHANISMS` but ``none``)."""

NORM_KEY = "task.params.norm"
BATCHNORM_REASON = "per-sample gradients are undefined under batch statistics"


# --- what a scenario declares ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Declaration:
    """What a scenario's algorithm and model declare: everything a verdict reads.

    Attributes
    ----------
    strategy : str
        ``strategy.name``.
    label : str
        The algorithm's name as its module spells it (e.g. an acronym's capitals), for messages.
    combine : str
        :attr:`strategies.base.Algorithm.combine`.
    rule : str
        :func:`strategies.aggregation.aggregation_rule` of the scenario.
    uploads : Mapping[str, Upload]
        The client rule's :meth:`~strategies.base.ClientRule.uploads` for a fresh model of the task.
    state : Mapping[str, torch.Tensor]
        That model's state dict (names and dtypes).
    trainable : frozenset of str
        Its trained parameters (``requires_grad``).
    batchnorm : frozenset of str
        Its BatchNorm tensors (affine parameters, running statistics, counters).
    from_data_settings : str
        The ``strategy.params`` (``"key value"``) that make an upload computed from the raw data, if any.
    task : str
        ``task.name``.
    norm : str or None
        ``task.params.norm``, if the task has it.
    per_sample_gradients : bool
        Whether the task's model can give per-example gradients (a task class attribute; default true).
    """

    strategy: str
    label: str
    combine: str
    rule: str
    uploads: Mapping[str, Upload]
    state: Mapping[str, torch.Tensor]
    trainable: frozenset[str]
    batchnorm: frozenset[str]
    from_data_settings: str
    task: str
    norm: str | None
    per_sample_gradients: bool

    def floating(self, names: Iterable[str]) -> list[str]:
        """The floating-point tensors among ``names``, in the model's order."""
        wanted = set(names)
        return [name for name, tensor in self.state.items() if name in wanted and torch.is_floating_point(tensor)]

    def kinds(self) -> set[str]:
        """The kinds of every upload."""
        return {upload.kind for upload in self.uploads.values()}


def declare(scenario: Scenario) -> Declaration:
    """The :class:`Declaration` of ``scenario``, from its algorithm and a fresh model of its task.

    Parameters
    ----------
    scenario : Scenario
        A scenario whose ``strategy.params`` and ``task.params`` are valid for their schemas.

    Returns
    -------
    Declaration
    """
    from medtasks.registry import get_task_class
    from strategies import get_algorithm
    from strategies.aggregation import aggregation_rule
    from strategies.base import batchnorm_tensor_names, trainable_parameters
    from strategies.fedper import template_model

    algorithm = get_algorithm(scenario.strategy.name)
    model = template_model(scenario)
    uploads = algorithm.client_rule(algorithm.Params.model_validate(scenario.strategy.params)).uploads(model)
    from_data = any(upload.from_data for upload in uploads.values())
    return Declaration(
        strategy=scenario.strategy.name,
        label=algorithm.title,
        combine=algorithm.combine,
        rule=aggregation_rule(scenario),
        uploads=uploads,
        state=model.state_dict(),
        trainable=frozenset(trainable_parameters(model)),
        batchnorm=frozenset(batchnorm_tensor_names(model)),
        from_data_settings=_from_data_settings(algorithm, scenario.strategy.params, model) if from_data else "",
        task=scenario.task.name,
        norm=scenario.task.params.get("norm"),
        per_sample_gradients=bool(getattr(get_task_class(scenario.task.name), "per_sample_gradients", True)),
    )


def _from_data_settings(algorithm: Algorithm, given: Mapping[str, Any], model: torch.nn.Module) -> str:
    """The settings of ``given`` without which no upload would be computed from the raw data (``"key value"``)."""
    settings = []
    for key, value in given.items():
        field = algorithm.Params.model_fields.get(key)
        if field is None or field.is_required() or value == field.default:
            continue
        rule = algorithm.client_rule(algorithm.Params.model_validate({**given, key: field.default}))
        if not any(upload.from_data for upload in rule.uploads(model).values()):
            settings.append(f"{key} {value}")
    return ", ".join(settings)


@cache
def _weights_strategy() -> str:
    """The first registered strategy whose sites upload just their weights for the server to average."""
    from torch import nn

    from strategies import BUILTIN_ALGORITHMS, get_algorithm
    from strategies.aggregation import ROBUST_STRATEGIES

    probe = nn.Linear(2, 2)
    for name in BUILTIN_ALGORITHMS:
        algorithm = get_algorithm(name)
        if algorithm.combine != "average" or name in ROBUST_STRATEGIES:
            continue
        uploads = algorithm.client_rule(algorithm.Params()).uploads(probe)
        if [upload.kind for upload in uploads.values()] == ["weights"]:
            return name
    return "that uploads weights"  # pragma: no cover - the registry always has one


# --- verdicts --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """One mechanism's decision for one scenario.

    Attributes
    ----------
    mechanism : str
        The mechanism decided for.
    reason : str or None
        The one-line refusal (``None``: the mechanism protects the scenario).
    short : str or None
        The refusal in a few words, for the table of docs/privacy.md.
    """

    mechanism: str
    reason: str | None = None
    short: str | None = None

    @property
    def allowed(self) -> bool:
        """Whether the mechanism protects the scenario."""
        return self.reason is None

    def cell(self) -> str:
        """The privacy table's cell: ``yes`` or ``no: <short reason>``."""
        return "yes" if self.allowed else f"no: {self.short}"

    def check(self) -> None:
        """Raise the refusal.

        Raises
        ------
        ValueError
            One line: the mechanism cannot protect the scenario, and why.
        """
        if self.reason is not None:
            raise ValueError(self.reason)


def verdict(scenario: Scenario, mechanism: str | None = None,
            declaration: Declaration | None = None) -> Verdict:
    """Whether ``mechanism`` (default: the scenario's) can protect ``scenario``, and why not.

    Parameters
    ----------
    scenario : Scenario
        The scenario (its ``privacy`` section is not read).
    mechanism : str, optional
        One of :data:`PROTECTING`, or ``"none"`` (always allowed).
    declaration : Declaration, optional
        :func:`declare` of ``scenario``, when the caller has it.

    Returns
    -------
    Verdict
    """
    mechanism = scenario.privacy.mechanism if mechanism is None else mechanism
    if mechanism not in PROTECTING:
        return Verdict(mechanism)
    decl = declare(scenario) if declaration is None else declaration
    refusal = {"dpsgd": _dpsgd, "nbafl": _nbafl, "central": _central}[mechanism](decl)
    return Verdict(mechanism) if refusal is None else Verdict(mechanism, *refusal)


def check(scenario: Scenario) -> None:
    """Refuse a scenario its mechanism cannot protect.

    Raises
    ------
    ValueError
        One line naming the mechanism and the reason.
    """
    verdict(scenario).check()


def protected_upload(uploads: Mapping[str, Upload]) -> tuple[str, Upload]:
    """The record an upload mechanism (NbAFL, central DP) clips: the one of kind weights or update.

    Parameters
    ----------
    uploads : Mapping[str, Upload]
        A client rule's declaration (:meth:`strategies.base.ClientRule.uploads`).

    Returns
    -------
    tuple of (str, Upload)
        The record's name and its declaration.

    Raises
    ------
    ValueError
        If there is not exactly one such record (the verdict refuses such scenarios).
    """
    found = [(name, upload) for name, upload in uploads.items() if upload.kind in ("weights", "update")]
    if len(found) != 1:
        raise ValueError(f"privacy: expected one record of weights or an update in the reply, got {sorted(uploads)}")
    return found[0]


Refusal = tuple[str, str]  # (one-line reason, short reason)


def _prefix(decl: Declaration, mechanism: str, *, settings: bool = False) -> str:
    subject = f"strategy {decl.strategy}"
    if settings and decl.from_data_settings:
        return f"{subject} with {decl.from_data_settings} and privacy.mechanism {mechanism}"
    return f"{subject} with privacy.mechanism {mechanism}"


def _stray(decl: Declaration, names: Iterable[str], mechanism: str) -> Refusal | None:
    """Floating-point tensors of an upload that are not trained parameters
    (:func:`privacy.gaussian.protected_names`)."""
    from privacy.gaussian import protected_names

    wanted = set(names)
    try:
        protected_names({name: tensor for name, tensor in decl.state.items() if name in wanted}, decl.trainable,
                        mechanism)
    except ValueError as error:
        return str(error), "its upload holds BatchNorm statistics"
    return None


def _dpsgd(decl: Declaration) -> Refusal | None:
    if not decl.per_sample_gradients:
        return ((f"privacy.mechanism dpsgd: task '{decl.task}' cannot give per-example gradients (its model's layers "
                "see sub-units of an example, e.g. the tiles of a MIL bag), so DP-SGD cannot clip them per example"),
                "the task gives no per-example gradients")
    for record, upload in decl.uploads.items():
        if upload.from_data:
            return ((f"{_prefix(decl, 'dpsgd', settings=True)}: its '{record}' upload ({upload.kind}) is computed from "
                    "the raw local data and sent without noise; DP-SGD covers only what is computed from the privately "
                    "trained weights"),
                    f"its {upload.kind} is computed from raw data")
    if decl.batchnorm:
        shared = set().union(*(upload.names for upload in decl.uploads.values()))
        if not decl.batchnorm & shared:
            return ((f"{_prefix(decl, 'dpsgd')}: {decl.label} keeps BatchNorm local, but DP-SGD cannot use BatchNorm "
                    f"({BATCHNORM_REASON}); use a strategy that shares every layer and set {NORM_KEY}: group or "
                    "instance"),
                    "DP-SGD cannot use BatchNorm")
        if decl.norm == "batch":
            return ((f"privacy.mechanism dpsgd with {NORM_KEY}: batch: DP-SGD cannot use BatchNorm "
                     f"({BATCHNORM_REASON}); set it to group or instance"),
                    "DP-SGD cannot use BatchNorm")
        return ((f"privacy.mechanism dpsgd: the model of task '{decl.task}' has BatchNorm layers: DP-SGD cannot use "
                f"BatchNorm ({BATCHNORM_REASON}); choose a task.model without BatchNorm"),
                "DP-SGD cannot use BatchNorm")
    return None


def _nbafl(decl: Declaration) -> Refusal | None:
    prefix = _prefix(decl, "nbafl")
    advice = (f"; use strategy {_weights_strategy()} with strategy.params.proximal_mu > 0 (NbAFL's local "
              "objective)")
    if decl.combine == "none":
        return (f"{prefix}: each site trains alone, no weights are aggregated (run it without privacy)",
                "nothing is aggregated")
    if decl.combine == "pooled":
        return f"{prefix}: the data are pooled, there are no site uploads to perturb", "the data are pooled"
    kinds = decl.kinds()
    if "gradient" in kinds:
        return (f"{prefix}: {decl.label} uploads gradients, not weights, and Δs_U = 2C/m bounds clipped "
                f"weights{advice}",
                "it uploads gradients, Δs_U bounds weights")
    if "variate-update" in kinds:
        return ((f"{prefix}: {decl.label}'s control-variate update Δc_k travels beside the weights without clipping or "
                f"noise{advice}"),
                "Δc_k travels unperturbed")
    if "update" in kinds:
        return (f"{prefix}: {decl.label} uploads the update Δw_k, not clipped weights{advice}",
                "it uploads Δw, not weights")
    statistics = [name for record, upload in decl.uploads.items() if upload.kind == "statistics"
                  for name in decl.floating(upload.names)]
    if statistics:
        return ((f"{prefix}: {decl.label} uploads statistics computed from the data ({', '.join(statistics[:2])}) "
                f"beside the weights, unperturbed{advice}"),
                "it uploads data statistics")
    if decl.combine != "average":
        return ((f"{prefix}: the server does not average the uploads (combine: {decl.combine}), and sigma_D is "
                f"calibrated for their weighted average{advice}"),
                "the uploads are not averaged")
    if decl.rule != "mean":
        return ((f"{prefix}: it aggregates with a robust rule ({decl.rule}), not the weighted average whose "
                f"sensitivity 2C/(mN) Theorems 1 and 3 calibrate sigma_D for{advice}"),
                "robust rule, not the calibrated average")
    weights = [record for record, upload in decl.uploads.items() if upload.kind == "weights"]
    if len(weights) != 1:
        return (f"{prefix}: it uploads {len(weights)} records of weights, NbAFL clips and perturbs one{advice}",
                "not one record of weights")
    return _stray(decl, decl.uploads[weights[0]].names, "nbafl")


def _central(decl: Declaration) -> Refusal | None:
    prefix = _prefix(decl, "central")
    if decl.combine == "none":
        return (f"{prefix}: each site trains alone, nothing is aggregated (run it without privacy)",
                "nothing is aggregated")
    if decl.combine == "pooled":
        return (f"{prefix}: the data are pooled on one node, there are no site updates to clip",
                "the data are pooled")
    kinds = decl.kinds()
    if "gradient" in kinds:
        alternative = _weights_strategy()
        return ((f"{prefix}: {decl.label} uploads a gradient, not an update to clip; use strategy {alternative} "
                "(local.epochs 1) for client-level DP"),
                f"use {alternative} with one local step")
    if "variate-update" in kinds:
        return ((f"{prefix}: {decl.label}'s control-variate update Δc_k travels beside the weights and would need its "
                "own clipping and noise; use privacy.mechanism dpsgd"),
                "Δc_k would need its own clip and noise")
    if decl.rule != "mean":
        return ((f"{prefix}: it aggregates with a robust rule ({decl.rule}), whose sensitivity to one site is not the "
                "S/n of the average"),
                "robust rule, sensitivity is not S/K")
    expected = {"average": "weights", "per-site": "update"}.get(decl.combine)
    main = [record for record, upload in decl.uploads.items() if upload.kind == expected]
    others = [record for record, upload in decl.uploads.items() if upload.kind not in (expected, "statistics")]
    if expected is None or len(main) != 1 or others:
        return ((f"{prefix}: it uploads {', '.join(sorted(kinds))} for a server that combines them by "
                f"'{decl.combine}'; central DP clips one record of weights to average or one update per site"),
                "no single update to clip")
    statistics = [name for record, upload in decl.uploads.items() if upload.kind == "statistics"
                  for name in decl.floating(upload.names)]
    if statistics:
        shown = ", ".join(statistics[:2]) + (" ..." if len(statistics) > 2 else "")
        beside = "Δw" if expected == "update" else "the weights"
        return ((f"{prefix}: the model's buffers ({shown}) travel beside {beside} unprotected; use a model "
                f"without BatchNorm (e.g. {NORM_KEY}: group)"),
                "its buffers travel unprotected")
    return _stray(decl, decl.uploads[main[0]].names, "central")


# --- docs/privacy.md's table -------------------------------------------------------------------------------
TABLE_ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("fedavg", "fedavg", {}),
    ("fedprox", "fedavg", {"proximal_mu": 0.1}),
    ("fedsgd", "fedsgd", {}),
    ("scaffold I", "scaffold", {"variate": "I"}),
    ("scaffold II", "scaffold", {"variate": "II"}),
    ("fedbn", "fedbn", {}),
    ("fedper", "fedper", {"last_modules": 1}),
    ("pfedhn", "pfedhn", {}),
    ("fedmedian", "fedmedian", {}),
    ("fedtrimmedavg", "fedtrimmedavg", {}),
    ("krum", "krum", {}),
    ("multikrum", "multikrum", {}),
    ("bulyan", "bulyan", {}),
    ("local", "local", {}),
    ("centralized", "centralized", {}),
)
"""The privacy page's table rows: its label, ``strategy.name`` and ``strategy.params``. Presentation only (which
settings the page shows); no decision reads it."""


def table_scenario(strategy: str, params: Mapping[str, Any]) -> Scenario:
    """The scenario a table row is decided on: segmentation, plain SGD, GroupNorm (BatchNorm if the algorithm
    needs it: its own check refuses the model without).

    Parameters
    ----------
    strategy : str
        ``strategy.name``.
    params : Mapping[str, Any]
        ``strategy.params``.

    Returns
    -------
    Scenario
    """
    from medtasks.scenario import Scenario
    from strategies import get_algorithm

    algorithm = get_algorithm(strategy)
    resolved = algorithm.Params.model_validate(dict(params)).model_dump(mode="json")
    candidates = [Scenario.model_validate({
        "name": f"table-{strategy}", "task": {"name": "segmentation", "params": {"norm": norm}},
        "partition": {"clients": 10}, "strategy": {"name": strategy, "rounds": 1, "params": resolved},
        "local": {"optimizer": "sgd"},
    }) for norm in ("group", "batch")]
    for scenario in candidates:
        try:
            algorithm.check_compatible(scenario)
        except ValueError:
            continue
        return scenario
    return candidates[0]


def markdown_table(rows: Iterable[tuple[str, str, Mapping[str, Any]]] = TABLE_ROWS) -> str:
    """docs/privacy.md's "Privacy mechanism × strategy" table, decided by :func:`verdict` row by row.

    Parameters
    ----------
    rows : iterable of (str, str, Mapping)
        Label, ``strategy.name`` and ``strategy.params`` of each row (default :data:`TABLE_ROWS`).

    Returns
    -------
    str
        The table in Markdown, one line per row, ending with a newline.
    """
    lines = ["| strategy | " + " | ".join(PROTECTING) + " |", "|---" * (len(PROTECTING) + 1) + "|"]
    for label, strategy, params in rows:
        scenario = table_scenario(strategy, params)
        decl = declare(scenario)
        cells = [verdict(scenario, mechanism, decl).cell() for mechanism in PROTECTING]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m privacy.compatibility: print docs/privacy.md's table
    print(markdown_table(), end="")
