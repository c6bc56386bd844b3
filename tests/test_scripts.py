"""Smoke tests of ``scripts/``: no script can rot unnoticed.

Every Python script imports as a module and its argument parser answers ``--help``; where a run
is cheap, a tiny real run of the script's own code on tiny data (no timing is asserted: the
benchmarks' numbers are not checked, only that they run through and report); the shell scripts
pass ``bash -n``. A run that needs a subprocess, Ray or ``flwr run`` is marked ``slow`` or
replaced by the script's own pieces (its config composition, its plain loop) with the runtime
stubbed. Scripts whose smoke tests live in other files are listed in :data:`ELSEWHERE`; a
script named in no test file fails :func:`test_every_script_is_named_by_a_test`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from conftest import REPO, run_config, write_cifar10, write_leaf

SCRIPTS = REPO / "scripts"
TESTS = REPO / "tests"

#: Scripts whose smoke tests live in other test files, next to the feature each script shows
#: (their names must appear there: :func:`test_every_script_is_named_by_a_test`).
ELSEWHERE = {
    "bench_droppable.py",  # test_bench_droppable.py (and its --help here)
    "claim_share.py",
    "hostile_clients.py",
    "kill_and_resume.py",
    "kill_trials.py",
}
PY_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.py") if p.name not in ELSEWHERE - {"bench_droppable.py"})
SHELL_SCRIPTS = sorted(p.name for p in SCRIPTS.glob("*.sh"))


@pytest.fixture
def load(monkeypatch: pytest.MonkeyPatch):
    """Import a script as a module (registered in ``sys.modules`` for the test, as dataclasses
    and pickling need); ``sys.path`` and torch's thread count are restored afterwards (scripts
    prepend the repository and set threads)."""
    monkeypatch.setattr(sys, "path", [*sys.path])
    threads = torch.get_num_threads()

    def _load(name: str) -> ModuleType:
        path = SCRIPTS / name
        spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
        assert spec is not None and spec.loader is not None, name
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        return module

    yield _load
    torch.set_num_threads(threads)


def _main(module: ModuleType, argv: list[str], monkeypatch: pytest.MonkeyPatch):
    """Call the script's ``main`` as its command line would: with ``argv`` where ``main`` takes
    it, else through ``sys.argv``."""
    monkeypatch.setattr(sys, "argv", [module.__file__, *argv])
    if inspect.signature(module.main).parameters:
        return module.main(argv)
    return module.main()


# ------------------------------------------------------------------------------- every script


def test_every_script_is_named_by_a_test() -> None:
    """A script that no test file names has no smoke test (this file names its scripts through
    :data:`PY_SCRIPTS` and :data:`SHELL_SCRIPTS`, the rest are named where they are tested)."""
    texts = {p.name: p.read_text() for p in TESTS.glob("test_*.py") if p.name != Path(__file__).name}
    untested = [
        name for name in sorted(ELSEWHERE)
        if (SCRIPTS / name).exists() and not any(Path(name).stem in t for t in texts.values())
    ]
    assert not untested, f"scripts without a smoke test (named in no tests/test_*.py): {untested}"
    assert {"bench_checks.py", "plot_runs.py"} <= set(PY_SCRIPTS)
    assert {"run_main.sh", "setup_env.sh", "test.sh"} <= set(SHELL_SCRIPTS)


@pytest.mark.parametrize("name", PY_SCRIPTS)
def test_script_imports_and_answers_help(name: str, load, monkeypatch, capsys) -> None:
    module = load(name)
    assert callable(getattr(module, "main", None)), f"{name} has no main()"
    with pytest.raises(SystemExit) as exit_info:
        _main(module, ["--help"], monkeypatch)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name}"), out[:200]


@pytest.mark.parametrize("name", PY_SCRIPTS)
def test_script_refuses_an_unknown_option(name: str, load, monkeypatch, capsys) -> None:
    module = load(name)
    with pytest.raises(SystemExit) as exit_info:  # "x": the positional argument of the scripts that need one
        _main(module, ["x", "--no-such-option-anywhere"], monkeypatch)
    assert exit_info.value.code == 2
    assert "--no-such-option-anywhere" in capsys.readouterr().err


@pytest.mark.parametrize("name", SHELL_SCRIPTS)
def test_shell_script_parses(name: str) -> None:
    proc = subprocess.run(["bash", "-n", str(SCRIPTS / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = (SCRIPTS / name).read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text


def test_the_test_script_is_what_ci_runs_and_passes_its_arguments_to_pytest() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert "bash scripts/test.sh -p no:cacheprovider" in ci
    assert 'pytest -q "$@"' in (SCRIPTS / "test.sh").read_text()


# ------------------------------------------------------------------------- tiny real runs


def test_bench_checks_runs_every_variant(load, monkeypatch, capsys) -> None:
    module = load("bench_checks.py")
    _main(module, ["--model", "femnist_cnn_small", "--replies", "3", "--repeats", "1", "--robust"], monkeypatch)
    out = capsys.readouterr().out
    # main raises if a variant refuses an honest reply; every variant has its row
    for variant in ("no-bounds", "bounds", "bounds+layer", "clip-to-median", "median", "trimmed-mean"):
        assert f"\n{variant} " in out, variant
    assert "ratio bounds / no-bounds per round" in out


def test_bench_dropout_reports_every_variant(load, monkeypatch, tmp_path) -> None:
    module = load("bench_dropout.py")
    out = tmp_path / "bench.json"
    result = _main(module, [
        "--model", "femnist_cnn_small", "--batch", "4", "--reps", "1", "--warmup", "0", "--random", "1",
        "--rates", "0,0.5", "--switch-pool", "2", "--switch-steps", "2", "--threads", "1", "--json", str(out),
    ], monkeypatch)
    assert json.loads(out.read_text())["args"]["model"] == "femnist_cnn_small"
    assert result["full"]["macs"] > 0 and len(result["full"]["times_s"]) == 1
    assert len(result["rows"]) >= 3  # two uniform rates and one random vector


def test_bench_wallclock_runs_both_comparisons(load, monkeypatch, capsys) -> None:
    module = load("bench_wallclock.py")
    _main(module, ["--steps", "2", "--rounds", "1", "--round-batches", "2", "--batch", "4"], monkeypatch)
    out = capsys.readouterr().out
    assert "per step (median, ms), rate 0" in out and "per round of 2 batches" in out
    assert "machinery alone" in out


def test_bench_dse_parallel_on_synthetic_data(load, monkeypatch, tmp_path) -> None:
    module = load("bench_dse_parallel.py")
    out = tmp_path / "dse_parallel.json"
    _main(module, [
        "--model", "femnist_cnn_small", "--dataset", "synthetic", "--batches", "1", "--batch-size", "4",
        "--seeds", "2", "--val-size", "16", "--train-size", "128", "--vectors", "2", "--modes", "serial-1",
        "--warmup", "0", "--population", "8", "--generations", "1", "--json", str(out),
    ], monkeypatch)
    report = json.loads(out.read_text())
    assert report["fastest"] == "serial-1"
    assert report["results"]["serial-1"]["trainings"] == 2 * 2  # vectors x seeds, no cache hit


def test_bench_simulation_plain_loop_and_defaults(load) -> None:
    """The plain loop the benchmark holds against Flower's simulation (the simulation itself is
    the runtime's, tested in test_simulation.py)."""
    module = load("bench_simulation.py")
    cfg = module.compose(["dataset=digits", "dataset.num_devices=4", "clients_per_round=2", "rounds=1",
                          "resources=timevarying", "resources.lam=2"])
    times = module.plain_loop(cfg)
    assert len(times) == 1 and times[0] > 0


def test_compare_runtimes_composes_both_runtimes_and_compares_their_rows(load, monkeypatch, tmp_path, capsys) -> None:
    """The script's own logic over stubbed runs (the runtimes themselves are tested in
    test_simulation.py and test_flwr_run.py): each strategy runs under both runtimes with the
    overrides, and the report says whether their metrics are bit-identical."""
    import flwr_distreal.run.runtimes as runtimes

    module = load("compare_runtimes.py")
    calls = []

    def fake_run(cfg, out):
        calls.append((cfg.strategy.name, cfg.runtime, cfg.rounds, Path(out).name))
        acc = 0.5 if cfg.strategy.name == "distreal" or cfg.runtime == "legacy" else 0.25
        return [{"round": r, "accuracy": acc, "loss": 1.0, "mean_macs": 1.0, "stragglers": 0, "accepted": 2,
                 "wall_time": float(r)} for r in (1, 2)]

    monkeypatch.setattr(runtimes, "run_experiment", fake_run)
    report_path = tmp_path / "report.json"
    _main(module, ["--strategies", "distreal,heterofl", "--out", str(tmp_path), "--json", str(report_path),
                   "--", "rounds=2", "dataset.num_devices=4", "clients_per_round=2"], monkeypatch)
    assert calls == [
        ("distreal", "legacy", 2, "distreal_legacy"), ("distreal", "flwr-run", 2, "distreal_flwr-run"),
        ("heterofl", "legacy", 2, "heterofl_legacy"), ("heterofl", "flwr-run", 2, "heterofl_flwr-run"),
    ]
    report = json.loads(report_path.read_text())["strategies"]
    assert report["distreal"]["identical"] is True and report["heterofl"]["identical"] is False
    assert report["heterofl"]["max_accuracy_diff"] == pytest.approx(0.25)
    assert "bit-identical per-round metrics" in capsys.readouterr().out


def test_bench_cifar_round_plain_variant_on_generated_cifar(load, tmp_path) -> None:
    """The ``plain`` variant (the round's trainers and the evaluation, no runtime) as a child runs
    it, on CIFAR-10 pickles of 40 images; the other variants are the runtimes'."""
    module = load("bench_cifar_round.py")
    write_cifar10(tmp_path / "cifar", per_batch=8, n_test=6)
    parser_args = ["--root", str(tmp_path / "cifar"), "--devices", "4", "--samples", "8", "--clients", "2",
                   "--batch", "4", "--eval-batch", "6"]
    args = module.argparse.Namespace(root=str(tmp_path / "cifar"), devices=4, samples=8, clients=2, batch=4,
                                     eval_batch=6, lut="uniform")
    res = module._child("plain", args, tmp_path / "run")
    assert res["variant"] == "plain" and 1 <= res["steps"] <= 2 * 2  # 2 clients x 8 samples / batch 4
    assert res["wall_s"] > 0 and res["train_s"] > 0
    # what a child is given: the parent's command line without --json and --runs
    assert module._passthrough([*parser_args, "--json", "x.json", "--runs=plain:default"]) == parser_args


@pytest.mark.slow
def test_demo_wallclock_slowdown_runs_one_short_round(tmp_path) -> None:
    """The demo pins itself (and its CPU hog) to a core, so it runs in its own process."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "demo_wallclock_slowdown.py"), "--runs", "1", "--deadline", "1.5",
         "--slowdown-at", "0.5", "--batch", "8"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "run 1 distreal" in proc.stdout and "run 1 baseline" in proc.stdout
    assert "\ndistreal " in proc.stdout and "\nbaseline " in proc.stdout  # the summary table


def test_diagnose_lr_trains_replays_and_refuses_a_missing_folder(load, monkeypatch, tmp_path, capsys) -> None:
    module = load("diagnose_lr.py")
    root = write_leaf(tmp_path / "leaf", {f"w{i}": (12, 2) for i in range(4)})
    saved = tmp_path / "diag.json"
    argv = ["--root", str(root), "--steps", "2", "--seeds", "0", "--batch", "4", "--held-out", "8",
            "--variants", "full", "distreal", "--json", str(saved)]
    assert _main(module, argv, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "pooled FEMNIST: 40 train / 8 held-out samples" in out
    assert "full seed 0: acc" in out and "distreal seed 0: acc" in out
    runs = json.loads(saved.read_text())["runs"]
    assert len(runs) == 2
    assert _main(module, ["--replay", str(saved)], monkeypatch) == 0
    replayed = capsys.readouterr().out
    assert replayed.strip() and replayed.strip() in out  # the same tables, without training
    assert _main(module, ["--root", str(tmp_path / "nothing")], monkeypatch) == 0
    assert "not found; nothing to diagnose" in capsys.readouterr().out


# -------------------------------------------------------------- scripts that read a run's outputs


def _fake_run(folder: Path, *overrides: str, acc=(0.3, 0.5)) -> Path:
    """A run directory as a run leaves it (``config.yaml``, ``metrics.csv``, ``checkpoint.npz``
    of the model's initial weights), written by the package's own recorder, without training."""
    from flwr_distreal.run.checkpoint import Checkpoint, save_checkpoint
    from flwr_distreal.run.experiment import Experiment, start_output
    from flwr_distreal.training.trainers import get_weights

    cfg = run_config("dataset.num_devices=4", "clients_per_round=2", f"rounds={len(acc)}", *overrides)
    recorder = start_output(folder, cfg)
    for rnd, a in enumerate(acc, start=1):
        recorder.on_fit(rnd, {"received": 2, "stragglers": 1})
        recorder.on_evaluate(rnd, 1.0, {"accuracy": a})
    torch.manual_seed(0)
    model = Experiment(cfg).build_model()
    save_checkpoint(folder, Checkpoint(len(acc), list(model.state_dict()), get_weights(model),
                                       dataclasses.asdict(cfg), recorder.rows, {}))
    return folder


def test_plot_runs_plots_a_sweep_and_prints_its_summary(load, monkeypatch, tmp_path, capsys) -> None:
    module = load("plot_runs.py")
    _fake_run(tmp_path / "sweep" / "a", "strategy=distreal")
    _fake_run(tmp_path / "sweep" / "b", "strategy=heterofl", acc=(0.2, 0.4))
    out = tmp_path / "cmp.png"
    _main(module, [str(tmp_path / "sweep"), "--out", str(out)], monkeypatch)
    assert out.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "distreal lam=1.0" in printed and "heterofl lam=1.0" in printed
    assert "0.5000" in printed and "0.4000" in printed  # final accuracies


def test_eval_checkpoint_evaluates_a_runs_model_both_ways(load, monkeypatch, tmp_path, capsys) -> None:
    module = load("eval_checkpoint.py")
    run = _fake_run(tmp_path / "run", "strategy=heterofl")
    assert _main(module, [str(run), "--bn-devices", "2"], monkeypatch) == 0
    row = capsys.readouterr().out.splitlines()[-1].split()
    assert row[0] == str(run) and row[1] == "2"  # the checkpoint's round
    own, recomputed = (float(cell.rstrip("%")) for cell in row[2:4])
    assert 0.0 <= own <= 100.0
    assert math.isnan(recomputed) or 0.0 <= recomputed <= 100.0  # NaN: a model without BatchNorm
    assert _main(module, [str(tmp_path / "empty")], monkeypatch) == 2
    assert "no checkpoint.npz" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dse_output(tmp_path_factory) -> Path:
    """A finished (small) DSE on digits: a real short-training fitness, 5 x (1+1) vectors (the
    training settings of test_dse.py's end-to-end command, enough that the full model beats rate
    0.5, which the normalisation of equation (1) needs)."""
    from flwr_distreal.dse import CachedEvaluator, DSESettings, ShortTrainingFitness, ShortTrainingSettings, run_dse
    from flwr_distreal.dse.datasets import load_dse_data
    from flwr_distreal.dse.fitness import make_snapshot
    from flwr_distreal.models import build_model

    out = tmp_path_factory.mktemp("dse")
    data = load_dse_data("digits", val_fraction=0.2, seed=0, options={"seed": 0})
    snapshot = make_snapshot("femnist_cnn", data, steps=100, batch_size=32, lr=0.2, seed=0)
    snapshot.save(out / "snapshot.pt")
    fitness = ShortTrainingFitness("femnist_cnn", snapshot, data,
                                   ShortTrainingSettings(batches=6, batch_size=32, seeds=(0, 1, 2), lr=0.2))
    settings = DSESettings(population=5, generations=1, seed=0, lut_size=4, uniform_rates=(0.0, 0.25, 0.5))
    run_dse(CachedEvaluator(fitness), build_model("femnist_cnn", num_classes=data.num_classes), settings, out,
            progress=False)
    return out


@pytest.mark.slow
def test_plot_dse_replots_a_dse_in_raw_units(load, monkeypatch, dse_output, tmp_path, capsys) -> None:
    module = load("plot_dse.py")
    out = tmp_path / "front.png"
    _main(module, [str(dse_output), "--out", str(out)], monkeypatch)
    assert out.stat().st_size > 0 and capsys.readouterr().out.strip() == str(out)


@pytest.mark.slow
def test_revalidate_dse_remeasures_with_fresh_seeds(load, monkeypatch, dse_output, capsys) -> None:
    module = load("revalidate_dse.py")
    _main(module, [str(dse_output), "--dataset", "digits", "--batches", "6", "--batch-size", "32", "--lr", "0.2",
                   "--seeds", "5", "6", "7", "--workers", "1"], monkeypatch)
    report = json.loads((dse_output / "revalidation.json").read_text())
    assert report["seeds"] == [5, 6, 7] and report["trainings"] > 0
    assert len(report["per_rate"]) == 9 and np.isfinite(report["hypervolume_lut"])
    assert "fresh seeds [5, 6, 7]" in capsys.readouterr().out


def test_compare_sweeps_matches_runs_by_method_and_seed_and_ignores_only_wall_time(load, tmp_path, capsys) -> None:
    compare = load("compare_sweeps.py")
    header = "round,accuracy,loss,wall_time\n"

    def sweep(name: str, runs: dict[str, str]) -> Path:
        for run, body in runs.items():
            (tmp_path / name / run).mkdir(parents=True)
            (tmp_path / name / run / "metrics.csv").write_text(header + body)
        return tmp_path / name

    a = sweep("a", {"0_distreal_seed0": "1,0.5,1.2,3.0\n", "1_heterofl_seed0": "1,0.6,1.1,2.0\n"})
    # job numbers differ, wall_time differs, one extra method: still equal
    b = sweep("b", {"3_distreal_seed0": "1,0.5,1.2,9.0\n", "7_heterofl_seed0": "1,0.6,1.1,8.0\n", "8_fjord_seed0": "1,0.1,2,1\n"})
    assert compare.main([str(a), str(b)]) == 0
    assert "2 of 2 runs equal" in capsys.readouterr().out
    c = sweep("c", {"0_distreal_seed0": "1,0.5000001,1.2,3.0\n"})  # one accuracy changed, heterofl missing
    assert compare.main([str(a), str(c)]) == 1
    out = capsys.readouterr().out
    assert "distreal seed 0: 1 differences, first: round 1: accuracy 0.5 against 0.5000001" in out
    assert "heterofl seed 0: not in" in out
