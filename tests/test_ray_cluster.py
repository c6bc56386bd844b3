"""``scripts/ray_cluster.py``: a two-node Ray cluster on this machine, a simulation across it,
every process stopped by PID.

The fast tests check the start/stop logic with a stand-in for ``ray`` (command lines, PIDs
found and stopped, a stranger's process left alone) and the placement bookkeeping; the real
cluster run is ``slow``.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

from conftest import REPO

SCRIPT = REPO / "scripts" / "ray_cluster.py"


@pytest.fixture(scope="module")
def rc() -> ModuleType:
    spec = importlib.util.spec_from_file_location("script_ray_cluster", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _value(command: list[str], option: str) -> str:
    return command[command.index(option) + 1]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ------------------------------------------------------------------------------ command lines


def test_head_and_worker_command_lines(rc, tmp_path: Path) -> None:
    cluster = rc.LocalRayCluster(num_workers=1, cpus_per_node=1, base=tmp_path, ray_bin="/opt/ray")
    head, worker = cluster.commands()
    assert head[:3] == ["/opt/ray", "start", "--head"] and worker[:2] == ["/opt/ray", "start"]
    assert _value(head, "--port") == str(cluster.gcs_port)
    assert _value(worker, "--address") == f"127.0.0.1:{cluster.gcs_port}" == cluster.address
    for flag in ("--head", "--port", "--include-dashboard=false"):  # head-only flags: ray start refuses them on a worker
        assert flag not in worker
    for command, folder in ((head, tmp_path / "h"), (worker, tmp_path / "w1")):
        assert _value(command, "--num-cpus") == "1"
        assert _value(command, "--node-ip-address") == "127.0.0.1"
        assert _value(command, "--temp-dir") == str(folder)
        assert command[-1] != "stop" and "stop" not in command
        assert "--block" in command  # stays in the foreground: a PID to stop
    # each node has ports of its own, none of them the head's GCS port
    ports = [int(_value(c, o)) for c in (head, worker) for o in rc.NODE_PORT_OPTIONS]
    assert len(set(ports)) == len(ports) and cluster.gcs_port not in ports
    assert [n.name for n in cluster.nodes] == ["head", "worker"]


def test_bad_settings_are_refused(rc, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="num_cpus"):
        rc.RayNode("head", True, 0, tmp_path)
    with pytest.raises(ValueError, match="num_workers"):
        rc.LocalRayCluster(num_workers=-1, base=tmp_path, ray_bin="/opt/ray")
    with pytest.raises(ValueError, match="gcs_port"):
        rc.node_command("/opt/ray", rc.RayNode("head", True, 1, tmp_path), 0)
    for argv in (["--workers", "0"], ["--clients", "9", "--devices", "8"], ["--rounds", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            rc._parse(argv)
        assert exit_info.value.code == 2


def test_simulation_command_joins_by_environment_not_by_flags(rc, tmp_path: Path) -> None:
    args, extra = rc._parse(["--rounds", "2", "--", "strategy=feddropout"])
    command = rc.hydra_command(args, tmp_path, extra)
    assert command[1:3] == ["-m", "flwr_distreal.main"] and "-m" not in command[3:]
    assert {"rounds=2", "runtime=flwr-run", "num_cpus_per_client=1", "strategy=feddropout"} <= set(command)
    assert f"hydra.run.dir={tmp_path / 'run'}" in command
    sweep = rc.hydra_command(rc._parse(["--sweep", "seed=0,1"])[0], tmp_path)
    assert sweep[3] == "-m" and "seed=0,1" in sweep and f"hydra.sweep.dir={tmp_path / 'sweep'}" in sweep


# ------------------------------------------------------------------------------- start / stop

FAKE_RAY = """#!/bin/bash
# stands in for `ray start --block`: a child, a double-forked grandchild (reparented away from
# this process, still in its session), then waits like --block does
sleep 301 &
( sleep 302 & )
wait
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds processes through /proc (Linux)")
def test_stop_kills_every_own_process_and_nothing_else(rc, tmp_path: Path) -> None:
    fake = tmp_path / "ray"
    fake.write_text(FAKE_RAY)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    stranger = subprocess.Popen(["sleep", "303"], start_new_session=True)  # another session's process
    cluster = rc.LocalRayCluster(num_workers=1, ray_bin=str(fake))  # its own folder under /tmp
    try:
        cluster.start()
        # 2 nodes x (bash + 2 sleeps), once the double fork's short-lived subshell is gone: the same
        # 6 processes on two scans 0.3 s apart (a scan during the fork can count the subshell)
        deadline = time.monotonic() + 20
        pids: list[int] = []
        while time.monotonic() < deadline:
            pids = cluster.pids()
            if len(pids) == 2 * 3:
                time.sleep(0.3)
                if cluster.pids() == pids:
                    break
            time.sleep(0.1)
        own = {n.process.pid for n in cluster.nodes}
        assert own <= set(pids)
        assert len(pids) == 6, pids
        assert stranger.pid not in pids and os.getpid() not in pids
        assert cluster.watchdog is not None and cluster.watchdog.pid not in pids
        names = {Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode() for p in pids}
        assert names == {"/bin/bash", "sleep"}, names
        base = cluster.base
        assert base.is_dir() and all((base / d).is_dir() for d in ("h", "w1"))

        survivors = cluster.stop(grace_s=2.0)
        assert survivors == []
        time.sleep(0.2)
        assert [p for p in pids if _alive(p)] == []
        assert rc.leftovers(cluster) == []
        assert not base.exists()  # the folder it made is removed
        assert cluster.watchdog.poll() is not None
        assert _alive(stranger.pid) and stranger.pid not in cluster.family.seen  # not ours: never signalled
        assert cluster.stop() == []  # a second stop is a no-op
    finally:
        cluster.stop(grace_s=1.0)
        stranger.kill()
        stranger.wait()


def test_a_node_that_exits_is_reported_with_its_log(rc, tmp_path: Path) -> None:
    fake = tmp_path / "ray"
    fake.write_text("#!/bin/bash\necho 'cannot bind port' >&2\nexit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    cluster = rc.LocalRayCluster(num_workers=1, base=tmp_path / "c", ray_bin=str(fake))
    try:
        cluster.start()
        for node in cluster.nodes:
            node.process.wait(10)
        with pytest.raises(RuntimeError, match=r"node head exited with code 3:\n.*cannot bind port"):
            cluster.check_alive()
    finally:
        cluster.stop(grace_s=1.0)


# --------------------------------------------------------------------------- where clients ran


def test_placement_summary_names_nodes_and_needs_every_node(rc) -> None:
    names = {"aa11": "head", "bb22": "worker"}
    actors = [{"node_id": "aa11"}, {"node_id": "bb22"}]
    tasks = [{"node_id": "aa11"}] * 5 + [{"node_id": "cc33"}]
    summary = rc.placement_summary(names, actors, tasks)
    assert summary == {"head": {"actors": 1, "tasks": 5}, "worker": {"actors": 1, "tasks": 0}, "other:cc33": {"actors": 0, "tasks": 1}}
    # task records decide when there are any: the worker ran none
    assert rc.ran_on_every_node(summary, ["head", "worker"]) == (False, "tasks")
    summary = rc.placement_summary(names, actors, tasks + [{"node_id": "bb22"}])
    assert rc.ran_on_every_node(summary, ["head", "worker"]) == (True, "tasks")
    # no task events kept: the actors are the evidence
    summary = rc.placement_summary(names, actors, [])
    assert rc.ran_on_every_node(summary, ["head", "worker"]) == (True, "actors")
    assert rc.ran_on_every_node(rc.placement_summary(names, actors[:1], []), ["head", "worker"]) == (False, "actors")


def test_node_names_match_by_node_manager_port(rc, tmp_path: Path) -> None:
    cluster = rc.LocalRayCluster(num_workers=1, base=tmp_path, ray_bin="/opt/ray")
    head, worker = (n.ports["--node-manager-port"] for n in cluster.nodes)
    ray_nodes = [{"NodeID": "w" * 8, "NodeManagerPort": worker}, {"NodeID": "h" * 8, "NodeManagerPort": head},
                 {"NodeID": "x" * 12, "NodeManagerPort": 1}]
    assert rc.node_names(cluster, ray_nodes) == {"w" * 8: "worker", "h" * 8: "head", "x" * 12: "other:xxxxxxxx"}


def test_round_lines_show_round_times(rc) -> None:
    rows = [
        {"round": "1", "accuracy": "0.25", "loss": "2.0", "received": "4", "stragglers": "1", "wall_time": "12.5"},
        {"round": "2", "accuracy": "0.5", "loss": "1.5", "received": "4", "stragglers": "0", "wall_time": "15.0"},
    ]
    lines = rc.format_rounds(rows)
    assert "round 1: accuracy 0.2500" in lines[0] and "round time 12.5 s" in lines[0]
    assert "round time 2.5 s" in lines[1] and "replies 4" in lines[1]


def test_client_resources_are_left_to_an_existing_cluster(monkeypatch) -> None:
    """With RAY_ADDRESS set the cluster places the clients: a request above this machine's CPUs
    is not refused (it is without RAY_ADDRESS)."""
    from flwr_distreal.run.checks import StartupError, check_client_resources

    too_many = (os.cpu_count() or 1) + 8
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(StartupError, match="num_cpus_per_client"):
        check_client_resources(too_many, 0.0, "flwr-run")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    check_client_resources(too_many, 0.0, "flwr-run")
    check_client_resources(too_many, 0.0, "legacy")
    with pytest.raises(StartupError):  # an explicit cpu_count is a check against that machine
        check_client_resources(too_many, 0.0, "flwr-run", cpu_count=2)


# --------------------------------------------------------------------------------- the real run


@pytest.mark.heavy
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds processes through /proc (Linux)")
@pytest.mark.parametrize("runtime", ["flwr-run", "legacy"])
def test_two_node_cluster_runs_clients_on_both_nodes_and_leaves_nothing(runtime: str, tmp_path: Path) -> None:
    """flwr run (flwr-simulation calls ray.init) and legacy (run_simulation in the runner, which
    must not pass num_cpus to a cluster it joins) both run their clients on both nodes."""
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--runtime", runtime, "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    text = res.stdout + res.stderr
    assert res.returncode == 0, text[-5000:]
    assert "clients ran on every node" in text and ": yes" in text
    assert "processes left of the cluster: none" in text
    assert "round 2: accuracy" in text
    placement = (out / "placement.json").read_text()
    assert '"head"' in placement and '"worker"' in placement
