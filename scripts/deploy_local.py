#!/usr/bin/env python
"""Run DISTREAL on Flower's deployment runtime on this machine: a real SuperLink, N real
SuperNodes (each with its own partition of the data), ``flwr run``; then print per-round
accuracy, wall time per round and stragglers from the run's metrics.csv.

Every process it starts is stopped by PID at the end (also on Ctrl-C), and it says whether any
survived. Everything goes to 127.0.0.1.

Examples::

    python scripts/deploy_local.py --supernodes 3 --tls --auth --rounds 3 -- "resources='measured' deadline=10.0"
    python scripts/deploy_local.py --supernodes 2 --keep   # keep the folder (logs, certs, keys, metrics)
    python scripts/deploy_local.py --supernodes 3 --rounds 4 --kill-at-round 2 -- "resources='measured' deadline=10.0"

``--kill-at-round R`` is the node-loss test: once the ServerApp starts round R, one SuperNode
(``--kill-node``, default the last) is killed with SIGKILL, its process alone, as a crash would;
the script then says when that SuperNode's other processes (its ``flower-superexec`` and
``flwr-clientapp``, stopped by the deployment's per-node watchdog) were gone, how the run ended
and which processes were left. With the default ``min-nodes`` (all SuperNodes) the run must go
on with the others after ``node-wait`` seconds, not hang.

Text after ``--`` is more ``--run-config`` (TOML ``key=value`` pairs of ``[tool.flwr.app.config]``);
``deployment=true``, ``rounds``, ``min-nodes`` and ``output-dir`` are set by this script unless
given there.
"""

from __future__ import annotations

import argparse
import csv
import shlex
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr_distreal.run.deploy import DeploymentError, LocalDeployment, TlsFiles  # noqa: E402
from flwr_distreal.run.local_runtime import FlwrRunError, format_run_config  # noqa: E402


def _num(cell: object) -> float:
    """A metrics.csv cell as a number; an empty cell (a round not evaluated: evaluate_every) is nan."""
    return float(cell) if cell not in (None, "") else float("nan")


def _parse(argv: list[str]) -> tuple[argparse.Namespace, str]:
    extra = ""
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], " ".join(argv[cut + 1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--supernodes", type=int, default=2, help="SuperNodes to start (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds (default 3)")
    parser.add_argument("--tls", action="store_true", help="TLS with a throw-away CA and server certificate")
    parser.add_argument(
        "--certs", type=Path, default=None, metavar="DIR",
        help="with --tls: use DIR/ca.crt, DIR/server.pem, DIR/server.key (made as in the README's Deploy section; the "
        "server certificate must name 127.0.0.1) instead of a throw-away CA",
    )
    parser.add_argument("--auth", action="store_true", help="SuperNode authentication (needs --tls)")
    parser.add_argument(
        "--node-config", action="append", default=None, metavar="TEXT",
        help="a SuperNode's --node-config (repeat once per SuperNode; default: partition-id=i num-partitions=N)",
    )
    parser.add_argument("--out", type=Path, default=None, help="output-dir of the run (default: in the work folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, certificates, keys)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before the run is stopped (default 1800)")
    parser.add_argument("--print-logs", action="store_true", help="print the streamed run log at the end")
    parser.add_argument(
        "--kill-at-round", type=int, default=None, metavar="R",
        help="kill -9 one SuperNode (its process only) once the ServerApp starts round R",
    )
    parser.add_argument(
        "--kill-node", type=int, default=-1, metavar="I",
        help="with --kill-at-round: index of the SuperNode to kill (default -1: the last)",
    )
    args = parser.parse_args(argv)
    if args.kill_at_round is not None and not 1 <= args.kill_at_round <= args.rounds:
        parser.error(f"--kill-at-round must be in 1..{args.rounds} (--rounds), got {args.kill_at_round}")
    if args.kill_at_round is not None and not -args.supernodes <= args.kill_node < args.supernodes:
        parser.error(f"--kill-node must index one of the {args.supernodes} SuperNodes, got {args.kill_node}")
    if args.auth and not args.tls:
        parser.error("--auth needs --tls (Flower refuses SuperNode authentication without TLS)")
    if args.certs is not None and not args.tls:
        parser.error("--certs needs --tls")
    if args.node_config is not None and len(args.node_config) != args.supernodes:
        parser.error(f"{len(args.node_config)} --node-config for {args.supernodes} SuperNodes")
    return args, extra


def _run_config(args: argparse.Namespace, extra: str, out: Path) -> str:
    given = {item.split("=", 1)[0].strip() for item in shlex.split(extra) if "=" in item}
    ours = {"deployment": True, "rounds": args.rounds, "min-nodes": args.supernodes, "output-dir": str(out)}
    ours = {k: v for k, v in ours.items() if k not in given}
    return " ".join(x for x in (format_run_config(ours), extra.strip()) if x)


def _table(metrics: Path) -> str:
    with metrics.open() as fh:
        rows = list(csv.DictReader(fh))
    lines = [f"{'round':>5} {'accuracy':>9} {'loss':>8} {'received':>8} {'stragglers':>10} {'failures':>8} {'round s':>8} {'wall s':>8}"]
    before = 0.0
    for row in rows:
        wall = float(row["wall_time"])
        lines.append(
            f"{int(row['round']):>5} {_num(row['accuracy']):>9.4f} {_num(row['loss']):>8.4f} {int(row['received']):>8} "
            f"{int(row['stragglers']):>10} {int(row['failures']):>8} {wall - before:>8.1f} {wall:>8.1f}"
        )
        before = wall
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, extra = _parse(sys.argv[1:] if argv is None else argv)
    tls: bool | TlsFiles = args.tls
    if args.certs is not None:
        tls = TlsFiles(args.certs / "ca.crt", args.certs / "server.pem", args.certs / "server.key")
        missing = [str(p) for p in (tls.ca_cert, tls.server_cert, tls.server_key) if not p.is_file()]
        if missing:
            print(f"missing certificate files: {missing}", file=sys.stderr)
            return 2
    dep = LocalDeployment(
        args.supernodes, tls=tls, auth=args.auth, node_configs=args.node_config, keep_root=args.keep
    )
    out = (args.out or dep.root / "out").resolve()
    run_config = _run_config(args, extra, out)
    # Ctrl-C or SIGTERM: stop every process we started before leaving
    signal.signal(signal.SIGTERM, _interrupt)
    mode = "TLS + SuperNode authentication" if args.auth else "TLS" if args.tls else "insecure"
    print(f"work folder {dep.root}; SuperLink on {dep.address} ({mode})", flush=True)
    status = 1
    try:
        t0 = time.monotonic()
        dep.start()
        nodes = ", ".join(f"{n.name}={n.connected_id()}" for n in dep.supernodes)
        print(f"{len(dep.supernodes)} SuperNodes connected in {time.monotonic() - t0:.1f} s: {nodes}", flush=True)
        print(f"flwr run {dep.app_dir} deployment --stream --run-config {shlex.quote(run_config)}", flush=True)
        t1 = time.monotonic()
        killer = _Killer(dep, args.kill_at_round, args.kill_node, out) if args.kill_at_round is not None else None
        log_path = dep.logs / "run.log"
        result = dep.run(
            run_config, timeout=args.timeout, log_path=log_path,
            on_poll=(lambda: killer.poll(log_path)) if killer is not None else None,
        )
        print(f"run {result.run_id}: {result.status} in {time.monotonic() - t1:.1f} s (details: {result.details})")
        if killer is not None:
            print(killer.report())
            print(f"the ServerApp's log on nodes and failures:\n{_node_lines(log_path)}")
        if args.print_logs and result.log_path is not None:
            print(result.log_path.read_text(errors="replace"))
        metrics = out / "metrics.csv"
        if metrics.is_file():
            print(f"\n{metrics}\n{_table(metrics)}")
        else:
            print(f"no {metrics}; the run log's end:\n{_tail(result.log_path)}")
        status = 0 if result.ok else 1
    except (DeploymentError, FlwrRunError) as err:
        print(f"failed: {err}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted; stopping", file=sys.stderr)
        status = 130
    finally:
        survivors = dep.stop()
        print(f"stopped every process by PID; survivors: {survivors or 'none'}")
        if args.keep:
            print(f"kept {dep.root}")
    return status if not survivors else 2


class _Killer:
    """Kills one SuperNode with SIGKILL once the ServerApp starts round ``at_round``, then
    watches that SuperNode's processes until they are gone."""

    def __init__(self, dep: LocalDeployment, at_round: int, index: int, out: Path) -> None:
        self.dep, self.at_round, self.index, self.out = dep, at_round, index, out
        self.killed_at: float | None = None
        self.killed: list[int] = []
        self.gone_after: float | None = None
        self.name = ""

    def _round_started(self, log_path: Path) -> bool:
        try:
            text = log_path.read_text(errors="replace")
        except OSError:
            text = ""
        if f"[ROUND {self.at_round}/" in text:
            return True
        metrics = self.out / "metrics.csv"  # round R-1 recorded: round R starts now
        try:
            rows = metrics.read_text(errors="replace").strip().splitlines()[1:]
        except OSError:
            rows = []
        return self.at_round > 1 and len(rows) >= self.at_round - 1

    def poll(self, log_path: Path) -> None:
        if self.killed_at is None:
            if self._round_started(log_path):
                node = self.dep.supernodes[self.index]
                self.name = f"{node.name} (node id {node.connected_id()})"
                before = _describe([node.process.pid, *sorted(p for p in node.pids() if p != node.process.pid)])
                self.killed = self.dep.kill_supernode(node)
                self.killed_at = time.monotonic()
                print(f"round {self.at_round} started: kill -9 {self.killed[0]} = {self.name}; its processes: "
                      f"{before}", flush=True)
        elif self.gone_after is None and not [p for p in self.killed if _alive(p)]:
            self.gone_after = time.monotonic() - self.killed_at
            print(f"every process of {self.name} gone {self.gone_after:.1f} s after the kill", flush=True)

    def report(self) -> str:
        if self.killed_at is None:
            return f"round {self.at_round} never started: no SuperNode was killed"
        left = [p for p in self.killed if _alive(p)]
        gone = f"all gone {self.gone_after:.1f} s after the kill" if self.gone_after is not None else f"still alive: {left}"
        return f"killed {self.name}: its {len(self.killed)} processes {self.killed}: {gone}"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _describe(pids: list[int]) -> str:
    names = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            exe = Path(argv[0].decode()).name
            if exe.startswith("python") and len(argv) > 1:
                exe = Path(argv[1].decode()).name
        except (OSError, IndexError):
            exe = "?"
        names.append(f"{pid} {exe}")
    return ", ".join(names)


def _node_lines(path: Path, most: int = 30) -> str:
    """The run log's lines on waiting for nodes, failures and the run's end."""
    keys = ("Waiting for nodes", "node_wait", "replied with an error", "sent no reply", "error repl", "[ROUND",
            "Sampled", "NodeWaitError", "Run finished", "summary")
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join([line for line in lines if any(k in line for k in keys)][-most:])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _tail(path: Path | None, lines: int = 20) -> str:
    if path is None or not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


if __name__ == "__main__":
    sys.exit(main())
