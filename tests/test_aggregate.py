"""Tests for flwr_distreal.server.aggregate: Algorithm 2, masked averaging, reply validation."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.server.strategy.aggregate import aggregate as flwr_aggregate
from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg

from flwr_distreal.server import (
    RefusalReason,
    ValidationResult,
    mac_weighted_update,
    masked_average,
    scale_update,
    trimmed_mean_update,
    update_norms,
    validate_arrays,
    validate_reply,
    weighted_average,
    weighted_median_update,
)


def _random_model(rng: np.random.Generator) -> list[np.ndarray]:
    return [
        rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        rng.normal(size=(4,)).astype(np.float32),
        rng.normal(size=(5, 4)).astype(np.float64),
    ]


# ------------------------------------------------------------------ mac_weighted_update


def test_algorithm2_hand_example() -> None:
    g = [np.array([0.0, 10.0]), np.array([[1.0]])]
    a = [np.array([1.0, 14.0]), np.array([[3.0]])]
    b = [np.array([4.0, 6.0]), np.array([[1.0]])]
    out = mac_weighted_update(g, [a, b], [1.0, 3.0])
    # theta = g + (1*(a-g) + 3*(b-g)) / 4
    np.testing.assert_allclose(out[0], [(1 * 1 + 3 * 4) / 4, 10 + (1 * 4 + 3 * -4) / 4])
    np.testing.assert_allclose(out[1], [[1 + (1 * 2 + 3 * 0) / 4]])


def test_zero_mac_client_has_no_influence() -> None:
    g = [np.zeros(3)]
    out = mac_weighted_update(g, [[np.ones(3)], [np.full(3, 100.0)]], [5, 0])
    np.testing.assert_allclose(out[0], np.ones(3))


def test_equal_macs_equals_flwr_fedavg_unweighted() -> None:
    rng = np.random.default_rng(0)
    g = _random_model(rng)
    clients = [_random_model(rng) for _ in range(5)]
    ours = mac_weighted_update(g, clients, [7.5e6] * 5)
    theirs = flwr_aggregate([(c, 10) for c in clients])
    for o, t, ref in zip(ours, theirs, g):
        assert o.dtype == ref.dtype
        np.testing.assert_allclose(o, t, rtol=1e-5, atol=1e-6)


def test_macs_proportional_to_examples_equals_flwr_fedavg_weighted() -> None:
    rng = np.random.default_rng(1)
    g = _random_model(rng)
    clients = [_random_model(rng) for _ in range(4)]
    n_examples = [13, 200, 57, 1]
    ours = mac_weighted_update(g, clients, [n * 4.02e6 for n in n_examples])
    theirs = flwr_aggregate(list(zip(clients, n_examples)))
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(o, t, rtol=1e-5, atol=1e-6)
    # weighted_average is FedAvg with explicit weights
    for o, t in zip(weighted_average(g, clients, n_examples), theirs):
        np.testing.assert_allclose(o, t, rtol=1e-5, atol=1e-6)


def test_integer_buffers_rounded_and_keep_dtype() -> None:
    g = [np.array(10, dtype=np.int64), np.zeros(2, dtype=np.float32)]
    a = [np.array(20, dtype=np.int64), np.ones(2, dtype=np.float32)]
    b = [np.array(15, dtype=np.int64), np.ones(2, dtype=np.float32)]
    out = mac_weighted_update(g, [a, b], [1.0, 2.0])
    # 10 + (1*10 + 2*5) / 3 = 16.67 -> 17
    assert out[0].dtype == np.int64 and out[0].shape == () and int(out[0]) == 17
    assert out[1].dtype == np.float32


@pytest.mark.parametrize(
    ("clients", "macs", "match"),
    [
        ([], [], "at least one client"),
        ([[np.ones(2)]], [1.0, 2.0], "2 MACs values for 1 clients"),
        ([[np.ones(2)]], [-1.0], "non-negative"),
        ([[np.ones(2)]], [math.nan], "finite"),
        ([[np.ones(2)], [np.ones(2)]], [0.0, 0.0], "zero MACs"),
        ([[np.ones(3)]], [1.0], "shape"),
        ([[np.ones(2), np.ones(2)]], [1.0], "2 arrays, expected 1"),
    ],
)
def test_mac_weighted_update_rejects_bad_input(clients, macs, match) -> None:
    with pytest.raises(ValueError, match=match):
        mac_weighted_update([np.zeros(2)], clients, macs)


def test_mac_weighted_update_rejects_non_numeric_global() -> None:
    with pytest.raises(ValueError, match="dtype"):
        mac_weighted_update([np.array(["a"])], [[np.array(["b"])]], [1.0])


# ------------------------------------------------------------------------ masked_average


def test_masked_average_hand_example() -> None:
    g = [np.array([0.0, 0.0, 0.0, 5.0])]
    a = [np.array([2.0, 4.0, 99.0, 99.0])]
    b = [np.array([6.0, 99.0, 8.0, 99.0])]
    ma = [np.array([True, True, False, False])]
    mb = [np.array([True, False, True, False])]
    out = masked_average(g, [a, b], [ma, mb])
    # entry 0: both -> 4; entry 1: a only -> 4; entry 2: b only -> 8; entry 3: nobody -> 5
    np.testing.assert_allclose(out[0], [4.0, 4.0, 8.0, 5.0])
    weighted = masked_average(g, [a, b], [ma, mb], weights=[1.0, 3.0])
    np.testing.assert_allclose(weighted[0], [5.0, 4.0, 8.0, 5.0])


def test_masked_average_untrained_entries_keep_global_exactly() -> None:
    rng = np.random.default_rng(2)
    g = _random_model(rng)
    clients = [_random_model(rng) for _ in range(3)]
    masks = [[rng.random(a.shape) < 0.3 for a in g] for _ in range(3)]
    out = masked_average(g, clients, masks, weights=[1, 2, 3])
    for j, garr in enumerate(g):
        nobody = ~(masks[0][j] | masks[1][j] | masks[2][j])
        assert nobody.any()
        np.testing.assert_array_equal(out[j][nobody], garr[nobody])
        assert out[j].dtype == garr.dtype


def test_masked_average_all_true_masks_equal_fedavg() -> None:
    rng = np.random.default_rng(3)
    g = _random_model(rng)
    clients = [_random_model(rng) for _ in range(3)]
    n = [10, 20, 30]
    masks = [[None, np.ones(g[1].shape, bool), None] for _ in range(3)]
    out = masked_average(g, clients, masks, weights=n)
    for o, t in zip(out, flwr_aggregate(list(zip(clients, n)))):
        np.testing.assert_allclose(o, t, rtol=1e-5, atol=1e-6)


def test_masked_average_rejects_bad_masks() -> None:
    g = [np.zeros(3)]
    with pytest.raises(ValueError, match="shape"):
        masked_average(g, [[np.ones(3)]], [[np.ones(2, bool)]])
    with pytest.raises(ValueError, match="bool"):
        masked_average(g, [[np.ones(3)]], [[np.ones(3)]])
    with pytest.raises(ValueError, match="mask lists"):
        masked_average(g, [[np.ones(3)]], [])
    with pytest.raises(ValueError, match="masks, expected"):
        masked_average(g, [[np.ones(3)]], [[None, None]])
    with pytest.raises(ValueError, match="non-negative"):
        masked_average(g, [[np.ones(3)]], [[None]], weights=[-1.0])


# ---------------------------------------------------------------------------- validation

SHAPES = [(2, 3), (3,)]
KINDS = ["f", "i"]


def _arrays() -> list[np.ndarray]:
    return [np.ones((2, 3), np.float32), np.arange(3, dtype=np.int64)]


def _check(macs: object, num_batches: object = 10, arrays=None, **kw) -> ValidationResult:
    return validate_reply(
        _arrays() if arrays is None else arrays,
        SHAPES,
        macs,
        num_batches,
        full_step_macs=100.0,
        expected_kinds=KINDS,
        **kw,
    )


def test_valid_reply_accepted() -> None:
    res = _check(999)
    assert res.ok and res.reason is None and res.macs == 999.0 and not res.clipped
    assert _check(1000.0).ok  # exactly the maximum is possible
    assert _check(0).ok and _check(0).macs == 0.0
    assert _check(500, num_batches=10.0).ok  # integral float accepted


@pytest.mark.parametrize(
    ("macs", "reason"),
    [
        (None, RefusalReason.MISSING_MACS),
        ("100", RefusalReason.NON_NUMERIC_MACS),
        (b"1", RefusalReason.NON_NUMERIC_MACS),
        (True, RefusalReason.NON_NUMERIC_MACS),
        (math.nan, RefusalReason.NON_FINITE_MACS),
        (math.inf, RefusalReason.NON_FINITE_MACS),
        (-math.inf, RefusalReason.NON_FINITE_MACS),
        (-1, RefusalReason.NEGATIVE_MACS),
        (1000.5, RefusalReason.EXCESS_MACS),
    ],
)
def test_bad_macs_refused(macs: object, reason: RefusalReason) -> None:
    res = _check(macs)
    assert not res.ok
    assert res.reason is reason
    assert res.message
    assert res.macs is None


@pytest.mark.parametrize(
    ("num_batches", "reason"),
    [
        (None, RefusalReason.MISSING_NUM_BATCHES),
        (-1, RefusalReason.INVALID_NUM_BATCHES),
        (2.5, RefusalReason.INVALID_NUM_BATCHES),
        ("10", RefusalReason.INVALID_NUM_BATCHES),
        (math.nan, RefusalReason.INVALID_NUM_BATCHES),
        (False, RefusalReason.INVALID_NUM_BATCHES),
    ],
)
def test_bad_num_batches_refused(num_batches: object, reason: RefusalReason) -> None:
    res = _check(10, num_batches=num_batches)
    assert not res.ok and res.reason is reason


def test_excess_clipped_when_asked() -> None:
    res = _check(5000, on_excess="clip")
    assert res.ok and res.clipped and res.macs == 1000.0
    assert "exceed" in res.message
    zero = _check(1, num_batches=0, on_excess="clip")
    assert zero.ok and zero.macs == 0.0
    assert _check(1, num_batches=0).reason is RefusalReason.EXCESS_MACS


@pytest.mark.parametrize(
    ("arrays", "reason"),
    [
        ([np.ones((2, 3), np.float32)], RefusalReason.WRONG_ARRAY_COUNT),
        (_arrays() + [np.ones(1)], RefusalReason.WRONG_ARRAY_COUNT),
        ([np.ones((3, 2), np.float32), np.arange(3)], RefusalReason.WRONG_SHAPE),
        ([np.ones((2, 3), np.float32), np.arange(4)], RefusalReason.WRONG_SHAPE),
        ([np.ones((2, 3), np.int64), np.arange(3)], RefusalReason.WRONG_DTYPE),
        ([np.ones((2, 3), bool), np.arange(3)], RefusalReason.WRONG_DTYPE),
        ([np.full((2, 3), "x"), np.arange(3)], RefusalReason.WRONG_DTYPE),
        ([np.ones((2, 3)), np.arange(3.0)], RefusalReason.WRONG_DTYPE),
        ([np.full((2, 3), np.nan), np.arange(3)], RefusalReason.NON_FINITE_ARRAYS),
        ([np.array([[1, 2, np.inf]] * 2), np.arange(3)], RefusalReason.NON_FINITE_ARRAYS),
    ],
)
def test_bad_arrays_refused(arrays, reason: RefusalReason) -> None:
    res = _check(10, arrays=arrays)
    assert not res.ok and res.reason is reason
    assert validate_arrays(arrays, SHAPES, KINDS).reason is reason


def test_float64_reply_for_float32_global_accepted() -> None:
    assert _check(10, arrays=[np.ones((2, 3)), np.arange(3, dtype=np.int32)]).ok


def test_caller_errors_raise() -> None:
    with pytest.raises(ValueError, match="full_step_macs"):
        validate_reply(_arrays(), SHAPES, 1, 1, full_step_macs=0)
    with pytest.raises(ValueError, match="full_step_macs"):
        validate_reply(_arrays(), SHAPES, 1, 1, full_step_macs=math.inf)
    with pytest.raises(ValueError, match="on_excess"):
        validate_reply(_arrays(), SHAPES, 1, 1, full_step_macs=10, on_excess="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="expected_kinds"):
        validate_arrays(_arrays(), SHAPES, ["f"])


#: Every module of the server layer (the shared server core of both APIs), and the contract.
SERVER_MODULES = sorted(
    str(p.relative_to(Path(__file__).resolve().parents[1] / "flwr_distreal"))
    for p in (Path(__file__).resolve().parents[1] / "flwr_distreal" / "server").glob("*.py")
)


def test_server_modules_listed() -> None:
    """The parametrized list below is the server package, not a stale copy of it."""
    assert {"server/aggregate.py", "server/validation.py", "server/bounds.py", "server/gate.py"} <= set(SERVER_MODULES)


@pytest.mark.parametrize("module", [*SERVER_MODULES, "core/contract.py"])
def test_core_module_imports_no_flower_or_hydra(module: str) -> None:
    src = Path(__file__).resolve().parents[1] / "flwr_distreal" / module
    tree = ast.parse(src.read_text())
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    assert names, "parsed no imports"
    assert not [n for n in names if n.split(".")[0] in ("flwr", "hydra", "omegaconf")]


def test_server_core_loads_no_flower_at_all() -> None:
    """Not even indirectly: the shared server core runs where Flower is not installed."""
    code = (
        "import sys; import flwr_distreal.server; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'hydra', 'omegaconf')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


# ------------------------------------------------------------- update geometry, robust


def test_update_norms_per_floating_array_in_float64() -> None:
    g = [np.zeros((2, 2), np.float32), np.array(3, np.int64), np.zeros(3, np.float64)]
    c = [np.full((2, 2), 1e30, np.float32), np.array(9, np.int64), np.array([3.0, 4.0, 0.0])]
    norms = update_norms(g, c)
    assert norms.shape == (2,)  # the integer counter is not an update
    assert math.isfinite(norms[0]) and norms[0] == pytest.approx(2e30, rel=1e-6)
    assert norms[1] == pytest.approx(5.0)


def test_scale_update_scales_floating_arrays_only() -> None:
    g = [np.ones(3, np.float32), np.array(2, np.int64)]
    c = [np.array([3.0, 1.0, -1.0], np.float32), np.array(5, np.int64)]
    out = scale_update(g, c, 0.5)
    np.testing.assert_allclose(out[0], [2.0, 1.0, 0.0])
    assert out[0].dtype == np.float32 and out[1] == 5
    assert scale_update(g, c, 1.0)[0] is c[0]  # factor 1: untouched
    with pytest.raises(ValueError, match="factors"):
        scale_update(g, c, [0.5, 0.5])


def test_weighted_median_with_equal_weights_is_flowers_median() -> None:
    rng = np.random.default_rng(3)
    g = _random_model(rng)
    for n in (3, 4, 5):
        clients = [_random_model(rng) for _ in range(n)]
        ours = weighted_median_update(g, clients)
        theirs = aggregate_median([(c, 1) for c in clients])
        for o, t, ref in zip(ours, theirs, g):
            assert o.dtype == ref.dtype
            np.testing.assert_allclose(o, t, rtol=1e-6, atol=1e-7)


def test_weighted_median_follows_the_weight_mass() -> None:
    g = [np.zeros(2)]
    clients = [[np.array([1.0, 10.0])], [np.array([2.0, 20.0])], [np.array([3.0, 30.0])]]
    np.testing.assert_allclose(weighted_median_update(g, clients, [1, 1, 5])[0], [3.0, 30.0])  # > half the MACs
    np.testing.assert_allclose(weighted_median_update(g, clients, [1, 1, 1])[0], [2.0, 20.0])
    np.testing.assert_allclose(weighted_median_update(g, clients, [0, 1, 1])[0], [2.5, 25.0])  # zero weight: no say
    with pytest.raises(ValueError, match="zero weight"):
        weighted_median_update(g, clients, [0, 0, 0])


def test_trimmed_mean_with_equal_weights_is_flowers_trimmed_avg() -> None:
    rng = np.random.default_rng(4)
    g = _random_model(rng)
    clients = [_random_model(rng) for _ in range(10)]
    ours = trimmed_mean_update(g, clients, beta=0.2)
    theirs = aggregate_trimmed_avg([(c, 1) for c in clients], 0.2)
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(o, t, rtol=1e-5, atol=1e-6)


def test_trimmed_mean_trims_by_count_then_weights_by_macs() -> None:
    g = [np.zeros(1)]
    clients = [[np.array([v])] for v in (-100.0, 1.0, 2.0, 4.0, 100.0)]
    # the extremes go whatever their weight; 1, 2, 4 are averaged with weights 1, 1, 2
    out = trimmed_mean_update(g, clients, [50, 1, 1, 2, 50], beta=0.2)
    np.testing.assert_allclose(out[0], [(1 + 2 + 8) / 4])
    np.testing.assert_allclose(trimmed_mean_update(g, clients[:4], [1, 1, 1, 1], beta=0.2)[0], [-93.0 / 4])  # cut 0
    with pytest.raises(ValueError, match="beta"):
        trimmed_mean_update(g, clients, beta=0.5)
