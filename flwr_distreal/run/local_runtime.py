"""Run the project's Flower app with ``flwr run`` on a private local SuperLink, from Python.

Flower 1.21+ deprecates ``flwr.simulation.run_simulation`` ("use `flwr run` in the CLI
instead"); the supported way to run a simulation is ``flwr run <app> <connection>``, which
starts a local SuperLink in simulation mode. :class:`LocalFlwrRuntime` does exactly that for the
Hydra runner (and the tests), keeping a run self-contained:

* a private Flower home (``FLWR_HOME`` in a temporary folder; the user's ``~/.flwr`` is never
  read or written) and free ports for the local SuperLink's APIs, so parallel sweeps and a
  user's own SuperLink do not collide;
* every process it starts (``flwr``, the local SuperLink, the ServerApp and simulation
  processes, Ray) carries a unique tag in its environment; :meth:`LocalFlwrRuntime.stop` stops
  each of them by PID (SIGTERM, then SIGKILL after a grace period) and reports survivors;
* a watchdog process (:func:`flwr_distreal.run.processes.start_watchdog`: a bare interpreter) stops them
  as well when the Python process that owns the runtime dies without stopping it (``kill -9``):
  Flower starts the local SuperLink detached, so nothing else would. It also removes the
  runtime's temporary folder.

Finding them (:class:`~flwr_distreal.run.processes.ProcessFamily`) reads ``/proc``; see
:mod:`flwr_distreal.run.processes`.

SIGTERM of the owning process exits it through ``SystemExit`` (so the runtime is stopped at exit,
as after Ctrl-C) when no other SIGTERM handler is installed.

The runtime is reused across the runs of one process (a Hydra multirun starts the SuperLink
once) and stopped at exit. Finding the tagged processes reads ``/proc`` (Linux); elsewhere only
the processes this module spawned itself are stopped.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import flwr_runtime_base
from .processes import (  # re-exported: the finding and stopping of a run's processes
    TAG_VAR,
    ProcessFamily,
    start_watchdog,
    stop_family,
    tagged_pids,
    watch,
)

__all__ = [
    "FlwrRunError",
    "FlwrRunResult",
    "LocalFlwrRuntime",
    "ProcessFamily",
    "ProcessGuard",
    "format_run_config",
    "poll_until",
    "shared_runtime",
    "stop_family",
    "stream_flwr_run",
    "tagged_pids",
    "watch",
]


log = logging.getLogger(__name__)


class FlwrRunError(RuntimeError):
    """``flwr run`` could not start the run, or the run did not finish as completed."""


@dataclass
class FlwrRunResult:
    """How a ``flwr run`` ended: run id, Flower's status (``finished:completed``, ...), details."""

    run_id: int
    status: str
    details: str
    log_path: Path | None

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


def poll_until(
    done: Callable[[], bool],
    *,
    start: float,
    timeout: float | None,
    timeout_message: Callable[[], str],
    on_poll: Callable[[], None] | None = None,
    poll_s: float = 1.0,
) -> None:
    """Call ``done`` every ``poll_s`` seconds until it returns True, ``on_poll`` in between.

    Raises
    ------
    FlwrRunError
        With ``timeout_message()``, once ``timeout`` seconds have passed since ``start``
        (``time.monotonic()``) and ``done`` is still False.
    """
    while not done():
        if timeout is not None and time.monotonic() - start > timeout:
            raise FlwrRunError(timeout_message())
        if on_poll is not None:
            on_poll()
        time.sleep(poll_s)


def stream_flwr_run(
    args: list[str],
    *,
    env: Mapping[str, str],
    cwd: str | os.PathLike,
    log_file: Path,
    children: list[subprocess.Popen],
    timeout: float | None = None,
    on_poll: Callable[[], None] | None = None,
    poll_s: float = 1.0,
    require_exit_zero: bool = True,
    context: Callable[[], str] = lambda: "",
) -> int:
    """Run ``flwr run ... --stream`` with its output in ``log_file`` and wait for it to end.

    Parameters
    ----------
    args : list of str
        The ``flwr run`` command line.
    env, cwd
        Its environment and working folder.
    log_file : Path
        Where its streamed output goes.
    children : list
        The caller's list of started processes; the ``flwr`` process is appended (stopped by PID).
    timeout : float, optional
        Seconds before ``flwr`` is stopped (SIGTERM, SIGKILL after 10 s) and
        :class:`FlwrRunError` raised.
    on_poll : callable, optional
        Called every ``poll_s`` seconds while it runs, and once after.
    require_exit_zero : bool
        Whether a non-zero exit of ``flwr`` is a failure even when it started the run (a
        deployment's stream can break while its run goes on in the SuperLink).
    context : callable
        More text for error messages (e.g. the SuperLink's and SuperNodes' log tails).

    Returns
    -------
    int
        The run id Flower printed (``Successfully started run <id>``).

    Raises
    ------
    FlwrRunError
        If ``flwr run`` times out, or ends without having started the run.
    """
    start = time.monotonic()
    with log_file.open("w") as sink:
        proc = subprocess.Popen(
            args, env=dict(env), cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        children.append(proc)
        try:
            poll_until(
                lambda: proc.poll() is not None, start=start, timeout=timeout, on_poll=on_poll, poll_s=poll_s,
                timeout_message=lambda: (
                    f"flwr run did not finish within {timeout:g} s; logs: {log_file}\n{_tail(log_file)}\n{context()}"
                ),
            )
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if on_poll is not None:
        on_poll()
    text = log_file.read_text(errors="replace")
    started = [line for line in text.splitlines() if "Successfully started run" in line]
    if not started or (require_exit_zero and proc.returncode != 0):
        raise FlwrRunError(f"flwr run failed (exit {proc.returncode}); logs: {log_file}\n{_tail(log_file, 20)}")
    return int(started[0].split()[-1])


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flwr_cli() -> str:
    """The ``flwr`` CLI next to this interpreter, else on PATH."""
    sibling = Path(sys.executable).parent / "flwr"
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which("flwr")
    if found is None:
        raise FlwrRunError("the flwr CLI is not installed (pip install 'flwr[simulation]')")
    return found


def format_run_config(values: Mapping[str, Any]) -> str:
    """``--run-config`` text for ``flwr run``: ``key=value`` pairs in TOML syntax.

    Strings are written as TOML basic strings (JSON escaping is valid TOML), numbers and bools
    as TOML literals.
    """
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        else:
            text = json.dumps(str(value))
        parts.append(f"{key}={text}")
    return " ".join(parts)


class LocalFlwrRuntime:
    """A private Flower home and local SuperLink (simulation runtime) for ``flwr run``.

    Parameters
    ----------
    root : path, optional
        Folder for the Flower home and Ray's temporary files; a new temporary folder (removed
        by :meth:`stop`) when not given. Keep it short: Ray's socket paths must fit.
    install_dependencies : bool, optional
        Let Flower install the app's dependencies at run time. Defaults to False: the current
        environment already has them.
    """

    def __init__(self, root: str | os.PathLike | None = None, *, install_dependencies: bool = False) -> None:
        self._own_root = root is None
        if root is None:
            # Ray's Unix socket paths under root must fit 107 bytes: a long TMPDIR would not do
            root = tempfile.mkdtemp(prefix="fdr-", dir=flwr_runtime_base())
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "flwr-home"
        self.tag = uuid.uuid4().hex
        self.flwr = _flwr_cli()
        (self.root / "ray").mkdir(exist_ok=True)
        self.env = dict(
            os.environ,
            FLWR_HOME=str(self.home),
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(_free_port()),
            FLWR_LOCAL_CONTROL_API_PORT=str(_free_port()),
            FLWR_DISABLE_UPDATE_CHECK="1",
            RAY_TMPDIR=str(self.root / "ray"),
            RAY_USAGE_STATS_ENABLED="0",
            PATH=f"{Path(self.flwr).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        if not install_dependencies:
            self.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        self.env[TAG_VAR] = self.tag
        self._children: list[subprocess.Popen] = []
        self._superlink: subprocess.Popen | None = None
        self._stopped = False
        self._watchdog = start_watchdog(os.getpid(), self.tag, self.root if self._own_root else None)
        self._family = ProcessFamily(self.tag, exclude=[self._watchdog.pid] if self._watchdog is not None else [])

    # -- CLI -----------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a ``flwr`` command in this runtime's environment and capture its output."""
        return subprocess.run(
            [self.flwr, *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout
        )

    def run(
        self,
        app_dir: str | os.PathLike,
        num_supernodes: int,
        run_config: Mapping[str, Any] | None = None,
        *,
        federation_config: Mapping[str, Any] | None = None,
        log_path: str | os.PathLike | None = None,
        timeout: float | None = None,
        on_poll: Callable[[], None] | None = None,
        poll_s: float = 1.0,
    ) -> FlwrRunResult:
        """``flwr run <app_dir> local --stream`` with ``num_supernodes`` simulated SuperNodes.

        Parameters
        ----------
        app_dir : path
            The Flower app (a folder with ``pyproject.toml`` and ``[tool.flwr.app]``).
        num_supernodes : int
            Simulated SuperNodes.
        run_config : Mapping, optional
            ``--run-config`` values.
        federation_config : Mapping, optional
            More ``--federation-config`` values (e.g. ``client-resources-num-cpus``).
        log_path : path, optional
            Where the streamed logs go (they are not printed).
        timeout : float, optional
            Seconds before the run is stopped and :class:`FlwrRunError` raised.
        on_poll : callable, optional
            Called every ``poll_s`` seconds while the run goes (e.g. to print progress).

        Returns
        -------
        FlwrRunResult
            The run id and Flower's final status of the run.

        Raises
        ------
        FlwrRunError
            If ``flwr run`` fails to start the run or times out.
        """
        if self._stopped:
            raise FlwrRunError("this runtime was stopped")
        self.start_superlink()
        fed = {"num-supernodes": int(num_supernodes), **dict(federation_config or {})}
        args = [self.flwr, "run", str(Path(app_dir).resolve()), "local", "--stream"]
        args += ["--federation-config", format_run_config(fed)]
        if run_config:
            args += ["--run-config", format_run_config(run_config)]
        log_file = Path(log_path) if log_path is not None else self.root / f"run-{uuid.uuid4().hex[:8]}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        run_id = stream_flwr_run(
            args, env=self.env, cwd=self.root, log_file=log_file, children=self._children,
            timeout=timeout, on_poll=on_poll, poll_s=poll_s,
        )
        status = self.status(run_id)
        return FlwrRunResult(run_id, str(status.get("status", "")), str(status.get("status-details", "")), log_file)

    def _superlink_up(self) -> bool:
        import httpx

        try:
            return httpx.get(f"http://127.0.0.1:{self.env['FLWR_LOCAL_SUPERLINK_HTTP_API_PORT']}/health", timeout=0.5).is_success
        except httpx.HTTPError:
            return False

    def start_superlink(self, timeout: float = 120.0) -> None:
        """Start the local SuperLink (simulation mode) the way ``flwr run ... local`` would, unless
        it runs already, and wait until it answers. ``flwr`` itself gives it 15 s, too little on a
        busy machine; started here it is also this process's child, stopped by PID."""
        if self._superlink is not None and self._superlink.poll() is None and self._superlink_up():
            return
        runtime_dir = self.home / "local-superlink"
        runtime_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(Path(self.flwr).parent / "flower-superlink"), "--insecure", "--simulation",
            "--isolation", "subprocess",
            "--control-api-address", f"127.0.0.1:{self.env['FLWR_LOCAL_CONTROL_API_PORT']}",
            "--host", "127.0.0.1", "--port", self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"],
            "--database", str(runtime_dir / "state.db"), "--log-file", str(runtime_dir / "superlink.log"),
        ]
        self._superlink = subprocess.Popen(
            command, env=self.env, cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self._children.append(self._superlink)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._superlink.poll() is not None:
                raise FlwrRunError(
                    f"the local SuperLink exited with code {self._superlink.returncode}; see {runtime_dir / 'superlink.log'}"
                )
            if self._superlink_up():
                return
            time.sleep(0.2)
        raise FlwrRunError(f"the local SuperLink did not start within {timeout:g} s; see {runtime_dir / 'superlink.log'}")

    def status(self, run_id: int) -> dict[str, Any]:
        """Flower's record of a run (``flwr ls --run-id``): ``status``, ``status-details``, ..."""
        res = self.cli("ls", "local", "--run-id", str(run_id), "--format", "json")
        if res.returncode != 0 or "{" not in res.stdout:
            raise FlwrRunError(f"flwr ls failed for run {run_id}: {res.stdout}{res.stderr}")
        payload = json.loads(res.stdout[res.stdout.index("{"):])
        runs = [r for r in payload.get("runs", []) if str(r.get("run-id")) == str(run_id)]
        if not runs:
            raise FlwrRunError(f"flwr ls does not know run {run_id}: {payload}")
        return runs[0]

    # -- cleanup -------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """PIDs of the live processes of this runtime (SuperLink, app processes, Ray, ...)."""
        return self._family.scan()

    def stop(self, grace_s: float = 15.0) -> list[int]:
        """Stop every process of this runtime by PID; return the PIDs that survived.

        SIGTERM first, SIGKILL for what is left after ``grace_s`` seconds (Ray's dashboard
        agents ignore SIGTERM). Removes the temporary folder when the runtime created it.
        """
        if self._stopped:
            return []
        self._stopped = True

        def children() -> set[int]:
            return {p.pid for p in self._children if p.poll() is None}

        stop_family(self._family, grace_s=grace_s, also=children)
        for child in self._children:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.3)
        survivors = self.pids()
        if self._watchdog is not None and self._watchdog.poll() is None:
            self._watchdog.terminate()
            try:
                self._watchdog.wait(5)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
        return survivors

    def __enter__(self) -> LocalFlwrRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProcessGuard:
    """Tags the processes this process starts from now on (``TAG_VAR`` in ``os.environ``: Ray's
    raylet, GCS, dashboard and workers inherit it) and runs a watchdog that stops them if this
    process dies without cleaning up (``kill -9``). Used by the legacy ``run_simulation`` path.
    """

    def __enter__(self) -> ProcessGuard:
        self.tag = uuid.uuid4().hex
        self._previous = os.environ.get(TAG_VAR)
        os.environ[TAG_VAR] = self.tag
        self._watchdog = start_watchdog(os.getpid(), self.tag)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is None:
            os.environ.pop(TAG_VAR, None)
        else:
            os.environ[TAG_VAR] = self._previous
        if self._watchdog is not None and self._watchdog.poll() is None:
            self._watchdog.terminate()
            self._watchdog.wait(5)


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit (atexit handlers then stop the runtime), unless the program
    installed its own handler; only possible in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


_SHARED: LocalFlwrRuntime | None = None
_SHARED_LOCK = threading.Lock()


def shared_runtime() -> LocalFlwrRuntime:
    """This process's runtime, started on first use and stopped at exit (a Hydra multirun's
    jobs share one local SuperLink)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED._stopped:
            _SHARED = LocalFlwrRuntime()
            atexit.register(_SHARED.stop)
            _exit_on_sigterm()
        return _SHARED


