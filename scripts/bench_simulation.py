#!/usr/bin/env python
"""Simulation overhead and memory of a federated run.

Runs the same experiment twice, side by side in one invocation:

1. through Flower's simulation engine (``run_simulation``, Ray backend), as the runner does;
2. as a plain loop in this process: the same clients (same ``Experiment.make_client``), the
   same number sampled per round, the same aggregation maths and server-side evaluation.

It prints the median wall time per round of each (steady state: the first round, which
includes Ray's start-up and the actors' data loading, is reported apart), their ratio, and the
peak resident memory (RSS) of the simulation's whole process tree (driver, Ray's raylet and
GCS, client actors), sampled from /proc every 0.2 s.

    python scripts/bench_simulation.py                                   # FEMNIST LEAF if present, else digits
    python scripts/bench_simulation.py dataset=femnist_leaf clients_per_round=35 rounds=6
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _tree_rss_bytes(root: int) -> int:
    """Sum of VmRSS over ``root`` and all its descendants (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields.get("PPid", "0").strip())
        value = fields.get("VmRSS")
        rss[pid] = int(value.split()[0]) * 1024 if value else 0
    total = 0
    for pid in rss:
        p = pid
        while p and p != root:
            p = parents.get(p, 0)
        if p == root:
            total += rss[pid]
    return total


class PeakRSS:
    """Samples the process tree's RSS in a thread and keeps the peak."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        root = os.getpid()
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(root))
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from flwr_distreal.run.config import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_run_config(hydra_compose(config_name="config", overrides=overrides))


def plain_loop(cfg) -> list[float]:
    """The same rounds without Flower: sample, fit each client in turn, aggregate, evaluate."""
    import torch
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays

    from flwr_distreal.server.aggregate import mac_weighted_update, weighted_average
    from flwr_distreal.run.experiment import Experiment

    exp = Experiment(cfg)
    torch.set_num_threads(cfg.torch_threads)
    strategy = exp.make_strategy()
    params = parameters_to_ndarrays(strategy.initial_parameters)
    rng = random.Random(cfg.seed)
    times = []
    for rnd in range(1, cfg.rounds + 1):
        t0 = time.perf_counter()
        devices = rng.sample(range(exp.num_devices), cfg.clients_per_round)
        replies = [exp.make_client(d).fit(params, {"server-round": rnd}) for d in devices]
        kept = [r for r in replies if not r[2]["straggler"]]
        if kept:
            if cfg.strategy.name == "distreal":
                params = mac_weighted_update(params, [r[0] for r in kept], [r[2]["macs"] for r in kept])
            else:
                params = weighted_average(params, [r[0] for r in kept], [r[1] for r in kept])
        strategy.evaluate(rnd, ndarrays_to_parameters(params))
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/config.yaml")
    parser.add_argument("--json", default=None, help="write the measurements here")
    args = parser.parse_args()
    leaf = REPO.parent / "shared" / "data" / "femnist_leaf"
    defaults = [f"dataset=femnist_leaf", f"dataset.root={leaf}", "clients_per_round=35"] if leaf.is_dir() else [
        "dataset=digits", "clients_per_round=10"
    ]
    overrides = defaults + ["rounds=6", "resources=timevarying", "resources.lam=2"] + args.overrides
    cfg = compose(overrides)

    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)
    from flwr_distreal.run.runtimes import run_experiment

    with tempfile.TemporaryDirectory() as tmp, PeakRSS() as mem:
        t0 = time.perf_counter()
        rows = run_experiment(cfg, tmp)
        sim_total = time.perf_counter() - t0
    walls = [r["wall_time"] for r in rows]
    sim_rounds = [b - a for a, b in zip(walls, walls[1:])]
    with PeakRSS() as loop_mem:
        loop_rounds = plain_loop(cfg)

    sim_med = statistics.median(sim_rounds) if sim_rounds else float("nan")
    loop_med = statistics.median(loop_rounds[1:] or loop_rounds)
    result = {
        "overrides": overrides,
        "load_average": os.getloadavg(),
        "simulation": {"total_s": sim_total, "first_round_s": walls[0] if walls else None, "round_s": sim_rounds,
                       "median_round_s": sim_med, "peak_rss_mb": mem.peak / 2**20},
        "plain_loop": {"round_s": loop_rounds, "median_round_s": loop_med, "peak_rss_mb": loop_mem.peak / 2**20},
        "ratio_sim_over_loop": sim_med / loop_med,
    }
    print(f"settings: {' '.join(overrides)}  (load average {os.getloadavg()[0]:.2f})")
    print(f"Flower simulation: {sim_total:.1f} s total, first round {walls[0]:.1f} s (Ray start-up), "
          f"median round {sim_med:.2f} s, peak RSS of the process tree {mem.peak / 2**20:.0f} MB")
    print(f"plain loop:        median round {loop_med:.2f} s, peak RSS {loop_mem.peak / 2**20:.0f} MB")
    print(f"ratio simulation / plain loop (median round): {result['ratio_sim_over_loop']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
