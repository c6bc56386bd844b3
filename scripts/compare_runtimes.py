"""The same seeded experiment through both runtimes, side by side in one run.

``runtime=legacy``: the legacy pair (``NumPyClient`` + legacy strategy) on Flower's deprecated
``run_simulation``; ``runtime=flwr-run``: the Message-API app (ClientApp handlers +
``flwr_distreal.flower.serverapp`` strategies) through ``flwr run`` on a private local SuperLink.

For every strategy it prints per-round accuracy and stragglers of both runtimes, whether they are
bit-identical, and the wall time: the median time per round after the first, the first round
(which includes each runtime's start-up) and the whole run, with the ratio flwr-run / legacy.

    python scripts/compare_runtimes.py --strategies distreal -- rounds=5 resources.lam=2
    python scripts/compare_runtimes.py --strategies distreal,full,small,feddropout,heterofl \\
        --json results/runtimes_femnist.json -- dataset=femnist_leaf clients_per_round=35 rounds=20 resources.lam=2

Arguments after ``--`` are Hydra overrides of ``conf/config.yaml``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from flwr_distreal.run.config import RunConfig, register_configs, to_run_config  # noqa: E402

RUNTIMES = ("legacy", "flwr-run")


def _config(overrides: list[str]) -> RunConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=overrides))


def _round_times(rows: list[dict]) -> tuple[float, float]:
    """(first round incl. start-up, median of the later rounds) from the cumulative wall_time."""
    walls = [float(r["wall_time"]) for r in rows]
    later = [b - a for a, b in zip(walls, walls[1:])]
    return walls[0], statistics.median(later) if later else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="distreal", help="comma-separated strategy names")
    parser.add_argument("--out", default="results/compare_runtimes", help="run directories go here")
    parser.add_argument("--json", default=None, help="write all numbers to this JSON file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (after --)")
    args = parser.parse_args()

    from flwr_distreal.run.runtimes import run_experiment

    report: dict = {"overrides": args.overrides, "strategies": {}}
    for strategy in args.strategies.split(","):
        runs = {}
        for runtime in RUNTIMES:
            cfg = _config([*args.overrides, f"strategy={strategy}", f"runtime={runtime}"])
            out = Path(args.out) / f"{strategy}_{runtime}"
            print(f"{strategy} / {runtime}: {cfg.rounds} rounds on {cfg.dataset.name} ...", flush=True)
            start = time.perf_counter()
            rows = run_experiment(cfg, out)
            total = time.perf_counter() - start
            first, median = _round_times(rows)
            runs[runtime] = {"rows": rows, "total_s": total, "first_round_s": first, "median_round_s": median}
        legacy, message = runs["legacy"]["rows"], runs["flwr-run"]["rows"]
        keys = ("accuracy", "loss", "mean_macs", "stragglers", "accepted")
        identical = [[r[k] for k in keys] for r in legacy] == [[r[k] for k in keys] for r in message]
        max_diff = max((abs(float(a["accuracy"]) - float(b["accuracy"])) for a, b in zip(legacy, message) if a["accuracy"] and b["accuracy"]), default=0.0)
        print(f"\n{strategy}: per-round accuracy (stragglers)")
        print(f"{'round':>5} | {'legacy':>16} | {'flwr run':>16}")
        for a, b in zip(legacy, message):
            print(
                f"{int(a['round']):>5} | {float(a['accuracy']):.4f} ({int(float(a['stragglers'])):>3}) "
                f"  | {float(b['accuracy']):.4f} ({int(float(b['stragglers'])):>3})"
            )
        print(f"bit-identical per-round metrics ({', '.join(keys)}): {identical}; max |accuracy diff| {max_diff:.2e}")
        lr, mr = runs["legacy"], runs["flwr-run"]
        print(
            f"wall time, legacy vs flwr run: median round {lr['median_round_s']:.2f} s vs {mr['median_round_s']:.2f} s "
            f"(ratio {mr['median_round_s'] / lr['median_round_s']:.2f}); first round incl. start-up "
            f"{lr['first_round_s']:.1f} s vs {mr['first_round_s']:.1f} s; whole run {lr['total_s']:.1f} s vs "
            f"{mr['total_s']:.1f} s (ratio {mr['total_s'] / lr['total_s']:.2f})\n",
            flush=True,
        )
        report["strategies"][strategy] = {
            "identical": identical,
            "max_accuracy_diff": max_diff,
            **{rt: {k: v for k, v in run.items()} for rt, run in runs.items()},
            "config": dataclasses.asdict(cfg),
        }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
