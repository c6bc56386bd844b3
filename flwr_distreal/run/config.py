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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from ..core import defaults as D
from ..training.recipe import DEVICES, SCHEDULES, Recipe
from ..methods import (
    ConfigError,
    MethodView,
    StrategyConfig,
    SubmodelStrategyConfig,
    get_method,
    list_methods,
)
from ..methods.distreal import DistrealStrategyConfig
from ..methods.feddropout import FedDropoutStrategyConfig
from ..methods.full import FullStrategyConfig
from ..methods.heterofl import HeteroFLStrategyConfig
from ..methods.small import SmallStrategyConfig

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
    "SubmodelStrategyConfig",
    "ConfigError",
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


#: The methods' schemas, from the methods registry (:mod:`flwr_distreal.methods`): ``strategy.name``
#: -> its schema (stored in Hydra's ConfigStore as ``strategy/base_<name>``, which
#: ``conf/strategy/<name>.yaml`` extends). A read-only view: a method registered later is in it.
STRATEGY_SCHEMAS: Mapping[str, type[StrategyConfig]] = MethodView("schema")
#: The registered methods' names at import (a method registered later is in :data:`STRATEGY_SCHEMAS`).
STRATEGIES = tuple(list_methods())


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
    # The server evaluates the global model (and recomputes static BN statistics) after rounds k,
    # 2k, ... and always after the last round; the other rounds' metrics.csv rows leave accuracy
    # and loss empty (reports use the last evaluated round at or before a round, see
    # flwr_distreal.cli.sweep.value_at_round).
    evaluate_every: int = 1
    # Evaluate on a fixed subset of this many samples of the evaluation split (test, or validation),
    # drawn once from the run's seed: the same samples every round; null: the whole split.
    evaluate_samples: Optional[int] = None
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
        if isinstance(self.evaluate_every, bool) or not isinstance(self.evaluate_every, int) or self.evaluate_every < 1:
            raise ConfigError(
                f"evaluate_every must be an integer >= 1 (evaluate after rounds k, 2k, ... and the last), "
                f"got {self.evaluate_every!r}"
            )
        if self.evaluate_samples is not None and (
            isinstance(self.evaluate_samples, bool) or not isinstance(self.evaluate_samples, int)
            or self.evaluate_samples < 1
        ):
            raise ConfigError(
                f"evaluate_samples must be an integer >= 1 (a fixed subset of the evaluation split) or null "
                f"(all of it), got {self.evaluate_samples!r}"
            )
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
    if name not in list_methods():
        raise ConfigError(f"strategy.name must be one of {list_methods()}, got {name!r}")
    return get_method(name).schema


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
