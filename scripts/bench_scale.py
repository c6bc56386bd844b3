"""What a federation's size costs: first round, steady rounds and peak memory from 105 to 10,000 devices.

One run of ``python -m flwr_distreal.main`` per (devices, runtime), each in its own process tree,
on FEMNIST-shaped synthetic devices (``dataset=synthetic``: 62 classes, 1x28x28 images; by default
20 samples per device, so that a round's training is cheap and what grows with the number of
devices shows), the FEMNIST CNN, DISTREAL with time-varying resources, 35 devices per round, a few
rounds (1 first + the rest steady). For every run it records

* the first round's time and the median of the later rounds' times (``metrics.csv``'s
  ``wall_time``, which starts when the ServerApp has its experiment and its nodes: start-up is
  reported on its own as ``setup_s``, the process's wall time minus the rounds);
* the peak memory of the whole process tree, sampled every ``--sample-s`` seconds: the runner,
  the local SuperLink, the ServerApp/simulation process and Ray's processes (found as
  :class:`flwr_distreal.run.processes.ProcessFamily` finds them: children, their sessions, a
  tag in the environment). ``rss`` sums the resident sets (shared pages counted once per
  process: an upper bound), ``pss`` sums the proportional set sizes (shared pages split: what the
  tree costs the machine);

then prints one table with the ratios to the smallest run of the same runtime side by side, and
the machine's load average (the machine may be shared: timings are only comparable within one
invocation). Example::

    .venv/bin/python scripts/bench_scale.py --devices 105,1000,3550,10000 --runtimes flwr-run,inprocess

``--repo DIR`` runs another checkout's code (``PYTHONPATH=DIR``, working directory DIR): how the
"before" column of the README's table was measured, from a ``git archive`` of the older commit.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flwr_distreal.run.processes import TAG_VAR, ProcessFamily  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) when it is gone or unreadable."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return 0, 0
    pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pss = rss
    return rss, pss


def _name(pid: int) -> str:
    """A short name of a process: its title (Ray's processes set one) or its program and module."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in args if a]
    if not words:
        return "?"
    if words[0].startswith("ray::") or len(words) == 1:
        return words[0].split()[0][:40]
    program = Path(words[0]).name
    module = next((words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m"), "")
    script = next((Path(w).name for w in words[1:] if not w.startswith("-")), "")
    return f"{program} {module or script}"[:60]


def run_one(devices: int, runtime: str, args: argparse.Namespace, out: Path) -> dict:
    """One run: its round times and the peak memory of its process tree."""
    run_dir = out / f"{runtime}_{devices}"
    if run_dir.exists():  # this script's own folder from an earlier invocation: the runner would refuse it
        print(f"removing {run_dir} (an earlier benchmark's run)", file=sys.stderr)
        shutil.rmtree(run_dir)
    repo = Path(args.repo).resolve() if args.repo else ROOT
    command = [
        args.python, "-m", "flwr_distreal.main",
        "dataset=synthetic", f"dataset.num_devices={devices}",
        f"rounds={args.rounds}", f"clients_per_round={args.clients}", f"seed={args.seed}",
        f"runtime={runtime}", f"output_dir={run_dir}", f"hydra.run.dir={run_dir}/hydra",
        *([f"dataset.samples_per_device={args.samples}"] if args.samples else []),
        *args.override,
    ]
    tag = uuid.uuid4().hex
    env = dict(os.environ, **{TAG_VAR: tag})
    if args.repo:
        env["PYTHONPATH"] = str(repo)
    family = ProcessFamily(tag)
    peak_rss = peak_pss = peak_procs = 0
    breakdown: dict[str, int] = {}
    start = time.perf_counter()
    with open(out / f"{runtime}_{devices}.log", "w") as log:
        proc = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        timed_out = False
        while proc.poll() is None:
            members = set(family.scan()) | {proc.pid}
            rss = pss = 0
            each = {}
            for pid in members:
                r, p = _memory(pid)
                rss, pss = rss + r, pss + p
                each[pid] = p
            if pss > peak_pss:  # what the peak is made of: PSS by process name
                breakdown = {}
                for pid, p in each.items():
                    breakdown[_name(pid)] = breakdown.get(_name(pid), 0) + p
            peak_rss, peak_pss, peak_procs = max(peak_rss, rss), max(peak_pss, pss), max(peak_procs, len(members))
            if time.perf_counter() - start > args.timeout:
                timed_out = True
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                break
            time.sleep(args.sample_s)
    total = time.perf_counter() - start
    row = {
        "devices": devices, "runtime": runtime, "rc": proc.returncode, "timed_out": timed_out, "total_s": round(total, 2),
        "peak_rss_mb": round(peak_rss / 2**20), "peak_pss_mb": round(peak_pss / 2**20), "peak_procs": peak_procs,
        "peak_pss_by_process_mb": {k: round(v / 2**20) for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1])},
    }
    metrics = run_dir / "metrics.csv"
    if metrics.is_file():
        with open(metrics) as f:
            wall = [float(r["wall_time"]) for r in csv.DictReader(f)]
        if wall:
            times = [wall[0]] + [b - a for a, b in zip(wall, wall[1:])]
            row.update(
                rounds_done=len(wall), first_s=round(times[0], 3),
                steady_s=round(statistics.median(times[1:]), 3) if len(times) > 1 else None,
                setup_s=round(total - wall[-1], 2), round_s=[round(t, 3) for t in times],
            )
    return row


def ratio(value, base) -> str:
    return f"{value / base:.2f}x" if isinstance(value, (int, float)) and isinstance(base, (int, float)) and base else "-"


def table(rows: list[dict]) -> str:
    head = (
        f"{'runtime':<10} {'devices':>7} | {'first s':>8} {'steady s':>9} {'first/steady':>12} {'setup s':>8} "
        f"{'peak PSS MB':>11} {'peak RSS MB':>11} | {'first':>7} {'steady':>7} {'PSS':>7}  (ratios to the smallest run)"
    )
    lines = [head, "-" * len(head)]
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        mine = [r for r in rows if r["runtime"] == runtime]
        base = mine[0]
        for r in mine:
            fail = "" if r["rc"] == 0 else (" (timed out)" if r["timed_out"] else f" (rc {r['rc']})")
            lines.append(
                f"{runtime:<10} {r['devices']:>7} | {r.get('first_s', '-')!s:>8} {r.get('steady_s', '-')!s:>9} "
                f"{ratio(r.get('first_s'), r.get('steady_s')):>12} {r.get('setup_s', '-')!s:>8} "
                f"{r['peak_pss_mb']:>11} {r['peak_rss_mb']:>11} | {ratio(r.get('first_s'), base.get('first_s')):>7} "
                f"{ratio(r.get('steady_s'), base.get('steady_s')):>7} {ratio(r['peak_pss_mb'], base['peak_pss_mb']):>7}{fail}"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="105,1000,3550,10000", help="comma-separated device counts")
    parser.add_argument("--runtimes", default="flwr-run,inprocess", help="comma-separated runtimes")
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (1 first + the rest steady)")
    parser.add_argument("--clients", type=int, default=35, help="devices per round")
    parser.add_argument("--samples", type=int, default=20, help="samples per device (0: FEMNIST's 181 +- 70.7)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds before a run is stopped")
    parser.add_argument("--sample-s", type=float, default=0.5, help="memory sampling period")
    parser.add_argument("--out", default="/tmp/bench_scale", help="folder for the runs' outputs and logs")
    parser.add_argument("--repo", default="", help="run another checkout's code (PYTHONPATH and cwd)")
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("override", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    load_start = os.getloadavg()
    for runtime in args.runtimes.split(","):
        for devices in (int(d) for d in args.devices.split(",")):
            row = run_one(devices, runtime, args, out)
            row["load_avg_1m"] = round(os.getloadavg()[0], 2)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "bench_scale.json").write_text(json.dumps(rows, indent=1))
    print()
    print(f"{args.rounds} rounds, {args.clients} devices per round, "
          f"{args.samples or 'FEMNIST-like'} samples per device; repo {args.repo or ROOT}")
    print(table(rows))
    print(f"load average (1, 5, 15 min) at start {load_start}, at end {os.getloadavg()} on {os.cpu_count()} CPUs")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
