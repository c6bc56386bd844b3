#!/usr/bin/env python
"""Plot several runs against each other (the paper's Fig. 5/6 style) and print a summary.

    python scripts/plot_runs.py multirun/2026-11-21/10-00-00 --out comparison.png
    python scripts/plot_runs.py outputs/run_a outputs/run_b --label strategy resources.lam

Each argument is a run directory (with metrics.csv and config.yaml) or a folder holding run
directories (a Hydra multirun sweep). Runs whose labels are equal (e.g. seeds) are averaged.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from flwr_distreal.run.plotting import plot_runs, read_metrics


def find_runs(paths: list[str]) -> list[Path]:
    runs: list[Path] = []
    for p in map(Path, paths):
        if (p / "metrics.csv").is_file():
            runs.append(p)
        elif p.is_dir():
            runs += sorted(d.parent for d in p.rglob("metrics.csv"))
        else:
            sys.exit(f"no run directory or sweep folder at {p}")
    if not runs:
        sys.exit(f"no metrics.csv found under {', '.join(paths)}")
    return runs


def label_of(run: Path, keys: list[str]) -> str:
    cfg_path = run / "config.yaml"
    if not cfg_path.is_file():
        return run.name
    cfg = OmegaConf.load(cfg_path)
    parts = []
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None:
            parts.append(str(value) if key == "strategy.name" else f"{key.split('.')[-1]}={value}")
    return " ".join(parts) or run.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run directories or sweep folders")
    parser.add_argument("--out", default=None, help="image path (default: <first path>/comparison.png)")
    parser.add_argument("--label", nargs="*", default=["strategy.name", "resources.lam"],
                        help="config keys that name a curve")
    parser.add_argument("--title", default="")
    args = parser.parse_args()

    groups: dict[str, list[dict]] = {}
    for run in find_runs(args.paths):
        groups.setdefault(label_of(run, args.label), []).extend(read_metrics(run / "metrics.csv"))
    out = Path(args.out) if args.out else Path(args.paths[0]) / "comparison.png"
    plot_runs(groups, out, title=args.title)

    print(f"{'run':<28}{'rounds':>7}{'final acc':>11}{'best acc':>10}{'stragglers/round':>18}{'utilisation':>13}")
    for label, rows in sorted(groups.items()):
        last = max(int(r["round"]) for r in rows)
        final = [r["accuracy"] for r in rows if int(r["round"]) == last]
        strag = sum(r["stragglers"] for r in rows) / len(rows)
        util = [r["mean_utilisation"] for r in rows if not math.isnan(r["mean_utilisation"])]
        print(f"{label:<28}{last:>7}{sum(final) / len(final):>11.4f}{max(r['accuracy'] for r in rows):>10.4f}"
              f"{strag:>18.2f}{(sum(util) / len(util)) if util else float('nan'):>13.3f}")
    print(f"plot: {out}")


if __name__ == "__main__":
    main()
