"""The scenario schema: the plain description of one experiment that every layer reads.

A scenario (YAML in ``scenarios/``) names the task, the data, the non-IID partition,
the strategy and its round schedule, local training, privacy, defenses, attack,
engine and output. This module holds only the pydantic sections and their own
checks. The sections whose content depends on a name (``task.params``,
``strategy.params``, ``partition.params``, ``privacy.params``, ``defense.params``)
are plain mappings here; the registries of tasks, strategies, partitions,
mechanisms and aggregation rules validate them when a scenario is loaded
(:mod:`server.scenario`), so this module imports no layer above the tasks and
every package can depend on it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from medtasks.base import DataSpec, PartitionSpec, TaskContext
from medtasks.partition import KINDS
from medtasks.registry import get_task_class

MechanismName = Literal["none", "dpsgd", "nbafl", "central"]
"""Allowed values of ``privacy.mechanism`` (each one's module is registered in :mod:`privacy`)."""

AggregationName = Literal["mean", "median", "trimmed_mean", "krum", "multikrum", "bulyan"]
"""Allowed values of ``defense.aggregation`` (the rules of :mod:`strategies.aggregation`)."""

TrackerName = Literal["mlflow", "tensorboard"]
"""Allowed values of ``output.trackers`` (each one's class is in :mod:`server.tracking`)."""

AttackName = Literal["dlg", "idlg", "inverting_gradients", "loss_threshold", "lira", "backdoor", "label_flip", "gan"]
"""Allowed values of ``attack.kind`` (each one's module is registered in :mod:`privacy.attacks`)."""


CLUSTER_ADDRESS = re.compile(r"^(?:[^\s/:\[\]]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})$")
"""``HOST:PORT`` of a Ray cluster's GCS (``engine.address``): a host name, IPv4 or bracketed IPv6 address."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TaskSection(_Section):
    """``task``: which medical task, which model, and the task's own parameters."""

    name: str = Field(description="built-in task name or 'pkg.module:Class'")
    model: str | None = Field(None, description="model name (None = the task's default)")
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the task's Params schema")


class DataSection(_Section):
    """``data``: the source of each site's samples.

    Folder data (``source: folder``) comes as one pool at ``path`` split across the sites
    (``sites: split``), or as one folder per hospital, each one site (``sites: subfolders``: the
    sub-folders of ``path``; or ``sites`` listing the folders); ``test_path`` is the server's central
    test set (:mod:`medtasks.sites`). Relative paths are relative to the scenario file.
    """

    source: Literal["synthetic", "folder"] = Field(
        "synthetic", description="synthetic: the task's generated sites (digits: its bundled images); "
                                 "folder: your data at path or in sites")
    path: str | None = Field(None, description="data folder, required for source: folder (unless sites lists them)")
    sites: Literal["split", "subfolders"] | list[str] = Field(
        "split",
        description="split: data.path is one pool split by the partition; subfolders: each sub-folder of "
                    "data.path is one hospital (one site, sorted by name); or the list of hospital folders",
    )
    test_path: str | None = Field(None, description="folder read whole as the server's central test set (folder data)")
    samples_per_client: int = Field(
        64, ge=2, le=1_000_000,
        description="mean samples per site, train + validation, of synthetic data (digits: the most a site keeps; "
                    "folder data: unused)",
    )
    val_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="each site's held-out share for federated "
                                "evaluation, in (0, 1): its last max(1, round(f·n_k)) samples")
    server_samples: int = Field(0, ge=0, le=1_000_000, description="central test set size (0 = none)")
    params: dict[str, Any] = Field(default_factory=dict,
                                   description="source-specific settings; no built-in task takes any (leave it {})")

    @field_validator("sites", mode="before")
    @classmethod
    def _sites_form(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in ("split", "subfolders"):
            raise ValueError(f"'{value}' is not a mode (allowed: split, subfolders, or a list of hospital folders)")
        if isinstance(value, list):
            if not value or not all(isinstance(folder, str) and folder for folder in value):
                raise ValueError("a list of hospital folders needs at least one folder, each a non-empty path")
            if len(set(value)) != len(value):
                raise ValueError(f"lists a hospital folder twice: {value}")
        return value

    @field_validator("sites", "test_path")
    @classmethod
    def _folder_source_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in ("split", None) and info.data.get("source") != "folder":
            raise ValueError("hospital and test folders need data.source: folder (synthetic data has none)")
        return value

    @model_validator(mode="after")
    def _folder_needs_path(self) -> DataSection:
        if self.source == "folder" and not self.path and not isinstance(self.sites, list):
            raise ValueError("source 'folder' needs data.path (or data.sites listing the hospital folders)")
        return self


class PartitionSection(_Section):
    """``partition``: how many sites and which non-IID kind (:mod:`medtasks.partition`)."""

    clients: int = Field(
        ge=1, le=100_000,
        description="number of sites K, partition ids 0..K−1 (hospital folders: their number); above 1,000 a site "
                    "is described when first sampled",
    )
    kind: Literal[KINDS] = Field(  # type: ignore[valid-type]
        "iid", description="what differs between sites: nothing (iid), P(y) (label_skew), P(x) (feature_skew), "
                           "P(y|x) (concept_shift) or their sizes (quantity_skew)",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the kind's Params schema")


class StrategySection(_Section):
    """``strategy``: the federated algorithm and its round schedule."""

    name: str = Field(
        "fedavg", description="federated algorithm: fedavg, fedsgd, scaffold, fedbn, fedper, pfedhn, a robust alias "
                              "of fedavg, or the local and centralized baselines",
    )
    rounds: int = Field(ge=1, le=100_000, description="federated rounds T, each one broadcast, local training and "
                                                      "aggregation (1..100,000)")
    fraction_train: float = Field(
        1.0, gt=0.0, le=1.0,
        description="share of the K sites trained per round, in (0, 1]: max(min_clients, ⌊fraction·K⌋) of them, at "
                    "most K",
    )
    fraction_evaluate: float = Field(
        1.0, ge=0.0, le=1.0,
        description="share of the sites in each federated evaluation, at least one (0 = no federated evaluation)",
    )
    min_clients: int = Field(1, ge=1, description="fewest successful clients a round needs")
    evaluate_every: int = Field(1, ge=1, description="federated/central evaluation every k rounds (and the last)")
    round_timeout: float = Field(3600.0, gt=0.0, description="seconds to wait for a round's replies")
    example_counts: Literal["bounded", "reported"] = Field(
        "bounded",
        description="bounded: a reply's num-examples may not exceed the site's size learned at discovery; "
                    "reported: trust each reply's count",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the strategy's Params schema")


class LocalSection(_Section):
    """``local``: each client's local training between two communications."""

    epochs: int = Field(1, ge=1, le=10_000, description="local epochs E: passes over the site's training data per "
                                                         "round (1..10,000)")
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps per round")
    batch_size: int = Field(16, ge=1, le=65_536, description="examples per optimiser step (DP-SGD with Poisson "
                                                             "sampling: the expected batch size)")
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "adam", description="the site's optimiser (PyTorch's SGD, Adam or AdamW), created afresh every round"
    )
    lr: float = Field(1e-3, gt=0.0, le=10.0, description="learning rate η_l of the local optimiser, in (0, 10]")
    momentum: float = Field(0.0, ge=0.0, lt=1.0, description="SGD momentum, in [0, 1) (optimizer sgd only)")
    weight_decay: float = Field(
        0.0, ge=0.0, description="weight decay: an L2 term in the gradient (sgd, adam) or decoupled (adamw; "
                                 "Loshchilov & Hutter 2019)"
    )


class PrivacySection(_Section):
    """``privacy``: the differential-privacy mechanism and its settings (:mod:`privacy`)."""

    mechanism: MechanismName = Field(
        "none", description="none; dpsgd (each site trains with DP-SGD); nbafl (each site noises its upload); "
                            "central (the server noises the mean update)",
    )
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the mechanism's Params schema")


class DefenseSection(_Section):
    """``defense``: how the server combines the sites' uploads, for every strategy that averages them.

    ``aggregation`` replaces the (weighted) mean of the sites' weights or updates by a Byzantine-robust
    rule; ``norm_bound`` clips each site's update Δ_k = w_k − w_t to that L2 norm before aggregation.
    Both act on what the strategy averages (FedAvg's and FedProx's weights, SCAFFOLD's Δw, FedBN's and
    FedPer's shared tensors). The rules and their ``params`` are in :mod:`strategies.aggregation`.
    """

    aggregation: AggregationName = Field(
        "mean", description="how the server combines the uploads: the weighted mean, or a Byzantine-robust rule"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the rule's Params schema")
    norm_bound: float | None = Field(None, gt=0.0, allow_inf_nan=False,
                                     description="clip each site's update to this L2 norm (null = no bound)")
    prune: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="each site zeroes this fraction of its update's (or gradient's) smallest-magnitude entries, "
                    "tensor by tensor, before it leaves the node (null = send everything)",
    )


class AttackSection(_Section):
    """``attack``: one attack experiment inside the run (:mod:`privacy.attacks`).

    ``victims`` are the partition ids whose uploads an honest-but-curious server attacks (gradient inversion,
    membership inference on a site's update); ``attackers`` are the partition ids of malicious sites
    (poisoning, model replacement, the GAN attack). Which of the two an attack needs, and what its ``params``
    hold, is the attack's own schema (checked when a scenario is loaded).
    """

    kind: AttackName = Field(
        description="inversion (dlg, idlg, inverting_gradients), membership inference (loss_threshold, lira) or "
                    "malicious sites (backdoor, label_flip, gan)"
    )
    victims: list[int] = Field(default_factory=list, description="partition ids whose uploads are attacked")
    attackers: list[int] = Field(default_factory=list, description="partition ids of malicious sites")
    rounds: list[int] | None = Field(None, description="rounds the attack acts in (null = every round)")
    params: dict[str, Any] = Field(default_factory=dict, description="validated by the attack's Params schema")

    @field_validator("victims", "attackers", "rounds")
    @classmethod
    def _distinct_non_negative(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if any(item < 0 for item in value):
            raise ValueError(f"ids and rounds are non-negative, got {value}")
        if len(set(value)) != len(value):
            raise ValueError(f"lists each id or round once, got {value}")
        return sorted(value)

    def acts_in(self, server_round: int) -> bool:
        """Whether the attack acts in round ``server_round``."""
        return self.rounds is None or server_round in self.rounds


class EngineSection(_Section):
    """``engine``: what runs the clients (:mod:`server.engines`) and on which device they train.

    ``deployment`` is a run on real SuperNodes (``medfed run --engine deployment --federation NAME``); a run
    directory's scenario.yaml records it, ``workers`` is then unused.

    ``device`` is where each client trains and evaluates its model: ``auto`` (CUDA when the client's machine
    has it, else the CPU), ``cpu``, or ``cuda`` (a machine without CUDA is refused: by ``medfed validate`` for
    the local engines, by the node itself in a deployment, where each hospital's machine decides). In
    simulation a client gets a GPU only through its Ray share ``gpus_per_client``: a share below 1 packs
    several clients on one GPU (0.5: two), a share above 1 is a whole number of GPUs, 0 gives none, so an ``auto`` client then trains on the CPU and
    ``cuda`` is refused. The server's own models (central evaluation, pFedHN's hypernetwork) stay on the CPU.

    ``address`` runs the simulation on an existing Ray cluster instead of a private Ray instance: ``auto`` is the
    cluster this machine belongs to (Ray's meaning: ``RAY_ADDRESS``, else the address ``ray start`` recorded),
    ``HOST:PORT`` that cluster's GCS. The cluster's resources then decide how many clients train at once
    (``workers`` is unused); each client still asks for ``cpus_per_client`` CPUs and ``gpus_per_client`` GPUs.
    """

    backend: Literal["simulation", "inprocess", "processes", "deployment"] = Field(
        "processes", description="processes (worker processes on this machine, no Ray), simulation (Ray: clusters, "
        "GPU shares), inprocess, or deployment (SuperNodes, needs --federation)"
    )
    workers: int = Field(2, ge=1, le=256, description="clients trained in parallel (simulation, processes; a Ray cluster sizes itself)")
    cpus_per_client: int = Field(1, ge=1, le=256, description="CPU share and torch threads per client")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="where clients train: auto (CUDA if the machine has it), cpu or cuda"
    )
    gpus_per_client: float = Field(
        0.0, ge=0, le=8, description="Ray GPU share per client (simulation; 0.5 packs two clients on one GPU)"
    )
    address: str | None = Field(
        None, description="Ray cluster to run the simulation on: auto or HOST:PORT (null = a private Ray instance)"
    )

    @model_validator(mode="before")
    @classmethod
    def _ray_settings_mean_simulation(cls, data: Any) -> Any:
        """A Ray cluster or a Ray GPU share without a backend named: the simulation engine, Ray's."""
        if isinstance(data, dict) and "backend" not in data and (data.get("address") or data.get("gpus_per_client")):
            return {**data, "backend": "simulation"}
        return data

    @field_validator("gpus_per_client")
    @classmethod
    def _whole_gpus_above_one(cls, share: float) -> float:
        if share > 1 and not share.is_integer():
            raise ValueError(f"a share above 1 is a whole number of GPUs (Ray's rule), got {share:g}")
        return share

    @field_validator("address")
    @classmethod
    def _cluster_address(cls, address: str | None, info: ValidationInfo) -> str | None:
        if address is None:
            return None
        if info.data.get("backend") != "simulation":
            raise ValueError(f"a Ray cluster runs the simulation engine only, not backend '{info.data['backend']}' "
                             "(set engine.backend: simulation, or engine.address: null)")
        match = CLUSTER_ADDRESS.match(address)
        if address != "auto" and not (match and 0 < int(match["port"]) < 65536):
            raise ValueError(f"'{address}' is no Ray cluster address (allowed: auto, or HOST:PORT of the cluster's "
                             "head, e.g. 10.0.0.5:6379)")
        return address

    @model_validator(mode="after")
    def _gpu_share_needs_a_gpu_device(self) -> EngineSection:
        if self.gpus_per_client > 0 and self.device == "cpu":
            raise ValueError(f"gpus_per_client {self.gpus_per_client:g} reserves GPUs that device 'cpu' never uses "
                             "(set engine.device to auto or cuda, or engine.gpus_per_client to 0)")
        return self


class OutputSection(_Section):
    """``output``: where the run directory goes and what it keeps."""

    dir: str = Field("runs", description="folder of the run directories, <dir>/<name>/<timestamp>/ (a relative one "
                                          "is below the working directory)")
    checkpoint_every: int = Field(
        1, ge=1, description="save a checkpoint (state.pt, model_last.pt, model_best.pt) every k rounds and after the "
                             "last; --resume starts from the latest"
    )
    checkpoint_node_state: bool = Field(
        True, description="copy each node's persistent state into checkpoints so --resume restores it"
    )
    plots: bool = Field(True, description="draw the curves in plots/ and write report.html at the end of the run "
                                          "(false: neither, and no examples)")
    examples_every: int | None = Field(
        None, ge=1, description="also draw the model's output on a few test images every k rounds (plots/examples/)"
    )
    trackers: tuple[TrackerName, ...] = Field(
        (), description="experiment trackers that also get the run's params, metrics and files (server/tracking.py)"
    )
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI (None: sqlite:///<output.dir>/mlflow.db, artifacts in <output.dir>/mlruns)"
    )

    @field_validator("trackers", mode="before")
    @classmethod
    def _a_list_of_names(cls, trackers: Any) -> Any:
        if isinstance(trackers, str):
            return [trackers]
        if not isinstance(trackers, (list, tuple)):
            raise ValueError(f"{trackers!r} is not a list of tracker names (allowed: mlflow, tensorboard)")
        return trackers

    @field_validator("trackers")
    @classmethod
    def _each_tracker_once(cls, trackers: tuple[TrackerName, ...]) -> tuple[TrackerName, ...]:
        repeated = sorted({name for name in trackers if trackers.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} named more than once (list each tracker at most once)")
        return trackers

    @model_validator(mode="after")
    def _mlflow_uri_needs_mlflow(self) -> OutputSection:
        if self.mlflow_uri is not None and "mlflow" not in self.trackers:
            raise ValueError("mlflow_uri is set but trackers does not name mlflow (add mlflow to output.trackers, "
                             "or drop output.mlflow_uri)")
        return self


class Scenario(_Section):
    """One experiment: every key of a scenario file."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=100,
        description="the run's name: runs go to <output.dir>/<name>/<timestamp>/ (letters, digits, . _ -; at most 100)",
    )
    description: str = Field("", description="free text, shown by medfed list")
    seed: int = Field(
        0, ge=0, le=2**31 - 1,
        description="every random stream derives from it and its purpose, round and partition id; 0..2³¹−1",
    )
    task: TaskSection
    data: DataSection = Field(default_factory=DataSection)
    partition: PartitionSection
    strategy: StrategySection
    local: LocalSection = Field(default_factory=LocalSection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    defense: DefenseSection = Field(default_factory=DefenseSection)
    attack: AttackSection | None = Field(None, description="attack experiment (null = none)")
    engine: EngineSection = Field(default_factory=EngineSection)
    output: OutputSection = Field(default_factory=OutputSection)

    @model_validator(mode="after")
    def _cross_checks(self) -> Scenario:
        if self.strategy.min_clients > self.partition.clients:
            raise ValueError(
                f"strategy.min_clients ({self.strategy.min_clients}) exceeds partition.clients ({self.partition.clients})"
            )
        if self.attack is not None:
            self._check_attack_ids(self.attack)
        return self

    def _check_attack_ids(self, attack: AttackSection) -> None:
        for key in ("victims", "attackers"):
            outside = [pid for pid in getattr(attack, key) if pid >= self.partition.clients]
            if outside:
                raise ValueError(f"attack.{key}: partition ids {outside} do not exist "
                                 f"(partition.clients {self.partition.clients}: ids 0..{self.partition.clients - 1})")
        late = [t for t in attack.rounds or [] if not 1 <= t <= self.strategy.rounds]
        if late:
            raise ValueError(f"attack.rounds: {late} outside the run's rounds 1..{self.strategy.rounds}")

    # --- derived views -----------------------------------------------------------------
    def task_context(self) -> TaskContext:
        """The :class:`TaskContext` a task is built from."""
        task_class = get_task_class(self.task.name)
        return TaskContext(
            params=task_class.Params.model_validate(self.task.params),
            model=self.task.model,
            data=DataSpec(**self.data.model_dump()),
            partition=PartitionSpec(**self.partition.model_dump()),
            seed=self.seed,
        )

    def to_json(self) -> str:
        """Compact JSON (what travels to clients in messages).

        Settings added after the first release (:data:`LATER_DEFAULTS`) travel only when they differ from
        their default, so a scenario that does not use them sends the same bytes as before they existed
        (``bytes_down`` in ``metrics.jsonl`` counts the scenario in every message). :meth:`from_json` fills
        the defaults back in.
        """
        exclude: dict[str, Any] = {}
        for section, key in LATER_DEFAULTS:
            if key is None and getattr(self, section) == type(getattr(self, section))():
                exclude[section] = True
            elif key is not None:
                field = type(getattr(self, section)).model_fields[key]
                if getattr(getattr(self, section), key) == field.default:
                    exclude.setdefault(section, set()).add(key)
        return self.model_dump_json(exclude=exclude or None)

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        """Inverse of :meth:`to_json` (the text was validated when it was produced)."""
        return cls.model_validate_json(text)

    def to_yaml(self) -> str:
        """Resolved scenario as YAML (every default filled in)."""
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)


LATER_DEFAULTS: tuple[tuple[str, str | None], ...] = (
    ("defense", None), ("strategy", "example_counts"), ("engine", "device"), ("engine", "gpus_per_client"),
    ("data", "sites"), ("data", "test_path"), ("engine", "address"), ("output", "trackers"), ("output", "mlflow_uri"),
)
"""(section, key) of the settings :meth:`Scenario.to_json` leaves out at their default (``None``: the whole
section)."""

