"""Typed schemas of the Hydra configuration (``conf/``).

Each group (dataset, model, strategy, resources) has a dataclass schema stored in Hydra's
ConfigStore; every YAML of the group extends it, so a wrong type or an unknown key fails when
the config is composed, and the range checks in ``__post_init__`` run when
:func:`to_run_config` converts the composed config (before round 1).

The schemas hold every default of the run configuration; the YAMLs do not restate them (Hydra
fills a key a YAML leaves out from its schema). A default that a library class shares (the
training recipe, the DISTREAL policy, HeteroFL's levels, ...) is read from
:mod:`flwr_distreal.core.defaults`, which the classes read too; the recipe's values are validated by
:class:`~flwr_distreal.training.recipe.Recipe` (``tests/test_defaults.py`` checks that all agree).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from ..core import defaults as D
from ..server.aggregate import SUBMODEL_RULES
from ..training.recipe import DEVICES, SCHEDULES, Recipe
from ..training.schedule import POLICIES

__all__ = [
    "STRATEGY_SCHEMAS",
    "DatasetConfig",
    "DistrealStrategyConfig",
    "FedDropoutStrategyConfig",
    "FullStrategyConfig",
    "HeteroFLStrategyConfig",
    "ModelConfig",
    "ResourcesConfig",
    "RunConfig",
    "SmallStrategyConfig",
    "StrategyConfig",
    "register_configs",
    "strategy_schema",
    "to_run_config",
    "unknown_keys",
]

RESOURCE_KINDS = ("full", "constant", "timevarying", "trace", "measured")
TIME_TABLES = ("measure", "proportional")
#: How a run executes: the Message-API app through ``flwr run`` (Flower's supported way), or the
#: legacy NumPyClient/Strategy pair on the deprecated ``run_simulation``.
RUNTIMES = ("flwr-run", "legacy", "inprocess")
#: Round-based learning-rate schedules (:data:`flwr_distreal.training.recipe.SCHEDULES`).
LR_SCHEDULES = SCHEDULES
# DEVICES (where a run's torch work happens: ``auto`` picks CUDA when available):
# :data:`flwr_distreal.training.recipe.DEVICES`, imported above.
#: What the server evaluates the global model on each round.
EVALUATE_ON = ("test", "validation")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


@dataclass
class DatasetConfig:
    """Which data and how it is split into devices (see :mod:`flwr_distreal.data`).

    ``name`` picks the loader; the other keys are passed to it when set (``None`` keeps the
    loader's default): ``root`` (a LEAF FEMNIST folder, a CIFAR/MNIST root), ``path`` (npz),
    ``num_devices``, ``samples_per_device``, ``max_devices`` (FEMNIST writers), ``partition``
    ("iid", "dirichlet", "shards"), ``alpha``, ``download``.
    """

    name: str = MISSING
    root: Optional[str] = None
    path: Optional[str] = None
    num_devices: Optional[int] = None
    samples_per_device: Optional[int] = None
    max_devices: Optional[int] = None
    partition: Optional[str] = None
    alpha: Optional[float] = None
    download: Optional[bool] = None
    variability: float = 3.0

    def __post_init__(self) -> None:
        if self.name == "npz" and not self.path:
            raise ConfigError("dataset=npz needs dataset.path (an .npz file with x_train, y_train, x_test, y_test)")
        if self.variability < 1:
            raise ConfigError(f"dataset.variability must be >= 1, got {self.variability}")

    def loader_kwargs(self, seed: int) -> dict[str, Any]:
        keys = ("root", "path", "num_devices", "samples_per_device", "max_devices", "partition", "alpha", "download")
        out = {k: getattr(self, k) for k in keys if getattr(self, k) is not None}
        out["seed"] = seed
        return out


@dataclass
class ModelConfig:
    """The model (registry name), its small-network variant and classifier size."""

    name: str = MISSING
    small: str = MISSING
    num_classes: Optional[int] = None


@dataclass
class StrategyConfig:
    """Base schema of the ``strategy`` group: which method runs.

    Every strategy has its own schema extending this one with its options (one
    :data:`STRATEGY_SCHEMAS` entry per ``name``): :class:`DistrealStrategyConfig`,
    :class:`FullStrategyConfig`, :class:`SmallStrategyConfig`,
    :class:`FedDropoutStrategyConfig`, :class:`HeteroFLStrategyConfig`. A key of another
    strategy is refused, naming the key and the valid keys of this one.

    Options of every strategy: ``static_bn``, static BatchNorm (HeteroFL's sBN): local training
    normalises with batch statistics and leaves the running statistics alone, and before each
    server-side evaluation the global model's statistics are recomputed by a cumulative pass over
    the training data of ``bn_devices`` devices (a seeded sample, fixed for the run); off, clients
    update the running statistics and the server averages them like weights. On for every method
    of a comparison, every method is evaluated the same way. A model without BatchNorm
    (``femnist_cnn``) accepts the key, and it changes nothing (logged once). Off by default;
    on by default for the submodel baselines (:class:`SubmodelStrategyConfig`).
    """

    name: str = MISSING
    # true: static BatchNorm (as HeteroFL's sBN): training normalises with batch statistics, the
    # server recomputes the statistics from bn_devices devices' training data before each
    # evaluation. Turn it on for every method of a comparison on a BN model so that all are
    # evaluated alike (the baselines have it on by default). A no-op for a model without BN.
    static_bn: bool = False
    # devices whose training data the server recomputes BN statistics from (seeded sample)
    bn_devices: int = 10

    def __post_init__(self) -> None:
        if self.bn_devices < 1:
            raise ConfigError(f"strategy.bn_devices must be >= 1, got {self.bn_devices}")
        schema = STRATEGY_SCHEMAS.get(self.name)
        if schema is None:
            raise ConfigError(f"strategy.name must be one of {list(STRATEGY_SCHEMAS)}, got {self.name!r}")
        if type(self) is not schema:
            raise ConfigError(
                f"strategy.name={self.name!r} takes the options of {schema.__name__}, not of {type(self).__name__}"
            )

    def apply_to(self, model: Any) -> None:
        """Set this strategy's model-level switches on a freshly built model (a
        :class:`~flwr_distreal.core.dropout.DropoutModel`): static BatchNorm here, more in subclasses."""
        if model.set_static_bn(self.static_bn) == 0 and self.static_bn:
            name = getattr(model, "model_name", "") or type(model).__name__
            if name not in _NO_BN_LOGGED:
                _NO_BN_LOGGED.add(name)
                log.info("strategy.static_bn=true: model %s has no BatchNorm layer, so the key changes nothing", name)

    def bn_recompute_devices(self) -> int:
        """How many devices' training data the server recomputes BatchNorm statistics from
        before each evaluation: ``bn_devices`` with static BatchNorm, else 0 (the global model's
        own statistics are used)."""
        return self.bn_devices if self.static_bn else 0


def _check_choice(key: str, value: object, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"strategy.{key} must be one of {choices}, got {value!r}")


@dataclass
class DistrealStrategyConfig(StrategyConfig):
    """DISTREAL (Rapp et al., AAAI 2022).

    ``policy``: the per-batch budget rule (``deadline``, the default: time left * r(t) /
    batches left; ``paper``: r(t) * T / B, the paper's D[r]). ``stop_at_deadline``: stop at the
    deadline and send the completed steps, weighted by their MACs. ``on_excess``: ``refuse`` or
    ``clip`` a reply that claims more MACs than possible. ``inverted_scaling``: a layer that reads
    ``k`` of a producer's ``C`` channels under the per-batch random dropout multiplies them by
    ``C / k`` (standard inverted dropout; on by default). ``static_bn``, ``bn_devices``: see
    :class:`StrategyConfig` (off by default: running statistics, as a plain full model keeps).
    """

    name: str = "distreal"
    # deadline: time left * r(t) / samples left per batch; paper: r(t) * T / B (the paper's D[r])
    policy: str = D.POLICY
    # stop at the deadline and send the completed steps, weighted by their MACs
    stop_at_deadline: bool = D.STOP_AT_DEADLINE
    # refuse or clip a reply that claims more MACs than possible
    on_excess: str = D.ON_EXCESS
    # per-batch random dropout scales the k kept of C channels by C/k (inverted dropout,
    # Srivastava et al. 2014)
    inverted_scaling: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("policy", self.policy, POLICIES)
        _check_choice("on_excess", self.on_excess, ("refuse", "clip"))

    def apply_to(self, model: Any) -> None:
        """Switch the model's static BatchNorm and inverted-dropout scaling."""
        super().apply_to(model)
        model.set_inverted_scaling(self.inverted_scaling)


@dataclass
class FullStrategyConfig(StrategyConfig):
    """Full resources: FedAvg on the full model, no resource limits (only the options of
    :class:`StrategyConfig`: ``static_bn``, ``bn_devices``)."""

    name: str = "full"


@dataclass
class SmallStrategyConfig(StrategyConfig):
    """Small network: FedAvg on the model's small variant (``model.small``; only the options of
    :class:`StrategyConfig`: ``static_bn``, ``bn_devices``)."""

    name: str = "small"


@dataclass
class SubmodelStrategyConfig(StrategyConfig):
    """Options shared by the submodel baselines (Federated Dropout, HeteroFL).

    ``inverted_scaling``: a consumer of ``k`` of a producer's ``C`` channels of the assigned
    submodel multiplies them by ``C / k``; off, the submodel trains as the narrower network it
    is. ``aggregation``: ``per_weight`` (every weight averaged over the clients whose submodel
    holds it, weighted by examples) or ``all_clients`` (FedAvg over the zero-padded updates: a
    client that did not train a weight counts with the global value). ``static_bn`` (see
    :class:`StrategyConfig`) is on by default here: the submodels' running statistics do not
    describe the full model. The defaults of each baseline and their sources: README,
    "Baseline conventions".
    """

    inverted_scaling: bool = True
    aggregation: str = D.AGGREGATION
    static_bn: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("aggregation", self.aggregation, SUBMODEL_RULES)

    def apply_to(self, model: Any) -> None:
        """Switch the model's static BatchNorm and inverted-dropout scaling."""
        super().apply_to(model)
        model.set_inverted_scaling(self.inverted_scaling)


@dataclass
class FedDropoutStrategyConfig(SubmodelStrategyConfig):
    """Federated Dropout (Caldas et al. 2018), extended as in the paper; see
    :class:`SubmodelStrategyConfig`. Defaults: unscaled submodels, per-weight averaging, static
    BatchNorm."""

    name: str = "feddropout"
    # false: the client trains its random subset as a repacked narrower network, unscaled
    # (DISTREAL paper, Related Work "Train NN Subsets": FD trains "a repacked smaller network";
    # the DISTREAL authors' own FD, github.com/k1l1/SLT nets/SubsetNets/*.py, has no scaler).
    # aggregation per_weight: each weight averaged over the clients whose submodel holds it
    # (k1l1/SLT algorithms/fd.py, model_averaging). static_bn true: k1l1/SLT builds every
    # BatchNorm of its models (nets/Baseline and nets/SubsetNets densenet_cifar.py,
    # resnet_cifar.py) with track_running_stats=False: running statistics are never kept; with
    # running statistics of the submodels averaged, DenseNet-BC-40's full model stays at chance
    # (README, "Baseline conventions").
    inverted_scaling: bool = False


@dataclass
class HeteroFLStrategyConfig(SubmodelStrategyConfig):
    """HeteroFL (Diao, Ding and Tarokh, ICLR 2021); see :class:`SubmodelStrategyConfig`.

    ``shrink``: the shrinking ratio ``s`` in (0, 1) (0.7, the DISTREAL paper's choice);
    ``levels``: width levels ``s**(p-1)``, ``p = 1 .. levels``. Defaults: scaled submodels,
    per-weight averaging, static BatchNorm (the paper's sBN).
    """

    name: str = "heterofl"
    # s; level p keeps the first ceil(s**(p-1) * C) filters (DISTREAL paper: s = 0.7)
    shrink: float = D.HETEROFL_SHRINK
    levels: int = D.HETEROFL_LEVELS
    # true: HeteroFL's Scaler (paper, section 3 "Scaler"; repository diaoenmao/HeteroFL-...
    # src/modules/modules.py, on in every run of src/make.py): the k of C kept channels are scaled
    # by C/k. aggregation per_weight: HeteroFL's per-parameter average over the clients holding it
    # (src/fed.py, Federation.combine). static_bn true: sBN (paper, section 3 "Static Batch
    # Normalization"; models built with track_running_stats=False, statistics recomputed before
    # testing by src/train_classifier_fed.py, stats).
    inverted_scaling: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.shrink < 1:
            raise ConfigError(f"strategy.shrink must be in (0, 1), got {self.shrink}")
        if self.levels < 1:
            raise ConfigError(f"strategy.levels must be >= 1, got {self.levels}")


#: Models already reported as lacking BatchNorm (the static-BN note is logged once per model).
_NO_BN_LOGGED: set[str] = set()

#: The strategy registry: ``strategy.name`` -> its schema (stored in Hydra's ConfigStore as
#: ``strategy/base_<name>``, which ``conf/strategy/<name>.yaml`` extends).
STRATEGY_SCHEMAS: dict[str, type[StrategyConfig]] = {
    "distreal": DistrealStrategyConfig,
    "full": FullStrategyConfig,
    "small": SmallStrategyConfig,
    "feddropout": FedDropoutStrategyConfig,
    "heterofl": HeteroFLStrategyConfig,
}
STRATEGIES = tuple(STRATEGY_SCHEMAS)


@dataclass
class ResourcesConfig:
    """Resource availability (see :mod:`flwr_distreal.core.resources`).

    ``variability`` ``None`` takes the dataset's (3 for FEMNIST, 4 for CIFAR); ``lam`` is the
    number of availability changes per round (time-varying); ``trace_path`` a CSV to replay.
    ``kind=measured`` is the wall-clock mode (:mod:`flwr_distreal.training.wallclock`): the device measures
    its own step times and ``deadline`` is in real seconds; ``time_table`` says how the per-vector
    step times are found (``measure``: timed once per device, cached in ``table_path`` if set;
    ``proportional``: step time proportional to MACs), ``margin`` the safety margin of a step's
    predicted time.
    """

    kind: str = MISSING
    variability: Optional[float] = None
    lam: float = 1.0  # availability changes per round (paper: 0.5, 1, 2, 4)
    trace_path: Optional[str] = None
    step_macs_factor: float = D.STEP_MACS_FACTOR
    time_table: str = "measure"
    table_path: Optional[str] = None
    margin: float = 0.1

    def __post_init__(self) -> None:
        if self.kind not in RESOURCE_KINDS:
            raise ConfigError(f"resources.kind must be one of {list(RESOURCE_KINDS)}, got {self.kind!r}")
        if self.variability is not None and self.variability < 1:
            raise ConfigError(f"resources.variability must be >= 1, got {self.variability}")
        if self.lam < 0:
            raise ConfigError(f"resources.lam must be >= 0, got {self.lam}")
        if self.kind == "trace" and not self.trace_path:
            raise ConfigError("resources.kind=trace needs resources.trace_path")
        if self.step_macs_factor <= 0:
            raise ConfigError(f"resources.step_macs_factor must be > 0, got {self.step_macs_factor}")
        if self.time_table not in TIME_TABLES:
            raise ConfigError(f"resources.time_table must be one of {list(TIME_TABLES)}, got {self.time_table!r}")
        if not 0 <= self.margin < 1:
            raise ConfigError(f"resources.margin must be in [0, 1), got {self.margin}")


@dataclass
class RunConfig:
    """A federated run (top-level keys of ``conf/config.yaml``).

    ``deployment``: false (default) simulates one SuperNode per device of the dataset; true runs
    on real SuperNodes (Flower's deployment runtime), any number of them, each with its own data
    from its node config (``partition-id`` + ``num-partitions``, or ``data-path``); the ServerApp
    waits for ``min_nodes`` and trains every connected node each round. ``round_timeout``: seconds
    the server waits for a round's replies (late replies count as failures); null: 3600, or
    ``2 * deadline + 60`` with ``resources=measured``. ``node_wait``: seconds a round waits for
    nodes: the first round for ``min_nodes`` (deployment: the nodes to start; fewer ends the run),
    a later one for the nodes the run has, then it goes on with those connected; null:
    ``round_timeout`` if set, else 60. ``checkpoint_every``: rounds between two
    checkpoints of the run (``checkpoint.npz``; the last round always); ``resume``: continue the
    run in the output directory from its checkpoint (a run into a directory that holds one is
    refused without it). ``failure_threshold``: a run in which, in every round, more than this
    fraction of the sampled clients failed ends with an error.
    """

    dataset: DatasetConfig = MISSING
    model: ModelConfig = MISSING
    strategy: StrategyConfig = MISSING
    resources: ResourcesConfig = MISSING
    rounds: int = 20
    clients_per_round: int = 10
    seed: int = D.SEED
    deadline: float = 1.0  # round duration T (simulated seconds; r_max is derived from it)
    # The training recipe (flwr_distreal.training.recipe.Recipe, which validates these keys). clip_norm:
    # gradient-norm clipping per local step (null: none), the stable default (README, "Training
    # recipe"). lr_schedule: constant, cosine (to lr_min at the last round), step (x lr_gamma
    # every lr_step_rounds).
    lr: float = D.LR
    momentum: float = D.MOMENTUM
    weight_decay: float = D.WEIGHT_DECAY
    clip_norm: Optional[float] = D.CLIP_NORM
    lr_schedule: str = D.LR_SCHEDULE
    lr_min: float = D.LR_MIN
    lr_step_rounds: int = D.LR_STEP_ROUNDS
    lr_gamma: float = D.LR_GAMMA
    device: str = "auto"  # auto: CUDA when available, else CPU; cpu; cuda (clients and server evaluation)
    validation_fraction: float = 0.0  # part of each device's training data held out as the validation split (lr tuning)
    evaluate_on: str = "test"  # test, or validation (the held-out split; what lr tuning judges by)
    batch_size: int = 32
    local_epochs: int = D.LOCAL_EPOCHS
    # DISTREAL's LUT: learned (the DSE's LUT shipped for the model, flwr_distreal/luts/), uniform
    # (equal rates), or a LUT file.
    lut: Optional[str] = "learned"
    skip_straggler_training: bool = D.SKIP_STRAGGLER_TRAINING
    eval_batch_size: int = 512
    num_cpus_per_client: float = 1.0
    num_gpus_per_client: float = 0.0
    torch_threads: int = 1
    # Memory layout of the models: channels_last, nchw, or auto (whichever a few-second calibration
    # finds faster for model and batch size; cached per machine). Not auto by default: the two
    # layouts round differently, so a timing-based choice would make seeded runs differ between
    # machines (the main job's small network, seed 0, changed when auto picked NCHW for it).
    layout: str = "channels_last"
    # fp32; bf16 (autocast: CPUs with AVX-512 BF16/AMX, refused elsewhere; CUDA AMP); fp16 (CUDA
    # only, with a GradScaler). Losses, weights and BN statistics stay fp32.
    precision: str = D.PRECISION
    output_dir: Optional[str] = None
    # flwr-run: the Message-API app via `flwr run` (private local SuperLink); legacy: NumPyClient +
    # legacy strategy on run_simulation; inprocess: the clients in this process.
    runtime: str = "flwr-run"
    deployment: bool = False
    min_nodes: int = 2
    round_timeout: Optional[float] = None
    node_wait: Optional[float] = None
    resume: bool = False
    checkpoint_every: int = 1  # rounds between checkpoints (atomic; the last round always)
    failure_threshold: float = 0.5
    plot: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        positive = {
            "rounds": self.rounds,
            "clients_per_round": self.clients_per_round,
            "batch_size": self.batch_size,
            "local_epochs": self.local_epochs,
            "eval_batch_size": self.eval_batch_size,
            "torch_threads": self.torch_threads,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key} must be >= 1, got {value}")
        if not self.deadline > 0:
            raise ConfigError(f"deadline must be > 0, got {self.deadline}")
        try:  # the recipe keys (lr, momentum, ..., clip_norm, lr_schedule, ...): validated by the Recipe
            Recipe.from_config(self)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {list(DEVICES)}, got {self.device!r}")
        if self.layout not in ("auto", "channels_last", "nchw"):  # flwr_distreal.training.layout.LAYOUTS
            raise ConfigError(f"layout must be one of ['auto', 'channels_last', 'nchw'], got {self.layout!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):  # flwr_distreal.core.precision.PRECISIONS; the device is checked at start-up
            raise ConfigError(f"precision must be one of ['fp32', 'bf16', 'fp16'], got {self.precision!r}")
        if not 0 <= self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction must be in [0, 1), got {self.validation_fraction}")
        if self.evaluate_on not in EVALUATE_ON:
            raise ConfigError(f"evaluate_on must be one of {list(EVALUATE_ON)}, got {self.evaluate_on!r}")
        if self.evaluate_on == "validation" and self.validation_fraction == 0:
            raise ConfigError("evaluate_on=validation needs validation_fraction > 0 (the part of each device's data held out)")
        if not self.lut:
            raise ConfigError(
                "lut must name the LUT DISTREAL selects from: learned (the DSE's LUT shipped for the model), "
                "uniform (equal rates in every layer), or a LUT file's path; got "
                f"{self.lut!r} (null used to mean uniform: say lut=uniform)"
            )
        if self.seed < 0:
            raise ConfigError(f"seed must be >= 0 (numpy's SeedSequence refuses negative seeds), got {self.seed}")
        if self.checkpoint_every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if not 0 <= self.failure_threshold < 1:
            raise ConfigError(f"failure_threshold must be in [0, 1), got {self.failure_threshold}")
        if self.min_nodes < 1:
            raise ConfigError(f"min_nodes must be >= 1, got {self.min_nodes}")
        if self.round_timeout is not None and not self.round_timeout > 0:
            raise ConfigError(f"round_timeout must be > 0 seconds (or null), got {self.round_timeout}")
        if self.node_wait is not None and not 0 < self.node_wait < float("inf"):
            raise ConfigError(f"node_wait must be a finite number of seconds > 0 (or null), got {self.node_wait}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime must be one of {list(RUNTIMES)}, got {self.runtime!r}")
        if self.round_timeout is not None and self.runtime in ("legacy", "inprocess"):
            # Never ignored in silence: these runtimes run the clients one after another in the
            # server's process and cannot stop a round that overruns.
            raise ConfigError(
                f"round_timeout={self.round_timeout} is not applied by runtime={self.runtime} (its clients run "
                "one after another in this process and a round cannot be cut short); use runtime=flwr-run or a "
                "deployment, or set round_timeout=null"
            )
        if self.num_cpus_per_client <= 0 or self.num_gpus_per_client < 0:
            raise ConfigError("num_cpus_per_client must be > 0 and num_gpus_per_client >= 0")


def register_configs() -> None:
    """Store the schemas so that the YAMLs of each group can extend them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="base_run", node=RunConfig)
    cs.store(group="dataset", name="base_dataset", node=DatasetConfig)
    cs.store(group="model", name="base_model", node=ModelConfig)
    for name, schema in STRATEGY_SCHEMAS.items():
        cs.store(group="strategy", name=f"base_{name}", node=schema)
    cs.store(group="resources", name="base_resources", node=ResourcesConfig)


def unknown_keys(
    node: DictConfig, schema: type, prefix: str = "", *, schemas: typing.Mapping[str, type] | None = None
) -> list[str]:
    """Dotted paths of the keys of ``node`` that the dataclass ``schema`` (recursively) lacks.

    Hydra's ``+key=value`` adds keys even to schema-typed nodes, where they would otherwise be
    ignored silently (a typo such as ``+strategy.polcy=paper``).

    Parameters
    ----------
    node : DictConfig
        A composed config node.
    schema : type
        The dataclass that types ``node``; nested dataclass fields are checked recursively.
    prefix : str, optional
        Prepended to every path (e.g. ``"dse."``).
    schemas : Mapping[str, type], optional
        Schemas that replace a field's declared type, by dotted path (``{"strategy":
        HeteroFLStrategyConfig}``: the strategy node is checked against its own strategy's keys).
    """
    schemas = schemas or {}
    hints = typing.get_type_hints(schema)
    out: list[str] = []
    for key in node.keys():
        path = f"{prefix}{key}"
        if key not in hints:
            out.append(path)
            continue
        sub = schemas.get(path, hints[key])
        if dataclasses.is_dataclass(sub) and isinstance(node.get(key), DictConfig):
            out += unknown_keys(node[key], sub, f"{path}.", schemas=schemas)
    return out


def strategy_schema(cfg: DictConfig) -> type[StrategyConfig] | None:
    """The schema of the composed config's strategy, picked by ``strategy.name`` from
    :data:`STRATEGY_SCHEMAS` (None when the config has no strategy name yet).

    Raises
    ------
    ConfigError
        If ``strategy.name`` names no strategy.
    """
    node = cfg.get("strategy") if isinstance(cfg, DictConfig) else None
    if not isinstance(node, DictConfig) or "name" not in node or OmegaConf.is_missing(node, "name"):
        return None
    name = node.name
    if name not in STRATEGY_SCHEMAS:
        raise ConfigError(f"strategy.name must be one of {list(STRATEGY_SCHEMAS)}, got {name!r}")
    return STRATEGY_SCHEMAS[name]


def _refuse_unknown_keys(cfg: DictConfig, strategy: type[StrategyConfig] | None) -> None:
    """Refuse keys that no schema has, naming the valid keys of their place."""
    schemas = {"strategy": strategy} if strategy is not None else {}
    unknown = unknown_keys(cfg, RunConfig, schemas=schemas)
    if unknown:
        parent, _, key = unknown[0].rpartition(".")
        place: Any = RunConfig
        path = ""
        for part in filter(None, parent.split(".")):
            path = f"{path}.{part}" if path else part
            place = schemas.get(path, typing.get_type_hints(place)[part])
        valid = sorted(f.name for f in dataclasses.fields(place))
        if parent == "strategy" and strategy is not None:
            where = f"of strategy={cfg.strategy.name}"
        else:
            where = f"of {parent}" if parent else "at the top level"
        raise ConfigError(f"unknown key {unknown[0]!r}; valid keys {where}: {valid}")


def to_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Convert a composed config into a validated :class:`RunConfig`.

    The strategy node is typed by its own schema, picked by ``strategy.name`` from
    :data:`STRATEGY_SCHEMAS`, so ``run.strategy`` is, e.g., a :class:`HeteroFLStrategyConfig`.

    Raises
    ------
    ConfigError
        If a value is out of range, ``strategy.name`` names no strategy, or a key is not in its
        place's schema, e.g. a key of another strategy (the message names the key and the
        valid keys there).
    """
    if isinstance(cfg, dict):
        cfg = OmegaConf.create(cfg)
    strategy = strategy_schema(cfg)
    _refuse_unknown_keys(cfg, strategy)
    schema = OmegaConf.structured(RunConfig)
    if strategy is not None:
        schema.strategy = OmegaConf.structured(strategy)  # the strategy's own schema, by its name
    merged = OmegaConf.merge(schema, cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
