"""The training recipe (flwr_distreal.training.recipe): the learning-rate schedules, validation, the device
setting, and that one recipe (schedule and gradient clipping) reaches every client kind through
the shared step helper (training.LocalStep).

Small and fast: femnist_cnn_small with 10 classes on random 28x28 tensors; the reference steps
are written by hand with torch's own SGD and ``clip_grad_norm_``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flwr_distreal.core import contract as C
from flwr_distreal.core.lut import LUT
from flwr_distreal.models import build_model
from flwr_distreal.training.recipe import Recipe, resolve_device
from flwr_distreal.training.trainers import BaselineTrainer, DistrealTrainer, LocalStep, get_weights
from flwr_distreal.training.wallclock import MeasuredBaselineTrainer, MeasuredDistrealTrainer

from conftest import random_images, run_config

N, BATCH, CLASSES = 24, 8, 10  # three mini-batches per round


def _data(seed: int = 0, nan_batch: int | None = None) -> TensorDataset:
    data = random_images(N, CLASSES, seed)
    if nan_batch is not None:
        data.tensors[0][nan_batch * BATCH] = math.nan
    return data


def _loader(data: TensorDataset) -> DataLoader:
    return DataLoader(data, batch_size=BATCH, shuffle=False)


def _model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model("femnist_cnn_small", CLASSES)


def _reference(model, data: TensorDataset, lr: float, clip_norm: float | None, steps: int | None = None):
    """Plain full-model SGD by hand: forward, backward, clip_grad_norm_, torch's SGD step."""
    model = copy.deepcopy(model)
    model.train()
    model.set_dropout(None)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i, (x, y) in enumerate(_loader(data)):
        if steps is not None and i == steps:
            break
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        opt.step()
    return get_weights(model)


def _trainer(kind: str, model, data: TensorDataset, recipe: Recipe):
    loader = _loader(data)
    if kind == "distreal":
        return DistrealTrainer(model, loader, 0, LUT.uniform(model), None, recipe=recipe)
    if kind == "baseline":
        return BaselineTrainer(model, loader, 0, None, recipe=recipe)
    if kind == "measured-distreal":
        return MeasuredDistrealTrainer(model, loader, 0, LUT.uniform(model), time_table="proportional", recipe=recipe)
    return MeasuredBaselineTrainer(model, loader, 0, recipe=recipe)


KINDS = ["distreal", "baseline", "measured-distreal", "measured-baseline"]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.allclose(u, v, rtol=0, atol=1e-6) for u, v in zip(a, b))


# -- the schedules -------------------------------------------------------------------------------


def test_constant_schedule() -> None:
    r = Recipe(lr=0.3, total_rounds=10)
    assert [r.lr_at(t) for t in (1, 5, 10, 11)] == [0.3, 0.3, 0.3, 0.3]


def test_cosine_schedule_by_hand() -> None:
    r = Recipe(lr=0.1, schedule="cosine", lr_min=0.02, total_rounds=5)
    # lr_min + (lr - lr_min) * (1 + cos(pi * (t - 1) / 4)) / 2
    expected = [0.1, 0.02 + 0.08 * (1 + math.sqrt(0.5)) / 2, 0.06, 0.02 + 0.08 * (1 - math.sqrt(0.5)) / 2, 0.02]
    assert [r.lr_at(t) for t in range(1, 6)] == pytest.approx(expected, rel=1e-12)
    assert r.lr_at(7) == pytest.approx(0.02)  # after the last round: lr_min
    assert Recipe(lr=0.1, schedule="cosine", total_rounds=1).lr_at(1) == 0.1  # one round: lr


def test_step_schedule_by_hand() -> None:
    r = Recipe(lr=0.2, schedule="step", step_rounds=3, gamma=0.5, total_rounds=10)
    assert [r.lr_at(t) for t in range(1, 8)] == pytest.approx([0.2, 0.2, 0.2, 0.1, 0.1, 0.1, 0.05])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"lr": math.nan}, "lr must be a finite number"),
        ({"momentum": -0.1}, "momentum must be >= 0"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0"),
        ({"clip_norm": 0.0}, "clip_norm must be > 0"),
        ({"clip_norm": "1"}, "clip_norm must be a finite number"),
        ({"schedule": "linear"}, r"schedule must be one of \['constant', 'cosine', 'step'\]"),
        ({"lr_min": 0.5}, r"lr_min must be in \[0, lr=0.1\]"),  # Recipe()'s lr: the run config's
        ({"step_rounds": 0}, "step_rounds must be >= 1"),
        ({"step_rounds": 2.5}, "step_rounds must be an integer"),
        ({"gamma": 0.0}, r"gamma must be in \(0, 1\]"),
        ({"gamma": 1.5}, r"gamma must be in \(0, 1\]"),
        ({"total_rounds": 0}, "total_rounds must be >= 1"),
    ],
)
def test_bad_recipe_names_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        Recipe(**kwargs)


def test_lr_at_refuses_round_zero() -> None:
    with pytest.raises(ValueError, match="server_round must be >= 1"):
        Recipe().lr_at(0)


def _cfg_ns(**over):
    base = dict(
        lr=0.2, momentum=0.9, weight_decay=1e-4, clip_norm=1.0, lr_schedule="cosine", lr_min=0.01,
        lr_step_rounds=5, lr_gamma=0.5, rounds=20,
    )
    return SimpleNamespace(**{**base, **over})


def test_from_config_maps_every_key() -> None:
    r = Recipe.from_config(_cfg_ns())
    assert r == Recipe(
        lr=0.2, momentum=0.9, weight_decay=1e-4, clip_norm=1.0, schedule="cosine", lr_min=0.01,
        step_rounds=5, gamma=0.5, total_rounds=20,
    )
    with pytest.raises(ValueError, match="lr_schedule must be one of"):  # the config key, not the field
        Recipe.from_config(_cfg_ns(lr_schedule="exp"))
    with pytest.raises(ValueError, match="lr_gamma must be in"):
        Recipe.from_config(_cfg_ns(lr_gamma=2.0))
    cfg = _cfg_ns()
    del cfg.lr_min
    with pytest.raises(ValueError, match="has no 'lr_min'"):
        Recipe.from_config(cfg)


# -- the device setting --------------------------------------------------------------------------


def test_resolve_device(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"device=cuda but no CUDA device is visible \(use device=auto or cpu\)"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda") == "cuda"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only default")
def test_auto_is_cpu_here() -> None:
    assert resolve_device("auto") == "cpu"


# -- the step: clipping and the round's lr -------------------------------------------------------


def test_local_step_clips_a_dropout_step_like_clip_grad_norm() -> None:
    """A DISTREAL step (random filters under a vector, same seed) equals forward, backward,
    clip_grad_norm_, SGD by hand; without clip_norm it is the unclipped step."""
    model = _model()
    vector = LUT.uniform(model).vectors[-1]  # rate 0.5 in both layers
    x, y = _data().tensors[0][:BATCH], _data().tensors[1][:BATCH]

    def by_hand(clip: float | None):
        m = copy.deepcopy(model)
        m.train()
        m.seed_dropout(7)
        m.set_dropout(vector)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        norm = float(torch.nn.utils.clip_grad_norm_(m.parameters(), clip if clip is not None else math.inf))
        opt.step()
        return get_weights(m), norm

    def with_step(clip: float | None):
        m = copy.deepcopy(model)
        m.train()
        m.seed_dropout(7)
        step = LocalStep(m, Recipe(lr=0.1, clip_norm=clip))
        loss = step(x, y, vector)
        assert math.isfinite(loss)
        return get_weights(m), step.last_grad_norm

    ref_clipped, norm = by_hand(0.05)
    ref_free, _ = by_hand(None)
    assert norm > 0.05  # the clip is active: the two references differ
    assert not _same(ref_clipped, ref_free)
    got, got_norm = with_step(0.05)
    assert _same(got, ref_clipped)
    assert got_norm == pytest.approx(norm)
    got_free, no_norm = with_step(None)
    assert _same(got_free, ref_free) and no_norm is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("clip", [None, 0.05])
def test_schedule_and_clipping_reach_every_client_kind(kind, clip) -> None:
    """Round 3 of a step schedule (lr 0.2 halved every 2 rounds: 0.1) with and without clipping:
    every trainer kind reports lr 0.1 and trains exactly the hand-made reference."""
    model, data = _model(), _data()
    recipe = Recipe(lr=0.2, schedule="step", step_rounds=2, gamma=0.5, clip_norm=clip, total_rounds=5)
    trainer = _trainer(kind, copy.deepcopy(model), data, recipe)
    res = trainer.fit(get_weights(model), {C.SERVER_ROUND: 3, C.UNLIMITED: True})
    assert res.metrics[C.LR] == pytest.approx(0.1)
    assert res.metrics[C.NUM_BATCHES] == N // BATCH
    assert _same(res.arrays, _reference(model, data, lr=0.1, clip_norm=clip))
    assert not _same(res.arrays, _reference(model, data, lr=0.2, clip_norm=clip))  # the schedule mattered
    if clip is not None:
        assert not _same(res.arrays, _reference(model, data, lr=0.1, clip_norm=None))  # and the clip


def test_trainer_keeps_the_old_keyword_arguments() -> None:
    model = _model()
    t = BaselineTrainer(model, _loader(_data()), 0, None, lr=0.3, momentum=0.5)
    assert t.recipe == Recipe.constant(lr=0.3, momentum=0.5) and t.lr == 0.3
    with pytest.raises(ValueError, match="not both"):
        BaselineTrainer(model, _loader(_data()), 0, None, recipe=Recipe(), lr=0.3)


@pytest.mark.parametrize("kind", ["distreal", "measured-baseline"])
def test_a_non_finite_loss_stops_the_round(kind) -> None:
    """Batch 2 holds a NaN: training stops there, the two steps before it are kept (finite
    weights equal to two hand-made steps), train_loss is NaN and the rest is incomplete."""
    model, data = _model(), _data(nan_batch=2)
    trainer = _trainer(kind, copy.deepcopy(model), data, Recipe(lr=0.1, clip_norm=None))
    res = trainer.fit(get_weights(model), {C.SERVER_ROUND: 1, C.UNLIMITED: True})
    assert math.isnan(res.metrics[C.TRAIN_LOSS])
    assert res.metrics[C.NUM_BATCHES] == 2 and res.num_examples == 2 * BATCH
    assert all(np.isfinite(a).all() for a in res.arrays)
    assert _same(res.arrays, _reference(model, data, lr=0.1, clip_norm=None, steps=2))
    if kind == "distreal":
        assert res.metrics[C.INCOMPLETE] == 1
        assert res.metrics[C.MACS] == 2 * trainer.plan(1, {C.UNLIMITED: True}).forward_macs[0]


# -- the experiment passes recipe and device -----------------------------------------------------


def test_experiment_trains_with_the_run_recipe_on_the_resolved_device(monkeypatch) -> None:
    from flwr_distreal.run.experiment import Experiment

    cfg = run_config(
        "dataset.num_devices=4", "clients_per_round=2", "lr=0.2", "clip_norm=1.0", "lr_schedule=step",
        "lr_step_rounds=2", "lr_gamma=0.5", "rounds=6", "device=auto", "lut=uniform",
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    exp = Experiment(cfg)
    trainer = exp.make_trainer(0)
    assert trainer.recipe == Recipe.from_config(cfg) and trainer.recipe.clip_norm == 1.0
    assert trainer.torch_device == "cpu"
    loss, acc, n = exp.evaluate(trainer.get_weights())
    assert exp._eval_device == "cpu" and n > 0 and math.isfinite(loss)
    exp.cfg = dataclasses.replace(cfg, device="cuda")
    with pytest.raises(ValueError, match="device=cuda"):
        exp.make_trainer(0)
