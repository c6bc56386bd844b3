"""Hydra entry point: one federated simulation per (multi)run.

    python -m flwr_distreal.main strategy=distreal resources=timevarying resources.lam=2
    python -m flwr_distreal.main -m strategy=distreal,feddropout,heterofl resources.lam=0.5,1,2,4 seed=0,1,2

Each run writes, into its Hydra output directory, the resolved ``config.yaml``,
``metrics.csv`` (one row per round) and ``accuracy.png``. The console shows one line per round
and the run's summary (``conf/hydra/job_logging/distreal.yaml``); the job's ``main.log`` keeps
every log record, Flower's included, once.

Errors. A run that cannot work is refused before round 1, before any data is loaded or Ray
starts where the check needs neither (:func:`flwr_distreal.run.config.to_run_config`, then
:func:`flwr_distreal.run.checks.check_run_start`): one line ``error: <message>`` on stderr, naming
the key, and exit code 2 (:data:`EXIT_REFUSED`). The project's own input errors raised later
(a data folder, a LUT, a checkpoint that does not fit) end the same way; a run that fails
(:class:`~flwr_distreal.run.recording.RunFailedError`, a ``flwr run`` that did not complete) prints
one line and exits with 1 (:data:`EXIT_FAILED`). The job's log file keeps the traceback; set
``DISTREAL_DEBUG=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) to have it printed instead. In a
multirun (``-m``) a refused or failed job logs its one line and the sweep goes on with the
next job; Hydra then ends the sweep with the first failed job's overrides and message (exit
code 1). Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from .callbacks import route_flower_logs
from ..run.checks import check_run_start
from ..run.config import RunConfig, register_configs, to_run_config
from ..run.recording import summary_line
from ..run.resolvers import CONF_DIR, register_resolvers

log = logging.getLogger("flwr_distreal.cli.main")  # not "__main__" under python -m

register_configs()
register_resolvers()  # lr: ${tuned_lr:<setting>} (conf/tuned/)

#: Exit code of a run refused for its input (config, files, machine).
EXIT_REFUSED = 2
#: Exit code of a run that started and failed (clients failing, loss non-finite, ``flwr run``).
EXIT_FAILED = 1
#: Environment variables that, set to ``1``, print the traceback of a refused or failed run.
DEBUG_VARIABLES = ("DISTREAL_DEBUG", "HYDRA_FULL_ERROR")

#: The project's errors that say an input cannot work, wherever a run raises them (all come
#: before round 1): module -> class names. Looked up in ``sys.modules``: an error of a module
#: never imported cannot have been raised, and a refusal imports nothing.
_REFUSALS = {
    "flwr_distreal.run.config": ("ConfigError",),
    "flwr_distreal.run.checks": ("StartupError",),
    "flwr_distreal.run.recording": ("RunDirectoryError",),
    "flwr_distreal.run.experiment": ("NodeConfigError",),
    "flwr_distreal.run.checkpoint": ("CheckpointError",),
    "flwr_distreal.data": ("DataError",),
    "flwr_distreal.core.lut": ("LUTError",),
    "flwr_distreal.core.resources": ("ResourceError",),
    "flwr_distreal.core.channel_graph": ("UnsupportedModelError",),
    "flwr_distreal.run.flwr_runner": ("ExperimentRefusedError",),  # one of the above, in the preflight process
}
#: Errors of a run that started and failed: module -> class names.
_FAILURES = {
    "flwr_distreal.run.recording": ("RunFailedError",),
    "flwr_distreal.run.local_runtime": ("FlwrRunError",),
}
#: What the start-up (config conversion and checks) raises for a bad input.
_STARTUP_ERRORS = (ValueError, TypeError, OmegaConfBaseException)


class JobError(CompactHydraException):
    """A refused or failed job of a multirun: Hydra records it and prints its message alone."""


def debug_requested() -> bool:
    """Whether one of :data:`DEBUG_VARIABLES` is ``1`` (print tracebacks)."""
    return any(os.environ.get(name) == "1" for name in DEBUG_VARIABLES)


def _is_one_of(err: BaseException, classes: dict[str, tuple[str, ...]]) -> bool:
    for module, names in classes.items():
        mod = sys.modules.get(module)
        if mod is None:
            continue
        types = tuple(t for t in (getattr(mod, name, None) for name in names) if isinstance(t, type))
        if types and isinstance(err, types):
            return True
    return False


def exit_code(err: BaseException, *, startup: bool = False) -> int | None:
    """The exit code a run ends with for ``err``, or None for an error that keeps its traceback.

    Parameters
    ----------
    err : BaseException
        The error.
    startup : bool, optional
        Whether it was raised by the start-up (config conversion and checks, before anything
        is loaded): there, any ``ValueError``/``TypeError`` (and OmegaConf's errors) refuses.

    Returns
    -------
    int or None
        :data:`EXIT_REFUSED`, :data:`EXIT_FAILED`, or None.
    """
    if (startup and isinstance(err, _STARTUP_ERRORS)) or _is_one_of(err, _REFUSALS):
        return EXIT_REFUSED
    if _is_one_of(err, _FAILURES):
        return EXIT_FAILED
    return None


def one_line(err: BaseException) -> str:
    """``err``'s message on one line (a multi-line message's lines joined by ``"; "``)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return "; ".join(lines) or type(err).__name__


def _stop(err: BaseException, code: int) -> NoReturn:
    """End the job for ``err``: one line, its traceback in the job's log file only."""
    message = one_line(err)
    what = "refused" if code == EXIT_REFUSED else "failed"
    log.info("run %s (%s); traceback:", what, type(err).__name__, exc_info=err)  # the log file only
    mode = HydraConfig.get().mode if HydraConfig.initialized() else None
    if mode == RunMode.MULTIRUN:  # Hydra records the job as failed and runs the next one
        log.error("%s", message)
        raise JobError(message) from err
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def one_line_errors(*, startup: bool = False) -> Iterator[None]:
    """End the job with one line for an error :func:`exit_code` classifies.

    Inside the block, a refusal or a run failure ends the job: a single run prints ``error:
    <message>`` on stderr and exits with the code; a multirun job logs the line and raises
    :class:`JobError` (Hydra records the job as failed and goes on). With
    :func:`debug_requested`, and for any other error, the exception propagates unchanged.

    Parameters
    ----------
    startup : bool, optional
        The block is the start-up: any ``ValueError``/``TypeError`` refuses the run.
    """
    try:
        yield
    except Exception as err:
        code = exit_code(err, startup=startup)
        if code is None or debug_requested():
            raise
        _stop(err, code)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Validate the composed config, run the simulation, return the final accuracy."""
    route_flower_logs()  # Flower's records through the job's handlers only (no duplicate lines)
    with one_line_errors(startup=True):  # before any data is loaded and before Ray starts
        run_cfg = to_run_config(cfg)  # range checks
        out = run_cfg.output_dir or HydraConfig.get().runtime.output_dir
        check_run_start(run_cfg, out, output_key="hydra.run.dir")  # device, CPUs/GPUs, Ray's TMPDIR, output_dir
    with one_line_errors():
        return _run(run_cfg, out)


def _run(run_cfg: RunConfig, out: str) -> float:
    """Run the simulation into ``out``; print its summary; return the final accuracy."""
    sweep = HydraConfig.get().mode == RunMode.MULTIRUN  # a sweep prints a line per job, not per round
    # Lazy on purpose (the in-function imports of this entry point): the runtimes load Flower and
    # torch (the ServerApp, ClientApp, strategies); a run refused at start-up answers without them,
    # and a flwr-run runner, which waits beside the run's processes, never loads them
    # (flwr_runner checks the experiment in a process of its own).
    if run_cfg.runtime == "flwr-run":
        from ..run.flwr_runner import run_with_flwr

        rows = run_with_flwr(run_cfg, out, show_rounds=not sweep)
    else:
        from ..run.runtimes import run_experiment

        rows = run_experiment(run_cfg, out, show_rounds=not sweep)
    scored = [r for r in rows if r.get("accuracy") is not None]  # evaluate_every: the last round always is
    final = float(scored[-1]["accuracy"]) if scored else float("nan")
    log.info("final accuracy %.4f; metrics, config and plot in %s", final, out)
    if not sweep:
        print(summary_line(run_cfg, rows, out))
    print(f"Done: final accuracy {final:.4f}. Metrics: {out}/metrics.csv  Plot: {out}/accuracy.png")
    return final


if __name__ == "__main__":
    main()
