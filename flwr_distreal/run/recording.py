"""What a run records: ``metrics.csv``, ``draws.csv``, ``run.json`` and ``config.yaml`` in its output
directory, and the checks on that directory.

:class:`MetricsRecorder` writes one metrics row (and one row of drawn devices) per round as the
run goes; :func:`check_run_dir` refuses a directory that already holds a run (or returns the
checkpoint a resume goes on from); :func:`start_output` and :func:`finish_output` open and close a
run's output; :func:`write_run_record` and :func:`lut_record` keep the audit trail (which LUT, by
its SHA-256); :func:`summary_line` is the end-of-run line; :func:`read_metrics` reads a
``metrics.csv`` back. Shared by every runtime (:mod:`flwr_distreal.run.runtimes`), the ServerApp
(:mod:`flwr_distreal.run.flwr_app`) and the tuner (:mod:`flwr_distreal.cli.tune`). No Flower imports.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from omegaconf import OmegaConf

from ..server.aggregate import update_norms
from .checkpoint import CHECKPOINT_FILE, config_differences, load_checkpoint
from .config import RunConfig
from .plotting import plot_runs
from ..training.recipe import Recipe

if TYPE_CHECKING:  # annotations only: the experiment imports this module; the runner of flwr run, torch-free, too
    from ..core.lut import LUT
    from ..training.trainers import Scalar
    from .experiment import Experiment

__all__ = [
    "CANONICAL_LUT",
    "DRAWS_FILE",
    "RUN_RECORD_FILE",
    "MetricsRecorder",
    "RunDirectoryError",
    "RunFailedError",
    "check_failures",
    "check_run_dir",
    "evaluated",
    "evaluated_rows",
    "finish_output",
    "lut_record",
    "read_metrics",
    "start_line",
    "start_output",
    "summary_line",
    "with_absolute_paths",
    "write_run_record",
]

log = logging.getLogger(__name__)

#: The per-round log of the devices drawn (:class:`MetricsRecorder`), beside ``metrics.csv``.
DRAWS_FILE = "draws.csv"
#: The run's record of what it used (the LUT and its SHA-256), beside ``metrics.csv``.
RUN_RECORD_FILE = "run.json"


#: What ``lut_sha256`` hashes for a LUT the run generates (``lut=uniform``) rather than reads.
CANONICAL_LUT = "canonical JSON of the LUT as used: LUT.to_dict(), sorted keys, no spaces, UTF-8"


def lut_record(spec: str, lut: LUT, file: Path | None) -> dict[str, Any]:
    """Which LUT a run uses, for its audit trail (``run.json``).

    Parameters
    ----------
    spec : str
        The config's ``lut``: ``learned``, ``uniform`` or a file.
    lut : LUT
        The LUT as the run uses it.
    file : Path or None
        The file it was read from (the shipped one for ``learned``); None when generated.

    Returns
    -------
    dict
        ``lut`` (the spec), ``lut_file``, ``lut_sha256`` (SHA-256 of the file's bytes, or for a
        generated LUT of :data:`CANONICAL_LUT`), ``lut_sha256_of`` (``"file"`` or
        :data:`CANONICAL_LUT`) and ``lut_content_sha256`` (:data:`CANONICAL_LUT`, always: it also
        tells apart a learned LUT whose MACs were recomputed for another number of classes).
    """
    canonical = json.dumps(lut.to_dict(), sort_keys=True, separators=(",", ":"), default=str).encode("utf-8")
    content = hashlib.sha256(canonical).hexdigest()
    return {
        "lut": spec,
        "lut_file": str(file) if file is not None else None,
        "lut_sha256": hashlib.sha256(file.read_bytes()).hexdigest() if file is not None else content,
        "lut_sha256_of": "file" if file is not None else CANONICAL_LUT,
        "lut_content_sha256": content,
    }


class MetricsRecorder:
    """Collects one row per round and writes ``metrics.csv`` as the run goes.

    Columns: the server's evaluation (``accuracy``, ``loss``: on the test split, or on the
    validation split with ``evaluate_on=validation``), the round's replies (``received``,
    ``failures``, ``stragglers``, ``refused``, ``clipped``, and ``accepted``: the clients
    aggregated), resources (``mean_macs``, ``mean_utilisation``), the recipe's ``lr`` of the round,
    ``update_norm`` (L2 norm of the aggregated update: the new global model minus the previous one,
    over floating-point entries) and the clocks (``sim_time``, ``wall_time``). A round the server
    did not evaluate (``evaluate_every``) has every other column and empty ``accuracy`` and
    ``loss`` cells (None in :attr:`rows` and from :func:`read_metrics`; see :func:`evaluated`).

    Beside it, ``draws.csv`` (:attr:`DRAW_FIELDS`): per round, the devices (partition ids, sorted,
    space-separated) drawn for training and for federated evaluation (empty: none drawn, as with
    the runner's server-side evaluation), from :meth:`on_draw`; written with the round's metrics
    row, so both files hold the same rounds. For one seed every method draws the same devices.
    A resumed run keeps the rows of the rounds it resumes after and appends the rest.
    """

    DRAW_FIELDS = ["round", "train_devices", "evaluate_devices"]
    FIELDS = [
        "round", "accuracy", "loss", "received", "failures", "stragglers", "refused", "clipped", "accepted",
        "mean_macs", "mean_utilisation", "lr", "update_norm", "sim_time", "wall_time",
    ]

    def __init__(
        self,
        path: Path | None,
        deadline: float,
        rows: list[dict[str, Any]] | None = None,
        lr_fn: Callable[[int], float] | None = None,
    ) -> None:
        self.path = path
        self.deadline = deadline
        self.lr_fn = lr_fn
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows or []]
        self._fit: dict[int, dict[str, Scalar]] = {}
        self._draws: dict[int, dict[str, str]] = {}
        self._previous: list | None = None
        # a resumed run's wall time goes on from where the checkpoint left it
        self._start = time.perf_counter() - (float(self.rows[-1]["wall_time"]) if self.rows else 0.0)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            with tmp.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.FIELDS)
                writer.writeheader()
                writer.writerows({k: r.get(k, "") for k in self.FIELDS} for r in self.rows)
            os.replace(tmp, path)
            self._start_draws(path.with_name(DRAWS_FILE))

    def _start_draws(self, path: Path) -> None:
        """Write ``draws.csv``: a fresh run's header, or a resumed run's rows up to the round it
        resumes after (a round drawn but not checkpointed is drawn again, alike)."""
        done = int(self.rows[-1]["round"]) if self.rows else 0
        kept: list[dict[str, str]] = []
        if done and path.is_file():
            kept = [r for r in _read_csv(path) if str(r.get("round", "")).isdigit() and int(r["round"]) <= done]
        tmp = path.with_name(f".{path.name}.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.DRAW_FIELDS)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.DRAW_FIELDS} for r in kept)
        os.replace(tmp, path)

    def on_draw(self, server_round: int, phase: str, devices: Sequence[int | str]) -> None:
        """The devices drawn in round ``server_round`` for ``phase`` (``"train"`` or ``"evaluate"``)."""
        if phase not in ("train", "evaluate"):
            raise ValueError(f"phase must be 'train' or 'evaluate', got {phase!r}")
        self._draws.setdefault(server_round, {})[f"{phase}_devices"] = " ".join(str(d) for d in devices)

    def on_fit(self, server_round: int, metrics: dict[str, Scalar]) -> None:
        self._fit[server_round] = dict(metrics)

    def set_global(self, arrays: list) -> None:
        """The global model the next round starts from (the reference of its ``update_norm``)."""
        self._previous = [np.array(a, copy=True) for a in arrays]

    def _update_norm(self, arrays: list | None) -> float:
        if arrays is None or self._previous is None or len(arrays) != len(self._previous):
            return math.nan
        return float(np.sqrt(np.sum(update_norms(self._previous, arrays) ** 2)))  # floating arrays, in float64

    def on_evaluate(
        self, server_round: int, loss: float | None, metrics: dict[str, Scalar | None], arrays: list | None = None
    ) -> None:
        """Record round ``server_round`` (its evaluation, and the round's train metrics); ``arrays``:
        the round's new global model, for ``update_norm``. ``loss`` None: the server did not
        evaluate this round (``evaluate_every``): accuracy and loss are recorded empty."""
        evaluated_round = loss is not None
        fit = self._fit.get(server_round, {})
        update_norm = self._update_norm(arrays)
        if arrays is not None:
            self.set_global(arrays)
        row = {
            "round": server_round,
            "accuracy": _float_or_nan(metrics.get("accuracy")) if evaluated_round else None,
            "loss": float(loss) if evaluated_round else None,
            "received": fit.get("received", 0),
            "failures": fit.get("failures", 0),
            "stragglers": fit.get("stragglers", 0),
            "refused": fit.get("refused", 0),
            "clipped": fit.get("clipped", 0),
            "accepted": fit.get("accepted", 0),
            "mean_macs": fit.get("mean_macs", math.nan),
            "mean_utilisation": fit.get("mean_utilisation", math.nan),
            "lr": self.lr_fn(server_round) if self.lr_fn is not None else math.nan,
            "update_norm": update_norm,
            "sim_time": server_round * self.deadline,
            "wall_time": round(time.perf_counter() - self._start, 3),
        }
        self.rows.append(row)
        if self.path is not None:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.FIELDS).writerow(row)
            draws = self._draws.pop(server_round, {})
            with self.path.with_name(DRAWS_FILE).open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.DRAW_FIELDS).writerow(
                    {"round": server_round, "train_devices": "", "evaluate_devices": "", **draws}
                )
        if evaluated_round:
            log.info(
                "round %s: accuracy %.4f loss %.4f stragglers %s/%s mean utilisation %.3f (%.1f s)",
                server_round, row["accuracy"], row["loss"], row["stragglers"], row["received"],
                float(row["mean_utilisation"]),
                row["wall_time"],
            )
        else:
            log.info(
                "round %s: not evaluated (evaluate_every) stragglers %s/%s mean utilisation %.3f (%.1f s)",
                server_round, row["stragglers"], row["received"], float(row["mean_utilisation"]), row["wall_time"],
            )


def _float_or_nan(value: Any) -> float:
    return math.nan if value is None else float(value)


#: The columns a round the server did not evaluate leaves empty (``evaluate_every``).
EVALUATION_FIELDS = ("accuracy", "loss")


def evaluated(row: Mapping[str, Any]) -> bool:
    """Whether a ``metrics.csv`` row (from :class:`MetricsRecorder` or :func:`read_metrics`) holds
    the server's evaluation; False for a round not evaluated (``evaluate_every``: accuracy None or
    an empty cell)."""
    value = row.get("accuracy")
    return value is not None and value != ""


def evaluated_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows of the rounds the server evaluated (see :func:`evaluated`), in their order."""
    return [row for row in rows if evaluated(row)]


class RunDirectoryError(ValueError):
    """The output directory already holds a run (and ``resume`` is off), or a resume does not fit."""


class RunFailedError(RuntimeError):
    """A run could not produce a meaningful result (non-finite loss, clients failing every round)."""


def check_run_dir(out: Path | None, cfg: RunConfig):
    """The checkpoint to resume from (``resume=true``), or None for a fresh run.

    Raises
    ------
    RunDirectoryError
        If ``out`` already holds a run (``metrics.csv`` or a checkpoint) and ``resume`` is off;
        or ``resume`` is on and ``out`` holds no checkpoint, ``rounds`` is below the checkpoint's
        round, or the checkpoint was made with another config (the message names the differing
        keys).
    CheckpointError
        If the checkpoint is unreadable or truncated.
    """
    if out is None:
        if cfg.resume:
            raise RunDirectoryError("resume=true needs an output directory to resume from")
        return None
    holds = [name for name in ("metrics.csv", CHECKPOINT_FILE) if (out / name).exists()]
    if not cfg.resume:
        if holds:
            raise RunDirectoryError(
                f"{out} already holds a run ({', '.join(holds)}); pass resume=true to continue it, or choose "
                "another output directory (nothing was overwritten)"
            )
        return None
    ckpt = load_checkpoint(out)
    if ckpt is None:
        if holds:
            raise RunDirectoryError(f"resume=true but {out} has no {CHECKPOINT_FILE} to resume from (only {holds})")
        raise RunDirectoryError(
            f"resume=true but {out} holds no run to resume (no {CHECKPOINT_FILE}); check the directory, or drop "
            "resume=true to start a fresh run there"
        )
    if cfg.rounds < ckpt.round:
        raise RunDirectoryError(
            f"rounds={cfg.rounds} is below the {ckpt.round} rounds the checkpoint in {out} already holds; a resume "
            f"can only go on (rounds >= {ckpt.round}); its metrics.csv keeps every round (nothing was changed)"
        )
    diff = config_differences(ckpt.config, dataclasses.asdict(cfg))
    if diff:
        raise RunDirectoryError(f"resume=true with another config than the checkpoint's in {out}: {'; '.join(diff)}")
    return ckpt


def check_failures(rows: list[dict[str, Any]], threshold: float) -> None:
    """Refuse a run in which, in every round, more than ``threshold`` of the sampled clients failed.

    Raises
    ------
    RunFailedError
        Saying how many rounds and clients failed.
    """
    if not rows:
        return
    fractions = []
    for row in rows:
        failures, received = float(row.get("failures", 0) or 0), float(row.get("received", 0) or 0)
        fractions.append(failures / (failures + received) if failures + received > 0 else 1.0)
    if all(f > threshold for f in fractions):
        raise RunFailedError(
            f"in every one of the {len(rows)} rounds more than {threshold:.0%} of the sampled clients failed "
            f"(least: {min(fractions):.0%}); the model was trained by too few clients to mean anything. "
            "See the run's log for the clients' errors (failure_threshold sets the limit)"
        )


def start_output(
    out: Path | None,
    cfg: RunConfig,
    rows: list[dict[str, Any]] | None = None,
    exp: Experiment | None = None,
) -> MetricsRecorder:
    """Create the run directory, write the resolved ``config.yaml`` (and with ``exp``, the run
    record ``run.json``, :func:`write_run_record`) and return the recorder that writes
    ``metrics.csv`` and ``draws.csv`` there (``out=None``: record in memory only); ``rows``: the
    rows of a resumed run so far (``metrics.csv`` is rewritten with exactly those)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if exp is not None:  # first: a resume with another LUT is refused before anything is written
            write_run_record(out, cfg, exp.lut_record, int(rows[-1]["round"]) if rows else 0)
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg))))
    lr_fn = Recipe.from_config(cfg).lr_at
    return MetricsRecorder(out / "metrics.csv" if out is not None else None, cfg.deadline, rows, lr_fn)


def write_run_record(out: Path, cfg: RunConfig, lut: Mapping[str, Any], resumed_after: int = 0) -> dict[str, Any]:
    """Write the run's record ``run.json``: what the run used that ``config.yaml`` names only
    (the LUT's SHA-256, :func:`lut_record`), and where the drawn devices are logged.

    A fresh run (``resumed_after=0``) writes it; a resumed one keeps it and appends
    ``{"after_round": resumed_after, "runtime": ...}`` to its ``resumed``.

    Raises
    ------
    RunDirectoryError
        If a resume would use another LUT (other bytes) than the run started with, naming both
        hashes.
    """
    path = out / RUN_RECORD_FILE
    record: dict[str, Any] = {
        "strategy": cfg.strategy.name, "dataset": cfg.dataset.name, "model": cfg.model.name, "seed": cfg.seed,
        "runtime": cfg.runtime, "deployment": cfg.deployment, **dict(lut), "draws": DRAWS_FILE, "resumed": [],
    }
    if resumed_after and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise RunDirectoryError(f"{path} is not a readable run record ({err}); move it away or restore it") from err
        if before.get("lut_sha256") != lut.get("lut_sha256"):
            raise RunDirectoryError(
                f"resume=true but the LUT differs from the one the run in {out} started with: lut={lut.get('lut')!r} "
                f"has sha256 {lut.get('lut_sha256')}, {path} records {before.get('lut_sha256')} "
                f"(lut={before.get('lut')!r}); restore that LUT or start a fresh run (nothing was changed)"
            )
        record = before
    if resumed_after:
        record.setdefault("resumed", []).append({"after_round": int(resumed_after), "runtime": cfg.runtime})
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return record


def _read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV text file as strings.

    Raises
    ------
    RunDirectoryError
        If it cannot be read (not UTF-8, malformed), naming it.
    """
    try:
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        raise RunDirectoryError(
            f"{path} is not a readable CSV file ({type(err).__name__}: {err}); move it away or restore it "
            "(nothing was changed)"
        ) from err


def summary_line(cfg: RunConfig, rows: list[dict[str, Any]], output_dir: str | os.PathLike | None = None) -> str:
    """End-of-run summary: final accuracy and the failures, refusals and stragglers of the run;
    with ``output_dir``, the LUT's SHA-256 from its ``run.json`` (DISTREAL)."""
    lut = ""
    record = Path(output_dir) / RUN_RECORD_FILE if output_dir is not None else None
    if record is not None and record.is_file():
        try:
            sha = json.loads(record.read_text(encoding="utf-8")).get("lut_sha256")
        except (OSError, UnicodeDecodeError, ValueError):
            sha = None
        if sha:
            lut = f"; LUT {cfg.lut} sha256 {sha[:16]}"
    if not rows:
        return f"{cfg.strategy.name}: no round completed{lut}"

    def total(key: str) -> int:
        return int(sum(float(r.get(key, 0) or 0) for r in rows))

    scored = evaluated_rows(rows)  # the last round is always evaluated; a run cut short may end on a gap
    if not scored:
        final = "no round evaluated"
    elif int(scored[-1]["round"]) == int(rows[-1]["round"]):
        final = f"final accuracy {float(scored[-1]['accuracy']):.4f}"
    else:
        final = f"accuracy {float(scored[-1]['accuracy']):.4f} at round {scored[-1]['round']} (the last evaluated)"
    return (
        f"{cfg.strategy.name}: {len(rows)} rounds, {final}; "
        f"failures {total('failures')}, refused {total('refused')}, clipped {total('clipped')}, "
        f"stragglers {total('stragglers')} (of {total('received') + total('failures')} sampled){lut}"
    )


def finish_output(out: Path | None, cfg: RunConfig, recorder: MetricsRecorder) -> None:
    """Plot the recorded rounds to ``accuracy.png`` (when enabled and anything was recorded)."""
    if out is not None and cfg.plot and recorder.rows:
        plot_runs({cfg.strategy.name: recorder.rows}, out / "accuracy.png", title=f"{cfg.dataset.name}: {cfg.strategy.name}")


def start_line(cfg: RunConfig, exp: Experiment, runtime: str) -> str:
    """The line a run logs when it starts: method, dataset, runtime, devices, rounds, model, resources."""
    return (
        f"{cfg.strategy.name} on {cfg.dataset.name} ({runtime}): {exp.num_devices} devices, "
        f"{cfg.clients_per_round} per round, {cfg.rounds} rounds, model {exp.model_name} "
        f"({exp.full_forward_macs / 1e6:.2f} M MACs full), resources {exp.resources}"
    )


def with_absolute_paths(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its relative file paths (``dataset.root``, ``dataset.path``, ``lut``,
    ``resources.trace_path``) made absolute against this process's working directory, for a
    run whose processes start elsewhere (``flwr run``'s SuperLink)."""

    def absolute(path: str | None) -> str | None:
        if not path or "://" in path:
            return path
        return str(Path(path).expanduser().resolve())

    return dataclasses.replace(
        cfg,
        lut=cfg.lut if cfg.lut in ("learned", "uniform") else absolute(cfg.lut),  # keywords, not files
        dataset=dataclasses.replace(cfg.dataset, root=absolute(cfg.dataset.root), path=absolute(cfg.dataset.path)),
        resources=dataclasses.replace(cfg.resources, trace_path=absolute(cfg.resources.trace_path)),
    )


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.csv`` (numbers as floats, ``round`` as int; the empty ``accuracy``
    and ``loss`` of a round not evaluated, ``evaluate_every``, as None); [] if absent.

    Raises
    ------
    RunDirectoryError
        If the file cannot be read as a CSV text file (not UTF-8, malformed), naming it.
    """
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error, OSError) as err:
        raise RunDirectoryError(
            f"{path} is not a readable metrics.csv ({type(err).__name__}: {err}); move it away or restore it "
            "(nothing was changed)"
        ) from err
    out = []
    for row in rows:
        parsed: dict[str, Any] = {}
        for key, value in row.items():
            if key in EVALUATION_FIELDS and value == "":
                parsed[key] = None
                continue
            try:
                parsed[key] = int(value) if key == "round" else float(value)
            except (TypeError, ValueError):
                parsed[key] = value
        out.append(parsed)
    return out
