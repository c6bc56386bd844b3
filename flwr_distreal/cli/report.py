"""The report of a sweep: the paper's tables and curves from a Hydra multirun directory.

    python -m flwr_distreal.report multirun/fig5_femnist/2026-11-21_10-00-00
    python -m flwr_distreal.report <sweep_dir> --targets 0.8 0.85 --at 100 500 2000
    python -m flwr_distreal.report multirun/fig6_cifar10/<time> multirun/fig5_cifar10/<time>

Reads every job directory under the sweep (its ``config.yaml`` and ``metrics.csv``), groups the
runs by *method* (strategy, and for DISTREAL its LUT: learned, uniform or a file) and *setting*
(dataset and resources: constant, or the rate lambda of time-varying resources) over seeds, and
writes into ``<sweep_dir>/report/``:

- ``accuracy_<setting>.png``: accuracy over rounds, mean +- s.d. over seeds, one curve per
  method (stragglers per round below);
- ``final_accuracy.csv``: final accuracy per method and setting (mean, s.d., n);
- ``accuracy_at_rounds.csv``: accuracy at the given rounds (those the runs reached);
- ``rounds_to_reach.csv``: the first round at which accuracy reaches each target, over the
  seeds that reached it, and how many did;
- ``resources.csv``: stragglers per round and utilisation;
- ``report.md``: all of these as Markdown tables, the final accuracy in the paper's layout
  (Fig. 5b / 6b: rows methods, columns settings, mean +- s.d. in percent).

Runs that stopped before their configured ``rounds`` are never averaged with complete runs: the
final accuracy is taken over the runs that reached the configured last round, and every cell
says how many runs stopped early and where. Runs of one method and setting that differ in any
other config key (say a swept ``lr``) are kept apart, the key named in the method's label.

The maths (:func:`mean_sd`, :func:`band`, :func:`first_round_reaching`, :func:`value_at_round`)
are pure functions of metrics rows.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "Group",
    "ReportError",
    "Run",
    "Stat",
    "band",
    "final_accuracy",
    "first_round_reaching",
    "group_runs",
    "load_sweep",
    "main",
    "mean_sd",
    "method_label",
    "setting_label",
    "value_at_round",
    "write_report",
]

log = logging.getLogger(__name__)

#: Paper names and order of the methods (Fig. 5b: full, small, DISTREAL, Diao 2021, Caldas 2018).
METHOD_NAMES = {
    "full": "Full res. avail. (upper bound)",
    "small": "Small NN",
    "distreal": "DISTREAL",
    "heterofl": "HeteroFL (Diao 2021)",
    "feddropout": "Fed. Dropout (Caldas 2018)",
}
_METHOD_ORDER = ("full", "small", "distreal", "heterofl", "feddropout")
_DATASET_ORDER = ("femnist", "cifar10", "cifar100")
_RESOURCE_ORDER = ("full", "constant", "timevarying", "trace", "measured")
#: Keys that differ between the runs of one group by design: not reasons to split it.
_IGNORED_KEYS = ("seed", "output_dir", "resume")


class ReportError(ValueError):
    """The sweep directory holds nothing to report, or an option is out of range."""


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of ``n`` finite values (``sd`` NaN when ``n < 2``)."""

    mean: float
    sd: float
    n: int


@dataclass
class Run:
    """One job of the sweep: where it is, its flattened config and its metrics rows."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, float]]

    @property
    def planned_rounds(self) -> int:
        """The ``rounds`` the run was configured for (its last row's round when unknown)."""
        rounds = self.config.get("rounds")
        return int(rounds) if rounds is not None else self.last_round

    @property
    def last_round(self) -> int:
        """The last round it recorded (0 when none)."""
        return int(self.rows[-1]["round"]) if self.rows else 0

    @property
    def stopped_early(self) -> bool:
        """Whether it recorded fewer rounds than configured."""
        return self.last_round < self.planned_rounds


@dataclass
class Group:
    """The runs (seeds) of one method in one setting."""

    method: str
    setting: str
    runs: list[Run] = field(default_factory=list)
    sort_key: tuple = ()

    @property
    def planned_rounds(self) -> int:
        """The most rounds any run of the group was configured for."""
        return max(r.planned_rounds for r in self.runs)

    @property
    def stopped(self) -> list[Run]:
        """The runs that stopped before :attr:`planned_rounds`."""
        return [r for r in self.runs if r.last_round < self.planned_rounds]


# ----------------------------------------------------------------------------------------------
# The maths: pure functions of values and metrics rows


def mean_sd(values: Iterable[float | None]) -> Stat:
    """Mean and sample standard deviation (ddof = 1) of the finite values.

    Parameters
    ----------
    values : iterable of float or None
        One value per seed; ``None`` and NaN are left out (and not counted in ``n``).

    Returns
    -------
    Stat
        ``mean`` NaN when no value is finite; ``sd`` NaN with fewer than two values.
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Stat(math.nan, math.nan, 0)
    mean = sum(xs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return Stat(mean, sd, n)


def value_at_round(rows: Sequence[Mapping[str, float]], round_: int, key: str = "accuracy") -> float | None:
    """The ``key`` of the row of round ``round_``; ``None`` when the run has no such row."""
    for row in rows:
        if int(row["round"]) == round_:
            value = row.get(key)
            return None if value is None else float(value)
    return None


def first_round_reaching(rows: Sequence[Mapping[str, float]], target: float, key: str = "accuracy") -> int | None:
    """The first round whose ``key`` is at least ``target``; ``None`` when no round reached it."""
    for row in sorted(rows, key=lambda r: r["round"]):
        value = row.get(key)
        if value is not None and math.isfinite(value) and value >= target:
            return int(row["round"])
    return None


def band(runs: Sequence[Sequence[Mapping[str, float]]], key: str = "accuracy") -> tuple[list[int], list[float], list[float]]:
    """Mean and s.d. over runs, per round, on the rounds that *every* run recorded.

    A run that stopped early shortens the band to its rounds: curves of unequal lengths are
    never averaged into one line.

    Parameters
    ----------
    runs : sequence of metrics rows
        One list of rows per seed.
    key : str
        The column.

    Returns
    -------
    rounds, mean, sd : lists
        ``sd`` is NaN for a single run.
    """
    if not runs:
        return [], [], []
    per_run = [{int(r["round"]): r.get(key, math.nan) for r in rows} for rows in runs]
    common = sorted(set.intersection(*(set(d) for d in per_run)))
    stats = [mean_sd(d[t] for d in per_run) for t in common]
    return common, [s.mean for s in stats], [s.sd for s in stats]


# ----------------------------------------------------------------------------------------------
# Reading and grouping a sweep


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _load_config(job: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    for candidate in (job / "config.yaml", job / ".hydra" / "config.yaml"):
        if candidate.is_file():
            data = OmegaConf.to_container(OmegaConf.load(candidate), resolve=False)
            return _flatten(data)  # type: ignore[arg-type]
    raise FileNotFoundError(f"no config.yaml in {job}")


def load_sweep(sweep_dir: str | Path) -> tuple[list[Run], list[str]]:
    """Every job directory under ``sweep_dir`` (any depth) holding a ``metrics.csv``.

    Parameters
    ----------
    sweep_dir : path
        A Hydra multirun directory, or any folder of run directories.

    Returns
    -------
    runs : list of Run
        In directory order.
    skipped : list of str
        ``"<job>: <reason>"`` for each job directory that could not be read (no config, a
        broken metrics file) or that has a config but no ``metrics.csv`` (failed before round 1).

    Raises
    ------
    ReportError
        If ``sweep_dir`` is not a directory or holds no readable run.
    """
    from ..run.plotting import read_metrics

    root = Path(sweep_dir)
    if not root.is_dir():
        raise ReportError(f"no sweep directory at {root}")
    runs: list[Run] = []
    skipped: list[str] = []
    report_dir = root / "report"
    for metrics in sorted(root.rglob("metrics.csv")):
        job = metrics.parent
        if report_dir in job.parents or job == report_dir:
            continue
        try:
            runs.append(Run(job, _load_config(job), read_metrics(metrics)))
        except (OSError, ValueError) as err:
            skipped.append(f"{job.relative_to(root)}: {err}")
    for job in sorted(p for p in root.iterdir() if p.is_dir() and p != report_dir):
        is_job = any((job / name).exists() for name in ("config.yaml", ".hydra", "main.log"))
        if is_job and not (job / "metrics.csv").exists():
            skipped.append(f"{job.name}: no metrics.csv (the job failed before its first round; see its main.log)")
    if not runs:
        detail = f" ({'; '.join(skipped)})" if skipped else ""
        raise ReportError(f"no job directory with a readable metrics.csv and config.yaml under {root}{detail}")
    return runs, skipped


def method_label(strategy: str, lut: str | None = None) -> str:
    """The method's name as in the paper; DISTREAL's names its LUT.

    ``lut`` ``None``, ``""`` or ``"uniform"``: the uniform LUT (equal rates in every layer);
    ``"learned"``: the DSE's LUT ("DISTREAL"); a file: "DISTREAL (LUT <folder>/<file>)".
    """
    if strategy != "distreal":
        return METHOD_NAMES.get(strategy, strategy)
    name = Path(str(lut)).name if lut else "uniform"
    if name == "uniform":
        return "DISTREAL (uniform LUT)"
    if name == "learned":
        return "DISTREAL"
    path = Path(str(lut))
    return f"DISTREAL (LUT {path.parent.name}/{path.name})" if path.parent.name else f"DISTREAL (LUT {path.name})"


def setting_label(config: Mapping[str, Any]) -> str:
    """The setting of a run: its dataset and resources (``"femnist, constant"``, ``"cifar10, λ=2"``)."""
    dataset = config.get("dataset.name", "?")
    kind = config.get("resources.kind", "?")
    if kind == "timevarying":
        resources = f"λ={float(config.get('resources.lam', math.nan)):g}"
    elif kind == "trace":
        resources = f"trace {Path(str(config.get('resources.trace_path'))).name}"
    else:
        resources = str(kind)
    return f"{dataset}, {resources}"


def _setting_key(config: Mapping[str, Any]) -> tuple:
    dataset = config.get("dataset.name", "")
    kind = config.get("resources.kind", "")
    lam = float(config.get("resources.lam", 0.0)) if kind == "timevarying" else 0.0
    d = _DATASET_ORDER.index(dataset) if dataset in _DATASET_ORDER else len(_DATASET_ORDER)
    k = _RESOURCE_ORDER.index(kind) if kind in _RESOURCE_ORDER else len(_RESOURCE_ORDER)
    return (d, str(dataset), k, lam)


def _method_key(config: Mapping[str, Any], label: str) -> tuple:
    strategy = config.get("strategy.name", "")
    s = _METHOD_ORDER.index(strategy) if strategy in _METHOD_ORDER else len(_METHOD_ORDER)
    return (s, "uniform" in label, label)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs by method and setting over seeds, in the paper's order.

    Runs of one method and setting whose configs differ in a key other than ``seed`` (and the
    output directory) are split, the differing keys appended to the method's label
    (``"DISTREAL lr=0.05"``), so nothing unlike is averaged.
    """
    first: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        method = method_label(run.config.get("strategy.name", "?"), run.config.get("lut"))
        first.setdefault((method, setting_label(run.config)), []).append(run)
    groups: list[Group] = []
    for (method, setting), members in first.items():
        keys = sorted({k for r in members for k in r.config} - set(_IGNORED_KEYS))
        varying = [k for k in keys if len({repr(r.config.get(k)) for r in members}) > 1]
        split: dict[tuple, list[Run]] = {}
        for run in members:
            split.setdefault(tuple(run.config.get(k) for k in varying), []).append(run)
        for values, sub in split.items():
            label = " ".join([method, *(f"{k}={v}" for k, v in zip(varying, values))])
            key = (_setting_key(sub[0].config), _method_key(sub[0].config, method), label)
            groups.append(Group(label, setting, sorted(sub, key=lambda r: r.config.get("seed", 0)), key))
    for g in groups:
        seeds = [r.config.get("seed") for r in g.runs]
        if len(set(seeds)) < len(seeds):
            log.warning("%s, %s: the same seed appears more than once (%s)", g.method, g.setting, seeds)
    return sorted(groups, key=lambda g: g.sort_key)


# ----------------------------------------------------------------------------------------------
# Tables


def _pct(stat: Stat) -> str:
    if stat.n == 0:
        return "—"
    if stat.n == 1:
        return f"{100 * stat.mean:.1f}"
    return f"{100 * stat.mean:.1f} ± {100 * stat.sd:.1f}"


def _stopped_note(stopped: Sequence[Run], what: str = "stopped early at round") -> str:
    if not stopped:
        return ""
    return f"{len(stopped)} {what} {', '.join(str(r.last_round) for r in stopped)}"


def final_accuracy(group: Group) -> tuple[Stat, list[Run]]:
    """Final accuracy of a group: the accuracy at :attr:`Group.planned_rounds` over the runs that
    got there, and the runs that stopped before (not averaged in)."""
    last = group.planned_rounds
    stopped = group.stopped
    stat = mean_sd(value_at_round(r.rows, last) for r in group.runs if r not in stopped)
    return stat, stopped


def _final_cell(group: Group) -> str:
    stat, stopped = final_accuracy(group)
    note = f"n={stat.n}"
    if stopped:
        note += f"; {_stopped_note(stopped)}"
    return f"{_pct(stat)} ({note})"


def _per_run_mean(rows: Sequence[Mapping[str, float]], key: str) -> float | None:
    return mean_sd(r.get(key) for r in rows).mean if rows else None


def _markdown_table(header: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    """A CSV number at full precision; empty when undefined."""
    return "" if x is None or not math.isfinite(x) else repr(float(x))


def _plain(stat: Stat, digits: int) -> str:
    if stat.n == 0:
        return "—"
    if stat.n == 1:
        return f"{stat.mean:.{digits}f}"
    return f"{stat.mean:.{digits}f} ± {stat.sd:.{digits}f}"


def _safe(name: str) -> str:
    """A file-name part: ``"cifar10, λ=0.5"`` -> ``"cifar10_lam0.5"``."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name.replace("λ=", "lam")).strip("_")


def _write_csv(path: Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


#: One table: its CSV rows (long format) and its Markdown body rows.
_Table = tuple[list[list[Any]], list[list[str]]]


def _final_table(groups: Sequence[Group]) -> list[list[Any]]:
    out = []
    for g in groups:
        stat, stopped = final_accuracy(g)
        out.append([g.method, g.setting, g.planned_rounds, len(g.runs), stat.n, _fmt(stat.mean), _fmt(stat.sd),
                    len(stopped), ";".join(str(r.last_round) for r in stopped)])
    return out


def _at_rounds_table(groups: Sequence[Group], rounds: Sequence[int]) -> _Table:
    csv_rows, md_rows = [], []
    for g in groups:
        cells = []
        for t in rounds:
            values = [value_at_round(r.rows, t) for r in g.runs]
            stat = mean_sd(values)
            missing = sum(v is None for v in values)
            csv_rows.append([g.method, g.setting, t, len(g.runs), stat.n, _fmt(stat.mean), _fmt(stat.sd), missing])
            cells.append(_pct(stat) + (f" ({missing} stopped before)" if missing else ""))
        md_rows.append([g.method, g.setting, *cells])
    return csv_rows, md_rows


def _reach_table(groups: Sequence[Group], targets: Sequence[float]) -> _Table:
    csv_rows, md_rows = [], []
    for g in groups:
        cells = []
        for target in targets:
            stat = mean_sd(first_round_reaching(r.rows, target) for r in g.runs)
            csv_rows.append([g.method, g.setting, target, len(g.runs), stat.n, _fmt(stat.mean), _fmt(stat.sd)])
            if stat.n == 0:
                cells.append(f"not reached (0/{len(g.runs)})")
            else:
                value = f"{stat.mean:.0f}" if stat.n == 1 else f"{stat.mean:.0f} ± {stat.sd:.0f}"
                cells.append(f"{value} ({stat.n}/{len(g.runs)} reached)")
        md_rows.append([g.method, g.setting, *cells])
    return csv_rows, md_rows


def _resources_table(groups: Sequence[Group]) -> _Table:
    """Stragglers per round and utilisation: each run's mean over its rounds, then over seeds."""
    csv_rows, md_rows = [], []
    for g in groups:
        strag = mean_sd(_per_run_mean(r.rows, "stragglers") for r in g.runs)
        util = mean_sd(_per_run_mean(r.rows, "mean_utilisation") for r in g.runs)
        csv_rows.append([g.method, g.setting, len(g.runs), _fmt(strag.mean), _fmt(strag.sd), _fmt(util.mean),
                         _fmt(util.sd)])
        md_rows.append([g.method, g.setting, _plain(strag, 2), _plain(util, 3)])
    return csv_rows, md_rows


def _plot_settings(groups: Sequence[Group], settings: Sequence[str], out: Path) -> dict[str, Path]:
    """One PNG per setting: accuracy (and stragglers) bands of each method."""
    from ..run.plotting import plot_bands

    files = {}
    for setting in settings:
        acc, stragglers = {}, {}
        for g in (g for g in groups if g.setting == setting):
            label = f"{g.method} (n={len(g.runs)}" + (f"; {_stopped_note(g.stopped)})" if g.stopped else ")")
            acc[label] = band([r.rows for r in g.runs], "accuracy")
            stragglers[label] = band([r.rows for r in g.runs], "stragglers")
        path = out / f"accuracy_{_safe(setting)}.png"
        plot_bands(acc, path, title=f"{setting}: accuracy, mean ± s.d. over seeds", stragglers=stragglers)
        files[f"plot:{setting}"] = path
    return files


def write_report(
    sweep_dir: str | Path | Sequence[str | Path],
    out: str | Path | None = None,
    targets: Sequence[float] = (0.7, 0.75),
    at_rounds: Sequence[int] = (25, 50, 100),
    plots: bool = True,
) -> dict[str, Path]:
    """Write the sweep's report (see the module docstring) and return the files written.

    Parameters
    ----------
    sweep_dir : path or sequence of paths
        The Hydra multirun directory (or any folder of run directories); several are reported
        together (Fig. 6 with the constant-resources runs of Fig. 5).
    out : path, optional
        Where the report goes (default ``report/`` in the first sweep directory).
    targets : sequence of float
        Accuracies (fractions in (0, 1]) for the rounds-to-reach table.
    at_rounds : sequence of int
        Rounds for the accuracy-at-rounds table; those no run reached are left out.
    plots : bool
        Write the PNGs (matplotlib, Agg backend).

    Returns
    -------
    dict of str to Path
        ``"report"`` (report.md), ``"final_accuracy_md"`` (the paper's table alone),
        ``"final_accuracy"``, ``"accuracy_at_rounds"``, ``"rounds_to_reach"``, ``"resources"``
        (CSVs) and ``"plot:<setting>"`` for each PNG.

    Raises
    ------
    ReportError
        If the sweep has no readable run, or a target or round is out of range.
    """
    bad_targets = [t for t in targets if not 0 < t <= 1]
    if bad_targets:
        raise ReportError(f"accuracy targets are fractions in (0, 1], got {bad_targets}")
    bad_rounds = [r for r in at_rounds if int(r) < 1]
    if bad_rounds:
        raise ReportError(f"rounds for the accuracy-at-rounds table must be >= 1, got {bad_rounds}")
    roots = [Path(sweep_dir)] if isinstance(sweep_dir, (str, Path)) else [Path(d) for d in sweep_dir]
    if not roots:
        raise ReportError("no sweep directory given")
    runs, skipped = [], []
    for root in roots:
        found, left_out = load_sweep(root)
        runs += found
        skipped += [f"{root.name}/{s}" if len(roots) > 1 else s for s in left_out]
    groups = group_runs(runs)
    out = Path(out) if out is not None else roots[0] / "report"
    out.mkdir(parents=True, exist_ok=True)

    settings = list(dict.fromkeys(g.setting for g in groups))
    methods = list(dict.fromkeys(g.method for g in sorted(groups, key=lambda g: g.sort_key[1:])))
    by_cell = {(g.method, g.setting): g for g in groups}
    longest = max(r.last_round for r in runs)
    shown_rounds = sorted({int(r) for r in at_rounds if int(r) <= longest})  # those some run reached

    files: dict[str, Path] = {}
    files["final_accuracy"] = _write_csv(
        out / "final_accuracy.csv",
        ["method", "setting", "rounds", "runs", "n", "mean", "sd", "stopped_early", "stopped_at_rounds"],
        _final_table(groups),
    )
    final_md = _markdown_table(  # the paper's layout: rows methods, columns settings
        ["method", *settings],
        ([m, *(_final_cell(by_cell[m, s]) if (m, s) in by_cell else "" for s in settings)] for m in methods),
    )
    at_csv, at_md = _at_rounds_table(groups, shown_rounds)
    files["accuracy_at_rounds"] = _write_csv(
        out / "accuracy_at_rounds.csv", ["method", "setting", "round", "runs", "n", "mean", "sd", "runs_without_round"],
        at_csv,
    )
    reach_csv, reach_md = _reach_table(groups, targets)
    files["rounds_to_reach"] = _write_csv(
        out / "rounds_to_reach.csv", ["method", "setting", "target", "runs", "reached", "mean_round", "sd_round"],
        reach_csv,
    )
    res_csv, res_md = _resources_table(groups)
    files["resources"] = _write_csv(
        out / "resources.csv",
        ["method", "setting", "runs", "stragglers_per_round_mean", "stragglers_per_round_sd", "utilisation_mean",
         "utilisation_sd"],
        res_csv,
    )
    if plots:
        files.update(_plot_settings(groups, settings, out))

    seeds = sorted({r.config.get("seed") for r in runs}, key=str)
    parts = [
        f"# Report of {', '.join(map(str, roots))}",
        "",
        f"{len(runs)} runs, {len(groups)} method/setting groups, seeds {', '.join(map(str, seeds))}. "
        "Mean ± sample s.d. over seeds; accuracy in percent.",
    ]
    early = [g for g in groups if g.stopped]
    if early:
        parts += ["", "**Runs that stopped early** (not averaged with complete runs):"]
        parts += [f"- {g.method}, {g.setting}: {_stopped_note(g.stopped)} of {g.planned_rounds}" for g in early]
    if skipped:
        parts += ["", "**Job directories left out:**", *(f"- {s}" for s in skipped)]
    parts += ["", "## Final accuracy", "", final_md]
    if shown_rounds:
        header = ["method", "setting", *(f"round {t}" for t in shown_rounds)]
        parts += ["", "## Accuracy at rounds", "", _markdown_table(header, at_md)]
    header = ["method", "setting", *(f"{100 * t:g} %" for t in targets)]
    parts += ["", "## Rounds to reach an accuracy", "", _markdown_table(header, reach_md)]
    header = ["method", "setting", "stragglers per round", "utilisation"]
    parts += ["", "## Stragglers and utilisation", "", _markdown_table(header, res_md)]
    pngs = [p for k, p in files.items() if k.startswith("plot:")]
    if pngs:
        parts += ["", "## Curves", "", *(f"![{p.stem}]({p.name})" for p in pngs)]
    files["report"] = out / "report.md"
    files["report"].write_text("\n".join(parts) + "\n")
    files["final_accuracy_md"] = out / "final_accuracy.md"
    files["final_accuracy_md"].write_text(final_md + "\n")
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m flwr_distreal.report <sweep_dir>``: write the report, print the final table."""
    parser = argparse.ArgumentParser(
        prog="python -m flwr_distreal.report",
        description="Tables and curves of a Hydra sweep of flwr_distreal runs (mean ± s.d. over seeds).",
    )
    parser.add_argument("sweep_dir", nargs="+",
                        help="the multirun directory (multirun/<preset>/<time>); several are reported together")
    parser.add_argument("--out", default=None, help="output folder (default: report/ in the first sweep directory)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.7, 0.75],
                        help="accuracies (fractions) for the rounds-to-reach table (default 0.7 0.75)")
    parser.add_argument("--at", type=int, nargs="+", default=[25, 50, 100],
                        help="rounds for the accuracy-at-rounds table (default 25 50 100)")
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    try:
        files = write_report(args.sweep_dir, args.out, args.targets, args.at, plots=not args.no_plots)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(files["final_accuracy_md"].read_text(), end="")
    print(f"report: {files['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
