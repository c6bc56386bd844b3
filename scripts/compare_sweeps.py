#!/usr/bin/env python
"""Compare two sweeps run by run: are their per-round metrics bit-identical?

    python scripts/compare_sweeps.py results/main_job outputs/main_job

Each argument is a sweep folder whose runs are named ``<job>_<method>_seed<seed>`` (Hydra's
subdir of the presets). Runs are matched by (method, seed), not by job number, so a sweep with
more methods can be compared with an older one. Two runs are equal when their ``metrics.csv``
have the same rounds and the same value in every column but ``wall_time`` (the only column a
machine's speed changes). Prints one line per differing run and a summary; exit code 0 when every
run of the first sweep is in the second and equal, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

RUN_NAME = re.compile(r"^\d+_(?P<method>.+)_seed(?P<seed>\d+)$")
#: Columns that may differ between two equal runs (they measure the machine, not the run).
TIMING_COLUMNS = ("wall_time",)


def read_sweep(folder: Path) -> dict[tuple[str, int], list[dict[str, str]]]:
    """(method, seed) -> the rows of the run's ``metrics.csv``."""
    if not folder.is_dir():
        raise SystemExit(f"no sweep folder at {folder}")
    runs = {}
    for run in sorted(folder.iterdir()):
        match = RUN_NAME.match(run.name)
        if match and (run / "metrics.csv").is_file():
            with (run / "metrics.csv").open(newline="") as f:
                runs[(match["method"], int(match["seed"]))] = list(csv.DictReader(f))
    if not runs:
        raise SystemExit(f"no <job>_<method>_seed<seed>/metrics.csv under {folder}")
    return runs


def differences(a: list[dict[str, str]], b: list[dict[str, str]]) -> list[str]:
    """What differs between two runs' rows (empty: equal but for the timing columns)."""
    if len(a) != len(b):
        return [f"{len(a)} rounds against {len(b)}"]
    out = []
    for row_a, row_b in zip(a, b):
        for column in row_a:
            if column not in TIMING_COLUMNS and row_a[column] != row_b.get(column):
                out.append(f"round {row_a.get('round')}: {column} {row_a[column]} against {row_b.get(column)}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, nargs="?", help="the sweep whose runs must all be found and equal")
    parser.add_argument("other", type=Path, nargs="?", help="the sweep to compare with it")
    args = parser.parse_args(argv)
    if args.reference is None or args.other is None:
        parser.error("give two sweep folders: REFERENCE OTHER")
    ref, other = read_sweep(args.reference), read_sweep(args.other)
    equal, bad = 0, 0
    for key in sorted(ref):
        method, seed = key
        if key not in other:
            print(f"{method} seed {seed}: not in {args.other}")
            bad += 1
            continue
        diff = differences(ref[key], other[key])
        if diff:
            print(f"{method} seed {seed}: {len(diff)} differences, first: {diff[0]}")
            bad += 1
        else:
            equal += 1
    extra = sorted(set(other) - set(ref))
    columns = len(next(iter(ref.values()))[0]) - len(TIMING_COLUMNS)
    print(
        f"{equal} of {len(ref)} runs equal in every column but {', '.join(TIMING_COLUMNS)} ({columns} columns, every "
        f"round); {bad} differ or are missing; only in {args.other}: {len(extra)}"
    )
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
