"""Memory layout of the models, chosen by measurement per machine (``layout: auto``).

Whether channels-last (NHWC) or the classic contiguous layout (NCHW) trains faster depends on
the CPU, the oneDNN kernels of the torch version, the model and the batch size, and differs
between the full model and the compact (narrowed) steps that dropout produces: on one CPU
channels-last was 0.71x NCHW; on another it was equal for the full model and 1.17x NCHW (slower)
for compact steps at uniform rate 0.5 (issue 21). So the runner does not fix a layout:

* ``layout="auto"``: :func:`calibrate_layout` times, for the run's model and batch size, a full
  training step and a compact step at uniform rate 0.5 in both layouts, interleaved (a load
  change during the calibration hits both alike), and picks the layout with the smaller sum of
  the two median step times. It takes a few seconds (``warmup`` + ``repeats`` steps per layout
  and kind; no repeat after the first starts past ``max_seconds``, 10 s) and is cached per machine in a JSON file next to the wall-clock step-time tables
  (``$XDG_CACHE_HOME/flwr_distreal/layouts.json``, see
  :meth:`flwr_distreal.run.experiment.Experiment.default_table_path`), keyed like them
  (:meth:`flwr_distreal.training.wallclock.StepTimeTable.key`): model, batch size, threads, torch device,
  torch version, host, plus the CPU model and the precision. A later run with the same key reads
  the choice without timing anything.
* ``layout="channels_last"`` / ``"nchw"``: forced, no timing.

Values, names and shapes of the parameters are the same in both layouts (``state_dict`` and
the arrays exchanged with the server do not depend on it), so server and clients may even run
different layouts. ``scripts/bench_layout_precision.py`` prints both layouts (and both
precisions) side by side.

No Flower or Hydra imports.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..core.dropout import DropoutModel
from ..core.lut import LUT
from ..models import build_model
from .recipe import Recipe
from .step import LocalStep

__all__ = [
    "LAYOUTS",
    "calibrate_layout",
    "check_layout",
    "cpu_model",
    "default_cache_path",
    "layout_key",
    "measure_layouts",
    "model_layout",
    "resolve_layout",
]

log = logging.getLogger(__name__)

#: Valid values of the ``layout`` option.
LAYOUTS = ("auto", "channels_last", "nchw")

CACHE_FORMAT = "flwr_distreal.layouts"
CACHE_VERSION = 1

#: Uniform dropout rate of the compact step the calibration times.
COMPACT_RATE = 0.5


def check_layout(layout: str) -> str:
    """Validate a ``layout`` value; returns it.

    Raises
    ------
    ValueError
        If ``layout`` is not one of :data:`LAYOUTS`.
    """
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    return layout


def model_layout(model: torch.nn.Module) -> str:
    """``"channels_last"`` when the model's 4-D weights are stored channels-last, else ``"nchw"``
    (a weight whose shape makes both layouts the same, e.g. a 1x1 kernel, does not tell)."""
    for p in model.parameters():
        if p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous():
            return "channels_last"
    return "nchw"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/flwr_distreal/layouts.json`` (``~/.cache`` without ``XDG_CACHE_HOME``):
    the folder of the wall-clock step-time tables."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "flwr_distreal"
    return cache / "layouts.json"


def layout_key(
    model_name: str, batch_size: int, torch_device: str | torch.device = "cpu", precision: str = "fp32"
) -> dict[str, Any]:
    """What a layout choice is valid for: model, batch size, threads, device, torch version, host
    and CPU model (the fields of :meth:`~flwr_distreal.training.wallclock.StepTimeTable.key`), precision."""
    return {
        "model": str(model_name),
        "batch_size": int(batch_size),
        "threads": int(torch.get_num_threads()),
        "device": str(torch_device),
        "torch": torch.__version__,
        "host": platform.node(),
        "cpu": cpu_model(),
        "precision": str(precision),
    }


def _build(model_name: str, num_classes: int | None, channels_last: bool, model_kwargs: Mapping[str, Any]) -> DropoutModel:
    return build_model(model_name, num_classes, channels_last=channels_last, **dict(model_kwargs))


def measure_layouts(
    model_name: str,
    batch_size: int,
    *,
    num_classes: int | None = None,
    torch_device: str | torch.device = "cpu",
    precision: str = "fp32",
    repeats: int = 3,
    warmup: int = 1,
    max_seconds: float | None = 10.0,
    model_kwargs: Mapping[str, Any] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Median seconds of a full and of a compact training step (uniform rate 0.5) in each layout.

    Both layouts train copies of the same freshly built model on the same random mini-batch,
    with plain SGD (:class:`~flwr_distreal.training.trainers.LocalStep`) at ``precision``; after
    ``warmup`` untimed steps of each (layout, kind), ``repeats`` rounds visit the four in turn,
    rotated each round; after the first round, no further round starts once ``max_seconds``
    have passed (a loaded machine or a large model: the calibration stays short, ``None``: no
    limit).

    Returns
    -------
    dict
        ``{"channels_last": {"full": s, "compact": s}, "nchw": {...}}``.
    """
    if repeats < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, batch_size >= 1; got {repeats}, {warmup}, {batch_size}")
    base = _build(model_name, num_classes, False, model_kwargs or {})
    other = copy.deepcopy(base).to(memory_format=torch.channels_last)
    base.seed_dropout(seed)
    other.seed_dropout(seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((int(batch_size), *base.input_shape), generator=gen).to(torch_device)
    y = torch.randint(0, base.num_classes, (int(batch_size),), generator=gen).to(torch_device)
    compact = LUT.uniform(base, [COMPACT_RATE]).vectors[0]
    recipe = Recipe.constant(0.01, 0.0, 0.0)
    models = {"nchw": base.to(torch_device), "channels_last": other.to(torch_device)}
    steps = {name: LocalStep(m, recipe, precision=precision) for name, m in models.items()}
    points = [(name, kind) for name in ("channels_last", "nchw") for kind in ("full", "compact")]

    def step(name: str, kind: str) -> float:
        _sync(torch_device)
        t = clock()
        steps[name](x, y, None if kind == "full" else compact)
        _sync(torch_device)
        return clock() - t

    for point in points:
        for _ in range(warmup):
            step(*point)
    times: dict[tuple[str, str], list[float]] = {p: [] for p in points}
    started = clock()
    for r in range(repeats):
        if r > 0 and max_seconds is not None and clock() - started > max_seconds:
            log.info("layout calibration of %s: %d of %d repeats within %.0f s", model_name, r, repeats, max_seconds)
            break
        shift = r % len(points)
        for point in points[shift:] + points[:shift]:
            times[point].append(step(*point))
    out: dict[str, dict[str, float]] = {"channels_last": {}, "nchw": {}}
    for (name, kind), ts in times.items():
        out[name][kind] = float(np.median(ts))
    return out


def _sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _read_cache(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        log.warning("Ignoring layout cache %s: %s", path, err)
        return []
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION:
        log.warning("Ignoring layout cache %s: not a %s v%s file", path, CACHE_FORMAT, CACHE_VERSION)
        return []
    entries = data.get("entries")
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _write_cache(path: Path, entries: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # per process: Ray workers may write at once
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "entries": entries}, indent=1))
    tmp.replace(path)


def calibrate_layout(
    model_name: str,
    batch_size: int,
    *,
    num_classes: int | None = None,
    torch_device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_path: str | Path | None = None,
    force: bool = False,
    repeats: int = 3,
    warmup: int = 1,
    model_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The faster layout for ``model_name`` at ``batch_size`` on this machine, cached.

    Parameters
    ----------
    model_name : str
        A registered model (:func:`~flwr_distreal.models.build_model`).
    batch_size : int
        The mini-batch size of the run.
    num_classes : int, optional
        Classifier outputs (the model's default if ``None``).
    torch_device : str or torch.device (default: "cpu")
        Where the run trains.
    precision : str (default: "fp32")
        The run's precision (:mod:`flwr_distreal.core.precision`).
    cache_path : str or Path, optional
        The JSON cache; default :func:`default_cache_path`.
    force : bool (default: False)
        Measure even when the cache holds this key (and replace the entry).
    repeats, warmup : int
        Of :func:`measure_layouts`.
    model_kwargs : Mapping, optional
        Builder options of the model.

    Returns
    -------
    str
        ``"channels_last"`` or ``"nchw"``: the smaller sum of the full and the compact step's
        median times.
    """
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = layout_key(model_name, batch_size, torch_device, precision)
    entries = _read_cache(path)
    if not force:
        for entry in entries:
            if entry.get("key") == key and entry.get("layout") in ("channels_last", "nchw"):
                log.debug("layout of %s at batch %s from %s: %s", model_name, batch_size, path, entry["layout"])
                return str(entry["layout"])
    started = time.perf_counter()
    seconds = measure_layouts(
        model_name, batch_size, num_classes=num_classes, torch_device=torch_device, precision=precision,
        repeats=repeats, warmup=warmup, model_kwargs=model_kwargs,
    )
    total = {name: s["full"] + s["compact"] for name, s in seconds.items()}
    choice = min(total, key=lambda name: (total[name], name != "channels_last"))
    log.info(
        "layout=auto for %s at batch %s (%s): channels-last full %.1f ms + compact %.1f ms, NCHW full %.1f ms + "
        "compact %.1f ms -> %s (calibrated in %.1f s, cached in %s)",
        model_name, batch_size, precision,
        seconds["channels_last"]["full"] * 1e3, seconds["channels_last"]["compact"] * 1e3,
        seconds["nchw"]["full"] * 1e3, seconds["nchw"]["compact"] * 1e3, choice,
        time.perf_counter() - started, path,
    )
    entries = [e for e in _read_cache(path) if e.get("key") != key]  # re-read: another process may have written
    entries.append({"key": key, "layout": choice, "seconds": seconds, "measured_at": time.time()})
    try:
        _write_cache(path, entries)
    except OSError as err:
        log.warning("Could not write the layout cache %s: %s", path, err)
    return choice


def resolve_layout(
    layout: str,
    model_name: str,
    batch_size: int,
    *,
    num_classes: int | None = None,
    torch_device: str | torch.device = "cpu",
    precision: str = "fp32",
    cache_path: str | Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """``"channels_last"`` or ``"nchw"`` for a ``layout`` setting: forced values as they are,
    ``"auto"`` by :func:`calibrate_layout` (cached).

    Raises
    ------
    ValueError
        If ``layout`` is not one of :data:`LAYOUTS`.
    """
    if check_layout(layout) != "auto":
        return layout
    return calibrate_layout(
        model_name, batch_size, num_classes=num_classes, torch_device=torch_device, precision=precision,
        cache_path=cache_path, model_kwargs=model_kwargs,
    )
