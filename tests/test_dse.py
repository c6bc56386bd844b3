"""Tests of the design-time DSE (flwr_distreal.dse): problem, fitness, cache, driver, LUT, CLI."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pygmo as pg
import pytest
import torch

from flwr_distreal.core.lut import LUT
from flwr_distreal.core.macs import count_macs, kept_counts
from flwr_distreal.models import build_model
from flwr_distreal.dse import (
    CachedEvaluator,
    DropoutProblem,
    DSEError,
    DSESettings,
    Normaliser,
    SharedEvaluator,
    ShortTrainingFitness,
    ShortTrainingSettings,
    Snapshot,
    SnapshotError,
    hypervolume,
    make_snapshot,
    non_dominated,
    run_dse,
    spread_evenly,
)
from flwr_distreal.dse.datasets import default_distort, synthetic_data
from flwr_distreal.dse.driver import CHECKPOINT_NAME

from conftest import compose_config

REPO = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class AnalyticBackend:
    """Cheap deterministic fitness on the real FEMNIST CNN's MACs.

    The "accuracy gain" grows with the kept fraction of each layer, with different weights
    per layer, so that non-uniform vectors can beat uniform ones; ``bonus`` lets a vector
    with dropout beat the full model (to test a dominated all-zero vector).
    """

    def __init__(self, model_name: str = "femnist_cnn", n_seeds: int = 3, bonus: float = 0.0) -> None:
        self.model = build_model(model_name)
        self.n_layers = self.model.num_dropout_layers
        self.n_seeds = n_seeds
        self.bonus = bonus
        self.calls = 0

    def macs(self, vector: np.ndarray) -> int:
        return count_macs(self.model, vector)

    def training_key(self, vector: np.ndarray) -> bytes:
        return np.asarray(kept_counts(self.model, vector), dtype=np.int64).tobytes()

    def measure(self, vector: np.ndarray, seed_index: int) -> float:
        self.calls += 1
        frac = np.asarray(kept_counts(self.model, vector), float) / np.asarray(self.model.layer_widths)
        weights = np.linspace(1.0, 3.0, len(frac))
        gain = float((weights * np.sqrt(frac)).sum() / weights.sum())
        if self.bonus and 0.7 < frac[0] < 0.9:
            gain += self.bonus
        return gain + 0.001 * seed_index

    def fingerprint(self) -> dict:
        return {"analytic": True, "n_seeds": self.n_seeds, "bonus": self.bonus}


# -- problem and normalisation -------------------------------------------------------------------
def test_normalisation_maps_extremes_to_zero_and_one() -> None:
    backend = AnalyticBackend()
    ev = CachedEvaluator(backend)
    k = backend.n_layers
    macs, dacc = ev.evaluate(np.array([np.zeros(k), np.full(k, 0.5), np.full(k, 0.25)]))
    norm = Normaliser(macs[0], macs[1], dacc[0], dacc[1])
    prob = pg.problem(DropoutProblem(k, SharedEvaluator(ev), norm))
    assert prob.get_nobj() == 2
    lb, ub = prob.get_bounds()
    assert list(lb) == [0.0] * k and list(ub) == [0.5] * k
    np.testing.assert_array_equal(prob.fitness(np.zeros(k)), [1.0, 0.0])
    np.testing.assert_array_equal(prob.fitness(np.full(k, 0.5)), [0.0, 1.0])
    mid = prob.fitness(np.full(k, 0.25))
    assert 0.0 < mid[0] < 1.0 and 0.0 < mid[1] < 1.0
    # batch_fitness agrees with fitness
    flat = prob.batch_fitness(np.concatenate([np.zeros(k), np.full(k, 0.25)]))
    np.testing.assert_array_equal(flat, np.concatenate([[1.0, 0.0], mid]))


def test_normaliser_refuses_degenerate_extremes() -> None:
    with pytest.raises(DSEError, match="no accuracy advantage"):
        Normaliser(macs_full=10.0, macs_half=3.0, dacc_full=0.1, dacc_half=0.1)
    with pytest.raises(DSEError, match="MACs of the all-0"):
        Normaliser(macs_full=3.0, macs_half=3.0, dacc_full=0.2, dacc_half=0.1)
    with pytest.raises(DSEError, match="finite"):
        Normaliser(macs_full=10.0, macs_half=3.0, dacc_full=float("nan"), dacc_half=0.1)


def test_rates_outside_bounds_and_bad_shapes_refused() -> None:
    ev = CachedEvaluator(AnalyticBackend())
    with pytest.raises(DSEError, match=r"\[0, 0.5\]"):
        ev.evaluate(np.array([[0.1, 0.6]]))
    with pytest.raises(DSEError, match=r"\[0, 0.5\]"):
        ev.evaluate(np.array([[-0.01, 0.2]]))
    with pytest.raises(DSEError, match="NaN"):
        ev.evaluate(np.array([[np.nan, 0.2]]))
    with pytest.raises(DSEError, match="shape"):
        ev.evaluate(np.array([[0.1, 0.2, 0.3]]))
    with pytest.raises(DSEError, match="workers"):
        CachedEvaluator(AnalyticBackend(), workers=0)


# -- cache ----------------------------------------------------------------------------------------
def test_cache_never_trains_a_vector_twice() -> None:
    backend = AnalyticBackend(n_seeds=3)
    ev = CachedEvaluator(backend)
    v = np.array([[0.1, 0.3]])
    first = ev.evaluate(v)
    assert backend.calls == 3 and ev.n_trainings == 3
    second = ev.evaluate(np.vstack([v, v]))
    assert backend.calls == 3, "a cached vector was trained again"
    assert ev.n_vector_hits == 2
    np.testing.assert_array_equal(second[1], np.repeat(first[1], 2))
    # Same kept counts (32 * 0.1 and 32 * 0.105 both drop 3 filters) -> shared training.
    assert kept_counts(backend.model, [0.1, 0.3]) == kept_counts(backend.model, [0.105, 0.3])
    ev.evaluate(np.array([[0.105, 0.3]]))
    assert backend.calls == 3 and ev.n_training_hits == 1
    assert len(ev.records) == 2 and len(ev.trainings) == 1
    # -0.0 and 0.0 are the same vector.
    ev.evaluate(np.array([[0.0, 0.0]]))
    calls = backend.calls
    ev.evaluate(np.array([[-0.0, 0.0]]))
    assert backend.calls == calls


def test_cache_state_roundtrip() -> None:
    ev = CachedEvaluator(AnalyticBackend())
    ev.evaluate(np.random.default_rng(0).uniform(0, 0.5, (5, 2)))
    state = json.loads(json.dumps(ev.state_dict()))
    backend = AnalyticBackend()
    ev2 = CachedEvaluator(backend)
    ev2.load_state_dict(state)
    assert ev2.state_dict() == ev.state_dict()
    ev2.evaluate(np.array([r.vector for r in ev.records.values()]))
    assert backend.calls == 0


# -- front utilities ------------------------------------------------------------------------------
def test_front_hypervolume_and_spreading() -> None:
    pts = np.array([[0.0, 1.0], [0.5, 0.5], [0.6, 0.6], [1.0, 0.0], [0.5, 0.5], [0.2, 0.9]])
    idx = non_dominated(pts)
    assert idx.tolist() == [0, 5, 1, 3]  # sorted by f1, duplicate and dominated dropped
    assert hypervolume([[0.0, 0.0]]) == pytest.approx(1.21)
    assert hypervolume([[0.0, 1.0], [1.0, 0.0]]) == pytest.approx(2 * 1.1 * 0.1 - 0.01)
    assert hypervolume([[1.2, 0.0]]) == 0.0  # outside the reference box
    line = np.stack([np.linspace(0, 1, 101), np.linspace(1, 0, 101)], axis=1)
    pick = spread_evenly(line, 11)
    assert pick.tolist() == list(range(0, 101, 10))
    assert spread_evenly(line[:5], 11).tolist() == [0, 1, 2, 3, 4]
    # Clustered points: still n distinct indices, both ends included.
    clustered = np.stack([np.r_[np.linspace(0, 0.01, 50), [1.0]], np.r_[np.linspace(1, 0.99, 50), [0.0]]], 1)
    pick = spread_evenly(clustered, 5)
    assert len(set(pick.tolist())) == 5 and pick[0] == 0 and pick[-1] == 50


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"population": 4}, "at least 5"),
        ({"population": 6.5}, "population"),
        ({"generations": -1}, "generations"),
        ({"lut_size": 1}, "lut_size"),
        ({"cr": 1.0}, "cr"),
        ({"reference": (1.0, 1.1)}, "reference"),
        ({"uniform_rates": (0.0, 0.7)}, "uniform_rates"),
    ],
)
def test_bad_dse_settings_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(DSEError, match=match):
        DSESettings(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"batches": 0}, "batches"), ({"seeds": ()}, "seed"), ({"seeds": (1, 1)}, "distinct"), ({"lr": -1.0}, "lr")],
)
def test_bad_short_training_settings_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(DSEError, match=match):
        ShortTrainingSettings(**kwargs)


def test_population_of_five_runs_with_pygmo(tmp_path: Path) -> None:
    backend = AnalyticBackend(n_seeds=1)
    model = build_model("femnist_cnn")
    res = run_dse(CachedEvaluator(backend), model, DSESettings(population=5, generations=2), tmp_path, progress=False)
    assert res is not None and res.population_x.shape == (5, 2)


# -- driver: checkpoint/resume, LUT ---------------------------------------------------------------
def _run(tmp: Path, settings: DSESettings, **kwargs):
    model = build_model("femnist_cnn")
    return run_dse(CachedEvaluator(AnalyticBackend()), model, settings, tmp, progress=False, **kwargs)


def test_resume_gives_the_same_front_as_an_uninterrupted_run(tmp_path: Path) -> None:
    settings = DSESettings(population=12, generations=6, seed=7, lut_size=16)
    full = _run(tmp_path / "full", settings)
    assert _run(tmp_path / "cut", settings, stop_after=2) is None
    ckpt = json.loads((tmp_path / "cut" / CHECKPOINT_NAME).read_text())
    assert ckpt["generation"] == 2 and ckpt["rng"]["next_generation"] == 3
    assert not (tmp_path / "cut" / "lut.json").exists()
    # A second interruption, then the rest.
    assert _run(tmp_path / "cut", settings, stop_after=4, resume=True) is None
    resumed = _run(tmp_path / "cut", settings, resume=True)
    np.testing.assert_array_equal(full.population_x, resumed.population_x)
    np.testing.assert_array_equal(full.population_f, resumed.population_f)
    np.testing.assert_array_equal(full.front_vectors, resumed.front_vectors)
    assert (tmp_path / "full" / "lut.json").read_text() == (tmp_path / "cut" / "lut.json").read_text()
    # And a different seed gives a different search.
    other = _run(tmp_path / "other", DSESettings(population=12, generations=6, seed=8, lut_size=16))
    assert not np.array_equal(other.population_x, full.population_x)


def test_checkpoint_refusals(tmp_path: Path) -> None:
    settings = DSESettings(population=6, generations=1, seed=1)
    _run(tmp_path, settings)
    with pytest.raises(DSEError, match="resume"):
        _run(tmp_path, settings)
    with pytest.raises(DSEError, match="other settings"):
        _run(tmp_path, DSESettings(population=8, generations=1, seed=1), resume=True)
    (tmp_path / CHECKPOINT_NAME).write_text("{not json")
    with pytest.raises(DSEError, match="cannot read"):
        _run(tmp_path, settings, resume=True)


def test_lut_from_front_is_valid_sorted_has_zero_and_loads(tmp_path: Path) -> None:
    settings = DSESettings(population=16, generations=8, seed=3, lut_size=10)
    res = _run(tmp_path, settings)
    model = build_model("femnist_cnn")
    lut = LUT.load(res.paths["lut"], model=model)
    assert 2 <= len(lut) <= 10
    assert np.all(np.diff(lut.macs) > 0), "LUT must be sorted by MACs (front points are distinct)"
    np.testing.assert_array_equal(lut.vectors[-1], np.zeros(2))
    assert lut.macs[-1] == count_macs(model)
    assert lut.macs[0] == count_macs(model, [0.5, 0.5])  # the all-0.5 end of the front
    for v, m in zip(lut.vectors, lut.macs):
        assert m == count_macs(model, v)
    # Every LUT vector is non-dominated among all evaluated DSE vectors.
    ev = json.loads(res.paths["evaluations"].read_text())
    dse = [e for e in ev["evaluations"] if e["source"] == "dse"]
    objs = np.array([e["objectives"] for e in dse])
    for f in res.lut.meta["objectives"]:
        assert not np.any(np.all(objs <= f, axis=1) & np.any(objs < f, axis=1))
    # Equal-rate vectors are reported with the same normalisation; the analytic fitness
    # favours later layers, so the DSE front must have the larger hypervolume.
    summary = json.loads(res.paths["summary"].read_text())
    assert len(summary["uniform"]) == 11
    assert summary["hypervolume_dse"] > summary["hypervolume_uniform"] > 0
    assert res.paths["plot"].stat().st_size > 10_000
    # Every evaluation record has all per-seed values and its generation.
    assert all(len(e["dacc"]) == 3 and e["generation"] >= 0 for e in dse)


def test_dominated_all_zero_vector_is_still_in_the_lut(tmp_path: Path) -> None:
    model = build_model("femnist_cnn")
    ev = CachedEvaluator(AnalyticBackend(bonus=0.5))
    res = run_dse(ev, model, DSESettings(population=12, generations=3, seed=2, lut_size=8), tmp_path, progress=False)
    zero = np.zeros(2)
    assert any(np.array_equal(v, zero) for v in res.lut.vectors)
    f_zero = np.array([1.0, 0.0])
    assert np.any(np.all(res.front_objectives[:-1] < f_zero, axis=1)), "test needs a vector dominating all-zero"


# -- real short-training fitness ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_real() -> tuple[ShortTrainingFitness, Snapshot]:
    data = synthetic_data(n_samples=600, num_classes=10, seed=0, distort=default_distort())
    snap = make_snapshot("femnist_cnn", data, steps=40, batch_size=32, lr=0.2, seed=0)
    fit = ShortTrainingFitness(
        "femnist_cnn", snap, data, ShortTrainingSettings(batches=3, batch_size=16, seeds=(0, 1), lr=0.2)
    )
    return fit, snap


def test_short_training_is_deterministic_and_depends_on_counts_only(tiny_real) -> None:
    fit, _ = tiny_real
    v = np.array([0.2, 0.1])
    a = [fit.measure(v, s) for s in range(2)]
    b = [fit.measure(v, s) for s in range(2)]
    assert a == b
    # A copy in "another process" (pickled without its model) gives the same numbers.
    clone = pickle.loads(pickle.dumps(fit))
    assert clone._model is None
    assert [clone.measure(v, s) for s in range(2)] == a
    # Same kept counts -> identical training; the key says so.
    w = np.array([0.19, 0.095])
    assert fit.training_key(v) == fit.training_key(w)
    assert [fit.measure(w, s) for s in range(2)] == a
    # Dropout changes the training.
    assert [fit.measure(np.full(2, 0.5), s) for s in range(2)] != [fit.measure(np.zeros(2), s) for s in range(2)]
    assert fit.macs(np.zeros(2)) == count_macs(build_model("femnist_cnn", num_classes=10)) == 4_002_304


def test_snapshot_save_load_and_refusals(tiny_real, tmp_path: Path) -> None:
    _, snap = tiny_real
    path = snap.save(tmp_path / "snap.pt")
    loaded = Snapshot.load(path, model_name="femnist_cnn", dataset="synthetic", num_classes=10)
    assert loaded.meta == snap.meta
    assert loaded.meta["distorted"] and loaded.meta["steps"] == 40
    for k, v in snap.state_dict.items():
        assert torch.equal(v, loaded.state_dict[k])
    with pytest.raises(SnapshotError, match="does not exist"):
        Snapshot.load(tmp_path / "missing.pt")
    with pytest.raises(SnapshotError, match="model='femnist_cnn'"):
        Snapshot.load(path, model_name="densenet_bc_40")
    with pytest.raises(SnapshotError, match="dataset"):
        Snapshot.load(path, dataset="cifar10")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(SnapshotError, match="cannot read"):
        Snapshot.load(tmp_path / "bad.pt")


def test_real_fitness_resume_equals_uninterrupted(tiny_real, tmp_path: Path) -> None:
    fit, _ = tiny_real
    model = build_model("femnist_cnn", num_classes=10)
    settings = DSESettings(population=6, generations=3, seed=11, lut_size=6, uniform_rates=(0.0, 0.25, 0.5))
    full = run_dse(CachedEvaluator(fit), model, settings, tmp_path / "a", progress=False)
    assert run_dse(CachedEvaluator(fit), model, settings, tmp_path / "b", progress=False, stop_after=1) is None
    fresh = pickle.loads(pickle.dumps(fit))  # a new process would start without the model
    resumed = run_dse(CachedEvaluator(fresh), model, settings, tmp_path / "b", progress=False, resume=True)
    np.testing.assert_array_equal(full.population_x, resumed.population_x)
    np.testing.assert_array_equal(full.front_objectives, resumed.front_objectives)
    assert (tmp_path / "a" / "lut.json").read_text() == (tmp_path / "b" / "lut.json").read_text()
    LUT.load(tmp_path / "a" / "lut.json", model=model)


@pytest.mark.slow
def test_process_pool_matches_in_process(tiny_real) -> None:
    fit, _ = tiny_real
    vecs = np.array([[0.0, 0.0], [0.3, 0.1], [0.5, 0.5]])
    serial = CachedEvaluator(fit).evaluate(vecs)
    with CachedEvaluator(fit, workers=2, threads=1) as pooled:
        par = pooled.evaluate(vecs)
        assert pooled.n_trainings == 3 * 2
    np.testing.assert_array_equal(serial[0], par[0])
    np.testing.assert_array_equal(serial[1], par[1])


# -- the Hydra command ----------------------------------------------------------------------------
def _compose(overrides: list[str]):
    import flwr_distreal.dse.__main__  # noqa: F401  (registers the dse schema)

    return compose_config(*overrides, name="dse_config")


def test_command_quick_preset_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr_distreal.dse.__main__ import run

    monkeypatch.chdir(tmp_path)  # dse.output relative to where the command runs, as a user writes it
    out = tmp_path / "dse"
    base = [
        "dse=quick", "dataset=digits", "dse.output=dse", "dse.population=6", "dse.generations=2",
        "dse.batches=6", "dse.batch_size=32", "dse.lr=0.2", "dse.snapshot.steps=100", "dse.snapshot.lr=0.2",
        "dse.snapshot.batch_size=32", "dse.uniform_rates=[0.0,0.25,0.5]", "dse.max_samples=null",
        "dse.progress=false", "dse.threads=1",
    ]
    # Snapshot required but absent: refused before any work.
    with pytest.raises(SnapshotError, match="task=snapshot"):
        run(_compose(base + ["dse.snapshot.required=true"]))
    info = run(_compose(base + ["task=snapshot"]))
    assert Path(info["snapshot"]).is_file()
    res = run(_compose(base + ["dse.snapshot.required=true"]))
    lut = LUT.load(res["lut"], model=build_model("femnist_cnn", num_classes=10))
    assert np.array_equal(lut.vectors[-1], np.zeros(2))
    for name in ("evaluations.json", "summary.json", "front.png", "checkpoint.json", "snapshot.pt"):
        assert (out / name).is_file(), name
    # The LUT's meta names the snapshot as written, not by this machine's absolute path.
    meta = json.loads(Path(res["lut"]).read_text())["meta"]
    assert meta["snapshot"] == "dse/snapshot.pt" and meta["data_root"] is None
    # Existing run without resume is refused; with resume and more generations it continues.
    with pytest.raises(DSEError, match="resume"):
        run(_compose(base))
    res2 = run(_compose(base + ["resume=true", "dse.generations=3"]))
    assert res2["generations"] == 3


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("dse.population=4", DSEError, "at least 5"),
        ("model.name=resnet_9000", DSEError, "unknown model"),
        ("dse.workers=0", DSEError, "workers"),
        ("dse.uniform_rates=[0.0,0.9]", DSEError, "uniform_rates"),
    ],
)
def test_command_refuses_bad_settings(override: str, error: type, match: str, tmp_path: Path) -> None:
    from flwr_distreal.dse.__main__ import run

    cfg = _compose(["dse=quick", "dataset=digits", f"dse.output={tmp_path}", override])
    with pytest.raises(error, match=match):
        run(cfg)


def _refuse_before_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the command fail loudly if it gets as far as loading data (the checks come first)."""
    import flwr_distreal.dse.__main__ as command

    def loaded(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the DSE command loaded data before refusing a bad setting")

    monkeypatch.setattr(command, "load_dse_data", loaded)


@pytest.mark.parametrize(
    "device, match",
    [
        ("gpu9", r"dse\.device='gpu9' is not a torch device"),
        ("meta", r"dse\.device='meta': a 'meta' device cannot train"),
    ],
)
def test_command_refuses_a_bad_device_at_start_up(
    device: str, match: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr_distreal.dse.__main__ import run

    _refuse_before_data(monkeypatch)
    with pytest.raises(DSEError, match=match):
        run(_compose(["dse=quick", "dataset=digits", f"dse.output={tmp_path}", f"dse.device={device}"]))


def test_command_refuses_cuda_without_a_gpu_and_a_missing_gpu_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr_distreal.dse.__main__ import run

    _refuse_before_data(monkeypatch)
    base = ["dse=quick", "dataset=digits", f"dse.output={tmp_path}"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DSEError, match=r"dse\.device='cuda' but no cuda device is available.*use dse\.device=cpu"):
        run(_compose(base + ["dse.device=cuda"]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DSEError, match=r"dse\.device='cuda:9' but this machine has 1 cuda device\(s\)"):
        run(_compose(base + ["dse.device=cuda:9"]))


def test_command_refuses_a_bad_output_at_start_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr_distreal.run.checks as checks
    from flwr_distreal.dse.__main__ import run

    _refuse_before_data(monkeypatch)
    base = ["dse=quick", "dataset=digits"]
    a_file = tmp_path / "results.txt"
    a_file.write_text("not a folder")
    with pytest.raises(DSEError, match=r"dse\.output=.*results\.txt is an existing file, not a folder"):
        run(_compose(base + [f"dse.output={a_file}"]))
    with pytest.raises(DSEError, match=r"dse\.output=.*results\.txt/dse cannot be created: .*results\.txt is a file"):
        run(_compose(base + [f"dse.output={a_file / 'dse'}"]))
    with pytest.raises(DSEError, match=r"dse\.output=.*results\.txt/dse cannot be created"):
        run(_compose(base + ["task=snapshot", f"dse.output={a_file / 'dse'}"]))  # the default snapshot path
    # a read-only folder (root may write anywhere, so the permission test is simulated there)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        real_access = checks.os.access
        monkeypatch.setattr(checks.os, "access", lambda p, mode: False if Path(p) == locked else real_access(p, mode))
        with pytest.raises(DSEError, match=r"dse\.output=.*locked/new/dse would be created in .*locked, which is not writable"):
            run(_compose(base + [f"dse.output={locked / 'new' / 'dse'}"]))
        with pytest.raises(DSEError, match=r"dse\.output=.*locked is not writable"):
            run(_compose(base + [f"dse.output={locked}"]))
        # a snapshot path of its own: its folder is checked when the snapshot is to be made there
        with pytest.raises(DSEError, match=r"the folder of dse\.snapshot\.path=.*locked is not writable"):
            run(_compose(base + ["task=snapshot", f"dse.output={tmp_path / 'out'}", f"dse.snapshot.path={locked / 's.pt'}"]))
        with pytest.raises(DSEError, match=r"dse\.snapshot\.path=.* is a folder; expected a file name"):
            run(_compose(base + ["task=snapshot", f"dse.output={tmp_path / 'out'}", f"dse.snapshot.path={tmp_path}"]))
    finally:
        locked.chmod(0o700)
    assert not (tmp_path / "out").exists(), "checking creates nothing"


def test_command_schema_rejects_unknown_and_mistyped_keys(tmp_path: Path) -> None:
    from hydra.errors import ConfigCompositionException

    from flwr_distreal.dse.__main__ import run

    with pytest.raises(ConfigCompositionException, match="populaton"):
        _compose(["dse=quick", "dse.populaton=8"])
    with pytest.raises(ConfigCompositionException, match="population"):
        _compose(["dse=quick", "dse.population=many"])
    # The documented command composes the shared model/dataset groups.
    cfg = _compose(["model=femnist_cnn", "dataset=femnist_leaf"])
    assert cfg.model.name == "femnist_cnn" and cfg.dataset.name == "femnist"
    assert cfg.dataset.root == "../shared/data/femnist_leaf" and cfg.dse.population == 64
    assert cfg.dse.output == "results/dse/femnist_cnn_femnist"
    # Forced additions ("+key=value") pass composition but not the typed schema.
    cfg = _compose(["dse=quick", "dataset=digits", f"dse.output={tmp_path}", "+dse.populaton=8"])
    with pytest.raises(Exception, match="populaton"):
        run(cfg)
    # ... also in the shared model and dataset groups.
    for forced in ("+model.nme=femnist_cnn", "+dataset.rooot=/data"):
        cfg = _compose(["dse=quick", "dataset=digits", f"dse.output={tmp_path}", forced])
        with pytest.raises(DSEError, match=forced[1:].split("=")[0].replace(".", r"\.")):
            run(cfg)


def test_femnist_leaf_dse_data_when_present() -> None:
    root = DATA / "femnist_leaf"
    if not root.is_dir():
        pytest.skip("../shared/data/femnist_leaf not present")
    from flwr_distreal.dse.datasets import load_dse_data

    data = load_dse_data("femnist_leaf", root=root, val_fraction=0.2, seed=0)
    assert data.num_classes == 62
    assert data.train_x.shape[1:] == (1, 28, 28)
    assert data.train_x.shape[0] + data.val_x.shape[0] == 14_708
    distorted = data.distort(data.train_x[:8])
    assert distorted.shape == (8, 1, 28, 28) and not torch.equal(distorted, data.train_x[:8])
