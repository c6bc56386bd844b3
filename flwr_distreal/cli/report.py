"""The report of a sweep: the paper's tables and curves from a Hydra multirun directory.

    python -m flwr_distreal.report multirun/fig5_femnist/2026-11-21_10-00-00
    python -m flwr_distreal.report <sweep_dir> --targets 0.8 0.85 --at 100 500 2000
    python -m flwr_distreal.report multirun/fig6_cifar10/<time> multirun/fig5_cifar10/<time>
    python -m flwr_distreal.report results/main_job --markdown method acc@20 reach@0.7 utilisation

``--markdown`` and ``--tuning`` print one table in a README's form and write nothing (the
columns and sources: :mod:`flwr_distreal.cli.tables`; the README's results tables name their
command in an HTML comment, and ``tests/test_readme_tables.py`` checks them).

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

Runs that evaluated every k rounds (``evaluate_every``; always the last round) leave gaps: the
accuracy at a round they did not evaluate is that of their last evaluated round at or before it
(:func:`value_at_round`), rounds to reach a target count evaluated rounds only (the first
evaluated round at or above it), and the curves join the evaluated rounds.

Reading and grouping the runs and the maths (:func:`mean_sd`, :func:`band`,
:func:`first_round_reaching`, :func:`value_at_round`, pure functions of metrics rows) are in
:mod:`flwr_distreal.cli.sweep`; this module re-exports them.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .sweep import (  # re-exported: the report's public names
    METHOD_NAMES,
    Group,
    ReportError,
    Run,
    Stat,
    band,
    first_round_reaching,
    group_runs,
    load_sweep,
    mean_sd,
    method_label,
    setting_label,
    value_at_round,
)
from ..run.plotting import plot_bands
from .tables import results_table, tuning_table

__all__ = [
    "METHOD_NAMES",
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
    parser.add_argument("--markdown", nargs="+", metavar="COLUMN", default=None,
                        help="print one table in Markdown with these columns and write nothing "
                             "(method, lr, acc@R[:frac], accmean@A-B[:frac], seeds@R[:frac], reach@T[:bare], "
                             "stragglers[:mean], utilisation[:mean], s/round; '=<header>' sets the header; "
                             "see flwr_distreal.cli.tables)")
    parser.add_argument("--method", action="append", default=[], metavar="'LABEL[ -> NAME]'",
                        help="with --markdown or --tuning: the methods shown, in this order, renamed (repeatable)")
    parser.add_argument("--tuning", action="store_true",
                        help="print the lr-grid table of a tuner's output folder or tuned file (the positional "
                             "argument) in Markdown, the chosen lr in bold; write nothing")
    parser.add_argument("--last-k", type=int, default=None,
                        help="with --tuning on a folder: a run's score is its mean accuracy of its last k rounds")
    parser.add_argument("--digits", type=int, default=3, help="with --tuning: decimals of a score (default 3)")
    args = parser.parse_args(argv)
    if args.markdown is not None or args.tuning:
        try:
            if args.tuning:
                if len(args.sweep_dir) != 1 or args.markdown is not None:
                    raise ReportError("--tuning takes one folder or tuned file and no --markdown")
                print(tuning_table(args.sweep_dir[0], args.method, args.digits, args.last_k))
            else:
                print(results_table(args.sweep_dir, args.markdown, args.method))
        except (ReportError, OSError, KeyError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        return 0
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
