"""Start-up checks: refuse, before round 1, what would otherwise fail late or unclearly.

Each function checks one thing a run (or the DSE command) is about to rely on and raises
:class:`StartupError` naming the config key and the offending value; :func:`warn_unused_lut`
only warns. They are pure functions over values already loaded (a dataset, a config value, a
path), so the experiment (:mod:`flwr_distreal.run.experiment`) and the DSE command
(:mod:`flwr_distreal.dse.__main__`) call them right after reading their config.

:func:`check_run_start` gathers the checks of a run that need no data: the torch device, the
CPUs and GPUs asked of Ray, the length of Ray's socket paths under ``TMPDIR``, and the output
folder. The runner (:mod:`flwr_distreal.cli.main`) calls it right after the config is validated, so
these refusals come before any data is loaded and before Ray starts.

No Flower or Hydra imports; ``torch`` is imported only where a CUDA device or GPU is asked for.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping
from logging import getLogger
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.resources import TraceFileError, load_trace_csv
from ..methods import get_method, list_methods

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunConfig
    from ..data import FederatedData

__all__ = [
    "RAY_RUNTIMES",
    "StartupError",
    "check_classes",
    "check_client_resources",
    "check_output_dir",
    "check_ray_socket_path",
    "flwr_runtime_base",
    "check_run_device",
    "check_run_start",
    "check_seed",
    "check_torch_device",
    "check_trace_devices",
    "ray_socket_path",
    "ray_temp_dir",
    "unix_socket_limit",
    "warn_unused_lut",
]

log = getLogger(__name__)

#: Strategies whose devices select dropout vectors from a LUT (the ``lut`` key).


class StartupError(ValueError):
    """A setting that cannot work, found before the run starts; the message names its key."""


def _is_int(value: Any) -> bool:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_seed(seed: Any, key: str = "seed") -> int:
    """Refuse a seed that numpy's ``SeedSequence`` would refuse deep inside the run.

    Parameters
    ----------
    seed : int
        The configured seed.
    key : str, optional
        The config key, named in the error (default ``"seed"``).

    Returns
    -------
    int
        ``seed``.

    Raises
    ------
    StartupError
        If ``seed`` is not an integer >= 0.
    """
    if not _is_int(seed) or int(seed) < 0:
        raise StartupError(
            f"{key} must be an integer >= 0 (numpy's random generators refuse negative seeds), got {seed!r}"
        )
    return int(seed)


def check_classes(num_classes_model: int | None, data: FederatedData, key: str = "model.num_classes") -> int:
    """Refuse a classifier with fewer outputs than the data has classes.

    Labels at or above the model's number of classes make the loss fail inside the first
    training step of some device; this refuses that before the run. A classifier with more
    outputs than classes works (the extra outputs are never a target) and is only logged.

    Parameters
    ----------
    num_classes_model : int or None
        The configured number of classes of the model; ``None`` takes the data's.
    data : FederatedData
        The loaded dataset (its ``num_classes`` bounds every label).
    key : str, optional
        The config key, named in the error (default ``"model.num_classes"``).

    Returns
    -------
    int
        The number of classes the model is built with.

    Raises
    ------
    StartupError
        If ``num_classes_model`` is not an integer >= 2 or is below the data's classes.
    """
    classes = int(data.num_classes)
    if num_classes_model is None:
        return classes
    if not _is_int(num_classes_model) or int(num_classes_model) < 2:
        raise StartupError(f"{key} must be an integer >= 2 (or null: the dataset's), got {num_classes_model!r}")
    wanted = int(num_classes_model)
    if wanted < classes:
        raise StartupError(
            f"{key}={wanted} but dataset {data.name} has {classes} classes (labels 0..{classes - 1}): the model "
            f"needs at least {classes} outputs; set {key}={classes} or null (the dataset's)"
        )
    if wanted > classes:
        log.warning(
            "%s=%s exceeds the %s classes of dataset %s: %s outputs are never a target",
            key, wanted, classes, data.name, wanted - classes,
        )
    return wanted


def check_trace_devices(
    trace_path: str | os.PathLike | None,
    num_devices: int,
    *,
    devices: Iterable[int] | None = None,
    key: str = "resources.trace_path",
) -> list[int]:
    """Refuse a resource trace file that lacks some devices of the run.

    Without this, the first round that selects a missing device fails inside the simulation.

    Parameters
    ----------
    trace_path : str or PathLike
        The trace CSV (see :func:`flwr_distreal.core.resources.load_trace_csv`).
    num_devices : int
        Devices of the run: ids ``0 .. num_devices - 1`` must all be in the file.
    devices : iterable of int, optional
        The device ids the file covers, when already loaded (e.g.
        ``ResourceModel.devices_in_file``); otherwise the file is read.
    key : str, optional
        The config key, named in the error (default ``"resources.trace_path"``).

    Returns
    -------
    list of int
        The device ids the file covers, sorted.

    Raises
    ------
    StartupError
        If no path is given, the file cannot be read (the reader's reason), or device ids of
        the run are missing (listed).
    """
    if not trace_path:
        raise StartupError(f"{key} is not set; resources.kind=trace needs a CSV file")
    if devices is None:
        try:
            devices = load_trace_csv(trace_path).keys()
        except TraceFileError as err:
            raise StartupError(f"{key}: {err}") from err
    covered = sorted(int(d) for d in devices)
    have = set(covered)
    missing = [d for d in range(int(num_devices)) if d not in have]
    if missing:
        shown = ", ".join(str(d) for d in missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise StartupError(
            f"{key}={trace_path} has no rows for device(s) {shown} of the run's {num_devices} devices "
            f"(ids 0..{int(num_devices) - 1}); the file covers {len(covered)} device(s)"
        )
    return covered


def warn_unused_lut(strategy_name: str, lut: str | os.PathLike | None, key: str = "lut") -> str | None:
    """Warn when a LUT is configured for a strategy that does not use one.

    Parameters
    ----------
    strategy_name : str
        ``strategy.name`` of the run.
    lut : str or PathLike or None
        The configured LUT file (``None`` or empty: none).
    key : str, optional
        The config key, named in the warning (default ``"lut"``).

    Returns
    -------
    str or None
        The logged warning, or ``None`` when there is nothing to warn about.
    """
    users = [name for name in list_methods() if get_method(name).uses_lut]
    if not lut or strategy_name in users or str(lut) in ("learned", "uniform"):
        return None  # the named LUTs are defaults, not something a user pointed at
    message = (
        f"{key}={lut} is ignored: strategy={strategy_name} does not select dropout vectors from a LUT "
        f"(only {', '.join(users)} do{'es' if len(users) == 1 else ''})"
    )
    log.warning(message)
    return message


def check_torch_device(value: str, key: str = "dse.device") -> Any:
    """Refuse a torch device this machine does not have (``gpu9``, ``cuda`` without a GPU, ...).

    Parameters
    ----------
    value : str
        The configured device: ``cpu``, ``cuda``, ``cuda:<index>``, ``mps``, ...
    key : str, optional
        The config key, named in the error (default ``"dse.device"``).

    Returns
    -------
    torch.device
        The parsed device.

    Raises
    ------
    StartupError
        If ``value`` is not a device name, its kind is not available here, or its index is
        beyond the devices of that kind.
    """
    import torch  # deferred: a run on auto or cpu starts without torch (the runner of flwr run never loads it)

    hint = f"use {key}=cpu, {key}=cuda or {key}=cuda:<index>"
    try:
        dev = torch.device(str(value))
    except (RuntimeError, ValueError, TypeError) as err:
        raise StartupError(f"{key}={value!r} is not a torch device ({err}); {hint}") from err
    if dev.type == "cpu":
        return dev
    backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    available = getattr(backend, "is_available", None)
    if dev.type == "mps":
        available = torch.backends.mps.is_available
    if not callable(available):
        raise StartupError(f"{key}={value!r}: a {dev.type!r} device cannot train models here; {hint}")
    if not available():
        raise StartupError(
            f"{key}={value!r} but no {dev.type} device is available on this machine "
            f"(torch.{dev.type}.is_available() is False); use {key}=cpu"
        )
    count = getattr(backend, "device_count", None)
    if dev.index is not None and callable(count) and dev.index >= int(count()):
        n = int(count())
        raise StartupError(
            f"{key}={value!r} but this machine has {n} {dev.type} device(s) (indices 0..{n - 1})"
        )
    return dev


def check_output_dir(path: str | os.PathLike, key: str = "dse.output") -> Path:
    """Refuse an output folder that cannot be created or written (checked, not created).

    Parameters
    ----------
    path : str or PathLike
        The folder results go to; it may not exist yet (it is created with its parents).
    key : str, optional
        The config key, named in the error (default ``"dse.output"``).

    Returns
    -------
    Path
        ``path`` as a :class:`~pathlib.Path`.

    Raises
    ------
    StartupError
        If ``path`` is an existing file, an existing ancestor of it is a file, or the folder
        (or the nearest existing ancestor, where it would be created) is not writable.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise StartupError(f"{key}={path} is an existing file, not a folder; choose a folder for the results")
    probe = out
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise StartupError(f"{key}={path} cannot be created: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "is" if probe == out else f"would be created in {probe}, which is"
        raise StartupError(f"{key}={path} {where} not writable; choose a writable folder")
    return out


# ---------------------------------------------------------------------------------------
# A run's start-up: device, client resources, Ray's socket paths, output folder
# ---------------------------------------------------------------------------------------

#: Values of ``runtime`` that start Ray: ``flwr-run`` (Flower's simulation engine, behind the
#: local SuperLink) and ``legacy`` (``run_simulation`` in this process); ``inprocess`` runs its
#: clients one after another in this process, without Ray.
RAY_RUNTIMES: tuple[str, ...] = ("flwr-run", "legacy")

#: The longest Unix socket of a Ray session with the dashboard off (as both runtimes start it):
#: the object store's ``<session>/sockets/plasma_store`` (the raylet's is ``sockets/raylet``).
_RAY_LONGEST_SOCKET = ("sockets", "plasma_store")

#: :class:`flwr_distreal.run.local_runtime.LocalFlwrRuntime` puts Ray's folder at
#: ``<base>/fdr-XXXXXXXX/ray`` (``tempfile.mkdtemp(prefix="fdr-")``: 8 random characters), where
#: ``base`` is :func:`flwr_runtime_base`: the temporary folder where the sockets fit, else ``/tmp``.
_FLWR_RUNTIME_FOLDER = "fdr-XXXXXXXX"


def unix_socket_limit(platform: str | None = None) -> int:
    """The longest path of a Unix domain socket, in bytes.

    ``sockaddr_un.sun_path`` holds 108 bytes on Linux (104 on macOS) with the terminating NUL;
    Ray refuses a longer socket path when it starts (``validate_socket_filepath``).

    Parameters
    ----------
    platform : str, optional
        ``sys.platform`` (default: this machine's).

    Returns
    -------
    int
        107 on Linux, 103 on macOS.
    """
    platform = sys.platform if platform is None else platform
    return (104 if platform.startswith("darwin") else 108) - 1


def _pid_digits() -> int:
    """Digits of the largest process id of this machine (``/proc/sys/kernel/pid_max``; 7,
    Linux's widest, where unknown)."""
    try:
        return len(str(int(Path("/proc/sys/kernel/pid_max").read_text()) - 1))
    except (OSError, ValueError):
        return 7


def ray_socket_path(ray_tmpdir: str | os.PathLike, pid_digits: int | None = None) -> str:
    """The longest Unix socket path Ray creates when its temporary folder is ``ray_tmpdir``.

    Ray (2.x) starts a session in ``<RAY_TMPDIR>/ray/session_<YYYY-MM-DD_HH-MM-SS_ffffff>_<pid>``,
    ``<pid>`` being the process that starts Ray (not known in advance: the widest process id of
    this machine is assumed), and its object store listens on
    ``<session>/sockets/plasma_store``.

    Parameters
    ----------
    ray_tmpdir : str or PathLike
        Ray's temporary folder (``RAY_TMPDIR``).
    pid_digits : int, optional
        Digits of the process id (default: those of this machine's largest one).

    Returns
    -------
    str
        The path, with a placeholder time stamp and process id of the same length.
    """
    digits = _pid_digits() if pid_digits is None else int(pid_digits)
    session = f"session_2026-01-01_00-00-00_000000_{'9' * digits}"
    return os.path.join(os.fspath(ray_tmpdir), "ray", session, *_RAY_LONGEST_SOCKET)


def flwr_runtime_base(base: str | os.PathLike | None = None) -> str:
    """The folder the ``flwr-run`` runtime makes its own temporary folder in: the temporary
    folder (``TMPDIR``) where Ray's sockets under it fit :func:`unix_socket_limit`, else ``/tmp``.

    One rule for :class:`~flwr_distreal.run.local_runtime.LocalFlwrRuntime` (which makes the folder)
    and :func:`ray_temp_dir` (which the start-up check reads): a long ``TMPDIR`` (macOS's
    ``/var/folders/...``, pytest's) is replaced by ``/tmp`` instead of failing inside Ray.

    Parameters
    ----------
    base : str or PathLike, optional
        The temporary folder (default :func:`tempfile.gettempdir`).

    Returns
    -------
    str
        ``base`` when ``<base>/fdr-XXXXXXXX/ray``'s longest socket fits (or ``/tmp`` is no
        folder), else ``/tmp``.
    """
    base = os.fspath(tempfile.gettempdir() if base is None else base)
    ray_dir = os.path.join(base, _FLWR_RUNTIME_FOLDER, "ray")
    if len(ray_socket_path(ray_dir).encode()) <= unix_socket_limit() or not Path("/tmp").is_dir():
        return base
    return "/tmp"


def ray_temp_dir(runtime: str, environ: Mapping[str, str] | None = None) -> tuple[str, str, str] | None:
    """Where a runtime puts Ray's temporary folder, and the environment variable that decides it.

    ``flwr-run``: the local runtime's folder under the temporary folder (``TMPDIR``; ``/tmp``
    where Ray's sockets under it would not fit, :func:`flwr_runtime_base`), see
    :class:`~flwr_distreal.run.local_runtime.LocalFlwrRuntime`. ``legacy``: Ray's own choice in this
    process, ``RAY_TMPDIR`` if set, else ``TMPDIR`` (on Linux), else ``/tmp``.

    Parameters
    ----------
    runtime : str
        ``cfg.runtime``.
    environ : Mapping, optional
        The environment (default ``os.environ``); ``flwr-run`` reads Python's temporary folder.

    Returns
    -------
    tuple of (str, str, str) or None
        ``(ray_tmpdir, variable, value)``: Ray's folder, the variable that decides it and its
        value; ``None`` for a runtime that does not start Ray.
    """
    environ = os.environ if environ is None else environ
    if runtime not in RAY_RUNTIMES:
        return None
    if runtime == "flwr-run":
        base = tempfile.gettempdir()
        return os.path.join(flwr_runtime_base(base), _FLWR_RUNTIME_FOLDER, "ray"), "TMPDIR", base
    # ray._common.utils.get_default_system_temp_dir, which run_simulation's Ray uses here
    if "RAY_TMPDIR" in environ:
        return environ["RAY_TMPDIR"], "RAY_TMPDIR", environ["RAY_TMPDIR"]
    if sys.platform.startswith("linux") and "TMPDIR" in environ:
        return environ["TMPDIR"], "TMPDIR", environ["TMPDIR"]
    if sys.platform.startswith(("linux", "darwin")):
        return "/tmp", "TMPDIR", "/tmp"
    base = tempfile.gettempdir()
    return base, "TMPDIR", base


def check_ray_socket_path(ray_tmpdir: str | os.PathLike, variable: str, value: str, runtime: str) -> str:
    """Refuse a temporary folder whose path leaves Ray's sockets too long to create.

    Without this, Ray fails when it starts, inside the run ("AF_UNIX path length cannot exceed
    107 bytes"), after the data is loaded and the run's processes have started.

    Parameters
    ----------
    ray_tmpdir : str or PathLike
        Ray's temporary folder (see :func:`ray_temp_dir`).
    variable : str
        The environment variable that decides it (named in the error).
    value : str
        Its value.
    runtime : str
        ``cfg.runtime`` (named in the error).

    Returns
    -------
    str
        The longest socket path (:func:`ray_socket_path`).

    Raises
    ------
    StartupError
        If that path is longer than :func:`unix_socket_limit` bytes.
    """
    path = ray_socket_path(ray_tmpdir)
    size, limit = len(path.encode()), unix_socket_limit()
    if size > limit:
        fits = len(str(value).encode()) - (size - limit)
        shorter = f"a {variable} of at most {fits} characters (e.g. {variable}=/tmp)" if fits >= 4 else f"a shorter {variable}"
        raise StartupError(
            f"{variable}={value} is too long for Ray (runtime={runtime}): its socket {path} would have {size} "
            f"bytes, over the {limit} a Unix socket path may have; use {shorter}, or runtime=inprocess (no Ray)"
        )
    return path


def check_run_device(value: str, key: str = "device") -> None:
    """Refuse ``device=cuda`` (or ``cuda:<index>``) on a machine where torch sees no such GPU.

    ``auto`` (CUDA when available) and ``cpu`` always work; torch is imported only for another
    value. Without this, the first client fails inside round 1.

    Parameters
    ----------
    value : str
        The configured device.
    key : str, optional
        The config key, named in the error (default ``"device"``).

    Raises
    ------
    StartupError
        As :func:`check_torch_device`.
    """
    if str(value) in ("auto", "cpu"):
        return
    check_torch_device(str(value), key=key)


def check_client_resources(
    num_cpus: float,
    num_gpus: float,
    runtime: str,
    *,
    cpu_count: int | None = None,
    cpus_key: str = "num_cpus_per_client",
    gpus_key: str = "num_gpus_per_client",
) -> None:
    """Refuse CPUs or GPUs per client that Ray could never give a client on this machine.

    Ray places a client only where its request fits; a request above what the machine has
    leaves every client unplaced, and the run fails late ("An error was encountered", after the
    runtime has started). ``flwr-run`` reserves whole CPUs (the request rounded up). A runtime
    without Ray (``inprocess``) places no client: a GPU request there is only warned about. With
    ``RAY_ADDRESS`` set (the run joins an existing Ray cluster) that cluster's nodes place the
    clients, and nothing is checked against this machine.

    Parameters
    ----------
    num_cpus, num_gpus : float
        ``num_cpus_per_client``, ``num_gpus_per_client``.
    runtime : str
        ``cfg.runtime``.
    cpu_count : int, optional
        CPUs of the machine (default ``os.cpu_count()``).
    cpus_key, gpus_key : str, optional
        The config keys, named in the errors.

    Raises
    ------
    StartupError
        If a client asks Ray for more CPUs than the machine has, for a GPU where torch sees
        none, or for more GPUs than torch sees.
    """
    if runtime not in RAY_RUNTIMES:
        if num_gpus > 0:
            log.warning(
                "%s=%s is not applied by runtime=%s (no Ray: its clients run one after another in this "
                "process, on the torch device of the key device)", gpus_key, num_gpus, runtime,
            )
        return
    if os.environ.get("RAY_ADDRESS") and cpu_count is None:  # an existing Ray cluster places the clients, not this machine
        log.info("RAY_ADDRESS=%s: %s and %s are left to that cluster to place", os.environ["RAY_ADDRESS"], cpus_key, gpus_key)
        return
    cpus = math.ceil(num_cpus) if runtime == "flwr-run" else num_cpus
    have = os.cpu_count() if cpu_count is None else int(cpu_count)
    if have and cpus > have:
        rounded = f" (flwr run reserves whole CPUs: {cpus})" if cpus != num_cpus else ""
        raise StartupError(
            f"{cpus_key}={num_cpus}{rounded} but this machine has {have} CPU(s): Ray could never place a client; "
            f"use at most {have}"
        )
    if num_gpus <= 0:
        return
    import torch  # deferred: only where a GPU is asked for

    if not torch.cuda.is_available():
        raise StartupError(
            f"{gpus_key}={num_gpus} but this machine has no GPU that torch can use (torch.cuda.is_available() is "
            f"False): Ray could never place a client; set {gpus_key}=0"
        )
    count = int(torch.cuda.device_count())
    if num_gpus > count:
        raise StartupError(
            f"{gpus_key}={num_gpus} but this machine has {count} GPU(s): Ray could never place a client; use at "
            f"most {count} (a fraction such as 0.5 lets clients share a GPU)"
        )


def check_run_start(cfg: RunConfig, output_dir: str | os.PathLike | None = None, output_key: str = "output_dir") -> None:
    """Every start-up check of a run that needs no data: call it before loading data or Ray.

    In order: the output folder (:func:`check_output_dir`), the torch device
    (:func:`check_run_device`), the CPUs and GPUs asked per client
    (:func:`check_client_resources`) and, for a runtime that starts Ray, the length of Ray's
    socket paths (:func:`ray_temp_dir`, :func:`check_ray_socket_path`).

    Parameters
    ----------
    cfg : RunConfig
        The validated run configuration.
    output_dir : str or PathLike, optional
        The run's folder when ``cfg.output_dir`` is not set (e.g. Hydra's job folder).
    output_key : str, optional
        The key that sets ``output_dir``, named in its error (default ``"output_dir"``).

    Raises
    ------
    StartupError
        The first check that fails; its message names the key (or environment variable).
    """
    if cfg.output_dir:
        check_output_dir(cfg.output_dir, key="output_dir")
    elif output_dir is not None:
        check_output_dir(output_dir, key=output_key)
    check_run_device(cfg.device)
    check_client_resources(cfg.num_cpus_per_client, cfg.num_gpus_per_client, cfg.runtime)
    ray = ray_temp_dir(cfg.runtime)
    if ray is not None:
        check_ray_socket_path(*ray, runtime=cfg.runtime)
