"""Learning-rate tuning on a validation split, and the resolver that hands the tuned values to runs.

A comparison at one shared learning rate measures step sizes, not methods: the submodel
baselines' aggregated updates are several times as large as full resources' at the same lr.
So every method gets its lr tuned on the same grid with the same budget (the same rounds,
clients, data, resources, seeds), judged on a validation split carved out of the training data
(``validation_fraction``, :meth:`flwr_distreal.data.FederatedData.split_validation`), never on
the test set::

    python -m flwr_distreal.tune tune.setting=femnist_lam2 dataset=femnist_leaf \\
        clients_per_round=35 resources.lam=2 rounds=100 'tune.seeds=[0,1]'

For each entry of ``tune.strategies`` (a strategy, or a variant ``<strategy>@<key>=<value>``
such as ``distreal@lut=uniform``), each lr of ``tune.lrs`` and each seed of ``tune.seeds`` it
runs the federated experiment (:func:`flwr_distreal.run.runtimes.run_experiment`, runtime
``tune.runtime``) with ``validation_fraction=tune.validation_fraction`` and
``evaluate_on=validation``, everything else as composed from ``conf/config.yaml`` and the
command's overrides. The score of a run is its mean validation accuracy over the last
``tune.last_k`` rounds (one round's accuracy is noisy); an lr's score is the mean over the seeds;
each entry gets the best-scoring lr (ties: the smaller lr). A run that fails (diverges, loss not
finite) scores nothing.

Every run has its own folder, ``<tune.output>/<entry>/lr<lr>_seed<seed>``; a finished one
(``metrics.csv`` with every round, or a recorded failure) is reused when the command is run again,
so an interrupted tuning resumes. The results: ``tuning.csv`` and ``tuning.md`` (rows: lr,
columns: entries, best marked), ``runs.csv`` (one row per run), ``tuning.png`` (validation
accuracy against lr) in ``tune.output``, and the tuned file ``conf/tuned/<tune.setting>.yaml``
(``tune.write``) with, per entry, the chosen lr, the grid, the scores, the command and the date.

A run config takes the tuned lr with the ``tuned_lr`` resolver (:mod:`flwr_distreal.run.resolvers`)::

    lr: ${tuned_lr:femnist_lam2}

which picks the entry of the run's ``strategy.name`` (and, for DISTREAL, its ``lut``, and the
keys a variant set). A missing file or entry is an error naming the file and the command that
writes it.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import time
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import MISSING, DictConfig, OmegaConf

from .callbacks import route_flower_logs
from ..run.checkpoint import config_differences
from ..run.checks import check_run_start
from ..methods import get_method
from ..run.config import RUNTIMES, STRATEGIES, RunConfig, register_configs, to_run_config
from ..run.local_runtime import FlwrRunError
from .main import one_line_errors
from .sweep import last_k_score
from ..run.recording import RunFailedError, read_metrics, with_absolute_paths
from ..run.resolvers import (
    CONF_DIR,
    TUNED_DIR,
    TuneError,
    load_tuned,
    lookup_tuned_lr,
    register_resolvers,
    tuned_path,
)

__all__ = [
    "TUNED_DIR",
    "Entry",
    "TuneError",
    "TuneSettings",
    "choose_lr",
    "lookup_tuned_lr",
    "parse_entry",
    "register_resolvers",
    "register_tune_config",
    "run_tuning",
    "score_rows",
    "tuned_path",
]

log = logging.getLogger(__name__)

#: Run-config keys the tuner sets itself (from ``tune.*``); the command must not set them.
TUNER_KEYS = {
    "strategy": "tune.strategies",
    "lr": "tune.lrs",
    "seed": "tune.seeds",
    "validation_fraction": "tune.validation_fraction",
    "evaluate_on": "evaluate_on=validation always",
    "runtime": "tune.runtime",
    "output_dir": "tune.output",
    "resume": "rerun the same command: finished runs are reused",
    "method": "tune.strategies (a method preset sets the strategy; variants: distreal@lut=uniform)",
}
#: Config keys that do not change a run's metrics: a finished run is reused across them.
_NOT_RESULT_KEYS = ("output_dir", "resume", "plot", "runtime", "checkpoint_every")
_SETTING_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_STATUS_FILE = "tune_status.json"


@dataclass
class TuneSettings:
    """The ``tune`` node of ``conf/tune.yaml``.

    Attributes
    ----------
    setting : str
        Name of the tuned file, ``conf/tuned/<setting>.yaml`` (e.g. ``femnist_lam2``).
    strategies : list[str]
        Entries to tune: strategy names, or variants ``<strategy>@<key>=<value>[@...]`` with
        run-config overrides (e.g. ``distreal@lut=uniform``).
    lrs : list[float]
        The learning-rate grid, the same for every entry.
    seeds : list[int]
        Seeds of the tuning runs; an lr's score is the mean over them.
    validation_fraction : float
        Part of each device's training data held out as the validation split.
    last_k : int
        The score of a run is its mean validation accuracy over its last ``last_k`` rounds.
    runtime : str
        Runtime of the runs (``inprocess``, ``legacy`` or ``flwr-run``).
    output : str
        Folder of the runs and of the tables and plot.
    write : str | None
        Where the tuned file goes; None: ``conf/tuned/<setting>.yaml``.
    """

    setting: str = MISSING
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    lrs: list[float] = field(default_factory=lambda: [0.03, 0.05, 0.1, 0.2, 0.3])
    seeds: list[int] = field(default_factory=lambda: [0])
    validation_fraction: float = 0.2
    last_k: int = 5
    runtime: str = "inprocess"
    output: str = "outputs/tune/${tune.setting}"
    write: typing.Optional[str] = None

    def __post_init__(self) -> None:
        if self.setting == MISSING:  # the schema's default instance (conf/tune.yaml sets it: ???)
            return
        if not isinstance(self.setting, str) or not _SETTING_RE.match(self.setting):
            raise TuneError(
                f"tune.setting must be a plain name (letters, digits, '_', '.', '-'), got {self.setting!r}; "
                "it names the tuned file conf/tuned/<setting>.yaml"
            )
        if not self.strategies:
            raise TuneError("tune.strategies is empty; give at least one strategy, e.g. [distreal]")
        entries = [parse_entry(text) for text in self.strategies]
        names = [e.name for e in entries]
        if len(set(names)) != len(names):
            raise TuneError(f"tune.strategies lists an entry twice: {names}")
        if not self.lrs:
            raise TuneError("tune.lrs is empty; give the learning-rate grid, e.g. [0.05,0.1,0.2]")
        if any(not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0) for v in self.lrs):
            raise TuneError(f"tune.lrs must hold finite learning rates > 0, got {list(self.lrs)}")
        if len(set(float(v) for v in self.lrs)) != len(self.lrs):
            raise TuneError(f"tune.lrs lists a learning rate twice: {list(self.lrs)}")
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.seeds):
            raise TuneError(f"tune.seeds must be a non-empty list of ints >= 0, got {list(self.seeds)}")
        if len(set(self.seeds)) != len(self.seeds):
            raise TuneError(f"tune.seeds lists a seed twice: {list(self.seeds)}")
        if not 0 < self.validation_fraction < 1:
            raise TuneError(f"tune.validation_fraction must be in (0, 1), got {self.validation_fraction}")
        if isinstance(self.last_k, bool) or not isinstance(self.last_k, int) or self.last_k < 1:
            raise TuneError(f"tune.last_k must be an int >= 1, got {self.last_k!r}")
        if self.runtime not in RUNTIMES:
            raise TuneError(f"tune.runtime must be one of {list(RUNTIMES)}, got {self.runtime!r}")
        if not self.output:
            raise TuneError("tune.output must name the folder of the tuning runs")

    @property
    def entries(self) -> list[Entry]:
        """The parsed :attr:`strategies`."""
        return [parse_entry(text) for text in self.strategies]

    @property
    def grid(self) -> list[float]:
        """The lrs, ascending."""
        return sorted(float(v) for v in self.lrs)

    def tuned_file(self) -> Path:
        """Where the tuned values are written."""
        return Path(self.write).expanduser() if self.write else tuned_path(self.setting)


# ---------------------------------------------------------------------------------------
# Entries, scores, choice
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One column of the tuning: a strategy, with the run-config overrides of a variant.

    Attributes
    ----------
    name : str
        As written in ``tune.strategies`` (``distreal``, ``distreal@lut=uniform``); the key of
        the entry in the tuned file.
    strategy : str
        The strategy (``strategy=<name>``).
    overrides : tuple[str, ...]
        The variant's Hydra overrides (``lut=uniform``).
    """

    name: str
    strategy: str
    overrides: tuple[str, ...] = ()

    @property
    def keys(self) -> list[str]:
        """The config keys the variant sets."""
        return [_override_key(o) for o in self.overrides]

    @property
    def folder(self) -> str:
        """A file-name-safe form of :attr:`name`."""
        return re.sub(r"[^A-Za-z0-9_.=@-]", "_", self.name)


def parse_entry(text: str) -> Entry:
    """Parse ``<strategy>[@<key>=<value>[@<key>=<value>...]]`` (an entry of ``tune.strategies``).

    Raises
    ------
    TuneError
        If the strategy is unknown, an override lacks ``=``, or it sets a key the tuner sets.
    """
    if not isinstance(text, str) or not text.strip():
        raise TuneError(f"tune.strategies: an entry must be a strategy name, got {text!r}")
    strategy, *overrides = [part.strip() for part in text.strip().split("@")]
    if strategy not in STRATEGIES:
        raise TuneError(
            f"tune.strategies: unknown strategy {strategy!r} in {text!r}; strategies: {list(STRATEGIES)} "
            "(a variant: <strategy>@<key>=<value>, e.g. distreal@lut=uniform)"
        )
    for override in overrides:
        if "=" not in override or not override.split("=", 1)[0]:
            raise TuneError(f"tune.strategies: {text!r}: variant override {override!r} must be <key>=<value>")
        key = _override_key(override)
        if key in TUNER_KEYS:
            raise TuneError(f"tune.strategies: {text!r} sets {key!r}, which the tuner sets ({TUNER_KEYS[key]})")
    return Entry(text.strip(), strategy, tuple(overrides))


def _override_key(override: str) -> str:
    """The config key of a Hydra override (``+a.b@pkg=v`` -> ``a.b``)."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def score_rows(rows: Sequence[dict[str, Any]], last_k: int) -> float:
    """A run's score: its mean accuracy over the last ``last_k`` rounds (all rounds if fewer), over
    the rounds among them the server evaluated (``evaluate_every``; the last round always is).

    Returns NaN for a run without rows or with a non-finite accuracy in those rounds.
    """
    return last_k_score(rows, last_k)  # evaluate_every: the evaluated rounds among the last last_k


def choose_lr(lrs: Sequence[float], scores: Sequence[float], tol: float = 1e-9) -> float | None:
    """The lr with the highest score; ties (within ``tol``) go to the smaller lr; NaN scores
    (failed runs) never win. None when no score is finite."""
    finite = [(float(lr), float(s)) for lr, s in zip(lrs, scores) if math.isfinite(float(s))]
    if not finite:
        return None
    best = max(s for _, s in finite)
    return min(lr for lr, s in finite if s >= best - tol)


# ---------------------------------------------------------------------------------------
# Composition of the runs
# ---------------------------------------------------------------------------------------


def register_tune_config() -> None:
    """Store ``base_tune``, the schema of ``conf/tune.yaml``: the run config's keys plus ``tune``.

    ``conf/tune.yaml`` composes ``conf/config.yaml`` (every run key and group, as a run has them)
    and then ``base_tune``; in ``base_tune`` every run key is MISSING, which a merge leaves as it
    was, so only the typed ``tune`` node (:class:`TuneSettings`) is added.
    """
    register_configs()
    hints = typing.get_type_hints(RunConfig)
    fields = [(f.name, hints[f.name], field(default=MISSING)) for f in dataclasses.fields(RunConfig)]
    schema = dataclasses.make_dataclass(
        "TuneRunConfig",
        [*fields, ("tune", TuneSettings, field(default_factory=TuneSettings))],
        bases=(RunConfig,),
        namespace={"__post_init__": lambda self: None, "__module__": __name__},
    )
    ConfigStore.instance().store(name="base_tune", node=schema)


def run_overrides(task_overrides: Sequence[str]) -> list[str]:
    """The command's overrides that concern the runs (not ``tune.*`` nor ``hydra.*``).

    Raises
    ------
    TuneError
        For an override of a key the tuner sets itself (``lr``, ``strategy``, ``seed``, ...),
        naming the ``tune`` key to use instead.
    """
    out = []
    for override in task_overrides:
        key = _override_key(override)
        if key == "tune" or key.startswith(("tune.", "hydra.")) or key == "hydra":
            continue
        if key in TUNER_KEYS:
            raise TuneError(f"{override!r}: the tuner sets {key!r} itself; use {TUNER_KEYS[key]}")
        out.append(override)
    return out


def compose_run(overrides: Sequence[str]) -> tuple[RunConfig, DictConfig]:
    """``conf/config.yaml`` composed with ``overrides``: the validated run config and the
    composed node (for :func:`_match_of`)."""
    register_configs()
    register_resolvers()
    if GlobalHydra.instance().is_initialized():
        node = compose(config_name="config", overrides=list(overrides))
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            node = compose(config_name="config", overrides=list(overrides))
    return to_run_config(node), node


def _match_of(entry: Entry, node: DictConfig) -> dict[str, Any]:
    """What identifies ``entry``'s runs for :func:`lookup_tuned_lr`: the strategy, its LUT (a
    method that uses one), and the value of every plain key the variant sets."""
    match: dict[str, Any] = {"strategy.name": entry.strategy}
    keys = (["lut"] if get_method(entry.strategy).uses_lut else []) + entry.keys
    for key in keys:
        value = OmegaConf.select(node, key, default=None)
        if not isinstance(value, DictConfig) and not OmegaConf.is_list(value):
            match[key] = value
    return match


@dataclass
class _Run:
    entry: Entry
    lr: float
    seed: int
    cfg: RunConfig
    folder: Path
    score: float = float("nan")
    status: str = "pending"  # done, failed, reused, reused-failed
    seconds: float = float("nan")
    reason: str = ""


def _plan(settings: TuneSettings, base: Sequence[str]) -> tuple[list[_Run], dict[str, dict[str, Any]]]:
    """Compose (and so validate) every run's config before the first run starts."""
    out = Path(settings.output).expanduser()
    runs, matches = [], {}
    for seed in settings.seeds:  # seed outermost: after the first seed the table is complete
        for entry in settings.entries:
            for lr in settings.grid:
                overrides = [
                    *base, f"strategy={entry.strategy}", *entry.overrides, f"lr={lr!r}", f"seed={seed}",
                    f"validation_fraction={settings.validation_fraction!r}", "evaluate_on=validation",
                    f"runtime={settings.runtime}",
                ]
                try:
                    cfg, node = compose_run(overrides)
                except Exception as err:  # Hydra's and the config's errors, with the entry that caused them
                    raise TuneError(f"tune: the run {entry.name} lr={lr} seed={seed} does not compose: {err}") from err
                matches.setdefault(entry.name, _match_of(entry, node))
                runs.append(_Run(entry, lr, seed, cfg, out / entry.folder / f"lr{lr:g}_seed{seed}"))
    if runs:  # device, CPUs/GPUs, Ray's TMPDIR and the output folder are the same for every run
        check_run_start(dataclasses.replace(runs[0].cfg, output_dir=None), out, output_key="tune.output")
    return runs, matches


# ---------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _NOT_RESULT_KEYS}


def _previous(run: _Run, last_k: int) -> str:
    """Look at a run's folder: ``done`` (all rounds recorded; score set), ``failed`` (a recorded
    failure), ``partial`` (an unfinished run, to be rerun) or ``empty``.

    Raises
    ------
    TuneError
        If the folder holds a run of another config.
    """
    saved_file = run.folder / "config.yaml"
    if not run.folder.exists() or not saved_file.is_file():
        return "partial" if run.folder.exists() and any(run.folder.iterdir()) else "empty"
    current = dataclasses.asdict(with_absolute_paths(run.cfg))
    try:
        saved = dataclasses.asdict(with_absolute_paths(to_run_config(OmegaConf.load(saved_file))))
    except Exception as err:  # an unreadable file or one of an older schema
        raise TuneError(
            f"{saved_file} is not a config of this version ({err}); delete {run.folder} to rerun it"
        ) from err
    diff = config_differences(_comparable(saved), _comparable(current), ignore=())
    if diff:
        raise TuneError(
            f"{run.folder} holds a run of another config ({'; '.join(diff[:5])}); give the tuning another "
            "tune.output (or tune.setting), or delete that folder to rerun it"
        )
    status = _read_status(run.folder)
    rows = read_metrics(run.folder / "metrics.csv")
    if len(rows) >= run.cfg.rounds:
        run.score = score_rows(rows[: run.cfg.rounds], last_k)
        run.seconds = float(status.get("seconds", float("nan")))
        return "done"
    if status.get("status") == "failed":
        run.reason = str(status.get("reason", ""))
        run.seconds = float(status.get("seconds", float("nan")))
        return "failed"
    return "partial"


def _read_status(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / _STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_status(folder: Path, **status: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / _STATUS_FILE).write_text(json.dumps(status, indent=1) + "\n")


def _execute(run: _Run, last_k: int) -> None:
    """Run one tuning run into its folder and set its score, status and time."""
    # Lazy on purpose (with main's, the one in-function import of this entry point): the runtimes load
    # Flower; bad tune settings or overrides are refused without them. Called through the module,
    # so a test can stand in for the run (monkeypatch runtimes.run_experiment).
    from ..run import runtimes

    failures: tuple[type[BaseException], ...] = (RunFailedError,)
    if run.cfg.runtime == "flwr-run":  # a diverged run ends the ServerApp with an error (not recorded:
        failures += (FlwrRunError,)  # it may be the runtime's; a rerun of the command retries it)
    start = time.perf_counter()
    try:
        rows = runtimes.run_experiment(run.cfg, run.folder, show_rounds=False)
    except failures as err:
        run.seconds = time.perf_counter() - start
        rows = read_metrics(run.folder / "metrics.csv")
        if len(rows) >= run.cfg.rounds:  # every round recorded, failed after (e.g. too many failures)
            run.status, run.score = "done", score_rows(rows[: run.cfg.rounds], last_k)
            _write_status(run.folder, status="done", seconds=run.seconds, note=f"{type(err).__name__}: {err}")
        else:
            run.status, run.reason = "failed", f"{type(err).__name__}: {err}"
            if isinstance(err, RunFailedError):  # the run's own verdict: reused on resume
                _write_status(run.folder, status="failed", seconds=run.seconds, reason=run.reason)
        return
    run.seconds = time.perf_counter() - start
    if len(rows) < run.cfg.rounds:
        raise TuneError(f"{run.folder}: the run returned {len(rows)} of {run.cfg.rounds} rounds")
    run.status, run.score = "done", score_rows(rows[: run.cfg.rounds], last_k)
    _write_status(run.folder, status="done", seconds=run.seconds)
    (run.folder / "checkpoint.npz").unlink(missing_ok=True)  # a finished tuning run is never resumed


def _eta(seconds: list[float], left: int) -> str:
    if not seconds or left == 0:
        return "done" if left == 0 else "time left unknown"
    rest = sum(seconds) / len(seconds) * left
    return f"~{rest / 60:.0f} min left" if rest >= 90 else f"~{rest:.0f} s left"


def run_tuning(
    settings: TuneSettings,
    overrides: Sequence[str] = (),
    command: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, dict[str, Any]]:
    """Tune the lr of every entry; write the tables, the plot and the tuned file.

    Parameters
    ----------
    settings : TuneSettings
        The grid, entries, seeds, scoring and output.
    overrides : sequence of str
        Hydra overrides of the runs (as on ``python -m flwr_distreal.main``); keys the tuner
        sets (``lr``, ``strategy``, ``seed``, ...) are refused.
    command : str, optional
        The command recorded in the tuned file (default: built from ``overrides``).
    echo : callable
        Where progress lines and the table go.

    Returns
    -------
    dict
        Per entry name: ``lr`` (the chosen lr, None if every run failed), ``scores`` (aligned
        with the ascending grid, NaN for failed), ``match``.

    Raises
    ------
    TuneError
        For bad settings or overrides, a run folder of another config, or an entry whose every
        run failed (after writing the tables).
    """
    base = run_overrides(overrides)
    if command is None:
        command = " ".join(["python -m flwr_distreal.tune", f"tune.setting={settings.setting}",
                            *(shlex.quote(o) for o in base)])
    runs, matches = _plan(settings, base)
    rounds = runs[0].cfg.rounds
    if rounds < settings.last_k:
        log.warning("rounds=%d < tune.last_k=%d: each run is scored by its mean over all %d rounds",
                    rounds, settings.last_k, rounds)
    out = Path(settings.output).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    echo(
        f"tuning lr of {[e.name for e in settings.entries]} on {runs[0].cfg.dataset.name}: lrs {settings.grid}, "
        f"seeds {list(settings.seeds)}, {rounds} rounds, validation_fraction {settings.validation_fraction}, "
        f"score = mean validation accuracy of the last {min(settings.last_k, rounds)} rounds; {len(runs)} runs "
        f"({settings.runtime}) in {out}"
    )
    todo = []
    for run in runs:
        state = _previous(run, settings.last_k)
        if state in ("done", "failed"):
            run.status = "reused" if state == "done" else "reused-failed"
        else:
            if state == "partial":
                log.warning("%s holds an unfinished run: removing it and running it again", run.folder)
                shutil.rmtree(run.folder)
            todo.append(run)
    took: list[float] = []
    for i, run in enumerate(runs, 1):
        what = f"[{i}/{len(runs)}] {run.entry.name} lr={run.lr:g} seed {run.seed}"
        if run.status == "pending":
            _execute(run, settings.last_k)
            took.append(run.seconds)
            left = sum(1 for r in todo if r.status == "pending")
            timing = f"({run.seconds:.0f} s), {_eta(took, left)}"
        else:
            timing = "(reused)"
        result = f"val acc {run.score:.3f}" if math.isfinite(run.score) else f"failed: {run.reason or 'no score'}"
        echo(f"{what}: {result} {timing}")

    results = _summarise(settings, runs, matches)
    _write_tables(settings, runs, results, out, echo)
    _write_tuned(settings, results, command, rounds)
    echo(f"tuned lrs written to {settings.tuned_file()}; tables and plot in {out}")
    failed = [name for name, r in results.items() if r["lr"] is None]
    if failed:
        raise TuneError(
            f"every run of {failed} failed (see {_STATUS_FILE} in their folders under {out}); "
            "try smaller learning rates in tune.lrs"
        )
    return results


def _summarise(
    settings: TuneSettings, runs: list[_Run], matches: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    results = {}
    for entry in settings.entries:
        scores = []
        for lr in settings.grid:
            per_seed = [r.score for r in runs if r.entry == entry and r.lr == lr]
            scores.append(sum(per_seed) / len(per_seed))  # NaN if any seed failed
        chosen = choose_lr(settings.grid, scores)
        results[entry.name] = {"lr": chosen, "scores": scores, "match": matches[entry.name]}
        if chosen is not None and len(settings.grid) > 1 and chosen in (min(settings.grid), max(settings.grid)):
            # the optimum may lie outside the grid: the comparison would then not be fair
            log.warning(
                "%s: the best lr %s is at the edge of the grid %s; extend tune.lrs beyond it (finished runs "
                "are reused)", entry.name, chosen, list(settings.grid),
            )
    return results


# ---------------------------------------------------------------------------------------
# Outputs: tables, plot, tuned file
# ---------------------------------------------------------------------------------------


def _cell(score: float, best: bool) -> str:
    text = f"{score:.4f}" if math.isfinite(score) else "failed"
    return text + (" *" if best else "")


def _write_tables(
    settings: TuneSettings, runs: list[_Run], results: dict[str, dict[str, Any]], out: Path,
    echo: Callable[[str], None],
) -> None:
    names = list(results)
    grid = settings.grid
    header = ["lr", *names]
    body = [
        [f"{lr:g}", *(_cell(results[n]["scores"][j], results[n]["lr"] == lr) for n in names)]
        for j, lr in enumerate(grid)
    ]
    best = ["best lr", *(f"{results[n]['lr']:g}" if results[n]["lr"] is not None else "-" for n in names)]
    widths = [max(len(row[c]) for row in [header, *body, best]) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *body, best]]
    echo(
        f"validation accuracy (mean of the last {settings.last_k} rounds, over seeds {list(settings.seeds)}); "
        "* = chosen lr\n" + "\n".join(lines)
    )
    with (out / "tuning.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for j, lr in enumerate(grid):
            writer.writerow([lr, *(_num(results[n]["scores"][j]) for n in names)])
        writer.writerow(["best_lr", *(results[n]["lr"] if results[n]["lr"] is not None else "" for n in names)])
    md = [
        f"Validation accuracy (mean of the last {settings.last_k} rounds, averaged over seeds "
        f"{list(settings.seeds)}, validation_fraction {settings.validation_fraction}); **bold** = chosen lr.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" for _ in header) + "|",
    ]
    for j, lr in enumerate(grid):
        cells = []
        for n in names:
            s = results[n]["scores"][j]
            text = f"{s:.4f}" if math.isfinite(s) else "failed"
            cells.append(f"**{text}**" if results[n]["lr"] == lr else text)
        md.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    md.append("| best lr | " + " | ".join(best[1:]) + " |")
    (out / "tuning.md").write_text("\n".join(md) + "\n")
    with (out / "runs.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["entry", "lr", "seed", "score", "status", "seconds", "folder", "reason"])
        for r in runs:
            writer.writerow([r.entry.name, r.lr, r.seed, _num(r.score), r.status, _num(r.seconds), r.folder, r.reason])
    _plot(settings, results, out / "tuning.png")


def _num(value: float) -> str | float:
    return value if math.isfinite(value) else ""


def _plot(settings: TuneSettings, results: dict[str, dict[str, Any]], path: Path) -> None:
    # lazy: matplotlib is heavy and only the plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, r in results.items():
        line = ax.plot(settings.grid, r["scores"], marker="o", label=name)[0]
        if r["lr"] is not None:
            j = settings.grid.index(r["lr"])
            ax.plot([r["lr"]], [r["scores"][j]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xticks(settings.grid)
    ax.set_xticklabels([f"{v:g}" for v in settings.grid])
    ax.minorticks_off()  # only the grid's lrs on the axis
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation accuracy (last {settings.last_k} rounds)")
    ax.set_title(f"lr tuning: {settings.setting} (star: chosen)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _write_tuned(settings: TuneSettings, results: dict[str, dict[str, Any]], command: str, rounds: int) -> None:
    """Write (or update: entries not tuned now are kept) the tuned file, atomically."""
    path = settings.tuned_file()
    data = load_tuned(path) if path.is_file() else {"setting": settings.setting, "strategies": {}}
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    for name, r in results.items():
        data["strategies"][name] = {
            "lr": r["lr"],
            "match": r["match"],
            "grid": settings.grid,
            "scores": [round(s, 6) if math.isfinite(s) else None for s in r["scores"]],
            "score": f"mean validation accuracy of the last {settings.last_k} rounds, averaged over the seeds",
            "seeds": list(settings.seeds),
            "last_k": settings.last_k,
            "rounds": rounds,
            "validation_fraction": settings.validation_fraction,
            "command": command,
            "date": date,
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Learning rates tuned on a validation split by `python -m flwr_distreal.tune` (see its docstring).\n"
        f"# A run config reads them with lr: ${{tuned_lr:{settings.setting}}}. Rerun the tuner to change them.\n"
    )
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------


def settings_from(node: DictConfig) -> TuneSettings:
    """The validated :class:`TuneSettings` of a composed ``tune`` node (its interpolations, such
    as ``output: outputs/tune/${tune.setting}``, resolved against its root)."""
    try:
        values = OmegaConf.to_container(node, resolve=True)
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TuneSettings), values))  # type: ignore[return-value]
    except TuneError:
        raise
    except Exception as err:  # OmegaConf's missing-value and type errors
        raise TuneError(f"tune: {err}") from err


def main() -> None:
    """``python -m flwr_distreal.tune [overrides]`` (Hydra, ``conf/tune.yaml``).

    A refused setting or run config ends with one line ``error: <message>`` and exit code 2, a
    failed run with one line and exit code 1, as in :mod:`flwr_distreal.cli.main` (``DISTREAL_DEBUG=1``:
    the traceback).
    """
    register_configs()
    register_tune_config()
    register_resolvers()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="tune")
    def _main(cfg: DictConfig) -> None:
        route_flower_logs()  # Flower's records through the job's handlers only (no duplicate lines)
        task = list(HydraConfig.get().overrides.task)
        with one_line_errors(startup=True):  # a bad setting: one line and exit code 2 (main's rules)
            settings = settings_from(cfg.tune)
        command = " ".join(["python -m flwr_distreal.tune", *(shlex.quote(o) for o in task)])
        with one_line_errors():
            results = run_tuning(settings, task, command=command)
        for name, r in results.items():
            log.info("%s: lr %s", name, r["lr"])

    _main()


if __name__ == "__main__":
    sys.exit(main())
