"""The cost of measuring: femnist_cnn training steps with and without the wall-clock machinery.

Two side-by-side comparisons in one run, interleaved A/B so that a load change on the machine
hits both variants alike; medians and the B/A ratio are printed.

1. Per step. A: a plain training step (``set_dropout``, forward, backward, optimiser step).
   B: the same step with everything the wall-clock mode adds around it: clock reads before and
   after, the gap bookkeeping, :meth:`ThroughputEstimator.update`, :func:`choose_vector` and the
   step record. B trains the same vector as A (the choice is computed, then the benchmark's
   vector is used), so both do identical compute and the difference is the overhead.
2. Per round. A: :class:`~flwr_distreal.training.trainers.DistrealTrainer` without resource limits
   (the full model on every mini-batch). B: :class:`~flwr_distreal.training.wallclock.MeasuredDistrealTrainer`
   with a one-vector LUT (the full model) and a far deadline, so it also trains the full model
   on every mini-batch while measuring, estimating and selecting.

Usage::

    .venv/bin/python scripts/bench_wallclock.py [--steps 300] [--rounds 8] [--batch 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import deque

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flwr_distreal.core.dropout import DroppedWeightGuard
from flwr_distreal.core.lut import LUT
from flwr_distreal.core.macs import count_macs
from flwr_distreal.models import build_model
from flwr_distreal.core.resources import step_macs
from flwr_distreal.training.trainers import DistrealTrainer, get_weights
from flwr_distreal.training.wallclock import (
    MeasuredDistrealTrainer,
    StepRecord,
    StepTimeTable,
    ThroughputEstimator,
    choose_vector,
)


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="steps per variant in the per-step A/B")
    p.add_argument("--rounds", type=int, default=20, help="rounds per variant in the per-round A/B")
    p.add_argument("--round-batches", type=int, default=20, help="mini-batches per round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rate", type=float, default=0.0, help="uniform dropout rate trained in the per-step A/B")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the demo's setting)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def per_step(args: argparse.Namespace) -> tuple[list[float], list[float], float]:
    torch.manual_seed(args.seed)
    model = build_model("femnist_cnn")
    model.seed_dropout(args.seed)
    lut = LUT.uniform(model)
    full = count_macs(model)
    table = StepTimeTable.proportional(lut, full, args.batch)
    opt = DroppedWeightGuard(torch.optim.SGD(model.parameters(), lr=0.01), model)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.rand(args.batch, 1, 28, 28, generator=gen)
    y = torch.randint(0, 62, (args.batch,), generator=gen)
    vector = None if args.rate == 0 else np.full(model.num_dropout_layers, args.rate)
    fwd = count_macs(model, vector)
    cost = step_macs(fwd, args.batch, 3.0)
    sizes = [args.batch] * 50
    est = ThroughputEstimator(initial=1e10)
    gaps: deque[float] = deque(maxlen=7)
    records: list[StepRecord] = []
    clock = time.perf_counter
    state = {"prev_end": None, "deadline": clock() + 1e6}

    def plain() -> None:
        model.set_dropout(vector)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def measured() -> None:
        now = clock()
        choice = choose_vector(
            table, est.throughput, state["deadline"] - now, sizes,
            overhead=statistics.median(gaps) if gaps else 0.0, margin=0.1,
        )
        t0 = clock()
        if state["prev_end"] is not None:
            gaps.append(max(0.0, t0 - state["prev_end"]))
        model.set_dropout(vector)  # the benchmark's vector, not choice.index: identical compute
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        t_fb = clock()
        if t_fb > state["deadline"]:  # the abandon check
            return
        opt.step()
        t1 = clock()
        rate = est.update(t1 - t0, cost)
        records.append(StepRecord(t0, t1, args.batch, choice.index or 0, args.rate, fwd, cost,
                                  choice.predicted, choice.budget, rate))
        state["prev_end"] = t1
        float(loss.detach())  # the trainer keeps the loss

    for _ in range(5):  # warm-up both paths
        plain()
        measured()
    a: list[float] = []
    b: list[float] = []
    for i in range(args.steps):
        order = (plain, measured) if i % 2 == 0 else (measured, plain)
        for fn in order:
            t = time.perf_counter()
            fn()
            (a if fn is plain else b).append(time.perf_counter() - t)
    # the machinery alone, without training
    n = 5000
    t = time.perf_counter()
    for _ in range(n):
        now = clock()
        c = choose_vector(table, est.throughput, state["deadline"] - now, sizes, overhead=0.0, margin=0.1)
        t1 = clock()
        est.update(0.02, cost)
        gaps.append(0.0)
        statistics.median(gaps)
        StepRecord(now, t1, args.batch, c.index or 0, 0.0, fwd, cost, c.predicted, c.budget, 1.0)
    per_call = (time.perf_counter() - t) / n
    return a, b, per_call


def per_round(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    n = args.round_batches * args.batch
    gen = torch.Generator().manual_seed(args.seed)
    data = TensorDataset(torch.rand(n, 1, 28, 28, generator=gen), torch.randint(0, 62, (n,), generator=gen))
    torch.manual_seed(args.seed)
    base_model = build_model("femnist_cnn")
    arrays = get_weights(base_model)
    plain = DistrealTrainer(
        build_model("femnist_cnn"), DataLoader(data, batch_size=args.batch), 0, LUT.uniform(base_model), None,
        lr=0.01, seed=args.seed,
    )
    one = LUT.from_vectors(base_model, [np.zeros(base_model.num_dropout_layers)])
    measured = MeasuredDistrealTrainer(
        build_model("femnist_cnn"), DataLoader(data, batch_size=args.batch), 0, one,
        time_table="proportional", lr=0.01, seed=args.seed,
    )
    cfg_a = {"server-round": 1}
    cfg_b = {"server-round": 1, "round-deadline": 1e6}
    plain.fit(arrays, cfg_a)
    res = measured.fit(arrays, cfg_b)
    assert res.metrics["num_batches"] == args.round_batches and res.metrics["mean_dropout"] == 0.0
    a: list[float] = []
    b: list[float] = []
    for i in range(args.rounds):
        order = ((plain, cfg_a, a), (measured, cfg_b, b))
        for trainer, cfg, out in order if i % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            trainer.fit(arrays, cfg)
            out.append(time.perf_counter() - t)
    return a, b


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    a, b, per_call = per_step(args)
    ma, mb = statistics.median(a), statistics.median(b)
    ra, rb = per_round(args)
    mra, mrb = statistics.median(ra), statistics.median(rb)
    print(f"femnist_cnn, batch {args.batch}, {args.threads} torch thread(s), torch {torch.__version__}")
    print(f"{'comparison':<34} {'A plain':>12} {'B measured':>12} {'B/A':>7}")
    label = f"per step (median, ms), rate {args.rate:g}"
    print(f"{label:<34} {ma * 1e3:12.3f} {mb * 1e3:12.3f} {mb / ma:7.3f}")
    print(
        f"{'per round of ' + str(args.round_batches) + ' batches (median, s)':<34} "
        f"{mra:12.3f} {mrb:12.3f} {mrb / mra:7.3f}"
    )
    print(f"machinery alone (clock, estimator, selection, record): {per_call * 1e6:.1f} us per step "
          f"= {per_call / ma * 100:.2f} % of a step")
    iqr = lambda v: np.subtract(*np.percentile(v, [75, 25]))  # noqa: E731
    took = time.perf_counter() - started
    print(f"spread (IQR) per step: A {iqr(a) * 1e3:.2f} ms, B {iqr(b) * 1e3:.2f} ms; "
          f"{args.steps} steps and {args.rounds} rounds per variant, interleaved; took {took:.0f} s")
    if not math.isfinite(mb / ma):
        raise SystemExit("no valid timing")


if __name__ == "__main__":
    main()
