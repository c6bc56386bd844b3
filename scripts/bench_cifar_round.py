"""Where a CIFAR-10 DenseNet-BC-40 round's time goes: one DISTREAL round through the runtimes
against the same training steps and evaluation in a plain loop, side by side in one run.

    python scripts/bench_cifar_round.py                       # the issue's setting (10 clients of 500, batch 32, 10,000 test images)
    python scripts/bench_cifar_round.py --runs plain:default,plain:tuned
    python scripts/bench_cifar_round.py --eval-cost --clients 2 --every 10   # layout x evaluate_every

``--eval-cost`` (issue 21, item 5) times, per memory layout (``--layouts``, each in a fresh
process), a round's parts with the run's own code: the ``--clients`` sampled devices' training
(``Experiment.make_trainer`` and ``fit``), static BN's recomputation
(``recompute_bn_statistics`` from ``strategy.bn_devices`` devices' training data, as
``Experiment.evaluate`` runs it with ``strategy.static_bn=true``) and the evaluation itself
(``evaluate_samples`` of the test split, ``--eval-samples``; all 10,000 by default). It prints the
time per round when the server evaluates every round and with ``evaluate_every=k`` (``--every``:
training + (BN + evaluation) / k, the evaluation's share of a long run), with and without static
BN, and each cell's ratio to the "before" cell: channels-last (the layout every model had before
``layout``), evaluating every round. The machine's load average is printed with the results.


Each variant runs in a fresh process (the allocator setting is per process):

``plain``
    The run's own trainers (``Experiment.make_trainer``) of the round's sampled devices, their
    ``fit`` called one after another, then ``Experiment.evaluate``: the work of a round, nothing else.
``inprocess``
    ``runtime=inprocess``: the Message-API app, messages delivered in this process.
``flwr-run``
    ``runtime=flwr-run``: the Message-API app through ``flwr run`` (SuperLink, Ray), with its
    start-up; its round time from ``metrics.csv`` is shown too.

``--malloc default`` keeps glibc's allocator (``FLWR_DISTREAL_MALLOC=default``), ``tuned`` reuses
freed memory (:mod:`flwr_distreal.core.allocator`, the default of every run). CPU times are the whole
process's for ``plain`` and ``inprocess`` (exact), and the whole machine's for ``flwr-run``
(``/proc/stat``: its SuperLink and Ray workers are not our children; run that on an idle machine). Prints a table: wall, user and system CPU seconds, and the ratio of
each variant's wall time to the plain loop's with the same allocator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10"


def _overrides(args: argparse.Namespace) -> list[str]:
    return [
        "dataset=cifar10", f"dataset.root={args.root}", "dataset.download=false",
        f"dataset.num_devices={args.devices}", f"dataset.samples_per_device={args.samples}",
        "model=densenet_bc_40", "strategy=distreal", "resources=timevarying", "resources.lam=2",
        f"clients_per_round={args.clients}", "rounds=1", f"batch_size={args.batch}", "lr=0.05",
        f"eval_batch_size={args.eval_batch}", "torch_threads=1", "plot=false", "device=cpu",
        f"lut={args.lut}",
    ]


def _own_cpu() -> tuple[float, float]:
    """This process's (and its waited-for children's) user and system CPU seconds so far."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def _proc_stat() -> tuple[float, float]:
    """Whole-machine user and system CPU seconds so far."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system = (int(x) for x in fields[:3])
    return (user + nice) / ticks, system / ticks


def _child(variant: str, args: argparse.Namespace, out: Path) -> dict:
    """Run one variant in this (fresh) process; returns its timings."""
    sys.path.insert(0, str(ROOT))
    from hydra import compose, initialize_config_dir

    from flwr_distreal.core import contract as C
    from flwr_distreal.run.config import register_configs, to_run_config
    from flwr_distreal.run.experiment import Experiment
    from flwr_distreal.run.runtimes import run_experiment

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = to_run_config(compose("config", overrides=_overrides(args) + [f"runtime={variant if variant != 'plain' else 'inprocess'}"]))
    import random

    from flwr_distreal.server import seeded_draw

    # flwr run's work happens in processes that are not our children (SuperLink, Ray): whole machine
    cpu = _proc_stat if variant == "flwr-run" else _own_cpu
    u0, s0 = cpu()
    t0 = time.perf_counter()
    round_wall = None
    if variant == "plain":
        exp = Experiment(cfg)
        _, arrays = exp.initial_arrays()
        devices = seeded_draw(random.Random(cfg.seed), {d: d for d in range(exp.num_devices)}, cfg.clients_per_round)
        t_setup = time.perf_counter()
        trainers = [exp.make_trainer(d) for d in devices]
        t_train = time.perf_counter()
        steps = 0
        for trainer in trainers:
            result = trainer.fit(arrays, {"server-round": 1})
            steps += int(result.metrics[C.NUM_BATCHES])
        t_eval = time.perf_counter()
        exp.evaluate(arrays)
        t_end = time.perf_counter()
        extra = {"setup_s": t_train - t0, "train_s": t_eval - t_train, "eval_s": t_end - t_eval, "steps": steps}
    else:
        rows = run_experiment(cfg, out)
        round_wall = float(rows[-1]["wall_time"])
        extra = {"round_wall_s": round_wall}
    wall = time.perf_counter() - t0
    u1, s1 = cpu()
    return {"variant": variant, "wall_s": wall, "user_s": u1 - u0, "sys_s": s1 - s0, "cpu_of": cpu.__name__.strip("_"), **extra}


def _eval_cost_child(layout: str, args: argparse.Namespace) -> dict:
    """``--eval-cost``: one layout's round parts (training, static BN's recomputation, evaluation), timed."""
    sys.path.insert(0, str(ROOT))
    import random

    from hydra import compose, initialize_config_dir

    from flwr_distreal.run import experiment as experiment_module
    from flwr_distreal.run.config import register_configs, to_run_config
    from flwr_distreal.run.experiment import Experiment
    from flwr_distreal.server import seeded_draw

    overrides = _overrides(args) + [
        "runtime=inprocess", f"layout={layout}", "strategy.static_bn=true",
        f"strategy.bn_devices={args.bn_devices}",
    ]
    if args.eval_samples:
        overrides.append(f"evaluate_samples={args.eval_samples}")
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = to_run_config(compose("config", overrides=overrides))
    exp = Experiment(cfg)
    _, arrays = exp.initial_arrays()
    devices = seeded_draw(random.Random(cfg.seed), {d: d for d in range(exp.num_devices)}, cfg.clients_per_round)
    trainers = [exp.make_trainer(d) for d in devices]
    t0 = time.perf_counter()
    for trainer in trainers:
        trainer.fit(arrays, {"server-round": 1})
    train_s = time.perf_counter() - t0
    bn_times: list[float] = []
    recompute = experiment_module.recompute_bn_statistics

    def timed_recompute(*a, **k):  # the recomputation exactly as Experiment.evaluate calls it, timed
        t = time.perf_counter()
        out = recompute(*a, **k)
        bn_times.append(time.perf_counter() - t)
        return out

    experiment_module.recompute_bn_statistics = timed_recompute
    try:
        exp.build_model()  # the model's code traced once (Experiment.evaluate builds its own model, well under a second)
        t1 = time.perf_counter()
        _, _, n = exp.evaluate(arrays)  # the first call: with building the evaluation model and loader
        evaluate_s = time.perf_counter() - t1
    finally:
        experiment_module.recompute_bn_statistics = recompute
    bn_s = bn_times[-1]
    return {
        "layout": layout, "train_s": train_s, "bn_s": bn_s, "eval_s": evaluate_s - bn_s, "eval_n": n,
        "bn_samples": sum(len(exp.data.partitions[d]) for d in _bn_devices(exp)), "clients": len(devices),
    }


def _bn_devices(exp) -> list[int]:
    import numpy as np

    k = min(exp.cfg.strategy.bn_recompute_devices(), exp.num_devices)
    return np.random.default_rng([exp.cfg.seed, 0xB4]).choice(exp.num_devices, size=k, replace=False).tolist()


def _eval_cost(args: argparse.Namespace) -> None:
    """``--eval-cost``: each layout in a fresh process, then the table of rounds and ratios."""
    parts = []
    for layout in args.layouts.split(","):
        cmd = [sys.executable, __file__, "--child", "eval-cost:" + layout, "--out", "-"] + _passthrough(sys.argv[1:])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            sys.exit(f"--eval-cost {layout} failed with exit status {proc.returncode}")
        res = json.loads(line[7:])
        parts.append(res)
        print(
            f"{layout:>13}: training of {res['clients']} clients {res['train_s']:6.1f} s, static-BN recomputation "
            f"({res['bn_samples']} samples) {res['bn_s']:5.1f} s, evaluation ({res['eval_n']} samples) "
            f"{res['eval_s']:5.1f} s; load average {os.getloadavg()[0]:.1f}",
            flush=True,
        )
    ks = [1] + [int(k) for k in args.every.split(",") if int(k) != 1]
    before = next((p for p in parts if p["layout"] == "channels_last"), parts[0])

    def per_round(p: dict, k: int, bn: bool) -> float:
        return p["train_s"] + ((p["bn_s"] if bn else 0.0) + p["eval_s"]) / k

    print(
        f"\nDenseNet-BC-40, CIFAR-10: one round ({before['clients']} clients), evaluation of {before['eval_n']} test "
        f"samples amortised over k rounds (evaluate_every=k). Ratio: to channels_last, k=1 (before). "
        f"Load average (1, 5, 15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs"
    )
    print("layout          k  static BN  s/round  ratio   evaluation share")
    for bn in (True, False):
        for p in parts:
            for k in ks:
                t = per_round(p, k, bn)
                share = ((p["bn_s"] if bn else 0.0) + p["eval_s"]) / k / t
                print(
                    f"{p['layout']:<14} {k:>2}  {'yes' if bn else 'no':<9}  {t:7.1f}  {t / per_round(before, 1, bn):5.2f}  {share:6.1%}"
                )
    for p in parts:
        print(
            f"{p['layout']}: static-BN recomputation = {p['bn_s'] / p['eval_s']:.2f}x the evaluation, "
            f"{p['bn_s'] / p['train_s']:.2f}x the round's training"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(parts, indent=2))


def _passthrough(argv: list[str]) -> list[str]:
    """The command line without --json/--runs (and their values): what a child needs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--json", "--runs", "--layouts", "--every"):
            skip = True
            continue
        if a == "--eval-cost" or a.startswith(("--json=", "--runs=", "--layouts=", "--every=")):
            continue
        out.append(a)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(DEFAULT_DATA), help="CIFAR-10 root (cifar-10-batches-py inside)")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval-batch", type=int, default=512)
    parser.add_argument("--lut", default="uniform", help="DISTREAL's LUT (learned, uniform or a file)")
    parser.add_argument(
        "--runs", default="plain:default,plain:tuned,inprocess:tuned,flwr-run:default,flwr-run:tuned",
        help="variant:allocator pairs, in order (variants plain, inprocess, flwr-run; allocators default, tuned)",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--eval-cost", action="store_true", help="time training, static BN and evaluation per layout")
    parser.add_argument("--layouts", default="nchw,channels_last", help="--eval-cost: the layouts, in order")
    parser.add_argument("--every", default="10", help="--eval-cost: evaluate_every values to show besides 1")
    parser.add_argument("--eval-samples", type=int, default=None, help="--eval-cost: evaluate_samples (all: 10,000)")
    parser.add_argument("--bn-devices", type=int, default=10, help="--eval-cost: strategy.bn_devices")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child and args.child.startswith("eval-cost:"):
        print("RESULT " + json.dumps(_eval_cost_child(args.child.split(":", 1)[1], args)), flush=True)
        return
    if args.child:
        print("RESULT " + json.dumps(_child(args.child, args, Path(args.out))), flush=True)
        return
    if not (Path(args.root) / "cifar-10-batches-py").is_dir():
        sys.exit(f"no CIFAR-10 at {args.root} (cifar-10-batches-py); pass --root")
    if args.eval_cost:
        _eval_cost(args)
        return
    results = []
    for pair in args.runs.split(","):
        variant, _, malloc = pair.partition(":")
        if variant not in ("plain", "inprocess", "flwr-run") or malloc not in ("default", "tuned"):
            sys.exit(f"--runs: bad pair {pair!r}; expected <plain|inprocess|flwr-run>:<default|tuned>")
        env = dict(os.environ, FLWR_DISTREAL_MALLOC="default" if malloc == "default" else "tuned")
        with tempfile.TemporaryDirectory(prefix="fdr-bench-") as tmp:
            cmd = [sys.executable, __file__, "--child", variant, "--out", str(Path(tmp) / "run")]
            cmd += _passthrough(sys.argv[1:])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            sys.exit(f"variant {variant} ({malloc}) failed with exit status {proc.returncode}")
        res = {**json.loads(line[7:]), "malloc": malloc}
        results.append(res)
        print(
            f"{variant:>9} malloc={malloc:<7} wall {res['wall_s']:7.1f} s  user {res['user_s']:7.1f} s  "
            f"sys {res['sys_s']:7.1f} s" + "".join(f"  {k} {v:.1f}" for k, v in res.items() if k.endswith("_s") and k not in ("wall_s", "user_s", "sys_s")),
            flush=True,
        )
    print("\nvariant    malloc   wall(s)  user(s)  sys(s)  wall / plain (same malloc)   (CPU of flwr-run: whole machine)")
    for res in results:
        plain = next((r for r in results if r["variant"] == "plain" and r["malloc"] == res["malloc"]), None)
        ratio = f"{res['wall_s'] / plain['wall_s']:.2f}" if plain else "-"
        print(f"{res['variant']:<10} {res['malloc']:<8} {res['wall_s']:7.1f}  {res['user_s']:7.1f}  {res['sys_s']:6.1f}  {ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
