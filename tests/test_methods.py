"""The methods registry (:mod:`flwr_distreal.methods`): what a method is, how it is found, and
that every registered method runs through both Flower APIs.

The end-to-end tests run every registered method for two rounds on the embedded digits data:
through the Message-API app in process (the ServerApp, strategies, ClientApp and trainers of
``flwr run``) and through the legacy pair (``MethodStrategy`` + ``NumPyClient``) driven round by
round in this process, with no Ray.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_config
from flwr.client import NumPyClient
from flwr.common import Code, GetPropertiesRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from flwr_distreal.flower import serverapp
from flwr_distreal.flower.legacy import strategy as legacy
from flwr_distreal.flower.legacy.client_manager import SeededClientManager
from flwr_distreal.methods import (
    ConfigError,
    Method,
    StrategyConfig,
    build_core,
    core_arguments,
    get_method,
    list_methods,
    register_method,
    unregister_method,
)
from flwr_distreal.run.config import to_run_config
from flwr_distreal.run.experiment import Experiment
from flwr_distreal.run.runtimes import run_inprocess
from flwr_distreal.server import DistrealCore, FedAvgCore, HeteroFLPlanner, SubmodelCore

REPO = Path(__file__).resolve().parents[1]
PAPER = ["distreal", "full", "small", "feddropout", "heterofl"]


# ------------------------------------------------------------------------------ the registry
def test_the_paper_methods_and_the_peers_are_registered() -> None:
    methods = list_methods()
    assert methods[:5] == PAPER  # the paper's comparison first: the order of the listings
    assert {"distreal_paper", "fjord", "fedrolex"} <= set(methods)
    for name in methods:
        method = get_method(name)
        assert method.name == name and method.label and method.schema().name == name
        assert (REPO / "conf" / "strategy" / f"{name}.yaml").is_file(), f"{name} has no YAML"


def test_an_unknown_method_is_refused_with_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown method 'fedsomething'; registered methods: \['distreal'"):
        get_method("fedsomething")
    with pytest.raises(ConfigError, match="strategy.name must be one of"):
        to_run_config(_cfg_dict("strategy.name=fedsomething"))


def test_a_second_method_of_a_name_is_refused() -> None:
    with pytest.raises(ValueError, match="'heterofl' is registered already"):
        register_method(dataclasses.replace(get_method("heterofl")))
    with pytest.raises(TypeError, match="takes a Method"):
        register_method("heterofl")  # type: ignore[arg-type]


@dataclasses.dataclass
class _DemoConfig(StrategyConfig):
    name: str = "demo_fedavg"


def test_a_method_added_through_the_registry_runs_without_touching_anything_else(tmp_path) -> None:
    """What a new method file does (register a record), done here at run time: the schema check,
    the runner and the Message-API strategy find it; afterwards it is gone again."""
    demo = Method(name="demo_fedavg", label="FedAvg (demo)", schema=_DemoConfig, rule="examples")
    register_method(demo)
    try:
        assert get_method("demo_fedavg") is demo and "demo_fedavg" in list_methods()
        assert _DemoConfig().name == "demo_fedavg"
        strategy = serverapp.MethodStrategy("demo_fedavg", fraction_train=0.5)
        assert isinstance(strategy.core, FedAvgCore) and strategy.method is demo
    finally:
        unregister_method("demo_fedavg")
    assert "demo_fedavg" not in list_methods()
    with pytest.raises(ConfigError, match="strategy.name must be one of"):
        _DemoConfig()


def test_a_method_record_refuses_what_does_not_fit() -> None:
    heterofl = get_method("heterofl")
    with pytest.raises(ValueError, match="rule must be one of"):
        dataclasses.replace(heterofl, rule="median")
    with pytest.raises(ValueError, match="a planner goes with rule 'submodel'"):
        dataclasses.replace(heterofl, rule="examples")
    with pytest.raises(ValueError, match="its schema HeteroFLStrategyConfig has name='heterofl'"):
        dataclasses.replace(heterofl, name="heterofl2")
    with pytest.raises(ValueError, match="option 'width' is not a key"):
        dataclasses.replace(heterofl, planner_options=("shrink", "width"))
    with pytest.raises(ValueError, match="client must be one of"):
        dataclasses.replace(get_method("full"), client="fjord")


def test_build_core_gives_each_rule_its_gate_and_refuses_foreign_arguments() -> None:
    assert isinstance(build_core(get_method("distreal"), full_macs_per_sample=100.0), DistrealCore)
    assert isinstance(build_core(get_method("small")), FedAvgCore)
    core = build_core(
        get_method("heterofl"), model_name="femnist_cnn", availability_fn=lambda d, t: 1e9, round_duration=1.0,
        num_classes=10, shrink=0.5, levels=3,
    )
    assert isinstance(core, SubmodelCore) and isinstance(core.planner, HeteroFLPlanner)
    assert (core.planner.shrink, core.planner.levels) == (0.5, 3)
    with pytest.raises(TypeError, match=r"method 'small' takes no argument\(s\) \['shrink'\]"):
        build_core(get_method("small"), shrink=0.5)
    assert "shrink" in core_arguments(get_method("heterofl")) and "shrink" not in core_arguments(get_method("full"))


def test_the_public_classes_are_the_generic_strategy_bound_to_a_method() -> None:
    for api in (serverapp, legacy):
        for cls, name in [
            (api.Distreal, "distreal"), (api.FullResources, "full"), (api.SmallNetwork, "small"),
            (api.FederatedDropout, "feddropout"), (api.HeteroFL, "heterofl"),
        ]:
            assert issubclass(cls, api.MethodStrategy) and cls.method_name == name
            params = inspect.signature(cls).parameters
            assert set(core_arguments(get_method(name))) - {"macs_key"} <= set(params), cls
        with pytest.raises(TypeError, match="runs method 'heterofl'"):
            api.HeteroFL(method="feddropout")
        with pytest.raises(TypeError, match="needs a method"):
            api.MethodStrategy()
    assert inspect.signature(serverapp.HeteroFL).parameters["shrink"].default == 0.7
    assert issubclass(serverapp.FullResources, serverapp.SmallNetwork)  # as before the registry


# ------------------------------------------------------------------- every method, both APIs
def _cfg_dict(*overrides: str) -> dict:
    from conftest import compose_config
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config(*overrides))


def _tiny(method: str, runtime: str):
    return run_config(
        f"strategy={method}", "dataset=digits", "dataset.num_devices=6", "clients_per_round=3", "rounds=2",
        "batch_size=16", f"runtime={runtime}", "seed=0", "resources.lam=2", "lut=uniform",
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_two_rounds_through_the_message_api(method, tmp_path) -> None:
    rows = run_inprocess(_tiny(method, "inprocess"), tmp_path, show_rounds=False)
    assert [int(r["round"]) for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(float(row["accuracy"])) and int(row["received"]) == 3
        assert int(row["accepted"]) + int(row["stragglers"]) + int(row["refused"]) == 3


class _LocalProxy(ClientProxy):
    """A legacy client proxy that calls its ``NumPyClient`` in this process (no Ray)."""

    def __init__(self, cid: str, client: NumPyClient) -> None:
        super().__init__(cid)
        self.client = client.to_client()

    def get_properties(self, ins, timeout, group_id):
        res = self.client.get_properties(ins)
        return GetPropertiesRes(Status(Code.OK, ""), res.properties)

    def get_parameters(self, ins, timeout, group_id):
        return self.client.get_parameters(ins)

    def fit(self, ins, timeout, group_id):
        return self.client.fit(ins)

    def evaluate(self, ins, timeout, group_id):
        return self.client.evaluate(ins)

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


@pytest.mark.slow
@pytest.mark.parametrize("method", list_methods())
def test_every_method_runs_two_rounds_through_the_legacy_api(method) -> None:
    exp = Experiment(_tiny(method, "legacy"))
    strategy = exp.make_strategy()
    assert isinstance(strategy, legacy.MethodStrategy) and strategy.method is get_method(method)
    manager = SeededClientManager(seed=0)
    for device in range(exp.num_devices):
        manager.register(_LocalProxy(str(device), exp.make_client(device)))
    params = strategy.initialize_parameters(manager)
    start = parameters_to_ndarrays(params)
    for server_round in (1, 2):
        instructions = strategy.configure_fit(server_round, params, manager)
        assert len(instructions) == 3
        results = [(proxy, proxy.fit(ins, None, None)) for proxy, ins in instructions]
        params, metrics = strategy.aggregate_fit(server_round, results, [])
        assert metrics["received"] == 3
        loss, evaluated = strategy.evaluate(server_round, params)
        assert math.isfinite(loss) and 0.0 <= evaluated["accuracy"] <= 1.0
    moved = sum(float(np.abs(a - b).sum()) for a, b in zip(parameters_to_ndarrays(params), start))
    assert moved > 0  # the global model was trained


def test_the_readme_import_paths_still_work() -> None:
    """The public paths of the README and the quickstart example, after the move into layers."""
    import flwr_distreal
    import flwr_distreal.clientapp as public_clientapp
    import flwr_distreal.loop as public_loop
    import flwr_distreal.resources as public_resources
    import flwr_distreal.serverapp as public_serverapp
    from flwr_distreal import LUT, Distreal, DistrealClient, SeededClientManager, build_model, count_macs  # noqa: F401
    from flwr_distreal.clientapp import build_client_app  # noqa: F401
    from flwr_distreal.flower import clientapp
    from flwr_distreal.loop import DistrealRound
    from flwr_distreal.resources import size_resources  # noqa: F401
    from flwr_distreal.serverapp import Distreal as MessageDistreal
    from flwr_distreal.serverapp import FederatedDropout, HeteroFL  # noqa: F401
    from flwr_distreal.training import DistrealTrainer, evaluate_model  # noqa: F401
    from flwr_distreal.training import loop

    assert public_serverapp is serverapp and MessageDistreal is serverapp.Distreal  # the module itself
    assert public_clientapp is clientapp and public_loop is loop and DistrealRound is loop.DistrealRound
    assert public_resources.__name__ == "flwr_distreal.core.resources"
    assert flwr_distreal.Distreal is legacy.Distreal
    done = subprocess.run(
        [sys.executable, "-m", "flwr_distreal.report", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "usage" in done.stdout.lower()


def test_initial_parameters_are_what_the_legacy_strategy_starts_from() -> None:
    exp = Experiment(_tiny("full", "legacy"))
    _, arrays = exp.initial_arrays()
    params = exp.make_strategy().initialize_parameters(SeededClientManager(seed=0))
    assert all(np.array_equal(a, b) for a, b in zip(parameters_to_ndarrays(params), arrays))
    assert ndarrays_to_parameters(arrays).tensor_type == params.tensor_type
