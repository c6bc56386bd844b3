"""Re-measure a DSE's LUT vectors and the equal-rate vectors with fresh seeds.

The DSE's front is the best of many noisy measurements, so its own numbers flatter it (the
"winner's curse"). This script measures the LUT's vectors and the equal-rate vectors again
with seeds the DSE never used, from the same snapshot and data, normalises both with the
freshly measured all-0 / all-0.5 extremes (equation (1)) and reports the hypervolumes and
the matched-MACs comparison of this unbiased re-measurement.

Example::

    python scripts/revalidate_dse.py results/dse_femnist --root ../shared/data/femnist_leaf \\
        --dataset femnist --batches 32 --seeds 10 11 12
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from flwr_distreal.dse import CachedEvaluator, Normaliser, ShortTrainingFitness, ShortTrainingSettings, Snapshot
from flwr_distreal.dse.datasets import load_dse_data
from flwr_distreal.dse.front import best_gain_at_budget, hypervolume
from flwr_distreal.core.lut import LUT


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("directory", help="DSE output directory (lut.json, snapshot.pt)")
    p.add_argument("--snapshot", default=None, help="snapshot file (default <directory>/snapshot.pt)")
    p.add_argument("--dataset", default="femnist", help="loader name of the DSE's data")
    p.add_argument("--root", default=None, help="dataset directory")
    p.add_argument("--val-fraction", type=float, default=0.2, help="as in the DSE (dse.val_fraction)")
    p.add_argument("--split-seed", type=int, default=0, help="as in the DSE (dse.seed)")
    p.add_argument("--max-samples", type=int, default=None, help="as in the DSE (dse.max_samples)")
    p.add_argument("--batches", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seeds", type=int, nargs="+", default=[10, 11, 12], help="seeds the DSE did not use")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reference", type=float, nargs=2, default=[1.1, 1.1])
    args = p.parse_args()

    directory = Path(args.directory)
    lut = LUT.load(directory / "lut.json")
    data = load_dse_data(args.dataset, root=args.root, val_fraction=args.val_fraction, seed=args.split_seed,
                         max_samples=args.max_samples, options={"seed": args.split_seed})
    snap_path = Path(args.snapshot) if args.snapshot else directory / "snapshot.pt"
    snapshot = Snapshot.load(snap_path, model_name=lut.model_name, dataset=data.name)
    settings = ShortTrainingSettings(batches=args.batches, batch_size=args.batch_size, seeds=tuple(args.seeds), lr=args.lr)
    fitness = ShortTrainingFitness(lut.model_name, snapshot, data, settings)
    k = fitness.n_layers
    rates = [round(0.05 * i, 2) for i in range(11)]
    uniform = np.array([np.full(k, r) for r in rates])
    with CachedEvaluator(fitness, workers=args.workers, threads=1) as ev:
        u_macs, u_gain = ev.evaluate(uniform)
        l_macs, l_gain = ev.evaluate(np.asarray(lut.vectors))
        trainings = ev.n_trainings
    norm = Normaliser(u_macs[0], u_macs[-1], u_gain[0], u_gain[-1])
    f_uni = norm.normalise(u_macs, u_gain)
    f_lut = norm.normalise(l_macs, l_gain)
    hv_lut = hypervolume(f_lut, args.reference)
    hv_uni = hypervolume(f_uni, args.reference)
    best = best_gain_at_budget(l_macs, l_gain, u_macs[1:-1])
    wins = [bool(b > g) for b, g in zip(best, u_gain[1:-1])]
    report = {
        "seeds": args.seeds,
        "batches": args.batches,
        "trainings": trainings,
        "hypervolume_lut": hv_lut,
        "hypervolume_uniform": hv_uni,
        "lut_better_at_matched_macs": float(np.mean(wins)),
        "per_rate": [{"rate": r, "macs": int(m), "uniform_gain": float(g), "lut_best_gain_within": float(b)}
                     for r, m, g, b in zip(rates[1:-1], u_macs[1:-1], u_gain[1:-1], best)],
        "lut": [{"macs": int(m), "gain": float(g)} for m, g in zip(l_macs, l_gain)],
    }
    out = directory / "revalidation.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"fresh seeds {args.seeds}: hypervolume LUT {hv_lut:.4f} vs uniform {hv_uni:.4f}; LUT better at "
          f"matched MACs for {sum(wins)}/{len(wins)} equal rates -> {out}")


if __name__ == "__main__":
    main()
