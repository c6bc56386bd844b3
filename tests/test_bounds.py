"""Round-level bounds on updates and claims (server.bounds.RoundBounds, server.rules.DistrealCore limits),
through both APIs: the legacy strategies (FitRes) and the Message-API ones (a fake Grid)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager

from flwr_distreal.core import contract as C
from flwr_distreal.flower import serverapp
from flwr_distreal.flower.legacy import strategy
from flwr_distreal.server import DistrealCore, Reply, RoundBounds, mac_weighted_update, max_batches_for, update_norms

from conftest import FakeGrid, FakeProxy, reply

FULL = 1000.0  # full_macs_per_sample of the toy model
KEYS = ["conv.weight", "fc.weight", "fc.bias", "bn.num_batches_tracked"]
APIS = ["legacy", "message"]


pytestmark = pytest.mark.usefixtures("task_identity")


def _global(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        (0.1 * rng.normal(size=(16, 8, 3, 3))).astype(np.float32),
        (0.1 * rng.normal(size=(10, 64))).astype(np.float32),
        np.zeros(10, np.float32),
        np.array(7, np.int64),
    ]


_DRIFT = [np.random.default_rng(99).normal(size=a.shape) for a in _global()[:3]]


def _honest(g: list[np.ndarray], batches: int, seed: int, step: float = 1e-3) -> list[np.ndarray]:
    """``batches`` SGD-like steps: a drift shared by all clients (grows like ``batches``, the
    worst case for a norm bound) plus noise (grows like ``sqrt(batches)``)."""
    rng = np.random.default_rng(seed)
    out = []
    for j, a in enumerate(g):
        if a.dtype.kind != "f":
            out.append(a + batches)
            continue
        u = step * (batches * _DRIFT[j] + math.sqrt(batches) * rng.normal(size=a.shape))
        out.append((a + u).astype(a.dtype))
    return out


def _scaled(g: list[np.ndarray], arrays: list[np.ndarray], factor: float) -> list[np.ndarray]:
    return [(gg + factor * (a - gg)).astype(a.dtype) if a.dtype.kind == "f" else a for gg, a in zip(g, arrays)]


def _metrics(batches: float, macs: float | None = None, device: int = 0) -> dict[str, object]:
    return {
        C.MACS: float(batches * FULL if macs is None else macs),
        C.NUM_BATCHES: batches,
        C.STRAGGLER: 0,
        C.PARTITION_ID: device,
        C.NUM_EXAMPLES: 10,
    }


Spec = Mapping[int, tuple[list[np.ndarray], Mapping[str, object]]]  # device -> (arrays, metrics)


def _run(
    api: str,
    g: list[np.ndarray],
    spec: Spec,
    *,
    samples: int = 10_000,
    server_round: int = 1,
    strat=None,
    **kwargs,
):
    """One round of DISTREAL through ``api``; returns (new arrays, metrics, strategy)."""
    if api == "message":
        if strat is None:
            kwargs.setdefault("full_macs_per_sample", FULL)
            strat = serverapp.Distreal(min_train_nodes=1, min_available_nodes=1, fraction_train=1.0, **kwargs)
        devices = {100 + d: d for d in spec}

        def trainer(msg: Message) -> Message:
            d = devices[msg.metadata.dst_node_id]
            arrays, metrics = spec[d]
            return reply(msg, dict(zip(KEYS, arrays)), metrics)

        grid = FakeGrid(devices, trainer, samples=samples)
        record = ArrayRecord({k: Array(np.asarray(a)) for k, a in zip(KEYS, g)})
        messages = list(strat.configure_train(server_round, record, ConfigRecord(), grid))
        new, metrics = strat.aggregate_train(server_round, grid.send_and_receive(messages))
        return [v.numpy() for v in new.values()], dict(metrics), strat
    if strat is None:
        kwargs.setdefault("full_macs_per_sample", FULL)
        strat = strategy.Distreal(min_fit_clients=1, min_available_clients=1, fraction_fit=1.0, fraction_evaluate=0.0, **kwargs)
    proxies = {d: FakeProxy(str(100 + d), {C.PARTITION_ID: d, C.ROUND_SAMPLES: samples}) for d in spec}
    manager = SimpleClientManager()
    for p in proxies.values():
        manager.register(p)
    strat.configure_fit(server_round, ndarrays_to_parameters(g), manager)
    results = [
        (proxies[d], FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 10, dict(metrics)))
        for d, (arrays, metrics) in spec.items()
    ]
    params, metrics = strat.aggregate_fit(server_round, results, [])
    return parameters_to_ndarrays(params), metrics, strat


def _assert_equal(out: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> None:
    for o, e in zip(out, expected):
        np.testing.assert_array_equal(o, e)


def _refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused reply" in r.getMessage()]


def _clips(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "clipped reply" in r.getMessage()]


# ------------------------------------------------------------------- honest rounds pass


@pytest.mark.parametrize("api", APIS)
def test_honest_round_with_2_to_40_batches_is_not_refused(api) -> None:
    """Sub-networks that trained 2 and 40 mini-batches move by very different amounts: at the
    default setting none is refused or clipped, and the result is exactly Algorithm 2."""
    g = _global()
    batches = {0: 2, 1: 2, 2: 5, 3: 10, 4: 40, 5: 40}
    spec = {d: (_honest(g, b, seed=d), _metrics(b, b * FULL * (0.9 - 0.1 * d), d)) for d, b in batches.items()}
    norms = [float(np.linalg.norm(update_norms(g, spec[d][0]))) for d in spec]
    assert max(norms) / min(norms) > 10  # the raw norms alone would flag the 40-batch devices
    out, metrics, _ = _run(api, g, spec)
    assert metrics["refused"] == 0 and metrics["clipped"] == 0 and metrics["accepted"] == 6
    _assert_equal(out, mac_weighted_update(g, [spec[d][0] for d in sorted(spec)], [spec[d][1][C.MACS] for d in sorted(spec)]))


@pytest.mark.parametrize("api", APIS)
def test_extreme_skew_clips_claims_but_refuses_nothing(api) -> None:
    """Half the round trained 2 mini-batches, half 40 at a wider sub-network: the 40-batch
    claims are more than 10x the median claim, so they are clipped to it (they keep their
    update, at a bounded weight); nothing is refused. claim_bound=None restores Algorithm 2."""
    g = _global()
    batches = {0: 2, 1: 2, 2: 2, 3: 40, 4: 40}
    spec = {d: (_honest(g, b, seed=d), _metrics(b, b * FULL * (0.3 if b == 2 else 0.9), d)) for d, b in batches.items()}
    _, metrics, _ = _run(api, g, spec)
    assert metrics["refused"] == 0 and metrics["clipped"] == 2 and metrics["accepted"] == 5
    out, metrics, _ = _run(api, g, spec, claim_bound=None)
    assert metrics["refused"] == 0 and metrics["clipped"] == 0
    _assert_equal(out, mac_weighted_update(g, [spec[d][0] for d in sorted(spec)], [spec[d][1][C.MACS] for d in sorted(spec)]))


def _sgd_reply(batches: int, seed: int, state: dict[str, torch.Tensor], dropout: float) -> list[np.ndarray]:
    """Real local SGD on a tiny MLP (with dropout), ``batches`` mini-batches."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(32, 4))
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    w = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(batches):
        x = torch.randn(16, 20)
        loss = torch.nn.functional.cross_entropy(model(x), (x @ w).argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [v.detach().numpy().copy() for v in model.state_dict().values()]


@pytest.fixture()
def _one_thread():
    """Tiny torch steps: one thread (intra-op threads only add contention on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("_one_thread")
@pytest.mark.parametrize("layout", [(2, 2, 40), (40, 40, 2), (2, 6, 40, 40, 3)])
def test_real_sgd_with_different_batches_and_dropout_is_not_refused(layout) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Dropout(0.0), torch.nn.Linear(32, 4))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    g = [v.numpy().copy() for v in state.values()]
    core = DistrealCore(full_macs_per_sample=FULL)
    for server_round in (1, 2):
        core.broadcast(server_round, g)
        replies = [
            Reply(str(d), d, _sgd_reply(b, 10 * server_round + d, state, dropout=0.5 * (d % 2)), 10, _metrics(b, b * FULL * 0.6, d))
            for d, b in enumerate(layout)
        ]
        outcome = core.aggregate(server_round, replies)
        assert outcome.metrics["refused"] == 0 and outcome.metrics["accepted"] == len(layout)
        # a 40-vs-2 claim may be clipped (claim_bound), an update never
        assert not any("outlier-update" in a.clipped for a in outcome.accepted)


# ------------------------------------------------------------------- hostile updates


def _round_with(g, hostile_arrays, hostile_metrics=None, n_honest: int = 5) -> dict:
    spec = {d: (_honest(g, 3 + d, seed=d), _metrics(3 + d, device=d)) for d in range(n_honest)}
    spec[41] = (hostile_arrays, dict(hostile_metrics or _metrics(4, device=41)))
    return spec


@pytest.mark.parametrize("api", APIS)
def test_weights_of_1e30_are_refused(api, caplog) -> None:
    g = _global()
    huge = [np.full_like(a, 1e30) if a.dtype.kind == "f" else a for a in g]
    spec = _round_with(g, huge)
    with caplog.at_level(logging.WARNING):
        out, metrics, _ = _run(api, g, spec)
    assert metrics["refused"] == 1 and metrics["accepted"] == 5
    honest = [d for d in sorted(spec) if d != 41]
    _assert_equal(out, mac_weighted_update(g, [spec[d][0] for d in honest], [spec[d][1][C.MACS] for d in honest]))
    (refusal,) = _refusals(caplog)
    assert "outlier-update" in refusal and "partition-id 41" in refusal


@pytest.mark.parametrize("api", APIS)
def test_weights_of_1e30_are_refused_in_a_round_of_two(api, caplog) -> None:
    """No median in a round of two: the broadcast model's norm is the fallback reference."""
    g = _global()
    huge = [np.full_like(a, 1e30) if a.dtype.kind == "f" else a for a in g]
    spec = {0: (_honest(g, 3, 0), _metrics(3, device=0)), 41: (huge, _metrics(3, device=41))}
    with caplog.at_level(logging.WARNING):
        out, metrics, _ = _run(api, g, spec)
    assert metrics["refused"] == 1 and metrics["accepted"] == 1
    _assert_equal(out, mac_weighted_update(g, [spec[0][0]], [3 * FULL]))
    assert "global model's norm" in _refusals(caplog)[0]


@pytest.mark.parametrize("api", APIS)
def test_update_scaled_50x_is_refused(api, caplog) -> None:
    g = _global()
    scaled = _scaled(g, _honest(g, 4, seed=41), 50.0)
    with caplog.at_level(logging.WARNING):
        out, metrics, _ = _run(api, g, _round_with(g, scaled))
    assert metrics["refused"] == 1 and metrics["accepted"] == 5 and metrics["clipped"] == 0
    assert "outlier-update" in _refusals(caplog)[0] and "round's median" in _refusals(caplog)[0]


@pytest.mark.parametrize("api", APIS)
def test_update_scaled_50x_is_clipped_when_asked(api, caplog) -> None:
    g = _global()
    scaled = _scaled(g, _honest(g, 4, seed=41), 50.0)
    spec = _round_with(g, scaled)
    with caplog.at_level(logging.WARNING):
        out, metrics, strat = _run(api, g, spec, on_outlier="clip")
    assert metrics["refused"] == 0 and metrics["accepted"] == 6 and metrics["clipped"] == 1
    (clip,) = _clips(caplog)
    assert "outlier-update" in clip and "partition-id 41" in clip
    # the clipped update is exactly at the bound: 10 x the median norm per sqrt(batch)
    s = sorted(float(np.linalg.norm(update_norms(g, spec[d][0]))) / math.sqrt(spec[d][1][C.NUM_BATCHES]) for d in spec)
    bound = 10 * float(np.median(s)) * math.sqrt(4)
    factor = bound / float(np.linalg.norm(update_norms(g, scaled)))
    clipped = [
        (gg.astype(np.float64) + factor * (a.astype(np.float64) - gg)).astype(a.dtype) if a.dtype.kind == "f" else a
        for gg, a in zip(g, scaled)
    ]
    order = sorted(spec)
    arrays = [clipped if d == 41 else spec[d][0] for d in order]
    _assert_equal(out, mac_weighted_update(g, arrays, [spec[d][1][C.MACS] for d in order]))


@pytest.mark.parametrize("api", APIS)
def test_update_bound_none_accepts_the_scaled_update(api) -> None:
    g = _global()
    scaled = _scaled(g, _honest(g, 4, seed=41), 50.0)
    _, metrics, _ = _run(api, g, _round_with(g, scaled), update_bound=None)
    assert metrics["refused"] == 0 and metrics["accepted"] == 6


@pytest.mark.parametrize("api", APIS)
def test_tiny_round_compares_against_the_previous_rounds(api, caplog) -> None:
    g = _global()
    _, first, strat = _run(api, g, {d: (_honest(g, 4, d), _metrics(4, device=d)) for d in range(5)})
    assert first["accepted"] == 5
    scaled = _scaled(g, _honest(g, 4, seed=41), 50.0)
    spec = {0: (_honest(g, 4, 7), _metrics(4, device=0)), 41: (scaled, _metrics(4, device=41))}
    with caplog.at_level(logging.WARNING):
        _, metrics, _ = _run(api, g, spec, strat=strat, server_round=2)
    assert metrics["refused"] == 1 and metrics["accepted"] == 1
    assert "recent rounds' median" in _refusals(caplog)[0]


def test_layer_norms_catch_an_attack_on_one_small_array() -> None:
    """Scaling only the classifier bias 40x keeps the whole-model norm within 10x the median;
    the per-array comparison (update_norm="layer") sees it."""
    g = _global()
    base = _honest(g, 4, seed=41)
    sneaky = [a.copy() for a in base]
    sneaky[2] = (g[2] + 40.0 * (base[2] - g[2])).astype(np.float32)
    _, model_mode, _ = _run("message", g, _round_with(g, sneaky))
    assert model_mode["refused"] == 0
    _, layer_mode, _ = _run("message", g, _round_with(g, sneaky), update_norm="layer")
    assert layer_mode["refused"] == 1 and layer_mode["accepted"] == 5
    _, honest, _ = _run("legacy", g, _round_with(g, base), update_norm="layer")
    assert honest["refused"] == 0


# -------------------------------------------------------------------- hostile claims


@pytest.mark.parametrize("api", APIS)
def test_inflated_num_batches_and_macs_refused_by_the_configured_batches(api, caplog) -> None:
    """1e9 mini-batches and 1e9 x full MACs pass the client's own bound (num_batches x full
    MACs); the server's configuration (160 samples, batch size 32, 1 epoch: at most 5) refuses it."""
    g = _global()
    spec = _round_with(g, _honest(g, 4, 41), {**_metrics(1e9, 1e9 * FULL, 41)}, n_honest=3)
    spec = {d: (a, {**m, C.NUM_BATCHES: min(m[C.NUM_BATCHES], 5), C.MACS: min(m[C.MACS], 5 * FULL)} if d != 41 else m) for d, (a, m) in spec.items()}
    with caplog.at_level(logging.WARNING):
        out, metrics, _ = _run(api, g, spec, samples=160, batch_size=32)
    assert metrics["refused"] == 1 and metrics["accepted"] == 3
    (refusal,) = _refusals(caplog)
    assert "excess-batches" in refusal and "partition-id 41" in refusal and "at most 5" in refusal
    honest = [0, 1, 2]
    _assert_equal(out, mac_weighted_update(g, [spec[d][0] for d in honest], [spec[d][1][C.MACS] for d in honest]))


@pytest.mark.parametrize("api", APIS)
def test_inflated_num_batches_clipped_with_on_excess_clip(api) -> None:
    g = _global()
    spec = {d: (_honest(g, 4, d), _metrics(4, device=d)) for d in range(3)}
    spec[41] = (_honest(g, 4, 41), _metrics(1e9, 1e9 * FULL, 41))
    out, metrics, _ = _run(api, g, spec, samples=160, batch_size=32, on_excess="clip", claim_bound=None)
    assert metrics["refused"] == 0 and metrics["clipped"] == 1
    order = sorted(spec)
    _assert_equal(out, mac_weighted_update(g, [spec[d][0] for d in order], [4 * FULL] * 3 + [5 * FULL]))


@pytest.mark.parametrize("api", APIS)
def test_inflated_claim_clipped_to_m_times_the_median(api, caplog) -> None:
    """Without a batch size the server cannot bound num_batches, but no reply outweighs the
    round: its claim is clipped to 10 x the median claim (default), or refused; then its share
    is capped at share_bound / (n + share_bound - 1), 4 x the others' mean (the 10 x median
    alone would leave it 10/14 of the weight; share_bound=None shows that)."""
    g = _global()
    spec = {d: (_honest(g, 4, d), _metrics(4, device=d)) for d in range(4)}
    spec[41] = (_honest(g, 4, 41), _metrics(1e9, 1e9 * FULL, 41))
    with caplog.at_level(logging.WARNING):
        out, metrics, _ = _run(api, g, spec)
    assert metrics["refused"] == 0 and metrics["clipped"] == 1 and metrics["accepted"] == 5
    clips = _clips(caplog)
    assert "outlier-claim" in clips[0] and "partition-id 41" in clips[0]
    assert "excess-share" in clips[1] and "partition-id 41" in clips[1]
    order = sorted(spec)
    _assert_equal(out, mac_weighted_update(g, [spec[d][0] for d in order], [4 * FULL] * 4 + [4 * 4 * FULL]))
    median_only, _, _ = _run(api, g, spec, share_bound=None)
    _assert_equal(median_only, mac_weighted_update(g, [spec[d][0] for d in order], [4 * FULL] * 4 + [10 * 4 * FULL]))
    _, refused, _ = _run(api, g, spec, on_claim_outlier="refuse")
    assert refused["refused"] == 1 and refused["accepted"] == 4


@pytest.mark.parametrize("api", APIS)
def test_max_batches_fn_bounds_per_device(api) -> None:
    g = _global()
    spec = {d: (_honest(g, 3, d), _metrics(3, device=d)) for d in range(3)}
    spec[2] = (spec[2][0], _metrics(4, device=2))
    _, metrics, _ = _run(api, g, spec, max_batches_fn=lambda device: 3)
    assert metrics["refused"] == 1 and metrics["accepted"] == 2


def test_max_batches_for_counts_partial_batches_per_epoch() -> None:
    assert max_batches_for(160, 32) == 5
    assert max_batches_for(161, 32) == 6
    assert max_batches_for(2 * 161, 32, local_epochs=2) == 12  # round-samples covers both epochs
    assert max_batches_for(0, 32) == 0


# ------------------------------------------------------------------ both APIs, robust


def test_both_apis_agree_bit_for_bit_under_attack() -> None:
    g = _global()
    spec = {d: (_honest(g, 2 + d, d), _metrics(2 + d, device=d)) for d in range(5)}
    spec[40] = (_scaled(g, _honest(g, 4, 40), 50.0), _metrics(4, device=40))
    spec[41] = (_honest(g, 4, 41), _metrics(1e9, 1e9 * FULL, 41))
    for kwargs in ({}, {"on_outlier": "clip"}, {"robust": "clip-to-median"}, {"robust": "median"}, {"robust": "trimmed-mean"}):
        a, ma, _ = _run("legacy", g, spec, **kwargs)
        b, mb, _ = _run("message", g, spec, **kwargs)
        _assert_equal(a, b)
        assert ma == mb


def test_clip_to_median_bounds_every_update() -> None:
    g = _global()
    spec = {d: (_honest(g, 4, d, step=1e-3 * (1 + d)), _metrics(4, device=d)) for d in range(5)}
    out, metrics, strat = _run("message", g, spec, robust="clip-to-median")
    assert metrics["refused"] == 0 and metrics["clipped"] == 2  # the two above the median
    s = [float(np.linalg.norm(update_norms(g, spec[d][0]))) for d in sorted(spec)]
    assert float(np.linalg.norm(update_norms(g, out))) <= float(np.median(s)) * (1 + 1e-6)


def test_robust_median_resists_a_coordinated_minority() -> None:
    g = _global()
    spec = {d: (_honest(g, 4, d), _metrics(4, device=d)) for d in range(5)}
    bad = _scaled(g, _honest(g, 4, 40), -8.0)  # within the norm bound (8 < 10), against the drift
    spec.update({40: (bad, _metrics(4, device=40)), 41: (bad, _metrics(4, device=41))})
    plain, m1, _ = _run("message", g, spec)
    robust, m2, _ = _run("message", g, spec, robust="median")
    assert m1["refused"] == m2["refused"] == 0
    honest = mac_weighted_update(g, [spec[d][0] for d in range(5)], [4 * FULL] * 5)

    def dist(a):
        return float(np.linalg.norm(update_norms(honest, a)))

    assert dist(robust) < 0.5 * dist(plain)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"update_bound": 1.0}, "update_bound"),
        ({"claim_bound": 0.5}, "claim_bound"),
        ({"update_bound": math.inf}, "update_bound"),
        ({"on_outlier": "drop"}, "on_outlier"),
        ({"on_claim_outlier": "keep"}, "on_claim_outlier"),
        ({"update_norm": "weights"}, "update_norm"),
        ({"robust": "krum"}, "robust"),
        ({"trim_beta": 0.5}, "trim_beta"),
        ({"batch_size": 0}, "batch_size"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"max_batches_fn": 3}, "max_batches_fn"),
    ],
)
@pytest.mark.parametrize("api", APIS)
def test_constructor_errors(api, kwargs, match) -> None:
    cls = serverapp.Distreal if api == "message" else strategy.Distreal
    with pytest.raises(ValueError, match=match):
        cls(full_macs_per_sample=FULL, **kwargs)


@pytest.mark.parametrize("cls", [serverapp.FederatedDropout, strategy.HeteroFL])
def test_submodel_baselines_refuse_coordinate_wise_robust_rules(cls) -> None:
    kw = {"min_fit_clients": 1, "min_available_clients": 1, "fraction_evaluate": 0.0} if cls is strategy.HeteroFL else {}
    with pytest.raises(ValueError, match="robust"):
        cls(model_name="femnist_cnn", availability_fn=lambda d, t: 1.0, round_duration=1.0, robust="median", **kw)


@pytest.mark.parametrize("cls", [serverapp.SmallNetwork, strategy.FullResources])
def test_fedavg_baselines_bound_updates_too(cls) -> None:
    core = cls(**({"min_fit_clients": 1, "min_available_clients": 1, "fraction_evaluate": 0.0} if cls is strategy.FullResources else {})).core
    g = _global()
    core.broadcast(1, g)
    replies = [Reply(str(d), d, _honest(g, 4, d), 10, {C.PARTITION_ID: d}) for d in range(4)]
    replies.append(Reply("9", 9, _scaled(g, _honest(g, 4, 9), 50.0), 10, {C.PARTITION_ID: 9}))
    outcome = core.aggregate(1, replies)
    assert outcome.metrics["refused"] == 1 and outcome.metrics["accepted"] == 4


def test_round_bounds_repr_and_defaults() -> None:
    b = RoundBounds()
    assert (b.update_bound, b.on_outlier, b.claim_bound, b.on_claim_outlier, b.robust) == (10.0, "refuse", 10.0, "clip", None)
    assert b.share_bound == 4.0
    assert "update_bound=10.0" in repr(b) and "share_bound=4.0" in repr(b)


def test_zero_weight_replies_are_not_screened() -> None:
    """A reply that spent no MACs cannot move the model: it is neither bounded nor counted in
    the medians (a device stopped at the deadline before its first batch)."""
    g = _global()
    core = DistrealCore(full_macs_per_sample=FULL)
    core.broadcast(1, g)
    replies = [Reply(str(d), d, _honest(g, 4, d), 10, _metrics(4, device=d)) for d in range(3)]
    replies.append(Reply("9", 9, _scaled(g, _honest(g, 4, 9), 500.0), 10, _metrics(0, 0.0, 9)))
    outcome = core.aggregate(1, replies)
    assert outcome.metrics["refused"] == 0 and outcome.metrics["accepted"] == 4


def test_node_without_round_samples_is_logged_once(caplog) -> None:
    core = DistrealCore(full_macs_per_sample=FULL, batch_size=32)
    with caplog.at_level(logging.WARNING):
        assert core.limit_round(1, {"a": (0, None), "b": (1, 64)}) == {"b": 2}
        core.limit_round(2, {"a": (0, None)})
    assert sum("no known round-samples" in r.getMessage() for r in caplog.records) == 1

