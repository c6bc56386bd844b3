"""A real deployment of the app on Flower's deployment runtime, on this machine.

:class:`LocalDeployment` starts what a deployment on real devices starts, on 127.0.0.1: one
``flower-superlink`` and N ``flower-supernode`` processes (each with its own node config, i.e.
its own data), then ``flwr run <app> <connection>`` against the SuperLink. Optionally with TLS
(a throw-away CA and server certificate) and SuperNode authentication (an EC key pair per
SuperNode, registered with ``flwr supernode register``); the certificates, keys and the ``flwr``
CLI's connection config are made by :mod:`flwr_distreal.run.credentials` (re-exported here).
It is the CI check of the "Deploy on real devices" instructions (README.md) and the engine of
``scripts/deploy_local.py``.

Flower 1.41 specifics this module relies on (read from Flower's sources):

* the SuperLink serves its Fleet, Control and Runtime APIs over HTTP on **one** address,
  ``--host``/``--port``; ``--ssl-ca-certfile/--ssl-certfile/--ssl-keyfile`` secure all three
  (``--insecure`` turns TLS off). ``--enable-supernode-auth`` needs TLS. With the default
  ``--isolation subprocess`` the SuperLink launches ``flower-superexec`` (from ``PATH``), which
  runs the ServerApp (``flwr-serverapp``) against the Runtime API;
* a SuperNode connects with ``--superlink HOST:PORT`` and ``--root-certificates CA`` (or
  ``--insecure``); ``--auth-supernode-private-key`` is an EC key on a NIST curve in OpenSSH
  format, whose public key (OpenSSH format) ``flwr supernode register <pub> <connection>``
  registered beforehand (with auth on, a SuperNode cannot register itself). Its own Runtime API
  (for the ClientApp, default ``--isolation subprocess``) is ``--host``/``--port``;
  ``--clientappio-api-address`` is no longer accepted;
* the ``flwr`` CLI reads connections from ``$FLWR_HOME/config.toml``::

      [superlink.NAME]
      address = "127.0.0.1:PORT"          # the SuperLink's --host:--port
      root-certificates = "/abs/ca.crt"   # or: insecure = true

Isolation: everything lives in a private temporary folder (certificates, keys, the SuperLink's
``--database``, the Flower home, logs), on free ports. Every process started here, and every
process those start (SuperExec, ServerApp, ClientApps), carries a unique tag in its environment
(:data:`flwr_distreal.run.processes.TAG_VAR`); :meth:`LocalDeployment.stop` stops each of them by
PID (SIGTERM, then SIGKILL) and returns the survivors. Finding the tagged processes reads
``/proc`` (Linux); elsewhere only the processes spawned here directly are stopped.

A lost SuperNode leaves nothing behind: every SuperNode and the processes it starts (its
``flower-superexec``, each run's ``flwr-clientapp``) also carry a tag of their own
(:data:`NODE_TAG_VAR`), and a watchdog per SuperNode (a process in its own session) stops them
by PID once the SuperNode is gone, however it ended (``kill -9`` included; without the watchdog
its SuperExec and ClientApp would poll the dead SuperNode until the deployment stops).
:meth:`LocalDeployment.kill_supernode` kills one SuperNode as a crash would, for tests.
"""

from __future__ import annotations

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .credentials import TlsFiles, make_node_key_pair, make_tls_certificates, write_connection_config
from .local_runtime import (
    FlwrRunError,
    FlwrRunResult,
    _flwr_cli,
    _free_port,
    _tail,
    format_run_config,
    poll_until,
    stream_flwr_run,
)
from .processes import TAG_VAR, _signal, start_watchdog, tagged_pids
from .staging import APP_DIR

__all__ = [
    "DeploymentError",
    "LocalDeployment",
    "SuperNodeProcess",
    "TlsFiles",
    "make_node_key_pair",
    "make_tls_certificates",
    "write_connection_config",
]

#: Name of the ``flwr`` CLI connection to the deployment's SuperLink (in the private home).
CONNECTION = "deployment"
#: Environment variable that marks one SuperNode's processes (SuperNode, SuperExec, ClientApps).
NODE_TAG_VAR = "FLWR_DISTREAL_NODE_TAG"
#: The app of this repository (the folder with ``pyproject.toml`` and ``[tool.flwr.app]``).
DEFAULT_APP_DIR = APP_DIR


class DeploymentError(FlwrRunError):
    """A SuperLink or SuperNode did not start, a key was not registered, or a node is missing."""


# -- processes --------------------------------------------------------------------------------


def _cli(name: str) -> str:
    """A Flower executable next to this interpreter, else on PATH."""
    sibling = Path(sys.executable).parent / name
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return str(sibling)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"{name} is not installed (pip install flwr)")
    return found


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _json_payload(text: str) -> dict[str, Any]:
    """The JSON object a ``flwr ... --format json`` command printed (after any log lines)."""
    if "{" not in text:
        raise ValueError("no JSON in the output")
    return json.loads(text[text.index("{"):])


@dataclass
class SuperNodeProcess:
    """One ``flower-supernode`` of a :class:`LocalDeployment`."""

    name: str
    node_config: dict[str, Any]
    port: int
    log_path: Path
    #: Its working folder; its ``FLWR_HOME`` is ``workdir/flwr-home``.
    workdir: Path
    private_key: Path | None = None
    public_key: Path | None = None
    node_id: int | None = None
    #: Whether it should come online (False: an unregistered SuperNode under authentication).
    expected: bool = True
    #: Its ``flower-supernode`` command line.
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = field(default=None, repr=False)
    #: The tag its processes carry (:data:`NODE_TAG_VAR`).
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: The process that stops its SuperExec and ClientApps once it is gone (None without /proc).
    watchdog: subprocess.Popen | None = field(default=None, repr=False)

    def pids(self) -> list[int]:
        """PIDs of its live processes: the SuperNode, its SuperExec and ClientApps (``/proc``)."""
        return tagged_pids(self.tag)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def connected_id(self) -> int | None:
        """The node id once the SuperNode is connected (it logs ``SuperNode ID: N`` after the
        SuperLink activated it), else None."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return None
        marker = "SuperNode ID: "
        if marker not in text:
            return None
        return int(text.split(marker, 1)[1].split()[0])


class LocalDeployment:
    """A SuperLink and N SuperNodes on 127.0.0.1 (Flower's deployment runtime) and ``flwr run``.

    Parameters
    ----------
    num_supernodes : int
        SuperNodes started by :meth:`start` (more with :meth:`add_supernode`).
    app_dir : path, optional
        The Flower app ``flwr run`` submits; this repository by default.
    tls : bool or TlsFiles
        Secure the SuperLink's APIs with TLS: True makes a throw-away CA and server certificate
        (for 127.0.0.1/localhost); a :class:`TlsFiles` uses those (e.g. to try certificates
        made for real machines: the server certificate must name 127.0.0.1, which the
        SuperLink's own SuperExec connects to). The SuperNodes and the ``flwr`` CLI verify it
        against the CA. Default False (``--insecure`` everywhere).
    auth : bool
        SuperNode authentication (``--enable-supernode-auth``, needs ``tls``): every SuperNode
        gets an EC key pair whose public key is registered with ``flwr supernode register``.
    node_configs : sequence, optional
        Node config per SuperNode (a mapping, written in TOML syntax, or the ``--node-config``
        text); default ``partition-id=i num-partitions=N``.
    root : path, optional
        Working folder; a new private temporary folder (removed by :meth:`stop` unless
        ``keep_root``) when not given.
    keep_root : bool
        Keep the folder (logs, certificates, database) after :meth:`stop`.
    install_dependencies : bool
        Let Flower install the app's dependencies at run time. Default False: this environment
        has them (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` for every process).
    startup_timeout : float
        Seconds for the SuperLink to listen and the SuperNodes to come online.
    env : mapping, optional
        More environment variables for every process.

    Examples
    --------
    >>> with LocalDeployment(2) as dep:                     # doctest: +SKIP
    ...     result = dep.run({"deployment": True, "rounds": 2, "output-dir": "/tmp/out"})
    ...     assert result.ok
    >>> dep.survivors                                       # doctest: +SKIP
    []
    """

    def __init__(
        self,
        num_supernodes: int = 2,
        *,
        app_dir: str | os.PathLike | None = None,
        tls: bool | TlsFiles = False,
        auth: bool = False,
        node_configs: Sequence[Mapping[str, Any] | str] | None = None,
        root: str | os.PathLike | None = None,
        keep_root: bool = False,
        install_dependencies: bool = False,
        startup_timeout: float = 90.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if auth and not tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with --insecure)")
        if num_supernodes < 0:
            raise ValueError(f"num_supernodes must be >= 0, got {num_supernodes}")
        if node_configs is not None and len(node_configs) != num_supernodes:
            raise ValueError(f"{len(node_configs)} node configs for {num_supernodes} SuperNodes")
        self.num_supernodes = int(num_supernodes)
        self.app_dir = Path(app_dir).resolve() if app_dir is not None else DEFAULT_APP_DIR
        if not (self.app_dir / "pyproject.toml").is_file():
            raise ValueError(f"{self.app_dir} is not a Flower app (no pyproject.toml)")
        self.tls, self.auth = bool(tls), bool(auth)
        self._given_tls = tls if isinstance(tls, TlsFiles) else None
        self._node_configs = list(node_configs) if node_configs is not None else None
        self._own_root = root is None
        self.keep_root = keep_root
        self.root = Path(tempfile.mkdtemp(prefix="fdr-dep-")) if root is None else Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.home = self.root / "flwr-home"
        self.logs = self.root / "logs"
        self.logs.mkdir(exist_ok=True)
        self.startup_timeout = float(startup_timeout)
        self.tag = uuid.uuid4().hex
        self.flwr = _flwr_cli()
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tls_files: TlsFiles | None = None
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[SuperNodeProcess] = []
        self.survivors: list[int] = []
        no_proxy = ",".join(x for x in (os.environ.get("NO_PROXY", ""), "127.0.0.1,localhost") if x)
        self.env = dict(
            os.environ,
            FLWR_HOME=str(self.home),
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_TELEMETRY_ENABLED="0",  # no traffic beyond 127.0.0.1 (and no exit-time wait for it)
            NO_PROXY=no_proxy,
            no_proxy=no_proxy,
            PATH=f"{Path(self.flwr).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        )
        self.env.update(env or {})
        if not install_dependencies:
            self.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        self.env[TAG_VAR] = self.tag
        self._children: list[subprocess.Popen] = []
        self._started = self._stopped = False

    # -- start -----------------------------------------------------------------------------------
    def start(self) -> LocalDeployment:
        """Certificates and keys, the SuperLink, key registration, the SuperNodes; returns once
        every SuperNode is online. On failure everything started is stopped again."""
        if self._stopped:
            raise DeploymentError("this deployment was stopped")
        if self._started:
            return self
        self._started = True
        try:
            if self._given_tls is not None:
                self.tls_files = self._given_tls
            elif self.tls:
                self.tls_files = make_tls_certificates(self.root / "certs")
            write_connection_config(
                self.home, CONNECTION, self.address, self.tls_files.ca_cert if self.tls_files else None
            )
            self._start_superlink()
            configs = self._node_configs or [
                {"partition-id": i, "num-partitions": self.num_supernodes} for i in range(self.num_supernodes)
            ]
            self._add_supernodes(configs)
            self.wait_for_nodes()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_superlink(self) -> None:
        args = [_cli("flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--database", str(self.root / "superlink.db")]
        if self.tls_files is not None:
            args += ["--ssl-ca-certfile", str(self.tls_files.ca_cert)]
            args += ["--ssl-certfile", str(self.tls_files.server_cert)]
            args += ["--ssl-keyfile", str(self.tls_files.server_key)]
        else:
            args.append("--insecure")
        if self.auth:
            args.append("--enable-supernode-auth")
        log = self.logs / "superlink.log"
        self.superlink = self._spawn(args, log)
        deadline = time.monotonic() + self.startup_timeout
        while not _port_open(self.port):
            if self.superlink.poll() is not None:
                raise DeploymentError(f"flower-superlink exited ({self.superlink.returncode}):\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise DeploymentError(f"flower-superlink did not listen on {self.address}:\n{_tail(log)}")
            time.sleep(0.2)

    def _spawn(self, args: list[str], log_path: Path, cwd: Path | None = None, **env: str) -> subprocess.Popen:
        with log_path.open("ab") as sink:
            proc = subprocess.Popen(
                args, env={**self.env, **env}, cwd=cwd or self.root, stdout=sink, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._children.append(proc)
        return proc

    def register(self, *public_keys: str | os.PathLike, names: Sequence[str | None] = ()) -> list[int]:
        """Register SuperNodes' public keys with ``flwr supernode register`` (one CLI call per
        key, run concurrently); their node ids, in order."""
        procs = []
        for i, key in enumerate(public_keys):
            args = [self.flwr, "supernode", "register", str(key), CONNECTION, "--format", "json"]
            if i < len(names) and names[i]:
                args += ["--name", str(names[i])]
            procs.append(
                subprocess.Popen(
                    args, env=self.env, cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                    stdin=subprocess.DEVNULL,
                )
            )
            self._children.append(procs[-1])
        ids = []
        for key, proc in zip(public_keys, procs):
            out, err = proc.communicate(timeout=120)
            try:
                payload = _json_payload(out)
                if proc.returncode != 0 or not payload.get("success"):
                    raise ValueError(payload)
                ids.append(int(payload["node-id"]))
            except (ValueError, KeyError) as exc:
                raise DeploymentError(f"flwr supernode register {key} failed ({exc}):\n{out}{err}") from None
        return ids

    def add_supernode(
        self,
        node_config: Mapping[str, Any] | str | None = None,
        *,
        register: bool = True,
        name: str | None = None,
        wait: bool = True,
        extra_args: Sequence[str] = (),
    ) -> SuperNodeProcess:
        """Start one more ``flower-supernode``.

        Parameters
        ----------
        node_config : mapping or str, optional
            Its ``--node-config`` (a mapping is written in TOML syntax); none when not given.
        register : bool
            With authentication on: register its public key first. False starts a SuperNode the
            SuperLink does not know: the SuperLink refuses it, and the SuperNode logs Flower's
            "Exit Code: 305" (SUPERNODE_CONNECTION_ERROR, "Failed to activate SuperNode") and
            exits with status 1. Without authentication every SuperNode registers itself.
        name : str, optional
            Its name (log file ``logs/NAME.log``, key files ``keys/NAME[.pub]``).
        wait : bool
            Return once every expected SuperNode is connected.
        extra_args : sequence of str
            More ``flower-supernode`` arguments (e.g. ``--max-retries 0``).
        """
        (node,) = self._add_supernodes([node_config], register=register, names=[name], extra_args=extra_args)
        if wait:
            self.wait_for_nodes()
        return node

    def _add_supernodes(
        self,
        node_configs: Sequence[Mapping[str, Any] | str | None],
        *,
        register: bool = True,
        names: Sequence[str | None] = (),
        extra_args: Sequence[str] = (),
    ) -> list[SuperNodeProcess]:
        if self.superlink is None or self.superlink.poll() is not None:
            raise DeploymentError("the SuperLink is not running")
        nodes = []
        for i, node_config in enumerate(node_configs):
            name = (names[i] if i < len(names) else None) or f"supernode-{len(self.supernodes) + i}"
            if isinstance(node_config, Mapping):
                config, text = dict(node_config), format_run_config(node_config)
            else:
                from flwr.common.config import parse_config_args

                text = node_config or ""
                config = parse_config_args([text]) if text else {}
            node = SuperNodeProcess(
                name=name, node_config=config, port=_free_port(), log_path=self.logs / f"{name}.log",
                workdir=self.root / "nodes" / name,
            )
            node.args = ["--node-config", text] if text else []
            if self.auth:
                node.private_key, node.public_key = make_node_key_pair(self.root / "keys", name)
                node.expected = register
            nodes.append(node)
        if self.auth and register:
            ids = self.register(*(n.public_key for n in nodes), names=[n.name for n in nodes])
            for node, node_id in zip(nodes, ids):
                node.node_id = node_id
        for node in nodes:
            args = [_cli("flower-supernode"), "--superlink", self.address, "--host", "127.0.0.1", "--port", str(node.port)]
            if self.tls_files is not None:
                args += ["--root-certificates", str(self.tls_files.ca_cert)]
            else:
                args.append("--insecure")
            if node.private_key is not None:
                args += ["--auth-supernode-private-key", str(node.private_key)]
            args += [*node.args, *extra_args]
            node.args = args
            # like a device of its own: its own working folder and Flower home (installed FABs)
            node.workdir.mkdir(parents=True, exist_ok=True)
            node.process = self._spawn(
                args, node.log_path, node.workdir, FLWR_HOME=str(node.workdir / "flwr-home"), **{NODE_TAG_VAR: node.tag}
            )
            # once the SuperNode is gone (stopped, crashed, kill -9), stop what it started
            node.watchdog = start_watchdog(node.process.pid, node.tag)
            self.supernodes.append(node)
        return nodes

    def kill_supernode(self, node: SuperNodeProcess | int, sig: int = signal.SIGKILL) -> list[int]:
        """Send ``sig`` (default SIGKILL) to one SuperNode's process only, as a crash or an
        operator's ``kill -9`` would; its watchdog then stops its SuperExec and ClientApps.

        Parameters
        ----------
        node : SuperNodeProcess or int
            The SuperNode, or its index in :attr:`supernodes`.
        sig : int
            The signal.

        Returns
        -------
        list of int
            The PIDs of the SuperNode's processes when it was killed (SuperNode first).
        """
        if isinstance(node, int):
            node = self.supernodes[node]
        if node.process is None:
            raise DeploymentError(f"{node.name} was never started")
        before = [node.process.pid, *sorted(p for p in node.pids() if p != node.process.pid)]
        _signal([node.process.pid], sig)
        return before

    # -- queries ---------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a ``flwr`` command against this deployment (its private ``FLWR_HOME``)."""
        return subprocess.run(
            [self.flwr, *args], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def wait_for_nodes(self, count: int | None = None, timeout: float | None = None, poll_s: float = 0.3) -> list[SuperNodeProcess]:
        """Wait until ``count`` (default: all expected) SuperNodes are connected: registered (or,
        with authentication, authenticated) and activated, as each SuperNode logs it
        (``SuperNode ID: ...``); those SuperNodes. Cheap: no ``flwr`` call (see :meth:`nodes`).

        Raises
        ------
        DeploymentError
            If an expected SuperNode exits or the timeout passes.
        """
        expected = [n for n in self.supernodes if n.expected]
        count = len(expected) if count is None else int(count)
        deadline = time.monotonic() + (self.startup_timeout if timeout is None else timeout)
        while True:
            for node in expected:
                if node.process is not None and node.process.poll() is not None:
                    raise DeploymentError(f"{node.name} exited ({node.process.returncode}):\n{_tail(node.log_path)}")
            connected = [n for n in self.supernodes if n.connected_id() is not None]
            if len(connected) >= count:
                return connected
            if time.monotonic() > deadline:
                raise DeploymentError(f"{len(connected)} of {count} SuperNodes connected in time\n{self.log_tails(10)}")
            time.sleep(poll_s)

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperNodes the SuperLink knows (``flwr supernode ls --format json``): ``node-id``,
        ``status`` (``online``, ``offline``, ``registered``, ...), ..."""
        res = self.cli("supernode", "ls", CONNECTION, "--format", "json")
        try:
            return list(_json_payload(res.stdout).get("nodes", []))
        except ValueError:
            raise DeploymentError(f"flwr supernode ls failed:\n{res.stdout}{res.stderr}") from None

    def status(self, run_id: int) -> dict[str, Any]:
        """Flower's record of a run (``flwr ls --run-id``): ``status``, ``status-details``, ..."""
        res = self.cli("ls", CONNECTION, "--run-id", str(run_id), "--format", "json")
        try:
            runs = [r for r in _json_payload(res.stdout).get("runs", []) if str(r.get("run-id")) == str(run_id)]
        except ValueError:
            runs = []
        if res.returncode != 0 or not runs:
            raise FlwrRunError(f"flwr ls failed for run {run_id}:\n{res.stdout}{res.stderr}")
        return runs[0]

    def log_tails(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the SuperLink's and each SuperNode's log (for error messages)."""
        parts = [f"--- superlink ({self.logs / 'superlink.log'})\n{_tail(self.logs / 'superlink.log', lines)}"]
        parts += [f"--- {n.name} ({n.log_path})\n{_tail(n.log_path, lines)}" for n in self.supernodes]
        return "\n".join(parts)

    # -- run ---------------------------------------------------------------------------------------
    def run(
        self,
        run_config: Mapping[str, Any] | str | None = None,
        *,
        log_path: str | os.PathLike | None = None,
        timeout: float | None = None,
        on_poll: Callable[[], None] | None = None,
        poll_s: float = 1.0,
    ) -> FlwrRunResult:
        """``flwr run <app_dir> <connection> --stream --run-config ...``; the run id and Flower's
        final status (``finished:completed``, ``finished:failed``, ...).

        Parameters
        ----------
        run_config : mapping or str, optional
            ``--run-config`` values (a mapping, written in TOML syntax) or text.
        log_path : path, optional
            Where the streamed logs go (default: ``logs/run-*.log`` in the working folder).
        timeout : float, optional
            Seconds for the whole run (``flwr run`` and the run itself) before
            :class:`FlwrRunError` is raised; the run itself is then stopped with the deployment.
        on_poll : callable, optional
            Called every ``poll_s`` seconds while the run goes.

        Raises
        ------
        FlwrRunError
            If ``flwr run`` fails to start the run or times out.
        """
        self.start()
        args = [self.flwr, "run", str(self.app_dir), CONNECTION, "--stream"]
        if run_config:
            text = run_config if isinstance(run_config, str) else format_run_config(run_config)
            args += ["--run-config", text]
        log_file = Path(log_path) if log_path is not None else self.logs / f"run-{uuid.uuid4().hex[:8]}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        run_id = stream_flwr_run(
            args, env=self.env, cwd=self.root, log_file=log_file, children=self._children, timeout=timeout,
            on_poll=on_poll, poll_s=poll_s, require_exit_zero=False, context=self.log_tails,
        )
        # The stream ends when the run does, or earlier if it broke (a busy SuperLink can drop it):
        # the run goes on in the SuperLink, so wait for Flower's final status.
        status: dict[str, Any] = {}

        def finished() -> bool:
            nonlocal status
            try:
                status = self.status(run_id)
            except (FlwrRunError, subprocess.TimeoutExpired):
                status = {}
            if str(status.get("status", "")).startswith("finished"):
                return True
            if self.superlink is None or self.superlink.poll() is not None:
                raise FlwrRunError(f"the SuperLink exited during run {run_id}\n{self.log_tails()}")
            return False

        poll_until(
            finished, start=start, timeout=timeout, on_poll=on_poll, poll_s=max(poll_s, 2.0),
            timeout_message=lambda: (
                f"run {run_id} did not finish within {timeout:g} s (status {status.get('status')!r}); "
                f"logs: {log_file}\n{_tail(log_file)}\n{self.log_tails()}"
            ),
        )
        return FlwrRunResult(run_id, str(status.get("status", "")), str(status.get("status-details", "")), log_file)

    # -- stop --------------------------------------------------------------------------------------
    def pids(self) -> list[int]:
        """PIDs of the live processes of this deployment (SuperLink, SuperNodes, SuperExecs, apps)."""
        return tagged_pids(self.tag)

    def _live_children(self) -> set[int]:
        return {p.pid for p in self._children if p.poll() is None}

    def stop(self, grace_s: float = 10.0) -> list[int]:
        """Stop every process of this deployment by PID; return (and keep in :attr:`survivors`)
        the PIDs still alive. Removes the working folder unless it was given or ``keep_root``.

        The SuperNodes first (so they deactivate while the SuperLink is still there), then all
        tagged processes: SIGTERM, SIGTERM again after a few seconds (Python can lose a signal
        that arrives while it restores a lock: "Signal 15 ignored due to race condition"),
        SIGKILL for what is left after ``grace_s`` seconds.
        """
        if self._stopped:
            return self.survivors
        self._stopped = True

        def alive() -> set[int]:
            return set(self.pids()) | self._live_children()

        nodes = {n.process.pid for n in self.supernodes if n.running}
        _signal(nodes, signal.SIGTERM)
        end = time.monotonic() + min(grace_s / 2, 5.0)
        while any(n.running for n in self.supernodes) and time.monotonic() < end:
            time.sleep(0.1)
        start = time.monotonic()
        _signal(alive(), signal.SIGTERM)
        resent = False
        while (left := alive()) and time.monotonic() - start < grace_s:
            if not resent and time.monotonic() - start > grace_s / 3:
                _signal(left, signal.SIGTERM)
                resent = True
            time.sleep(0.2)
        _signal(alive(), signal.SIGKILL)
        for child in self._children:
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for node in self.supernodes:  # each exits once its SuperNode is gone
            if node.watchdog is not None:
                try:
                    node.watchdog.wait(max(1.0, grace_s / 2))
                except subprocess.TimeoutExpired:
                    node.watchdog.kill()
                    node.watchdog.wait()
        time.sleep(0.3)
        self.survivors = sorted(alive())
        if self._own_root and not self.keep_root:
            shutil.rmtree(self.root, ignore_errors=True)
        return self.survivors

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
