"""Kill a federated run with ``kill -9`` part-way and resume it; compare with an uninterrupted run.

Runs the Hydra runner (``python -m flwr_distreal.main``) three times with the same config:

1. ``interrupted``: killed with SIGKILL as soon as its ``metrics.csv`` holds ``--kill-at`` rounds;
   then the processes it started are counted every second until none is left (the runtime's
   watchdog stops them; they are found as ``scripts/kill_trials.py`` finds them: descendants,
   their sessions, and whatever refers to the run's temporary folder);
2. the same directory with ``resume=true``, to the end;
3. ``uninterrupted``: the whole run in one go.

Then prints whether the two ``metrics.csv`` files agree on every column but ``wall_time``.

    python scripts/kill_and_resume.py --out results/kill_resume -- dataset=femnist_leaf \\
        clients_per_round=35 rounds=40 resources.lam=2
"""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kill_trials import RunProcesses  # noqa: E402


def _rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _runner(overrides: list[str], out: Path, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "flwr_distreal.main", *overrides, f"output_dir={out}", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/kill_resume")
    parser.add_argument("--kill-at", type=int, default=17)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    interrupted, uninterrupted = out / "interrupted", out / "uninterrupted"
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="kr", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, TMPDIR=str(tmp))  # the runner's SuperLink and Ray live under here

    print(f"1. interrupted run, kill -9 once {args.kill_at} rounds are recorded", flush=True)
    proc = subprocess.Popen(_runner(args.overrides, interrupted, []), cwd=REPO, env=env, stdout=subprocess.DEVNULL)
    run = RunProcesses(proc.pid, str(tmp))
    while len(_rows(interrupted / "metrics.csv")) < args.kill_at:
        if proc.poll() is not None:
            sys.exit(f"the run ended (exit {proc.returncode}) before round {args.kill_at}")
        run.alive()
        time.sleep(0.2)
    run.alive()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(_rows(interrupted / "metrics.csv"))
    start = time.monotonic()
    alive = [len(run.alive())]
    while alive[-1] and time.monotonic() - start < 60:
        time.sleep(1)
        alive.append(len(run.alive()))
    print(
        f"   killed after {killed_at} recorded rounds; processes of the run left each second after: {alive}",
        flush=True,
    )

    print("2. resume=true into the same directory", flush=True)
    subprocess.run(_runner(args.overrides, interrupted, ["resume=true"]), cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    print("3. uninterrupted run", flush=True)
    subprocess.run(_runner(args.overrides, uninterrupted, []), cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)

    a, b = _rows(interrupted / "metrics.csv"), _rows(uninterrupted / "metrics.csv")
    columns = [c for c in (a[0].keys() if a else []) if c != "wall_time"]
    same = len(a) == len(b) and all(ra[c] == rb[c] for ra, rb in zip(a, b) for c in columns)
    diffs = [(ra["round"], c) for ra, rb in zip(a, b) for c in columns if ra[c] != rb[c]]
    print(f"rounds: interrupted+resumed {len(a)}, uninterrupted {len(b)}")
    print(f"metrics.csv identical in every column but wall_time ({', '.join(columns)}): {same}")
    if diffs:
        print(f"first differences (round, column): {diffs[:10]}")


if __name__ == "__main__":
    main()
