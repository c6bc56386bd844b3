"""Plots of federated runs: accuracy over rounds (paper, Fig. 5a/6a style) and stragglers."""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_bands", "plot_runs", "read_metrics"]



def _save(fig, path: str | Path) -> Path:
    """Lay out, write (creating the folder) and close a figure; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def _number(value: str | None) -> float:
    """A CSV cell as a float: NaN when empty or not a number (a text column)."""
    try:
        return float(value) if value not in ("", None) else math.nan
    except ValueError:
        return math.nan


def read_metrics(path: str | Path) -> list[dict[str, float | None]]:
    """Read a run's ``metrics.csv`` into rows of floats.

    Parameters
    ----------
    path : path
        The file.

    Returns
    -------
    list of dict
        One row per round; empty or non-numeric cells are NaN, except the empty ``accuracy`` and
        ``loss`` of a round the server did not evaluate (``evaluate_every``): None. A file with
        only its header (a run that stopped before its first round) gives ``[]``.

    Raises
    ------
    FileNotFoundError
        If there is no file at ``path``.
    ValueError
        If the file has no ``round`` or ``accuracy`` column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"round", "accuracy"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path} is not a flwr-distreal metrics.csv (no {', '.join(sorted(missing))} column)")
        return [
            {k: None if k in ("accuracy", "loss") and v in ("", None) else _number(v) for k, v in r.items() if k is not None}
            for r in reader
        ]


def _accuracy(row: Mapping[str, Any]) -> float | None:
    """A row's accuracy; None for a round the server did not evaluate (an empty cell: None, ``""``
    or NaN, as :func:`load_metrics` reads it)."""
    value = row.get("accuracy")
    if value is None or value == "":
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def plot_runs(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Accuracy (top) and stragglers per round (bottom) of several runs, one line each.

    Parameters
    ----------
    runs : mapping of label to metrics rows
        Rows with ``round``, ``accuracy`` and ``stragglers``; several rows per label with the
        same round (seeds) are averaged.
    path : path
        Output image (PNG, PDF, ...).
    title : str
        Figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for label, rows in runs.items():
        by_round: dict[int, list[Mapping[str, Any]]] = {}
        for r in rows:
            by_round.setdefault(int(r["round"]), []).append(r)
        rounds = sorted(by_round)
        # the accuracy curve joins the evaluated rounds (evaluate_every: the others have no accuracy)
        scored = {t: [a for a in (_accuracy(r) for r in by_round[t]) if a is not None] for t in rounds}
        acc_rounds = [t for t in rounds if scored[t]]
        acc = [sum(scored[t]) / len(scored[t]) for t in acc_rounds]
        strag = [sum(float(r.get("stragglers", 0)) for r in by_round[t]) / len(by_round[t]) for t in rounds]
        ax1.plot(acc_rounds, acc, label=label, marker="." if len(acc_rounds) < len(rounds) else None)
        ax2.plot(rounds, strag, label=label)
    ax1.set_ylabel("test accuracy (full model)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.set_ylabel("stragglers")
    ax2.set_xlabel("round")
    ax2.grid(alpha=0.3)
    if title:
        ax1.set_title(title)
    return _save(fig, path)


#: One curve with its band: rounds, mean and standard deviation per round.
Band = tuple[Sequence[float], Sequence[float], Sequence[float]]


def plot_bands(
    accuracy: Mapping[str, Band],
    path: str | Path,
    title: str = "",
    stragglers: Mapping[str, Band] | None = None,
) -> Path:
    """Mean curves with +- one s.d. bands: accuracy over rounds (top) and, when given,
    stragglers per round (bottom); one colour per label in both panels.

    Parameters
    ----------
    accuracy : mapping of label to (rounds, mean, sd)
        The accuracy curves (fractions; plotted in percent).
    path : path
        Output image (PNG, PDF, ...).
    title : str
        Figure title.
    stragglers : mapping of label to (rounds, mean, sd), optional
        Stragglers per round, same labels.

    Returns
    -------
    Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if stragglers:
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    else:
        fig, ax1 = plt.subplots(figsize=(7, 4.5))
        ax2 = None
    colours = {label: f"C{i % 10}" for i, label in enumerate(accuracy)}
    for label, (rounds, mean, sd) in accuracy.items():
        x, m, s = np.asarray(rounds, float), 100 * np.asarray(mean, float), 100 * np.nan_to_num(np.asarray(sd, float))
        ax1.plot(x, m, color=colours[label], label=label, lw=1.4)
        ax1.fill_between(x, m - s, m + s, color=colours[label], alpha=0.2, lw=0)
    ax1.set_ylabel("test accuracy (%)")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    if ax2 is not None:
        for label, (rounds, mean, sd) in (stragglers or {}).items():
            x, m, s = np.asarray(rounds, float), np.asarray(mean, float), np.nan_to_num(np.asarray(sd, float))
            ax2.plot(x, m, color=colours.get(label), lw=1.0)
            ax2.fill_between(x, m - s, m + s, color=colours.get(label), alpha=0.2, lw=0)
        ax2.set_ylabel("stragglers")
        ax2.grid(alpha=0.3)
    (ax2 or ax1).set_xlabel("round")
    if title:
        ax1.set_title(title, fontsize=10)
    return _save(fig, path)
