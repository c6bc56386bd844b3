"""Tests of the Hydra configuration (conf/ and flwr_distreal.run.config).

Composes ``conf/config.yaml`` with Hydra's compose API, as ``python -m flwr_distreal.main``
does, for every option of every group, and checks the refusals.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from flwr_distreal.methods import list_methods
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
    register_configs,
    to_run_config,
)

from conftest import compose_config

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "strategy": StrategyConfig,
    "resources": ResourcesConfig,
}
#: Overrides an option needs to be complete (its YAML leaves a required value open).
NEEDS = {("resources", "trace"): ["resources.trace_path=traces.csv"], ("dataset", "npz"): ["dataset.path=data.npz"]}

register_configs()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _group_options() -> list[tuple[str, str]]:
    return [(g, o) for g in GROUPS for o in _options(g)]


def _yaml_values(group: str, option: str) -> dict:
    """The keys an option's YAML sets itself (without its defaults list)."""
    data = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    data.pop("defaults", None)
    return data


def test_groups_have_the_documented_options() -> None:
    assert set(_options("dataset")) >= {"digits", "femnist", "femnist_leaf", "cifar10", "cifar100", "mnist", "npz"}
    assert set(_options("model")) >= {"femnist_cnn", "densenet_bc_40", "densenet_bc_100"}
    # one YAML per registered method, and the paper's comparison among them
    assert set(_options("strategy")) == set(list_methods())
    assert set(list_methods()) >= {"distreal", "distreal_paper", "full", "small", "feddropout", "heterofl"}
    assert set(_options("resources")) == {"full", "constant", "timevarying", "trace", "measured"}


def test_default_config_matches_config_yaml() -> None:
    run = to_run_config(compose_config())
    assert isinstance(run, RunConfig)
    assert (run.dataset.name, run.model.name, run.strategy.name, run.resources.kind) == (
        "digits",
        "femnist_cnn",
        "distreal",
        "timevarying",
    )
    top = OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml"))
    for key, value in top.items():
        if key not in ("defaults", "hydra"):
            assert getattr(run, key) == value, key


@pytest.mark.parametrize(("group", "option"), _group_options())
def test_every_group_option_composes_and_converts(group, option) -> None:
    cfg = compose_config(f"{group}={option}", *NEEDS.get((group, option), []))
    run = to_run_config(cfg)
    node = getattr(run, group)
    assert type(node) is (STRATEGY_SCHEMAS[option] if group == "strategy" else GROUPS[group])
    for key, value in _yaml_values(group, option).items():
        if value == "???":  # left open by the YAML: filled by NEEDS or the schema default
            continue
        assert getattr(node, key) == value, f"{group}={option}: {key}"
    # the other groups keep config.yaml's defaults
    others = {"dataset": "digits", "model": "femnist_cnn", "strategy": "distreal", "resources": "timevarying"}
    for other, default in others.items():
        if other != group:
            key = "kind" if other == "resources" else "name"
            assert getattr(getattr(run, other), key) == _yaml_values(other, default)[key]
    # simulation workers rebuild the config from JSON (experiment._experiment_for)
    again = to_run_config(json.loads(json.dumps(dataclasses.asdict(run))))
    assert again == run


def test_plain_dict_and_dictconfig_convert_alike() -> None:
    cfg = compose_config("strategy=heterofl", "resources=constant", "rounds=3")
    assert to_run_config(OmegaConf.to_container(cfg)) == to_run_config(cfg)


def test_overrides_reach_the_run_config() -> None:
    run = to_run_config(
        compose_config(
            "rounds=3",
            "clients_per_round=4",
            "deadline=2.5",
            "dataset.num_devices=6",
            "strategy.policy=paper",
            "resources.lam=4",
            "+extra.note=hi",
        )
    )
    assert (run.rounds, run.clients_per_round, run.deadline) == (3, 4, 2.5)
    assert run.dataset.num_devices == 6 and run.strategy.policy == "paper" and run.resources.lam == 4.0
    assert run.extra == {"note": "hi"}
    assert run.dataset.loader_kwargs(7) == {"num_devices": 6, "partition": "dirichlet", "alpha": 1.0, "seed": 7}


# ------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("group", list(GROUPS))
def test_unknown_group_option_lists_the_options(group) -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_config(f"{group}=nope")
    msg = str(info.value)
    assert f"{group}/nope" in msg
    for option in _options(group):
        assert option in msg


@pytest.mark.parametrize(
    ("override", "key"),
    [("rounds=abc", "rounds"), ("deadline=soon", "deadline"), ("dataset.num_devices=abc", "num_devices"),
     ("strategy.stop_at_deadline=maybe", "stop_at_deadline"), ("resources.lam=[1,2]", "lam")],
)
def test_wrong_type_is_refused_at_composition(override, key) -> None:
    with pytest.raises(ConfigCompositionException, match="Error merging override") as info:
        compose_config(override)
    assert override in str(info.value)
    assert key in str(info.value.__cause__)


@pytest.mark.parametrize("override", ["foo=1", "strategy.foo=1", "resources.trace=x.csv"])
def test_unknown_key_without_plus_is_refused(override) -> None:
    with pytest.raises(ConfigCompositionException, match=f"Could not override '{override.split('=')[0]}'"):
        compose_config(override)


def test_unknown_key_with_plus_is_accepted_by_hydra() -> None:
    """Real behaviour: Hydra's ``+key=value`` adds keys even to the typed (structured) nodes."""
    cfg = compose_config("+foo=1", "+strategy.polcy=paper")
    assert cfg.foo == 1 and cfg.strategy.polcy == "paper"
    assert OmegaConf.get_type(cfg) is RunConfig and OmegaConf.get_type(cfg.strategy) is DistrealStrategyConfig


def test_to_run_config_refuses_keys_outside_the_schema() -> None:
    cfg = compose_config("+strategy.polcy=paper")
    with pytest.raises(ConfigError, match="polcy"):
        to_run_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["rounds=0"], r"rounds must be >= 1, got 0"),
        (["clients_per_round=0"], r"clients_per_round must be >= 1"),
        (["batch_size=-4"], r"batch_size must be >= 1"),
        (["local_epochs=0"], r"local_epochs must be >= 1"),
        (["deadline=-1"], r"deadline must be > 0, got -1"),
        (["deadline=0"], r"deadline must be > 0"),
        (["lr=0"], r"lr > 0"),
        (["momentum=-0.5"], r"momentum >= 0"),
        (["num_cpus_per_client=0"], r"num_cpus_per_client must be > 0"),
        (["strategy.policy=fast"], r"strategy.policy must be one of \['paper', 'deadline'\], got 'fast'"),
        (["strategy.name=fedprox"], r"strategy.name must be one of .*'distreal'"),
        (["strategy.on_excess=ignore"], r"strategy.on_excess must be one of \['refuse', 'clip'\]"),
        (["strategy=heterofl", "strategy.shrink=1.5"], r"strategy.shrink"),
        (["strategy=heterofl", "strategy.levels=0"], r"strategy.levels must be >= 1, got 0"),
        (["strategy=heterofl", "strategy.bn_devices=0"], r"strategy.bn_devices must be >= 1, got 0"),
        (["strategy=heterofl", "strategy.aggregation=mean"], r"strategy.aggregation must be one of \['per_weight', 'all_clients'\], got 'mean'"),
        (["strategy=feddropout", "strategy.aggregation=sum"], r"strategy.aggregation must be one of"),
        (["resources.lam=-1"], r"resources.lam must be >= 0, got -1"),
        (["resources.variability=0.5"], r"resources.variability must be >= 1"),
        (["resources.kind=sometimes"], r"resources.kind must be one of"),
        (["resources.step_macs_factor=0"], r"resources.step_macs_factor must be > 0"),
        (["resources=trace"], r"resources.kind=trace needs resources.trace_path"),
        (["runtime=legacy", "round_timeout=0.001"], r"round_timeout=0.001 is not applied by runtime=legacy"),
        (["runtime=inprocess", "round_timeout=30"], r"round_timeout=30.0 is not applied by runtime=inprocess"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_key(overrides, match) -> None:
    """Also a round timeout that a runtime cannot apply: refused, never ignored in silence."""
    cfg = compose_config(*overrides)  # composition accepts them: the range checks run on conversion
    with pytest.raises(ConfigError, match=match) as info:
        to_run_config(cfg)
    assert isinstance(info.value, ValueError)


# ------------------------------------------------------------- one schema per strategy


def test_every_strategy_has_its_schema_in_the_registry_and_its_yaml() -> None:
    assert set(STRATEGY_SCHEMAS) == set(_options("strategy"))
    for name, schema in STRATEGY_SCHEMAS.items():
        assert issubclass(schema, StrategyConfig) and schema().name == name
        defaults = OmegaConf.load(CONF / "strategy" / f"{name}.yaml").defaults
        assert list(defaults) == [f"base_{name}"]  # each YAML extends its own schema


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "distreal",
            dict(
                policy="deadline", stop_at_deadline=True, on_excess="refuse", inverted_scaling=True,
                static_bn=False, bn_devices=10,
            ),
        ),
        ("full", dict(static_bn=False, bn_devices=10)),
        ("small", dict(static_bn=False, bn_devices=10)),
        ("feddropout", dict(inverted_scaling=False, aggregation="per_weight", static_bn=True, bn_devices=10)),
        (
            "heterofl",
            dict(shrink=0.7, levels=5, inverted_scaling=True, aggregation="per_weight", static_bn=True, bn_devices=10),
        ),
    ],
)
def test_each_strategy_composes_with_its_documented_defaults(name, expected) -> None:
    run = to_run_config(compose_config(f"strategy={name}"))
    assert type(run.strategy) is STRATEGY_SCHEMAS[name]
    fields = {k: v for k, v in dataclasses.asdict(run.strategy).items() if k != "name"}
    assert fields == expected
    # the schema defaults agree with the YAML, except DISTREAL's policy (the YAML picks deadline)
    schema_defaults = {k: v for k, v in dataclasses.asdict(STRATEGY_SCHEMAS[name]()).items() if k != "name"}
    assert {**schema_defaults, **({"policy": "deadline"} if name == "distreal" else {})} == expected


FOREIGN = [
    ("heterofl", "policy", "paper"),
    ("feddropout", "shrink", "0.5"),
    ("feddropout", "levels", "3"),
    ("full", "inverted_scaling", "false"),
    ("small", "aggregation", "all_clients"),
    ("distreal", "aggregation", "all_clients"),
]


@pytest.mark.parametrize(("name", "key", "value"), FOREIGN)
def test_an_option_of_another_strategy_is_refused_at_composition(name, key, value) -> None:
    with pytest.raises(ConfigCompositionException, match=f"Could not override 'strategy.{key}'") as info:
        compose_config(f"strategy={name}", f"strategy.{key}={value}")
    cause = str(info.value.__cause__)
    assert f"Key '{key}' not in '{STRATEGY_SCHEMAS[name].__name__}'" in cause


@pytest.mark.parametrize(("name", "key", "value"), FOREIGN)
def test_an_option_of_another_strategy_added_with_plus_is_refused_naming_the_valid_keys(name, key, value) -> None:
    cfg = compose_config(f"strategy={name}", f"+strategy.{key}={value}")
    valid = sorted(f.name for f in dataclasses.fields(STRATEGY_SCHEMAS[name]))
    with pytest.raises(ConfigError) as info:
        to_run_config(cfg)
    assert str(info.value) == f"unknown key 'strategy.{key}'; valid keys of strategy={name}: {valid}"
    # the same from a resolved config (config-file, simulation workers)
    with pytest.raises(ConfigError, match=f"unknown key 'strategy.{key}'"):
        to_run_config(OmegaConf.to_container(cfg))


def test_renaming_the_strategy_keeps_the_other_strategys_options_out() -> None:
    """``strategy.name=heterofl`` on the distreal node: the node is checked against HeteroFL's
    schema, so DISTREAL's options are refused, naming the first."""
    with pytest.raises(ConfigError, match=r"unknown key 'strategy.policy'; valid keys of strategy=heterofl: \['aggregation', "):
        to_run_config(compose_config("strategy.name=heterofl"))
    ok = to_run_config({**OmegaConf.to_container(compose_config("rounds=2")), "strategy": {"name": "heterofl"}})
    assert ok.strategy == HeteroFLStrategyConfig()


def test_a_schema_refuses_another_strategys_name() -> None:
    with pytest.raises(ConfigError, match="strategy.name='heterofl' takes the options of HeteroFLStrategyConfig"):
        DistrealStrategyConfig(name="heterofl")
    with pytest.raises(ConfigError, match="strategy.name must be one of"):
        FedDropoutStrategyConfig(name="fedprox")


def test_npz_path_left_open_is_refused_before_the_run() -> None:
    """``path: ???`` in npz.yaml merges onto the schema default (None); the conversion refuses
    it, naming the key, before any data is loaded."""
    with pytest.raises(ConfigError, match="dataset.path"):
        to_run_config(compose_config("dataset=npz"))
