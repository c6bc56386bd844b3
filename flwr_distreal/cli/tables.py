"""One README table, printed in Markdown from committed run folders (the report's ``--markdown``).

    python -m flwr_distreal.report results/main_job --markdown method acc@5 reach@0.7:bare stragglers:mean
    python -m flwr_distreal.report --tuning results/tune/cifar10_resnet20_lam2 --last-k 2 --digits 3
    python -m flwr_distreal.report --tuning conf/tuned/femnist_lam2.yaml --digits 3

A README results table is the output of such a command on the run folders committed under
``results/``; ``tests/test_readme_tables.py`` reruns the command named in the HTML comment above
each table and compares the two cell by cell. Nothing is written: the table goes to stdout.

**Results tables** (runs grouped as :func:`~flwr_distreal.cli.sweep.group_runs` groups them, one
setting). Each column is a spec ``<kind>[:<variant>][=<header>]``; ``<header>`` replaces the
default header text:

- ``method``: the group's label (renamed with ``--method "LABEL -> NAME"``);
- ``lr``: the group's ``lr`` (right-aligned);
- ``acc@R``: accuracy at round R in percent, ``mean ± s.d.`` over the seeds (one decimal);
  ``acc@R:frac``: as a fraction, four decimals;
- ``accmean@A-B:frac`` (or without ``:frac``, in percent): each run's mean accuracy over rounds
  A to B (the evaluated ones, ``evaluate_every``), then mean ± s.d. over the seeds;
- ``seeds@R:frac`` (or in percent): each seed's accuracy at round R, in seed order;
- ``reach@T``: the first round at accuracy T (a fraction), mean ± s.d. over the seeds that
  reached it, ``(n/n)`` when all did, ``(k/n reached)`` when some did, ``not reached (0/n)``;
  ``reach@T:bare`` leaves out ``(n/n)`` when all did. A s.d. that rounds to 0 is not shown;
- ``stragglers``: stragglers per round (each run's mean over its rounds, then over seeds), two
  decimals, mean ± s.d., ``0`` when no run had one; ``stragglers:mean``: the mean alone;
- ``utilisation``: mean utilisation the same way, three decimals; ``utilisation:mean``;
- ``s/round``: each run's last ``wall_time`` over its last round, mean over the seeds, whole
  seconds (right-aligned);
- any other ``metrics.csv`` column ``COL`` (``update_norm``, ``refused``, ...):
  ``runmean@COL/A-B``: each run's mean of ``COL`` over rounds A to B, then mean ± s.d. over the
  seeds, two decimals; ``total@COL``: the sum over every round of every run (a count, for
  ``refused`` or ``clipped``); ``max@COL``: the largest value in any round of any run, two
  decimals.

**lr-grid tables** (``--tuning``): rows the lrs, columns the tuner's entries, each cell the
entry's score at that lr, the chosen lr in bold. The source is a tuner's output folder (runs in
``<entry>/lr<lr>_seed<seed>/``, each scored from its ``metrics.csv`` as the tuner scores it:
the mean accuracy of its last ``--last-k`` rounds, over seeds, a half rounded up, the best lr chosen by
:func:`choose_lr`; both as :mod:`flwr_distreal.cli.tune` does it, restated here because the
tuner's module imports the report's through its Hydra callback, and ``tests/test_readme_tables.py``
checks that they agree) or a tuned file (``conf/tuned/<setting>.yaml``: the
scores the tuner wrote).
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_HALF_UP, Decimal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .sweep import (
    Group, ReportError, Stat, first_round_reaching, group_runs, last_k_score, load_sweep, mean_sd, value_at_round,
)

__all__ = [
    "Column", "choose_lr", "markdown_table", "parse_column", "parse_method", "results_table", "score_rows",
    "marked_tables", "split_markers", "table_cells", "tuning_table",
]

_KINDS = ("method", "lr", "acc", "accmean", "seeds", "reach", "stragglers", "utilisation", "s/round",
          "runmean", "total", "max")
_VARIANTS = {"acc": ("frac",), "accmean": ("frac",), "seeds": ("frac",), "reach": ("bare",),
             "stragglers": ("mean",), "utilisation": ("mean",)}
_RIGHT = ("lr", "s/round")
_METRIC_COLUMN = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Column:
    """One column of a results table: what it shows (``kind``, ``arg``, ``variant``) and its header."""

    kind: str
    arg: str = ""
    variant: str = ""
    header: str = ""

    @property
    def align(self) -> str:
        """The Markdown separator of the column (``---:`` for the numeric ones)."""
        return "---:" if self.kind in _RIGHT else "---"


def parse_column(spec: str) -> Column:
    """Parse ``<kind>[@<arg>][:<variant>][=<header>]`` (see the module docstring).

    Raises
    ------
    ReportError
        If the kind or variant is unknown, or a round or target is missing or out of range.
    """
    body, _, header = spec.partition("=")
    head, _, variant = body.strip().partition(":")
    kind, _, arg = head.partition("@")
    if kind not in _KINDS:
        raise ReportError(f"column {spec!r}: unknown kind {kind!r}; kinds: {list(_KINDS)}")
    if variant and variant not in _VARIANTS.get(kind, ()):
        variants = list(_VARIANTS.get(kind, ()))
        raise ReportError(f"column {spec!r}: {kind} has no variant {variant!r} (variants: {variants})")
    needs_arg = kind in ("acc", "accmean", "seeds", "reach", "runmean", "total", "max")
    if needs_arg != bool(arg):
        raise ReportError(f"column {spec!r}: {kind} {'needs' if needs_arg else 'takes no'} @<argument>")
    try:
        if kind in ("acc", "seeds"):
            ok = int(arg) >= 1
        elif kind == "accmean":
            a, b = (int(x) for x in arg.split("-"))
            ok = 1 <= a <= b
        elif kind == "reach":
            ok = 0 < float(arg) <= 1
        elif kind == "runmean":
            name, _, rounds = arg.partition("/")
            a, b = (int(x) for x in rounds.split("-"))
            ok = bool(_METRIC_COLUMN.match(name)) and 1 <= a <= b
        elif kind in ("total", "max"):
            ok = bool(_METRIC_COLUMN.match(arg))
        else:
            ok = True
    except ValueError:
        ok = False
    if not ok:
        raise ReportError(
            f"column {spec!r}: bad argument {arg!r} (a round >= 1, rounds A-B, a target in (0, 1], a metrics.csv "
            "column, or COLUMN/A-B)"
        )
    return Column(kind, arg, variant, header.strip() or _default_header(kind, arg))


def _default_header(kind: str, arg: str) -> str:
    if kind == "reach":
        return f"rounds to {100 * float(arg):g} %"
    return {
        "acc": f"acc @{arg}", "accmean": f"mean acc of rounds {arg}", "seeds": f"per seed (round {arg})",
        "stragglers": "stragglers/round", "runmean": f"{arg.partition('/')[0]}, rounds {arg.partition('/')[2]}",
        "total": f"{arg} (all runs)", "max": f"largest {arg}",
    }.get(kind, kind)


def parse_method(spec: str) -> tuple[str, str]:
    """``"LABEL -> NAME"`` (or ``"LABEL"``): a group's report label and the name the table gives it."""
    label, sep, name = spec.partition("->")
    label = label.strip()
    if not label or (sep and not name.strip()):
        raise ReportError(f"--method {spec!r}: expected 'LABEL' or 'LABEL -> NAME'")
    return label, (name.strip() if sep else label)


def markdown_table(header: Sequence[str], aligns: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table: header, separator (one alignment per column), body rows."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(aligns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Results tables


def _stat_text(stat: Stat, digits: int, scale: float = 1.0) -> str:
    if stat.n == 0:
        return "—"
    mean = f"{scale * stat.mean:.{digits}f}"
    return mean if stat.n == 1 else f"{mean} ± {scale * stat.sd:.{digits}f}"


def _mean_over(rows: Sequence[Mapping[str, float]], key: str, first: int = 1, last: int | None = None) -> float | None:
    values = [r.get(key) for r in rows if first <= int(r["round"]) <= (last if last is not None else math.inf)]
    stat = mean_sd(values)
    return stat.mean if stat.n else None


def _reach_cell(group: Group, target: float, bare: bool) -> str:
    stat = mean_sd(first_round_reaching(r.rows, target) for r in group.runs)
    total = len(group.runs)
    if stat.n == 0:
        return f"not reached (0/{total})"
    text = f"{stat.mean:.0f}"
    if stat.n > 1 and round(stat.sd) != 0:
        text += f" ± {stat.sd:.0f}"
    if stat.n < total:
        return f"{text} ({stat.n}/{total} reached)"
    return text if bare else f"{text} ({total}/{total})"


def _common(group: Group, key: str) -> Any:
    values = {repr(r.config.get(key)): r.config.get(key) for r in group.runs}
    if len(values) != 1:
        raise ReportError(f"{group.method}: its runs differ in {key} ({sorted(values)})")
    return next(iter(values.values()))


def _cell(column: Column, group: Group, name: str) -> str:
    kind, arg, variant = column.kind, column.arg, column.variant
    frac = variant == "frac"
    scale, digits = (1.0, 4) if frac else (100.0, 1)
    if kind == "method":
        return name
    if kind == "lr":
        return f"{float(_common(group, 'lr')):g}"
    if kind == "acc":
        return _stat_text(mean_sd(value_at_round(r.rows, int(arg)) for r in group.runs), digits, scale)
    if kind == "accmean":
        a, b = (int(x) for x in arg.split("-"))
        return _stat_text(mean_sd(_mean_over(r.rows, "accuracy", a, b) for r in group.runs), digits, scale)
    if kind == "seeds":
        values = [value_at_round(r.rows, int(arg)) for r in group.runs]
        return ", ".join("—" if v is None else f"{scale * v:.{digits}f}" for v in values)
    if kind == "reach":
        return _reach_cell(group, float(arg), variant == "bare")
    if kind in ("stragglers", "utilisation"):
        key, places = ("stragglers", 2) if kind == "stragglers" else ("mean_utilisation", 3)
        stat = mean_sd(_mean_over(r.rows, key) for r in group.runs)
        if kind == "stragglers" and stat.n and stat.mean == 0 and (stat.n == 1 or stat.sd == 0):
            return "0"
        return _stat_text(Stat(stat.mean, math.nan, min(stat.n, 1)) if variant == "mean" else stat, places)
    if kind in ("runmean", "total", "max"):
        return _metric_cell(kind, arg, group)
    # s/round: each run's cumulative wall time over its rounds, mean over the seeds
    per_run = [float(r.rows[-1]["wall_time"]) / r.last_round for r in group.runs if r.rows]
    return f"{mean_sd(per_run).mean:.0f}"


def _metric_cell(kind: str, arg: str, group: Group) -> str:
    """A ``runmean``, ``total`` or ``max`` cell of a ``metrics.csv`` column (rounds where it is empty skipped)."""
    name = arg.partition("/")[0]
    if not any(name in row for r in group.runs for row in r.rows):
        raise ReportError(f"{group.method}: no run's metrics.csv has a column {name!r}")
    if kind == "runmean":
        a, b = (int(x) for x in arg.partition("/")[2].split("-"))
        return _stat_text(mean_sd(_mean_over(r.rows, name, a, b) for r in group.runs), 2)
    values = [float(v) for r in group.runs for row in r.rows if (v := row.get(name)) is not None and v == v]
    if not values:
        return "—"
    return f"{sum(values):.0f}" if kind == "total" else f"{max(values):.2f}"


def results_table(
    sweep_dirs: Sequence[str | Path], columns: Sequence[str], methods: Sequence[str] = (),
) -> str:
    """The Markdown table of ``columns`` (specs, see the module docstring) over the runs of ``sweep_dirs``.

    Parameters
    ----------
    sweep_dirs : sequence of path
        Folders of run folders (``config.yaml`` and ``metrics.csv`` each), reported together.
    columns : sequence of str
        Column specs, in order.
    methods : sequence of str
        ``"LABEL -> NAME"`` or ``"LABEL"``: the groups shown, in this order, under these names;
        empty: every group, in the report's order, under the report's labels.

    Returns
    -------
    str
        The table, no trailing newline.

    Raises
    ------
    ReportError
        If no run is readable, the runs span more than one setting, a ``--method`` label names no
        group, or a column spec is bad.
    """
    cols = [parse_column(c) for c in columns]
    if not cols:
        raise ReportError("--markdown needs at least one column")
    runs = [run for d in sweep_dirs for run in load_sweep(d)[0]]
    groups = group_runs(runs)
    settings = sorted({g.setting for g in groups})
    if len(settings) > 1:
        raise ReportError(f"a --markdown table shows one setting; these runs have {settings}")
    by_label = {g.method: g for g in groups}
    if methods:
        chosen = []
        for spec in methods:
            label, name = parse_method(spec)
            if label not in by_label:
                raise ReportError(f"--method {label!r}: no such group; groups: {list(by_label)}")
            chosen.append((by_label[label], name))
    else:
        chosen = [(g, g.method) for g in groups]
    body = [[_cell(c, g, name) for c in cols] for g, name in chosen]
    return markdown_table([c.header for c in cols], [c.align for c in cols], body)


# ----------------------------------------------------------------------------------------------
# lr-grid tables


def score_rows(rows: Sequence[Mapping[str, Any]], last_k: int) -> float:
    """A tuning run's score, as the tuner computes it (:func:`flwr_distreal.cli.sweep.last_k_score`):
    its mean accuracy over its last ``last_k`` rows (all if fewer), the evaluated ones among them
    (``evaluate_every``); NaN without one or with a non-finite accuracy among them."""
    return last_k_score(rows, last_k)  # evaluate_every: the evaluated rounds among the last last_k


def choose_lr(lrs: Sequence[float], scores: Sequence[float], tol: float = 1e-9) -> float | None:
    """The tuner's choice: the lr with the highest finite score, ties (within ``tol``) to the smaller."""
    finite = [(float(lr), float(s)) for lr, s in zip(lrs, scores) if math.isfinite(float(s))]
    if not finite:
        return None
    best = max(s for _, s in finite)
    return min(lr for lr, s in finite if s >= best - tol)


def _scores_from_folder(root: Path, last_k: int) -> dict[str, dict[float, float]]:
    """Per entry (the run folder's parent, relative to ``root``), per lr: the mean score over seeds."""
    runs, _ = load_sweep(root)
    per: dict[str, dict[float, list[float]]] = {}
    for run in runs:
        entry = run.path.parent.relative_to(root).as_posix()
        rounds = int(run.config.get("rounds") or run.last_round)
        score = score_rows(run.rows[:rounds], last_k)
        per.setdefault(entry, {}).setdefault(float(run.config["lr"]), []).append(score)
    return {e: {lr: sum(s) / len(s) for lr, s in by_lr.items()} for e, by_lr in per.items()}


def _scores_from_tuned(path: Path) -> tuple[dict[str, dict[float, float]], dict[str, float | None]]:
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    strategies = data.get("strategies")
    if not isinstance(strategies, Mapping):
        raise ReportError(f"{path} is not a tuned file (no 'strategies' mapping)")
    scores, chosen = {}, {}
    for name, entry in strategies.items():
        grid, values = entry.get("grid"), entry.get("scores")
        if not isinstance(grid, list) or not isinstance(values, list) or len(grid) != len(values):
            raise ReportError(f"{path}: {name} has no grid and scores of one length")
        scores[str(name)] = {float(lr): float("nan") if s is None else float(s) for lr, s in zip(grid, values)}
        chosen[str(name)] = None if entry.get("lr") is None else float(entry["lr"])
    return scores, chosen


def _half_up(value: float, digits: int) -> str:
    """``value`` to ``digits`` decimals, a half rounded up, as read (``0.1495`` -> ``0.150``; a
    binary float format would give ``0.149``, since 0.1495 is stored as 0.14949999...)."""
    return str(Decimal(repr(float(value))).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def tuning_table(source: str | Path, methods: Sequence[str] = (), digits: int = 3, last_k: int | None = None) -> str:
    """The lr-grid table of a tuner's output folder or tuned file (see the module docstring).

    Parameters
    ----------
    source : path
        A tuner's output folder (``last_k`` needed) or a ``conf/tuned/<setting>.yaml``.
    methods : sequence of str
        ``"ENTRY -> NAME"`` or ``"ENTRY"``: the columns, in order, under these names (default:
        every entry, under its own name).
    digits : int
        Decimals of a score.
    last_k : int, optional
        A run's score is its mean accuracy over its last ``last_k`` rounds (folders only).

    Raises
    ------
    ReportError
        If the source is neither, ``last_k`` is missing for a folder, or an entry is unknown.
    """
    path = Path(source)
    if path.is_dir():
        if last_k is None or last_k < 1:
            raise ReportError("--tuning on a tuner's folder needs --last-k (the tuner's tune.last_k)")
        scores = _scores_from_folder(path, last_k)
        chosen = {e: choose_lr(list(s), list(s.values())) for e, s in scores.items()}
    elif path.is_file():
        scores, chosen = _scores_from_tuned(path)
    else:
        raise ReportError(f"--tuning: no tuner folder or tuned file at {path}")
    pairs = [parse_method(m) for m in methods] or [(e, e) for e in scores]
    unknown = [label for label, _ in pairs if label not in scores]
    if unknown:
        raise ReportError(f"--method {unknown}: no such entry; entries: {list(scores)}")
    lrs = sorted({lr for label, _ in pairs for lr in scores[label]})
    body = []
    for lr in lrs:
        row = [f"{lr:g}"]
        for label, _ in pairs:
            s = scores[label].get(lr)
            text = "" if s is None else ("failed" if not math.isfinite(s) else _half_up(s, digits))
            row.append(f"**{text}**" if text and chosen[label] == lr else text)
        body.append(row)
    header = ["lr", *(name for _, name in pairs)]
    return markdown_table(header, ["---:"] * len(header), body)


def marked_tables(text: str) -> list[tuple[str, str, tuple[int, int]]]:
    """Each ``<!-- table: <command> -->`` comment of ``text``, the Markdown table right below it,
    and the table's ``(start, end)`` offsets in ``text`` (to rewrite it in place).

    Raises
    ------
    ReportError
        If a marker is not followed (after blank lines at most) by a table.
    """
    out = []
    for match in re.finditer(r"<!--\s*table:(.*?)-->", text, flags=re.S):
        command = " ".join(match.group(1).split())
        start = match.end() + len(text[match.end():]) - len(text[match.end():].lstrip("\n"))
        table = []
        for line in text[start:].splitlines():
            if not line.startswith("|"):
                break
            table.append(line)
        if len(table) < 2:
            raise ReportError(f"the marker '{command[:60]}...' is not followed by a table")
        joined = "\n".join(table)
        out.append((command, joined, (start, start + len(joined))))
    return out


def split_markers(text: str) -> list[tuple[str, str]]:
    """Each ``<!-- table: <command> -->`` comment of ``text`` and the Markdown table right below it
    (:func:`marked_tables` without the offsets).

    Returns
    -------
    list of (command, table)
        The command (one line, whitespace collapsed) and the table's lines joined by newlines.
    """
    return [(command, table) for command, table, _ in marked_tables(text)]


def table_cells(table: str, strip_bold: bool) -> list[list[str]]:
    """The cells of a Markdown table, row by row, whitespace collapsed (bold removed if asked)."""
    rows = []
    for line in table.strip().splitlines():
        body = line.strip()
        body = body[1:] if body.startswith("|") else body
        body = body[:-1] if body.endswith("|") else body
        cells = [" ".join(c.split()) for c in body.split("|")]
        rows.append([c.replace("**", "") for c in cells] if strip_bold else cells)
    return rows
