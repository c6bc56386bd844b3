"""Time the DSE's fitness evaluation and compare the ways of running it in parallel.

For a model and dataset this measures seconds per evaluated vector (all seeds of the short
training) in three modes and projects the wall time of a DSE at the given size:

* ``serial-1``: one process, 1 torch thread;
* ``serial-N``: one process, N torch threads (N = ``--cores``);
* ``pool-N``: N worker processes with 1 torch thread each (:class:`CachedEvaluator`, the DSE's
  way: one job per (vector, seed), so the seeds of one vector also run in parallel);
* ``mpbfe-N``: pygmo's own parallel batch evaluator, ``pg.mp_bfe`` with a pool of N processes,
  over a plain UDP whose ``fitness`` trains all seeds of one vector (pygmo ships the problem and
  the decision vectors to its workers; no cache).

The vectors are random (seeded) and distinct in kept counts, so no cache hit hides work.
Timing does not depend on how well the snapshot is trained, so the snapshot is the model's
random initialisation unless ``--snapshot`` names a file.

Examples::

    python scripts/bench_dse_parallel.py --model femnist_cnn --dataset femnist_leaf
    python scripts/bench_dse_parallel.py --model densenet_bc_40 --dataset synthetic --vectors 2 --modes serial-1

Run it on a quiet machine: other processes on the same cores distort the comparison.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from flwr_distreal.dse import CachedEvaluator, ShortTrainingFitness, ShortTrainingSettings, Snapshot
from flwr_distreal.dse.datasets import load_dse_data, synthetic_data
from flwr_distreal.dse.fitness import SNAPSHOT_FORMAT
from flwr_distreal.models import build_model

REPO = Path(__file__).resolve().parents[1]


class PlainFitnessUDP:
    """The raw objectives (MACs, -mean dAcc) of one vector, no cache: for ``pg.mp_bfe``."""

    def __init__(self, short_training: ShortTrainingFitness) -> None:
        self.short_training = short_training

    def get_bounds(self) -> tuple[list[float], list[float]]:
        k = self.short_training.n_layers
        return [0.0] * k, [0.5] * k

    def get_nobj(self) -> int:
        return 2

    def fitness(self, x: np.ndarray) -> list[float]:
        torch.set_num_threads(1)
        st = self.short_training
        v = np.asarray(x, dtype=np.float64)
        gains = [st.measure(v, i) for i in range(st.n_seeds)]
        return [float(st.macs(v)), -float(np.mean(gains))]


def _time_mp_bfe(fitness: ShortTrainingFitness, warm: np.ndarray, vectors: np.ndarray, n: int) -> float:
    """Seconds for pygmo's ``mp_bfe`` (pool of ``n`` processes) to evaluate ``vectors``."""
    import pygmo as pg

    pg.mp_bfe.init_pool(n)
    prob = pg.problem(PlainFitnessUDP(fitness))
    bfe = pg.bfe(pg.mp_bfe())
    if len(warm):
        bfe(prob, warm.ravel())
    start = time.perf_counter()
    bfe(prob, vectors.ravel())
    wall = time.perf_counter() - start
    pg.mp_bfe.shutdown_pool()
    return wall


def _data(args: argparse.Namespace, shape: tuple[int, int, int], num_classes: int):
    if args.dataset == "synthetic":
        n = args.train_size + args.val_size
        frac = args.val_size / n
        return synthetic_data(n_samples=n, num_classes=num_classes, shape=shape, val_fraction=frac)
    root = Path(args.root) if args.root else REPO.parent / "shared" / "data" / args.dataset
    data = load_dse_data(args.dataset, root=root, val_fraction=0.2)
    if args.val_size < data.val_x.shape[0]:
        data.val_x, data.val_y = data.val_x[: args.val_size], data.val_y[: args.val_size]
    return data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="femnist_cnn")
    p.add_argument("--dataset", default="femnist_leaf", help="femnist_leaf, mnist, ... or synthetic")
    p.add_argument("--root", default=None, help="dataset directory (default ../shared/data/<dataset>)")
    p.add_argument("--batches", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--val-size", type=int, default=2942, help="validation samples (FEMNIST DSE split: 2942)")
    p.add_argument("--train-size", type=int, default=10000, help="training samples (synthetic only)")
    p.add_argument("--vectors", type=int, default=4, help="vectors per mode")
    p.add_argument("--cores", type=int, default=2)
    p.add_argument("--modes", default="serial-1,serial-N,pool-N,mpbfe-N")
    p.add_argument("--warmup", type=int, default=1, help="untimed vectors per mode first (0: none)")
    p.add_argument("--population", type=int, default=64, help="for the projection")
    p.add_argument("--generations", type=int, default=50, help="for the projection")
    p.add_argument("--snapshot", default=None, help="snapshot file (default: random initialisation)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    probe = build_model(args.model)
    num_classes = probe.num_classes
    data = _data(args, tuple(probe.input_shape), num_classes)
    if data.num_classes != num_classes:
        probe = build_model(args.model, num_classes=data.num_classes)
    if args.snapshot:
        snapshot = Snapshot.load(args.snapshot, model_name=args.model)
    else:
        torch.manual_seed(0)
        snapshot = Snapshot(
            state_dict={k: v.clone() for k, v in probe.state_dict().items()},
            meta={"format": SNAPSHOT_FORMAT, "model": args.model, "num_classes": data.num_classes,
                  "dataset": data.name, "steps": 0, "val_accuracy": float("nan")},
        )
    settings = ShortTrainingSettings(
        batches=args.batches, batch_size=args.batch_size, seeds=tuple(range(args.seeds)), lr=args.lr
    )
    fitness = ShortTrainingFitness(args.model, snapshot, data, settings)
    k = fitness.n_layers
    rng = np.random.default_rng(12345)
    results: dict[str, dict[str, float]] = {}
    modes = [m.replace("N", str(args.cores)) for m in args.modes.split(",")]
    for j, mode in enumerate(modes):
        kind, n = mode.split("-")
        n = int(n)
        vectors = rng.uniform(0.0, 0.5, size=(args.vectors, k))  # fresh vectors per mode: no cache hits
        if kind == "mpbfe":
            warm = rng.uniform(0.0, 0.5, size=(args.warmup * n, k))
            wall = _time_mp_bfe(fitness, warm, vectors, n)
            trainings = args.vectors * args.seeds
        else:
            wall, trainings = _time_pool(fitness, kind, n, vectors, rng, args.warmup, k)
        per_vec = wall / args.vectors
        evals = args.population * (args.generations + 1)
        results[mode] = {
            "seconds_per_vector": per_vec,
            "vectors": args.vectors,
            "trainings": trainings,
            "projected_hours_no_cache": per_vec * evals / 3600,
        }
        print(
            f"{args.model:>16} {mode:>9}: {per_vec:7.2f} s per vector ({args.seeds} seeds x {args.batches} x "
            f"{args.batch_size}, val {data.val_x.shape[0]}); {args.population} x ({args.generations}+1) vectors "
            f"without cache hits: {per_vec * evals / 3600:6.2f} h",
            flush=True,
        )
    best = min(results, key=lambda m: results[m]["seconds_per_vector"])
    print(f"fastest: {best}; " + ", ".join(
        f"{m}/{best} {results[m]['seconds_per_vector'] / results[best]['seconds_per_vector']:.2f}" for m in results
    ))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results, "fastest": best}, indent=1))


def _time_pool(
    fitness: ShortTrainingFitness, kind: str, n: int, vectors: np.ndarray, rng: np.random.Generator,
    warmup: int, k: int,
) -> tuple[float, int]:
    """Seconds and trainings for :class:`CachedEvaluator` to evaluate ``vectors`` (``serial``: one
    process with ``n`` threads; ``pool``: ``n`` processes with one thread each)."""
    ev = CachedEvaluator(fitness, workers=n if kind == "pool" else 1, threads=1 if kind == "pool" else n)
    # Warm-up outside the timing: worker start (spawn + imports), first forward passes.
    if warmup > 0:
        ev.evaluate(rng.uniform(0.0, 0.5, size=(warmup * (n if kind == "pool" else 1), k)))
        ev.n_trainings = 0
    start = time.perf_counter()
    ev.evaluate(vectors)
    wall = time.perf_counter() - start
    ev.close()
    return wall, ev.n_trainings


if __name__ == "__main__":
    main()
