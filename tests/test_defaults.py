"""Every default is stated once (issue 19, item 3): the YAMLs, the schema and the library agree.

The schemas of :mod:`flwr_distreal.run.config` hold the defaults of the run configuration; the
YAMLs of ``conf/`` extend them and restate none (Hydra fills a key a YAML leaves out from its
schema), and a library class whose argument means the same as a schema key (``Recipe.lr`` and
``lr``, ``DistrealTrainer``'s ``policy`` and ``strategy.policy``, ``HeteroFL``'s ``levels`` and
``strategy.levels``, ...) has the schema's default, read from :mod:`flwr_distreal.core.defaults`.
Each test here fails when one place gets a default of its own:

* a run key in ``conf/config.yaml`` or an option key in ``conf/strategy/*.yaml`` (a second
  default), or a value in a shared group YAML equal to the schema's (a restatement);
* a composed default config that differs from the schema defaults;
* a constructor default of a library class that differs from the schema's field of the same
  meaning (found by name over every public class of the modules that take run settings, so a
  new argument is checked too).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any

import pytest
from conftest import CONF, compose_config
from omegaconf import OmegaConf

from flwr_distreal.flower.legacy import client, strategy
from flwr_distreal.flower import clientapp, serverapp
from flwr_distreal.core import defaults
from flwr_distreal.training import loop, trainers as training, wallclock
from flwr_distreal.run.config import (
    STRATEGY_SCHEMAS,
    ConfigError,
    DatasetConfig,
    DistrealStrategyConfig,
    FedDropoutStrategyConfig,
    HeteroFLStrategyConfig,
    ModelConfig,
    ResourcesConfig,
    RunConfig,
    StrategyConfig,
    to_run_config,
)
from flwr_distreal.training.recipe import Recipe

#: The keys that pick a group's option (the identity of the YAML, not a default).
IDENTITY = {"name", "kind"}
#: The schema of each shared group: its YAMLs may set option-specific values, never a default.
SHARED_GROUPS = {"dataset": DatasetConfig, "model": ModelConfig, "resources": ResourcesConfig}


def _defaults(schema: type) -> dict[str, Any]:
    """The schema's fields that have a default, with it (``MISSING`` fields left out)."""
    out = {}
    for f in dataclasses.fields(schema):
        if f.default is not dataclasses.MISSING and f.default != "???":
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _yaml(path: Path) -> dict[str, Any]:
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    return {k: v for k, v in node.items() if k not in ("defaults", "hydra")}


def _params(obj: Any) -> dict[str, Any]:
    """The constructor arguments of ``obj`` that have a default, with it."""
    init = obj.__init__ if inspect.isclass(obj) else obj
    return {
        name: p.default
        for name, p in inspect.signature(init).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


# ---------------------------------------------------------------------- the YAMLs and the schema


def test_config_yaml_sets_no_run_key() -> None:
    """conf/config.yaml picks the default options and configures Hydra; every run key's
    default is RunConfig's."""
    keys = _yaml(CONF / "config.yaml")
    assert not keys, f"conf/config.yaml sets {sorted(keys)}: a run key's default belongs in flwr_distreal.run.config.RunConfig"


@pytest.mark.parametrize("name", sorted(STRATEGY_SCHEMAS))
def test_strategy_yaml_sets_only_its_name(name: str) -> None:
    """Each strategy has its own schema: an option's default lives there, not in the YAML."""
    keys = _yaml(CONF / "strategy" / f"{name}.yaml")
    assert keys == {"name": name}, f"conf/strategy/{name}.yaml sets {sorted(set(keys) - {'name'})}: defaults belong in {STRATEGY_SCHEMAS[name].__name__}"


@pytest.mark.parametrize(
    "path", [p for group in SHARED_GROUPS for p in sorted((CONF / group).glob("*.yaml"))], ids=lambda p: f"{p.parent.name}/{p.stem}"
)
def test_group_yaml_restates_no_schema_default(path: Path) -> None:
    """A dataset, model or resources YAML sets what is particular to its option (CIFAR's
    variability 4, a trace's path); a value equal to the schema's default is a second statement
    of it, which would stay behind when the default changes."""
    schema = SHARED_GROUPS[path.parent.name]
    defaults_ = _defaults(schema)
    restated = {k: v for k, v in _yaml(path).items() if k not in IDENTITY and k in defaults_ and defaults_[k] == v}
    assert not restated, f"{path.relative_to(CONF.parent)} restates {schema.__name__}'s defaults {restated}"


def test_composed_default_config_is_the_schema_defaults() -> None:
    """What ``python -m flwr_distreal.main`` runs without overrides: every top-level key is
    RunConfig's default (lr 0.1 and clip_norm 1.0 among them), the strategy's every key
    DistrealStrategyConfig's, the resources' ResourcesConfig's."""
    run = to_run_config(compose_config())
    for key, value in _defaults(RunConfig).items():
        assert getattr(run, key) == value, key
    assert (run.lr, run.clip_norm, run.rounds, run.strategy.policy) == (0.1, 1.0, 20, "deadline")  # what ran before
    for key, value in _defaults(DistrealStrategyConfig).items():
        assert getattr(run.strategy, key) == value, f"strategy.{key}"
    for key, value in _defaults(ResourcesConfig).items():
        if key != "kind":
            assert getattr(run.resources, key) == value, f"resources.{key}"


@pytest.mark.parametrize("name", sorted(STRATEGY_SCHEMAS))
def test_each_strategy_composes_to_its_schema_defaults(name: str) -> None:
    run = to_run_config(compose_config(f"strategy={name}"))
    assert run.strategy == STRATEGY_SCHEMAS[name]()


# ---------------------------------------------------------------------- the library and the schema

RUN = _defaults(RunConfig)
RESOURCES = _defaults(ResourcesConfig)

#: Recipe field -> run config key.
RECIPE_KEYS = {
    "lr": "lr", "momentum": "momentum", "weight_decay": "weight_decay", "clip_norm": "clip_norm",
    "schedule": "lr_schedule", "lr_min": "lr_min", "step_rounds": "lr_step_rounds", "gamma": "lr_gamma",
}


def test_recipe_defaults_are_the_run_configs() -> None:
    """``Recipe()`` is the runner's recipe (lr 0.1, clip_norm 1.0: until 2026-12 ``Recipe()``
    had lr 0.05 and no clipping)."""
    fields = _params(Recipe)
    for field_name, key in RECIPE_KEYS.items():
        assert fields[field_name] == RUN[key], f"Recipe.{field_name}={fields[field_name]!r}, RunConfig.{key}={RUN[key]!r}"
    run = to_run_config(compose_config())
    assert Recipe.from_config(run) == Recipe(total_rounds=run.rounds)


def test_recipe_constant_is_plain_sgd_at_the_run_configs_lr() -> None:
    """Recipe.constant is the paper's plain SGD by definition (no clipping unless asked); its
    lr, momentum and weight decay are the run config's."""
    params = _params(Recipe.constant)
    assert {k: params[k] for k in ("lr", "momentum", "weight_decay")} == {k: RUN[k] for k in ("lr", "momentum", "weight_decay")}
    assert params["clip_norm"] is None
    assert Recipe.constant() == Recipe(clip_norm=None)


#: Where a library argument named like a schema key means something else, or has no fixed
#: default by design (None: decided from other settings; the trainers' own torch device).
DIFFERENT_MEANING = {
    ("DeviceTrainer", "lr"), ("DeviceTrainer", "momentum"), ("DeviceTrainer", "weight_decay"),  # None: Recipe.constant's (checked above)
    ("DeviceTrainer", "seed"),  # None: torch's global generator (a library trainer without a run)
    ("Distreal", "batch_size"),  # None: from the replies' metrics
    ("DistrealRound", "batch_size"), ("MeasuredDistrealRound", "batch_size"),  # None: the loader's
    ("DistrealRound", "lr"), ("MeasuredDistrealRound", "lr"),  # your optimiser's lr, only reported as a metric
    # the per-batch API cannot time steps itself: a table, or time proportional to MACs
    ("MeasuredDistrealRound", "time_table"),
    ("MeasuredBaselineTrainer", "time_table"),  # None: no table, time proportional to MACs
}

#: Per-strategy schemas: a class whose name starts with the key takes that schema's option defaults.
CLASS_SCHEMAS = {
    "HeteroFL": HeteroFLStrategyConfig,
    "FederatedDropout": FedDropoutStrategyConfig,
    "MeasuredDistreal": DistrealStrategyConfig,
    "Distreal": DistrealStrategyConfig,
}


def _schema_default(cls_name: str, arg: str) -> tuple[str, Any] | None:
    """The schema default an argument ``arg`` of class ``cls_name`` must have, if any."""
    for prefix, schema in CLASS_SCHEMAS.items():
        if cls_name.startswith(prefix) and arg in _defaults(schema):
            return schema.__name__, _defaults(schema)[arg]
    submodel_keys = set(_defaults(HeteroFLStrategyConfig)) & set(_defaults(FedDropoutStrategyConfig))
    if cls_name.startswith("Submodel") and arg in submodel_keys and arg != "inverted_scaling":
        assert _defaults(HeteroFLStrategyConfig)[arg] == _defaults(FedDropoutStrategyConfig)[arg]
        return "SubmodelStrategyConfig", _defaults(HeteroFLStrategyConfig)[arg]
    if arg in RUN:
        return "RunConfig", RUN[arg]
    if arg in RESOURCES and arg != "kind":
        return "ResourcesConfig", RESOURCES[arg]
    if arg in _defaults(StrategyConfig) and arg != "name":
        return "StrategyConfig", _defaults(StrategyConfig)[arg]
    return None


def _library_classes() -> list[tuple[str, type]]:
    out = []
    for module in (training, client, clientapp, serverapp, strategy, wallclock, loop):
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and obj.__module__ == module.__name__ and not name.startswith("_"):
                out.append((f"{module.__name__.rsplit('.', 1)[1]}.{name}", obj))
    return out


LIBRARY = _library_classes()


@pytest.mark.parametrize(("qualname", "cls"), LIBRARY, ids=[q for q, _ in LIBRARY])
def test_library_constructor_defaults_are_the_schemas(qualname: str, cls: type) -> None:
    """Every constructor argument of a library class named like a schema key (``seed``,
    ``local_epochs``, ``policy``, ``on_excess``, ``aggregation``, ``shrink``, ``levels``,
    ``step_macs_factor``, ``margin``, ...) has that key's default."""
    name = qualname.split(".", 1)[1]
    try:
        params = _params(cls)
    except (TypeError, ValueError):  # no inspectable signature
        return
    owner = next(c.__name__ for c in cls.__mro__ if "__init__" in vars(c))  # the class that declares them
    wrong = {}
    for arg, value in params.items():
        if (owner, arg) in DIFFERENT_MEANING:
            continue
        expected = _schema_default(name, arg)
        if expected is not None and value != expected[1]:
            wrong[arg] = f"{value!r}, {expected[0]}.{arg}={expected[1]!r}"
    assert not wrong, f"{qualname}: {wrong}"


def test_the_checked_arguments_cover_the_known_shared_settings() -> None:
    """The name-based check above sees the settings issue 19 names (so a rename that hides one
    from it fails here)."""
    seen = set()
    for qualname, cls in LIBRARY:
        try:
            params = _params(cls)
        except (TypeError, ValueError):
            continue
        for arg in params:
            if _schema_default(qualname.split(".", 1)[1], arg) is not None:
                seen.add((qualname, arg))
    for needed in [
        ("trainers.DeviceTrainer", "local_epochs"), ("trainers.DeviceTrainer", "step_macs_factor"),
        ("trainers.DeviceTrainer", "skip_straggler_training"), ("trainers.DeviceTrainer", "precision"),
        ("trainers.DistrealTrainer", "policy"), ("trainers.DistrealTrainer", "stop_at_deadline"),
        ("serverapp.Distreal", "on_excess"), ("serverapp.Distreal", "local_epochs"), ("serverapp.Distreal", "seed"),
        ("strategy.Distreal", "on_excess"), ("strategy.Distreal", "local_epochs"),
        ("serverapp.FederatedDropout", "aggregation"), ("serverapp.HeteroFL", "step_macs_factor"),
        ("strategy.FederatedDropout", "aggregation"), ("strategy.HeteroFL", "seed"),
        ("serverapp.HeteroFL", "shrink"), ("serverapp.HeteroFL", "levels"),
        ("strategy.HeteroFL", "shrink"), ("strategy.HeteroFL", "levels"),
        ("wallclock.MeasuredDistrealTrainer", "margin"), ("wallclock.MeasuredDistrealTrainer", "policy"),
    ]:
        assert needed in seen, needed


def test_trainer_without_recipe_trains_at_the_run_configs_lr() -> None:
    """A trainer built with neither ``recipe`` nor ``lr`` gets ``Recipe.constant()``: the run
    config's lr (was 0.05), plain SGD."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from flwr_distreal.models import build_model

    model = build_model("femnist_cnn_small", num_classes=10)
    data = TensorDataset(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    trainer = training.BaselineTrainer(model, DataLoader(data, batch_size=2), 0, None)
    assert trainer.recipe == Recipe.constant() and trainer.recipe.lr == RUN["lr"]


def test_node_wait_fallback_is_stated_once() -> None:
    assert serverapp.DEFAULT_NODE_WAIT == defaults.NODE_WAIT
    assert _params(serverapp.Distreal).get("node_wait", defaults.NODE_WAIT) == defaults.NODE_WAIT


# ---------------------------------------------------------------------- one validator per value


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("clip_norm", 0.0, r"clip_norm must be > 0"),
        ("clip_norm", -1.0, r"clip_norm must be > 0"),
        ("lr", 0.0, r"lr must be > 0"),
        ("momentum", -0.5, r"momentum must be >= 0"),
        ("lr_gamma", 2.0, r"lr_gamma must be in \(0, 1\]"),
        ("lr_step_rounds", 0, r"lr_step_rounds must be >= 1"),
        ("lr_schedule", "exp", r"lr_schedule must be one of \['constant', 'cosine', 'step'\]"),
        ("lr_min", 0.5, r"lr_min must be in \[0, lr=0.1\]"),
    ],
)
def test_recipe_keys_are_validated_by_the_recipe(key: str, value: Any, match: str) -> None:
    """The schema refuses a bad recipe value with the Recipe's own message (one validator),
    as a ConfigError naming the config key."""
    field = {v: k for k, v in RECIPE_KEYS.items()}[key]
    with pytest.raises(ValueError, match=match.replace(key, field, 1)) as recipe_error:
        Recipe(**{field: value})
    with pytest.raises(ConfigError, match=match) as config_error:
        to_run_config(compose_config(f"{key}={value}"))
    renamed = str(recipe_error.value).replace(field, key, 1)
    assert str(config_error.value) == renamed
