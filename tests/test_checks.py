"""Tests of the start-up checks (flwr_distreal.run.checks): each refusal names its key and value."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from flwr_distreal.run.checks import (
    StartupError,
    check_classes,
    check_output_dir,
    check_seed,
    check_torch_device,
    check_trace_devices,
    warn_unused_lut,
)
from flwr_distreal.data import FederatedData
from flwr_distreal.core.resources import ResourceModel

from conftest import run_config

REPO = Path(__file__).resolve().parents[1]


def _data(num_classes: int = 10, devices: int = 3) -> FederatedData:
    def split(n: int) -> TensorDataset:
        return TensorDataset(torch.zeros(n, 1, 8, 8), torch.arange(n, dtype=torch.int64) % num_classes)

    return FederatedData("tiny", num_classes, (1, 8, 8), [split(12) for _ in range(devices)], split(20))


def test_checks_import_neither_flower_nor_hydra() -> None:
    code = "import sys, flwr_distreal.run.checks; print(sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'hydra')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------------------------ classes


def test_fewer_model_classes_than_labels_are_refused_naming_key_and_numbers() -> None:
    with pytest.raises(StartupError) as info:
        check_classes(5, _data(10))
    message = str(info.value)
    assert "model.num_classes=5" in message and "has 10 classes" in message and "labels 0..9" in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(StartupError, match=r"^model\.small_classes=9 but dataset tiny has 10"):
        check_classes(9, _data(10), key="model.small_classes")


def test_classes_that_fit_pass(caplog: pytest.LogCaptureFixture) -> None:
    assert check_classes(None, _data(10)) == 10
    assert check_classes(10, _data(10)) == 10
    assert check_classes(np.int64(10), _data(10)) == 10
    with caplog.at_level(logging.WARNING, logger="flwr_distreal.run.checks"):
        assert check_classes(12, _data(10)) == 12
    assert "model.num_classes=12 exceeds the 10 classes of dataset tiny" in caplog.text


@pytest.mark.parametrize("value", [1, 0, -3, True, 2.5, "ten"])
def test_non_integer_or_tiny_class_counts_are_refused(value) -> None:  # noqa: ANN001
    with pytest.raises(StartupError, match=r"model\.num_classes must be an integer >= 2"):
        check_classes(value, _data(10))


# ------------------------------------------------------------------------------ trace devices


def _trace(path: Path, devices: list[int]) -> Path:
    rows = "".join(f"{d},0,100\n{d},5,50\n" for d in devices)
    path.write_text("device,time,macs_per_s\n" + rows, encoding="utf-8")
    return path


def test_trace_lacking_devices_is_refused_naming_the_missing_ids(tmp_path: Path) -> None:
    path = _trace(tmp_path / "trace.csv", [0, 1, 3, 7])
    with pytest.raises(StartupError) as info:
        check_trace_devices(path, 6)
    message = str(info.value)
    assert message.startswith(f"resources.trace_path={path} has no rows for device(s) 2, 4, 5 ")
    assert "6 devices (ids 0..5)" in message and "covers 4 device(s)" in message
    # the ids the already loaded model covers: no second read of the file
    model = ResourceModel("trace", deadline=1.0, trace_path=path)
    with pytest.raises(StartupError, match=r"device\(s\) 2, 4, 5 "):
        check_trace_devices(path, 6, devices=model.devices_in_file)
    assert check_trace_devices(path, 2, devices=model.devices_in_file) == [0, 1, 3, 7]
    assert check_trace_devices(path, 2) == [0, 1, 3, 7]


def test_trace_lacking_many_devices_lists_the_first_twenty(tmp_path: Path) -> None:
    path = _trace(tmp_path / "trace.csv", [0])
    with pytest.raises(StartupError, match=r"device\(s\) 1, 2, .*, 20, \.\.\. \(99 in all\)"):
        check_trace_devices(path, 100)


def test_trace_file_problems_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match=r"^resources\.trace_path: resource trace file .*nope\.csv does not exist"):
        check_trace_devices(tmp_path / "nope.csv", 3)
    binary = tmp_path / "trace.csv"
    binary.write_bytes(np.arange(16.0).tobytes())
    with pytest.raises(StartupError, match=r"^resources\.trace_path: .*trace\.csv is not a CSV text file"):
        check_trace_devices(binary, 3)
    with pytest.raises(StartupError, match=r"resources\.trace_path is not set"):
        check_trace_devices(None, 3)


# ------------------------------------------------------------------------------ unused LUT


def test_lut_for_a_strategy_without_one_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flwr_distreal.run.checks"):
        message = warn_unused_lut("heterofl", "results/lut.npz")
    assert message is not None
    assert "lut=results/lut.npz is ignored" in message and "strategy=heterofl" in message
    assert message in caplog.text
    assert warn_unused_lut("distreal", "results/lut.npz") is None
    assert warn_unused_lut("full", None) is None
    assert warn_unused_lut("full", "") is None


# ------------------------------------------------------------------------------ seed


def test_seed_check() -> None:
    assert check_seed(0) == 0 and check_seed(np.int32(7)) == 7
    for bad in (-1, True, 1.5, "3"):
        with pytest.raises(StartupError, match=r"^seed must be an integer >= 0"):
            check_seed(bad)
    with pytest.raises(StartupError, match=r"^dse\.seed must be an integer >= 0.*got -2"):
        check_seed(-2, key="dse.seed")


# ------------------------------------------------------------------------------ device and output


def test_device_check() -> None:
    assert check_torch_device("cpu") == torch.device("cpu")
    with pytest.raises(StartupError, match=r"^device='gpu9' is not a torch device .*use device=cpu"):
        check_torch_device("gpu9", key="device")
    if not torch.cuda.is_available():
        with pytest.raises(StartupError, match=r"^dse\.device='cuda:0' but no cuda device is available"):
            check_torch_device("cuda:0")
    else:  # pragma: no cover - on a GPU machine
        assert check_torch_device("cuda").type == "cuda"
        with pytest.raises(StartupError, match=r"cuda device\(s\)"):
            check_torch_device(f"cuda:{torch.cuda.device_count()}")


def test_output_dir_check(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b"
    assert check_output_dir(new, key="output_dir") == new
    assert not (tmp_path / "a").exists(), "the check creates nothing"
    assert check_output_dir(tmp_path) == tmp_path
    a_file = tmp_path / "f.txt"
    a_file.write_text("x")
    with pytest.raises(StartupError, match=r"^output_dir=.*f\.txt is an existing file, not a folder"):
        check_output_dir(a_file, key="output_dir")
    with pytest.raises(StartupError, match=r"^dse\.output=.*f\.txt/x/y cannot be created: .*f\.txt is a file"):
        check_output_dir(a_file / "x" / "y")


# -- the checks in a run's start-up (Experiment), before round 1 ------------------------------------


def _run_config(*overrides: str):
    return run_config("dataset.num_devices=4", "clients_per_round=2", *overrides)


def test_a_run_refuses_at_start_up(tmp_path: Path) -> None:
    from flwr_distreal.run.config import ConfigError
    from flwr_distreal.run.experiment import Experiment

    with pytest.raises(StartupError, match="model.num_classes"):
        Experiment(_run_config("model.num_classes=5"))  # digits has 10 classes
    trace = tmp_path / "trace.csv"
    trace.write_text("device,time,macs_per_s\n0,0,1e9\n1,0,1e9\n")
    with pytest.raises(StartupError, match=r"resources.trace_path=.* has no rows for device\(s\) 2, 3 "):
        Experiment(_run_config("resources=trace", f"resources.trace_path={trace}"))
    with pytest.raises(ConfigError, match="seed must be >= 0"):
        _run_config("seed=-1")
