"""Layout calibration (``layout: auto``) and the precision switch (``precision: bf16``) (issue 21).

The calibration's timer is replaced by a fake (``measure_layouts``) that forces each answer, so
nothing here depends on the machine's speed. bf16 runs on any CPU (oneDNN emulates it where the
CPU lacks it); the start-up check's CPU probe is monkeypatched where a test needs bf16 accepted
or refused regardless of this CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from flwr_distreal.training import layout as L
from flwr_distreal.core import precision as P
from flwr_distreal.training.loop import DistrealRound
from flwr_distreal.core.lut import LUT
from flwr_distreal.models import build_model
from flwr_distreal.training.trainers import BaselineTrainer, DistrealTrainer, LocalStep, evaluate_model
from flwr_distreal.training.recipe import Recipe
from flwr_distreal.training.wallclock import MeasuredBaselineTrainer, MeasuredDistrealRound, MeasuredDistrealTrainer, StepTimeTable

from conftest import random_images, run_config

BATCH = 8


# ------------------------------------------------------------------------------------ layout


def _fake_measure(answer: str, calls: list):
    """A ``measure_layouts`` whose ``answer`` layout is faster; records its calls."""

    def fake(model_name, batch_size, **kwargs):
        calls.append((model_name, batch_size, kwargs.get("precision")))
        fast, slow = {"full": 0.1, "compact": 0.05}, {"full": 0.1, "compact": 0.08}
        return {"channels_last": fast if answer == "channels_last" else slow, "nchw": fast if answer == "nchw" else slow}

    return fake


@pytest.mark.parametrize("answer", ["channels_last", "nchw"])
def test_calibration_picks_the_faster_layout_and_caches_it(monkeypatch, tmp_path: Path, answer: str) -> None:
    calls: list = []
    monkeypatch.setattr(L, "measure_layouts", _fake_measure(answer, calls))
    cache = tmp_path / "layouts.json"
    assert L.calibrate_layout("femnist_cnn", 32, cache_path=cache) == answer
    assert len(calls) == 1
    data = json.loads(cache.read_text())
    (entry,) = data["entries"]
    assert entry["layout"] == answer and entry["key"] == L.layout_key("femnist_cnn", 32)
    # a cache hit does not time anything, even when the timer would now say otherwise
    other = "nchw" if answer == "channels_last" else "channels_last"
    monkeypatch.setattr(L, "measure_layouts", _fake_measure(other, calls))
    assert L.calibrate_layout("femnist_cnn", 32, cache_path=cache) == answer
    assert len(calls) == 1
    # force: measured again, the entry replaced
    assert L.calibrate_layout("femnist_cnn", 32, cache_path=cache, force=True) == other
    assert len(calls) == 2 and len(json.loads(cache.read_text())["entries"]) == 1


def test_cache_key_holds_model_batch_size_and_precision(monkeypatch, tmp_path: Path) -> None:
    calls: list = []
    monkeypatch.setattr(L, "measure_layouts", _fake_measure("nchw", calls))
    cache = tmp_path / "layouts.json"
    L.calibrate_layout("femnist_cnn", 32, cache_path=cache)
    L.calibrate_layout("femnist_cnn", 64, cache_path=cache)  # another batch size
    L.calibrate_layout("femnist_cnn_small", 32, cache_path=cache)  # another model
    L.calibrate_layout("femnist_cnn", 32, cache_path=cache, precision="bf16")  # another precision
    L.calibrate_layout("femnist_cnn", 64, cache_path=cache)  # hit
    assert calls == [("femnist_cnn", 32, "fp32"), ("femnist_cnn", 64, "fp32"), ("femnist_cnn_small", 32, "fp32"),
                     ("femnist_cnn", 32, "bf16")]
    assert len(json.loads(cache.read_text())["entries"]) == 4
    key = L.layout_key("femnist_cnn", 32)
    assert {"model", "batch_size", "threads", "device", "torch", "host", "cpu", "precision"} <= set(key)


def test_a_broken_cache_is_ignored_and_rewritten(monkeypatch, tmp_path: Path) -> None:
    calls: list = []
    monkeypatch.setattr(L, "measure_layouts", _fake_measure("channels_last", calls))
    cache = tmp_path / "layouts.json"
    cache.write_text("{not json")
    assert L.calibrate_layout("femnist_cnn", 32, cache_path=cache) == "channels_last"
    assert len(calls) == 1 and json.loads(cache.read_text())["format"] == L.CACHE_FORMAT


def test_forced_layouts_time_nothing_and_bad_values_are_refused(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("a forced layout must not be measured")

    monkeypatch.setattr(L, "measure_layouts", boom)
    assert L.resolve_layout("channels_last", "femnist_cnn", 32) == "channels_last"
    assert L.resolve_layout("nchw", "femnist_cnn", 32) == "nchw"
    with pytest.raises(ValueError, match="layout must be one of"):
        L.resolve_layout("nhwc", "femnist_cnn", 32)


def test_measure_layouts_times_four_points_on_real_steps() -> None:
    """Real steps on the smallest model with a clock that ticks 1 s per reading: every (layout,
    kind) gets a positive median, and the time limit stops further repeats."""
    ticks = iter(range(10_000))
    readings: list = []

    def clock() -> float:
        readings.append(float(next(ticks)))
        return readings[-1]

    out = L.measure_layouts("femnist_cnn_small", 4, repeats=3, warmup=0, clock=clock, max_seconds=None)
    assert set(out) == {"channels_last", "nchw"}
    for times in out.values():
        assert set(times) == {"full", "compact"} and all(t > 0 for t in times.values())
    unlimited = len(readings)
    readings.clear()
    L.measure_layouts("femnist_cnn_small", 4, repeats=3, warmup=0, clock=clock, max_seconds=5)
    assert len(readings) < unlimited  # one round of 4 steps takes 8 fake seconds: no second round


def test_model_layout_reads_the_weights() -> None:
    assert L.model_layout(build_model("femnist_cnn_small", channels_last=True)) == "channels_last"
    assert L.model_layout(build_model("femnist_cnn_small", channels_last=False)) == "nchw"


def test_step_time_table_key_holds_precision_and_layout() -> None:
    model = build_model("femnist_cnn_small", channels_last=False)
    lut = LUT.uniform(model, [0.0, 0.5])
    key = StepTimeTable.key(model, lut, 4, "cpu", "bf16")
    assert key["precision"] == "bf16" and key["layout"] == "nchw"
    assert StepTimeTable.key(model.to(memory_format=torch.channels_last), lut, 4)["layout"] == "channels_last"


# ------------------------------------------------------------------------------ the runner


@pytest.fixture
def bf16_ok(monkeypatch):
    """Accept precision=bf16 on this CPU whatever its flags (autocast emulates bf16 where needed)."""
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: True)


def _cfg(*overrides: str):
    return run_config("dataset.num_devices=4", "clients_per_round=2", "batch_size=8", *overrides)


def test_run_config_refuses_bad_layout_and_precision() -> None:
    from flwr_distreal.run.config import ConfigError

    with pytest.raises(ConfigError, match="layout must be one of"):
        _cfg("layout=nhwc")
    with pytest.raises(ConfigError, match="precision must be one of"):
        _cfg("precision=fp8")
    cfg = _cfg()
    assert cfg.layout == "channels_last" and cfg.precision == "fp32"  # fixed: seeded runs reproduce anywhere


def test_experiment_refuses_bf16_on_a_cpu_without_it(monkeypatch) -> None:
    from flwr_distreal.run.experiment import Experiment

    monkeypatch.setattr(P, "cpu_bf16_native", lambda: False)
    with pytest.raises(ValueError, match="avx512_bf16"):
        Experiment(_cfg("precision=bf16", "device=cpu"))


@pytest.mark.parametrize("answer", ["channels_last", "nchw"])
def test_experiment_builds_every_model_in_the_calibrated_layout(monkeypatch, tmp_path: Path, answer: str) -> None:
    from flwr_distreal.run.experiment import Experiment

    calls: list = []
    monkeypatch.setattr(L, "measure_layouts", _fake_measure(answer, calls))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    exp = Experiment(_cfg("layout=auto", "device=cpu"))
    trainer = exp.make_trainer(0)
    assert L.model_layout(trainer.model) == answer
    exp.evaluate(exp.initial_arrays()[1])  # the server's evaluation model
    assert L.model_layout(exp._eval_model) == answer
    assert len(calls) == 1  # once per run (and per machine: the cache)
    assert (tmp_path / "flwr_distreal" / "layouts.json").exists()


def test_a_failed_calibration_warns_and_keeps_channels_last(monkeypatch, tmp_path: Path, caplog) -> None:
    from flwr_distreal.run.experiment import Experiment

    def broken(*a, **k):
        raise RuntimeError("oneDNN exploded")

    monkeypatch.setattr(L, "measure_layouts", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    exp = Experiment(_cfg("layout=auto", "device=cpu"))
    with caplog.at_level("WARNING"):
        model = exp.build_model()
    assert L.model_layout(model) == "channels_last"
    assert "calibration failed (oneDNN exploded)" in caplog.text


@pytest.mark.parametrize("forced", ["channels_last", "nchw"])
def test_experiment_forced_layout(monkeypatch, forced: str) -> None:
    from flwr_distreal.run.experiment import Experiment

    monkeypatch.setattr(L, "measure_layouts", lambda *a, **k: pytest.fail("forced layout measured"))
    exp = Experiment(_cfg(f"layout={forced}", "device=cpu"))
    assert L.model_layout(exp.make_trainer(1).model) == forced


@pytest.mark.parametrize("strategy", ["distreal", "full", "heterofl"])
def test_experiment_passes_precision_to_its_trainers_and_evaluation(bf16_ok, strategy: str) -> None:
    from flwr_distreal.run.experiment import Experiment

    resources = "resources=full" if strategy == "full" else "resources=constant"
    exp = Experiment(_cfg(f"strategy={strategy}", resources, "precision=bf16", "layout=nchw", "device=cpu"))
    trainer = exp.make_trainer(0)
    assert trainer.precision == "bf16"
    assert trainer.local_step(1).precision == "bf16"
    arrays = exp.initial_arrays()[1]
    exp.evaluate(arrays)
    seen = _conv_dtypes(exp._eval_model)
    exp.evaluate(arrays)
    assert seen and set(seen) == {torch.bfloat16}


# -------------------------------------------------------------------------- every trainer


def _conv_dtypes(model) -> list:
    """Records the dtype of the first conv's output at every forward."""
    seen: list = []
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    conv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    return seen


def _loader(n: int = 16) -> DataLoader:
    return DataLoader(random_images(n, 62, 0), batch_size=BATCH, shuffle=False)


def _trainers(precision: str):
    """One of each trainer kind on femnist_cnn_small, unlimited resources."""
    common = dict(recipe=Recipe.constant(0.05, 0.0, 0.0), precision=precision, seed=0)
    out = {}
    for name in ("distreal", "baseline", "measured_distreal", "measured_baseline"):
        torch.manual_seed(0)
        model = build_model("femnist_cnn_small", channels_last=False)
        lut = LUT.uniform(model, [0.0, 0.25, 0.5])
        if name == "distreal":
            out[name] = DistrealTrainer(model, _loader(), 0, lut, None, **common)
        elif name == "baseline":
            out[name] = BaselineTrainer(model, _loader(), 0, None, **common)
        elif name == "measured_distreal":
            out[name] = MeasuredDistrealTrainer(model, _loader(), 0, lut, time_table="proportional", **common)
        else:
            out[name] = MeasuredBaselineTrainer(
                model, _loader(), 0, time_table=StepTimeTable.proportional(LUT.uniform(model), 1, BATCH), **common
            )
    return out


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_reaches_every_trainer_kind(bf16_ok, precision: str) -> None:
    """Inside the training step the conv outputs are bf16 under bf16 (autocast active), float32
    under fp32; parameters, BatchNorm statistics and the reported loss stay float32."""
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    for name, trainer in _trainers(precision).items():
        seen = _conv_dtypes(trainer.model)
        config = {"server-round": 1, "unlimited": True}
        if name.startswith("measured"):
            config["round-deadline"] = 1e6
        result = trainer.fit(trainer.get_weights(), config)
        assert seen, name
        assert set(seen) == {want}, (name, set(seen))
        assert np.isfinite(result.metrics["train_loss"]), name
        assert all(a.dtype == np.float32 for a in result.arrays if a.dtype.kind == "f"), name
        for buf_name, buf in trainer.model.named_buffers():
            if buf.is_floating_point():
                assert buf.dtype == torch.float32, (name, buf_name)


def test_bf16_step_keeps_the_loss_and_bn_statistics_fp32_and_changes_them(bf16_ok) -> None:
    torch.manual_seed(0)
    model = build_model("resnet20_small", channels_last=False)  # femnist_cnn has no BatchNorm
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    step = LocalStep(model, Recipe.constant(0.1, 0.0, 0.0), precision="bf16")
    x, y = random_images(4, 10, 1, shape=(3, 32, 32)).tensors
    loss = step.forward_backward(x, y, None)
    assert loss.dtype == torch.float32
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    step.step()
    assert bn.running_mean.dtype == torch.float32 and not torch.equal(bn.running_mean, before)


def test_evaluate_model_autocasts_and_reports_an_fp32_loss(bf16_ok) -> None:
    torch.manual_seed(0)
    model = build_model("femnist_cnn_small", channels_last=False)
    seen = _conv_dtypes(model)
    batches = [random_images(8, 62, 2).tensors]
    loss32, acc32, n = evaluate_model(model, batches, "cpu")
    loss16, acc16, _ = evaluate_model(model, batches, "cpu", precision="bf16")
    assert seen == [torch.float32, torch.bfloat16] and n == 8
    assert isinstance(loss16, float) and abs(loss16 - loss32) < 0.05 * abs(loss32)


def test_distreal_round_holds_precision_for_a_users_loop(bf16_ok) -> None:
    model = build_model("femnist_cnn_small", channels_last=False)
    lut = LUT.uniform(model, [0.0, 0.5])
    seen = _conv_dtypes(model)
    rnd = DistrealRound(model, lut, None, device_id=0, precision="bf16")
    for x, y in rnd.batches(_loader(8)):
        with rnd.autocast():
            logits = model(x)
        torch.nn.functional.cross_entropy(logits.float(), y).backward()
    assert rnd.precision == "bf16" and seen == [torch.bfloat16]
    wall = MeasuredDistrealRound(model, lut, deadline=1e6, device_id=0, precision="bf16")
    with wall.autocast():
        assert torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")
    with DistrealRound(model, lut, None, device_id=0).autocast():  # fp32: no autocast
        assert not torch.is_autocast_enabled("cpu")


# ------------------------------------------------------------------------- refused values


def test_bad_and_unsupported_precisions_are_refused(monkeypatch) -> None:
    model = build_model("femnist_cnn_small", channels_last=False)
    with pytest.raises(ValueError, match="precision must be one of"):
        P.check_precision("fp8")
    with pytest.raises(ValueError, match="fp16 is CUDA-only"):
        P.check_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="fp16 is CUDA-only"):
        BaselineTrainer(model, _loader(), 0, None, precision="fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        DistrealRound(model, LUT.uniform(model, [0.0]), None, device_id=0, precision="half")
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: False)
    with pytest.raises(ValueError, match="avx512_bf16 or amx_bf16"):
        DistrealTrainer(model, _loader(), 0, LUT.uniform(model, [0.0]), None, precision="bf16")
    monkeypatch.setattr(P, "cpu_bf16_native", lambda: True)
    assert P.check_precision("bf16", "cpu") == "bf16"


def test_cpu_bf16_native_reads_the_cpu_flags(monkeypatch) -> None:
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not P.cpu_bf16_native()
    monkeypatch.setattr(P, "cpu_flags", lambda: frozenset({"avx512f", "amx_bf16"}))
    assert P.cpu_bf16_native() is torch.backends.mkldnn.is_available()


def test_fp16_step_scales_the_loss_with_a_grad_scaler() -> None:
    """The GradScaler path (CUDA's fp16), exercised on CPU autocast: the update equals fp32's
    closely, and the scaler's scale is used."""
    torch.manual_seed(0)
    a = build_model("femnist_cnn_small", channels_last=False)
    b = build_model("femnist_cnn_small", channels_last=False)
    b.load_state_dict(a.state_dict())
    x, y = random_images(8, 62, 3).tensors
    s16 = LocalStep(a, Recipe.constant(0.1, 0.0, 0.0), precision="fp16")
    s32 = LocalStep(b, Recipe.constant(0.1, 0.0, 0.0))
    assert s16.scaler is not None and s32.scaler is None
    s16(x, y, None)
    s32(x, y, None)
    assert s16.scaler.get_scale() > 1
    for (name, p16), p32 in zip(a.named_parameters(), b.parameters()):
        assert p16.dtype == torch.float32
        torch.testing.assert_close(p16, p32, atol=2e-3, rtol=2e-2, msg=name)
