"""The audit trail of a run (issue 20, item 8): which LUT it used, by SHA-256 (``run.json`` and
the summary line), and which devices were drawn each round (``draws.csv``).

The fast tests run the main job's setting (``+experiment=main_digits``) for 2 rounds in the
in-process runtime, 4 clients per round: every method draws the same devices for one seed. That
``flwr run`` and the legacy runtime log the same draws and LUT hash as the in-process run is
checked in ``test_simulation.py::test_message_api_run_end_to_end_equals_legacy`` (which runs all
three anyway).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from flwr_distreal.run.config import RunConfig, register_configs, to_run_config
from flwr_distreal.run.experiment import (
    CANONICAL_LUT,
    DRAWS_FILE,
    RUN_RECORD_FILE,
    Experiment,
    MetricsRecorder,
    RunDirectoryError,
    summary_line,
    write_run_record,
)
from flwr_distreal.core.lut import SHIPPED_DIR, LUT
from flwr_distreal.run.runtimes import run_experiment
from flwr_distreal.server import sample_size, seeded_draw
from flwr_distreal.cli.tune import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["distreal", "feddropout", "heterofl", "full", "small"]
SETTING = ["+experiment=main_digits", "rounds=2", "clients_per_round=4", "torch_threads=1", "plot=false"]

register_configs()
register_resolvers()


def _config(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return to_run_config(compose(config_name="config", overrides=[*SETTING, *overrides]))


def _draws(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / DRAWS_FILE).open(newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == MetricsRecorder.DRAW_FIELDS
        return list(reader)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each method for 2 rounds, seed 0, in process; the run directories by method."""
    root = tmp_path_factory.mktemp("audit")
    out = {}
    for method in METHODS:
        cfg = _config(f"method={method}", "seed=0")
        assert cfg.runtime == "inprocess"
        run_experiment(cfg, root / method, show_rounds=False)
        out[method] = root / method
    return out


def test_every_method_draws_the_same_devices_for_one_seed(runs: dict[str, Path]) -> None:
    draws = {method: _draws(path) for method, path in runs.items()}
    assert all(d == draws["distreal"] for d in draws.values()), draws
    # what was drawn is the seeded draw over the 20 devices, 4 per round, sorted
    cfg = _config("seed=0")
    rng = random.Random(cfg.seed)
    k = sample_size(20, cfg.clients_per_round / 20, cfg.clients_per_round)
    expected = [sorted(seeded_draw(rng, {d: d for d in range(20)}, k)) for _ in range(cfg.rounds)]
    logged = [[int(x) for x in row["train_devices"].split()] for row in draws["distreal"]]
    assert [int(row["round"]) for row in draws["distreal"]] == [1, 2]
    assert logged == expected and logged[0] != logged[1]
    assert all(row["evaluate_devices"] == "" for row in draws["distreal"])  # server-side evaluation only
    # the rounds of draws.csv are the rounds of metrics.csv
    with (runs["heterofl"] / "metrics.csv").open(newline="") as f:
        assert [r["round"] for r in csv.DictReader(f)] == [r["round"] for r in draws["heterofl"]]


def test_the_lut_sha256_is_recorded_and_is_the_files(runs: dict[str, Path]) -> None:
    record = json.loads((runs["distreal"] / RUN_RECORD_FILE).read_text())
    shipped = SHIPPED_DIR / "femnist_cnn.json"
    assert record["lut"] == "learned" and Path(record["lut_file"]) == shipped
    assert record["lut_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert record["lut_sha256_of"] == "file" and record["seed"] == 0 and record["runtime"] == "inprocess"
    baseline = json.loads((runs["full"] / RUN_RECORD_FILE).read_text())
    assert baseline["lut"] is None and baseline["lut_sha256"] is None  # a baseline uses no LUT
    cfg = _config("method=distreal")
    rows = [{"round": 1, "accuracy": 0.5}]
    assert f"sha256 {record['lut_sha256'][:16]}" in summary_line(cfg, rows, runs["distreal"])
    assert "sha256" not in summary_line(cfg, rows)


def test_a_lut_file_is_hashed_by_its_bytes_and_a_generated_lut_by_its_canonical_json(tmp_path: Path) -> None:
    uniform = Experiment(_config("method=distreal_uniform"))
    record = uniform.lut_record
    canonical = json.dumps(uniform.lut.to_dict(), sort_keys=True, separators=(",", ":")).encode()
    assert record["lut"] == "uniform" and record["lut_file"] is None and record["lut_sha256_of"] == CANONICAL_LUT
    assert record["lut_sha256"] == record["lut_content_sha256"] == hashlib.sha256(canonical).hexdigest()
    path = uniform.lut.save(tmp_path / "my_lut.json")
    from_file = Experiment(_config("method=distreal", f"lut={path}", "lr=0.1")).lut_record
    assert from_file["lut_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and from_file["lut_sha256_of"] == "file"
    assert from_file["lut_content_sha256"] == record["lut_content_sha256"]  # the same LUT, read back
    LUT.uniform(uniform.build_model(), [0.0, 0.5]).save(path)  # rewritten in place: another hash
    assert Experiment(_config("method=distreal", f"lut={path}", "lr=0.1")).lut_record["lut_sha256"] != from_file["lut_sha256"]


def test_a_resume_keeps_the_draws_and_appends_and_refuses_another_lut(runs: dict[str, Path], tmp_path: Path) -> None:
    """Round 1, then resume=true to round 2: draws.csv equals the uninterrupted run's; run.json
    keeps its record and notes the resume; a resume whose LUT file changed is refused."""
    out = tmp_path / "resumed"
    run_experiment(_config("method=distreal", "rounds=1"), out, show_rounds=False)
    assert [r["round"] for r in _draws(out)] == ["1"]
    run_experiment(_config("method=distreal", "resume=true"), out, show_rounds=False)
    assert _draws(out) == _draws(runs["distreal"])
    record = json.loads((out / RUN_RECORD_FILE).read_text())
    assert record["resumed"] == [{"after_round": 1, "runtime": "inprocess"}]
    before = (out / RUN_RECORD_FILE).read_text()
    other = {**record, "lut_sha256": "0" * 64}
    with pytest.raises(RunDirectoryError, match=r"LUT differs .* sha256 0000"):
        write_run_record(out, _config("method=distreal"), other, resumed_after=2)
    assert (out / RUN_RECORD_FILE).read_text() == before  # nothing was changed


def test_a_resumed_recorder_keeps_the_draws_of_the_rounds_it_resumes_after(tmp_path: Path) -> None:
    """A round drawn after the last checkpoint is dropped from draws.csv (it is drawn again)."""
    path = tmp_path / "metrics.csv"
    recorder = MetricsRecorder(path, 1.0)
    for rnd, devices in ((1, [3, 1]), (2, [2, 5]), (3, [0, 4])):
        recorder.on_draw(rnd, "train", sorted(devices))
        recorder.on_draw(rnd, "evaluate", [7])
        recorder.on_evaluate(rnd, 1.0, {"accuracy": 0.5})
    assert [r["train_devices"] for r in _draws(tmp_path)] == ["1 3", "2 5", "0 4"]
    resumed = MetricsRecorder(path, 1.0, recorder.rows[:2])  # the checkpoint holds 2 rounds
    assert [r["round"] for r in _draws(tmp_path)] == ["1", "2"]
    resumed.on_draw(3, "train", [0, 4])
    resumed.on_evaluate(3, 1.0, {"accuracy": 0.5})
    assert [(r["round"], r["train_devices"], r["evaluate_devices"]) for r in _draws(tmp_path)] == [
        ("1", "1 3", "7"), ("2", "2 5", "7"), ("3", "0 4", ""),
    ]
    with pytest.raises(ValueError, match="phase"):
        resumed.on_draw(4, "fit", [1])


