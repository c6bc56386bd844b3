"""The runner of ``runtime=flwr-run``: checks a run, stages the app and waits out ``flwr run`` on a
private local SuperLink, without loading torch or Flower.

The runner (``python -m flwr_distreal.main``) lives for the whole run beside the processes that
do the work (the SuperLink, the ServerApp/simulation process, one Ray actor per client slot),
and every process that imports torch pays its private memory again (about 0.3 GB with a CUDA
build). So this module and what it imports (the config schemas, the start-up checks, the
recording helpers, the local runtime) stay free of torch and Flower, and the one check that needs
them, building the run's :class:`~flwr_distreal.run.experiment.Experiment` (data, model, LUT:
what refuses a bad input before anything starts), runs in a short-lived process of its own
(:func:`preflight`, ``python -m flwr_distreal.cli.preflight``) that has exited before the
SuperLink starts. ``tests/test_layering.py`` checks that importing this module and composing a
run loads no torch.

:class:`AppRun` is what both app runtimes prepare before the ServerApp starts (the in-process
runtime, :func:`flwr_distreal.run.runtimes.run_inprocess`, builds its experiment in process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .config import RunConfig
from .local_runtime import FlwrRunError, shared_runtime
from .recording import check_run_dir, read_metrics, with_absolute_paths
from .staging import stage_app

__all__ = ["AppRun", "ExperimentRefusedError", "PreflightError", "Preflight", "preflight", "run_with_flwr"]

log = logging.getLogger(__name__)

#: The command that builds a run's experiment in its own process (:func:`preflight`).
PREFLIGHT_MODULE = "flwr_distreal.cli.preflight"


class ExperimentRefusedError(ValueError):
    """The run's experiment refused its input (data, model, LUT, ...) in the preflight process; the
    message is that error's own."""


class PreflightError(RuntimeError):
    """The preflight process failed for another reason than a refused input (its traceback is in
    the message)."""


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What the preflight process learnt of the run: its number of devices and its start line."""

    num_devices: int
    start: str


def preflight(cfg: RunConfig, runtime: str = "flwr run") -> Preflight:
    """Build ``cfg``'s experiment in a process of its own (``python -m`` :data:`PREFLIGHT_MODULE`)
    and return what the runner needs of it; the process has exited when this returns.

    Parameters
    ----------
    cfg : RunConfig
        The validated run configuration (its paths absolute).
    runtime : str, optional
        Named in the start line.

    Raises
    ------
    ExperimentRefusedError
        The experiment refused the input (the project's refusal errors: a missing dataset, a LUT
        that does not fit the model, ...), with that error's message.
    PreflightError
        The process failed otherwise.
    """
    request = json.dumps({"config": dataclasses.asdict(cfg), "runtime": runtime})
    result = subprocess.run(
        [sys.executable, "-m", PREFLIGHT_MODULE], input=request, capture_output=True, text=True, check=False
    )
    answer = _last_json_line(result.stdout)
    if result.returncode == 0 and answer is not None and answer.get("ok"):
        return Preflight(num_devices=int(answer["num_devices"]), start=str(answer["start"]))
    if answer is not None and answer.get("refused"):
        raise ExperimentRefusedError(str(answer["message"]))
    detail = answer.get("message") if answer else ""
    tail = "\n".join(result.stderr.strip().splitlines()[-20:])
    raise PreflightError(
        f"building the run's experiment failed (python -m {PREFLIGHT_MODULE}, exit {result.returncode})"
        f"{': ' + str(detail) if detail else ''}\n{tail}"
    )


def _last_json_line(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


class AppRun:
    """What both app runtimes (``flwr run`` and in-process) prepare before the ServerApp starts:
    the output directory with ``config.yaml`` (the ServerApp composes nothing: it reads this
    file) and a printer of one line per finished round.

    Parameters
    ----------
    cfg : RunConfig
        The checked configuration, its paths absolute (:func:`~flwr_distreal.run.recording.with_absolute_paths`).
    output_dir : path, optional
        The run's folder; without it a temporary one, removed by :meth:`close`.
    show_rounds : bool, optional
        Print a line per finished round.
    """

    def __init__(self, cfg: RunConfig, output_dir: str | os.PathLike | None, show_rounds: bool = True) -> None:
        self.show_rounds = show_rounds
        self.cfg = cfg
        self.tmp = Path(tempfile.mkdtemp(prefix="fdr-run-")) if output_dir is None else None
        self.out = Path(output_dir if output_dir is not None else self.tmp).expanduser().resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        check_run_dir(self.out, cfg)  # refuse before anything starts (the app checks again)
        self.config_file = self.out / "config.yaml"
        self.config_file.write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
        self.metrics = self.out / "metrics.csv"
        self.run_config = {"config-file": str(self.config_file), "output-dir": str(self.out)}
        self._shown = len(read_metrics(self.metrics))

    def progress(self) -> None:
        """Print a line for each round finished since the last call (every ``rounds // 50``-th
        round of a long run)."""
        rows = read_metrics(self.metrics)
        if not self.show_rounds:
            self._shown = len(rows)
            return
        every = max(1, self.cfg.rounds // 50)  # at most ~50 lines per run, and always the last round
        for row in rows[self._shown:]:
            if int(row["round"]) % every and int(row["round"]) != self.cfg.rounds:
                continue
            accuracy = row.get("accuracy")  # None: a round the server did not evaluate (evaluate_every)
            print(
                f"  [{self.cfg.strategy.name}] round {row['round']}/{self.cfg.rounds}: accuracy "
                f"{'not evaluated' if accuracy is None else format(float(accuracy), '.4f')}, "
                f"stragglers {row['stragglers']}/{row['received']}, "
                f"{float(row['wall_time']):.1f} s",
                flush=True,
            )
        self._shown = len(rows)

    def close(self) -> list[dict[str, Any]]:
        """The rows of ``metrics.csv``; removes the temporary output directory, if any."""
        rows = read_metrics(self.metrics)
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return rows


def next_log(out: Path) -> Path:
    """``flwr.log``, or ``flwr.<n>.log`` when resuming a run that already has one."""
    path, n = out / "flwr.log", 1
    while path.exists():
        path, n = out / f"flwr.{n}.log", n + 1
    return path


def run_with_flwr(
    cfg: RunConfig,
    output_dir: str | os.PathLike | None = None,
    *,
    show_rounds: bool = True,
) -> list[dict[str, Any]]:
    """Run the Message-API app (:mod:`flwr_distreal.run.flwr_app`) with ``flwr run`` on this process's
    private local SuperLink (:func:`flwr_distreal.run.local_runtime.shared_runtime`), one simulated
    SuperNode per device, and return the rows the ServerApp wrote to ``metrics.csv``.

    The experiment is checked first in a process of its own (:func:`preflight`), so this process
    never loads torch. Prints one line per finished round. Raises
    :class:`~flwr_distreal.run.local_runtime.FlwrRunError` when the run does not finish as
    completed (with Flower's reason and the log's path).
    """
    cfg = with_absolute_paths(cfg)  # the app runs in the SuperLink's working directory
    checked = preflight(cfg)  # refuse bad input here, before anything starts
    log.info("%s", checked.start)
    run = AppRun(cfg, output_dir, show_rounds)
    if cfg.num_cpus_per_client != math.ceil(cfg.num_cpus_per_client):
        log.warning(
            "num_cpus_per_client=%s: flwr run reserves whole CPUs per client, using %s",
            cfg.num_cpus_per_client, math.ceil(cfg.num_cpus_per_client),
        )
    runtime = shared_runtime()
    try:
        result = runtime.run(
            stage_app(runtime.root / "flwr-distreal"),  # flwr walks every file of the folder it is given
            checked.num_devices,
            run.run_config,
            federation_config={
                # Flower's simulation config takes whole CPUs per client; GPUs may be fractional
                # (several clients share one GPU)
                "client-resources-num-cpus": max(1, math.ceil(cfg.num_cpus_per_client)),
                "client-resources-num-gpus": float(cfg.num_gpus_per_client),
            },
            log_path=next_log(run.out),
            on_poll=run.progress,
        )
        if not result.ok:
            raise FlwrRunError(
                f"run {result.run_id} ended {result.status}: {result.details}; logs: {result.log_path}"
            )
    finally:
        rows = run.close()
    return rows
