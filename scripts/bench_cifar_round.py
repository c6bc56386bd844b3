"""Where a CIFAR-10 DenseNet-BC-40 round's time goes: one DISTREAL round through the runtimes
against the same training steps and evaluation in a plain loop, side by side in one run.

    python scripts/bench_cifar_round.py                       # the issue's setting (10 clients of 500, batch 32, 10,000 test images)
    python scripts/bench_cifar_round.py --runs plain:default,plain:tuned

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


def _passthrough(argv: list[str]) -> list[str]:
    """The command line without --json/--runs (and their values): what a child needs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--json", "--runs"):
            skip = True
            continue
        if a.startswith(("--json=", "--runs=")):
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
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(_child(args.child, args, Path(args.out))), flush=True)
        return
    if not (Path(args.root) / "cifar-10-batches-py").is_dir():
        sys.exit(f"no CIFAR-10 at {args.root} (cifar-10-batches-py); pass --root")
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
