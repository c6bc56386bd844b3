"""Tests of the sweep report (flwr_distreal.cli.report) and the sweep callback (flwr_distreal.cli.callbacks).

The maths on hand-made rows; the report on a small fake sweep directory written here (a
``config.yaml`` and a ``metrics.csv`` per job, as the runner writes them); the callback's
progress lines and its report at the end of a sweep, driven through Hydra's hooks.
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

import pytest
import yaml
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from flwr_distreal.cli.callbacks import SweepReport, format_duration, progress_line
from flwr_distreal.cli.report import (
    Group,
    ReportError,
    Run,
    band,
    final_accuracy,
    first_round_reaching,
    group_runs,
    load_sweep,
    main,
    mean_sd,
    method_label,
    setting_label,
    value_at_round,
    write_report,
)


def rows(accuracies, stragglers=None, utilisation=None):
    """Metrics rows of rounds 1..n with these accuracies."""
    out = []
    for i, acc in enumerate(accuracies):
        out.append({
            "round": float(i + 1),
            "accuracy": acc,
            "stragglers": float(stragglers[i] if stragglers else 0),
            "mean_utilisation": float(utilisation[i] if utilisation else 1.0),
        })
    return out


# ---------------------------------------------------------------------------------------------
# maths


def test_mean_sd_is_the_sample_standard_deviation_over_finite_values():
    s = mean_sd([0.8, 0.9, 1.0])
    assert s.n == 3
    assert s.mean == pytest.approx(0.9)
    assert s.sd == pytest.approx(0.1)  # sqrt(((-0.1)^2 + 0 + 0.1^2) / 2)
    s = mean_sd([0.5, None, math.nan, 0.7])
    assert (s.n, s.mean, s.sd) == (2, pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    one = mean_sd([0.4])
    assert one.n == 1 and one.mean == 0.4 and math.isnan(one.sd)
    none = mean_sd([None, math.nan])
    assert none.n == 0 and math.isnan(none.mean)


def test_rounds_to_reach_is_the_first_round_at_or_above_the_target():
    r = rows([0.5, 0.72, 0.69, 0.8, 0.75])
    assert first_round_reaching(r, 0.7) == 2
    assert first_round_reaching(r, 0.72) == 2  # reaching counts (>=)
    assert first_round_reaching(r, 0.75) == 4
    assert first_round_reaching(r, 0.81) is None
    assert first_round_reaching(list(reversed(r)), 0.75) == 4  # row order does not matter
    r[0]["accuracy"] = math.nan
    assert first_round_reaching(r, 0.0) == 2  # a NaN round reaches nothing


def test_value_at_round_is_none_for_a_round_the_run_never_had():
    r = rows([0.1, 0.2, 0.3])
    assert value_at_round(r, 2) == pytest.approx(0.2)
    assert value_at_round(r, 2, "stragglers") == 0.0
    assert value_at_round(r, 4) is None


def test_band_averages_per_round_and_stops_at_the_shortest_run():
    a, b, short = rows([0.1, 0.3, 0.5]), rows([0.3, 0.5, 0.9]), rows([0.2, 0.4])
    rounds, mean, sd = band([a, b])
    assert rounds == [1, 2, 3]
    assert mean == pytest.approx([0.2, 0.4, 0.7])
    assert sd == pytest.approx([math.sqrt(0.02), math.sqrt(0.02), math.sqrt(0.08)])
    rounds, mean, sd = band([a, b, short])
    assert rounds == [1, 2]  # round 3 of two runs is not averaged with nothing from the third
    assert mean == pytest.approx([0.2, 0.4])
    assert band([]) == ([], [], [])


def _run(strategy="distreal", lut="learned", seed=0, acc=(0.5, 0.6, 0.7), rounds=None, **extra):
    cfg = {"strategy.name": strategy, "lut": lut, "dataset.name": "cifar10", "resources.kind": "timevarying",
           "resources.lam": 2.0, "seed": seed, "rounds": rounds if rounds is not None else len(acc), "lr": 0.1}
    cfg.update(extra)
    return Run(Path(f"job_{strategy}_{seed}"), cfg, rows(list(acc)))


def test_final_accuracy_leaves_out_runs_that_stopped_early_and_says_so():
    group = Group("DISTREAL", "cifar10, λ=2", [
        _run(seed=0, acc=(0.5, 0.6, 0.7, 0.8)),
        _run(seed=1, acc=(0.5, 0.6, 0.7, 0.9)),
        _run(seed=2, acc=(0.5, 0.2), rounds=4),  # non-finite loss at round 3: stopped
    ])
    stat, stopped = final_accuracy(group)
    assert (stat.n, stat.mean) == (2, pytest.approx(0.85))
    assert [r.last_round for r in stopped] == [2]
    assert group.planned_rounds == 4


def test_method_and_setting_labels():
    assert method_label("distreal", "learned") == "DISTREAL"
    assert method_label("distreal", "/abs/path/learned") == "DISTREAL"
    assert method_label("distreal", "uniform") == "DISTREAL (uniform LUT)"
    assert method_label("distreal", None) == "DISTREAL (uniform LUT)"  # older runs: null meant uniform
    assert method_label("distreal", "results/dse/femnist_cnn_femnist/lut.json") == "DISTREAL (LUT femnist_cnn_femnist/lut.json)"
    assert method_label("heterofl", "learned") == "HeteroFL (Diao 2021)"  # baselines ignore the LUT
    assert method_label("fancy") == "fancy"
    assert setting_label({"dataset.name": "cifar10", "resources.kind": "timevarying", "resources.lam": 0.5}) == "cifar10, λ=0.5"
    assert setting_label({"dataset.name": "femnist", "resources.kind": "constant", "resources.lam": 1.0}) == "femnist, constant"


def test_group_runs_pools_seeds_splits_lut_variants_and_other_differences():
    runs = [
        *(_run(seed=s) for s in range(3)),
        *(_run(lut="uniform", seed=s) for s in range(3)),
        *(_run("heterofl", seed=s, lr=0.05 if s < 2 else 0.2) for s in range(3)),
        _run("full", seed=0),
    ]
    groups = group_runs(runs)
    labels = [(g.method, len(g.runs)) for g in groups]
    # the paper's order: full, DISTREAL, its uniform-LUT variant, HeteroFL; unlike lrs kept apart
    assert labels == [
        ("Full res. avail. (upper bound)", 1),
        ("DISTREAL", 3),
        ("DISTREAL (uniform LUT)", 3),
        ("HeteroFL (Diao 2021) lr=0.05", 2),
        ("HeteroFL (Diao 2021) lr=0.2", 1),
    ]
    assert all(g.setting == "cifar10, λ=2" for g in groups)


# ---------------------------------------------------------------------------------------------
# the report on a fake sweep directory


def write_job(sweep: Path, name: str, config: dict, accuracies, stragglers=None, utilisation=None) -> Path:
    """A job directory as the runner leaves it: config.yaml (nested) and metrics.csv."""
    job = sweep / name
    job.mkdir(parents=True)
    (job / "config.yaml").write_text(yaml.safe_dump(config))
    fields = ["round", "accuracy", "loss", "received", "stragglers", "mean_utilisation", "sim_time", "wall_time"]
    with (job / "metrics.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for i, acc in enumerate(accuracies):
            w.writerow({"round": i + 1, "accuracy": acc, "loss": 1.0, "received": 10,
                        "stragglers": stragglers[i] if stragglers else 0,
                        "mean_utilisation": utilisation[i] if utilisation else 1.0,
                        "sim_time": i + 1, "wall_time": 0.1 * (i + 1)})
    return job


def job_config(strategy: str, lut: str, lam: float, seed: int, rounds: int = 4) -> dict:
    return {"strategy": {"name": strategy}, "lut": lut, "seed": seed, "rounds": rounds, "lr": 0.1,
            "dataset": {"name": "digits"}, "resources": {"kind": "timevarying", "lam": lam}}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """DISTREAL (learned and uniform LUT) and HeteroFL at lambda 1 and 2, 3 seeds, 4 rounds;
    HeteroFL's seed 2 at lambda 2 stopped after round 2."""
    root = tmp_path / "multirun" / "fig6_test" / "2026-01-01_00-00-00"
    n = 0
    for lam in (1.0, 2.0):
        for method, lut, base in (("distreal", "learned", 0.6), ("distreal", "uniform", 0.5), ("heterofl", "learned", 0.4)):
            for seed in range(3):
                acc = [base + 0.05 * seed + 0.1 * r for r in range(4)]
                strag = [0, 1, 0, 1] if method == "heterofl" else [0, 0, 0, 0]
                util = [0.5 + 0.1 * seed] * 4
                if method == "heterofl" and lam == 2.0 and seed == 2:
                    acc, strag, util = acc[:2], strag[:2], util[:2]
                write_job(root, f"{n}_{method}_{lut}_lam{lam}_seed{seed}", job_config(method, lut, lam, seed), acc, strag, util)
                n += 1
    return root


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_report_writes_tables_with_mean_and_sd_and_flags_the_early_stop(sweep: Path):
    files = write_report(sweep, targets=(0.75, 0.95), at_rounds=(2, 3, 50), plots=False)
    out = sweep / "report"
    assert files["report"] == out / "report.md"
    for key in ("final_accuracy", "accuracy_at_rounds", "rounds_to_reach", "resources"):
        assert files[key].parent == out and files[key].is_file()

    final = {(r["method"], r["setting"]): r for r in read_csv(files["final_accuracy"])}
    assert set(final) == {(m, f"digits, λ={lam}") for m in ("DISTREAL", "DISTREAL (uniform LUT)", "HeteroFL (Diao 2021)")
                          for lam in (1, 2)}
    d = final["DISTREAL", "digits, λ=1"]
    # final accuracies 0.9, 0.95, 1.0 over seeds
    assert (int(d["n"]), float(d["mean"]), float(d["sd"])) == (3, pytest.approx(0.95), pytest.approx(0.05))
    h = final["HeteroFL (Diao 2021)", "digits, λ=2"]
    # seed 2 stopped at round 2: the final accuracy is over seeds 0 and 1 only (0.7 and 0.75)
    assert (int(h["n"]), int(h["runs"]), float(h["mean"])) == (2, 3, pytest.approx(0.725))
    assert (h["stopped_early"], h["stopped_at_rounds"]) == ("1", "2")

    at = {(r["method"], r["setting"], r["round"]): r for r in read_csv(files["accuracy_at_rounds"])}
    assert {k[2] for k in at} == {"2", "3"}  # round 50 was never reached: left out
    h3 = at["HeteroFL (Diao 2021)", "digits, λ=2", "3"]
    assert (h3["n"], h3["runs_without_round"]) == ("2", "1")

    reach = {(r["method"], r["setting"], r["target"]): r for r in read_csv(files["rounds_to_reach"])}
    u = reach["DISTREAL (uniform LUT)", "digits, λ=1", "0.75"]
    # uniform, seeds 0/1/2: 0.50/0.55/0.60 + 0.1 per round reach 0.75 at rounds 4, 3 and 3
    assert (u["reached"], float(u["mean_round"])) == ("3", pytest.approx((4 + 3 + 3) / 3))
    assert reach["HeteroFL (Diao 2021)", "digits, λ=1", "0.95"]["reached"] == "0"

    res = {(r["method"], r["setting"]): r for r in read_csv(files["resources"])}
    assert float(res["HeteroFL (Diao 2021)", "digits, λ=1"]["stragglers_per_round_mean"]) == pytest.approx(0.5)
    assert float(res["DISTREAL", "digits, λ=1"]["utilisation_mean"]) == pytest.approx(0.6)
    assert float(res["DISTREAL", "digits, λ=1"]["utilisation_sd"]) == pytest.approx(0.1)

    md = files["report"].read_text()
    # the paper's layout: rows methods, columns settings, mean ± s.d. in percent
    assert "| method | digits, λ=1 | digits, λ=2 |" in md
    assert "| DISTREAL | 95.0 ± 5.0 (n=3) | 95.0 ± 5.0 (n=3) |" in md
    assert "72.5 ± 3.5 (n=2; 1 stopped early at round 2)" in md
    assert "Runs that stopped early" in md and "HeteroFL (Diao 2021), digits, λ=2: 1 stopped early at round 2 of 4" in md
    assert "not reached (0/3)" in md
    assert "(1 stopped before)" in md
    assert files["final_accuracy_md"].read_text().startswith("| method | digits, λ=1 | digits, λ=2 |")


def test_report_draws_one_png_per_setting(sweep: Path, tmp_path: Path):
    files = write_report(sweep, out=tmp_path / "rep", at_rounds=(2,))
    pngs = sorted(k for k in files if k.startswith("plot:"))
    assert pngs == ["plot:digits, λ=1", "plot:digits, λ=2"]
    assert files["plot:digits, λ=2"].name == "accuracy_digits_lam2.png"
    for key in pngs:
        assert files[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![accuracy_digits_lam1](accuracy_digits_lam1.png)" in files["report"].read_text()


def test_report_of_two_sweeps_together(sweep: Path, tmp_path: Path):
    other = tmp_path / "fig5"
    for seed in range(2):
        cfg = job_config("distreal", "learned", 1.0, seed)
        cfg["resources"] = {"kind": "constant", "lam": 1.0}
        write_job(other, f"{seed}_distreal_seed{seed}", cfg, [0.5, 0.6, 0.7, 0.8])
    files = write_report([sweep, other], plots=False)
    assert files["report"].parent == sweep / "report"
    header = files["final_accuracy_md"].read_text().splitlines()[0]
    assert header == "| method | digits, constant | digits, λ=1 | digits, λ=2 |"  # constant first, as in Fig. 6a


def test_load_sweep_lists_failed_jobs_and_refuses_an_empty_sweep(sweep: Path, tmp_path: Path):
    failed = sweep / "99_distreal_seed9"
    failed.mkdir()
    (failed / "main.log").write_text("Traceback ...\n")
    runs, skipped = load_sweep(sweep)
    assert len(runs) == 18
    assert skipped == ["99_distreal_seed9: no metrics.csv (the job failed before its first round; see its main.log)"]
    assert "99_distreal_seed9" in write_report(sweep, plots=False)["report"].read_text()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="no job directory with a readable metrics.csv"):
        load_sweep(empty)
    with pytest.raises(ReportError, match="no sweep directory"):
        load_sweep(tmp_path / "missing")
    with pytest.raises(ReportError, match=r"fractions in \(0, 1\]"):
        write_report(sweep, targets=(75,))
    with pytest.raises(ReportError, match=">= 1"):
        write_report(sweep, at_rounds=(0,))


def test_report_command(sweep: Path, tmp_path: Path, capsys):
    assert main([str(sweep), "--no-plots", "--targets", "0.8", "--at", "2"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| method | digits, λ=1 | digits, λ=2 |")
    assert f"report: {sweep / 'report' / 'report.md'}" in printed
    assert main([str(tmp_path / "nothing")]) == 2
    assert "error: no sweep directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# the sweep callback


def test_progress_line_counts_jobs_and_estimates_the_time_left():
    assert progress_line(3, 18, "2_heterofl_seed0", 42.0, [40.0, 44.0, 42.0]) == (
        "[3/18] 2_heterofl_seed0 finished in 42 s; ~10.5 min left"  # 15 jobs x 42 s
    )
    assert progress_line(18, 18, "17_full_seed2", 30.0, [30.0] * 18) == "[18/18] 17_full_seed2 finished in 30 s; sweep done"
    assert progress_line(2, None, "1_x", 5.0, [5.0, 5.0]) == "[2/?] 1_x finished in 5 s"
    assert progress_line(1, 36, "0_distreal_lam0.5_seed0", 7200.0, [7200.0]) == (
        "[1/36] 0_distreal_lam0.5_seed0 finished in 2.0 h; ~70.0 h left"
    )
    line = progress_line(2, 4, "1_x", 3.0, [5.0, 3.0], failed="LUTError: no such LUT")
    assert line == "[2/4] 1_x FAILED after 3 s (LUTError: no such LUT); ~0.1 min left"
    assert [format_duration(s) for s in (0.4, 89, 95, 5400)] == ["0 s", "89 s", "1.6 min", "1.5 h"]


def _multirun_config(sweep: Path, params: dict, task: list[str]):
    return OmegaConf.create({"hydra": {
        "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": params},
        "overrides": {"task": task},
        "sweep": {"dir": str(sweep)},
    }})


def test_sweep_callback_prints_progress_and_writes_the_report_after_the_last_job(sweep: Path, caplog):
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    # 3 methods x 3 seeds from the sweeper's params, 2 lambdas from the command line: 18 jobs
    cb = SweepReport(targets=[0.8], at_rounds=[2], plots=False)
    cb.on_multirun_start(_multirun_config(sweep, {"method": "distreal,distreal_uniform,heterofl", "seed": "0,1,2"},
                                          ["+experiment=fig6_test", "resources.lam=1,2", "lr=0.1"]))
    assert cb.total == 18
    caplog.set_level(logging.INFO, logger="flwr_distreal.cli.callbacks")
    for i, job in enumerate(jobs):
        cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(job)}, "sweep": {"dir": str(sweep)}}})
        cb.on_job_start(cfg)
        ret = JobReturn()
        ret.status = JobStatus.FAILED if i == 4 else JobStatus.COMPLETED
        ret._return_value = RuntimeError("loss is NaN") if i == 4 else ValueError("x" * 500) if i == 5 else 0.9
        if i == 5:
            ret.status = JobStatus.FAILED
        assert not (sweep / "report").exists()  # not before the last job
        cb.on_job_end(cfg, ret)
    lines = [r.getMessage() for r in caplog.records if r.name == "flwr_distreal.cli.callbacks"]
    assert lines[0].startswith(f"[1/18] {jobs[0].name} finished in ")
    assert lines[4].startswith(f"[5/18] {jobs[4].name} FAILED after ") and "(RuntimeError: loss is NaN)" in lines[4]
    assert f"(ValueError: {'x' * 145}...)" in lines[5] and len(lines[5]) < 260  # long errors cut short
    assert lines[17].startswith(f"[18/18] {jobs[17].name} finished in ") and lines[17].endswith("sweep done")
    assert (sweep / "report" / "final_accuracy.csv").is_file()
    assert any("sweep report:" in line for line in lines)
    mtime = (sweep / "report" / "report.md").stat().st_mtime_ns
    cb.on_multirun_end(OmegaConf.create({}))  # already written: not again
    assert (sweep / "report" / "report.md").stat().st_mtime_ns == mtime


def test_sweep_callback_reports_at_multirun_end_when_it_cannot_count(sweep: Path):
    cb = SweepReport(plots=False)
    config = _multirun_config(sweep, {}, ["seed=0,1"])
    config.hydra.sweeper["_target_"] = "some.other.Sweeper"
    cb.on_multirun_start(config)
    assert cb.total is None
    cb.on_multirun_end(config)
    assert (sweep / "report" / "report.md").is_file()


def test_sweep_callback_is_silent_in_a_single_run(tmp_path: Path, caplog):
    cb = SweepReport()
    caplog.set_level(logging.INFO, logger="flwr_distreal.cli.callbacks")
    cfg = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    cb.on_job_start(cfg)
    cb.on_job_end(cfg, JobReturn())
    assert not caplog.records
    assert not (tmp_path / "report").exists()


def test_sweep_callback_refuses_bad_options():
    with pytest.raises(ValueError, match="targets"):
        SweepReport(targets=[70])
    with pytest.raises(ValueError, match="at_rounds"):
        SweepReport(at_rounds=[0, 10])
