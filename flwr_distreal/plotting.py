"""Plots of federated runs: accuracy over rounds (paper, Fig. 5a/6a style) and stragglers."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["plot_runs", "read_metrics"]


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    """Read a run's ``metrics.csv`` into rows of floats."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path}")
    with path.open() as f:
        rows = [{k: float(v) if v not in ("", None) else float("nan") for k, v in r.items()} for r in csv.DictReader(f)]
    if not rows or "accuracy" not in rows[0]:
        raise ValueError(f"{path} is not a flwr-distreal metrics.csv (no accuracy column)")
    return rows


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
        acc = [sum(float(r["accuracy"]) for r in by_round[t]) / len(by_round[t]) for t in rounds]
        strag = [sum(float(r.get("stragglers", 0)) for r in by_round[t]) / len(by_round[t]) for t in rounds]
        ax1.plot(rounds, acc, label=label)
        ax2.plot(rounds, strag, label=label)
    ax1.set_ylabel("test accuracy (full model)")
    ax1.grid(alpha=0.3)
    ax1.legend()
    ax2.set_ylabel("stragglers")
    ax2.set_xlabel("round")
    ax2.grid(alpha=0.3)
    if title:
        ax1.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
