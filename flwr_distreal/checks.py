"""Start-up checks: refuse, before round 1, what would otherwise fail late or unclearly.

Each function checks one thing a run (or the DSE command) is about to rely on and raises
:class:`StartupError` naming the config key and the offending value; :func:`warn_unused_lut`
only warns. They are pure functions over values already loaded (a dataset, a config value, a
path), so the experiment (:mod:`flwr_distreal.experiment`) and the DSE command
(:mod:`flwr_distreal.dse.__main__`) call them right after reading their config.

No Flower or Hydra imports; ``torch`` is imported only by :func:`check_torch_device`.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Iterable
from logging import getLogger
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .data import FederatedData

__all__ = [
    "LUT_STRATEGIES",
    "StartupError",
    "check_classes",
    "check_output_dir",
    "check_seed",
    "check_torch_device",
    "check_trace_devices",
    "warn_unused_lut",
]

log = getLogger(__name__)

#: Strategies whose devices select dropout vectors from a LUT (the ``lut`` key).
LUT_STRATEGIES: tuple[str, ...] = ("distreal",)


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
        The trace CSV (see :func:`flwr_distreal.resources.load_trace_csv`).
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
        from .resources import TraceFileError, load_trace_csv

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
    if not lut or strategy_name in LUT_STRATEGIES or str(lut) in ("learned", "uniform"):
        return None  # the named LUTs are defaults, not something a user pointed at
    message = (
        f"{key}={lut} is ignored: strategy={strategy_name} does not select dropout vectors from a LUT "
        f"(only {', '.join(LUT_STRATEGIES)} does)"
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
    import torch

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
