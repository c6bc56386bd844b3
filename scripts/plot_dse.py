"""Re-plot a finished DSE from its output directory, in raw units (MACs vs accuracy gain).

The DSE itself writes ``front.png`` in normalised objective space (equation (1)). This script
reads ``evaluations.json`` and ``summary.json`` of a DSE output directory and draws the
paper's Fig. 4 comparison in the units a user reads: forward MACs per sample against the mean
accuracy gain of the short training, for every evaluated vector, the DSE's non-dominated front
and the equal-rate vectors.

Example::

    python scripts/plot_dse.py results/dse_femnist            # writes results/dse_femnist/front_raw.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from flwr_distreal.dse.front import non_dominated


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="DSE output directory (with evaluations.json and summary.json)")
    p.add_argument("--out", default=None, help="PNG path (default <directory>/front_raw.png)")
    args = p.parse_args()
    directory = Path(args.directory)
    ev = json.loads((directory / "evaluations.json").read_text())
    summary = json.loads((directory / "summary.json").read_text())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dse = [e for e in ev["evaluations"] if e["source"] == "dse"]
    macs = np.array([e["macs"] for e in dse], dtype=float) / 1e6
    gain = np.array([e["dacc_mean"] for e in dse]) * 100
    gens = np.array([e["generation"] for e in dse])
    front = non_dominated(np.stack([macs, -gain], axis=1))
    uni = summary["uniform"]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    sc = ax.scatter(macs, gain, c=gens, s=10, cmap="viridis", alpha=0.6, label="evaluated vectors")
    fig.colorbar(sc, ax=ax, label="generation first evaluated")
    ax.step(macs[front], gain[front], where="post", color="black", lw=1.3, label="DSE front")
    ax.plot([u["macs"] / 1e6 for u in uni], [u["dacc_mean"] * 100 for u in uni], "s--", color="tab:red",
            ms=5, label="same rate in all layers")
    ax.set_xlabel("forward MACs per sample [M]")
    ax.set_ylabel("accuracy gain of the short training [%-points]")
    ax.set_title(
        f"{ev['model']}: HV DSE {summary['hypervolume_dse']:.3f} vs uniform {summary['hypervolume_uniform']:.3f}"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out) if args.out else directory / "front_raw.png"
    fig.savefig(out, dpi=120)
    print(out)


if __name__ == "__main__":
    main()
