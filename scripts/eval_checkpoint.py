"""Evaluate runs' final global models with their own BatchNorm statistics and with statistics
recomputed from training data (the static-BN pass of HeteroFL's sBN), side by side.

A run that keeps running statistics (full resources, DISTREAL) evaluates with an exponential
average of past rounds' activations; the submodel baselines' static BatchNorm recomputes them for
the model being tested. Early in training the two differ, so this tells how much of a gap between
the methods is the evaluation's statistics rather than the weights.

    python scripts/eval_checkpoint.py results/cifar10_lam2/distreal_seed0 results/cifar10_lam2/heterofl_seed0

Reads each folder's ``checkpoint.npz`` (the last round's global model) and evaluates on the run's
own test split; the recomputation reads the training data of ``--bn-devices`` devices drawn from
the run's seed (the sample ``strategy.bn_devices`` draws).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from flwr_distreal.run.checkpoint import load_checkpoint
from flwr_distreal.run.config import to_run_config
from flwr_distreal.core.dropout import recompute_bn_statistics
from flwr_distreal.run.experiment import Experiment
from flwr_distreal.training.trainers import evaluate_model, set_weights


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders holding checkpoint.npz")
    parser.add_argument("--bn-devices", type=int, default=10, help="devices whose training data the pass reads")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    print(f"{'run':<48} {'round':>5} {'own statistics':>15} {'recomputed':>11}")
    for folder in args.runs:
        ckpt = load_checkpoint(folder)
        if ckpt is None:
            print(f"{str(folder):<48} no checkpoint.npz", file=sys.stderr)
            return 2
        cfg = to_run_config(ckpt.config)
        exp = Experiment(cfg)
        loader = exp.data.test_loader(cfg.eval_batch_size)
        model = exp.build_model()
        set_weights(model, ckpt.arrays)
        _, own, _ = evaluate_model(model, loader)
        # the static-BN pass over the run's seeded sample of devices
        if recompute_bn_statistics(model, exp.bn_batches(args.bn_devices)) == 0:
            recomputed = float("nan")
        else:
            _, recomputed, _ = evaluate_model(model, loader)
        print(f"{str(folder):<48} {ckpt.round:>5} {100 * own:>14.1f}% {100 * recomputed:>10.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
