"""Server evaluation every k rounds and on a fixed subset (issue 21, item 5): ``evaluate_every``
and ``evaluate_samples``.

A run with ``evaluate_every=3`` over 7 rounds evaluates after rounds 3, 6 and 7 only (the last
round always), skips static BN's recomputation on the other rounds, leaves their accuracy and loss
cells empty in ``metrics.csv`` (every other column filled), trains exactly as a run that evaluates
every round, and everything that reads the metrics handles the gaps: the summary line, the plot,
the report's value at a round and rounds to a target, the bands, the tuner's score.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.common import ndarrays_to_parameters

from conftest import run_config, write_cifar10
from flwr_distreal.cli import tables, tune
from flwr_distreal.cli.sweep import band, first_round_reaching, last_k_score, value_at_round
from flwr_distreal.run import experiment as experiment_module
from flwr_distreal.run.config import ConfigError, RunConfig
from flwr_distreal.run.experiment import Experiment
from flwr_distreal.run.plotting import plot_runs
from flwr_distreal.run.plotting import read_metrics as load_metrics
from flwr_distreal.run.recording import evaluated_rows, read_metrics, start_output, summary_line
from flwr_distreal.run.runtimes import RecordingStrategy, run_experiment

TINY = [
    "dataset=digits", "dataset.num_devices=4", "clients_per_round=2", "resources=timevarying", "runtime=inprocess",
    "strategy.static_bn=true", "strategy.bn_devices=2",
]


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of ``flwr_distreal.run.experiment.<name>`` (the run's evaluation pieces)."""
    calls: list[int] = []
    original = getattr(experiment_module, name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(experiment_module, name, counted)
    return calls


def test_evaluate_every_three_over_seven_rounds(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    evaluations = _counting(monkeypatch, "evaluate_model")
    bn = _counting(monkeypatch, "recompute_bn_statistics")
    cfg = run_config(*TINY, "rounds=7", "evaluate_every=3")
    out = tmp_path / "k3"
    rows = run_experiment(cfg, out, show_rounds=False)

    # rounds 3, 6 and the last, 7: evaluated; static BN recomputed before each of those only
    assert [r["round"] for r in evaluated_rows(rows)] == [3, 6, 7]
    assert len(evaluations) == 3 and len(bn) == 3
    with (out / "metrics.csv").open(newline="") as f:
        cells = list(csv.DictReader(f))
    assert [c["round"] for c in cells] == [str(t) for t in range(1, 8)]
    for c in cells:
        if c["round"] in ("3", "6", "7"):
            assert 0 <= float(c["accuracy"]) <= 1 and math.isfinite(float(c["loss"]))
        else:  # empty, not a repeated value
            assert c["accuracy"] == "" and c["loss"] == ""
        assert float(c["received"]) == 2 and math.isfinite(float(c["update_norm"])) and c["wall_time"] != ""
    with (out / "draws.csv").open(newline="") as f:
        assert [r["round"] for r in csv.DictReader(f)] == [str(t) for t in range(1, 8)]
    assert (out / "accuracy.png").stat().st_size > 0  # the plot joins the evaluated rounds

    # read back: None in the gaps (read_metrics), NaN with the plotting reader
    back = read_metrics(out / "metrics.csv")
    assert [r["accuracy"] is None for r in back] == [True, True, False, True, True, False, False]
    assert [r["accuracy"] is None for r in load_metrics(out / "metrics.csv")] == [True, True, False, True, True, False, False]
    acc = {r["round"]: r["accuracy"] for r in back if r["accuracy"] is not None}
    assert f"final accuracy {acc[7]:.4f}" in summary_line(cfg, back)

    # evaluation changes nothing in training: the same seed evaluated every round gives the same
    # accuracy at rounds 3, 6, 7 and the same other columns in every round
    every = run_experiment(dataclasses.replace(cfg, evaluate_every=1), tmp_path / "k1", show_rounds=False)
    assert len(evaluations) == 3 + 7 and len(bn) == 3 + 7
    assert {t: every[t - 1]["accuracy"] for t in (3, 6, 7)} == acc
    skip = {"accuracy", "loss", "wall_time"}
    assert [{k: v for k, v in r.items() if k not in skip} for r in every] == [
        {k: v for k, v in r.items() if k not in skip} for r in rows
    ]

    # reports: a round not evaluated takes the last evaluated round at or before it
    assert value_at_round(back, 5) == acc[3]
    assert value_at_round(back, 6) == acc[6]
    assert value_at_round(back, 2) is None  # nothing evaluated yet
    assert value_at_round(back, 8) is None  # not reached
    assert value_at_round(back, 5, "received") == 2.0  # other columns: the round's own value
    assert first_round_reaching(back, 0.0) == 3  # over the evaluated rounds only
    rounds, mean, _ = band([back, read_metrics(tmp_path / "k1" / "metrics.csv")])
    assert rounds == [3, 6, 7] and mean[0] == pytest.approx(acc[3])
    # the tuner's score: the evaluated rounds among the last k
    assert tune.score_rows(back, 2) == pytest.approx((acc[6] + acc[7]) / 2)
    assert tables.score_rows(back, 3) == tune.score_rows(back, 3) == pytest.approx((acc[6] + acc[7]) / 2)
    assert tune.score_rows(back, 1) == acc[7]


def test_gaps_in_pure_functions(tmp_path) -> None:
    """Hand-made rows with gaps (None and an empty cell; for the report also NaN) and the plot."""
    rows = [
        {"round": 1, "accuracy": None, "stragglers": 1.0},
        {"round": 2, "accuracy": 0.4, "stragglers": 0.0},
        {"round": 3, "accuracy": "", "stragglers": 2.0},
        {"round": 4, "accuracy": math.nan, "stragglers": 0.0},
        {"round": 5, "accuracy": 0.8, "stragglers": 1.0},
    ]
    assert [value_at_round(rows, t) for t in range(1, 7)] == [None, 0.4, 0.4, 0.4, 0.8, None]
    assert first_round_reaching(rows, 0.5) == 5 and first_round_reaching(rows, 0.9) is None
    assert band([rows])[0] == [2, 5]
    assert band([rows], "stragglers")[0] == [1, 2, 3, 4, 5]
    # the tuner's score: gaps (None, "") skipped; a NaN accuracy is a failed run's: NaN
    assert last_k_score(rows, 1) == 0.8 and math.isnan(last_k_score(rows, 3))
    kept = [r for r in rows if r["round"] != 4]
    assert last_k_score(kept, 3) == pytest.approx(0.6) and last_k_score(kept, 2) == 0.8
    assert math.isnan(last_k_score(rows[:1], 1)) and math.isnan(last_k_score([], 3))
    assert plot_runs({"a": rows}, tmp_path / "gaps.png").stat().st_size > 0


def test_evaluate_samples_is_a_fixed_seeded_subset() -> None:
    cfg = run_config(*TINY[:4], "evaluate_samples=50")
    exp = Experiment(cfg)
    total = len(exp.data.test_loader().dataset)
    indices = exp.evaluation_indices(total)
    assert len(indices) == len(set(indices)) == 50 and indices == sorted(indices) and max(indices) < total
    assert Experiment(cfg).evaluation_indices(total) == indices  # drawn from the seed: every process alike
    assert Experiment(dataclasses.replace(cfg, seed=cfg.seed + 1)).evaluation_indices(total) != indices
    _, arrays = exp.initial_arrays()
    first = exp.evaluate(arrays)
    assert first[2] == 50 and list(exp._eval_loader.dataset.indices) == indices
    # the same samples every round: the same model scores the same
    assert exp.evaluate(arrays) == first
    assert list(exp._eval_loader.dataset.indices) == indices
    # a subset at least as large as the split: all of it, no subset
    assert Experiment(dataclasses.replace(cfg, evaluate_samples=total)).evaluation_indices(total) is None
    full = Experiment(dataclasses.replace(cfg, evaluate_samples=None))
    assert full.evaluation_indices(total) is None and full.evaluate(arrays)[2] == total
    assert np.isfinite(first[0])


@pytest.mark.parametrize(
    "override, match",
    [
        ("evaluate_every=0", "evaluate_every must be an integer >= 1"),
        ("evaluate_every=-2", "evaluate_every must be an integer >= 1"),
        ("evaluate_samples=0", "evaluate_samples must be an integer >= 1"),
    ],
)
def test_bad_values_refused(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        run_config(*TINY[:4], override)


def test_bad_types_refused_by_the_schema() -> None:
    cfg = run_config(*TINY[:4])
    for key, value in (("evaluate_every", True), ("evaluate_every", 1.5), ("evaluate_samples", -1)):
        with pytest.raises(ConfigError, match=key):
            RunConfig(**{**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}, key: value})


def test_evaluates_rounds() -> None:
    exp = Experiment.__new__(Experiment)
    exp.cfg = run_config(*TINY[:4], "rounds=10", "evaluate_every=4")
    assert [t for t in range(1, 11) if exp.evaluates(t)] == [4, 8, 10]
    exp.cfg = run_config(*TINY[:4], "rounds=10")
    assert [t for t in range(1, 11) if exp.evaluates(t)] == list(range(1, 11))
    exp.cfg = run_config(*TINY[:4], "rounds=10", "evaluate_every=20")
    assert [t for t in range(1, 11) if exp.evaluates(t)] == [10]
    assert exp.evaluate_round(5, []) == (None, None, 0)  # not evaluated: nothing computed


@pytest.mark.slow  # DenseNet-BC-40 built several times: about a minute on a loaded 2-core machine
def test_bench_eval_cost_child_on_generated_cifar(tmp_path) -> None:
    """``scripts/bench_cifar_round.py --eval-cost``: one layout's round parts (training, static BN,
    evaluation on ``--eval-samples``), on CIFAR-10 pickles of 40 images."""

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_cifar_round.py"
    spec = importlib.util.spec_from_file_location("script_bench_cifar_round_eval", path)
    module = importlib.util.module_from_spec(spec)
    saved_path = [*sys.path]
    try:
        spec.loader.exec_module(module)
        write_cifar10(tmp_path / "cifar", per_batch=8, n_test=6)
        args = module.argparse.Namespace(
            root=str(tmp_path / "cifar"), devices=4, samples=8, clients=2, batch=4, eval_batch=6, lut="uniform",
            eval_samples=4, bn_devices=2,
        )
        res = module._eval_cost_child("nchw", args)
    finally:
        sys.path[:] = saved_path
    assert res["layout"] == "nchw" and res["clients"] == 2 and res["eval_n"] == 4 and res["bn_samples"] == 16
    assert res["train_s"] > 0 and res["bn_s"] > 0 and res["eval_s"] > 0
    assert experiment_module.recompute_bn_statistics.__name__ == "recompute_bn_statistics"  # restored


def test_legacy_strategy_records_gaps(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The legacy API's centralized evaluation (``Experiment.make_strategy``'s ``evaluate_fn``,
    through the runner's :class:`RecordingStrategy`): rounds 1 and 3 of 3 with ``evaluate_every=2``
    are not evaluated / evaluated (the last); the initial model is evaluated as before."""
    evaluations = _counting(monkeypatch, "evaluate_model")
    cfg = run_config(*TINY[:4], "rounds=3", "evaluate_every=2", "runtime=legacy")
    exp = Experiment(cfg)
    recorder = start_output(tmp_path, cfg)
    strategy = RecordingStrategy(exp.make_strategy(), recorder)
    _, arrays = exp.initial_arrays()
    parameters = ndarrays_to_parameters(arrays)
    assert strategy.evaluate(0, parameters)[0] is not None and len(evaluations) == 1
    results = [strategy.evaluate(t, parameters) for t in (1, 2, 3)]
    assert [r[0] is None for r in results] == [True, False, False] and len(evaluations) == 3
    assert results[0][1]["accuracy"] is None
    back = read_metrics(tmp_path / "metrics.csv")
    assert [(r["round"], r["accuracy"] is None, r["loss"] is None) for r in back] == [
        (1, True, True), (2, False, False), (3, False, False)
    ]
