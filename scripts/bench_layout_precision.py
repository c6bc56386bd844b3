#!/usr/bin/env python
"""Step times side by side: memory layout (NCHW, channels-last) x precision (fp32, bf16) (issue 21).

For each model (default: DenseNet-BC-40 at batch 64, the FEMNIST CNN at batch 32) it times the
training step the runner takes (:class:`~flwr_distreal.training.trainers.LocalStep`: forward under the
precision's autocast, float32 loss, backward, SGD update) for

* ``full``: the full model;
* ``uniform 0.5``: the compact step at uniform rate 0.5 (the shape repeats every step);
* ``cycling 0.1-0.5``: compact steps whose uniform rate cycles 0.1, 0.2, ..., 0.5, so the
  shapes change every mini-batch as under DISTREAL (a kernel cache keyed by shape is not
  enough here);
* ``eval``: the full model's evaluation forward of ``--eval-batch`` images (no gradient),

in the four combinations NCHW/channels-last x fp32/bf16. All (combination, kind) pairs are
visited round-robin within every repetition (the start rotated each repetition), so a load
change hits them alike; the table shows medians and the ratio to NCHW fp32. It then prints what
``layout: auto`` picks for each model on this machine (:func:`flwr_distreal.training.layout.calibrate_layout`,
measured anew and written to the per-machine cache) next to what the table's own full + uniform
0.5 medians say. bf16 is skipped on a CPU without native bf16 (the run would refuse it).

Usage::

    python scripts/bench_layout_precision.py                        # both models, 1 thread
    python scripts/bench_layout_precision.py --reps 9 --threads 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dropout import _device, _loadavg, _machine  # noqa: E402  (the benchmarks' shared helpers)

from flwr_distreal.training.layout import calibrate_layout  # noqa: E402
from flwr_distreal.models import build_model  # noqa: E402
from flwr_distreal.core.precision import autocast, check_precision  # noqa: E402
from flwr_distreal.training.recipe import Recipe  # noqa: E402
from flwr_distreal.training.trainers import LocalStep  # noqa: E402

COMBOS = [("nchw", "fp32"), ("channels_last", "fp32"), ("nchw", "bf16"), ("channels_last", "bf16")]
KINDS = ["full", "uniform 0.5", "cycling 0.1-0.5", "eval"]
CYCLE = (0.1, 0.2, 0.3, 0.4, 0.5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--models", nargs="+", default=["densenet_bc_40:64", "femnist_cnn:32"],
        help="model:batch pairs (default: densenet_bc_40:64 femnist_cnn:32)",
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    p.add_argument("--eval-batch", type=int, default=500, help="images of the eval forward (default 500)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the runner's torch_threads)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-auto", action="store_true", help="do not run the layout calibration")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or args.threads < 1 or args.eval_batch < 1:
        p.error("need --reps >= 1, --warmup >= 0, --threads >= 1, --eval-batch >= 1")
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_model(name: str, batch: int, args: argparse.Namespace, device: torch.device, precisions: list[str]) -> dict:
    """Median seconds per (layout, precision, kind) for one model."""
    torch.manual_seed(0)
    base = build_model(name, channels_last=False)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *base.input_shape), generator=gen).to(device)
    y = torch.randint(0, base.num_classes, (batch,), generator=gen).to(device)
    xe = torch.rand((args.eval_batch, *base.input_shape), generator=gen).to(device)
    k = base.num_dropout_layers
    states = {}
    for layout, precision in COMBOS:
        if precision not in precisions:
            continue
        torch.manual_seed(0)
        model = build_model(name, channels_last=layout == "channels_last").to(device)
        model.load_state_dict(base.state_dict())
        model.seed_dropout(0)
        states[(layout, precision)] = [model, LocalStep(model, Recipe.constant(0.01, 0.0, 0.0), precision=precision), 0]

    def run(combo: tuple[str, str], kind: str) -> float:
        model, step, _ = states[combo]
        _sync(device)
        t = time.perf_counter()
        if kind == "eval":
            model.eval()
            with torch.no_grad(), autocast(combo[1], device):
                model(xe)
            model.train()
        else:
            if kind == "full":
                vector = None
            elif kind == "uniform 0.5":
                vector = np.full(k, 0.5)
            else:
                vector = np.full(k, CYCLE[states[combo][2] % len(CYCLE)])
                states[combo][2] += 1
            step(x, y, vector)
        _sync(device)
        return time.perf_counter() - t

    points = [(combo, kind) for combo in states for kind in KINDS]
    times: dict = {p: [] for p in points}
    started = time.perf_counter()
    for rep in range(args.warmup + args.reps):
        s = rep % len(points)
        for p in points[s:] + points[:s]:
            t = run(*p)
            if rep >= args.warmup:
                times[p].append(t)
        print(f"  {name}: repetition {rep + 1}/{args.warmup + args.reps} done, {time.perf_counter() - started:.0f} s, "
              f"load {_loadavg()}", file=sys.stderr, flush=True)
    return {f"{c[0]}/{c[1]}/{kind}": float(statistics.median(ts)) for (c, kind), ts in times.items()}


def print_table(name: str, batch: int, med: dict, precisions: list[str], eval_batch: int) -> None:
    combos = [c for c in COMBOS if c[1] in precisions]
    heads = [f"{'NCHW' if lay == 'nchw' else 'ch-last'} {prec}" for lay, prec in combos]
    print(f"\n{name}, batch {batch} (eval: {eval_batch} images): median ms, (ratio to NCHW fp32)")
    print(f"{'':18}" + "".join(f"{h:>20}" for h in heads))
    for kind in KINDS:
        ref = med[f"nchw/fp32/{kind}"]
        cells = []
        for lay, prec in combos:
            v = med[f"{lay}/{prec}/{kind}"]
            cells.append(f"{v * 1e3:9.1f} ({v / ref:4.2f}x)")
        print(f"{kind:18}" + "".join(f"{c:>20}" for c in cells))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = _device(args.device)
    precisions = ["fp32"]
    try:
        precisions.append(check_precision("bf16", device))
    except ValueError as err:
        print(f"bf16 skipped: {err}", file=sys.stderr)
    machine = _machine()
    print(f"machine: {machine.get('cpu_model', machine['processor'])}; torch {torch.__version__}, {args.threads} thread(s), "
          f"device {device}; load before: {_loadavg()}")
    print(f"command: python scripts/bench_layout_precision.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    out: dict = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "models": {}}
    for spec in args.models:
        name, _, b = spec.partition(":")
        batch = int(b or 32)
        med = bench_model(name, batch, args, device, precisions)
        print_table(name, batch, med, precisions, args.eval_batch)
        entry: dict = {"batch": batch, "median_s": med}
        for prec in precisions:
            sums = {lay: med[f"{lay}/{prec}/full"] + med[f"{lay}/{prec}/uniform 0.5"] for lay in ("nchw", "channels_last")}
            entry[f"table_pick_{prec}"] = min(sums, key=sums.get)
        if not args.no_auto:
            for prec in precisions:
                t = time.perf_counter()
                entry[f"auto_{prec}"] = calibrate_layout(name, batch, torch_device=str(device), precision=prec, force=True)
                entry[f"auto_{prec}_seconds"] = time.perf_counter() - t
        picks = ", ".join(
            f"{prec}: auto -> {entry.get(f'auto_{prec}', '(not run)')}"
            + (f" in {entry[f'auto_{prec}_seconds']:.1f} s" if f"auto_{prec}_seconds" in entry else "")
            + f" (this table's full + uniform 0.5 medians -> {entry[f'table_pick_{prec}']})"
            for prec in precisions
        )
        print(f"layout: {picks}")
        out["models"][name] = entry
    print(f"load after: {_loadavg()}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
