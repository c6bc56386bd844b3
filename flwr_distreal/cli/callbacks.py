"""Hydra hooks of the runner: sweep progress and report, and a console for people.

:class:`SweepReport` is a Hydra callback. It prints one line when a job ends::

    [3/18] 2_heterofl_seed0 finished in 42 s; ~11 min left

and writes the sweep's report (:func:`flwr_distreal.cli.report.write_report`) when the last job has
ended. The presets in ``conf/experiment/`` attach it; attach it to any sweep with
``hydra/callbacks=sweep_report`` (``conf/hydra/callbacks/sweep_report.yaml``) or in a config::

    hydra:
      callbacks:
        sweep_report:
          _target_: flwr_distreal.cli.callbacks.SweepReport
          targets: [0.7, 0.75]
          at_rounds: [25, 50, 100]

:class:`ConsoleFilter` and :class:`ConsoleFormatter` make the job's console (``conf/hydra/
job_logging/distreal.yaml``) show warnings and the runner's own lines only; the job's log file
keeps every record, Flower's included. :func:`route_flower_logs` takes Flower's own console
handler off its logger so that its records are not printed twice.

This module imports neither Flower nor torch at import time.
"""

from __future__ import annotations

import importlib
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "ConsoleFilter",
    "ConsoleFormatter",
    "SweepReport",
    "count_sweep_jobs",
    "format_duration",
    "progress_line",
    "route_flower_logs",
]

log = logging.getLogger(__name__)

_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


# ----------------------------------------------------------------------------------------------
# Console


class ConsoleFilter(logging.Filter):
    """Pass warnings and errors of every logger, and INFO records only of the loggers named.

    Parameters
    ----------
    info_from : sequence of str
        Logger names (a name covers its children) whose INFO records reach the console. The
        default names Hydra (the launcher's ``#k : overrides`` line per job), this module, the
        report and the lr tuner (its results).
    level : int or str
        The level from which every logger's records pass (default ``WARNING``).
    """

    def __init__(
        self,
        info_from: Sequence[str] = ("hydra", "flwr_distreal.cli.callbacks", "flwr_distreal.cli.report", "flwr_distreal.cli.tune"),
        level: int | str = logging.WARNING,
    ) -> None:
        super().__init__()
        self.info_from = tuple(info_from)
        self.level = logging.getLevelName(level) if isinstance(level, str) else int(level)
        if not isinstance(self.level, int):
            raise ValueError(f"ConsoleFilter: unknown log level {level!r}")

    #: Warnings that describe this package's intended setup, not a problem: the strategies evaluate
    #: the global model on the server and set ``fraction_evaluate=0`` on purpose.
    EXPECTED = ("fraction_evaluate is set to 0.0",)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("flwr") and any(e in str(record.msg) for e in self.EXPECTED):
            return False  # still in the job's main.log
        if record.levelno >= self.level:
            return True
        if record.levelno < logging.INFO:
            return False
        return any(record.name == n or record.name.startswith(n + ".") for n in self.info_from)


class ConsoleFormatter(logging.Formatter):
    """INFO lines as their bare message; warnings and errors with their level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        if record.levelno <= logging.INFO:
            return message
        return f"{record.levelname} [{record.name}] {message}"


def route_flower_logs() -> bool:
    """Send Flower's log records through the root logger only (the job's console and file).

    Flower attaches its own console handler to the ``flwr`` logger at import; under Hydra's job
    logging its records then also propagate to the root logger's console, so every line appears
    twice. When the root logger has handlers (Hydra configured logging), this removes Flower's
    console handler and lets ``flwr`` propagate; without root handlers it changes nothing, so
    Flower's output is never lost.

    Returns
    -------
    bool
        Whether Flower's console handler was removed.
    """
    if not logging.getLogger().handlers:
        return False
    importlib.import_module("flwr.common.logger")  # Flower attaches its handler when first imported

    flwr_logger = logging.getLogger("flwr")
    consoles = [
        h for h in flwr_logger.handlers
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
    ]
    for handler in consoles:
        flwr_logger.removeHandler(handler)
    flwr_logger.propagate = True
    return bool(consoles)


# ----------------------------------------------------------------------------------------------
# Sweep progress


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"3.5 min"`` or ``"2.1 h"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def progress_line(
    done: int,
    total: int | None,
    job: str,
    seconds: float,
    durations: Sequence[float],
    failed: str | None = None,
) -> str:
    """The line printed when a job of a sweep ends.

    Parameters
    ----------
    done : int
        Jobs ended so far, this one included.
    total : int or None
        Jobs in the sweep (``None`` when the sweeper cannot say).
    job : str
        The job's name (its output directory's name).
    seconds : float
        How long this job took.
    durations : sequence of float
        How long every ended job took; their mean times the jobs left is the time left.
    failed : str, optional
        The job's error, when it failed.

    Returns
    -------
    str
        ``"[3/18] 2_heterofl_seed0 finished in 42 s; ~11 min left"``.
    """
    count = f"[{done}/{total if total is not None else '?'}]"
    what = f"FAILED after {format_duration(seconds)} ({failed})" if failed else f"finished in {format_duration(seconds)}"
    line = f"{count} {job} {what}"
    if total is None:
        return line
    left = total - done
    if left <= 0:
        return f"{line}; sweep done"
    remaining = (sum(durations) / len(durations) if durations else seconds) * left
    if remaining < 90 * 60:
        return f"{line}; ~{max(remaining / 60, 0.1):.1f} min left"
    return f"{line}; ~{remaining / 3600:.1f} h left"


def count_sweep_jobs(config: DictConfig) -> int | None:
    """How many jobs Hydra's basic sweeper will launch for ``config`` (the multirun's config).

    Expands the sweep the way :class:`~hydra._internal.core_plugins.basic_sweeper.BasicSweeper`
    does: ``hydra.sweeper.params`` followed by the command line's overrides, as a cartesian
    product. Returns ``None`` for any other sweeper.
    """
    sweeper = OmegaConf.select(config, "hydra.sweeper._target_", default=None)
    if sweeper != _BASIC_SWEEPER:
        return None
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    lines = [f"{k}={v}" for k, v in params.items()]
    lines += list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
    overrides = OverridesParser.create().parse_overrides(lines)
    return sum(len(batch) for batch in BasicSweeper.split_arguments(overrides, None))


class SweepReport(Callback):
    """Hydra callback: a progress line per ended job, the sweep's report after the last one.

    Parameters
    ----------
    report : bool
        Write the report (:func:`flwr_distreal.cli.report.write_report`) into
        ``<sweep dir>/report`` when the sweep ends, and print its final-accuracy table.
    targets : sequence of float
        Accuracies for the report's rounds-to-reach table.
    at_rounds : sequence of int
        Rounds for the report's accuracy-at-rounds table.
    plots : bool
        Write the report's PNGs.
    """

    def __init__(
        self,
        report: bool = True,
        targets: Sequence[float] = (0.7, 0.75),
        at_rounds: Sequence[int] = (25, 50, 100),
        plots: bool = True,
    ) -> None:
        bad = [t for t in targets if not 0 < float(t) <= 1]
        if bad:
            raise ValueError(f"SweepReport: targets are accuracies in (0, 1], got {bad}")
        if any(int(r) < 1 for r in at_rounds):
            raise ValueError(f"SweepReport: at_rounds must be >= 1, got {list(at_rounds)}")
        self.report = report
        self.targets = [float(t) for t in targets]
        self.at_rounds = [int(r) for r in at_rounds]
        self.plots = plots
        self.total: int | None = None
        self.durations: list[float] = []
        self.sweep_dir: Path | None = None
        self._job_start: float | None = None
        self._reported = False

    # Hydra hooks -------------------------------------------------------------------------------

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self.total = count_sweep_jobs(config)
        except Exception as err:  # a sweep the count cannot parse still runs; it just has no ETA
            log.debug("could not count the sweep's jobs: %s", err)
            self.total = None
        self.durations, self._reported = [], False
        self.sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._job_start = time.monotonic()

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if self.sweep_dir is None:
            return  # a single run (no multirun started): its own lines are enough
        seconds = time.monotonic() - self._job_start if self._job_start is not None else 0.0
        self.durations.append(seconds)
        out = OmegaConf.select(config, "hydra.runtime.output_dir", default=None)
        job = Path(str(out)).name if out else str(OmegaConf.select(config, "hydra.job.num", default="?"))
        failed = None
        status = getattr(job_return, "status", None)
        if status is not None and getattr(status, "name", "") == "FAILED":
            error = getattr(job_return, "_return_value", None)
            failed = f"{type(error).__name__}: {error}" if error is not None else "failed"
            failed = failed if len(failed) <= 160 else failed[:157] + "..."  # the traceback has it all
        log.info("%s", progress_line(len(self.durations), self.total, job, seconds, self.durations, failed))
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir", default=None)
        if sweep_dir is not None:
            self.sweep_dir = Path(str(sweep_dir))
        # Hydra's basic sweeper raises after a batch with a failed job, before on_multirun_end:
        # report after the last job, so a sweep with failures still gets its report
        if self.total is not None and len(self.durations) >= self.total:
            self._write()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._write()

    # -------------------------------------------------------------------------------------------

    def _write(self) -> None:
        if not self.report or self._reported or self.sweep_dir is None:
            return
        self._reported = True
        from .report import ReportError, write_report

        try:
            files = write_report(self.sweep_dir, targets=self.targets, at_rounds=self.at_rounds, plots=self.plots)
        except ReportError as err:
            log.warning("no sweep report: %s", err)
            return
        print("\n" + files["final_accuracy_md"].read_text(), end="", file=sys.stdout, flush=True)
        log.info("sweep report: %s (tables as CSV and Markdown, curves as PNG)", files["report"])
