"""FedRolex (Alam et al., NeurIPS 2022) as a method: the rolling window (advances by one
channel per round and wraps), the capacity level from the budget, per-weight averaging
(weighted by examples or uniform), local steps that leave the weights outside the window alone.

Tiny models (a 4/6-filter FEMNIST CNN) and hand-computed indices and arrays.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import tiny_cnn
import torch
from torch.utils.data import DataLoader, TensorDataset

from flwr_distreal.core import contract as C
from flwr_distreal.core.dropout import parameter_masks
from flwr_distreal.methods import ConfigError, get_method
from flwr_distreal.methods.fedrolex import OFFSET_KEY, FedRolexPlanner, FedRolexStrategyConfig, rolling_window
from flwr_distreal.models import build_model
from flwr_distreal.server import HeteroFLPlanner, Reply, RoundBounds, SubmodelCore
from flwr_distreal.training.trainers import BaselineTrainer, get_weights


pytestmark = pytest.mark.usefixtures("one_torch_thread")




# ------------------------------------------------------------------------------- window


def test_window_advances_by_one_per_round_and_wraps() -> None:
    """C = 4, beta = 1/2 (k = 2), FedRolex's roll(arange(4), t)[:2] for t = 0 .. 5: {0, 1},
    {3, 0}, {2, 3}, {1, 2}, then {0, 1} again (period C = 4)."""
    expected = [[0, 1], [0, 3], [2, 3], [1, 2], [0, 1], [0, 3]]
    assert [rolling_window(4, 2, t).tolist() for t in range(6)] == expected
    for t in range(6):  # the reference code's expression
        assert sorted(torch.roll(torch.arange(4), t)[:2].tolist()) == expected[t]


def test_planner_windows_per_group_over_rounds() -> None:
    """The tiny CNN's groups have C = 4 and C = 6; level 2 (beta = 1/2) keeps 2 and 3. Round r
    has offset t = r - 1, the same for every device."""
    planner = FedRolexPlanner(tiny_cnn())
    assert planner.level_counts[1] == [2, 3]
    got = [[k.tolist() for k in planner.kept_for(2, r)] for r in range(1, 8)]
    assert got == [
        [[0, 1], [0, 1, 2]],
        [[0, 3], [0, 1, 5]],
        [[2, 3], [0, 4, 5]],
        [[1, 2], [3, 4, 5]],
        [[0, 1], [2, 3, 4]],
        [[0, 3], [1, 2, 3]],
        [[2, 3], [0, 1, 2]],
    ]
    # nested across levels: level 3 (beta = 1/4: 1 and 2 filters) inside level 2's window
    for r in range(1, 8):
        for narrow, wide in zip(planner.kept_for(3, r), planner.kept_for(2, r)):
            assert set(narrow.tolist()) <= set(wide.tolist())
    assert planner.kept_for(1, 5) == (None, None)


def test_every_channel_is_covered_k_times_in_c_rounds() -> None:
    for channels, kept in ((4, 2), (6, 3), (16, 1), (12, 12)):
        counts = np.zeros(channels, int)
        for t in range(channels):
            counts[rolling_window(channels, kept, t)] += 1
        assert (counts == kept).all()


def test_assign_uses_heterofls_level_rule_and_the_rounds_window() -> None:
    model = tiny_cnn()
    planner = FedRolexPlanner(model)
    heterofl = HeteroFLPlanner(model, shrink=0.5, levels=5)
    assert planner.level_macs == heterofl.level_macs and planner.level_counts == heterofl.level_counts
    for budget in (*planner.level_macs, planner.level_macs[1] + 1, 1.0, 1e18):
        assert planner.level_for_budget(budget) == heterofl.level_for_budget(budget)
    a, config = planner.assign(3, planner.level_macs[1], 4)
    b, _ = planner.assign(9, planner.level_macs[1], 4)
    assert config == {C.WIDTH_LEVEL: 2, C.WIDTH: 0.5, OFFSET_KEY: 3}
    assert [k.tolist() for k in a.kept] == [[1, 2], [3, 4, 5]] == [k.tolist() for k in b.kept]
    assert a.device_id == 3 and a.mask_key is None  # the masks change every round: not cached


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shrink": 0.0}, "shrink"),
        ({"shrink": 1.0}, "shrink"),
        ({"levels": 0}, "levels"),
        ({"levels": 2.5}, "levels"),
        ({"weighting": "mean"}, "weighting"),
    ],
)
def test_planner_refuses_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        FedRolexPlanner(tiny_cnn(), **kwargs)


def test_window_and_kept_for_refuse_bad_arguments() -> None:
    for args, match in (((0, 1, 0), "channels"), ((4, 0, 0), "kept"), ((4, 5, 0), "kept"), ((4, 2, -1), "offset"),
                        ((4, 2, 1.0), "offset"), ((4, True, 0), "kept")):
        with pytest.raises(ValueError, match=match):
            rolling_window(*args)
    planner = FedRolexPlanner(tiny_cnn())
    for level, rnd, match in ((0, 1, "level"), (6, 1, "level"), (1, 0, "server_round"), (1, 1.5, "server_round")):
        with pytest.raises(ValueError, match=match):
            planner.kept_for(level, rnd)


def test_schema_defaults_and_refusals() -> None:
    cfg = FedRolexStrategyConfig()
    assert (cfg.shrink, cfg.levels, cfg.weighting, cfg.inverted_scaling, cfg.static_bn, cfg.aggregation) == (
        0.5, 5, "examples", True, True, "per_weight"
    )
    for kwargs, match in (({"shrink": 1.5}, "strategy.shrink"), ({"levels": 0}, "strategy.levels"),
                          ({"weighting": "mean"}, "strategy.weighting")):
        with pytest.raises(ConfigError, match=match):
            FedRolexStrategyConfig(**kwargs)
    method = get_method("fedrolex")
    assert method.rule == "submodel" and method.planner_options == ("shrink", "levels", "weighting")


# -------------------------------------------------------------------------- aggregation


def _core(weighting: str) -> SubmodelCore:
    planner = FedRolexPlanner(tiny_cnn(), levels=2, weighting=weighting)
    forward = {0: planner.level_macs[1], 1: planner.level_macs[0]}  # A: beta = 1/2, B: full
    return SubmodelCore(
        planner,
        availability_fn=lambda device, t: forward[device] * 3.0 * 10,
        round_duration=1.0,
        bounds=RoundBounds(update_bound=None, claim_bound=None),
    )


@pytest.mark.parametrize(("weighting", "expected"), [("uniform", [3.5, 6, 7, 4.5]), ("examples", [4.25, 6, 7, 6.25])])
def test_per_weight_average_over_the_window_equals_the_hand_computed_example(weighting, expected) -> None:
    """Spec 2.3, round 2 (t = 1): A (beta = 1/2) holds conv1's filters {3, 0} and returns 1 for
    filter 3 and 2 for filter 0; B (full) returns [5, 6, 7, 8]. FedRolex (uniform):
    [(2 + 5)/2, 6, 7, (1 + 8)/2]; by examples (A 100, B 300): [(200 + 1500)/400, 6, 7,
    (100 + 2400)/400]."""
    core = _core(weighting)
    g = get_weights(core.model)
    core.broadcast(2, g)
    configs = core.plan_round(2, {"A": (0, 10), "B": (1, 10)})
    assert configs["A"][C.FIXED_SUBSETS].startswith("[[0,3],")
    keys = core.state_keys
    a, b = [x.copy() for x in g], [x.copy() for x in g]
    a[keys.index("conv1.bias")][:] = [2, -100, -100, 1]  # filters 1-2 lie outside A's window
    b[keys.index("conv1.bias")][:] = [5, 6, 7, 8]
    outcome = core.aggregate(2, [Reply("A", 0, a, 100, {}), Reply("B", 1, b, 300, {})])
    new = dict(zip(keys, outcome.arrays))
    np.testing.assert_allclose(new["conv1.bias"], expected, rtol=1e-6)


# ----------------------------------------------------------------------- local training


@pytest.mark.parametrize("name", ["tiny", "resnet20_small", "densenet_bc_19"])
def test_local_steps_leave_the_weights_outside_the_window_alone(name) -> None:
    model = tiny_cnn() if name == "tiny" else build_model(name, 10)
    n = 6 if name == "tiny" else 2
    data = TensorDataset(torch.randn(n, *model.input_shape), torch.randint(0, model.num_classes, (n,)))
    planner = FedRolexPlanner(model)
    assignment, extra = planner.assign(0, planner.level_macs[1], 3)  # beta = 1/2, offset 2
    config = {C.SERVER_ROUND: 3, C.FIXED_SUBSETS: C.encode_subsets(assignment.kept), **extra}
    trainer = BaselineTrainer(model, DataLoader(data, batch_size=2), 0, None, seed=0)
    before = get_weights(model)
    result = trainer.fit(before, config)
    kept = [None if k is None else torch.as_tensor(k) for k in assignment.kept]
    masks = parameter_masks(model, kept)
    changed_inside = False
    for key, old, new in zip(model.state_dict(), before, result.arrays):
        mask = np.asarray(masks[key])
        np.testing.assert_array_equal(new[~mask], old[~mask], err_msg=key)
        changed_inside |= bool(mask.any() and not np.array_equal(new[mask], old[mask]))
    assert changed_inside
    # the window is not a prefix (offset 2 wraps round): the first group keeps its last filters
    first = assignment.kept[0]
    assert first is not None and first[-1] == model.layer_widths[0] - 1
