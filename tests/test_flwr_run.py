"""``flwr run .`` end to end on Flower's local simulation runtime, and the app's own checks.

The end-to-end tests (``slow``) start a private local SuperLink through the ``flwr`` CLI, with
``FLWR_HOME`` in a temporary directory (the user's ``~/.flwr`` is untouched), free ports,
runtime dependency installation off (the test environment already has the app's
dependencies) and a unique tag in the environment; at the end every process that carries the
tag (SuperLink, SuperExec, simulation, Ray) is stopped by PID and checked gone.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")
pytest.importorskip("flwr")

from flwr_distreal import app  # noqa: E402
from flwr_distreal.config import to_run_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = REPO / "pyproject.toml"
DIGITS_DEVICES = 20
RUN_TIMEOUT_S = 420


def _flwr_cli() -> str | None:
    """The ``flwr`` CLI next to this interpreter, else on PATH."""
    sibling = Path(sys.executable).parent / "flwr"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    return shutil.which("flwr")


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

    from flwr_distreal.config import register_configs

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
    assert {"flwr_distreal/app.py", "flwr_distreal/experiment.py", "flwr_distreal/models/femnist_cnn.py"} <= names
    assert not {n for n in names if n.startswith(("tests/", "scripts/", "outputs/", "results/"))}


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tagged_pids(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``tag``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag.encode() not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if state != "Z":
            pids.append(int(entry.name))
    return pids


def _stop(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class FlwrEnv:
    """A private Flower home and local SuperLink for ``flwr`` CLI calls."""

    def __init__(self, flwr: str, root: Path) -> None:
        self.flwr = flwr
        self.root = root
        self.home = root / "flwr-home"
        self.tag = f"FLWR_DISTREAL_TEST_TAG={uuid.uuid4().hex}"
        self.env = dict(
            os.environ,
            FLWR_HOME=str(self.home),
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
            FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_DISABLE_UPDATE_CHECK="1",
            RAY_TMPDIR=str(root / "ray"),
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{Path(flwr).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        key, value = self.tag.split("=")
        self.env[key] = value
        (root / "ray").mkdir()

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [self.flwr, *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )

    def run(self, num_supernodes: int, run_config: str) -> tuple[int, str]:
        """``flwr run <repo> local`` streaming its logs until the run ends; (run id, output)."""
        pyproject = PYPROJECT.read_bytes()
        res = self.cli(
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
        res = self.cli("ls", "local", "--run-id", str(run_id), "--format", "json")
        assert res.returncode == 0, res.stdout + res.stderr
        payload = json.loads(res.stdout[res.stdout.index("{"):])
        (run,) = [r for r in payload["runs"] if r["run-id"] == str(run_id)]
        return run

    def stop_all(self) -> list[int]:
        """Stop every process that carries this env's tag; return the PIDs that survived."""
        pids = _tagged_pids(self.tag)
        _stop(pids, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while (left := _tagged_pids(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.2)
        _stop(left, signal.SIGKILL)
        time.sleep(0.5)
        return _tagged_pids(self.tag)


@pytest.fixture(scope="module")
def flwr_env() -> Iterator[FlwrEnv]:
    flwr = _flwr_cli()
    if flwr is None:
        pytest.skip("the flwr CLI is not installed")
    if not Path("/proc/self/environ").exists():
        pytest.skip("finding the processes flwr starts needs /proc (Linux)")
    root = Path(tempfile.mkdtemp(prefix="fdr-flwr-"))  # short: Ray's socket paths must fit
    env = FlwrEnv(flwr, root)
    try:
        yield env
    finally:
        survivors = env.stop_all()
        pgrep = subprocess.run(["pgrep", "-f", str(root)], capture_output=True, text=True) if shutil.which("pgrep") else None
        shutil.rmtree(root, ignore_errors=True)
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
    assert _tagged_pids(flwr_env.tag), "no SuperLink found with the test's tag: cleanup would miss it"


@pytest.mark.slow
def test_flwr_run_refuses_wrong_supernode_count(flwr_env: FlwrEnv) -> None:
    out_dir = flwr_env.root / "out-wrong"
    run_id, log = flwr_env.run(3, f"rounds=1 clients-per-round=2 output-dir='{out_dir}'")
    run = flwr_env.status(run_id)
    assert run["status"] == "finished:failed", run
    assert "has 3 SuperNode(s) but this run needs exactly 20" in run["status-details"], run
    assert 'num-supernodes=20' in log, log
    assert not (out_dir / "metrics.csv").exists()
