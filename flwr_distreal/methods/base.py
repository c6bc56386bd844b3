"""What a method of the comparison is: one record (:class:`Method`) that the runner and both
Flower APIs read, and the base schemas of its ``strategy.*`` config keys.

A method is one file of :mod:`flwr_distreal.methods` (its schema, its server rule and planner,
its client trainer, its label) plus its YAML ``conf/strategy/<name>.yaml``. It declares itself
with :func:`flwr_distreal.methods.registry.register_method`; nothing else dispatches on its name:

- the server: :func:`build_core` turns the method's ``rule`` (Algorithm 2's MACs weights,
  FedAvg's example weights, or per-weight averaging of round-start submodels with the
  method's ``planner``) into a :class:`flwr_distreal.server.ReplyGate`, which the one generic
  strategy class of each Flower API (``MethodStrategy`` in :mod:`flwr_distreal.flower.serverapp`
  and :mod:`flwr_distreal.flower.legacy.strategy`) wraps;
- the client: ``client`` (``"distreal"``: a dropout vector from the LUT per mini-batch,
  Algorithm 1; ``"baseline"``: the full model, the small network, or the submodel the server
  assigned) or a ``trainer`` factory of the method's own;
- the runner: :meth:`Method.server_options` (what the strategy needs from the run) and
  :meth:`Method.client_options` (what the trainer needs from ``strategy.*``).

No Flower, no Hydra: the schemas are plain dataclasses (OmegaConf's ``"???"`` marks a value a
config must set).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..core import contract as C
from ..core import defaults as D
from .. import server
from ..server import (
    SHARE_BOUND,
    SUBMODEL_RULES,
    DistrealCore,
    FedAvgCore,
    ReplyGate,
    RoundBounds,
    full_macs_argument,
)
from ..training.schedule import POLICIES

if TYPE_CHECKING:  # the schemas and the registry load no torch: the runner of flwr run composes configs with them
    from ..server.submodels import SubmodelCore, SubmodelPlanner

__all__ = [
    "CLIENTS",
    "RULES",
    "ConfigError",
    "Method",
    "StrategyConfig",
    "SubmodelStrategyConfig",
    "build_core",
    "check_choice",
    "core_arguments",
    "strategy_signature",
]

log = logging.getLogger(__name__)

#: The server rules a method can use: ``macs`` (Algorithm 2, updates weighted by the MACs each
#: client spent), ``examples`` (FedAvg, weighted by examples), ``submodel`` (a submodel per device
#: planned at round start, every weight averaged over the clients that trained it).
RULES: tuple[str, ...] = ("macs", "examples", "submodel")
#: The client trainers of the runner: ``distreal`` (a LUT vector per mini-batch, Algorithm 1) and
#: ``baseline`` (a fixed model: full, small, or the server's submodel).
CLIENTS: tuple[str, ...] = ("distreal", "baseline")

_MISSING = "???"  # OmegaConf's MISSING: a value the config must set


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


def check_choice(key: str, value: object, choices: typing.Iterable[str]) -> None:
    """Refuse ``strategy.<key>`` outside ``choices``, naming the key and the choices."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"strategy.{key} must be one of {choices}, got {value!r}")


def _no_registry() -> Mapping[str, Method]:
    return {}


#: The registered methods (name -> record), as :mod:`flwr_distreal.methods.registry` keeps them:
#: it installs its reader here when imported (the registry imports this module, not the reverse).
_REGISTERED: Callable[[], Mapping[str, Method]] = _no_registry

#: Models already reported as lacking BatchNorm (the static-BN note is logged once per model).
_NO_BN_LOGGED: set[str] = set()


@dataclass
class StrategyConfig:
    """Base schema of the ``strategy`` group: which method runs (``name``, a registered method).

    Every method has its own schema extending this one with its options; a key of another
    method is refused, naming the key and the valid keys of this one.

    Options of every method: ``static_bn``, static BatchNorm (HeteroFL's sBN): local training
    normalises with batch statistics and leaves the running statistics alone, and before each
    server-side evaluation the global model's statistics are recomputed by a cumulative pass over
    the training data of ``bn_devices`` devices (a seeded sample, fixed for the run); off, clients
    update the running statistics and the server averages them like weights. On for every method
    of a comparison, every method is evaluated the same way. A model without BatchNorm
    (``femnist_cnn``) accepts the key, and it changes nothing (logged once). Off by default;
    on by default for the submodel baselines (:class:`SubmodelStrategyConfig`).
    """

    name: str = _MISSING
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
        registered = _REGISTERED()
        if self.name not in registered:
            raise ConfigError(f"strategy.name must be one of {list(registered)}, got {self.name!r}")
        schema = registered[self.name].schema
        if type(self) is not schema:
            raise ConfigError(
                f"strategy.name={self.name!r} takes the options of {schema.__name__}, not of {type(self).__name__}"
            )

    def apply_to(self, model: Any) -> None:
        """Set this method's model-level switches on a freshly built model (a
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


@dataclass
class SubmodelStrategyConfig(StrategyConfig):
    """Options shared by the methods that train a submodel planned at round start (Federated
    Dropout, HeteroFL, FedRolex, FjORD's widest width).

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
        check_choice("aggregation", self.aggregation, SUBMODEL_RULES)

    def apply_to(self, model: Any) -> None:
        """Switch the model's static BatchNorm and inverted-dropout scaling."""
        super().apply_to(model)
        model.set_inverted_scaling(self.inverted_scaling)


# ----------------------------------------------------------------------------- the record
@dataclass(frozen=True)
class Method:
    """One method of the comparison, as the runner and both Flower APIs see it.

    Parameters
    ----------
    name : str
        ``strategy.name`` in the config (and the YAML ``conf/strategy/<name>.yaml``).
    label : str
        How reports and plots name it.
    schema : type[StrategyConfig]
        Its ``strategy.*`` keys (a dataclass with ``name`` defaulting to ``name``).
    rule : {"macs", "examples", "submodel"}
        The server rule (:data:`RULES`).
    client : {"distreal", "baseline"}, optional
        The runner's client trainer (:data:`CLIENTS`). Defaults to ``"baseline"``.
    planner : Callable[..., SubmodelPlanner] | None, optional
        Rule ``submodel``: ``planner(model, seed=seed, **options)`` builds the round-start
        planner; its keyword arguments are strategy arguments too.
    planner_options : tuple[str, ...], optional
        The schema keys the runner passes to ``planner`` (e.g. HeteroFL's ``shrink``, ``levels``).
    client_options : tuple[str, ...], optional
        Schema keys passed to the client trainer (e.g. ``policy``, ``stop_at_deadline``).
    trainer : Callable[..., Any] | None, optional
        A trainer factory of the method's own, ``trainer(model, loader, device_id, resources,
        method_options, **common)`` (the runner's ``common`` trainer arguments); None uses
        ``client``.
    uses_lut : bool, optional
        The client selects dropout vectors from a LUT (the run's ``lut`` key matters).
    trains_small : bool, optional
        The clients and the server train the model's small variant (``model.small``).
    unlimited : bool, optional
        No resource limits: every train config says ``unlimited``.
    description : str, optional
        One line for the docs and ``--help``.
    """

    name: str
    label: str
    schema: type[StrategyConfig]
    rule: str
    client: str = "baseline"
    planner: Callable[..., SubmodelPlanner] | None = None
    planner_options: tuple[str, ...] = ()
    client_options: tuple[str, ...] = ()
    trainer: Callable[..., Any] | None = None
    uses_lut: bool = False
    trains_small: bool = False
    unlimited: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise ValueError(f"a method's name must be an identifier (strategy.name), got {self.name!r}")
        if not (isinstance(self.schema, type) and issubclass(self.schema, StrategyConfig)):
            raise TypeError(f"method {self.name!r}: schema must be a StrategyConfig subclass, got {self.schema!r}")
        default = {f.name: f.default for f in dataclasses.fields(self.schema)}.get("name")
        if default != self.name:
            raise ValueError(f"method {self.name!r}: its schema {self.schema.__name__} has name={default!r}")
        if self.rule not in RULES:
            raise ValueError(f"method {self.name!r}: rule must be one of {list(RULES)}, got {self.rule!r}")
        if self.client not in CLIENTS:
            raise ValueError(f"method {self.name!r}: client must be one of {list(CLIENTS)}, got {self.client!r}")
        if (self.rule == "submodel") != (self.planner is not None):
            raise ValueError(f"method {self.name!r}: a planner goes with rule 'submodel' (and only with it)")
        keys = {f.name for f in dataclasses.fields(self.schema)}
        for option in (*self.planner_options, *self.client_options):
            if option not in keys:
                raise ValueError(f"method {self.name!r}: option {option!r} is not a key of {self.schema.__name__}")
        if self.planner is not None:
            takes = inspect.signature(self.planner).parameters
            if "seed" not in takes or any(option not in takes for option in self.planner_options):
                raise ValueError(
                    f"method {self.name!r}: the planner must take seed= and its options {list(self.planner_options)}"
                )

    @property
    def assigns_submodels(self) -> bool:
        """The server assigns each device a submodel at round start (rule ``submodel``): in a
        deployment it needs measured throughput (``resources=measured``) or no limits."""
        return self.rule == "submodel"

    def client_options_of(self, strategy: Any) -> dict[str, Any]:
        """The trainer's arguments from the run's ``strategy`` node."""
        return {key: getattr(strategy, key) for key in self.client_options}

    def server_options(self, run: Any) -> dict[str, Any]:
        """The strategy arguments of this method derived from a run (an
        :class:`flwr_distreal.run.experiment.Experiment`, duck-typed: ``cfg``,
        ``full_forward_macs``, ``model_name``, ``availability``, ``num_classes``, ``factor``)."""
        cfg = run.cfg
        if self.rule == "macs":
            # Algorithm 1 adds forward MACs per sample once per mini-batch: the full model's bound;
            # claims bounded by what the server configured: batches of the device's samples
            return dict(
                full_macs_per_sample=run.full_forward_macs,
                on_excess=cfg.strategy.on_excess,
                batch_size=cfg.batch_size,
                local_epochs=cfg.local_epochs,
            )
        if self.rule == "submodel":
            own = dict(
                model_name=run.model_name,
                availability_fn=run.availability,
                round_duration=cfg.deadline,
                num_classes=run.num_classes,
                step_macs_factor=run.factor,
                aggregation=cfg.strategy.aggregation,
            )
            own.update({key: getattr(cfg.strategy, key) for key in self.planner_options})
            return own
        return {}


# ------------------------------------------------------------------------ the server rule
def _bounds(
    *,
    update_bound: float | None = 10.0,
    on_outlier: str = "refuse",
    update_norm: str = "model",
    claim_bound: float | None = None,
    on_claim_outlier: str = "clip",
    share_bound: float | None = SHARE_BOUND,
    robust: str | None = None,
    trim_beta: float = 0.2,
) -> RoundBounds:
    return RoundBounds(
        update_bound=update_bound,
        on_outlier=on_outlier,  # type: ignore[arg-type]
        update_norm=update_norm,  # type: ignore[arg-type]
        claim_bound=claim_bound,
        on_claim_outlier=on_claim_outlier,  # type: ignore[arg-type]
        share_bound=share_bound,
        robust=robust,  # type: ignore[arg-type]
        trim_beta=trim_beta,
    )


def _macs_core(
    *,
    full_macs_per_sample: float | None = None,
    on_excess: str = D.ON_EXCESS,
    batch_size: int | None = None,
    local_epochs: int = D.LOCAL_EPOCHS,
    max_batches_fn: Callable[[int], int] | None = None,
    update_bound: float | None = 10.0,
    on_outlier: str = "refuse",
    update_norm: str = "model",
    claim_bound: float | None = 10.0,
    on_claim_outlier: str = "clip",
    share_bound: float | None = SHARE_BOUND,
    robust: str | None = None,
    trim_beta: float = 0.2,
    macs_key: str = C.MACS,
    num_batches_key: str = C.NUM_BATCHES,
    straggler_key: str = C.STRAGGLER,
    available_macs_key: str = C.AVAILABLE_MACS,
    partition_id_key: str = C.PARTITION_ID,
    full_macs_per_batch: float | None = None,
) -> DistrealCore:
    """Algorithm 2's gate and rule (:class:`flwr_distreal.server.DistrealCore`)."""
    return DistrealCore(
        full_macs_per_sample=full_macs_argument(full_macs_per_sample, full_macs_per_batch, stacklevel=5),  # type: ignore[arg-type]
        on_excess=on_excess,  # type: ignore[arg-type]
        batch_size=batch_size,
        local_epochs=local_epochs,
        max_batches_fn=max_batches_fn,
        bounds=_bounds(
            update_bound=update_bound, on_outlier=on_outlier, update_norm=update_norm, claim_bound=claim_bound,
            on_claim_outlier=on_claim_outlier, share_bound=share_bound, robust=robust, trim_beta=trim_beta,
        ),
        macs_key=macs_key,
        num_batches_key=num_batches_key,
        straggler_key=straggler_key,
        available_macs_key=available_macs_key,
        partition_id_key=partition_id_key,
    )


def _examples_core(
    *,
    update_bound: float | None = 10.0,
    on_outlier: str = "refuse",
    update_norm: str = "model",
    robust: str | None = None,
    trim_beta: float = 0.2,
    macs_key: str = C.MACS,
    straggler_key: str = C.STRAGGLER,
    available_macs_key: str = C.AVAILABLE_MACS,
    partition_id_key: str = C.PARTITION_ID,
) -> FedAvgCore:
    """FedAvg's gate and rule, stragglers dropped (:class:`flwr_distreal.server.FedAvgCore`);
    no MACs claims to bound."""
    return FedAvgCore(
        bounds=_bounds(
            update_bound=update_bound, on_outlier=on_outlier, update_norm=update_norm, claim_bound=None,
            robust=robust, trim_beta=trim_beta,
        ),
        macs_key=macs_key,
        straggler_key=straggler_key,
        available_macs_key=available_macs_key,
        partition_id_key=partition_id_key,
    )


def _submodel_core(
    planner: Callable[..., SubmodelPlanner],
    planner_options: Mapping[str, Any],
    *,
    model_name: str,
    availability_fn: Callable[[int, float], float],
    round_duration: float,
    num_classes: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    step_macs_factor: float = D.STEP_MACS_FACTOR,
    seed: int = D.SEED,
    aggregation: str = D.AGGREGATION,
    update_bound: float | None = 10.0,
    on_outlier: str = "refuse",
    update_norm: str = "model",
    robust: str | None = None,
    macs_key: str = C.MACS,
    straggler_key: str = C.STRAGGLER,
    available_macs_key: str = C.AVAILABLE_MACS,
    partition_id_key: str = C.PARTITION_ID,
) -> SubmodelCore:
    """Round-start submodels and per-weight averaging (:class:`flwr_distreal.server.SubmodelCore`)
    with the method's planner for the full model ``model_name``."""
    from ..models import build_model  # deferred (torch): the schemas and the registry import without it

    # server.SubmodelCore: loaded on first use (torch)
    server.SubmodelCore.check_args(availability_fn, round_duration, step_macs_factor, aggregation)
    model = build_model(model_name, num_classes, **dict(model_kwargs or {}))
    return server.SubmodelCore(
        planner(model, seed=int(seed), **planner_options),
        availability_fn=availability_fn,
        round_duration=round_duration,
        step_macs_factor=step_macs_factor,
        bounds=_bounds(
            update_bound=update_bound, on_outlier=on_outlier, update_norm=update_norm, claim_bound=None, robust=robust
        ),
        aggregation=aggregation,  # type: ignore[arg-type]
        macs_key=macs_key,
        straggler_key=straggler_key,
        available_macs_key=available_macs_key,
        partition_id_key=partition_id_key,
    )


_CORES: dict[str, Callable[..., ReplyGate]] = {"macs": _macs_core, "examples": _examples_core, "submodel": _submodel_core}


def _planner_parameters(method: Method) -> dict[str, inspect.Parameter]:
    """The planner's own keyword arguments (all but the model and ``seed``)."""
    if method.planner is None:
        return {}
    return {
        name: p for name, p in inspect.signature(method.planner).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "seed"
    }


def core_arguments(method: Method) -> dict[str, inspect.Parameter]:
    """The keyword arguments :func:`build_core` takes for ``method`` (name -> parameter, with
    its default): the rule's, plus the planner's own for a submodel method."""
    params = {
        name: p for name, p in inspect.signature(_CORES[method.rule]).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    params.update(_planner_parameters(method))
    return params


def build_core(method: Method, **kwargs: Any) -> ReplyGate:
    """The Flower-free server rule of ``method`` (a :class:`flwr_distreal.server.ReplyGate`)
    from the strategy arguments in :func:`core_arguments` (an unknown one is a ``TypeError``
    naming it)."""
    known = core_arguments(method)
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        raise TypeError(f"method {method.name!r} takes no argument(s) {unknown}; it takes {sorted(known)}")
    if method.rule == "submodel":
        options = {k: kwargs.pop(k) for k in _planner_parameters(method) if k in kwargs}
        return _submodel_core(method.planner, options, **kwargs)  # type: ignore[arg-type]
    return _CORES[method.rule](**kwargs)


def check_policy(policy: object) -> None:
    """Refuse a selection policy outside :data:`flwr_distreal.training.schedule.POLICIES`."""
    check_choice("policy", policy, POLICIES)


def strategy_signature(
    method: Method, leading: typing.Sequence[inspect.Parameter], drop: typing.Iterable[str] = ()
) -> inspect.Signature:
    """The constructor signature of a Flower strategy bound to ``method``: ``self``, the
    adapter's own keyword arguments (``leading``), the method's :func:`core_arguments` (less
    ``drop`` and those in ``leading``), and ``**fedavg_kwargs``. For ``inspect`` and the docs:
    a bound class's defaults are the method's."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *leading]
    taken = {p.name for p in leading} | set(drop)
    params += [p for name, p in core_arguments(method).items() if name not in taken]
    params.append(inspect.Parameter("fedavg_kwargs", inspect.Parameter.VAR_KEYWORD))
    return inspect.Signature(params)
