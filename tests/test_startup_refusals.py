"""Start-up refusals of a run (issue 20, item 5): a CUDA device or GPUs this machine lacks, more
CPUs per client than it has, a TMPDIR too long for Ray's socket paths, an output_dir that is a
file; each refused by flwr_distreal.run.checks before data or Ray, naming the key. And the runner's
errors: one line and exit code 2, the traceback only with DISTREAL_DEBUG=1."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from flwr_distreal.run import checks
from flwr_distreal.run.checks import (
    StartupError,
    check_client_resources,
    check_ray_socket_path,
    check_run_device,
    check_run_start,
    ray_socket_path,
    ray_temp_dir,
    unix_socket_limit,
)
from flwr_distreal.run.config import ConfigError

from conftest import run_config

REPO = Path(__file__).resolve().parents[1]


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Make torch see ``count`` CUDA GPUs (0: none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def _tempdir(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Python's temporary folder (what ``tempfile.gettempdir()`` returns) set to ``path``."""
    monkeypatch.setattr(tempfile, "tempdir", path)


# ---------------------------------------------------------------------------------- device


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_device_without_cuda_is_refused_naming_the_key(monkeypatch, device) -> None:
    _gpus(monkeypatch, 0)
    with pytest.raises(StartupError, match=rf"^device='{device}' but no cuda device is available.*use device=cpu"):
        check_run_device(device)


def test_cuda_index_beyond_the_gpus_is_refused_and_an_existing_one_accepted(monkeypatch) -> None:
    _gpus(monkeypatch, 1)
    check_run_device("cuda")
    check_run_device("cuda:0")
    with pytest.raises(StartupError, match=r"device='cuda:1' but this machine has 1 cuda device"):
        check_run_device("cuda:1")


def test_auto_and_cpu_need_no_gpu(monkeypatch) -> None:
    def no_torch() -> bool:
        raise AssertionError("torch.cuda asked for device=auto/cpu")

    monkeypatch.setattr(torch.cuda, "is_available", no_torch)
    check_run_device("auto")
    check_run_device("cpu")


# ------------------------------------------------------------------------ client resources


@pytest.mark.parametrize("runtime", ["flwr-run", "legacy"])
def test_gpu_per_client_without_a_gpu_is_refused(monkeypatch, runtime) -> None:
    _gpus(monkeypatch, 0)
    with pytest.raises(StartupError, match=r"^num_gpus_per_client=1 but this machine has no GPU.*num_gpus_per_client=0"):
        check_client_resources(1, 1, runtime)
    check_client_resources(1, 0, runtime)  # no GPU asked: fine


def test_more_gpus_per_client_than_the_machine_has_are_refused(monkeypatch) -> None:
    _gpus(monkeypatch, 1)
    check_client_resources(1, 0.5, "flwr-run")  # clients sharing the GPU
    check_client_resources(1, 1, "flwr-run")
    with pytest.raises(StartupError, match=r"num_gpus_per_client=2 but this machine has 1 GPU"):
        check_client_resources(1, 2, "flwr-run")


def test_gpu_request_without_ray_is_warned_not_refused(monkeypatch, caplog) -> None:
    _gpus(monkeypatch, 0)
    with caplog.at_level(logging.WARNING, logger="flwr_distreal.run.checks"):
        check_client_resources(1, 1, "inprocess")
    assert "num_gpus_per_client=1 is not applied by runtime=inprocess" in caplog.text


def test_more_cpus_per_client_than_the_machine_has_are_refused() -> None:
    check_client_resources(2, 0, "legacy", cpu_count=2)
    with pytest.raises(StartupError, match=r"^num_cpus_per_client=3 but this machine has 2 CPU"):
        check_client_resources(3, 0, "legacy", cpu_count=2)
    # flwr run reserves whole CPUs: 1.5 CPUs are 2 there
    check_client_resources(1.5, 0, "legacy", cpu_count=2)
    with pytest.raises(StartupError, match=r"num_cpus_per_client=1.5 \(flwr run reserves whole CPUs: 2\)"):
        check_client_resources(1.5, 0, "flwr-run", cpu_count=1)
    check_client_resources(64, 0, "inprocess", cpu_count=2)  # no Ray: nothing to place


# ---------------------------------------------------------------------- Ray's socket paths


def test_socket_limit_is_that_of_sun_path() -> None:
    assert unix_socket_limit("linux") == 107
    assert unix_socket_limit("darwin") == 103


def test_ray_socket_path_has_the_shape_and_length_of_a_real_session() -> None:
    # a real Ray 2.55 session started with RAY_TMPDIR=/tmp/rs (pid 4604), its sockets listed
    real = "/tmp/rs/ray/session_2026-12-07_16-17-54_875632_4604/sockets/plasma_store"
    predicted = ray_socket_path("/tmp/rs", pid_digits=4)
    assert len(predicted) == len(real)
    assert re.sub(r"\d", "0", predicted) == re.sub(r"\d", "0", real)


def test_socket_path_at_the_limit_passes_one_byte_more_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(checks, "_pid_digits", lambda: 5)
    fixed = len(ray_socket_path("/", pid_digits=5))  # "/" + what Ray appends to its folder
    fits = "/t" + "x" * (107 - fixed - 2)
    assert len(check_ray_socket_path(fits, "TMPDIR", fits, "legacy")) == 107
    longer = fits + "x"
    with pytest.raises(StartupError, match=rf"^TMPDIR={longer} is too long for Ray \(runtime=legacy\).* 108 bytes, "
                       rf"over the 107 .*at most {len(fits)} characters"):
        check_ray_socket_path(longer, "TMPDIR", longer, "legacy")


def test_issue_tmpdir_of_30_characters_falls_back_to_tmp_for_flwr_run(monkeypatch, tmp_path) -> None:
    # issue 20: a 30-character TMPDIR broke Ray's socket path (113 > 107 bytes) under flwr run;
    # the runtime now makes its folder in /tmp whenever the sockets would not fit under TMPDIR
    monkeypatch.setattr(checks, "_pid_digits", lambda: 5)
    base = "/tmp/" + "d" * 25
    _tempdir(monkeypatch, base)
    assert len(ray_socket_path(os.path.join(base, "fdr-XXXXXXXX", "ray"))) == 113
    assert checks.flwr_runtime_base() == "/tmp"
    ray_dir, variable, value = ray_temp_dir("flwr-run")
    assert (ray_dir, variable, value) == ("/tmp/fdr-XXXXXXXX/ray", "TMPDIR", base)
    check_ray_socket_path(ray_dir, variable, value, "flwr-run")
    fits = "/tmp/" + "d" * 19  # 24 characters: the sockets fit, TMPDIR is kept
    _tempdir(monkeypatch, fits)
    assert checks.flwr_runtime_base() == fits
    assert ray_temp_dir("flwr-run")[0] == os.path.join(fits, "fdr-XXXXXXXX", "ray")
    check_ray_socket_path(*ray_temp_dir("flwr-run"), runtime="flwr-run")


def test_flwr_run_replaces_a_temp_folder_over_40_characters_by_tmp(monkeypatch) -> None:
    _tempdir(monkeypatch, "/" + "l" * 60)
    ray_dir, variable, value = ray_temp_dir("flwr-run")
    assert ray_dir == "/tmp/fdr-XXXXXXXX/ray" and value == "/" + "l" * 60
    check_ray_socket_path(ray_dir, variable, value, "flwr-run")


def test_flwr_run_prediction_matches_the_local_runtime(monkeypatch) -> None:
    """ray_temp_dir predicts the folder LocalFlwrRuntime makes its root in (caught at mkdtemp)."""
    from flwr_distreal.run import local_runtime

    class Made(Exception):
        pass

    def mkdtemp(prefix: str = "", dir: str | None = None, **_: object) -> str:
        raise Made(prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    for base in ("/tmp/" + "s" * 20, "/tmp/" + "s" * 35, "/tmp/" + "s" * 36, "/tmp/" + "s" * 80):
        _tempdir(monkeypatch, base)
        with pytest.raises(Made) as made:
            local_runtime.LocalFlwrRuntime()
        prefix, chosen = made.value.args
        ray_dir = ray_temp_dir("flwr-run")[0]
        assert ray_dir == os.path.join(chosen, prefix + "X" * 8, "ray"), base


def test_legacy_ray_folder_follows_ray_tmpdir_then_tmpdir() -> None:
    assert ray_temp_dir("legacy", {"TMPDIR": "/a/b", "RAY_TMPDIR": "/c"}) == ("/c", "RAY_TMPDIR", "/c")
    if sys.platform.startswith("linux"):
        assert ray_temp_dir("legacy", {"TMPDIR": "/a/b"}) == ("/a/b", "TMPDIR", "/a/b")
        assert ray_temp_dir("legacy", {}) == ("/tmp", "TMPDIR", "/tmp")
    assert ray_temp_dir("inprocess") is None


# --------------------------------------------------------------------------- check_run_start


def test_run_start_refuses_output_dir_that_is_a_file(tmp_path) -> None:
    file = tmp_path / "results"
    file.write_text("not a folder")
    cfg = run_config(f"output_dir={file}", "runtime=inprocess")
    with pytest.raises(StartupError, match=rf"^output_dir={re.escape(str(file))} is an existing file"):
        check_run_start(cfg)
    below = file / "run"  # a folder that would have to be created inside the file
    with pytest.raises(StartupError, match=r"^output_dir=.* cannot be created: .* is a file"):
        check_run_start(run_config(f"output_dir={below}", "runtime=inprocess"))
    # without output_dir: the run's folder, under the key that set it
    with pytest.raises(StartupError, match=r"^hydra.run.dir=.* is an existing file"):
        check_run_start(run_config("runtime=inprocess"), file, output_key="hydra.run.dir")


def test_run_start_checks_device_gpus_and_tmpdir_of_the_config(monkeypatch, tmp_path) -> None:
    _gpus(monkeypatch, 0)
    monkeypatch.setattr(checks, "_pid_digits", lambda: 5)
    out = f"output_dir={tmp_path / 'run'}"
    check_run_start(run_config(out))  # the defaults pass here
    with pytest.raises(StartupError, match=r"^device='cuda'"):
        check_run_start(run_config(out, "device=cuda"))
    with pytest.raises(StartupError, match=r"^num_gpus_per_client=1.0 "):
        check_run_start(run_config(out, "num_gpus_per_client=1"))
    _tempdir(monkeypatch, "/tmp/" + "d" * 25)
    check_run_start(run_config(out))  # flwr-run makes its folder in /tmp instead
    monkeypatch.setenv("TMPDIR", "/tmp/" + "d" * 50)  # legacy: Ray uses TMPDIR as it is
    monkeypatch.delenv("RAY_TMPDIR", raising=False)
    with pytest.raises(StartupError, match=r"^TMPDIR=.* too long for Ray \(runtime=legacy\)"):
        check_run_start(run_config(out, "runtime=legacy"))
    check_run_start(run_config(out, "runtime=inprocess"))  # no Ray: TMPDIR does not matter


# ------------------------------------------------------------------------------ the runner


def test_exit_codes_of_the_runner() -> None:
    from flwr_distreal.run.local_runtime import FlwrRunError
    from flwr_distreal.cli.main import EXIT_FAILED, EXIT_REFUSED, exit_code, one_line

    assert exit_code(ConfigError("rounds must be >= 1")) == EXIT_REFUSED == 2
    assert exit_code(StartupError("device='cuda' ...")) == EXIT_REFUSED
    assert exit_code(ValueError("x"), startup=True) == EXIT_REFUSED
    assert exit_code(ValueError("x")) is None  # raised during a run: a bug keeps its traceback
    assert exit_code(RuntimeError("x"), startup=True) is None
    assert exit_code(FlwrRunError("run 1 ended failed")) == EXIT_FAILED == 1
    assert one_line(ValueError("a\n    full_key: rounds\n")) == "a; full_key: rounds"


def _runner(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flwr_distreal.main", *overrides],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def test_runner_refuses_in_one_line_and_shows_the_traceback_only_when_asked(tmp_path) -> None:
    file = tmp_path / "results"
    file.write_text("a file")
    args = (f"output_dir={file}", f"hydra.run.dir={tmp_path / 'hydra'}")
    env = {"DISTREAL_DEBUG": "0", "HYDRA_FULL_ERROR": "0"}
    plain = _runner(*args, env=env)
    assert plain.returncode == 2, plain.stderr
    assert plain.stderr.strip().splitlines() == [
        f"error: output_dir={file} is an existing file, not a folder; choose a folder for the results"
    ]
    assert "Traceback" not in plain.stdout + plain.stderr
    assert "Traceback" in (tmp_path / "hydra" / "main.log").read_text()  # the job's log keeps it
    debug = _runner(*args, env={**env, "DISTREAL_DEBUG": "1"})
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "StartupError: output_dir=" in debug.stderr


def test_a_flwr_run_experiment_refusal_comes_from_the_preflight_in_one_line(tmp_path) -> None:
    """The flwr-run runner builds no experiment itself (it never loads torch): a bad input that
    only the experiment sees (a LUT file that is not there) is refused by the preflight process,
    with the same one line and exit code as before, and no SuperLink is started."""
    from flwr_distreal.run import flwr_runner

    missing = tmp_path / "no_such_lut.json"
    args = ("runtime=flwr-run", f"lut={missing}", f"output_dir={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'hydra'}")
    plain = _runner(*args, env={"DISTREAL_DEBUG": "0", "HYDRA_FULL_ERROR": "0"})
    assert plain.returncode == 2, plain.stderr
    lines = plain.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], plain.stderr
    assert "Traceback" not in plain.stderr
    assert not (tmp_path / "out" / "flwr.log").exists()  # flwr run never started
    # the same check, called directly: refused with the experiment's message; a good config answers
    cfg = run_config("runtime=flwr-run", f"lut={missing}")
    with pytest.raises(flwr_runner.ExperimentRefusedError, match="no_such_lut.json"):
        flwr_runner.preflight(cfg)
    answer = flwr_runner.preflight(run_config("runtime=flwr-run"))
    assert answer.num_devices == 20 and answer.start.startswith("distreal on digits (flwr run): 20 devices")
