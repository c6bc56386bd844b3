"""Bring your own model: what ``make_droppable`` gives a range of CNNs, side by side in one table.

For each model (one row) this measures, on the CPU:

* ``groups``: the dropout groups that tracing found (:func:`flwr_distreal.make_droppable`);
* MACs of the full model and at uniform rate 0.5 (:func:`flwr_distreal.core.macs.count_macs`), each
  checked against ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2 / batch of a training
  forward of the droppable model, and of the natively narrow model): ``ok`` or ``MISMATCH``;
* training-step time (forward, cross-entropy, backward, plain SGD step on a fixed random batch)
  of three separate model instances timed side by side, interleaved ``A B C A B C ...``
  (medians): ``full`` (no dropout), ``compact`` (uniform rate 0.5 in compact execution, a fresh
  random filter subset every step) and ``narrow`` (the natively narrow network of the same kept
  widths: :func:`flwr_distreal.core.submodel.extract_submodel`, a plain module of the user's class
  with resized layers, trained without any dropout machinery). The issue's goal:
  compact / narrow <= 1.15;
* switching overhead: one compact model trains on a stream of steps in which a seeded coin
  decides before each step to *switch* to another vector of a LUT-like pool (the shipped learned
  LUT's vectors where there is one, else random vectors in [0, 0.5]) or to *stay* on the vector
  of the previous step; overhead = (sum over the pool of per-vector median switch-step time) /
  (the same for stay steps) - 1 (``scripts/bench_dropout.py``'s method). Goal: <= 3 %;
* ``make_droppable`` time of the plain module (tracing and conversion; median of up to 3 calls).

Models: the registered ``femnist_cnn``, ``densenet_bc_40``, ``resnet20``, ``resnet18`` (the CIFAR
ResNet-18) and ``mobilenet_v2`` (via ``build_model``); ``tv_resnet18``, torchvision's
``resnet18(num_classes=10)`` as is (ImageNet stem, fed 32x32 images here); ``seq_cnn``, a user's
``nn.Sequential`` CNN whose flatten feeds a linear layer. All run in one memory layout
(``--layout``, default channels-last, the package default).

The machine this runs on may be shared: ratios are measured side by side, so load hits all
variants alike, but absolute times and small ratios move between runs. On cores that other
processes also use, several torch threads stall at every parallel region (a 2-core machine at
load 3-5 ran the Sequential CNN's step 40x slower with 2 threads than with 1): use
``--threads 1`` there. ``compact/narrow (min)`` is the same ratio from the fastest steps (load
only ever adds time).

Examples::

    python scripts/bench_droppable.py --json bench_droppable.json
    python scripts/bench_droppable.py --models femnist_cnn,seq_cnn --reps 1   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dropout import (  # noqa: E402  (the DenseNet benchmark's helpers and switching method)
    _loadavg,
    _non_negative,
    _positive,
    measure_switching,
)
from bench_dropout import _train_step as train_step  # noqa: E402

from flwr_distreal.core.dropout import DroppableModel, make_droppable  # noqa: E402
from flwr_distreal.core.lut import LUT, LUTError  # noqa: E402
from flwr_distreal.core.macs import count_macs, kept_counts  # noqa: E402
from flwr_distreal.models import build_model  # noqa: E402
from flwr_distreal.core.submodel import extract_submodel  # noqa: E402

TARGET_COMPACT_VS_NARROW = 1.15
TARGET_SWITCH_OVERHEAD_PCT = 3.0
RATE = 0.5

REGISTERED = ("femnist_cnn", "densenet_bc_40", "resnet20", "resnet18", "mobilenet_v2")
ALL_MODELS = (*REGISTERED, "tv_resnet18", "seq_cnn")


def seq_cnn() -> nn.Sequential:
    """A user's plain ``nn.Sequential`` CNN for 32x32 RGB images (flatten into a linear layer)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 4 * 4, 10),
    )


def build(name: str, channels_last: bool) -> tuple[DroppableModel, str]:
    """The droppable model ``name`` and a note on where it comes from."""
    if name in REGISTERED:
        return build_model(name, channels_last=channels_last), "build_model"
    if name == "tv_resnet18":
        import torchvision

        module, note = torchvision.models.resnet18(num_classes=10), "torchvision resnet18, 32x32 input"
    elif name == "seq_cnn":
        module, note = seq_cnn(), "user nn.Sequential"
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(ALL_MODELS)}")
    module.train()
    model = make_droppable(module, torch.zeros(2, 3, 32, 32), name=name)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, note


def _models(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in ALL_MODELS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"--models takes names from {', '.join(ALL_MODELS)}; got {text!r}")
    return names






def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=_models, default=list(ALL_MODELS), help=f"comma-separated ({','.join(ALL_MODELS)})")
    p.add_argument("--batch", type=_positive, default=32, help="mini-batch size of the timed steps (default 32)")
    p.add_argument("--reps", type=_positive, default=7, help="timed steps per variant, median (default 7)")
    p.add_argument("--warmup", type=_non_negative, default=2, help="untimed steps per variant first (default 2)")
    p.add_argument(
        "--switch-steps", type=_positive, default=None,
        help="timed steps of the switch/stay stream (default 8 x reps, at least 8)",
    )
    p.add_argument("--switch-pool", type=_positive, default=4, help="vectors in the switching pool (default 4)")
    p.add_argument("--threads", type=_positive, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument(
        "--layout", choices=("channels_last", "contiguous"), default="channels_last",
        help="memory layout of every model (default channels_last, the package default)",
    )
    p.add_argument("--lr", type=float, default=0.01, help="plain SGD learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write every timing and check here")
    args = p.parse_args(argv)
    if args.switch_steps is None:
        args.switch_steps = max(8, 8 * args.reps)
    if args.switch_pool < 2:
        p.error("--switch-pool needs at least 2 vectors")
    return args


@dataclass
class Variant:
    """A model instance timed in the interleaved loop, with its optimiser."""

    key: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    times: list[float] = field(default_factory=list)




def interleaved(variants: list[Variant], x: torch.Tensor, y: torch.Tensor, reps: int, warmup: int) -> None:
    """Time one step of each variant in turn, A B C A B C ..., for ``warmup + reps`` rounds."""
    for rep in range(warmup + reps):
        for v in variants:
            t0 = time.perf_counter()
            train_step(v.model, v.optimizer, x, y)
            t = time.perf_counter() - t0
            if rep >= warmup:
                v.times.append(t)


def forward_macs(model: nn.Module, x: torch.Tensor) -> float:
    """FlopCounterMode FLOPs / 2 / batch of one training-mode forward (no gradient)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0]


def switch_pool(model: DroppableModel, size: int, rng: np.random.Generator) -> tuple[list[np.ndarray], str]:
    """LUT-like vectors: the shipped learned LUT's (spread along it, all-zero excluded), else random."""
    try:
        lut = LUT.learned(model)
    except LUTError:
        lut = None
    if lut is not None:
        vecs = [v for v in np.asarray(lut.vectors) if float(np.max(v)) > 0.0]
        if len(vecs) >= 2:
            pick = np.unique(np.linspace(0, len(vecs) - 1, min(size, len(vecs))).round().astype(int))
            return [np.asarray(vecs[i], dtype=np.float64) for i in pick], f"learned LUT ({len(vecs)} vectors)"
    return [rng.uniform(0.0, RATE, size=model.num_dropout_layers) for _ in range(size)], "random in [0, 0.5]"


def time_make_droppable(model: DroppableModel, calls: int) -> float:
    """Median seconds of ``make_droppable`` on the plain module behind ``model``."""
    plain = extract_submodel(model, [None] * model.num_dropout_layers)
    example = torch.zeros((2, *model.input_shape))
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        make_droppable(plain, example)
        out.append(time.perf_counter() - t0)
    return float(statistics.median(out))


def bench_model(name: str, args: argparse.Namespace, log: Callable[[str], None]) -> dict:
    """Every column of one model's row (and the raw timings)."""
    channels_last = args.layout == "channels_last"
    torch.manual_seed(args.seed)
    model, note = build(name, channels_last)
    vector = np.full(model.num_dropout_layers, RATE)
    counts = kept_counts(model, vector)
    macs_full, macs_half = count_macs(model), count_macs(model, vector)

    # MACs against FlopCounterMode: full and compact training forwards, and the narrow network.
    gen = torch.Generator().manual_seed(args.seed)
    xs = torch.randn((2, *model.input_shape), generator=gen)
    model.train()
    flops_full = forward_macs(model, xs)
    model.set_dropout(vector)
    flops_half = forward_macs(model, xs)
    model.set_dropout(None)
    narrow = extract_submodel(model, counts)
    narrow.train()
    flops_narrow = forward_macs(narrow, xs)
    checks = {"full": flops_full == macs_full, "half": flops_half == macs_half, "narrow": flops_narrow == macs_half}

    # Three instances, timed side by side.
    full = model
    compact, _ = build(name, channels_last)
    compact.load_state_dict(full.state_dict())
    compact.train()
    compact.seed_dropout(args.seed + 1)
    compact.set_dropout(vector)
    variants = [
        Variant("full", full, torch.optim.SGD(full.parameters(), lr=args.lr)),
        Variant("compact", compact, torch.optim.SGD(compact.parameters(), lr=args.lr)),
        Variant("narrow", narrow, torch.optim.SGD(narrow.parameters(), lr=args.lr)),
    ]
    x = torch.randn((args.batch, *model.input_shape), generator=gen)
    y = torch.randint(0, model.num_classes, (args.batch,), generator=gen)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    t0 = time.perf_counter()
    interleaved(variants, x, y, args.reps, args.warmup)
    kept = [w if k is None else int(k.numel()) for k, w in zip(compact.last_kept_indices(), compact.layer_widths)]
    if kept != counts:
        raise RuntimeError(f"{name}: the compact model kept {kept} filters, expected {counts}")
    med = {v.key: float(statistics.median(v.times)) for v in variants}
    fastest = {v.key: float(min(v.times)) for v in variants}
    log(f"  {name}: steps timed ({time.perf_counter() - t0:.0f} s)")

    # Switching overhead on the compact model.
    rng = np.random.default_rng(args.seed)
    pool_size = max(2, min(args.switch_pool, args.switch_steps // 4))
    pool, pool_src = switch_pool(compact, pool_size, rng)
    opt = torch.optim.SGD(compact.parameters(), lr=args.lr)
    try:
        sw = measure_switching(compact, opt, pool, x, y, torch.device("cpu"), args.switch_steps, rng, warmup=1)
        overhead = float(sw["overhead_pct"])
        sw_cells = sw["cell_counts"]
    except RuntimeError:  # too few steps for a switch and a stay step of one vector
        overhead, sw_cells = None, None
    log(f"  {name}: switching timed")

    t_md = time_make_droppable(model, min(3, args.reps))
    return {
        "model": name,
        "source": note,
        "groups": model.num_dropout_layers,
        "layer_widths": model.layer_widths,
        "kept_counts_at_0.5": counts,
        "macs_full": macs_full,
        "macs_at_0.5": macs_half,
        "flop_counter_macs": {"full": flops_full, "compact_0.5": flops_half, "narrow_0.5": flops_narrow},
        "macs_check": checks,
        "macs_ok": all(checks.values()),
        "median_s": med,
        "min_s": fastest,
        "times_s": {v.key: v.times for v in variants},
        "compact_vs_full": med["compact"] / med["full"],
        "compact_vs_narrow": med["compact"] / med["narrow"],
        "narrow_vs_full": med["narrow"] / med["full"],
        "compact_vs_narrow_min": fastest["compact"] / fastest["narrow"],
        "compact_vs_full_min": fastest["compact"] / fastest["full"],
        "params_full": sum(p.numel() for p in full.parameters()),
        "params_narrow": sum(p.numel() for p in narrow.parameters()),
        "switch_pool": pool_src,
        "switch_pool_vectors": [v.tolist() for v in pool],
        "switch_steps": args.switch_steps,
        "switch_cells": sw_cells,
        "switch_overhead_pct": overhead,
        "make_droppable_s": t_md,
    }


COLUMNS = (
    "model", "groups", "MACs full (M)", "MACs @0.5 (M)", "MACs = FlopCounter", "full ms", "compact ms",
    "narrow ms", "compact/full", "compact/narrow", "compact/narrow (min)", "switch overhead",
    "make_droppable s",
)


def table_rows(rows: list[dict]) -> list[list[str]]:
    """The printed cells of each row."""
    out = []
    for r in rows:
        m = r["median_s"]
        sw = r["switch_overhead_pct"]
        out.append([
            r["model"], str(r["groups"]), f"{r['macs_full'] / 1e6:.2f}", f"{r['macs_at_0.5'] / 1e6:.2f}",
            "ok" if r["macs_ok"] else "MISMATCH", f"{1e3 * m['full']:.1f}", f"{1e3 * m['compact']:.1f}",
            f"{1e3 * m['narrow']:.1f}", f"{r['compact_vs_full']:.3f}", f"{r['compact_vs_narrow']:.3f}",
            f"{r['compact_vs_narrow_min']:.3f}", "n/a" if sw is None else f"{sw:+.1f} %",
            f"{r['make_droppable_s']:.2f}",
        ])
    return out


def markdown_table(rows: list[dict]) -> str:
    """The table as GitHub markdown."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    return "\n".join(lines)




def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    load_start = _loadavg()
    log(
        f"bench_droppable: torch {torch.__version__}, torch.set_num_threads({args.threads}) -> "
        f"{torch.get_num_threads()} threads, {os.cpu_count()} cores, batch {args.batch}, reps {args.reps} "
        f"(+{args.warmup} warm-up, interleaved full/compact/narrow, medians; '(min)': from the fastest steps), switch stream {args.switch_steps} steps, "
        f"layout {args.layout}, uniform rate {RATE}; load average {load_start}"
    )
    if load_start and args.threads > 1 and load_start[0] >= 0.75 * (os.cpu_count() or 1):
        log(
            "warning: other processes load the cores; with several torch threads every parallel region "
            "waits for a descheduled thread (steps 10-40x slower seen here): use --threads 1"
        )
    t0 = time.perf_counter()
    rows = []
    for name in args.models:
        log(f"{name} ...")
        rows.append(bench_model(name, args, log))
    elapsed = time.perf_counter() - t0
    load_end = _loadavg()
    log("")
    log(markdown_table(rows))
    log("")
    for r in rows:
        notes = [f"{r['model']}: {r['source']}", f"switching pool: {r['switch_pool']}"]
        if not r["macs_ok"]:
            notes.append(f"MAC MISMATCH {r['flop_counter_macs']} vs {r['macs_full']}/{r['macs_at_0.5']}")
        log("  " + "; ".join(notes))
    worst = max(rows, key=lambda r: r["compact_vs_narrow"])
    over = [r["model"] for r in rows if r["compact_vs_narrow"] > TARGET_COMPACT_VS_NARROW]
    sw_over = [r["model"] for r in rows if r["switch_overhead_pct"] is not None and r["switch_overhead_pct"] > TARGET_SWITCH_OVERHEAD_PCT]
    log(
        f"goals: compact/narrow <= {TARGET_COMPACT_VS_NARROW} "
        + ("met by every model" if not over else f"missed by {', '.join(over)}")
        + f" (worst {worst['model']} {worst['compact_vs_narrow']:.3f}); switching overhead <= "
        f"{TARGET_SWITCH_OVERHEAD_PCT} % " + ("met by every model" if not sw_over else f"missed by {', '.join(sw_over)}")
    )
    log(f"load average at end {load_end}; took {elapsed:.0f} s")
    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "elapsed_s": elapsed,
        "rows": rows,
        "table_markdown": markdown_table(rows),
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        log(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
