"""The main job (``scripts/run_main.sh``: ``+experiment=main_digits``) and a run that diverges.

The main job is a fair comparison at small scale: every method at its lr tuned on a validation
split (``conf/tuned/main_digits_lam2.yaml``), 3 seeds, in-process runs, and a final table with
mean and s.d. over the seeds.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flwr_distreal.cli.callbacks import count_sweep_jobs
from flwr_distreal.run.config import to_run_config
from flwr_distreal.run.recording import RunFailedError
from flwr_distreal.run.runtimes import run_experiment
from flwr_distreal.cli.tune import register_resolvers

from conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["distreal", "distreal_paper", "distreal_uniform", "full", "small", "feddropout", "heterofl", "fjord", "fedrolex"]

register_resolvers()


def test_main_job_sweeps_every_method_over_three_seeds_at_its_tuned_lr() -> None:
    cfg = compose_config("+experiment=main_digits", hydra_node=True)
    params = {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}
    assert sorted(params["method"]) == sorted(METHODS)
    assert params["seed"] == ["0", "1", "2"]
    assert count_sweep_jobs(cfg) == 27
    tuned = {}
    for method in METHODS:
        run = to_run_config(compose_config("+experiment=main_digits", f"method={method}"))
        assert run.runtime == "inprocess" and run.dataset.name == "digits" and run.resources.lam == 2.0
        tuned[method] = run.lr
    # the lrs come from the tuned file, per method (not one shared value)
    assert len(set(tuned.values())) > 1, tuned
    assert to_run_config(compose_config("+experiment=main_digits", "method=distreal_uniform")).lut == "uniform"


@pytest.mark.slow
def test_main_job_prints_a_table_with_mean_and_sd(tmp_path: Path) -> None:
    """A shortened main job (2 methods, 2 seeds, 2 rounds) through the Hydra runner: one progress
    line per run and the final table (mean ± s.d. over the seeds); the report's CSV has mean and
    s.d. columns."""
    out = tmp_path / "main"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [
            sys.executable, "-m", "flwr_distreal.main", "-m", "+experiment=main_digits", "rounds=2",
            "method=full,heterofl", "seed=0,1", f"hydra.sweep.dir={out}",
        ],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[") and "finished in" in line]
    assert len(progress) == 4, proc.stdout
    assert "round 1/2" not in proc.stdout  # a sweep prints a line per run, not per round
    assert "±" in proc.stdout and "full" in proc.stdout and "heterofl" in proc.stdout
    with (out / "report" / "final_accuracy.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and any(k.endswith("mean") for k in rows[0]) and any(k.endswith("sd") for k in rows[0])
    for row in rows:
        n = [v for k, v in row.items() if k.endswith("_n") or k == "n"]
        assert not n or all(int(float(x)) == 2 for x in n if x)


def test_a_non_finite_test_loss_stops_the_run(tmp_path: Path) -> None:
    """A run whose global model diverges (lr 1e30, no clipping) stops at that round with an error
    naming it; metrics.csv keeps the round's row (loss nan, the huge update norm)."""
    cfg = to_run_config(
        compose_config(
            "runtime=inprocess", "strategy=full", "lr=1e30", "clip_norm=null", "rounds=3",
            "dataset.num_devices=6", "clients_per_round=3", "plot=false",
        )
    )
    with pytest.raises(RunFailedError, match=r"round 1: the test loss is nan"):
        run_experiment(cfg, tmp_path / "run", show_rounds=False)
    with (tmp_path / "run" / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["round"] for r in rows] == ["1"]
    assert math.isnan(float(rows[0]["loss"])) and float(rows[0]["update_norm"]) > 1e20
