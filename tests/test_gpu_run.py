"""``scripts/gpu_run.py``: the CIFAR-10 Fig. 6 setting on one GPU, built and tested on the CPU.

The fast tests check the plan (the overrides that put several clients on one GPU), the round
times and the projection, the synthetic CIFAR-10 files (read by the project's own loader) and
the refusals; a tiny real smoke + timed run on the CPU (``--device cpu``, synthetic data) runs
the whole path.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "gpu_run.py"


@pytest.fixture(scope="module")
def gr() -> ModuleType:
    spec = importlib.util.spec_from_file_location("script_gpu_run", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _plan(gr, capsys, *argv: str) -> dict[str, list[str]]:
    assert gr.main(["--plan", *argv]) == 0
    lines = capsys.readouterr().out.splitlines()
    return {line.split(" run: ")[0]: line.split(" run: ", 1)[1].split() for line in lines if " run: " in line}


def test_plan_puts_four_clients_on_one_gpu(gr, capsys, tmp_path: Path) -> None:
    runs = _plan(gr, capsys, "--data", "synthetic", "--out", str(tmp_path / "o"))
    assert set(runs) == {"smoke", "timed"}
    for name, command in runs.items():
        assert command[1:3] == ["-m", "flwr_distreal.main"]
        assert {"+experiment=fig6_cifar10", "runtime=flwr-run", "device=cuda", "num_gpus_per_client=0.25",
                "num_cpus_per_client=1", "method=distreal", "resources.lam=2.0", "dataset.download=false"} <= set(command)
        assert f"dataset.root={tmp_path / 'o' / 'synthetic-cifar10'}" in command
        assert f"hydra.run.dir={tmp_path / 'o' / name}" in command
    assert {"rounds=2", "clients_per_round=4"} <= set(runs["smoke"])
    assert "rounds=10" in runs["timed"] and not any(a.startswith("clients_per_round=") for a in runs["timed"])
    assert not (tmp_path / "o").exists()  # --plan writes nothing


def test_plan_on_cpu_asks_for_no_gpu_and_passes_overrides(gr, capsys, tmp_path: Path) -> None:
    runs = _plan(gr, capsys, "--device", "cpu", "--smoke-rounds", "0", "--rounds", "3", "--data", "synthetic",
                 "--out", str(tmp_path), "--", "strategy.bn_devices=2")
    assert set(runs) == {"timed"}
    assert {"device=cpu", "num_gpus_per_client=0", "rounds=3", "strategy.bn_devices=2"} <= set(runs["timed"])


@pytest.mark.skipif(not (REPO.parent / "shared" / "data" / "cifar10" / "cifar-10-batches-py").is_dir(),
                    reason="no CIFAR-10 under ../shared/data/cifar10")
def test_plan_uses_the_real_data_when_present(gr, capsys, tmp_path: Path) -> None:
    runs = _plan(gr, capsys, "--out", str(tmp_path))
    assert f"dataset.root={(REPO.parent / 'shared' / 'data' / 'cifar10').resolve()}" in runs["timed"]


def test_round_times_and_projection(gr) -> None:
    rows = [{"wall_time": w} for w in ("10.0", "14.0", "19.0", "25.0")]
    times = gr.round_times(rows)
    assert times == pytest.approx([10.0, 4.0, 5.0, 6.0])
    p = gr.projection(times, 7500)
    assert p["first_round_s"] == 10.0 and p["steady_round_s"] == 5.0 and p["rounds_timed"] == 4
    assert p["projected_hours"] == pytest.approx((10.0 + 5.0 * 7499) / 3600)
    assert gr.projection([8.0], 10)["steady_round_s"] == 8.0  # one round: it is its own estimate
    with pytest.raises(ValueError, match="no round times"):
        gr.projection([], 7500)
    with pytest.raises(ValueError, match="total_rounds"):
        gr.projection([1.0], 0)


def test_synthetic_cifar10_is_read_by_the_project_loader(gr, tmp_path: Path) -> None:
    from flwr_distreal.data.cifar import load_cifar10

    root = gr.write_synthetic_cifar10(tmp_path, per_batch=6, n_test=5, seed=1)
    assert gr.has_cifar10(root) and not gr.has_cifar10(tmp_path / "nothing")
    data = load_cifar10(root, num_devices=3, samples_per_device=10, seed=0)
    assert len(data.test) == 5
    x, y = data.test[0]
    assert tuple(x.shape) == (3, 32, 32) and 0 <= int(y) < 10
    # random images, not constant ones
    with (root / gr.CIFAR_FOLDER / "data_batch_2").open("rb") as fh:
        import pickle

        batch = pickle.load(fh)
    assert batch["data"].shape == (6, 3072) and batch["data"].dtype == np.uint8 and batch["data"].std() > 50


def test_bad_arguments_are_refused(gr, capsys, tmp_path: Path) -> None:
    for argv in (["--gpus-per-client", "0"], ["--gpus-per-client", "1.5"], ["--synthetic-size", "5"],
                 ["--smoke-rounds", "0", "--rounds", "0"], ["--rounds", "-1"], ["--cpus-per-client", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            gr.main(["--plan", *argv])
        assert exit_info.value.code == 2, argv
    assert gr.main(["--data", "real", "--root", str(tmp_path / "none"), "--plan"]) == 2
    assert "no CIFAR-10 under" in capsys.readouterr().err


def test_cuda_without_a_gpu_is_refused_before_anything_runs(gr, capsys, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as exit_info:
        gr.main(["--data", "synthetic", "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "sees no GPU" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _fake_runs(walls: dict[str, list[float]], codes: dict[str, int], calls: list[str]):
    """A stand-in for ``run_once``: writes the run's ``metrics.csv`` (``walls[name]`` as the
    cumulative wall times) into its ``hydra.run.dir`` and returns ``codes[name]``."""

    def run_once(command, timeout, log_path):
        out = Path(next(a for a in command if a.startswith("hydra.run.dir=")).split("=", 1)[1])
        name = out.name
        calls.append(name)
        out.mkdir(parents=True)
        rows = ["round,accuracy,loss,received,stragglers,wall_time"]
        rows += [f"{i + 1},0.{i + 1},2.0,4,0,{w}" for i, w in enumerate(walls[name])]
        (out / "metrics.csv").write_text("\n".join(rows) + "\n")
        log_path.write_text("log\n")
        return codes.get(name, 0), walls[name][-1] + 20.0 if walls[name] else 20.0

    return run_once


def test_smoke_then_timed_run_report_and_projection(gr, capsys, monkeypatch, tmp_path: Path) -> None:
    calls: list[str] = []
    monkeypatch.setattr(gr, "describe_device", lambda device: {"device": device, "gpu": "Fake GPU", "torch": "x"})
    monkeypatch.setattr(gr, "run_once", _fake_runs({"smoke": [30.0, 32.0], "timed": [20.0, 24.0, 29.0, 33.0]}, {}, calls))
    out = tmp_path / "o"
    assert gr.main(["--data", "synthetic", "--synthetic-size", "2,2", "--rounds", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert calls == ["smoke", "timed"]
    summary = json.loads((out / "summary.json").read_text())
    timed = summary["runs"]["timed"]
    assert timed["round_s"] == [20.0, 4.0, 5.0, 4.0] and timed["steady_round_s"] == 4.0
    assert timed["projected_hours"] == pytest.approx((20.0 + 4.0 * 7499) / 3600)
    assert timed["startup_s"] == 20.0
    assert f"projected: 7500 rounds = {(20.0 + 4.0 * 7499) / 3600:.1f} h (GPU Fake GPU, 0.25 GPU per client)" in text
    assert "round 3: 5.00 s" in text


def test_a_failed_smoke_run_stops_before_the_timed_run(gr, capsys, monkeypatch, tmp_path: Path) -> None:
    calls: list[str] = []
    monkeypatch.setattr(gr, "describe_device", lambda device: {"device": device})
    monkeypatch.setattr(gr, "run_once", _fake_runs({"smoke": [30.0]}, {"smoke": 1}, calls))  # 1 of 2 rounds, code 1
    out = tmp_path / "o"
    assert gr.main(["--data", "synthetic", "--synthetic-size", "2,2", "--out", str(out)]) == 1
    assert calls == ["smoke"]
    assert "the smoke run did not finish (1/2 rounds, exit code 1)" in capsys.readouterr().err
    assert set(json.loads((out / "summary.json").read_text())["runs"]) == {"smoke"}


@pytest.mark.heavy
@pytest.mark.slow
def test_tiny_smoke_and_timed_run_on_cpu(gr, capsys, tmp_path: Path) -> None:
    out = tmp_path / "o"
    rc = gr.main([
        "--device", "cpu", "--runtime", "inprocess", "--data", "synthetic", "--synthetic-size", "8,16",
        "--smoke-rounds", "1", "--smoke-clients", "2", "--rounds", "2", "--out", str(out), "--",
        "dataset.num_devices=4", "dataset.samples_per_device=8", "clients_per_round=2", "strategy.bn_devices=2",
        "eval_batch_size=16", "layout=nchw",
    ])
    text = capsys.readouterr().out
    assert rc == 0, text[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"] == "synthetic" and summary["device"]["device"] == "cpu"
    smoke, timed = summary["runs"]["smoke"], summary["runs"]["timed"]
    assert smoke["exit_code"] == 0 and smoke["rounds_done"] == 1
    assert timed["exit_code"] == 0 and timed["rounds_done"] == 2 and len(timed["round_s"]) == 2
    assert all(t > 0 for t in timed["round_s"])
    assert timed["projected_hours"] == pytest.approx((timed["first_round_s"] + timed["steady_round_s"] * 7499) / 3600)
    assert all(math.isfinite(a) for a in timed["accuracy"])
    assert "projected: 7500 rounds =" in text and "SYNTHETIC" in text
    assert (out / "timed" / "metrics.csv").is_file() and (out / "smoke.log").is_file()
