"""Training-step time under structured filter dropout (reproduces the paper's Fig. 2 here).

DISTREAL saves compute only if a training step under a dropout vector really runs faster
(Rapp et al., AAAI 2022, section "Dropout to Reduce Computations In Training", Fig. 2). For one
model and a set of dropout vectors (uniform rates 0, 0.1, ..., 0.5 and random per-layer
vectors in [0, 0.5]) this measures the median time of a training step (forward,
cross-entropy, backward, plain SGD step on fixed random data, ``model.train()``) of four
variants and reports ratios:

* ``full``: the model without dropout (one variant, the denominator);
* ``compact``: the model under the vector in compact execution (only kept filters are
  computed: :mod:`flwr_distreal.core.dropout`), a fresh random filter subset every step;
* ``narrow``: a natively narrow network, ``build_model(name, widths=kept_counts(vector))``,
  trained without dropout through the same code path (the practical limit of these kernels);
* ``mask``: the same vector in mask execution (computes every filter and multiplies the
  dropped ones by zero; the reference that compact execution beats).

All variants are separate model instances measured side by side, interleaved round-robin
within every repetition (with a rotating start), so that drift of a shared, noisy machine hits
all of them equally; medians and ratios of medians are reported (``--stat min`` uses the
fastest step instead, the usual choice when other processes load the machine: contention only
ever adds time). The spread of the full model's step times is printed as a noise indicator.

Switching overhead: one model trains on a stream of steps over a pool of random vectors
(uniform in [0, 0.5] per layer). Before each step a seeded coin decides: *switch* (A: set a
new vector from the pool, a different one, and take the step; the ``set_dropout`` call is
inside the timed step) or *stay* (B: keep the vector of the previous step, no call). Both
kinds draw a fresh random filter subset every step (that is the mechanism). Because switch and
stay steps are randomly interleaved in one stream, drift of a shared machine hits both alike,
while everything a switch could cost (the call, process-wide caches keyed by tensor shapes
such as oneDNN's primitive cache, allocator churn) lands on the switch steps, since a stay step
repeats the shapes of the step just before. Overhead = sum over the pool of the per-vector
median switch-step time / the same for stay steps - 1 (equal weight per vector, so the MACs
of both sides are the same). The time of ``set_dropout`` alone (median of 1000 calls) is also
reported.

On CPU, PyTorch's convolutions run through oneDNN, which caches one JIT-compiled primitive per
(layer shape, pass); its default capacity of 1024 is smaller than 8 DenseNet-BC-40 vectors
need (39 layers x 3 passes x 8 shape sets), so every switch recompiles: about +11 % per step
measured here. ``--onednn-cache 8192`` (or the environment variable
``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, read at the first convolution) removes that.
Memory layout: models are built channels-last (``build_model(..., channels_last=True)``, the
package default), which oneDNN runs much faster for these narrow convolutions; ``--layout
contiguous`` measures every variant in the classic NCHW layout instead. Each run also times the
full model in the other layout side by side and prints the ratio of the two full models.
Several torch threads on cores that other processes also use stall at OpenMP barriers (10x
outliers); on a shared machine use ``--threads 1``.

Examples::

    python scripts/bench_dropout.py --quick
    python scripts/bench_dropout.py --json bench.json --plot bench.png
    python scripts/bench_dropout.py --model femnist_cnn --batch 64 --random 8

The issue's targets (DenseNet-BC-40, batch 64, CPU): at uniform rate 0.5 the compact step is
within 1.15x of the natively narrow network and at most 0.55x of the full model; switching
the vector every mini-batch costs at most 3 %.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from flwr_distreal.core.dropout import DropoutModel
from flwr_distreal.core.macs import count_macs, kept_counts
from flwr_distreal.models import build_model, list_models

TARGET_COMPACT_VS_NARROW = 1.15
TARGET_COMPACT_VS_FULL = 0.55
TARGET_SWITCH_OVERHEAD_PCT = 3.0

QUICK = {
    "reps": 3,
    "warmup": 1,
    "random": 1,
    "rates": [0.0, 0.25, 0.5],
    "switch_pool": 2,
    "switch_steps": 16,
}
DEFAULTS = {
    "reps": 7,
    "warmup": 2,
    "random": 4,
    "rates": [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],
    "switch_pool": 8,
    "switch_steps": 128,
}


@dataclass
class Variant:
    """One timed configuration: a model instance with its fixed dropout setting."""

    key: str
    model: DropoutModel
    optimizer: torch.optim.Optimizer
    times: list[float] = field(default_factory=list)


@dataclass
class VectorSpec:
    """A dropout vector of the benchmark and its label."""

    label: str
    kind: str  # "uniform" or "random"
    vector: np.ndarray


def _parse_rates(text: str) -> list[float]:
    try:
        rates = [float(r) for r in text.split(",") if r.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--rates must be comma-separated numbers: {err}") from err
    if not rates or any(not 0.0 <= r <= 0.5 for r in rates):
        raise argparse.ArgumentTypeError(f"--rates must be non-empty and within [0, 0.5], got {text!r}")
    return rates


def _positive(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; unset values take the normal or the ``--quick`` defaults."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="densenet_bc_40", choices=list_models())
    p.add_argument("--batch", type=_positive, default=64, help="mini-batch size (default 64)")
    p.add_argument("--reps", type=_positive, default=None, help="timed steps per variant; median (default 7)")
    p.add_argument("--warmup", type=_non_negative, default=None, help="untimed steps per variant (default 2)")
    p.add_argument("--threads", type=_positive, default=None, help="torch threads (default: all cores)")
    p.add_argument("--random", type=_non_negative, default=None, help="random per-layer vectors (default 4)")
    p.add_argument("--rates", type=_parse_rates, default=None, help="uniform rates (default 0,0.1,...,0.5)")
    p.add_argument("--switch-pool", type=_positive, default=None, help="vectors in the switching pool (8)")
    p.add_argument(
        "--switch-steps", type=_positive, default=None,
        help="timed steps of the switch/stay stream (default 128)",
    )
    p.add_argument(
        "--stat", choices=("median", "min"), default="median",
        help="statistic of the timed steps per variant (default median; min is robust to load)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (plain SGD, no momentum)")
    p.add_argument("--json", type=Path, default=None, help="write all raw timings and ratios here")
    p.add_argument("--plot", type=Path, default=None, help="write a Fig. 2 style plot here (png/pdf)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument(
        "--onednn-cache", type=_positive, default=None,
        help="set ONEDNN_PRIMITIVE_CACHE_CAPACITY (oneDNN default 1024) before the first convolution; "
        "switching among many vectors on CPU thrashes a small cache",
    )
    p.add_argument(
        "--layout", choices=("channels_last", "contiguous"), default="channels_last",
        help="memory layout of every variant (default channels_last, the package default); the full "
        "model is also timed in the other layout for comparison",
    )
    p.add_argument("--quick", action="store_true", help="finish in under a minute on 2 cores")
    args = p.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    args.quick_changes = []
    for key, value in base.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
            if args.quick and DEFAULTS[key] != value:
                args.quick_changes.append(f"{key.replace('_', '-')}={value}")
    if args.switch_pool < 2:
        p.error(f"--switch-pool needs at least 2 vectors to switch between, got {args.switch_pool}")
    if not args.lr > 0:
        p.error(f"--lr must be positive, got {args.lr}")
    return args


def _device(name: str) -> torch.device:
    """The torch device for ``--device``; exits with a message if it is unknown or absent."""
    try:
        dev = torch.device(name)
    except RuntimeError as err:
        raise SystemExit(f"--device {name!r} is not a torch device: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be cpu or cuda, got {name!r}")
    return dev


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(model: DropoutModel, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step: forward, cross-entropy, backward, plain SGD update."""
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()


def _timed_step(variant: Variant, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> float:
    """Seconds of one training step of ``variant`` (synchronised on GPU)."""
    _sync(device)
    t0 = time.perf_counter()
    _train_step(variant.model, variant.optimizer, x, y)
    _sync(device)
    return time.perf_counter() - t0


def _make(
    model_name: str, num_classes: int | None, device: torch.device, lr: float, seed: int,
    layout: str = "channels_last", **kw: object,
) -> tuple[DropoutModel, torch.optim.Optimizer]:
    """A fresh model (seeded init and filter sampling) in train mode with plain SGD."""
    torch.manual_seed(seed)
    model = build_model(model_name, num_classes=num_classes, channels_last=layout == "channels_last", **kw)
    model = model.to(device)
    model.train()
    model.seed_dropout(seed)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)


def _vectors(model: DropoutModel, rates: list[float], n_random: int, rng: np.random.Generator) -> list[VectorSpec]:
    k = model.num_dropout_layers
    specs = [VectorSpec(f"uniform {r:g}", "uniform", np.full(k, float(r))) for r in rates]
    for i in range(n_random):
        v = rng.uniform(0.0, 0.5, size=k)
        specs.append(VectorSpec(f"random {i + 1} ({v.mean():.2f})", "random", v))
    return specs


def _dropped_ratio(model: DropoutModel, vector: np.ndarray) -> float:
    """Fraction of all filters dropped (the x axis of the paper's Fig. 2)."""
    widths = model.layer_widths
    return 1.0 - sum(kept_counts(model, vector)) / sum(widths)


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


STATS = {"median": _median, "min": lambda xs: float(min(xs))}


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def measure_steps(
    variants: list[Variant],
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    reps: int,
    warmup: int,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Round-robin over the variants within every repetition (rotating the start)."""
    n = len(variants)
    t0 = time.perf_counter()
    for rep in range(warmup + reps):
        start = rep % n
        for v in variants[start:] + variants[:start]:
            t = _timed_step(v, x, y, device)
            if rep >= warmup:
                v.times.append(t)
        if progress is not None:
            kind = "warm-up" if rep < warmup else "timed"
            progress(f"  repetition {rep + 1}/{warmup + reps} ({kind}) done, {time.perf_counter() - t0:.0f} s")


def check_compact(model: DropoutModel, vector: np.ndarray) -> None:
    """Make sure the last (timed) step of a compact variant computed exactly the kept counts
    (a benchmark of the wrong thing is worse than none)."""
    kept = model.last_kept_indices()
    want = kept_counts(model, vector)
    got = [w if k is None else int(k.numel()) for k, w in zip(kept, model.layer_widths)]
    if got != want:
        raise RuntimeError(f"compact model kept {got} filters, expected {want}")


def switching_schedule(pool_size: int, steps: int, rng: np.random.Generator) -> list[tuple[int, bool]]:
    """A stream of (pool index, switched) pairs: a fair coin per step decides between switching
    to another pool vector and staying on the current one (the first step switches)."""
    if pool_size < 2:
        raise ValueError(f"switching needs a pool of at least 2 vectors, got {pool_size}")
    out: list[tuple[int, bool]] = []
    cur = int(rng.integers(pool_size))
    for t in range(steps):
        if t == 0 or rng.random() < 0.5:
            cur = (cur + 1 + int(rng.integers(pool_size - 1))) % pool_size  # another vector
            out.append((cur, True))
        else:
            out.append((cur, False))
    return out


def measure_switching(
    model: DropoutModel,
    opt: torch.optim.Optimizer,
    pool: list[np.ndarray],
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    steps: int,
    rng: np.random.Generator,
    warmup: int = 1,
    stat: str = "median",
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Switching overhead from one stream of randomly interleaved switch and stay steps.

    Parameters
    ----------
    model, opt
        The model (compact execution) and its plain SGD optimiser.
    pool : list of np.ndarray
        The dropout vectors to switch between.
    x, y
        The fixed mini-batch.
    device : torch.device
        Where the model runs (for synchronisation).
    steps : int
        Timed steps of the stream.
    rng : np.random.Generator
        Draws the switch/stay schedule.
    warmup : int
        Untimed steps per pool vector first (so first-use costs do not count).
    stat : str
        ``"median"`` or ``"min"`` of the step times per (vector, kind) cell.
    progress : callable, optional
        Receives progress lines.

    Returns
    -------
    dict
        The schedule, raw times per step, per-vector statistics and the overhead in percent.
    """
    for _ in range(warmup):
        for v in pool:
            model.set_dropout(v)
            _train_step(model, opt, x, y)
    schedule = switching_schedule(len(pool), steps, rng)
    times: list[float] = []
    model.set_dropout(pool[schedule[0][0]])  # so that a 'stay' never follows another vector
    t_begin = time.perf_counter()
    for t, (j, switched) in enumerate(schedule):
        _sync(device)
        t0 = time.perf_counter()
        if switched:
            model.set_dropout(pool[j])
        _train_step(model, opt, x, y)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if progress is not None and (t + 1) % max(1, steps // 4) == 0:
            progress(f"  switching stream: {t + 1}/{steps} steps, {time.perf_counter() - t_begin:.0f} s")
    P = len(pool)
    cells = {
        kind: [[tm for tm, (jj, sw) in zip(times, schedule) if jj == j and sw == (kind == "switch")] for j in range(P)]
        for kind in ("switch", "stay")
    }
    usable = [j for j in range(P) if cells["switch"][j] and cells["stay"][j]]
    if not usable:
        raise RuntimeError("no pool vector has both switch and stay steps; raise --switch-steps")
    f = STATS[stat]
    s_sw = sum(f(cells["switch"][j]) for j in usable)
    s_st = sum(f(cells["stay"][j]) for j in usable)
    mean = statistics.fmean
    return {
        "pool_size": P,
        "steps": steps,
        "statistic": stat,
        "pool_vectors": [v.tolist() for v in pool],
        "schedule": [[j, sw] for j, sw in schedule],
        "times_s": times,
        "vectors_used": usable,
        "cell_counts": {k: [len(c) for c in v] for k, v in cells.items()},
        "stat_switch": [f(cells["switch"][j]) for j in usable],
        "stat_stay": [f(cells["stay"][j]) for j in usable],
        "overhead_pct": 100.0 * (s_sw / s_st - 1.0),
        "overhead_pct_means": 100.0
        * (sum(mean(cells["switch"][j]) for j in usable) / sum(mean(cells["stay"][j]) for j in usable) - 1.0),
    }


def time_set_dropout(model: DropoutModel, pool: list[np.ndarray], calls: int = 1000) -> list[float]:
    """Seconds of each of ``calls`` ``set_dropout`` calls (cycling through the pool)."""
    out = []
    for i in range(calls):
        v = pool[i % len(pool)]
        t0 = time.perf_counter()
        model.set_dropout(v)
        out.append(time.perf_counter() - t0)
    return out


def _machine() -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mkldnn": bool(torch.backends.mkldnn.is_available()),
        "onednn_primitive_cache_capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Fig. 2 style: ratio of dropped filters vs. MAC ratio and step-time ratios."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    series = [
        ("mac_ratio", "MACs (forward)", "k", "o"),
        ("compact_vs_full", "step time, compact", "tab:blue", "s"),
        ("narrow_vs_full", "step time, natively narrow", "tab:green", "^"),
        ("mask_vs_full", "step time, mask (reference)", "tab:red", "x"),
    ]
    uni = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["dropped_ratio"])
    rnd = [r for r in rows if r["kind"] == "random"]
    for key, label, color, marker in series:
        ax.plot([r["dropped_ratio"] for r in uni], [r[key] for r in uni], color=color, marker=marker, label=label)
        if rnd:
            ax.scatter(
                [r["dropped_ratio"] for r in rnd], [r[key] for r in rnd], color=color, marker=marker,
                facecolors="none" if marker not in ("x",) else None, s=50,
            )
    ax.set_xlabel("ratio of dropped filters")
    ax.set_ylabel("relative to the full model")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, title="lines: uniform rates; open markers: random vectors", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.onednn_cache is not None:
        # oneDNN reads this when it creates its first primitive, i.e. at the first convolution.
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_cache)
    console = Console(width=None if sys.stdout.isatty() else 110)
    device = _device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    load_start = _loadavg()
    t_start = time.perf_counter()
    if args.quick:
        console.print(
            f"[bold]quick mode[/]: {', '.join(args.quick_changes)} (model {args.model}, batch {args.batch} unchanged)"
        )
    console.print(
        f"model {args.model}, batch {args.batch}, device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, layout {args.layout}, reps {args.reps} (+{args.warmup} warm-up), "
        f"seed {args.seed}, "
        f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY', 'unset (1024)')}"
    )
    console.print(f"load average at start (1, 5, 15 min): {load_start} on {os.cpu_count()} cores")
    if load_start and torch.get_num_threads() > 1 and load_start[0] >= (os.cpu_count() or 1) * 0.75:
        console.print(
            "[yellow]other processes load the cores: with several torch threads, OpenMP barriers then "
            "stall whole steps (10x outliers seen); consider --threads 1 and/or --stat min[/]"
        )

    rng = np.random.default_rng(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    full, full_opt = _make(args.model, None, device, args.lr, args.seed, args.layout)
    other_layout = "contiguous" if args.layout == "channels_last" else "channels_last"
    full_other, full_other_opt = _make(args.model, None, device, args.lr, args.seed, other_layout)
    x = torch.randn((args.batch, *full.input_shape), generator=gen).to(device)
    y = torch.randint(0, full.num_classes, (args.batch,), generator=gen).to(device)
    full_macs = count_macs(full)
    specs = _vectors(full, args.rates, args.random, rng)

    variants: list[Variant] = [Variant("full", full, full_opt), Variant("full/other", full_other, full_other_opt)]
    per_vec: list[dict] = []
    for i, spec in enumerate(specs):
        counts = kept_counts(full, spec.vector)
        if counts == full.layer_widths:
            # Nothing dropped: compact, narrow and mask are all the full network itself.
            per_vec.append(
                {"spec": spec, "counts": counts, "macs": full_macs, "narrow_macs": full_macs,
                 "variants": {k: variants[0] for k in ("compact", "narrow", "mask")}, "alias": True}
            )
            continue
        compact, c_opt = _make(args.model, None, device, args.lr, args.seed + 1 + i, args.layout)
        compact.set_dropout(spec.vector)
        narrow, n_opt = _make(args.model, None, device, args.lr, args.seed, args.layout, widths=counts)
        mask, m_opt = _make(args.model, None, device, args.lr, args.seed + 1 + i, args.layout)
        mask.set_execution("mask")
        mask.set_dropout(spec.vector)
        macs = count_macs(full, spec.vector)
        narrow_macs = count_macs(narrow)
        if narrow_macs != macs:
            console.print(f"[red]warning[/]: narrow network has {narrow_macs} MACs, compact vector {macs}")
        vs = {
            "compact": Variant(f"compact/{i}", compact, c_opt),
            "narrow": Variant(f"narrow/{i}", narrow, n_opt),
            "mask": Variant(f"mask/{i}", mask, m_opt),
        }
        variants += list(vs.values())
        per_vec.append(
            {"spec": spec, "counts": counts, "macs": macs, "narrow_macs": narrow_macs, "variants": vs, "alias": False}
        )

    console.print(f"timing {len(variants)} variants x {args.reps} steps, interleaved round-robin ...")
    measure_steps(variants, x, y, device, args.reps, args.warmup, progress=console.print)
    for pv in per_vec:
        if not pv["alias"]:
            check_compact(pv["variants"]["compact"].model, pv["spec"].vector)
    stat = STATS[args.stat]
    t_full = stat(variants[0].times)

    rows = []
    for i, pv in enumerate(per_vec):
        spec, vs = pv["spec"], pv["variants"]
        tc, tn, tm = (stat(vs[k].times) for k in ("compact", "narrow", "mask"))
        paired = [c / f for c, f in zip(vs["compact"].times, variants[0].times)]
        rows.append(
            {
                "label": spec.label,
                "kind": spec.kind,
                "vector": spec.vector.tolist(),
                "kept_counts": pv["counts"],
                "dropped_ratio": _dropped_ratio(full, spec.vector),
                "macs": pv["macs"],
                "narrow_macs": pv["narrow_macs"],
                "mac_ratio": pv["macs"] / full_macs,
                "stat_s": {"compact": tc, "narrow": tn, "mask": tm, "full": t_full},
                "median_s": {k: _median(vs[k].times) for k in ("compact", "narrow", "mask")},
                "min_s": {k: min(vs[k].times) for k in ("compact", "narrow", "mask")},
                "compact_vs_full": tc / t_full,
                "compact_vs_narrow": tc / tn,
                "narrow_vs_full": tn / t_full,
                "mask_vs_full": tm / t_full,
                "compact_vs_full_paired_median": _median(paired),
                "is_full_model": pv["alias"],
                "times_s": {k: v.times for k, v in vs.items()},
            }
        )

    # Switching overhead.
    pool = [rng.uniform(0.0, 0.5, size=full.num_dropout_layers) for _ in range(args.switch_pool)]
    sw_model, sw_opt = _make(args.model, None, device, args.lr, args.seed + 1000, args.layout)
    console.print(
        f"switching: pool of {len(pool)} random vectors, a stream of {args.switch_steps} steps that "
        "switch or stay at random ..."
    )
    switching = measure_switching(
        sw_model, sw_opt, pool, x, y, device, args.switch_steps, rng, max(1, args.warmup), args.stat,
        progress=console.print,
    )
    set_times = time_set_dropout(sw_model, pool)
    set_us = 1e6 * _median(set_times)
    load_end = _loadavg()
    elapsed = time.perf_counter() - t_start

    # Output.
    table = Table(title=f"{args.model}, batch {args.batch}, {device}, {torch.get_num_threads()} threads: "
                  f"training-step time relative ({args.stat} of {args.reps})")
    columns = ("vector (mean rate)", "dropped", "MACs/full", "compact/full", "compact/narrow", "narrow/full", "mask/full")
    for col in columns:
        table.add_column(col, justify="left" if col.startswith("vector") else "right")
    for r in rows:
        table.add_row(
            r["label"], f"{r['dropped_ratio']:.3f}", f"{r['mac_ratio']:.3f}", f"{r['compact_vs_full']:.3f}",
            f"{r['compact_vs_narrow']:.3f}", f"{r['narrow_vs_full']:.3f}", f"{r['mask_vs_full']:.3f}",
        )
    console.print(table)
    if any(pv["alias"] for pv in per_vec):
        console.print("rows that drop nothing are the full network itself (1 by definition)")
    console.print(
        f"full model: {full_macs / 1e6:.2f} M MACs/sample, {args.stat} step {1e3 * t_full:.1f} ms; "
        f"set_dropout alone: {set_us:.1f} us (median of {len(set_times)} calls, "
        f"{100 * set_us * 1e-6 / t_full:.3f} % of a full step)"
    )
    t_other = stat(variants[1].times)
    console.print(
        f"layout: full model {args.layout} / {other_layout} = {t_full / t_other:.3f} "
        f"({args.stat} steps {1e3 * t_full:.1f} vs {1e3 * t_other:.1f} ms, timed side by side)"
    )
    ft = variants[0].times
    spread = max(ft) / min(ft)
    console.print(
        f"noise: full-model steps min {1e3 * min(ft):.0f} / median {1e3 * _median(ft):.0f} / "
        f"max {1e3 * max(ft):.0f} ms (max/min {spread:.2f})"
        + ("" if spread < 1.5 else " [yellow]- the machine is loaded; ratios are unreliable, rerun idle, "
           "with more --reps, or --stat min[/]")
    )
    console.print(
        f"switching overhead: {switching['overhead_pct']:+.2f} % (switch vs stay steps, sum of per-vector "
        f"{args.stat}s over {len(switching['vectors_used'])} vectors; {switching['overhead_pct_means']:+.2f} % "
        f"with means; {sum(switching['cell_counts']['switch'])} switch / "
        f"{sum(switching['cell_counts']['stay'])} stay steps)"
    )

    half = next((r for r in rows if r["kind"] == "uniform" and r["vector"][0] == 0.5), None)
    targets = {}
    checks = []
    if half is not None:
        targets["compact_vs_narrow_at_0.5"] = {
            "value": half["compact_vs_narrow"], "target": TARGET_COMPACT_VS_NARROW,
            "pass": half["compact_vs_narrow"] <= TARGET_COMPACT_VS_NARROW,
        }
        targets["compact_vs_full_at_0.5"] = {
            "value": half["compact_vs_full"], "target": TARGET_COMPACT_VS_FULL,
            "pass": half["compact_vs_full"] <= TARGET_COMPACT_VS_FULL,
        }
    targets["switching_overhead_pct"] = {
        "value": switching["overhead_pct"], "target": TARGET_SWITCH_OVERHEAD_PCT,
        "pass": switching["overhead_pct"] <= TARGET_SWITCH_OVERHEAD_PCT,
    }
    names = {
        "compact_vs_narrow_at_0.5": ("uniform 0.5 compact/narrow", "x", "<="),
        "compact_vs_full_at_0.5": ("uniform 0.5 compact/full", "x", "<="),
        "switching_overhead_pct": ("switching overhead", " %", "<="),
    }
    for key, t in targets.items():
        label, unit, op = names[key]
        verdict = "[green]PASS[/]" if t["pass"] else "[red]FAIL[/]"
        checks.append(f"{label} {t['value']:.3f}{unit} (target {op} {t['target']}{unit}) {verdict}")
    if half is None:
        checks.append("uniform 0.5 not measured (add 0.5 to --rates for the step-time targets)")
    console.print("targets: " + "; ".join(checks))
    if half is not None:
        fmin = min(variants[0].times)
        hv = next(pv for pv in per_vec if pv["spec"].label == half["label"])["variants"]
        c_min, n_min = min(hv["compact"].times), min(hv["narrow"].times)
        targets["min_based_at_0.5"] = {"compact_vs_narrow": c_min / n_min, "compact_vs_full": c_min / fmin,
                                       "narrow_vs_full": n_min / fmin}
        console.print(
            f"same at uniform 0.5 from the fastest steps (robust to load): compact/narrow {c_min / n_min:.3f}, "
            f"compact/full {c_min / fmin:.3f}, narrow/full {n_min / fmin:.3f}"
        )
    console.print(
        f"load average at end (1, 5, 15 min): {load_end} on {os.cpu_count()} cores; "
        f"ratios are measured side by side, but a loaded machine adds noise. Took {elapsed:.0f} s."
    )

    result = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": _machine(),
        "device": str(device),
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "elapsed_s": elapsed,
        "statistic": args.stat,
        "full": {"macs": full_macs, "stat_s": t_full, "median_s": _median(ft), "min_s": min(ft), "times_s": ft},
        "full_other_layout": {"layout": other_layout, "stat_s": t_other, "times_s": variants[1].times,
                              "full_vs_other": t_full / t_other},
        "rows": rows,
        "switching": switching,
        "set_dropout_us": {"median": set_us, "times_s": set_times},
        "targets": targets,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {args.json}")
    if args.plot:
        plot(rows, args.plot, f"{args.model}, batch {args.batch}, {device} ({torch.get_num_threads()} threads)")
        console.print(f"wrote {args.plot}")
    return result


if __name__ == "__main__":
    main()
