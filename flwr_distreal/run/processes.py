"""Find and stop the processes of one run, and the watchdog that does it when their owner dies.

Standard library only, on purpose: the watchdog (:func:`start_watchdog`) runs this file as a
script (``python -I .../processes.py --watch PID --tag TAG``), so it never imports the package
(torch, Flower) and costs a bare interpreter's memory for as long as the run lasts. The runtimes
(:mod:`flwr_distreal.run.local_runtime`, the legacy runtime's :class:`ProcessGuard`) use it.

A tag in the environment alone does not find every process: Ray's ``ray::DashboardAgent`` and
``ray::RuntimeEnvAgent`` set their process title over the memory that ``/proc/PID/environ``
shows (it reads as zeros), and once the raylet is gone they are reparented. :class:`ProcessFamily`
therefore also follows children (parent PIDs), members of the sessions that a process of the run
created (Flower's SuperExec starts one, Ray's processes live in it) and every process it has seen
before (PID and start time), so it finds what the run started and nothing else. Finding them
reads ``/proc`` (Linux).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "TAG_VAR",
    "WATCHDOG_LOG_VAR",
    "ProcessFamily",
    "start_watchdog",
    "stop_family",
    "tagged_pids",
    "watch",
]

#: Environment variable that marks every process of one runtime.
TAG_VAR = "FLWR_DISTREAL_RUNTIME_TAG"
#: Environment variable naming a file where watchdogs append what they stopped (debugging).
WATCHDOG_LOG_VAR = "FLWR_DISTREAL_WATCHDOG_LOG"

log = logging.getLogger(__name__)


def tagged_pids(tag: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries ``tag`` (Linux ``/proc``).

    Misses a process that wrote its title over its environment (Ray's agents) or dropped the
    tag: :class:`ProcessFamily` finds those too.
    """
    pids = []
    proc = Path("/proc")
    if not proc.is_dir():
        return pids
    needle = tag.encode()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes():
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if state != "Z":
            pids.append(int(entry.name))
    return pids


@dataclass(frozen=True)
class _Stat:
    """What ``/proc/PID/stat`` says about one process."""

    ppid: int
    sid: int
    start: int  # clock ticks after boot: with the PID, names one process even after PID reuse
    zombie: bool


def _read_stat(pid: int) -> _Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session ...
    try:
        return _Stat(ppid=int(fields[1]), sid=int(fields[3]), start=int(fields[19]), zombie=fields[0] in "ZX")
    except (IndexError, ValueError):
        return None


def _all_stats() -> dict[int, _Stat]:
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _read_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = stat
    return stats


def _carries(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return False


class ProcessFamily:
    """The live processes of one runtime, found again and again as they come and go (Linux).

    A process belongs to the family when

    * its environment carries ``tag`` (:func:`tagged_pids`), or
    * it was found before (same PID and start time, so a reused PID is not mistaken for it), or
    * its parent belongs, or
    * it is in a session whose leader belonged when first seen (a session's ID is not reused
      while the session has members, and a process cannot join a session it was not born in;
      Flower's SuperExec starts a session and Ray's processes, agents included, stay in it).

    Nothing else is ever included: not the processes that started the runtime (they do not
    carry the tag in ``/proc``), nor another run's Ray on the same machine.

    Parameters
    ----------
    tag : str
        The runtime's tag (the value of :data:`TAG_VAR` in its processes' environment).
    exclude : iterable of int
        PIDs never included (the caller, its watchdog).
    """

    def __init__(self, tag: str, exclude: tuple[int, ...] | list[int] = ()) -> None:
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tag must be a non-empty string, got {tag!r}")
        self.tag = tag
        self._needle = tag.encode()
        self._exclude = {os.getpid(), *exclude}
        self._known: dict[int, int] = {}  # pid -> start time
        self._sessions: dict[int, int] = {}  # session id -> its leader's start time

    def scan(self) -> list[int]:
        """PIDs of the family's live (non-zombie) processes, remembering them for later scans."""
        if not Path("/proc").is_dir():
            return []
        stats = _all_stats()
        members = {pid for pid, start in self._known.items() if pid in stats and stats[pid].start == start}
        members |= {pid for pid in stats if pid not in members and _carries(pid, self._needle)}
        members -= self._exclude
        while True:
            for pid in members:
                if stats[pid].sid == pid:
                    self._sessions.setdefault(pid, stats[pid].start)
            grown = {
                pid for pid, st in stats.items()
                if pid not in members and pid not in self._exclude and (
                    st.ppid in members
                    # in one of our sessions, and not older than its leader (a reused session ID)
                    or (st.sid in self._sessions and st.start >= self._sessions[st.sid])
                )
            }
            if not grown:
                break
            members |= grown
        self._known.update({pid: stats[pid].start for pid in members})
        return sorted(pid for pid in members if not stats[pid].zombie)


def stop_family(
    family: ProcessFamily,
    grace_s: float = 3.0,
    kill_s: float = 5.0,
    poll_s: float = 0.2,
    also: Callable[[], set[int]] = set,
) -> list[int]:
    """Stop every process of ``family``: SIGTERM, SIGKILL after ``grace_s``; return survivors.

    Rescans every ``poll_s`` seconds, so a process that appears meanwhile (a worker a dying
    parent started) is signalled too; after ``grace_s`` seconds what is left gets SIGKILL,
    again at every poll for up to ``kill_s`` more seconds. ``also`` adds PIDs to signal
    (the caller's own children, found by ``Popen``).
    """
    termed: set[int] = set()
    deadline = time.monotonic() + grace_s
    while (left := set(family.scan()) | also()) and time.monotonic() < deadline:
        if left - termed:
            log.info("SIGTERM to %s", _describe(left - termed))
        _signal(left - termed, signal.SIGTERM)
        termed |= left
        time.sleep(poll_s)
    deadline = time.monotonic() + kill_s
    while left and time.monotonic() < deadline:
        log.info("SIGKILL to %s", _describe(left))
        _signal(left, signal.SIGKILL)
        time.sleep(poll_s)
        left = set(family.scan()) | also()
    if left:
        log.warning("still alive: %s", _describe(left))
    return sorted(left)


def _describe(pids: set[int] | list[int]) -> str:
    """``pid name`` of each process (the name as ``ps`` shows it), for the log."""
    names = []
    for pid in sorted(pids):
        try:
            names.append(f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}")
        except OSError:
            names.append(f"{pid} (gone)")
    return ", ".join(names)


def _signal(pids: set[int] | list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def start_watchdog(owner: int, tag: str, remove: Path | None = None) -> subprocess.Popen | None:
    """A process that stops the tagged processes once ``owner`` is gone, then removes the folder
    ``remove`` (None without /proc)."""
    if not Path("/proc").is_dir():
        return None
    env = {k: v for k, v in os.environ.items() if k != TAG_VAR}
    # run as a script in isolated mode (-I): the watchdog imports the standard library only, not
    # the package (torch, flwr), so it costs a bare interpreter's memory for the whole run
    command = [sys.executable, "-I", str(Path(__file__).resolve()), "--watch", str(owner), "--tag", tag]
    if remove is not None:
        command += ["--remove", str(remove)]
    if os.environ.get(WATCHDOG_LOG_VAR):
        command += ["--log", os.environ[WATCHDOG_LOG_VAR]]
    return subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # survives a kill of the owner's process group
    )


def _alive(pid: int, start: int | None = None) -> bool:
    stat = _read_stat(pid)
    return stat is not None and not stat.zombie and (start is None or stat.start == start)


def watch(
    owner: int,
    tag: str,
    poll_s: float = 0.2,
    scan_s: float = 2.0,
    grace_s: float = 2.0,
    remove: str | os.PathLike | None = None,
) -> list[int]:
    """Wait until process ``owner`` is gone, then stop every process of the runtime ``tag``.

    While the owner lives, the runtime's processes are looked up every ``scan_s`` seconds
    (:class:`ProcessFamily` remembers them, whatever they later do to their environment or
    parent). Once it is gone (checked every ``poll_s`` seconds): SIGTERM, SIGKILL after
    ``grace_s`` seconds (:func:`stop_family`), then ``remove`` (the runtime's temporary
    folder) is deleted. Returns the PIDs that survived.
    """
    stat = _read_stat(owner)
    start = stat.start if stat is not None else None
    family = ProcessFamily(tag, exclude=[owner])
    last_scan = -float("inf")
    while _alive(owner, start):
        if time.monotonic() - last_scan >= scan_s:
            family.scan()
            last_scan = time.monotonic()
        time.sleep(poll_s)
    log.info("owner %d of runtime %s is gone", owner, tag)
    survivors = stop_family(family, grace_s=grace_s)
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)
        log.info("removed %s", remove)
    return survivors


if __name__ == "__main__":  # the watchdog
    import argparse

    parser = argparse.ArgumentParser(description="stop a runtime's processes once its owner is gone")
    parser.add_argument("--watch", type=int, required=True, help="PID of the owning process")
    parser.add_argument("--tag", required=True, help="the runtime's tag")
    parser.add_argument("--remove", default=None, help="a folder to delete once the processes are stopped")
    parser.add_argument("--log", default=None, help=f"a file to append what was stopped to (${WATCHDOG_LOG_VAR})")
    args = parser.parse_args()
    if args.log:
        logging.basicConfig(
            filename=args.log, level=logging.INFO, format=f"%(asctime)s watchdog {os.getpid()}: %(message)s"
        )
    watch(args.watch, args.tag, remove=args.remove)
