"""Kill the runner with ``kill -9`` again and again; count the processes it leaves behind.

Each trial starts the Hydra runner (``python -m flwr_distreal.main``, default runtime
``flwr run`` with Ray) in a fresh short ``TMPDIR``, waits until round 1 is recorded in
``metrics.csv`` (``--when round1``) or until Ray's raylet runs (``--when ray``), sends SIGKILL to
the runner and then looks every ``--poll`` seconds, for up to ``--limit`` seconds, for processes
of the run that are still alive. It prints one line per trial and a final table: seconds until no
process was left, and the processes left after ``--limit`` seconds.

A process counts as the run's when it is (independently of the runtime's own bookkeeping)

* a descendant of the runner, seen at any poll before or after the kill (PID and start time),
  or a child of such a process;
* a member of a session started by such a process (Flower's SuperExec starts one; Ray's
  processes live in it);
* or any process whose command line, working folder or open files refer to the trial's
  ``TMPDIR`` (Ray's session folder is there: this finds a Ray process that escaped both).

The runtime's watchdog is a descendant too: it has to be gone as well. Processes still alive
after ``--limit`` seconds are reported, given another 60 s, then killed by PID so the next trial
starts clean.

    python scripts/kill_trials.py --trials 10 -- rounds=3
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Proc:
    """One process: PID, parent, session, start time (clock ticks after boot), zombie or not."""

    pid: int
    ppid: int
    sid: int
    start: int
    zombie: bool


def processes() -> dict[int, Proc]:
    """Every process on the machine, from ``/proc/PID/stat``."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = text.rsplit(")", 1)[1].split()
        found[int(entry)] = Proc(int(entry), int(fields[1]), int(fields[3]), int(fields[19]), fields[0] in "ZX")
    return found


def describe(pid: int) -> str:
    """``pid state comm args`` (the process title: Ray's agents rename themselves)."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        comm, state = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return f"{pid} (gone)"
    return f"{pid} {state} {comm}: {args[:70]}"


def refers_to(pid: int, folder: str) -> bool:
    """Whether the process's command line, working folder or an open file is under ``folder``."""
    try:
        if folder.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
            return True
        if os.readlink(f"/proc/{pid}/cwd").startswith(folder):
            return True
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(folder):
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


@dataclass
class RunProcesses:
    """The processes of one run, as seen so far (PID -> start time) and the sessions they started."""

    runner: int
    folder: str
    seen: dict[int, int] = field(default_factory=dict)
    sessions: dict[int, int] = field(default_factory=dict)

    def alive(self) -> list[int]:
        """Update what was seen with the current process table; return the live ones."""
        procs = processes()
        me = os.getpid()
        members = {pid for pid, start in self.seen.items() if pid in procs and procs[pid].start == start}
        if self.runner in procs:
            members.add(self.runner)
        members |= {pid for pid in procs if pid not in members and pid != me and refers_to(pid, self.folder)}
        while True:
            self.sessions.update({p: procs[p].start for p in members if procs[p].sid == p and p not in self.sessions})
            grown = {
                pid for pid, st in procs.items()
                if pid not in members and pid != me
                and (st.ppid in members or (st.sid in self.sessions and st.start >= self.sessions[st.sid]))
            }
            if not grown:
                break
            members |= grown
        self.seen.update({pid: procs[pid].start for pid in members})
        return sorted(pid for pid in members if not procs[pid].zombie)


def metrics_rows(out: Path) -> int:
    path = out / "metrics.csv"
    if not path.is_file():
        return 0
    try:
        with path.open(newline="") as f:
            return len(list(csv.DictReader(f)))
    except (OSError, UnicodeDecodeError, csv.Error):
        return 0


def has_raylet(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "raylet":
                return True
        except OSError:
            continue
    return False


@dataclass
class Trial:
    number: int
    killed_after_s: float
    rounds_at_kill: int
    processes_at_kill: int
    clean_after_s: float | None
    left: list[str]
    folder_removed: bool
    error: str = ""
    counts: list[int] = field(default_factory=list)  # processes left at each poll after the kill
    last: list[str] = field(default_factory=list)  # the last ones to go


def one_trial(number: int, overrides: list[str], when: str, limit: float, poll: float, startup: float) -> Trial:
    tmp = tempfile.mkdtemp(prefix=f"kt{number}-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    out = Path(tmp) / "out"
    env = dict(os.environ, TMPDIR=tmp)
    command = [sys.executable, "-m", "flwr_distreal.main", *overrides, f"output_dir={out}"]
    began = time.monotonic()
    runner = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = RunProcesses(runner.pid, tmp)
    try:
        while True:
            pids = run.alive()
            if runner.poll() is not None:
                return Trial(number, time.monotonic() - began, metrics_rows(out), 0, None, [], False,
                             f"the runner ended (exit {runner.returncode}) before the kill")
            if (when == "round1" and metrics_rows(out) >= 1) or (when == "ray" and has_raylet(pids)):
                break
            if time.monotonic() - began > startup:
                os.kill(runner.pid, signal.SIGKILL)
                runner.wait()
                return Trial(number, time.monotonic() - began, metrics_rows(out), len(pids), None, [], False,
                             f"no {when} within {startup:g} s")
            time.sleep(poll)
        at_kill = run.alive()
        killed_after = time.monotonic() - began
        rows = metrics_rows(out)
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait()
        killed = time.monotonic()
        clean_after = None
        left = run.alive()
        counts, last = [len(left)], [describe(pid) for pid in left]
        while time.monotonic() - killed < limit:
            if not left:
                clean_after = time.monotonic() - killed
                break
            time.sleep(poll)
            left = run.alive()
            counts.append(len(left))
            last = [describe(pid) for pid in left] or last
        if clean_after is None and not left:
            clean_after = time.monotonic() - killed
        names = [describe(pid) for pid in left]
        if left:  # give them a minute on their own, then clear them for the next trial
            end = time.monotonic() + 60
            while (rest := run.alive()) and time.monotonic() < end:
                time.sleep(1)
            for pid in rest:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        runtime_folders = [p for p in Path(tmp).glob("fdr-*")]
        return Trial(number, killed_after, rows, len(at_kill), clean_after, names, not runtime_folders,
                     counts=counts, last=last)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--when", choices=["round1", "ray"], default="round1",
                        help="kill once round 1 is in metrics.csv, or once Ray's raylet runs")
    parser.add_argument("--limit", type=float, default=10.0,
                        help="seconds after the kill by which the run must be gone")
    parser.add_argument("--poll", type=float, default=0.5)
    parser.add_argument("--startup", type=float, default=300.0, help="seconds to wait for the kill condition")
    parser.add_argument("overrides", nargs="*", default=["rounds=3"])
    args = parser.parse_args()
    if not Path("/proc").is_dir():
        sys.exit("kill_trials.py reads /proc (Linux)")
    if args.trials < 1 or args.limit <= 0 or args.poll <= 0:
        sys.exit("--trials must be >= 1, --limit and --poll > 0")
    overrides = args.overrides or ["rounds=3"]
    print(f"runner: python -m flwr_distreal.main {' '.join(overrides)}; kill -9 at {args.when}; "
          f"limit {args.limit:g} s, polled every {args.poll:g} s", flush=True)
    trials = []
    for number in range(1, args.trials + 1):
        trial = one_trial(number, overrides, args.when, args.limit, args.poll, args.startup)
        trials.append(trial)
        clean = f"{trial.clean_after_s:.1f}" if trial.clean_after_s is not None else f"> {args.limit:g}"
        print(f"trial {number}: killed at {trial.killed_after_s:.1f} s ({trial.rounds_at_kill} rounds recorded, "
              f"{trial.processes_at_kill} processes), clean after {clean} s, left {len(trial.left)} "
              f"{trial.left if trial.left else ''} {trial.error}", flush=True)
        if trial.counts:
            print(f"   processes left at each poll after the kill: {trial.counts}; the last to go: {trial.last}",
                  flush=True)
    print()
    print(f"| trial | killed at (s) | rounds recorded | processes at kill | clean after (s) | "
          f"left after {args.limit:g} s | runtime folder removed |")
    print("|---|---|---|---|---|---|---|")
    for t in trials:
        clean = f"{t.clean_after_s:.1f}" if t.clean_after_s is not None else f"not within {args.limit:g}"
        left = "; ".join(t.left) if t.left else "none"
        print(f"| {t.number} | {t.killed_after_s:.1f} | {t.rounds_at_kill} | {t.processes_at_kill} | {clean} | "
              f"{left if not t.error else t.error} | {'yes' if t.folder_removed else 'no'} |")
    ok = [t for t in trials if not t.error and t.clean_after_s is not None and t.clean_after_s <= args.limit]
    print(f"\n{len(ok)} of {len(trials)} trials clean within {args.limit:g} s")
    sys.exit(0 if len(ok) == len(trials) else 1)


if __name__ == "__main__":
    main()
