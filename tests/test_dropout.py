"""Structured filter dropout: exact counts, compact execution, gradients, BatchNorm, scaling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flwr_distreal import DroppedWeightGuard, build_model, kept_counts, parameter_masks
from flwr_distreal.core.dropout import make_droppable
from flwr_distreal.models.densenet import DenseNetBC

from conftest import digits_tensors


def _dense_small(**kw):
    return make_droppable(DenseNetBC(depth=10, num_classes=5, **kw), torch.zeros(2, 3, 32, 32), name="densenet_bc_10")


def _step(model, x, y, opt):
    out = model(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def test_each_step_keeps_exact_random_filters():
    torch.manual_seed(0)
    model = build_model("densenet_bc_40")
    v = np.random.default_rng(0).uniform(0, 0.5, 39)
    model.set_dropout(v)
    x = torch.randn(2, 3, 32, 32)
    model(x)
    first = model.last_kept_indices()
    model(x)
    second = model.last_kept_indices()
    counts = kept_counts(model, v)
    changed = 0
    for k, a, b, layer in zip(counts, first, second, model.dropout_layers):
        if k == layer.out_channels:
            assert a is None and b is None
            continue
        assert a.numel() == k and b.numel() == k
        assert torch.unique(a).numel() == k and int(a.max()) < layer.out_channels
        changed += int(not torch.equal(a, b))
    assert changed > 20  # drawn anew for every mini-batch


def test_eval_never_drops():
    model = build_model("femnist_cnn")
    model.set_dropout([0.5, 0.5])
    model.eval()
    x = torch.randn(3, 1, 28, 28)
    a, b = model(x), model(x)
    assert all(k is None for k in model.last_kept_indices())
    assert torch.equal(a, b)


def test_vector_switching_between_batches_changes_counts_without_rebuild():
    model = build_model("femnist_cnn")
    params_before = {n: p.data_ptr() for n, p in model.named_parameters()}
    x = torch.randn(4, 1, 28, 28)
    for v in ([0.5, 0.5], [0.0, 0.0], [0.1, 0.4], None, [0.25, 0.0]):
        model.set_dropout(v)
        model(x)
        expected = kept_counts(model, v)
        got = [m.out_channels if k is None else k.numel() for k, m in zip(model.last_kept_indices(), model.dropout_layers)]
        assert got == expected
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params_before
    assert not any(t.requires_grad for n, t in model.state_dict().items() if "scale" in n)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([0.1], "2 dropout layers"),
        ([0.1, 0.2, 0.3], "2 dropout layers"),
        ([float("nan"), 0.1], "non-finite"),
        ([0.1, float("inf")], "non-finite"),
        ([-0.01, 0.1], "outside"),
        ([0.1, 0.51], "outside"),
        ([[0.1, 0.1]], "1-D"),
        (["a", "b"], "numbers"),
    ],
)
def test_bad_vectors_refused(bad, match):
    model = build_model("femnist_cnn")
    with pytest.raises(ValueError, match=match):
        model.set_dropout(bad)
    assert model.dropout_vector.tolist() == [0.0, 0.0]  # nothing half-applied


def test_fixed_subsets_validation():
    model = build_model("femnist_cnn")
    with pytest.raises(ValueError, match="subsets"):
        model.set_fixed_subsets([[0]])
    with pytest.raises(ValueError, match="out of range"):
        model.set_fixed_subsets([[0, 32], None])
    with pytest.raises(ValueError, match="repeated"):
        model.set_fixed_subsets([[1, 1], None])
    with pytest.raises(ValueError, match="no filter"):
        model.set_fixed_subsets([[], None])
    model.set_fixed_subsets([[3, 1, 2], None])
    model(torch.randn(2, 1, 28, 28))
    assert model.last_kept_indices()[0].tolist() == [1, 2, 3]
    assert model.last_kept_indices()[1] is None


@pytest.mark.parametrize("factory", [lambda: build_model("femnist_cnn"), _dense_small])
def test_dropped_filters_zero_grad_and_unchanged_after_sgd(factory):
    torch.manual_seed(1)
    model = factory()
    c, h, w = model.input_shape
    x, y = torch.randn(8, c, h, w), torch.randint(0, model.num_classes, (8,))
    model.set_dropout(np.full(model.num_dropout_layers, 0.5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _step(model, x, y, opt)
    kept = model.last_kept_indices()
    masks = parameter_masks(model, kept)
    grads = dict(model.named_parameters())
    for name, p in grads.items():
        m = torch.from_numpy(masks[name])
        assert torch.all(p.grad[~m] == 0), name  # exactly zero for dropped entries
        assert torch.equal(p.detach()[~m], before[name][~m]), name
        if p.grad[m].abs().sum() > 0:
            assert not torch.equal(p.detach()[m], before[name][m]), name
    # Kept conv filters do get gradient.
    conv1 = dict(model.named_modules())[model.dropout_layer_names[0]]
    assert conv1.weight.grad[kept[0]].abs().sum() > 0


def test_batchnorm_running_stats_only_for_alive_channels():
    torch.manual_seed(2)
    model = _dense_small()
    model.set_dropout(np.full(model.num_dropout_layers, 0.5))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model(torch.randn(6, 3, 32, 32))
    masks = parameter_masks(model, model.last_kept_indices())
    checked = 0
    for key, value in model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            m = torch.from_numpy(masks[key])
            assert (~m).any() and m.any(), key
            assert torch.equal(value[~m], before[key][~m]), key
            assert not torch.equal(value[m], before[key][m]), key
            checked += 1
    assert checked >= 8


@pytest.mark.parametrize("factory", [lambda: build_model("femnist_cnn"), _dense_small])
def test_compact_equals_masking_reference(factory):
    torch.manual_seed(3)
    model = factory()
    ref = factory()
    ref.load_state_dict(model.state_dict())
    c, h, w = model.input_shape
    x, y = torch.randn(5, c, h, w), torch.randint(0, model.num_classes, (5,))
    rng = np.random.default_rng(3)
    subsets = [
        torch.as_tensor(np.sort(rng.choice(m.out_channels, k, replace=False)))
        for m, k in zip(model.dropout_layers, kept_counts(model, rng.uniform(0.1, 0.5, model.num_dropout_layers)))
    ]
    for net in (model, ref):
        net.set_fixed_subsets(subsets)
    ref.set_execution("mask")
    out_c, out_m = model(x), ref(x)
    torch.testing.assert_close(out_c, out_m, rtol=1e-4, atol=1e-5)
    F.cross_entropy(out_c, y).backward()
    F.cross_entropy(out_m, y).backward()
    masks = parameter_masks(model, subsets)
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        m = torch.from_numpy(masks[name])
        torch.testing.assert_close(p.grad[m], q.grad[m], rtol=1e-4, atol=1e-5)
        assert torch.all(p.grad[~m] == 0)
    with pytest.raises(ValueError, match="execution"):
        model.set_execution("sparse")


def test_inverted_dropout_matches_full_model_in_expectation():
    # conv2 is linear in its inputs: averaging its output over random conv1 subsets must give the
    # full model's conv2 output (inputs rescaled by C/k).
    torch.manual_seed(4)
    model = build_model("femnist_cnn")
    x = torch.randn(1, 1, 28, 28)
    captured = {}
    handle = model.conv2.register_forward_hook(lambda mod, inp, out: captured.__setitem__("out", out))
    model.eval()
    with torch.no_grad():
        model(x)
        full = captured["out"]
        model.train()
        model.set_dropout([0.5, 0.0])
        acc = torch.zeros_like(full)
        n = 1500
        for _ in range(n):
            model(x)
            acc += captured["out"]
    handle.remove()
    err = (acc / n - full).abs().mean() / full.abs().mean()
    assert err < 0.04


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-3),
])
def test_guard_keeps_dropped_weights_with_momentum_and_decay(make_opt):
    torch.manual_seed(5)
    model = build_model("femnist_cnn")
    opt = DroppedWeightGuard(make_opt(model.parameters()), model)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 62, (8,))
    model.set_dropout(None)
    _step(model, x, y, opt)  # full step: builds optimiser state everywhere
    for _ in range(2):
        model.set_dropout([0.5, 0.5])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        state_before = {id(p): {k: v.clone() for k, v in opt.optimizer.state[p].items()} for p in model.parameters()}
        _step(model, x, y, opt)
        masks = parameter_masks(model, model.last_kept_indices())
        for name, p in model.named_parameters():
            m = torch.from_numpy(masks[name])
            assert torch.equal(p.detach()[~m], before[name][~m]), name
            for k, v in opt.optimizer.state[p].items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    assert torch.equal(v[~m], state_before[id(p)][k][~m]), (name, k)
    # Without the guard, momentum and decay move dropped weights: the guard is needed.
    bare = make_opt(model.parameters())
    model.set_dropout(None)
    _step(model, x, y, bare)
    model.set_dropout([0.5, 0.5])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, x, y, bare)
    m = torch.from_numpy(parameter_masks(model, model.last_kept_indices())["conv1.weight"])
    assert not torch.equal(model.conv1.weight.detach()[~m], before["conv1.weight"][~m])


def _digits(size, channels):
    x, y = digits_tensors()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, channels, 1, 1)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


@pytest.mark.parametrize("factory, size, channels, steps, lr", [
    (lambda: build_model("femnist_cnn", num_classes=10), 28, 1, 300, 0.1),
])
def test_dropout_trained_model_evaluates_well_as_full_model(factory, size, channels, steps, lr):
    torch.manual_seed(6)
    xtr, ytr, xte, yte = _digits(size, channels)
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    rng = np.random.default_rng(6)
    for s in range(steps):
        idx = torch.randint(0, len(ytr), (32,))
        model.train()
        model.set_dropout(rng.uniform(0.25, 0.5, model.num_dropout_layers))  # heavy dropout every batch
        _step(model, xtr[idx], ytr[idx], opt)
    model.eval()
    with torch.no_grad():
        acc = (model(xte).argmax(1) == yte).float().mean().item()
    assert acc > 0.85, acc


def _running_means(x, vector, passes, scaling=True):
    model = _dense_small()
    model.load_state_dict(_dense_small_state())
    model.set_inverted_scaling(scaling)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all passes
    model.train()
    model.set_dropout(None if vector is None else np.full(model.num_dropout_layers, vector))
    model.seed_dropout(0)
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith("running_mean")}


@pytest.mark.slow
def test_batchnorm_sees_full_model_statistics_under_dropout():
    # The inverted-dropout factor C/k is applied after BatchNorm (in the consuming conv), so the
    # running means that BN collects under dropout stay close to the full model's, the statistics
    # that full-model inference uses. Without the factor they are off by ~50%.
    x = _digits(32, 3)[0][:64]
    full = _running_means(x, None, 1)
    ours = _running_means(x, 0.5, 100)
    unscaled = _running_means(x, 0.5, 100, scaling=False)
    deep = [k for k in full if not k.startswith("block1.0.norm1")]  # the first BN sees conv0 only
    assert len(deep) == 8
    for key in deep:
        rel_ours = float((ours[key] - full[key]).norm() / full[key].norm())
        rel_unscaled = float((unscaled[key] - full[key]).norm() / full[key].norm())
        assert rel_ours < 0.3, (key, rel_ours)
        assert rel_unscaled > 1.5 * rel_ours, (key, rel_ours, rel_unscaled)


_STATE = {}


def _dense_small_state():
    if not _STATE:
        torch.manual_seed(9)
        _STATE.update(_dense_small().state_dict())
    return _STATE


def _strict_cl(t):
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_models_are_channels_last_by_default_and_stay_so_under_dropout():
    model = build_model("densenet_bc_40")
    assert _strict_cl(model.conv0.weight) and _strict_cl(model.block1[0].conv2.weight)
    model.set_dropout([0.5] * model.num_dropout_layers)
    seen = {}
    model.norm_final.register_forward_hook(lambda mod, inp, out: seen.__setitem__("h", out))
    model(torch.randn(4, 3, 32, 32))  # an NCHW input is fine
    assert seen["h"].shape[1] < 132 and _strict_cl(seen["h"])  # compact and channels-last
    classic = build_model("densenet_bc_40", channels_last=False)
    classic.set_dropout([0.5] * classic.num_dropout_layers)
    classic.norm_final.register_forward_hook(lambda mod, inp, out: seen.__setitem__("h", out))
    classic(torch.randn(4, 3, 32, 32))
    assert seen["h"].is_contiguous() and not _strict_cl(seen["h"])


@pytest.mark.parametrize("name", ["femnist_cnn", "densenet_bc_19"])
def test_layouts_compute_the_same_steps(name):
    """Channels-last only changes the layout: same parameters, outputs and gradients under the
    same dropout draws as the classic NCHW model."""
    models = []
    for cl in (True, False):
        torch.manual_seed(3)
        m = build_model(name, channels_last=cl)
        m.set_dropout(np.full(m.num_dropout_layers, 0.3))
        m.seed_dropout(11)
        models.append(m)
    a, b = models
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(8, *a.input_shape, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, a.num_classes, (8,))
    for _ in range(2):
        outs = []
        for m in (a, b):
            m.zero_grad()
            out = m(x)
            F.cross_entropy(out, y).backward()
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)
        for ka, kb in zip(a.last_kept_indices(), b.last_kept_indices()):
            assert (ka is None and kb is None) or torch.equal(ka, kb)
        for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-5, msg=n)
