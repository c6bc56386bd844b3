"""``flwr run .`` end to end on Flower's local simulation runtime, and the app's own checks.

The end-to-end tests (``slow``) run the ``flwr`` CLI on a private local SuperLink
(:class:`flwr_distreal.run.local_runtime.LocalFlwrRuntime`: ``FLWR_HOME`` in a temporary directory, so
the user's ``~/.flwr`` is untouched, free ports, runtime dependency installation off, and a unique
tag in the environment); at the end every process that carries the tag (SuperLink, simulation,
Ray) is stopped by PID and checked gone.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
pytest.importorskip("flwr")

from flwr_distreal.run import flwr_app as app  # noqa: E402
from flwr_distreal.run.config import to_run_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
DIGITS_DEVICES = 20
RUN_TIMEOUT_S = 420


def _app_config() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]


# -- the app's configuration and FAB (fast) ----------------------------------------------------


def test_pyproject_has_no_federations_section() -> None:
    """``flwr run`` migrates and rewrites pyproject.toml when it finds one."""
    assert "federations" not in tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]


def test_default_run_config_is_conf_config_yaml() -> None:
    """Without overrides, ``flwr run`` runs exactly what ``python -m flwr_distreal.main`` runs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from flwr_distreal.run.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        expected = to_run_config(compose(config_name="config"))
    assert app.run_config_from_flower(_app_config()) == expected


def test_every_run_config_key_maps_to_hydra() -> None:
    """Each key of [tool.flwr.app.config] is known to the app and changes the composed config."""
    config = _app_config()
    assert set(config) == set(app._GROUPS) | set(app._VALUES) | {app.CONFIG_FILE_KEY}
    changed = {
        "strategy": "heterofl", "lam": 2.5, "rounds": 3, "clients-per-round": 4, "seed": 7, "deadline": 2.0,
        "lr": 0.3, "batch-size": 16, "local-epochs": 2, "lut": "a.json", "output-dir": "/tmp/x",
    }
    cfg = app.run_config_from_flower({**config, **changed})
    assert (cfg.strategy.name, cfg.resources.lam, cfg.rounds, cfg.clients_per_round) == ("heterofl", 2.5, 3, 4)
    assert (cfg.batch_size, cfg.local_epochs, cfg.output_dir, cfg.lut) == (16, 2, "/tmp/x", "a.json")
    assert (cfg.seed, cfg.deadline, cfg.lr) == (7, 2.0, 0.3)


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ({"dataset": "digits", "num-supernodes": 3}, "unknown run-config key 'num-supernodes'"),
        ({"dataset": ""}, "needs a dataset name"),
    ],
)
def test_run_config_refusals(run_config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        app.run_config_from_flower(run_config)


def test_run_config_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        app.run_config_from_flower(dict(_app_config(), rounds=0))


def test_fab_holds_package_and_conf() -> None:
    """The FAB that ``flwr run`` builds carries conf/ next to the package (app.CONF_DIR)."""
    from flwr.cli.build import build_fab_from_disk

    names = set(zipfile.ZipFile(io.BytesIO(build_fab_from_disk(REPO))).namelist())
    conf = {p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert conf <= names
    assert {"flwr_distreal/run/flwr_app.py", "flwr_distreal/run/experiment.py", "flwr_distreal/models/femnist_cnn.py"} <= names
    assert not {n for n in names if n.startswith(("tests/", "scripts/", "outputs/", "results/"))}


def test_staged_app_builds_the_same_fab(tmp_path: Path) -> None:
    """The runner gives ``flwr run`` a staged copy of the app (flwr walks every file of the folder
    it is given: .venv, results/); the FAB built from it is the checkout's, byte for byte, and
    the stage holds exactly the FAB's files."""
    from flwr.cli.build import build_fab_from_disk

    from flwr_distreal.run.flwr_app import stage_app

    (tmp_path / "flwr-distreal").mkdir()
    (tmp_path / "flwr-distreal" / "stale.py").write_text("# removed by staging\n")
    staged = stage_app(tmp_path / "flwr-distreal")
    assert not (staged / "stale.py").exists()
    fab = build_fab_from_disk(staged)
    assert fab == build_fab_from_disk(REPO)
    names = set(zipfile.ZipFile(io.BytesIO(fab)).namelist())
    copied = {p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()}
    assert copied == names - {".info/CONTENT"}  # nothing staged that the FAB leaves out
    assert not any(n.startswith((".venv/", "tests/", "results/")) for n in copied)


def test_output_dir_default_is_per_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = app.run_config_from_flower(_app_config())
    assert app.output_dir_for(cfg, 42) == tmp_path / "outputs" / "flwr_run" / "42"
    given = app.run_config_from_flower(dict(_app_config(), **{"output-dir": "res"}))
    assert app.output_dir_for(given, 42) == tmp_path / "res"


# -- SuperNode count checks (fast) --------------------------------------------------------------


class _Nodes:
    """SuperNode IDs as a grid reports them over successive polls."""

    def __init__(self, *counts: int) -> None:
        self.counts = list(counts)
        self.polls = 0

    def __call__(self) -> list[int]:
        count = self.counts[min(self.polls, len(self.counts) - 1)]
        self.polls += 1
        return list(range(count))


def test_wait_for_supernodes_waits_for_registration() -> None:
    nodes = _Nodes(0, 0, 7, 20)
    assert app.wait_for_supernodes(nodes, 20, "device", settle_s=5, timeout_s=5, poll_s=0.01) == 20
    assert nodes.polls == 4


def test_wait_for_supernodes_fewer_fails_once_settled() -> None:
    start = time.monotonic()
    with pytest.raises(app.SuperNodeCountError, match=r"has 3 SuperNode\(s\) but this run needs exactly 20.*num-supernodes=20"):
        app.wait_for_supernodes(_Nodes(3), 20, "device of digits", settle_s=0.2, timeout_s=30, poll_s=0.01)
    assert time.monotonic() - start < 5


def test_wait_for_supernodes_more_fails_at_once() -> None:
    nodes = _Nodes(25)
    with pytest.raises(app.SuperNodeCountError, match="has 25 SuperNode"):
        app.wait_for_supernodes(nodes, 20, "device", settle_s=60, timeout_s=60, poll_s=0.01)
    assert nodes.polls == 1


def test_wait_for_supernodes_none_times_out() -> None:
    with pytest.raises(app.SuperNodeCountError, match="has 0 SuperNode"):
        app.wait_for_supernodes(_Nodes(0), 2, "device", settle_s=0.01, timeout_s=0.1, poll_s=0.01)


# -- streaming `flwr run` and waiting for it (local_runtime.stream_flwr_run, poll_until) -----------


def _fake_flwr(code: str) -> list[str]:
    """A stand-in for the ``flwr`` CLI: a Python process that prints and exits as ``code`` says."""
    return [sys.executable, "-c", code]


def test_stream_flwr_run_returns_the_started_run_id(tmp_path: Path) -> None:
    from flwr_distreal.run.local_runtime import stream_flwr_run

    children: list[subprocess.Popen] = []
    polls = []
    run_id = stream_flwr_run(
        _fake_flwr("import time; print('INFO: Successfully started run 4711', flush=True); time.sleep(0.3)"),
        env={}, cwd=tmp_path, log_file=tmp_path / "run.log", children=children,
        on_poll=lambda: polls.append(1), poll_s=0.05,
    )
    assert run_id == 4711
    assert "Successfully started run 4711" in (tmp_path / "run.log").read_text()
    assert len(children) == 1 and children[0].returncode == 0
    assert len(polls) >= 2  # while it ran, and once after


def test_stream_flwr_run_exit_code_and_missing_start(tmp_path: Path) -> None:
    from flwr_distreal.run.local_runtime import FlwrRunError, stream_flwr_run

    started_then_failed = _fake_flwr("print('Successfully started run 7'); raise SystemExit(3)")
    kwargs = {"env": {}, "cwd": tmp_path, "log_file": tmp_path / "run.log", "children": [], "poll_s": 0.05}
    with pytest.raises(FlwrRunError, match=r"exit 3"):
        stream_flwr_run(started_then_failed, **kwargs)
    # a deployment's stream may break while its run goes on: the started run counts
    assert stream_flwr_run(started_then_failed, require_exit_zero=False, **kwargs) == 7
    with pytest.raises(FlwrRunError, match=r"flwr run failed \(exit 0\)(.|\n)*no run here"):
        stream_flwr_run(_fake_flwr("print('no run here')"), **kwargs)


def test_stream_flwr_run_timeout_stops_the_process(tmp_path: Path) -> None:
    from flwr_distreal.run.local_runtime import FlwrRunError, stream_flwr_run

    children: list[subprocess.Popen] = []
    with pytest.raises(FlwrRunError, match=r"did not finish within 0.5 s(.|\n)*still going(.|\n)*CONTEXT"):
        stream_flwr_run(
            _fake_flwr("import time; print('still going', flush=True); time.sleep(60)"),
            env={}, cwd=tmp_path, log_file=tmp_path / "run.log", children=children, timeout=0.5, poll_s=0.05,
            context=lambda: "CONTEXT",
        )
    assert children[0].poll() is not None  # stopped, not left running


def test_poll_until_polls_and_times_out() -> None:
    from flwr_distreal.run.local_runtime import FlwrRunError, poll_until

    calls, polls = [], []

    def done() -> bool:
        calls.append(1)
        return len(calls) == 3

    poll_until(done, start=time.monotonic(), timeout=10, timeout_message=lambda: "late",
               on_poll=lambda: polls.append(1), poll_s=0.0)
    assert len(calls) == 3 and len(polls) == 2
    with pytest.raises(FlwrRunError, match="^late after 2$"):
        poll_until(lambda: False, start=time.monotonic() - 5, timeout=1, timeout_message=lambda: "late after 2")


def test_check_partition() -> None:
    assert app.check_partition({"partition-id": 19, "num-partitions": 20}, 20, "digits") == 19
    assert app.check_partition({"partition-id": 0}, 20, "digits") == 0
    with pytest.raises(app.SuperNodeCountError, match="3 SuperNodes.*digits has 20 devices"):
        app.check_partition({"partition-id": 0, "num-partitions": 3}, 20, "digits")
    with pytest.raises(app.SuperNodeCountError, match="partition-id 20 is not a device"):
        app.check_partition({"partition-id": 20}, 20, "digits")
    with pytest.raises(app.SuperNodeCountError, match="no 'partition-id'"):
        app.check_partition({}, 20, "digits")


# -- flwr run . end to end (slow) -----------------------------------------------------------------


class FlwrEnv:
    """``flwr`` CLI calls on a private local SuperLink (:class:`LocalFlwrRuntime`: its own
    Flower home, free ports, every process tagged and stopped by PID)."""

    def __init__(self, runtime) -> None:
        self.runtime = runtime
        self.root = runtime.root
        self.home = runtime.home
        self.tag = runtime.tag

    def run(self, num_supernodes: int, run_config: str) -> tuple[int, str]:
        """``flwr run <repo> local`` streaming its logs until the run ends; (run id, output)."""
        self.runtime.start_superlink()
        pyproject = PYPROJECT.read_bytes()
        res = self.runtime.cli(
            "run", str(REPO), "local", "--federation-config", f"num-supernodes={num_supernodes}",
            "--run-config", run_config, "--stream", timeout=RUN_TIMEOUT_S,
        )
        out = res.stdout + res.stderr
        assert PYPROJECT.read_bytes() == pyproject, "flwr run rewrote pyproject.toml"
        assert res.returncode == 0, out
        started = [line for line in out.splitlines() if "Successfully started run" in line]
        assert started, out
        return int(started[0].split()[-1]), out

    def status(self, run_id: int) -> dict:
        return self.runtime.status(run_id)


@pytest.fixture(scope="module")
def flwr_env() -> Iterator[FlwrEnv]:
    from flwr_distreal.run.local_runtime import FlwrRunError, LocalFlwrRuntime

    if not Path("/proc/self/environ").exists():
        pytest.skip("finding the processes flwr starts needs /proc (Linux)")
    try:
        runtime = LocalFlwrRuntime()
    except FlwrRunError as err:
        pytest.skip(str(err))
    root = runtime.root
    try:
        yield FlwrEnv(runtime)
    finally:
        survivors = runtime.stop()
        pgrep = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True) if shutil.which("pgrep") else None
        assert not survivors, f"processes left running: {survivors}"
        if pgrep is not None:
            assert pgrep.stdout.strip() == "", f"processes still using {root}: {pgrep.stdout}"


@pytest.mark.slow
def test_flwr_run_completes_and_writes_metrics(flwr_env: FlwrEnv) -> None:
    out_dir = flwr_env.root / "out"
    run_id, log = flwr_env.run(
        DIGITS_DEVICES, f"rounds=1 clients-per-round=2 seed=3 output-dir='{out_dir}'"
    )
    assert "Strategy execution finished" in log, log
    assert f"distreal on digits: {DIGITS_DEVICES} devices, 2 per round, 1 rounds" in log, log
    assert flwr_env.status(run_id)["status"] == "finished:completed"

    lines = (out_dir / "metrics.csv").read_text().splitlines()
    assert len(lines) == 2, lines
    row = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert row["round"] == "1"
    assert int(row["received"]) == 2
    assert 0.0 <= float(row["accuracy"]) <= 1.0
    assert 0.0 < float(row["mean_macs"])
    config = (out_dir / "config.yaml").read_text()
    assert "rounds: 1\n" in config and "clients_per_round: 2\n" in config and "seed: 3\n" in config
    assert (out_dir / "accuracy.png").stat().st_size > 0
    # the local SuperLink runs from this session's private Flower home
    assert (flwr_env.home / "local-superlink" / "state.db").is_file()
    assert flwr_env.runtime.pids(), "no SuperLink found with the test's tag: cleanup would miss it"


@pytest.mark.heavy
@pytest.mark.slow
def test_flwr_run_refuses_wrong_supernode_count(flwr_env: FlwrEnv) -> None:
    out_dir = flwr_env.root / "out-wrong"
    run_id, log = flwr_env.run(3, f"rounds=1 clients-per-round=2 output-dir='{out_dir}'")
    run = flwr_env.status(run_id)
    assert run["status"] == "finished:failed", run
    assert "has 3 SuperNode(s) but this run needs exactly 20" in run["status-details"], run
    assert 'num-supernodes=20' in log, log
    assert not (out_dir / "metrics.csv").exists()
