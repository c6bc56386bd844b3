"""FjORD (Horvath et al., NeurIPS 2021) as a method: the round-start p_max, the per-batch width
drawn within it, the nested per-weight aggregation, the trainer's local steps and clock.

Tiny models (a 4/6-filter FEMNIST CNN) and hand-computed arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_cnn
import torch
from torch.utils.data import DataLoader, TensorDataset

from flwr_distreal.core import contract as C
from flwr_distreal.core.macs import macs_of_counts
from flwr_distreal.core.resources import ResourceModel, RoundClock, TraceResources
from flwr_distreal.methods import ConfigError, get_method
from flwr_distreal.methods.fjord import (
    FJORD_WIDTHS,
    WIDTHS_KEY,
    FjORDPlanner,
    FjORDStrategyConfig,
    OrderedDropoutTrainer,
    check_widths,
    parse_widths,
    plan_width_round,
    prefix_counts,
)
from flwr_distreal.models import build_model
from flwr_distreal.server import HeteroFLPlanner, Reply, RoundBounds, SubmodelCore
from flwr_distreal.training.clock import MeasuredClock
from flwr_distreal.training.trainers import get_weights


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _loader(n: int = 40, batch_size: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


class _Resources(ResourceModel):
    """Every device replays one trace; round r runs from (r - 1) * T to r * T."""

    def __init__(self, trace, deadline: float) -> None:
        super().__init__("full", deadline, r_max=1.0)
        self._trace = trace

    def trace(self, device_id, r_max=None):
        return self._trace


# ------------------------------------------------------------------------------- planner


@pytest.mark.parametrize(
    ("widths", "match"),
    [
        ([], "empty"),
        ([0.0, 0.5], r"\(0, 1\]"),
        ([0.5, 1.2], r"\(0, 1\]"),
        ([0.5, float("nan")], r"\(0, 1\]"),
        ([0.5, 0.5], "distinct"),
        ("0.5,1.0", "sequence"),
        ([True, 0.5], r"\(0, 1\]"),
    ],
)
def test_planner_refuses_bad_width_sets(widths, match) -> None:
    with pytest.raises(ValueError, match=match):
        FjORDPlanner(tiny_cnn(), widths=widths)


def test_width_key_parsing_refuses_garbage() -> None:
    assert parse_widths("0.2,0.4") == (0.2, 0.4)
    for bad in ("", "0.2,x", 0.5):
        with pytest.raises(ValueError, match=WIDTHS_KEY):
            parse_widths(bad)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        parse_widths("0.2,1.5")


def test_prefix_counts_are_heterofls_and_fjords_ceil() -> None:
    model = build_model("resnet20", 10)
    heterofl = HeteroFLPlanner(model)
    for p in FJORD_WIDTHS:
        expected = [int(np.ceil(c * p)) for c in model.layer_widths]  # FjORD: int(np.ceil(C * p))
        assert prefix_counts(model.layer_widths, p) == heterofl.counts_for_width(p) == expected


def test_p_max_is_the_widest_width_that_fits_the_budget() -> None:
    planner = FjORDPlanner(tiny_cnn())
    assert planner.level_widths == [1.0, 0.8, 0.6, 0.4, 0.2]
    macs = planner.level_macs
    assert macs == sorted(macs, reverse=True) and len(set(macs)) == 5
    assert planner.p_max_for_budget(macs[0]) == 1.0
    assert planner.p_max_for_budget(macs[0] - 1) == 0.8
    assert planner.p_max_for_budget(macs[2] + 1) == 0.6
    assert planner.p_max_for_budget(macs[4]) == 0.2
    assert planner.p_max_for_budget(macs[4] - 1) == 0.2  # none fits: the narrowest
    assignment, config = planner.assign(7, macs[2], 3)
    assert config == {C.WIDTH_LEVEL: 3, C.WIDTH: 0.6, WIDTHS_KEY: "0.2,0.4,0.6"}
    # the p_max prefix: ceil(0.6 * 4) = 3 of conv1's filters, ceil(0.6 * 6) = 4 of conv2's
    assert [k.tolist() for k in assignment.kept] == [[0, 1, 2], [0, 1, 2, 3]]
    assert assignment.device_id == 7 and assignment.mask_key == "fjord-3"
    full, config = planner.assign(0, 1e18, 1)
    assert full.kept == (None, None) and config[WIDTHS_KEY] == "0.2,0.4,0.6,0.8,1.0"


# ---------------------------------------------------------------------- per-batch widths


def _trainer(widths=FJORD_WIDTHS, resources=None, n: int = 40, seed: int | None = 3) -> OrderedDropoutTrainer:
    return OrderedDropoutTrainer(tiny_cnn(), _loader(n), 0, resources, seed=seed, widths=widths)


def test_every_batch_width_is_within_the_devices_capability_and_varies() -> None:
    model = tiny_cnn()
    planner = FjORDPlanner(model)
    budget = planner.level_macs[2] + 10  # p_max = 0.6
    assignment, extra = planner.assign(0, budget, 4)
    config = {C.SERVER_ROUND: 4, C.FIXED_SUBSETS: C.encode_subsets(assignment.kept), **extra}
    trainer = _trainer()
    plan = trainer.plan(4, config)
    widths = trainer.batch_widths
    assert len(widths) == len(plan.forward_macs) == 20
    assert set(widths) <= {0.2, 0.4, 0.6}
    assert len(set(widths)) == 3  # it varies across batches (20 draws from 3 widths)
    for w, macs in zip(widths, plan.forward_macs):
        assert macs == macs_of_counts(model, prefix_counts(model.layer_widths, w)) <= budget
    assert plan.macs == sum(plan.forward_macs)
    # seeded by (seed, round, device): the same draws again, other draws in another round
    assert _trainer().plan(4, config).forward_macs == plan.forward_macs
    trainer.plan(5, config)
    assert trainer.batch_widths != widths


def test_without_the_width_key_the_device_draws_up_to_width() -> None:
    trainer = _trainer()
    trainer.plan(1, {C.SERVER_ROUND: 1, C.WIDTH: 0.4})
    assert set(trainer.batch_widths) == {0.2, 0.4}
    trainer.plan(1, {C.SERVER_ROUND: 1})
    assert set(trainer.batch_widths) <= set(FJORD_WIDTHS) and max(trainer.batch_widths) == 1.0
    with pytest.raises(ValueError, match="no width"):
        _trainer(widths=[0.5, 1.0]).plan(1, {C.WIDTH: 0.2})
    with pytest.raises(ValueError, match=C.WIDTH):
        trainer.plan(1, {C.WIDTH: 1.5})


def test_fixed_subsets_must_be_the_prefix_of_the_widest_width() -> None:
    trainer = _trainer()
    good = {WIDTHS_KEY: "0.2,0.4", C.FIXED_SUBSETS: C.encode_subsets([np.arange(2), np.arange(3)])}
    trainer.plan(1, good)  # ceil(0.4 * 4) = 2, ceil(0.4 * 6) = 3
    for kept in ([np.arange(3), np.arange(3)], [np.array([1, 2]), np.arange(3)], [None, None]):
        with pytest.raises(ValueError, match="not the ordered-dropout prefix of width 0.4"):
            trainer.plan(1, {**good, C.FIXED_SUBSETS: C.encode_subsets(kept)})


def test_local_steps_train_each_batch_at_its_width_and_leave_the_rest_alone() -> None:
    trainer = _trainer(n=12)
    model = trainer.model
    trained: list[list[int]] = []
    model.register_forward_hook(
        lambda m, i, o: trained.append([c if k is None else len(k) for k, c in zip(m.last_kept_indices(), m.layer_widths)])
        if m.training else None
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = {
        C.SERVER_ROUND: 2, WIDTHS_KEY: "0.2,0.4,0.6", C.WIDTH: 0.6,
        C.FIXED_SUBSETS: C.encode_subsets([np.arange(3), np.arange(4)]),
    }
    result = trainer.fit(get_weights(model), config)
    widths = trainer.batch_widths
    assert trained == [prefix_counts([4, 6], w) for w in widths]
    after = dict(zip(before, result.arrays))
    # conv1 filters 3: outside the p_max = 0.6 prefix (3 of 4): never trained
    np.testing.assert_array_equal(after["conv1.weight"][3:], before["conv1.weight"][3:].numpy())
    np.testing.assert_array_equal(after["conv1.bias"][3:], before["conv1.bias"][3:].numpy())
    np.testing.assert_array_equal(after["conv2.weight"][4:], before["conv2.weight"][4:].numpy())
    np.testing.assert_array_equal(after["conv2.weight"][:, 3:], before["conv2.weight"][:, 3:].numpy())
    assert not np.allclose(after["conv1.weight"][:1], before["conv1.weight"][:1].numpy())  # the narrowest prefix trained
    # the contract's metrics: MACs of the widths actually trained, their mean dropout
    per_batch = [macs_of_counts(model, prefix_counts([4, 6], w)) for w in widths]
    assert result.metrics[C.MACS] == sum(per_batch) and result.metrics[C.NUM_BATCHES] == 6
    expected_dropout = np.mean([np.mean([1 - k / c for k, c in zip(prefix_counts([4, 6], w), [4, 6])]) for w in widths])
    assert result.metrics[C.MEAN_DROPOUT] == pytest.approx(expected_dropout)
    assert result.num_examples == 12 and not result.metrics[C.STRAGGLER]
    assert all(g.fixed_subset is None for g in model.dropout_groups)  # cleared after the round


def test_a_device_whose_resources_drop_mid_round_is_a_straggler() -> None:
    """As every submodel baseline: the widths are fixed at round start, the device trains the
    whole round, and a drop in resources makes it finish late."""
    trainer = _trainer(n=40)
    config = {C.SERVER_ROUND: 1, WIDTHS_KEY: "0.2"}
    narrow = trainer._width(0.2).macs
    per_round = 3.0 * narrow * 40  # the round's step MACs at width 0.2 (20 batches of 2)
    steady = _Resources(TraceResources([0.0], [per_round * 1.01]), deadline=1.0)
    assert not _trainer(resources=steady).plan(1, config).straggler
    dropping = _Resources(TraceResources([0.0, 0.5], [per_round * 1.01, per_round * 0.2]), deadline=1.0)
    plan = _trainer(resources=dropping).plan(1, config)
    assert plan.straggler and len(plan.forward_macs) == 20  # it does not stop at the deadline


def test_on_the_measured_clock_each_batch_trains_its_width() -> None:
    trainer = OrderedDropoutTrainer(
        tiny_cnn(), _loader(12), 0, None, seed=3, clock=MeasuredClock("proportional")
    )
    model = trainer.model
    trained: list[list[int]] = []
    model.register_forward_hook(
        lambda m, i, o: trained.append([c if k is None else len(k) for k, c in zip(m.last_kept_indices(), m.layer_widths)])
        if m.training else None
    )
    config = {C.SERVER_ROUND: 2, C.UNLIMITED: True, WIDTHS_KEY: "0.2,0.4,0.6"}
    result = trainer.fit(get_weights(model), config)
    widths = trainer.batch_widths
    assert len(widths) == 6 and set(widths) <= {0.2, 0.4, 0.6} and len(set(widths)) > 1
    assert trained == [prefix_counts([4, 6], w) for w in widths]
    per_batch = [macs_of_counts(model, prefix_counts([4, 6], w)) for w in widths]
    assert result.metrics[C.MACS] == sum(per_batch)
    # the same draws as on the simulated clock (seeded by seed, round and device)
    assert _trainer(n=12).plan(2, config).forward_macs == per_batch


def test_plan_width_round_advances_the_clock_by_each_batchs_macs() -> None:
    clock = RoundClock(TraceResources([0.0], [1000.0]), 0.0, 10.0)
    plan = plan_width_round(clock, [10, 30], [2, 2], step_macs_factor=3.0)
    assert plan.result.finish_time == pytest.approx((3 * 10 * 2 + 3 * 30 * 2) / 1000.0)
    assert plan.forward_macs == [10, 30] and plan.vectors == [None, None]
    unlimited = plan_width_round(None, [10, 30], [2, 2])
    assert not unlimited.straggler and unlimited.macs == 40
    with pytest.raises(ValueError, match="2 MACs values for 3 mini-batches"):
        plan_width_round(None, [10, 30], [2, 2, 2])


def test_trainer_refuses_a_bad_width_set() -> None:
    with pytest.raises(ValueError, match="distinct"):
        _trainer(widths=[0.5, 0.5])
    assert check_widths([1.0, 0.2]) == (0.2, 1.0)


# ------------------------------------------------------------------------- aggregation


def test_nested_aggregation_equals_the_hand_computed_example() -> None:
    """Spec 1.5: conv1 has C = 4 filters, P = {0.5, 1}. Device A (p_max = 0.5, 100 examples)
    returns conv1.bias [1, 2, ., .]; device B (p_max = 1, 300 examples) returns [5, 6, 7, 8].
    FjORD (strategy.py: fjord_average): [(100*1 + 300*5)/400, (100*2 + 300*6)/400, 7, 8]."""
    planner = FjORDPlanner(tiny_cnn(), widths=[0.5, 1.0])
    budgets = {0: planner.level_macs[1], 1: planner.level_macs[0]}  # A affords 0.5, B the full model
    core = SubmodelCore(
        planner,
        availability_fn=lambda device, t: budgets[device] * 3.0 * 10,  # forward budget = MACs of the level
        round_duration=1.0,
        bounds=RoundBounds(update_bound=None, claim_bound=None),
    )
    g = get_weights(core.model)
    core.broadcast(1, g)
    configs = core.plan_round(1, {"A": (0, 10), "B": (1, 10)})
    assert configs["A"][C.WIDTH] == 0.5 and configs["B"][C.WIDTH] == 1.0
    keys = core.state_keys
    a = [x.copy() for x in g]
    b = [x.copy() for x in g]
    a[keys.index("conv1.bias")][:] = [1, 2, -100, -100]  # entries 2-3 lie outside A's slice: ignored
    b[keys.index("conv1.bias")][:] = [5, 6, 7, 8]
    wa, wb = a[keys.index("conv2.weight")], b[keys.index("conv2.weight")]
    wa[...] = 1.0
    wb[...] = 5.0
    outcome = core.aggregate(1, [Reply("A", 0, a, 100, {}), Reply("B", 1, b, 300, {})])
    new = dict(zip(keys, outcome.arrays))
    np.testing.assert_allclose(new["conv1.bias"], [4.0, 5.0, 7.0, 8.0], rtol=1e-6)
    # conv2 (6 filters, reads conv1's 4): A holds W[:3, :2] (ceil(0.5 * 6) = 3, ceil(0.5 * 4) = 2)
    w = new["conv2.weight"]
    np.testing.assert_allclose(w[:3, :2], 4.0, rtol=1e-6)  # (100 * 1 + 300 * 5) / 400
    np.testing.assert_allclose(w[3:], 5.0)
    np.testing.assert_allclose(w[:, 2:], 5.0)


# --------------------------------------------------------------- every registered model


@pytest.mark.parametrize("name", ["resnet20_small", "densenet_bc_19", "femnist_cnn_small"])
def test_one_local_step_on_residual_and_concat_models(name) -> None:
    model = build_model(name, 10)
    shape = model.input_shape
    data = TensorDataset(torch.randn(2, *shape), torch.randint(0, 10, (2,)))
    planner = FjORDPlanner(model)
    assignment, extra = planner.assign(0, planner.level_macs[3], 1)  # p_max = 0.4
    config = {C.SERVER_ROUND: 1, C.FIXED_SUBSETS: C.encode_subsets(assignment.kept), **extra}
    trainer = OrderedDropoutTrainer(model, DataLoader(data, batch_size=2), 0, None, seed=0)
    before = get_weights(model)
    result = trainer.fit(before, config)
    (width,) = trainer.batch_widths
    assert width in (0.2, 0.4)
    assert result.metrics[C.MACS] == macs_of_counts(model, prefix_counts(model.layer_widths, width))
    masks = core_masks(model, assignment)
    for key, old, new in zip(model.state_dict(), before, result.arrays):
        outside = ~masks[key]
        np.testing.assert_array_equal(new[outside], old[outside], err_msg=key)


def core_masks(model, assignment) -> dict[str, np.ndarray]:
    from flwr_distreal.core.dropout import parameter_masks

    kept = [None if k is None else torch.as_tensor(k) for k in assignment.kept]
    return {k: np.asarray(v) for k, v in parameter_masks(model, kept).items()}


# --------------------------------------------------------------------- schema, registration


def test_schema_defaults_refusals_and_registration() -> None:
    cfg = FjORDStrategyConfig()
    assert (cfg.widths, cfg.inverted_scaling, cfg.static_bn, cfg.aggregation) == (
        list(FJORD_WIDTHS), False, True, "per_weight"
    )
    for widths, match in (([], "empty"), ([0.5, 0.5], "distinct"), ([0.0, 1.0], r"\(0, 1\]")):
        with pytest.raises(ConfigError, match=f"strategy.widths: .*{match}"):
            FjORDStrategyConfig(widths=widths)
    method = get_method("fjord")
    assert method.rule == "submodel" and method.label.startswith("FjORD")
    planner = method.planner(tiny_cnn(), seed=0, widths=[0.5, 1.0])
    assert isinstance(planner, FjORDPlanner) and planner.level_widths == [1.0, 0.5]
    trainer = method.trainer(tiny_cnn(), _loader(4), 0, None, method.client_options_of(cfg), seed=0)
    assert isinstance(trainer, OrderedDropoutTrainer) and trainer.width_set == FJORD_WIDTHS
