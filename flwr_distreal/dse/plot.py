"""Fig. 4-style plot: the evolving DSE front against equal-rate dropout vectors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .front import front_history
from .settings import DSESettings

__all__ = ["plot_fronts"]


def plot_fronts(
    history: Sequence[dict[str, Any]],
    final_front: np.ndarray,
    uniform: np.ndarray,
    settings: DSESettings,
    path: str | Path,
    title: str = "DSE front vs equal rates",
) -> Path:
    """Plot the population's front at several generations, the final front of all evaluated
    vectors and the equal-rate vectors in normalised objective space (equation (1)).

    Parameters
    ----------
    history : sequence of dict
        Per-generation entries with ``generation`` and ``population_f``.
    final_front : np.ndarray
        Final non-dominated objectives, shape ``(m, 2)``.
    uniform : np.ndarray
        Objectives of the equal-rate vectors, shape ``(u, 2)``, in rate order.
    settings : DSESettings
        For the number of generations shown and the reference point.
    path : str or Path
        PNG file to write.
    title : str
        Plot title.

    Returns
    -------
    Path
        The written file.
    """
    import matplotlib  # lazy: the plot is the DSE's only use of matplotlib, and it is heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    shown = front_history(history, settings.plot_generations)
    cmap = plt.get_cmap("viridis")
    for j, (gen, pts) in enumerate(shown):
        colour = cmap(j / max(1, len(shown) - 1))
        ax.scatter(pts[:, 0], pts[:, 1], s=12, color=colour, alpha=0.8, label=f"generation {gen}")
    if len(final_front):
        ax.plot(final_front[:, 0], final_front[:, 1], "-", color="black", lw=1.2, label="final front (all evaluated)")
    if len(uniform):
        ax.plot(uniform[:, 0], uniform[:, 1], "s--", color="tab:red", ms=5, label="same rate in all layers")
    ax.set_xlabel("normalised MACs  f1 (equation 1)")
    ax.set_ylabel("normalised convergence loss  f2 (equation 1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
