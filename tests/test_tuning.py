"""Learning-rate tuning: the validation split, evaluation on it, the tuner and the ``tuned_lr`` resolver.

The tuner's real runs use an npz copy of the embedded digits whose *test* labels are shifted by
one class: a model that learns scores well on the validation split (held-out training samples)
and badly on that test set, so a tuner that judged by the test set would pick the other lr.
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from flwr_distreal.run import experiment, runtimes
from flwr_distreal.run.config import to_run_config
from flwr_distreal.data import DataError, FederatedData, load_digits
from flwr_distreal.training.trainers import evaluate_model, set_weights
from flwr_distreal.cli.tune import (
    TuneError,
    TuneSettings,
    choose_lr,
    lookup_tuned_lr,
    parse_entry,
    register_resolvers,
    register_tune_config,
    run_overrides,
    run_tuning,
    score_rows,
)

from conftest import compose_config

register_tune_config()
register_resolvers()


# ---------------------------------------------------------------------------------------
# The split
# ---------------------------------------------------------------------------------------


def _rows(ds) -> set[tuple]:
    """Each sample of a TensorDataset as a hashable (label, image bytes)."""
    x, y = ds.tensors
    return {(int(label), img.numpy().tobytes()) for img, label in zip(x, y)}


@pytest.fixture(scope="module")
def digits() -> FederatedData:
    return load_digits(num_devices=5)


def test_split_is_disjoint_sized_seeded_and_covers_each_partition(digits: FederatedData) -> None:
    split = digits.split_validation(0.2, seed=3)
    assert split.validation_partitions is not None
    assert digits.validation_partitions is None  # the original is untouched
    for i, (orig, train, held) in enumerate(zip(digits.partitions, split.partitions, split.validation_partitions)):
        n = len(orig)
        assert len(held) == round(0.2 * n) and len(train) == n - len(held)
        a, b = _rows(train), _rows(held)
        assert not a & b
        assert a | b == _rows(orig)
    assert len(split.validation) == sum(len(p) for p in split.validation_partitions)
    assert _rows(split.validation) == set().union(*(_rows(p) for p in split.validation_partitions))
    assert split.partition_sizes() == [len(p) for p in split.partitions]
    # seeded: the same seed holds out the same samples, another seed others
    again = digits.split_validation(0.2, seed=3)
    assert all(torch.equal(p.tensors[0], q.tensors[0]) for p, q in zip(split.validation_partitions, again.validation_partitions))
    other = digits.split_validation(0.2, seed=4)
    assert _rows(other.validation) != _rows(split.validation)
    # the training loader serves only the remaining samples
    served = torch.cat([x for x, _ in split.train_loader(0, batch_size=64, shuffle=False, augment=False)])
    assert torch.equal(served, split.partitions[0].tensors[0])
    assert len(split.validation_loader(100).dataset) == len(split.validation)
    assert "held out for validation" in split.summary()


def test_split_keeps_a_training_sample_and_refuses_bad_input(digits: FederatedData) -> None:
    x, y = digits.partitions[0].tensors
    tiny = FederatedData(
        "tiny", 10, digits.input_shape,
        [torch.utils.data.TensorDataset(x[:1], y[:1]), torch.utils.data.TensorDataset(x[:3], y[:3])], digits.test,
    )
    split = tiny.split_validation(0.9, seed=0)
    assert split.partition_sizes() == [1, 1]  # a one-sample device keeps its sample; others keep >= 1
    assert [len(p) for p in split.validation_partitions] == [0, 2]
    with pytest.raises(DataError, match="validation_fraction"):
        digits.split_validation(0.0)
    with pytest.raises(DataError, match="validation_fraction"):
        digits.split_validation(1.0)
    with pytest.raises(DataError, match="no sample"):
        FederatedData("tiny", 10, digits.input_shape, [torch.utils.data.TensorDataset(x[:2], y[:2])], digits.test
                      ).split_validation(0.2)
    with pytest.raises(DataError, match="already has a validation split"):
        split.split_validation(0.2)
    with pytest.raises(DataError, match="validation_fraction > 0"):
        digits.validation_loader()


def test_experiment_evaluates_on_the_held_out_samples(caplog: pytest.LogCaptureFixture) -> None:
    base = ["dataset.num_devices=4", "clients_per_round=2", "strategy=full", "resources=full"]
    val = experiment.Experiment(to_run_config(compose_config(*base, "validation_fraction=0.25", "evaluate_on=validation")))
    test = experiment.Experiment(to_run_config(compose_config(*base, "validation_fraction=0.25")))
    plain = experiment.Experiment(to_run_config(compose_config(*base)))
    held = val.data.validation
    assert len(held) > 0
    # training data and r_max come from what remains after the split, the same for every run of the seed
    assert [len(p) + len(h) for p, h in zip(val.data.partitions, val.data.validation_partitions)] == plain.data.partition_sizes()
    assert val.r_max == [val.r_max_for_samples(n) for n in val.data.partition_sizes()]
    assert val.r_max != plain.r_max
    _, arrays = val.initial_arrays()
    with caplog.at_level(logging.INFO, logger="flwr_distreal.run.experiment"):
        loss, acc, n = val.evaluate(arrays)
    assert f"evaluating on the validation split ({len(held)} samples)" in caplog.text
    model = val.build_model()
    set_weights(model, arrays)
    assert (loss, acc, n) == evaluate_model(model, torch.utils.data.DataLoader(held, batch_size=512))
    _, _, n_test = test.evaluate(arrays)
    assert n == len(held) != n_test == len(test.data.test)


# ---------------------------------------------------------------------------------------
# Scores, choice, entries, overrides
# ---------------------------------------------------------------------------------------


def test_score_is_the_mean_of_the_last_k_rounds_and_ties_go_to_the_smaller_lr() -> None:
    rows = [{"accuracy": a} for a in (0.1, 0.5, 0.2, 0.4)]
    assert score_rows(rows, 2) == pytest.approx(0.3)
    assert score_rows(rows, 10) == pytest.approx(0.3)  # fewer rounds than k: all of them
    assert np.isnan(score_rows(rows + [{"accuracy": float("nan")}], 2))
    assert choose_lr([0.05, 0.1, 0.2], [0.4, 0.6, 0.6]) == 0.1
    assert choose_lr([0.05, 0.1, 0.2], [0.4, float("nan"), 0.5]) == 0.2
    assert choose_lr([0.05, 0.1], [float("nan"), float("nan")]) is None


def test_entries_and_overrides_are_checked() -> None:
    entry = parse_entry("distreal@lut=uniform")
    assert (entry.strategy, entry.overrides, entry.keys) == ("distreal", ("lut=uniform",), ["lut"])
    with pytest.raises(TuneError, match="unknown strategy 'fedavg'"):
        parse_entry("fedavg")
    with pytest.raises(TuneError, match="tune.lrs"):
        parse_entry("full@lr=0.1")
    with pytest.raises(TuneError, match="tune.lrs"):
        run_overrides(["dataset=digits", "lr=0.1"])
    with pytest.raises(TuneError, match="tune.strategies"):
        run_overrides(["strategy=full"])
    assert run_overrides(["tune.setting=x", "hydra.run.dir=y", "rounds=3"]) == ["rounds=3"]
    with pytest.raises(TuneError, match="tune.lrs"):
        TuneSettings(setting="x", lrs=[0.1, 0.1])
    with pytest.raises(TuneError, match="tune.setting"):
        TuneSettings(setting="a/b")


def test_tune_yaml_keeps_the_run_configs_values_and_adds_tune() -> None:
    cfg = compose_config("tune.setting=s", "rounds=7", "dataset.num_devices=4", name="tune")
    run = compose_config()
    assert cfg.rounds == 7 and cfg.dataset.num_devices == 4 and cfg.tune.setting == "s"
    assert (cfg.lr, cfg.clients_per_round, cfg.lut) == (run.lr, run.clients_per_round, run.lut)  # config.yaml's, not the schema defaults
    assert list(cfg.tune.strategies) == ["distreal", "full", "small", "feddropout", "heterofl"]
    with pytest.raises(Exception, match="tune.lrz"):
        compose_config("tune.setting=s", "tune.lrz=[1]", name="tune")


# ---------------------------------------------------------------------------------------
# The tuner, end to end on tiny runs
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shifted_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits as an npz whose test labels are shifted by one class (validation and test disagree)."""
    d = load_digits(num_devices=4)
    x, y = d.centralized_train().tensors
    xt, yt = d.test.tensors
    path = tmp_path_factory.mktemp("data") / "shifted.npz"
    np.savez(path, x_train=x.numpy(), y_train=y.numpy(), x_test=xt.numpy(), y_test=((yt + 1) % 10).numpy())
    return path


LRS = [0.005, 0.2]


def _base(npz: Path) -> list[str]:
    return [
        "dataset=npz", f"dataset.path={npz}", "dataset.num_devices=8", "clients_per_round=4", "rounds=2",
        "resources=full", "plot=false",
    ]


def _settings(out: Path, **kw) -> TuneSettings:
    values = dict(setting="unit", strategies=["full"], lrs=LRS, seeds=[0], last_k=2, runtime="inprocess",
                  output=str(out / "runs"), write=str(out / "unit.yaml"))
    return TuneSettings(**{**values, **kw})


@pytest.fixture(scope="module")
def tuned(shifted_npz: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, list[str]]:
    out = tmp_path_factory.mktemp("tune")
    lines: list[str] = []
    results = run_tuning(_settings(out), _base(shifted_npz), echo=lines.append)
    return out, results, lines


def test_tuner_picks_by_validation_and_writes_its_outputs(tuned, shifted_npz: Path) -> None:
    out, results, lines = tuned
    assert results["full"]["lr"] == 0.2
    for lr, score in zip(LRS, results["full"]["scores"]):
        folder = out / "runs" / "full" / f"lr{lr:g}_seed0"
        saved = OmegaConf.load(folder / "config.yaml")
        assert (saved.evaluate_on, saved.validation_fraction, saved.lr, saved.rounds) == ("validation", 0.2, lr, 2)
        with (folder / "metrics.csv").open() as f:
            accs = [float(r["accuracy"]) for r in csv.DictReader(f)]
        assert score == pytest.approx(np.mean(accs[-2:]))
    # the test set would have picked the other lr: same runs, evaluated on the (shifted) test set
    on_test = {}
    for lr in LRS:
        cfg = to_run_config(compose_config(*_base(shifted_npz), "strategy=full", f"lr={lr}", "validation_fraction=0.2",
                                           "runtime=inprocess"))
        rows = runtimes.run_experiment(cfg, out / f"test_lr{lr}")
        on_test[lr] = np.mean([r["accuracy"] for r in rows[-2:]])
    assert on_test[0.005] > on_test[0.2]
    assert lines[0].startswith("tuning lr of ['full']")
    assert any(line.startswith("[2/2] full lr=0.2 seed 0: val acc ") for line in lines)
    table = (out / "runs" / "tuning.md").read_text()
    assert "| 0.2 | **" in table
    with (out / "runs" / "tuning.csv").open() as f:
        assert list(csv.reader(f))[-1] == ["best_lr", "0.2"]
    assert (out / "runs" / "tuning.png").stat().st_size > 0
    written = OmegaConf.load(out / "unit.yaml")
    entry = written.strategies.full
    assert (entry.lr, list(entry.grid), entry.last_k, entry.match["strategy.name"]) == (0.2, LRS, 2, "full")
    assert "python -m flwr_distreal.tune" in entry.command and entry.date


def test_resolver_reads_the_written_file(tuned) -> None:
    out, _, _ = tuned
    cfg = to_run_config(compose_config("strategy=full", f"lr=${{tuned_lr:{out / 'unit.yaml'}}}"))
    assert cfg.lr == 0.2
    with pytest.raises(Exception, match=r"no entry for strategy=heterofl.*tune.strategies"):
        to_run_config(compose_config("strategy=heterofl", f"lr=${{tuned_lr:{out / 'unit.yaml'}}}"))
    with pytest.raises(Exception, match=r"no tuned file .*nosuchsetting.yaml.*python -m flwr_distreal.tune tune.setting=nosuchsetting"):
        to_run_config(compose_config("strategy=full", "lr=${tuned_lr:nosuchsetting}"))


def test_resume_reuses_finished_runs_and_reruns_unfinished_ones(tuned, shifted_npz: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "copy"  # the shared tuning, copied: this test rewrites its runs and tuned file
    shutil.copytree(tuned[0], out)
    results = tuned[1]
    calls: list[float] = []

    def fake_run(cfg, folder, show_rounds=True):  # stands in for a run: records the call and writes what a run writes
        calls.append(cfg.lr)
        Path(folder).mkdir(parents=True, exist_ok=True)
        experiment.start_output(Path(folder), cfg)
        with (Path(folder) / "metrics.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["round", "accuracy", "loss"])
            writer.writerows([[r, 0.9, 0.1] for r in range(1, cfg.rounds + 1)])
        return experiment.read_metrics(Path(folder) / "metrics.csv")

    monkeypatch.setattr(runtimes, "run_experiment", fake_run)
    lines: list[str] = []
    again = run_tuning(_settings(out), _base(shifted_npz), echo=lines.append)
    assert calls == []  # everything reused
    assert again["full"]["scores"] == results["full"]["scores"]
    assert sum("(reused)" in line for line in lines) == 2
    # an unfinished run (one round of two recorded) is run again; the finished one is not
    metrics = out / "runs" / "full" / "lr0.005_seed0" / "metrics.csv"
    metrics.write_text("\n".join(metrics.read_text().splitlines()[:2]) + "\n")
    rerun = run_tuning(_settings(out), _base(shifted_npz), echo=lines.append)
    assert calls == [0.005]
    assert rerun["full"]["scores"][0] == pytest.approx(0.9) and rerun["full"]["lr"] == 0.005
    # a folder that holds a run of another config is refused, naming the key
    with pytest.raises(TuneError, match="clients_per_round"):
        other = [o.replace("clients_per_round=4", "clients_per_round=3") for o in _base(shifted_npz)]
        run_tuning(_settings(out), other, echo=lines.append)


def test_resolver_tells_lut_variants_apart(tmp_path: Path) -> None:
    path = tmp_path / "v.yaml"
    path.write_text(
        "setting: v\nstrategies:\n"
        "  distreal: {lr: 0.1, match: {strategy.name: distreal, lut: learned}}\n"
        "  distreal@lut=uniform: {lr: 0.3, match: {strategy.name: distreal, lut: uniform}}\n"
        "  full: {lr: 0.05, match: {strategy.name: full}}\n"
    )
    values = {"strategy.name": "distreal", "lut": "uniform"}
    assert lookup_tuned_lr(str(path), values.get) == 0.3
    values["lut"] = "learned"
    assert lookup_tuned_lr(str(path), values.get) == 0.1
    values["lut"] = "my_lut.json"
    with pytest.raises(TuneError, match="lut=my_lut.json"):
        lookup_tuned_lr(str(path), values.get)
    assert to_run_config(compose_config("strategy=distreal", "lut=uniform", f"lr=${{tuned_lr:{path}}}")).lr == 0.3
    assert to_run_config(compose_config("strategy=full", "lut=uniform", f"lr=${{tuned_lr:{path}}}")).lr == 0.05


def test_a_failed_run_scores_nothing_and_is_not_rerun(shifted_npz: Path, tmp_path: Path, monkeypatch) -> None:
    calls: list[float] = []

    def fake_run(cfg, folder, show_rounds=True):  # lr=0.2 "diverges" in round 1; lr=0.005 finishes
        calls.append(cfg.lr)
        experiment.start_output(Path(folder), cfg)
        if cfg.lr == 0.2:
            raise experiment.RunFailedError("the test loss became non-finite (round 1)")
        with (Path(folder) / "metrics.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["round", "accuracy"], *([r, 0.3] for r in range(1, cfg.rounds + 1))])
        return experiment.read_metrics(Path(folder) / "metrics.csv")

    monkeypatch.setattr(runtimes, "run_experiment", fake_run)
    lines: list[str] = []
    results = run_tuning(_settings(tmp_path), _base(shifted_npz), echo=lines.append)
    assert results["full"]["lr"] == 0.005 and np.isnan(results["full"]["scores"][1])
    assert any("lr=0.2 seed 0: failed: RunFailedError: the test loss became non-finite" in line for line in lines)
    assert "failed" in (tmp_path / "runs" / "tuning.md").read_text()
    run_tuning(_settings(tmp_path), _base(shifted_npz), echo=lines.append)
    assert calls == [0.005, 0.2]  # the recorded failure is reused like a finished run
    with pytest.raises(TuneError, match=r"every run of \['full'\] failed"):
        run_tuning(_settings(tmp_path / "b", lrs=[0.2]), _base(shifted_npz), echo=lines.append)


def test_lut_variants_are_tuned_apart_and_resolved(shifted_npz: Path, tmp_path: Path, monkeypatch) -> None:
    def fake_run(cfg, folder, show_rounds=True):  # the learned LUT does best at the small lr, the uniform one at the large lr
        experiment.start_output(Path(folder), cfg)
        good = (cfg.lut == "learned") == (cfg.lr == 0.005)
        with (Path(folder) / "metrics.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["round", "accuracy"], *([r, 0.8 if good else 0.4] for r in range(1, cfg.rounds + 1))])
        return experiment.read_metrics(Path(folder) / "metrics.csv")

    monkeypatch.setattr(runtimes, "run_experiment", fake_run)
    settings = _settings(tmp_path, strategies=["distreal", "distreal@lut=uniform"])
    results = run_tuning(settings, _base(shifted_npz), echo=lambda line: None)
    assert (results["distreal"]["lr"], results["distreal@lut=uniform"]["lr"]) == (0.005, 0.2)
    assert results["distreal@lut=uniform"]["match"] == {"strategy.name": "distreal", "lut": "uniform"}
    assert (tmp_path / "runs" / "distreal@lut=uniform" / "lr0.2_seed0" / "metrics.csv").is_file()
    lr = f"lr=${{tuned_lr:{tmp_path / 'unit.yaml'}}}"
    assert to_run_config(compose_config("strategy=distreal", "lut=uniform", lr)).lr == 0.2
    assert to_run_config(compose_config("strategy=distreal", "lut=learned", lr)).lr == 0.005


def test_absolute_paths_keep_the_lut_keywords(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for lut, expected in (("uniform", "uniform"), ("learned", "learned"), ("my.json", str(tmp_path / "my.json"))):
        cfg = to_run_config(compose_config("strategy=distreal", f"lut={lut}"))
        assert experiment.with_absolute_paths(cfg).lut == expected
