#!/usr/bin/env python
"""Start a two-node Ray cluster on this machine, run a short simulation across it, check that
clients ran on both nodes, and stop every process of the cluster by PID.

Examples::

    python scripts/ray_cluster.py                      # flwr run: digits, 2 rounds, 4 clients a round
    python scripts/ray_cluster.py --runtime legacy     # Flower's run_simulation (in the runner's process)
    python scripts/ray_cluster.py --sweep seed=0,1     # a Hydra multirun, every job on the cluster
    python scripts/ray_cluster.py -- strategy=feddropout   # more Hydra overrides after --

The cluster is what ``ray start`` makes on real machines, here on 127.0.0.1: a head
(``ray start --head --port P --num-cpus 1``) and one worker node (``ray start --address
127.0.0.1:P --num-cpus 1``), each with its own ``--temp-dir`` and its own ports, so neither
collides with another Ray on this machine. The simulation joins it as any run would on a real
cluster: ``RAY_ADDRESS=127.0.0.1:P`` in the environment of ``python -m flwr_distreal.main``
(Flower's simulation process, or the runner itself with ``runtime=legacy``, then calls
``ray.init()``, which connects to ``RAY_ADDRESS`` instead of starting a Ray of its own). Every
client asks for one CPU, so each node holds one client actor at a time and both take clients.

Where the clients ran comes from the cluster's own records (its GCS, read after the run): the
``ClientAppActor`` actors of the run with the node each lived on, and the actor tasks
(``ClientAppActor.run``: one per client message) each node executed. The run fails (exit code 1)
unless both nodes executed client tasks.

Stopping: ``ray stop`` would stop every Ray of this user on the machine, other sessions' too, so
it is never called. Each node is started as ``ray start --block`` in a new session, with a tag in
its environment; its GCS, raylet, agents and workers are found by that tag, as its children and
as members of its session (:class:`flwr_distreal.run.processes.ProcessFamily`), recorded by PID
and stopped by PID (SIGTERM, SIGKILL after a grace period). A watchdog stops them as well if this
script dies first (``kill -9``). At the end the script lists what is left: the cluster's
processes (none), and any process that still names the cluster's folders.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr_distreal.run import processes  # noqa: E402
from flwr_distreal.run.processes import ProcessFamily, stop_family  # noqa: E402


def _num(cell: object) -> float:
    """A metrics.csv cell as a number; an empty cell (a round not evaluated: evaluate_every) is nan."""
    return float(cell) if cell not in (None, "") else float("nan")

#: Environment variable that marks every process of the cluster this script starts.
CLUSTER_TAG_VAR = "FLWR_DISTREAL_RAY_CLUSTER_TAG"
#: The Ray actor class Flower's simulation backend runs ClientApps in.
CLIENT_ACTOR = "ClientAppActor"
#: Its method that handles one message (a client's fit, evaluate or query).
CLIENT_TASK = f"{CLIENT_ACTOR}.run"
#: Ports each node gets of its own (two nodes on one machine must not share them).
NODE_PORT_OPTIONS = (
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)
#: Object store per node: Ray's minimum is 75 MB; a digits model is a few hundred kB.
OBJECT_STORE_BYTES = 100 * 1024 * 1024


class _RecordingFamily(ProcessFamily):
    """A :class:`ProcessFamily` that remembers every PID it ever returned (``seen``): the
    processes that stopping the cluster may have signalled, and no others."""

    def __init__(self, tag: str, exclude: tuple[int, ...] | list[int] = ()) -> None:
        super().__init__(tag, exclude)
        self.seen: set[int] = set()

    def scan(self) -> list[int]:
        pids = super().scan()
        self.seen.update(pids)
        return pids


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayNode:
    """One node of the local cluster: its name, CPUs, temporary folder and ports."""

    name: str
    head: bool
    num_cpus: int
    temp_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_cpus, int) or isinstance(self.num_cpus, bool) or self.num_cpus < 1:
            raise ValueError(f"num_cpus of node {self.name!r} must be an integer >= 1, got {self.num_cpus!r}")
        for option in NODE_PORT_OPTIONS:
            self.ports.setdefault(option, free_port())


def node_command(ray_bin: str, node: RayNode, gcs_port: int, ip: str = "127.0.0.1") -> list[str]:
    """The ``ray start`` command line of ``node``.

    Parameters
    ----------
    ray_bin : str
        The ``ray`` executable.
    node : RayNode
        The node (``head`` decides ``--head --port`` against ``--address``).
    gcs_port : int
        The head's port (its GCS): the head listens on it, a worker joins it.
    ip : str, optional
        The nodes' IP address (default 127.0.0.1).

    Returns
    -------
    list of str
        ``ray start ... --block``: the process stays in the foreground, so it has a PID to stop.
    """
    if not 0 < int(gcs_port) < 65536:
        raise ValueError(f"gcs_port must be a TCP port (1-65535), got {gcs_port!r}")
    command = [ray_bin, "start"]
    if node.head:
        command += ["--head", "--port", str(gcs_port), "--include-dashboard=false"]
    else:
        command += ["--address", f"{ip}:{gcs_port}"]
    command += [
        "--node-ip-address", ip,
        "--num-cpus", str(node.num_cpus),
        "--num-gpus", "0",
        "--temp-dir", str(node.temp_dir),
        "--object-store-memory", str(OBJECT_STORE_BYTES),
        "--min-worker-port", "0", "--max-worker-port", "0",  # 0: the OS picks each worker's port
        "--disable-usage-stats",
        "--block",
    ]
    for option in NODE_PORT_OPTIONS:
        command += [option, str(node.ports[option])]
    return command


def _ray_bin() -> str:
    path = Path(sys.executable).parent / "ray"
    if path.exists():
        return str(path)
    found = shutil.which("ray")
    if found is None:
        raise FileNotFoundError("the ray CLI is not installed (pip install 'flwr[simulation]')")
    return found


class LocalRayCluster:
    """A head and workers on 127.0.0.1, every process of which this object finds and stops by PID.

    Parameters
    ----------
    num_workers : int, optional
        Worker nodes beside the head (default 1).
    cpus_per_node : int, optional
        ``--num-cpus`` of every node (default 1).
    base : path, optional
        Folder for the nodes' temporary folders (default: a new short folder under ``/tmp``;
        Ray's Unix socket paths must fit 107 bytes). Removed by :meth:`stop` when made here.
    ray_bin : str, optional
        The ``ray`` executable (default: the one beside this Python). Tests pass a stand-in.
    """

    def __init__(
        self,
        num_workers: int = 1,
        cpus_per_node: int = 1,
        base: str | os.PathLike | None = None,
        ray_bin: str | None = None,
    ) -> None:
        if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 0:
            raise ValueError(f"num_workers must be an integer >= 0, got {num_workers!r}")
        self._own_base = base is None
        self.base = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp") if base is None else base)
        self.ray_bin = ray_bin or _ray_bin()
        self.tag = uuid.uuid4().hex
        self.gcs_port = free_port()
        self.nodes = [RayNode("head", True, cpus_per_node, self.base / "h")]
        self.nodes += [RayNode(f"worker{i + 1}" if num_workers > 1 else "worker", False, cpus_per_node, self.base / f"w{i + 1}")
                       for i in range(num_workers)]
        self.family = _RecordingFamily(self.tag)
        self.watchdog: subprocess.Popen | None = None
        self.started = False
        self.stopped = False

    @property
    def address(self) -> str:
        """The cluster's address (``RAY_ADDRESS``): the head's GCS."""
        return f"127.0.0.1:{self.gcs_port}"

    def env(self) -> dict[str, str]:
        """The environment of the ``ray start`` processes: this one's, with the cluster's tag."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
        env[CLUSTER_TAG_VAR] = self.tag
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        return env

    def commands(self) -> list[list[str]]:
        """The ``ray start`` command line of every node, head first."""
        return [node_command(self.ray_bin, node, self.gcs_port) for node in self.nodes]

    def start_node(self, node: RayNode) -> subprocess.Popen:
        """Start one node (``ray start --block`` in a new session, output to ``<temp_dir>.log``)."""
        node.temp_dir.mkdir(parents=True, exist_ok=True)
        node.log_path = node.temp_dir.with_suffix(".log")
        with node.log_path.open("wb") as log_file:
            node.process = subprocess.Popen(
                node_command(self.ray_bin, node, self.gcs_port),
                env=self.env(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session: every process it starts stays in it
            )
        self.family.scan()
        return node.process

    def start(self) -> None:
        """Start the watchdog, then the head, then the workers (without waiting for them)."""
        if self.started:
            raise RuntimeError("this cluster was started already")
        self.started = True
        self.base.mkdir(parents=True, exist_ok=True)
        if Path("/proc").is_dir():
            # stops the tagged processes (and removes the folder) if this process dies first
            command = [sys.executable, "-I", processes.__file__, "--watch", str(os.getpid()), "--tag", self.tag]
            if self._own_base:
                command += ["--remove", str(self.base)]
            self.watchdog = subprocess.Popen(
                command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env={k: v for k, v in os.environ.items() if k != CLUSTER_TAG_VAR}, start_new_session=True,
            )
            self.family = _RecordingFamily(self.tag, exclude=[self.watchdog.pid])
        for node in self.nodes:
            self.start_node(node)
            if node.head and len(self.nodes) > 1:
                time.sleep(1.0)  # the workers join the head's GCS

    def check_alive(self) -> None:
        """Raise RuntimeError naming the node (and its log) whose ``ray start`` exited."""
        for node in self.nodes:
            if node.process is not None and node.process.poll() is not None:
                tail = node.log_path.read_text(errors="replace")[-3000:] if node.log_path and node.log_path.exists() else ""
                raise RuntimeError(f"ray start of node {node.name} exited with code {node.process.returncode}:\n{tail}")

    def pids(self) -> list[int]:
        """The cluster's live processes (the ``ray start`` processes, GCS, raylets, agents, workers)."""
        return sorted(set(self.family.scan()) | self._own())

    def _own(self) -> set[int]:
        return {n.process.pid for n in self.nodes if n.process is not None and n.process.poll() is None}

    def stop(self, grace_s: float = 5.0) -> list[int]:
        """Stop every process of the cluster by PID; return the PIDs that survived.

        SIGTERM to each, SIGKILL to what is left after ``grace_s`` seconds; never ``ray stop``
        (it stops every Ray of this user on the machine). Then the watchdog, and the folder
        when this object made it.
        """
        if self.stopped:
            return []
        self.stopped = True
        survivors = stop_family(self.family, grace_s=grace_s, also=self._own)
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        if self.watchdog is not None and self.watchdog.poll() is None:
            self.watchdog.terminate()
            try:
                self.watchdog.wait(5)
            except subprocess.TimeoutExpired:
                self.watchdog.kill()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)
        return survivors

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------------- the cluster's records


def wait_for_nodes(cluster: LocalRayCluster, timeout: float = 120.0) -> list[dict[str, Any]]:
    """Connect this process to the cluster (``ray.init(address=...)``: no process is started) and
    wait until every node is alive; return ``ray.nodes()``'s alive entries."""
    import ray

    deadline = time.monotonic() + timeout
    while True:
        cluster.check_alive()
        try:
            if not ray.is_initialized():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # Ray's note on accelerator env vars
                    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
            alive = [n for n in ray.nodes() if n.get("Alive")]
            if len(alive) >= len(cluster.nodes):
                return alive
        except (ConnectionError, RuntimeError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the cluster at {cluster.address} did not bring up {len(cluster.nodes)} nodes within {timeout:g} s")
        time.sleep(1.0)


def node_names(cluster: LocalRayCluster, ray_nodes: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Ray's node ID -> our node's name, matched by the node manager port each node was given."""
    by_port = {node.ports["--node-manager-port"]: node.name for node in cluster.nodes}
    return {str(n["NodeID"]): by_port.get(int(n.get("NodeManagerPort", -1)), f"other:{str(n['NodeID'])[:8]}") for n in ray_nodes}


def read_placement() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The cluster's client actors and client tasks, from its GCS (this process must be connected).

    Returns
    -------
    actors : list of dict
        ``actor_id``, ``node_id``, ``pid``, ``job_id``, ``state`` of every ``ClientAppActor``.
    tasks : list of dict
        ``task_id``, ``node_id``, ``name`` of every ``ClientAppActor.run`` task (one client
        message handled) that reached a node (its state updates name the node); [] when the
        GCS kept no task events.
    """
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    actors = [
        {"actor_id": a["ActorID"], "node_id": a["Address"]["NodeID"], "pid": a["Pid"], "job_id": a["JobID"], "state": a["State"]}
        for a in state.actor_table(None).values() if a["ActorClassName"] == CLIENT_ACTOR
    ]
    tasks: dict[str, dict[str, Any]] = {}
    try:
        raw = state._connect_and_get_accessor().get_task_events()
    except Exception:  # noqa: BLE001 - task events are a bonus; the actor table is the record
        raw = []
    for blob in raw:
        event = gcs_pb2.TaskEvents.FromString(blob)
        name = event.task_info.func_or_class_name or event.task_info.name
        if name != CLIENT_TASK:  # not __init__ or terminate: a run() is one client message handled
            continue
        node_id = event.state_updates.node_id.hex() if event.HasField("state_updates") and event.state_updates.node_id else ""
        if not node_id:
            node_id = event.task_info.node_id.hex() if getattr(event.task_info, "node_id", b"") else ""
        key = f"{event.task_id.hex()}:{event.attempt_number}"
        entry = tasks.setdefault(key, {"task_id": key, "node_id": "", "name": name})
        entry["node_id"] = entry["node_id"] or node_id
    return actors, [t for t in tasks.values() if t["node_id"]]


def placement_summary(
    names: Mapping[str, str], actors: Sequence[Mapping[str, Any]], tasks: Sequence[Mapping[str, Any]]
) -> dict[str, dict[str, int]]:
    """Per node name: ``actors`` (client actors placed there) and ``tasks`` (client tasks run there).

    Every node of ``names`` appears, with zeros where nothing ran.
    """
    summary = {name: {"actors": 0, "tasks": 0} for name in names.values()}
    for key, records in (("actors", actors), ("tasks", tasks)):
        for node_id, count in Counter(str(r["node_id"]) for r in records).items():
            name = names.get(node_id, f"other:{node_id[:8]}")
            summary.setdefault(name, {"actors": 0, "tasks": 0})[key] += count
    return summary


def ran_on_every_node(summary: Mapping[str, Mapping[str, int]], nodes: Sequence[str]) -> tuple[bool, str]:
    """Whether clients ran on each of ``nodes``, and on what evidence.

    Client tasks (``ClientAppActor.run``) when the GCS kept task events, else client actors.
    """
    basis = "tasks" if any(summary.get(n, {}).get("tasks", 0) for n in summary) else "actors"
    return all(summary.get(n, {}).get(basis, 0) > 0 for n in nodes), basis


# ---------------------------------------------------------------------------- the simulation


def hydra_command(args: argparse.Namespace, out: Path, extra: Sequence[str] = ()) -> list[str]:
    """``python -m flwr_distreal.main`` with the small digits run (or a sweep) of ``args``."""
    overrides = [
        "dataset=digits", f"dataset.num_devices={args.devices}", f"rounds={args.rounds}",
        f"clients_per_round={args.clients}", f"runtime={args.runtime}", "num_cpus_per_client=1",
        "num_gpus_per_client=0", "torch_threads=1", "device=cpu", "plot=false",
    ]
    if args.sweep:
        return [sys.executable, "-m", "flwr_distreal.main", "-m", *overrides, *args.sweep, *extra,
                f"hydra.sweep.dir={out / 'sweep'}", "hydra.sweep.subdir=${hydra.job.num}"]
    return [sys.executable, "-m", "flwr_distreal.main", *overrides, *extra, f"hydra.run.dir={out / 'run'}"]


def read_rounds(run_dir: Path) -> list[dict[str, str]]:
    """The rows of ``run_dir/metrics.csv`` ([] when absent)."""
    path = run_dir / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def format_rounds(rows: Sequence[Mapping[str, str]]) -> list[str]:
    """One line per round: accuracy, loss, replies, stragglers, round time (from ``wall_time``)."""
    lines, previous = [], 0.0
    for row in rows:
        wall = float(row["wall_time"])
        lines.append(
            f"  round {row['round']}: accuracy {_num(row['accuracy']):.4f}  loss {_num(row['loss']):.4f}  "
            f"replies {row['received']}  stragglers {row['stragglers']}  round time {wall - previous:.1f} s"
        )
        previous = wall
    return lines


def leftovers(cluster: LocalRayCluster) -> list[str]:
    """``pid command`` of every process still belonging to the cluster: found by its family, by
    the tag in its environment, or naming the cluster's folder in its command line."""
    found = set(cluster.family.scan())
    needle, base = cluster.tag.encode(), str(cluster.base).encode()
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if base in (entry / "cmdline").read_bytes() or needle in (entry / "environ").read_bytes():
                found.add(int(entry.name))
        except OSError:
            continue
    lines = []
    for pid in sorted(found):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            lines.append(f"{pid} {command[:120]}")
        except OSError:
            pass
    return lines


def other_ray_processes(exclude: Iterable[int]) -> list[int]:
    """PIDs of Ray's GCS servers and raylets on this machine that are not in ``exclude``
    (another session's Ray: left alone)."""
    skip = set(exclude)
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit() and int(entry.name) not in skip:
            try:
                if (entry / "comm").read_text().strip() in ("gcs_server", "raylet"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return sorted(pids)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(
        prog="ray_cluster.py", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runtime", choices=("flwr-run", "legacy"), default="flwr-run", help="the simulation runtime (default flwr-run)")
    parser.add_argument("--rounds", type=int, default=2, help="federated rounds (default 2)")
    parser.add_argument("--clients", type=int, default=4, help="clients per round (default 4)")
    parser.add_argument("--devices", type=int, default=8, help="digits devices (default 8)")
    parser.add_argument("--workers", type=int, default=1, help="worker nodes beside the head (default 1)")
    parser.add_argument("--cpus-per-node", type=int, default=1, help="--num-cpus of each node (default 1: one client per node)")
    parser.add_argument("--sweep", nargs="+", default=None, metavar="KEY=A,B", help="run a Hydra multirun over these sweeps")
    parser.add_argument("--out", type=Path, default=None, help="folder for the runs' outputs and logs (default: a new temporary one, kept)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before the simulation is stopped (default 900)")
    args = parser.parse_args(argv)
    for key in ("rounds", "clients", "devices", "cpus_per_node"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1 (the point is a second node), got {args.workers}")
    if args.clients > args.devices:
        parser.error(f"--clients ({args.clients}) cannot exceed --devices ({args.devices})")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = _parse(sys.argv[1:] if argv is None else list(argv))
    out = args.out or Path(tempfile.mkdtemp(prefix="ray-cluster-run-"))
    out.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop the cluster on SIGTERM too

    others_before = other_ray_processes(())
    cluster = LocalRayCluster(num_workers=args.workers, cpus_per_node=args.cpus_per_node)
    ok, rc = False, 1
    try:
        for command in cluster.commands():
            print("$", shlex.join(command), flush=True)
        t0 = time.perf_counter()
        cluster.start()
        alive = wait_for_nodes(cluster)
        names = node_names(cluster, alive)
        pids = cluster.pids()
        others_before = [p for p in others_before if p not in pids]
        described = ", ".join(f"{names[str(n['NodeID'])]} {str(n['NodeID'])[:8]}" for n in alive)
        cpus = sum(int(n["Resources"].get("CPU", 0)) for n in alive)
        print(f"cluster up at {cluster.address} in {time.perf_counter() - t0:.1f} s: {len(alive)} nodes ({described}), {cpus} CPUs", flush=True)
        print(f"cluster processes ({len(pids)}): {', '.join(map(str, pids))}", flush=True)

        command = hydra_command(args, out, extra)
        env = dict(os.environ, RAY_ADDRESS=cluster.address)
        print(f"$ RAY_ADDRESS={cluster.address} {shlex.join(command)}", flush=True)
        t0 = time.perf_counter()
        result = subprocess.run(command, cwd=ROOT, env=env, timeout=args.timeout)
        print(f"simulation exited with code {result.returncode} after {time.perf_counter() - t0:.1f} s", flush=True)

        runs = sorted(p for p in (out / "sweep").iterdir() if p.is_dir()) if args.sweep and (out / "sweep").is_dir() else [out / "run"]
        for run_dir in runs:
            rows = read_rounds(run_dir)
            print(f"per-round metrics of {run_dir} ({len(rows)} rounds):")
            print("\n".join(format_rounds(rows)) or "  (no metrics.csv)")

        time.sleep(2.0)  # workers report task events every second
        actors, tasks = read_placement()
        summary = placement_summary(names, actors, tasks)
        every, basis = ran_on_every_node(summary, [n.name for n in cluster.nodes])
        print("where the clients ran (from the cluster's GCS):")
        for name, counts in summary.items():
            print(f"  {name}: {counts['actors']} client actor(s), {counts['tasks']} client message(s) handled (ClientAppActor.run)")
        (out / "placement.json").write_text(json.dumps({"summary": summary, "actors": actors, "tasks": tasks}, indent=1))
        print(f"clients ran on every node ({basis}): {'yes' if every else 'NO'}")
        ok = result.returncode == 0 and every
        rc = 0 if ok else 1
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except ImportError:
            pass
        pids = cluster.pids() if cluster.started else []
        survivors = cluster.stop()
        print(f"stopped {len(pids)} cluster processes by PID; survivors: {survivors or 'none'}")
        time.sleep(0.5)
        left = leftovers(cluster)
        print("processes left of the cluster: " + ("none" if not left else "\n  " + "\n  ".join(left)))
        others_after = set(other_ray_processes(pids))
        touched = set(others_before) & (cluster.family.seen | {n.process.pid for n in cluster.nodes if n.process})
        print(f"other Ray processes on this machine (gcs_server/raylet of other sessions): {len(others_before)} before, "
              f"{len(set(others_before) & others_after)} of them still running after; {len(touched)} of them ever among "
              "the processes this script signals")
        print(f"outputs and logs: {out}")
        if left:
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
