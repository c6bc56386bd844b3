"""Server aggregation time per round with and without the round's bounds, side by side.

One DISTREAL round on the server (:class:`flwr_distreal.server.rules.DistrealCore`, the core both
the legacy and the Message-API strategies run): ``--replies`` (10) replies of a DenseNet-BC-40
sized model (``build_model("densenet_bc_40")``'s ``state_dict``: weights, BatchNorm statistics
and counters), each the broadcast model plus a small random update, with honest MACs. Variants,
measured interleaved round-robin (rotating start) so that drift of a shared machine hits all
alike: median and min wall seconds per round, and median CPU seconds of this process per round
(``time.process_time``, less sensitive to other processes on a busy machine):

* ``no-bounds``: the per-reply checks only (arrays, MACs), ``update_bound=None,
  claim_bound=None``: the server before the bounds;
* ``bounds``: the defaults (update norms vs the round's median, claims vs the median claim);
* ``bounds+layer``: ``update_norm="layer"``;
* ``clip-to-median``, ``median``, ``trimmed-mean``: the robust modes (optional, ``--robust``).

The ratio ``bounds / no-bounds`` is the cost of the checks (printed for each statistic).

    python scripts/bench_checks.py
    python scripts/bench_checks.py --replies 35 --repeats 15 --robust
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flwr_distreal.core import contract as C  # noqa: E402
from flwr_distreal.core.macs import count_macs  # noqa: E402
from flwr_distreal.models import build_model  # noqa: E402
from flwr_distreal.server import DistrealCore, Reply, RoundBounds  # noqa: E402


def _replies(g: list[np.ndarray], n: int, seed: int) -> list[Reply]:
    rng = np.random.default_rng(seed)
    out = []
    for d in range(n):
        batches = int(rng.integers(2, 8))
        arrays = [
            (a + 1e-3 * rng.standard_normal(a.shape)).astype(a.dtype) if a.dtype.kind == "f" else a + batches
            for a in g
        ]
        metrics = {C.MACS: batches * 0.7, C.NUM_BATCHES: batches, C.PARTITION_ID: d, C.STRAGGLER: 0}
        out.append(Reply(str(d), d, arrays, 32 * batches, metrics))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="densenet_bc_40")
    parser.add_argument("--replies", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=9, help="rounds per variant")
    parser.add_argument("--robust", action="store_true", help="also time the robust modes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (NumPy's BLAS is not affected)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = build_model(args.model)
    g = [v.detach().numpy().copy() for v in model.state_dict().values()]
    n_params = sum(a.size for a in g if a.dtype.kind == "f")
    replies = _replies(g, args.replies, seed=1)
    variants: dict[str, RoundBounds] = {
        "no-bounds": RoundBounds(update_bound=None, claim_bound=None),
        "bounds": RoundBounds(),
        "bounds+layer": RoundBounds(update_norm="layer"),
    }
    if args.robust:
        variants.update(
            {
                "clip-to-median": RoundBounds(robust="clip-to-median"),
                "median": RoundBounds(robust="median"),
                "trimmed-mean": RoundBounds(robust="trimmed-mean"),
            }
        )
    cores = {name: DistrealCore(full_macs_per_sample=1.0, bounds=b) for name, b in variants.items()}
    print(
        f"{args.model}: {len(g)} state_dict arrays, {n_params / 1e6:.3f} M floating entries "
        f"(full model {count_macs(model) / 1e6:.1f} M MACs); {args.replies} replies per round, "
        f"{args.repeats} rounds per variant, interleaved",
        flush=True,
    )
    times: dict[str, list[float]] = {name: [] for name in cores}
    cpu: dict[str, list[float]] = {name: [] for name in cores}
    names = list(cores)
    for r in range(args.repeats + 1):  # the first pass warms up and is not counted
        for name in names[r % len(names):] + names[: r % len(names)]:
            core = cores[name]
            core.broadcast(r + 1, g)
            start, start_cpu = time.perf_counter(), time.process_time()
            outcome = core.aggregate(r + 1, replies)
            elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
            if outcome.metrics["accepted"] != args.replies:
                raise RuntimeError(f"{name}: honest replies refused: {outcome.metrics}")
            if r:
                times[name].append(elapsed)
                cpu[name].append(elapsed_cpu)
    stats = {
        name: (statistics.median(times[name]), min(times[name]), statistics.median(cpu[name])) for name in cores
    }
    base = stats["no-bounds"]
    print(f"\n{'variant':<15} {'median wall s':>14} {'min wall s':>11} {'median CPU s':>13}   ratios to no-bounds")
    for name, (med, low, c) in stats.items():
        print(
            f"{name:<15} {med:>14.4f} {low:>11.4f} {c:>13.4f}   "
            f"{med / base[0]:.2f} / {low / base[1]:.2f} / {c / base[2]:.2f}"
        )
    b = stats["bounds"]
    print(
        f"\nratio bounds / no-bounds per round: median wall {b[0] / base[0]:.2f}, min wall {b[1] / base[1]:.2f}, "
        f"median CPU {b[2] / base[2]:.2f}"
    )


if __name__ == "__main__":
    main()
