"""Checkpoints, resume, refusals of used run directories, failures on record, the watchdog."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flwr_distreal.run.checkpoint import (
    CHECKPOINT_FILE,
    Checkpoint,
    CheckpointError,
    config_differences,
    load_checkpoint,
    save_checkpoint,
)
from flwr_distreal.run.experiment import (
    MetricsRecorder,
    RunDirectoryError,
    RunFailedError,
    check_failures,
    check_run_dir,
    start_output,
)

from conftest import run_config


def _ckpt(cfg, rnd: int = 3) -> Checkpoint:
    rng = np.random.default_rng(rnd)
    arrays = [rng.standard_normal((4, 3)).astype(np.float32), np.array(7, dtype=np.int64)]
    rows = [{"round": r, "accuracy": 0.1 * r, "loss": 1.0, "wall_time": float(r)} for r in range(1, rnd + 1)]
    return Checkpoint(rnd, ["w", "n"], arrays, dataclasses.asdict(cfg), rows, {"_train_rng": [3, [1, 2], None]})


def test_checkpoint_round_trip(tmp_path) -> None:
    cfg = run_config()
    saved = _ckpt(cfg)
    save_checkpoint(tmp_path, saved)
    loaded = load_checkpoint(tmp_path)
    assert loaded is not None and loaded.round == 3 and loaded.keys == ["w", "n"]
    for a, b in zip(saved.arrays, loaded.arrays):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype
    assert loaded.config == saved.config and loaded.rows == saved.rows and loaded.strategy == saved.strategy
    assert load_checkpoint(tmp_path / "empty") is None


def test_a_checkpoint_truncated_mid_write_is_never_resumed_from(tmp_path) -> None:
    cfg = run_config()
    save_checkpoint(tmp_path, _ckpt(cfg, 2))
    good = (tmp_path / CHECKPOINT_FILE).read_bytes()
    # a writer killed mid-write leaves only its temporary file: the last whole checkpoint stays
    (tmp_path / f".{CHECKPOINT_FILE}.999.tmp").write_bytes(good[: len(good) // 2])
    assert load_checkpoint(tmp_path).round == 2
    save_checkpoint(tmp_path, _ckpt(cfg, 3))
    assert load_checkpoint(tmp_path).round == 3
    # a checkpoint truncated on disk (not by this module) is refused, never half-read
    (tmp_path / CHECKPOINT_FILE).write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(tmp_path)


def test_config_differences_name_the_keys() -> None:
    a = dataclasses.asdict(run_config())
    b = dataclasses.asdict(run_config("lr=0.2", "resources.lam=4", "rounds=50", "resume=true"))
    assert config_differences(a, b) == ["lr: 0.1 -> 0.2", "resources.lam: 1.0 -> 4.0"]


def test_a_run_into_a_used_directory_is_refused(tmp_path) -> None:
    cfg = run_config()
    assert check_run_dir(tmp_path, cfg) is None  # empty: a fresh run
    recorder = start_output(tmp_path, cfg)
    recorder.on_fit(1, {"received": 3})
    recorder.on_evaluate(1, 1.0, {"accuracy": 0.5})
    before = (tmp_path / "metrics.csv").read_text()
    with pytest.raises(RunDirectoryError, match="already holds a run \\(metrics.csv\\); pass resume=true"):
        check_run_dir(tmp_path, cfg)
    assert (tmp_path / "metrics.csv").read_text() == before  # nothing overwritten
    with pytest.raises(RunDirectoryError, match="has no checkpoint.npz to resume from"):
        check_run_dir(tmp_path, dataclasses.replace(cfg, resume=True))


def test_resume_into_an_empty_directory_or_to_fewer_rounds_is_refused(tmp_path) -> None:
    with pytest.raises(RunDirectoryError, match="holds no run to resume"):
        check_run_dir(tmp_path / "empty", run_config("resume=true"))
    tmp_path.mkdir(exist_ok=True)
    with pytest.raises(RunDirectoryError, match="holds no run to resume"):
        check_run_dir(tmp_path, run_config("resume=true"))
    save_checkpoint(tmp_path, _ckpt(run_config()))  # a checkpoint at round 3
    with pytest.raises(RunDirectoryError, match=r"rounds=2 is below the 3 rounds the checkpoint"):
        check_run_dir(tmp_path, run_config("resume=true", "rounds=2"))
    assert check_run_dir(tmp_path, run_config("resume=true", "rounds=3")).round == 3  # nothing left to run: fine


def test_an_unreadable_metrics_csv_is_refused_naming_the_file(tmp_path) -> None:
    from flwr_distreal.run.recording import read_metrics as _read_metrics

    bad = tmp_path / "metrics.csv"
    bad.write_bytes(b"round,accuracy\n1,\xff\xfe0.5\n")
    with pytest.raises(RunDirectoryError, match=r"metrics.csv is not a readable metrics.csv \(UnicodeDecodeError"):
        _read_metrics(bad)
    assert bad.read_bytes() == b"round,accuracy\n1,\xff\xfe0.5\n"  # untouched


def test_resume_with_another_config_is_refused_naming_the_keys(tmp_path) -> None:
    cfg = run_config()
    save_checkpoint(tmp_path, _ckpt(cfg))
    resumed = run_config("resume=true", "rounds=40")  # more rounds: allowed
    assert check_run_dir(tmp_path, resumed).round == 3
    with pytest.raises(RunDirectoryError, match=r"another config .*lr: 0.1 -> 0.3; seed: 0 -> 5"):
        check_run_dir(tmp_path, run_config("resume=true", "lr=0.3", "seed=5"))


def test_resumed_metrics_keep_the_checkpoint_rows_and_go_on(tmp_path) -> None:
    cfg = run_config()
    rows = _ckpt(cfg).rows
    (tmp_path / "metrics.csv").write_text("junk from a round after the checkpoint\n")
    recorder = start_output(tmp_path, cfg, rows)
    recorder.on_fit(4, {"received": 3, "failures": 1})
    recorder.on_evaluate(4, 0.9, {"accuracy": 0.6})
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0].split(",") == MetricsRecorder.FIELDS
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2", "3", "4"]
    assert float(recorder.rows[-1]["wall_time"]) >= 3.0  # wall time goes on from the checkpoint


def test_a_run_whose_clients_fail_every_round_fails() -> None:
    ok = [{"received": 3, "failures": 3}, {"received": 5, "failures": 1}]
    check_failures(ok, 0.5)  # round 2 was fine
    bad = [{"received": 1, "failures": 5}, {"received": 0, "failures": 6}]
    with pytest.raises(RunFailedError, match="in every one of the 2 rounds more than 50% of the sampled clients failed"):
        check_failures(bad, 0.5)


def test_resume_and_legacy_runtime_refusal(tmp_path) -> None:
    from flwr_distreal.run.runtimes import run_legacy_simulation

    with pytest.raises(RunDirectoryError, match="resume=true needs runtime=flwr-run"):
        run_legacy_simulation(run_config("resume=true", "runtime=legacy"), tmp_path)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="the watchdog reads /proc")
def test_the_watchdog_stops_tagged_processes_after_kill_9_of_their_owner(tmp_path) -> None:
    """An owner that dies by SIGKILL cannot clean up: its watchdog stops what it started."""
    from flwr_distreal.run.processes import tagged_pids

    script = (
        "import subprocess, sys, time\n"
        "from flwr_distreal.run.local_runtime import ProcessGuard\n"
        "with ProcessGuard() as guard:\n"
        "    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "    print(guard.tag, child.pid, flush=True)\n"
        "    time.sleep(120)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        tag, child = owner.stdout.readline().split()
        seen = time.monotonic() + 10  # a loaded machine may show the new process's environment late
        while int(child) not in tagged_pids(tag) and time.monotonic() < seen:
            time.sleep(0.1)
        assert int(child) in tagged_pids(tag)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 15
        while tagged_pids(tag) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not tagged_pids(tag), "the owner's child outlived it"
    finally:
        if owner.poll() is None:
            owner.kill()


def test_a_checkpoint_keeps_0d_arrays(tmp_path) -> None:
    """BatchNorm's ``num_batches_tracked`` is 0-d: saved and loaded with its shape."""
    import numpy as np

    from flwr_distreal.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint

    arrays = [np.zeros((2, 3), np.float32), np.array(7, dtype=np.int64)]
    save_checkpoint(tmp_path, Checkpoint(1, ["w", "n"], arrays, {"seed": 0}, [], {}))
    back = load_checkpoint(tmp_path)
    assert [a.shape for a in back.arrays] == [(2, 3), ()] and int(back.arrays[1]) == 7
