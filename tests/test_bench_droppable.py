"""Smoke test of scripts/bench_droppable.py: it runs end to end on two small models and its
MAC checks and table are what they claim (no timing is asserted)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_droppable.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_droppable", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_smoke_two_models(bench, tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "bench.json"
    try:
        result = bench.main([
            "--models", "femnist_cnn,seq_cnn", "--reps", "1", "--warmup", "0", "--batch", "4",
            "--threads", "1", "--json", str(out),
        ])
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "torch.set_num_threads(1)" in printed
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["femnist_cnn", "seq_cnn"]
    assert rows["femnist_cnn"]["groups"] == 2 and rows["seq_cnn"]["groups"] == 3
    # The FEMNIST CNN's MACs are the paper's 4,015,616; at rate 0.5 it keeps 16 and 32 filters.
    assert rows["femnist_cnn"]["macs_full"] == 4_015_616
    assert rows["femnist_cnn"]["kept_counts_at_0.5"] == [16, 32]
    for r in rows.values():
        assert r["macs_ok"], r["flop_counter_macs"]
        assert r["flop_counter_macs"]["narrow_0.5"] == r["macs_at_0.5"] < r["macs_full"]
        assert all(len(t) == 1 and t[0] > 0 for t in r["times_s"].values())
        assert r["compact_vs_narrow"] == pytest.approx(r["median_s"]["compact"] / r["median_s"]["narrow"])
        assert r["make_droppable_s"] > 0
    assert rows["femnist_cnn"]["switch_pool"].startswith("learned LUT")
    assert rows["seq_cnn"]["switch_pool"].startswith("random")
    table = result["table_markdown"].splitlines()
    assert len(table) == 4 and table[2].startswith("| femnist_cnn | 2 | 4.02 | 1.20 | ok |")
    assert table[0].count("|") == table[2].count("|")
    assert json.loads(out.read_text())["rows"][1]["model"] == "seq_cnn"


def test_bad_model_name_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "femnist_cnn,nope"])
