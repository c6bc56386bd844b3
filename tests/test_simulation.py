"""End-to-end runs on the embedded digits data, in both runtimes.

``runtime=flwr-run`` (default): the Message-API app through ``flwr run`` on a private local
SuperLink; every process of that runtime carries a tag and is checked gone after the test.
``runtime=legacy``: the legacy pair on ``run_simulation`` in this process, with its own Ray temp
directory (``RAY_TMPDIR``) so its processes can be told apart and checked gone afterwards.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from flwr_distreal.run.recording import MetricsRecorder, RunDirectoryError
from flwr_distreal.run.runtimes import run_experiment
from flwr_distreal.core.lut import LUT
from flwr_distreal.models import build_model

from conftest import run_config

REPO = Path(__file__).resolve().parents[1]
SMALL = ["rounds=2", "clients_per_round=3", "dataset=digits", "dataset.num_devices=6", "resources=timevarying"]


def _processes_with(marker: str) -> list[tuple[int, str]]:
    """Live processes whose command line mentions ``marker`` (read from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(
                (line.split()[1] for line in (entry / "status").read_text().splitlines() if line.startswith("State:")),
                "",
            )
        except OSError:
            continue
        if marker in cmd and state != "Z":
            found.append((int(entry.name), cmd[:160]))
    return found


def _wait_until_gone(marker: str, timeout: float = 20.0) -> list[tuple[int, str]]:
    deadline = time.monotonic() + timeout
    left = _processes_with(marker)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _processes_with(marker)
    return left


@pytest.fixture()
def ray_tmp(monkeypatch) -> Iterator[str]:
    """A short, private Ray temp dir (Unix socket paths must stay under ~100 characters)."""
    if not Path("/proc/self/cmdline").exists():
        pytest.skip("needs /proc to find leftover Ray processes")
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    monkeypatch.setenv("RAY_TMPDIR", path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def flwr_runtime() -> Iterator[object]:
    """One private local SuperLink runtime for this module's runs (as a Hydra multirun shares
    one), stopped after them; every process it started must be gone."""
    from flwr_distreal.run import local_runtime

    if not Path("/proc/self/environ").exists():
        pytest.skip("finding the runtime's processes needs /proc (Linux)")
    runtime = local_runtime.LocalFlwrRuntime()
    previous, local_runtime._SHARED = local_runtime._SHARED, runtime
    try:
        yield runtime
    finally:
        local_runtime._SHARED = previous
        survivors = runtime.stop()
        assert not survivors, f"processes of the flwr runtime left running: {survivors}"


def _read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == MetricsRecorder.FIELDS
        return list(reader)


KEYS = ("accuracy", "loss", "mean_macs", "mean_utilisation", "stragglers", "accepted", "lr", "update_norm")


def _metrics(rows: list[dict]) -> list[list[float]]:
    return [[float(r[k]) for k in KEYS] for r in rows]


@pytest.mark.slow
def test_message_api_run_end_to_end_equals_legacy(tmp_path, ray_tmp, flwr_runtime) -> None:
    """The default runtime (the Message-API app through ``flwr run``) writes the run's outputs;
    the same seeded experiment through the legacy pair on ``run_simulation`` gives the same
    per-round metrics to the last bit: both draw the same devices (one seeded draw over partition
    ids), train with the same trainer and sum the replies in device order in float64. A run
    resumed from its checkpoint equals an uninterrupted one; a rerun into its directory is
    refused."""
    import ray

    strategy = "distreal"  # HeteroFL: test_submodel_baseline_in_process_equals_legacy
    cfg = run_config(*SMALL, f"strategy={strategy}")
    assert cfg.runtime == "flwr-run"
    out = tmp_path / strategy
    rows = run_experiment(cfg, out)
    assert flwr_runtime.pids(), "no process of the runtime found: the cleanup check would see nothing"
    assert (out / "flwr.log").is_file()
    written = _read_rows(out / "metrics.csv")
    assert [int(r["round"]) for r in written] == [1, 2]
    assert len(rows) == 2
    for row, rec in zip(written, rows):
        acc, loss = float(row["accuracy"]), float(row["loss"])
        assert 0.0 <= acc <= 1.0 and math.isfinite(loss)
        assert acc == pytest.approx(rec["accuracy"])
        assert int(row["received"]) == 3
        stragglers, refused, accepted = int(row["stragglers"]), int(row["refused"]), int(row["accepted"])
        assert stragglers + refused + accepted == 3
        assert float(row["sim_time"]) == pytest.approx(int(row["round"]) * cfg.deadline)
        # DISTREAL adapts every mini-batch (and stops at the deadline): never a straggler
        assert stragglers == 0 and refused == 0 and accepted == 3
        assert float(row["mean_macs"]) > 0
        assert 0.0 < float(row["mean_utilisation"]) <= 1.0 + 1e-9
    # the resolved config and the plot
    saved = OmegaConf.to_container(OmegaConf.load(out / "config.yaml"))
    assert saved == dataclasses.asdict(cfg)
    assert saved["strategy"]["name"] == strategy and saved["resources"]["kind"] == "timevarying"
    png = out / "accuracy.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # resumed from the round-2 checkpoint to 3 rounds == 3 rounds uninterrupted (legacy)
    assert (out / "checkpoint.npz").is_file()
    resumed = run_experiment(dataclasses.replace(cfg, rounds=3, resume=True), out)
    assert [int(r["round"]) for r in _read_rows(out / "metrics.csv")] == [1, 2, 3]
    legacy = run_experiment(dataclasses.replace(cfg, rounds=3, runtime="legacy"), tmp_path / "legacy")
    assert _metrics(legacy) == _metrics(resumed)
    assert _metrics(legacy)[:2] == _metrics(rows)
    # the in-process runtime runs the same app: the same metrics, bit for bit
    inprocess = run_experiment(dataclasses.replace(cfg, runtime="inprocess"), tmp_path / f"{strategy}_inprocess")
    assert _metrics(inprocess) == _metrics(rows)
    # the audit trail (issue 20): every runtime logs the same devices per round and the same LUT hash
    draws = {name: list(csv.DictReader((d / "draws.csv").open(newline=""))) for name, d in
             (("flwr-run", out), ("legacy", tmp_path / "legacy"), ("inprocess", tmp_path / f"{strategy}_inprocess"))}
    assert all(list(rows_[0]) == MetricsRecorder.DRAW_FIELDS for rows_ in draws.values())
    assert [r["round"] for r in draws["flwr-run"]] == ["1", "2", "3"]
    assert all(r["train_devices"] for r in draws["flwr-run"])
    assert [r["train_devices"] for r in draws["legacy"]] == [r["train_devices"] for r in draws["flwr-run"]]
    assert draws["inprocess"] == draws["flwr-run"][:2]
    hashes = {json.loads((d / "run.json").read_text())["lut_sha256"] for d in (out, tmp_path / "legacy")}
    assert len(hashes) == 1 and len(hashes.pop()) == 64
    assert all(float(r["update_norm"]) > 0 and float(r["lr"]) == cfg.lr for r in inprocess)
    assert not ray.is_initialized()
    leftovers = _wait_until_gone(ray_tmp)
    assert not leftovers, f"Ray processes left after the legacy run: {leftovers}"
    # another seed draws other devices, filters and batches
    other = run_experiment(dataclasses.replace(cfg, seed=cfg.seed + 1, rounds=1, runtime="inprocess"))
    assert _metrics(other) != _metrics(rows)[:1]
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        run_experiment(cfg, out)  # refused before anything starts, nothing overwritten


@pytest.mark.slow
def test_submodel_baseline_in_process_equals_legacy(tmp_path, ray_tmp) -> None:
    """HeteroFL (per-node fixed subsets in the train messages, per-weight averaging) through the
    Message-API app in process gives the legacy pair's per-round metrics to the last bit (the
    in-process runtime equals ``flwr run``: see the DISTREAL test above)."""
    cfg = run_config(*SMALL, "strategy=heterofl", "runtime=inprocess")
    rows = run_experiment(cfg, tmp_path / "inprocess", show_rounds=False)
    assert [int(r["round"]) for r in _read_rows(tmp_path / "inprocess" / "metrics.csv")] == [1, 2]
    legacy = run_experiment(dataclasses.replace(cfg, runtime="legacy"))
    assert _metrics(legacy) == _metrics(rows)
    assert sum(int(r["stragglers"]) for r in rows) + sum(int(r["accepted"]) for r in rows) > 0
    leftovers = _wait_until_gone(ray_tmp)
    assert not leftovers, f"Ray processes left after the legacy run: {leftovers}"


@pytest.mark.slow
def test_hydra_main_subprocess(tmp_path) -> None:
    """A Hydra multirun over a key that the run directory's name does not show (the LUT) keeps
    every job's output apart (in process: the runtimes themselves are tested above)."""
    sweep_dir = tmp_path / "sweep"
    lut_path = tmp_path / "uniform_lut.json"
    LUT.uniform(build_model("femnist_cnn", num_classes=10), rates=[0.0, 0.25, 0.5]).save(lut_path)
    short_tmp = tempfile.mkdtemp(prefix="h", dir="/tmp")  # the runner's SuperLink and Ray live here
    env = dict(
        os.environ, TMPDIR=short_tmp, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flwr_distreal.main",
            "-m",
            "rounds=1",
            "clients_per_round=2",
            "dataset.num_devices=4",
            "runtime=inprocess",
            f"lut=uniform,{lut_path}",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Done: final accuracy") == 2
    run_dirs = sorted(d.parent for d in sweep_dir.rglob("metrics.csv"))
    assert len(run_dirs) == 2, run_dirs
    luts = []
    for run_dir in run_dirs:
        rows = _read_rows(run_dir / "metrics.csv")
        assert len(rows) == 1 and 0.0 <= float(rows[0]["accuracy"]) <= 1.0
        assert (run_dir / "accuracy.png").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
        luts.append(OmegaConf.load(run_dir / "config.yaml").lut)
    assert sorted(luts) == sorted(["uniform", str(lut_path)])
    # the runner's private local SuperLink and everything it started stopped with the runner
    leftovers = _wait_until_gone(short_tmp, timeout=20)
    shutil.rmtree(short_tmp, ignore_errors=True)
    assert not leftovers, f"processes left after the Hydra run: {leftovers}"


def test_a_lut_that_does_not_fit_fails_before_the_simulation_starts(tmp_path) -> None:
    """Not in every client of every round (Flower would count those as failures and go on)."""
    from flwr_distreal.run.experiment import Experiment
    from flwr_distreal.core.lut import LUTError

    lut_path = tmp_path / "femnist_lut.json"
    LUT.uniform(build_model("femnist_cnn")).save(lut_path)  # 62 classes; digits has 10
    with pytest.raises(LUTError, match="62 classes"):
        Experiment(run_config(*SMALL, f"lut={lut_path}"))
    Experiment(run_config(*SMALL, f"lut={lut_path}", "strategy=full"))  # baselines use no LUT
