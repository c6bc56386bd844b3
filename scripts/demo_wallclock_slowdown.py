"""Demo: a DISTREAL client on the wall clock keeps its deadline when its CPU is cut in half.

One client trains femnist_cnn (random data of FEMNIST shape 1x28x28, 62 classes) on one CPU
core (one torch thread, the process pinned with ``os.sched_setaffinity``) against a real round
deadline (default 10 s). ``--slowdown-at`` seconds into the round (default 4 s) a CPU hog,
pinned to the same core, starts spinning, so the client gets about half the core from then on;
it is stopped by its PID when the round ends. The round holds as many mini-batches as the full
model trains in ``--load`` (default 0.8) of the deadline at full speed, so the full model would
end at about ``slowdown + (load * deadline - slowdown) * 2`` = 12 s.

Per run, two clients in turn (order alternating between runs):

* DISTREAL (:class:`~flwr_distreal.training.wallclock.MeasuredDistrealTrainer`, uniform LUT of 11 rates,
  ``"deadline"`` policy): selects a vector before every mini-batch from its measured speed;
* a fixed-submodel baseline (:class:`~flwr_distreal.training.wallclock.MeasuredBaselineTrainer`): at
  round start, as Federated Dropout's server would, the largest uniform rate whose predicted
  round time fits the deadline at the speed measured then is fixed for the round (random
  filter subset); it trains all its mini-batches however long it takes.

Both share the device's step-time table, measured once at the start (before any hog). Printed
per run and as mean +- s.d. over the runs: finish time vs. deadline, straggler, mini-batches
trained, utilisation (MACs spent / MACs the measured throughput allowed, full-model-equivalent;
above 1 = spent more than the round allowed), the mean dropout rate of the vectors before and
after the slowdown, and the estimated speed before and after.

Usage::

    .venv/bin/python scripts/demo_wallclock_slowdown.py [--runs 3] [--deadline 10] [--slowdown-at 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from flwr_distreal.core import contract as C
from flwr_distreal.core.dropout import kept_count
from flwr_distreal.core.lut import LUT
from flwr_distreal.models import build_model
from flwr_distreal.training.trainers import get_weights
from flwr_distreal.training.wallclock import MeasuredBaselineTrainer, MeasuredDistrealTrainer, StepRecord, StepTimeTable

HOG = (
    "import os, sys, time\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
    "while True:\n"
    "    pass\n"
)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--deadline", type=float, default=10.0, help="round deadline, seconds")
    p.add_argument("--slowdown-at", type=float, default=4.0, help="seconds into the round the hog starts")
    p.add_argument("--load", type=float, default=0.8, help="full-model round time / deadline at full speed")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--core", type=int, default=None, help="CPU core for client and hog (default: the last allowed)")
    p.add_argument("--no-hog", action="store_true", help="no slowdown (control)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


class Hog:
    """A busy-looping subprocess pinned to ``core`` that starts spinning at unix time ``at``."""

    def __init__(self, core: int, at: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOG, str(core), repr(at)])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()  # by its PID (Popen holds it)
        self.proc.wait(timeout=10)


def _baseline_rate(table: StepTimeTable, lut: LUT, sizes: Sequence[int], deadline: float, factor: float) -> float:
    """Federated Dropout's round-start choice: the largest uniform rate predicted to fit."""
    rate = table.reference_throughput(factor)
    best = 0.5
    for i in range(len(lut)):  # ascending MACs: the last that fits wins
        t = sum(table.rel_time[i] * table.full_step_macs(b, factor) / rate for b in sizes)
        if t <= deadline:
            best = float(np.mean(lut.vectors[i]))
    return best


def _split(records: Sequence[StepRecord], at: float) -> tuple[list[StepRecord], list[StepRecord]]:
    done = [r for r in records if r.completed]
    return [r for r in done if r.end <= at], [r for r in done if r.start >= at]


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def run_client(kind: str, trainer, arrays, config, core: int, slow_at: float | None) -> dict:
    hog = None
    start_unix = time.time() + 0.5  # leave the hog's interpreter time to start
    if slow_at is not None:
        hog = Hog(core, start_unix + slow_at)
    try:
        time.sleep(max(0.0, start_unix - time.time()))
        res = trainer.fit(arrays, config)
    finally:
        alive = hog is not None and hog.proc.poll() is None
        if hog is not None:
            hog.stop()
    if hog is not None and not alive:
        raise SystemExit("the CPU hog died before the round ended")
    m = res.metrics
    at = slow_at if slow_at is not None else float("inf")
    before, after = _split(trainer.step_log, at)
    return {
        "kind": kind,
        "finish": m["wall_time"],
        "deadline": m["round_deadline"],
        "straggler": float(bool(m[C.STRAGGLER])),
        "batches": m[C.NUM_BATCHES],
        "total": len(trainer.sizes),
        "utilisation": m[C.UTILISATION],
        "busy": m["busy_fraction"],
        "rate_before": _mean([r.rate for r in before]),
        "rate_after": _mean([r.rate for r in after]),
        "speed_before": _mean([r.throughput for r in before]) / 1e9,
        "speed_after": _mean([r.throughput for r in after]) / 1e9,
        "change_at": m["change_at"],
    }


def main() -> None:
    args = _parse()
    allowed = sorted(os.sched_getaffinity(0))
    core = allowed[-1] if args.core is None else args.core
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    factor = 3.0
    torch.manual_seed(args.seed)
    model = build_model("femnist_cnn")
    lut = LUT.uniform(model)
    arrays = get_weights(model)
    print(f"core {core} (of {allowed}), 1 torch thread, torch {torch.__version__}; calibrating step times ...")
    table = StepTimeTable.measure(model, lut, args.batch, repeats=5, warmup=2)
    print("rate      " + " ".join(f"{float(np.mean(v)):5.2f}" for v in lut.vectors) + "  full")
    print("MACs/full " + " ".join(f"{m / table.full_macs:5.2f}" for m in table.macs) + "  1.00")
    print("rel_time  " + " ".join(f"{r:5.2f}" for r in table.rel_time) + "  1.00")
    full_s = table.full_step_seconds
    steps = int(args.load * args.deadline / full_s)
    n = steps * args.batch
    print(f"full-model step {full_s * 1e3:.1f} ms at batch {args.batch}: {steps} mini-batches ({n} samples) per round; "
          f"deadline {args.deadline:g} s, hog at {args.slowdown_at:g} s" + (" (disabled)" if args.no_hog else ""))
    gen = torch.Generator().manual_seed(args.seed)
    data = TensorDataset(torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 62, (n,), generator=gen))
    slow_at = None if args.no_hog else args.slowdown_at
    rows: list[dict] = []
    for run in range(args.runs):
        order = ["distreal", "baseline"] if run % 2 == 0 else ["baseline", "distreal"]
        for kind in order:
            loader = DataLoader(data, batch_size=args.batch, shuffle=True, generator=torch.Generator())
            fresh = build_model("femnist_cnn")
            config = {C.SERVER_ROUND: run + 1, C.ROUND_DEADLINE: args.deadline}
            if kind == "distreal":
                trainer = MeasuredDistrealTrainer(fresh, loader, 0, lut, time_table=table, lr=args.lr, seed=args.seed)
            else:
                trainer = MeasuredBaselineTrainer(fresh, loader, 0, time_table=table, lr=args.lr, seed=args.seed)
                rate = _baseline_rate(table, lut, trainer.sizes, args.deadline, factor)
                if rate > 0:
                    g = torch.Generator().manual_seed(args.seed + run)
                    kept = [torch.randperm(w, generator=g)[: kept_count(rate, w)] for w in fresh.layer_widths]
                    config[C.FIXED_SUBSETS] = C.encode_subsets(kept)
                kind = f"baseline (rate {rate:g})"
            row = run_client(kind, trainer, arrays, config, core, slow_at)
            row["run"] = run + 1
            rows.append(row)
            print(
                f"run {run + 1} {row['kind']:<20} finish {row['finish']:6.2f} s / {row['deadline']:g} s"
                f"{'  STRAGGLER' if row['straggler'] else '           '}  batches {row['batches']}/{row['total']}  "
                f"util {row['utilisation']:.2f} (busy {row['busy']:.2f})  "
                f"rate {row['rate_before']:.2f} -> {row['rate_after']:.2f}  "
                f"speed {row['speed_before']:.2f} -> {row['speed_after']:.2f} GMAC/s  "
                f"change at {row['change_at']:.2f} s",
                flush=True,
            )
    print()
    print(f"{args.runs} runs, mean +- s.d.; deadline {args.deadline:g} s, CPU halved at {args.slowdown_at:g} s"
          + (" (hog disabled)" if args.no_hog else ""))
    cols = [
        ("finish s", "finish", 2), ("straggler", "straggler", 2), ("batches", "batches", 1),
        ("utilisation", "utilisation", 2), ("busy", "busy", 2), ("rate before", "rate_before", 2),
        ("rate after", "rate_after", 2), ("GMAC/s before", "speed_before", 2), ("GMAC/s after", "speed_after", 2),
    ]
    header = f"{'client':<12}" + "".join(f"{c[0]:>16}" for c in cols)
    print(header)
    for kind in ("distreal", "baseline"):
        sel = [r for r in rows if r["kind"].startswith(kind)]
        cells = []
        for _, key, prec in cols:
            vals = [float(r[key]) for r in sel]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.{prec}f} +- {sd:.{prec}f}")
        print(f"{kind:<12}" + "".join(f"{c:>16}" for c in cells))
    total = rows[0]["total"]
    print(f"(of {total} mini-batches per round; speed = estimated full-model MACs/s of the steps before / after the "
          f"slowdown; utilisation above 1 = spent more than the round allowed)")


if __name__ == "__main__":
    main()
