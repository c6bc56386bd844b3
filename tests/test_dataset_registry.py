"""The dataset registry (flwr_distreal.data.registry): lookup by name, refusals, the conf/dataset
YAMLs against the registered loaders, and a user's own dataset through the runner's path."""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import flwr_distreal
import flwr_distreal.data as data_pkg
from flwr_distreal.run.config import register_configs, to_run_config
from flwr_distreal.data import (
    DataError,
    FederatedData,
    build_dataset,
    federate,
    is_dataset,
    list_datasets,
    load_digits,
    load_federated,
    register_dataset,
    unregister_dataset,
)
from flwr_distreal.run.experiment import Experiment

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
BUILT_IN = ["cifar10", "cifar100", "digits", "femnist", "mnist", "npz", "synthetic"]
register_configs()


@pytest.fixture
def registry() -> Iterator[None]:
    """Restore the registry as it was after the test (user registrations are global state)."""
    saved = dict(data_pkg.registry._DATASETS)
    yield
    data_pkg.registry._DATASETS.clear()
    data_pkg.registry._DATASETS.update(saved)


def _tiny(num_devices: int = 4, partition: str = "iid", alpha: float = 0.5, seed: int = 0) -> FederatedData:
    """A user's own source: 1x28x28 images whose label is the brightest quadrant (4 classes)."""
    rng = np.random.default_rng(seed)
    x = rng.random((120, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 4, 120)
    for i, q in enumerate(y):
        x[i, 0, (q // 2) * 14 : (q // 2 + 1) * 14, (q % 2) * 14 : (q % 2 + 1) * 14] += 1.0
    return federate("tiny", x[:100], y[:100], x[100:], y[100:], num_classes=4, num_devices=num_devices,
                    partition=partition, seed=seed, alpha=alpha)


def test_built_in_sources_are_registered_under_their_config_names() -> None:
    assert list_datasets() == BUILT_IN
    assert all(is_dataset(n) for n in BUILT_IN) and not is_dataset("imagenet")
    assert data_pkg.registry._DATASETS["digits"] is load_digits
    assert load_federated is build_dataset and flwr_distreal.load_federated is build_dataset


def test_unknown_name_is_refused_listing_the_registered_ones() -> None:
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'; valid: ") as err:
        build_dataset("imagenet", seed=0)
    assert all(repr(n) in str(err.value) for n in BUILT_IN)
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'; valid: \['cifar10'"):
        unregister_dataset("imagenet")


def test_duplicate_name_is_refused_naming_the_loader_already_there(registry: None) -> None:
    with pytest.raises(DataError, match=r"dataset 'digits' is already registered \(loader flwr_distreal\.data\.digits\.load_digits\)"):
        register_dataset("digits")(_tiny)
    assert data_pkg.registry._DATASETS["digits"] is load_digits  # the refusal left it untouched
    register_dataset("tiny")(_tiny)
    with pytest.raises(DataError, match="'tiny' is already registered"):
        register_dataset("tiny")(lambda seed=0: _tiny(seed=seed))
    # an explicit replacement is allowed, and unregistering frees the name
    register_dataset("digits", replace=True)(_tiny)
    assert build_dataset("digits", num_devices=2).name == "tiny"
    unregister_dataset("tiny")
    assert not is_dataset("tiny")


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("", DataError, "non-empty"),
        (" tiny", DataError, "surrounding whitespace"),
        (3, TypeError, "must be a str, got int"),
    ],
)
def test_bad_names_are_refused(name: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        register_dataset(name)  # type: ignore[arg-type]


def test_decorator_refuses_a_non_callable_and_returns_the_loader_unchanged(registry: None) -> None:
    with pytest.raises(TypeError, match=r"register_dataset\('tiny'\) needs a callable loader, got int"):
        register_dataset("tiny")(3)  # type: ignore[type-var]
    assert not is_dataset("tiny")
    assert register_dataset("tiny")(_tiny) is _tiny


def test_every_conf_dataset_names_a_registered_loader_that_takes_its_keys() -> None:
    """conf/dataset/*.yaml and the registry agree: the same names, and every key a YAML sets is an
    argument of its loader (the runner passes it, with the run's seed)."""
    names = set()
    for path in sorted((CONF / "dataset").glob("*.yaml")):
        node = OmegaConf.load(path)
        if path.stem == "base_dataset" or "name" not in node:
            continue
        names.add(node.name)
        extra = ["dataset.path=x.npz"] if "path" in node.keys() and OmegaConf.is_missing(node, "path") else []  # the one mandatory key
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = to_run_config(compose(config_name="config", overrides=[f"dataset={path.stem}", *extra]))
        assert cfg.dataset.name == node.name
        params = inspect.signature(data_pkg.registry._DATASETS[node.name]).parameters
        passed = set(cfg.dataset.loader_kwargs(0))
        assert passed <= set(params), f"{path.name}: the loader does not take {sorted(passed - set(params))}"
    assert sorted(names) == list_datasets()


def test_a_user_registered_dataset_goes_through_the_loader_path(registry: None) -> None:
    register_dataset("tiny")(_tiny)
    data = load_federated("tiny", num_devices=3, partition=None, seed=1)  # None keeps the default
    assert data.name == "tiny" and data.num_devices == 3 and sum(data.partition_sizes()) == 100
    assert torch.equal(data.partitions[0].tensors[0], _tiny(3, seed=1).partitions[0].tensors[0])
    with pytest.raises(DataError, match=r"dataset 'tiny' does not accept \['root'\]; accepted: \['alpha', 'num_devices', 'partition', 'seed'\]"):
        load_federated("tiny", root="data")
    with pytest.raises(DataError, match="seed must be an integer >= 0"):
        load_federated("tiny", seed=-1)


def test_a_user_registered_dataset_runs_in_an_experiment(registry: None) -> None:
    """The runner looks dataset.name up in the registry: a dataset registered by the user's code
    needs no change in the package."""
    register_dataset("tiny_run")(_tiny)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_run_config(
            compose(config_name="config", overrides=["dataset.name=tiny_run", "dataset.num_devices=5", "clients_per_round=2"])
        )
    exp = Experiment(cfg)
    assert exp.data.name == "tiny" and exp.num_devices == 5 and exp.data.num_classes == 4
    assert torch.equal(exp.data.test.tensors[1], _tiny(5, seed=cfg.seed).test.tensors[1])


def test_loader_with_var_keyword_and_loader_returning_the_wrong_type(registry: None) -> None:
    seen: dict[str, object] = {}

    def open_ended(seed: int = 0, **options: object) -> FederatedData:
        seen.update(options, seed=seed)
        return _tiny(seed=seed)

    register_dataset("open")(open_ended)
    assert load_federated("open", seed=2, colour="red", extra=None).num_devices == 4
    assert seen == {"seed": 2, "colour": "red"}

    def required(path: str, *args: object, seed: int = 0) -> FederatedData:
        return _tiny(seed=seed)

    register_dataset("needs_path")(required)
    with pytest.raises(DataError, match=r"dataset 'needs_path' needs \['path'\]"):
        load_federated("needs_path", seed=0)

    register_dataset("broken")(lambda seed=0: [1, 2, 3])
    with pytest.raises(TypeError, match=r"dataset 'broken': loader .*<lambda> returned list, not a FederatedData"):
        load_federated("broken")


def test_data_package_layout() -> None:
    """One file per concern and per source, each under 800 lines, and the package imports neither
    Flower nor Hydra (nor the download-only dependencies)."""
    files = sorted(p.name for p in (ROOT / "flwr_distreal" / "data").glob("*.py"))
    assert files == [
        "__init__.py", "cifar.py", "digits.py", "errors.py", "federated.py", "femnist.py", "lazy.py", "mnist.py",
        "node_data.py", "npz.py", "partition.py", "registry.py", "synthetic.py", "transforms.py",
    ]
    sizes = {f: len((ROOT / "flwr_distreal" / "data" / f).read_text().splitlines()) for f in files}
    assert max(sizes.values()) < 800, sizes
    probe = (
        "import sys, flwr_distreal.data; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'flwr', 'hydra', 'omegaconf', 'flwr_datasets', 'torchvision'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
