"""Tests of the Flower clients (flwr_distreal.flower.legacy.client): DISTREAL's Algorithm 1 and the baselines.

Real femnist_cnn models, real LUTs and resource models; tiny random data so that a fit takes
a fraction of a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from flwr_distreal.flower.legacy.client import BaselineClient, DistrealClient, get_weights, set_weights
from flwr_distreal.core.dropout import kept_count, parameter_masks
from flwr_distreal.core.lut import LUT, LUTError
from flwr_distreal.core.macs import count_macs, macs_of_counts
from flwr_distreal.models import build_model
from flwr_distreal.core.resources import ResourceModel, r_max_for, step_macs
from flwr_distreal.training.schedule import batch_sizes, plan_distreal_round
from flwr_distreal.flower.legacy.strategy import encode_subsets

from conftest import random_images

NUM_SAMPLES = 40
BATCH = 16  # batches of 16, 16, 8
DEVICE = 3
FACTOR = 3.0
T = 1.0


def _loader(num_samples: int = NUM_SAMPLES, batch: int = BATCH, seed: int = 0) -> DataLoader:
    return DataLoader(random_images(num_samples, 62, seed), batch_size=batch, shuffle=False)


def _model(seed: int = 0, name: str = "femnist_cnn"):
    torch.manual_seed(seed)
    return build_model(name)


@pytest.fixture(scope="module")
def full_macs() -> int:
    return count_macs(build_model("femnist_cnn"))


@pytest.fixture(scope="module")
def r_max(full_macs) -> float:
    """Availability at which the full model's round on the device takes exactly T."""
    return r_max_for(sum(step_macs(full_macs, b, FACTOR) for b in batch_sizes(NUM_SAMPLES, BATCH)), T)


def _drop_csv(path: Path, r_max: float, drop_at: float, factor: float) -> Path:
    """A trace file: device DEVICE at r_max until ``drop_at``, then r_max / factor."""
    path.write_text(f"device,time,macs_per_s\n{DEVICE},0,{r_max!r}\n{DEVICE},{drop_at!r},{r_max / factor!r}\n")
    return path


def _record_kept_counts(model) -> list[list[int]]:
    """Kept filters per dropout layer of every training forward of ``model``."""
    seen: list[list[int]] = []
    widths = model.layer_widths

    def hook(module, inputs, output) -> None:
        if module.training:
            seen.append([w if k is None else int(k.numel()) for k, w in zip(module.last_kept_indices(), widths)])

    model.register_forward_hook(hook)
    return seen


def _changed(a: list[np.ndarray], b: list[np.ndarray]) -> list[bool]:
    return [not np.array_equal(x, y) for x, y in zip(a, b)]


# ------------------------------------------------------------------------ DISTREAL


@pytest.mark.parametrize("policy", ["paper", "deadline"])
@pytest.mark.parametrize("level", [0.45, 0.8])
def test_distreal_fit_metrics_are_algorithm1(policy, level, r_max, full_macs) -> None:
    model = _model()
    lut = LUT.uniform(model)
    # a device whose availability is level * r_max for the whole round (range [l, l] * r_max)
    resources = ResourceModel("constant", deadline=T, r_max=level * r_max, variability=1.0, seed=0)
    client = DistrealClient(model, _loader(), DEVICE, lut, resources, policy=policy, lr=0.1)
    kept = _record_kept_counts(model)
    start = get_weights(model)

    weights, num_examples, metrics = client.fit(start, {"server-round": 2})

    sizes = batch_sizes(NUM_SAMPLES, BATCH)
    expected = plan_distreal_round(resources.clock(DEVICE, 2), lut, sizes, policy, FACTOR, stop_at_deadline=True)
    assert metrics["macs"] == expected.macs
    assert metrics["num_batches"] == len(sizes) == len(kept)
    assert num_examples == NUM_SAMPLES
    assert metrics["straggler"] is False
    assert metrics["incomplete"] == 0
    assert metrics["partition-id"] == DEVICE
    # c is the sum of the MACs of the submodels that were really trained, batch by batch,
    # and each of them is a LUT entry
    trained = [macs_of_counts(model, counts) for counts in kept]
    assert metrics["macs"] == sum(trained) == sum(expected.forward_macs)
    assert all(m in set(int(v) for v in lut.macs) for m in trained)
    assert metrics["macs"] < len(sizes) * full_macs  # below r_max something is dropped
    # the dropout rates behind those kept counts
    rates = [float(np.mean(v)) for v in expected.vectors]
    assert metrics["mean_dropout"] == pytest.approx(np.mean(rates))
    assert 0.0 < metrics["mean_dropout"] <= 0.5
    for counts, vector in zip(kept, expected.vectors):
        assert counts == [kept_count(p, w) for p, w in zip(vector, model.layer_widths)]
    # utilisation: training MACs spent / MACs available in [start, deadline]
    spent = sum(step_macs(m, b, FACTOR) for m, b in zip(trained, sizes))
    real = spent / (level * r_max * T)
    assert 0.0 < real <= 1.0
    assert metrics["macs"] / metrics["available_macs"] == pytest.approx(real, rel=1e-9)
    assert metrics["utilisation"] == pytest.approx(real, rel=1e-9)
    assert 0.0 < metrics["sim_time"] <= T
    assert np.isfinite(metrics["train_loss"])
    # the weights moved, with the right shapes
    assert [w.shape for w in weights] == [s.shape for s in start]
    assert all(_changed(weights, start))


def test_distreal_fit_without_resources_trains_the_full_model(full_macs) -> None:
    model = _model()
    client = DistrealClient(model, _loader(), DEVICE, LUT.uniform(model), None)
    kept = _record_kept_counts(model)
    _, _, metrics = client.fit(get_weights(model), {"server-round": 1})
    assert metrics["macs"] == 3 * full_macs
    assert kept == [model.layer_widths] * 3
    assert metrics["mean_dropout"] == 0.0 and metrics["straggler"] is False


def test_distreal_stops_at_the_deadline_after_a_drop(tmp_path, r_max) -> None:
    resources = ResourceModel("trace", deadline=T, trace_path=_drop_csv(tmp_path / "t.csv", r_max, 0.6, 20.0))
    model = _model()
    client = DistrealClient(model, _loader(), DEVICE, LUT.uniform(model), resources, policy="paper")
    kept = _record_kept_counts(model)
    start = get_weights(model)
    weights, num_examples, metrics = client.fit(start, {"server-round": 1})
    assert metrics["straggler"] is False
    assert 0 < metrics["num_batches"] < 3 and metrics["incomplete"] == 3 - metrics["num_batches"]
    assert len(kept) == metrics["num_batches"]
    assert num_examples == BATCH * metrics["num_batches"]
    assert metrics["macs"] == sum(macs_of_counts(model, c) for c in kept)
    assert any(_changed(weights, start))


def test_a_non_finite_loss_is_discarded_and_the_round_timed_to_that_step(r_max, full_macs) -> None:
    """Batch 2 of 3 holds a NaN: the client sends batch 1 (c, examples), train_loss NaN, one
    batch incomplete, and the timing of the two steps the device really ran (the failed one
    included), so macs / available_macs is the utilisation it reports."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(NUM_SAMPLES, 1, 28, 28, generator=g)
    x[BATCH + 3] = float("nan")
    y = torch.randint(0, 62, (NUM_SAMPLES,), generator=g)
    model = _model()
    resources = ResourceModel("constant", deadline=T, r_max=2 * r_max, variability=1.0)
    client = DistrealClient(
        model, DataLoader(TensorDataset(x, y), batch_size=BATCH), DEVICE, LUT.uniform(model), resources, lr=0.1
    )
    _, num_examples, metrics = client.fit(get_weights(model), {"server-round": 1})
    assert metrics["num_batches"] == 1 and num_examples == BATCH and metrics["incomplete"] == 2
    assert metrics["macs"] == full_macs and np.isnan(metrics["train_loss"])
    # at 2 r_max the full model's round takes T / 2; two full steps of 16 of the 40 samples
    assert metrics["sim_time"] == pytest.approx(0.5 * T * 32 / NUM_SAMPLES)
    assert metrics["utilisation"] == pytest.approx(0.5 * 16 / NUM_SAMPLES)
    assert metrics["macs"] / metrics["available_macs"] == pytest.approx(metrics["utilisation"])
    assert metrics["lr"] == 0.1


def test_get_properties_and_get_parameters(r_max) -> None:
    model = _model()
    resources = ResourceModel("constant", deadline=T, r_max=r_max, variability=3.0, seed=1)
    client = DistrealClient(model, _loader(num_samples=37, batch=8), 5, LUT.uniform(model), resources, local_epochs=2)
    assert client.get_properties({}) == {"partition-id": 5, "round-samples": 74}
    params = client.get_parameters({})
    for a, b in zip(params, model.state_dict().values()):
        np.testing.assert_array_equal(a, b.numpy())


# ------------------------------------------------------------------------ baselines


@pytest.mark.parametrize("skip", [True, False])
def test_baseline_straggler_round(tmp_path, r_max, skip) -> None:
    resources = ResourceModel("trace", deadline=T, trace_path=_drop_csv(tmp_path / "t.csv", r_max, 0.5, 2.0))
    model = _model()
    client = BaselineClient(model, _loader(), DEVICE, resources, skip_straggler_training=skip)
    kept = _record_kept_counts(model)
    start = get_weights(model)
    weights, _, metrics = client.fit(start, {"server-round": 1})
    assert metrics["straggler"] is True
    # 0.5 s at r_max do half the round, the other half at r_max / 2 takes 1 s
    assert metrics["sim_time"] == pytest.approx(1.5)
    if skip:  # the server discards the update: no training, weights sent back unchanged
        assert kept == []
        assert not any(_changed(weights, start))
        assert np.isnan(metrics["train_loss"])
    else:
        assert len(kept) == 3 and all(_changed(weights, start))


def test_baseline_unlimited_never_straggles(tmp_path, r_max, full_macs) -> None:
    resources = ResourceModel("trace", deadline=T, trace_path=_drop_csv(tmp_path / "t.csv", r_max, 0.1, 50.0))
    model = _model()
    client = BaselineClient(model, _loader(), DEVICE, resources)
    _, _, limited = client.fit(get_weights(model), {"server-round": 1})
    assert limited["straggler"] is True
    start = get_weights(model)
    weights, num_examples, metrics = client.fit(start, {"server-round": 1, "unlimited": True})
    assert metrics["straggler"] is False and metrics["num_batches"] == 3 and num_examples == NUM_SAMPLES
    assert metrics["macs"] == 3 * full_macs
    assert all(_changed(weights, start))


@pytest.mark.parametrize("conv2_all", [False, True])
def test_baseline_fixed_subsets_trains_only_those_filters(r_max, conv2_all) -> None:
    model = _model(seed=1)
    resources = ResourceModel("constant", deadline=T, r_max=r_max, variability=1.0)
    client = BaselineClient(model, _loader(), DEVICE, resources, lr=0.5)
    kept_log = _record_kept_counts(model)
    conv1 = torch.tensor([0, 3, 4, 9, 10, 17, 20, 21, 25, 31])
    conv2 = None if conv2_all else torch.arange(0, 64, 2)
    kept = [conv1, conv2]
    start = get_weights(model)
    weights, _, metrics = client.fit(start, {"server-round": 1, "fixed-subsets": encode_subsets(kept)})

    counts = [10, 64 if conv2_all else 32]
    assert kept_log == [counts] * 3
    assert metrics["macs"] == 3 * macs_of_counts(model, counts)
    assert metrics["straggler"] is False
    assert metrics["mean_dropout"] == pytest.approx(np.mean([1 - 10 / 32, 1 - counts[1] / 64]))
    masks = parameter_masks(model, kept)
    for (key, mask), new, old in zip(masks.items(), weights, start):
        # entries outside the submodel are exactly unchanged; inside, (almost) all moved
        np.testing.assert_array_equal(new[~mask], old[~mask], err_msg=key)
        assert (new[mask] != old[mask]).mean() > 0.5, key
    assert masks["conv1.weight"].sum() == 10 * masks["conv1.weight"][0].size
    # the fixed subsets do not outlive the round
    assert all(m.fixed_subset is None for m in model.dropout_layers)


def test_baseline_fixed_subsets_straggle_when_resources_drop(tmp_path, r_max) -> None:
    # a half-width submodel needs about a quarter of the full round at r_max; after the drop
    # to r_max / 40 it cannot finish
    resources = ResourceModel("trace", deadline=T, trace_path=_drop_csv(tmp_path / "t.csv", r_max, 0.1, 40.0))
    model = _model()
    client = BaselineClient(model, _loader(), DEVICE, resources)
    kept = [torch.arange(16), torch.arange(32)]
    _, _, metrics = client.fit(get_weights(model), {"server-round": 1, "fixed-subsets": encode_subsets(kept)})
    assert metrics["straggler"] is True


# ------------------------------------------------------------------------ refusals


def test_set_weights_refuses_wrong_count_and_shape() -> None:
    model = _model()
    arrays = get_weights(model)
    with pytest.raises(ValueError, match=r"got 7 arrays for a model with 8 state entries"):
        set_weights(model, arrays[:-1])
    bad = list(arrays)
    bad[2] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match=r"conv2.weight has shape \(3, 3\), expected \(64, 32, 5, 5\)"):
        set_weights(model, bad)
    # nothing was loaded by the refused calls
    for a, b in zip(arrays, get_weights(model)):
        np.testing.assert_array_equal(a, b)
    # a correct set round-trips
    new = [a + 1 for a in arrays]
    set_weights(model, new)
    for a, b in zip(new, get_weights(model)):
        np.testing.assert_array_equal(a, b)


def test_fit_refuses_wrong_parameters() -> None:
    model = _model()
    client = DistrealClient(model, _loader(), DEVICE, LUT.uniform(model), None)
    with pytest.raises(ValueError, match="arrays for a model"):
        client.fit(get_weights(model)[:3], {"server-round": 1})


def test_lut_of_another_model_is_refused_at_construction() -> None:
    model = _model()
    with pytest.raises(LUTError, match="femnist_cnn_small"):
        DistrealClient(model, _loader(), DEVICE, LUT.uniform(build_model("femnist_cnn_small")), None)
    with pytest.raises(LUTError, match="classes"):
        DistrealClient(model, _loader(), DEVICE, LUT.uniform(build_model("femnist_cnn", num_classes=10)), None)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"policy": "fast"}, "unknown selection policy 'fast'"),
        ({"lr": 0.0}, "need lr > 0"),
        ({"lr": -0.1}, "need lr > 0"),
        ({"momentum": -0.9}, "momentum >= 0"),
        ({"weight_decay": -1e-4}, "weight_decay >= 0"),
        ({"local_epochs": 0}, "local_epochs must be >= 1"),
    ],
)
def test_distreal_client_refuses_bad_settings(kwargs, match) -> None:
    model = _model()
    with pytest.raises(ValueError, match=match):
        DistrealClient(model, _loader(), DEVICE, LUT.uniform(model), None, **kwargs)


def test_weights_are_c_ordered_and_round_trip_across_layouts() -> None:
    """A channels-last model sends plain C-ordered arrays, and they load into either layout."""
    torch.manual_seed(0)
    src = build_model("femnist_cnn")  # channels-last by default
    arrays = get_weights(src)
    assert all(a.flags["C_CONTIGUOUS"] for a in arrays)
    dst = build_model("femnist_cnn", channels_last=False)
    set_weights(dst, arrays)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    set_weights(src, get_weights(dst))
    assert src.conv2.weight.is_contiguous(memory_format=torch.channels_last)
