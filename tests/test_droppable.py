"""make_droppable on the model zoo and on users' modules: exact MACs, unchanged modules, compact
steps equal to the masking reference, residual sums aligned, and refusals that name the node."""

from __future__ import annotations

import copy
import inspect
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from flwr_distreal import make_droppable, parameter_masks
from flwr_distreal.core.channel_graph import UnsupportedModelError
from flwr_distreal.core.lut import LUT
from flwr_distreal.core.macs import count_macs
from flwr_distreal.models.densenet import densenet_bc_40
from flwr_distreal.models.femnist_cnn import femnist_cnn
from flwr_distreal.models.mobilenetv2 import InvertedResidual, mobilenet_v2
from flwr_distreal.models.resnet import BasicBlock, resnet18, resnet20

from conftest import flop_macs


def user_cnn() -> nn.Module:
    """A user's CNN as people write it: conv-bn-relu-pool twice, flatten, linear."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
    )


# name -> (plain module builder, sample shape, batch). Small inputs keep the file fast; the
# MACs are those of that input (tests/test_models_macs.py checks the 32x32 numbers).
ZOO = {
    "femnist_cnn": (femnist_cnn, (1, 28, 28), 3),
    "densenet_bc_40": (densenet_bc_40, (3, 16, 16), 2),
    "resnet20": (resnet20, (3, 32, 32), 2),
    "resnet18": (resnet18, (3, 16, 16), 2),
    "mobilenet_v2": (mobilenet_v2, (3, 16, 16), 2),
    # 48x48 so that the last stage's BatchNorm normalises more than one value per sample
    "torchvision_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 48, 48), 2),
    "user_sequential": (user_cnn, (3, 16, 16), 3),
}


def _snapshot(module: nn.Module) -> dict:
    return {
        "class": type(module),
        "training": module.training,
        "state": {k: v.clone() for k, v in module.state_dict().items()},
        "classes": {n: type(m) for n, m in module.named_modules()},
        "attrs": {n: sorted(vars(m)) for n, m in module.named_modules()},
    }


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo(request):
    """(plain module, its snapshot before make_droppable, droppable model, input batch)."""
    build, shape, batch = ZOO[request.param]
    torch.manual_seed(0)
    plain = build()
    before = _snapshot(plain)
    model = make_droppable(plain, torch.zeros(batch, *shape))
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    return plain, before, model, x


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float summation order (BatchNorm over a few values amplifies it); a channel
    misalignment would differ by the values' own size."""
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-3, atol=1e-4 * max(scale, 1.0))


def _no_elementwise_dropout(model: nn.Module) -> nn.Module:
    """Switch nn.Dropout layers off: on a compact tensor they draw a mask of another shape than
    on the full one, so the compact and the mask run would drop different activations."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    return model


def test_count_macs_equals_flop_counter_in_training(zoo):
    _, _, model, x = zoo
    model = copy.deepcopy(model).train()
    rng = np.random.default_rng(3)
    for vector in (None, rng.uniform(0, 0.5, model.num_dropout_layers), rng.uniform(0, 0.5, model.num_dropout_layers)):
        model.set_dropout(vector)
        assert flop_macs(model, x) == count_macs(model, vector)
    assert count_macs(model, np.full(model.num_dropout_layers, 0.5)) < count_macs(model)


def test_eval_output_and_state_dict_equal_the_original_which_is_unchanged(zoo):
    plain, before, model, x = zoo
    after = _snapshot(plain)
    assert after["class"] is before["class"] and after["training"] == before["training"]
    assert after["classes"] == before["classes"] and after["attrs"] == before["attrs"]
    assert after["state"].keys() == before["state"].keys()
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert isinstance(model, type(plain)) and model is not plain
    sd = model.state_dict()
    assert list(sd) == list(before["state"])
    for k, v in before["state"].items():
        assert sd[k].shape == v.shape and sd[k].dtype == v.dtype and torch.equal(sd[k], v), k
    ref, mine = copy.deepcopy(plain).eval(), copy.deepcopy(model).eval()
    with torch.no_grad():
        assert torch.equal(mine(x), ref(x))


# -- residual sums --------------------------------------------------------------------------
def _residual_operands(plain: nn.Module) -> dict[str, tuple[str, str, str, list[str]]]:
    """Per residual block: (module whose output is the residual branch, module whose input or
    output is the shortcut operand, "in" or "out", the convolutions producing the sum)."""
    ops = {}
    for name, m in plain.named_modules():
        if isinstance(m, BasicBlock):
            if len(m.shortcut):
                ops[name] = (f"{name}.bn2", f"{name}.shortcut.1", "out", [f"{name}.conv2", f"{name}.shortcut.0"])
            else:
                ops[name] = (f"{name}.bn2", f"{name}.conv1", "in", [f"{name}.conv2"])
        elif isinstance(m, torchvision.models.resnet.BasicBlock):
            if m.downsample is not None:
                ops[name] = (f"{name}.bn2", f"{name}.downsample.1", "out", [f"{name}.conv2", f"{name}.downsample.0"])
            else:
                ops[name] = (f"{name}.bn2", f"{name}.conv1", "in", [f"{name}.conv2"])
        elif isinstance(m, InvertedResidual) and m.use_residual:
            last = len(m.conv) - 1
            ops[name] = (f"{name}.conv.{last}", f"{name}.conv.0.0", "in", [f"{name}.conv.{last - 1}"])
    return ops


def _capture(model: nn.Module, ops) -> tuple[dict, list]:
    seen: dict[str, torch.Tensor] = {}
    handles = []
    modules = dict(model.named_modules())

    def out_hook(key):
        return lambda mod, inp, out: seen.__setitem__(key, out.detach())

    def in_hook(key):
        return lambda mod, inp: seen.__setitem__(key, inp[0].detach())

    for block, (res, short, where, _) in ops.items():
        handles.append(modules[res].register_forward_hook(out_hook((block, "res"))))
        hook = out_hook((block, "short")) if where == "out" else in_hook((block, "short"))
        handles.append(modules[short].register_forward_hook(hook) if where == "out" else modules[short].register_forward_pre_hook(hook))
    return seen, handles


def test_residual_sums_couple_their_operands_in_the_channel_graph(zoo):
    plain, _, model, _ = zoo
    ops = _residual_operands(plain)
    if not ops:
        pytest.skip("no residual sums")
    layers = {layer.name: layer for layer in model.channel_graph.layers}
    for block, (res, short, _, producers) in ops.items():
        res_layer = layers[res]
        assert res_layer.kind == "bn" and len(res_layer.space.segments) == 1, block
        group = res_layer.space.segments[0][0]
        assert group >= 0, block
        # The shortcut operand (the block's input, or the shortcut BN) has the same layout,
        # and the convolutions that produce the residual branch (and the shortcut) are the group.
        assert layers[short].space.segments == res_layer.space.segments, block
        for conv in producers:
            assert layers[conv].kind == "conv" and layers[conv].out_group == group, conv


def test_compact_step_equals_mask_reference_and_dropped_filters_get_zero_gradient(zoo):
    """One training step under a random vector, compact and masked (reference): outputs,
    gradients of the kept entries, exactly zero gradients of the dropped ones; in every
    residual sum both operands carry the kept channels of one group and equal the reference's
    channels at those indices."""
    plain, _, model, x = zoo
    model = _no_elementwise_dropout(copy.deepcopy(model).train())
    ref = copy.deepcopy(model)
    ops = _residual_operands(plain)
    seen, handles = _capture(model, ops)
    seen_ref, handles_ref = _capture(ref, ops)
    vector = np.random.default_rng(5).uniform(0.2, 0.5, model.num_dropout_layers)
    model.seed_dropout(11)
    model.set_dropout(vector)
    out = model(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * weights).sum().backward()
    kept = model.last_kept_indices()
    assert any(k is not None for k in kept)
    ref.set_execution("mask")
    ref.set_fixed_subsets(kept)
    out_ref = ref(x)
    (out_ref * weights).sum().backward()
    for h in handles + handles_ref:
        h.remove()
    _close(out, out_ref)
    masks = parameter_masks(model, kept)
    dropped_entries = 0
    for (name, p), (name_ref, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert name == name_ref and p.grad is not None, name
        used = torch.from_numpy(masks[name])
        dropped_entries += int((~used).sum())
        assert torch.count_nonzero(p.grad[~used]) == 0, name
        _close(p.grad[used], q.grad[used])
    assert dropped_entries > 0
    layers = {layer.name: layer for layer in model.channel_graph.layers}
    for block, (res, _, _, _) in ops.items():
        idx = kept[layers[res].space.segments[0][0]]
        r, s = seen[(block, "res")], seen[(block, "short")]
        n = model.dropout_groups[layers[res].space.segments[0][0]].out_channels if idx is None else idx.numel()
        assert r.shape == s.shape and r.shape[1] == n, block
        all_idx = torch.arange(n) if idx is None else idx
        _close(r, seen_ref[(block, "res")][:, all_idx])
        _close(s, seen_ref[(block, "short")][:, all_idx])


# -- what the tracer supports and refuses ---------------------------------------------------
class _Three(nn.Module):
    """conv(3->8) -> [op] -> conv(8->8) -> conv(8->16) -> pool -> linear: subclasses vary the op."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def head(self, h):
        return self.fc(F.adaptive_avg_pool2d(self.c3(h), 1).flatten(1))


def _check(model_cls, keep_full=(), shape=(3, 16, 16)):
    """make_droppable it, then check MACs and compact == mask under dropout; return the model."""
    torch.manual_seed(0)
    plain = model_cls()
    model = make_droppable(plain, torch.zeros(2, *shape), keep_full=keep_full)
    x = torch.randn(2, *shape)
    model.train()
    vector = np.full(model.num_dropout_layers, 0.5)
    ref = copy.deepcopy(model)
    model.set_dropout(vector)
    with FlopCounterMode(display=False) as counter:
        out = model(x)
    assert counter.get_total_flops() // 4 == count_macs(model, vector)
    ref.set_execution("mask")
    ref.set_fixed_subsets(model.last_kept_indices())
    _close(out, ref(x))
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model).eval()(x), plain.eval()(x))
    return model


class DataDependent(_Three):
    def forward(self, x):
        h = self.c1(x)
        if h.sum() > 0:
            h = self.c2(h)
        return self.head(h)


def test_data_dependent_control_flow_is_refused_naming_the_line():
    lines, start = inspect.getsourcelines(DataDependent.forward)
    line = start + next(i for i, text in enumerate(lines) if "if h.sum() > 0" in text)
    with pytest.raises(UnsupportedModelError) as err:
        make_droppable(DataDependent(), torch.zeros(2, 3, 16, 16))
    msg = str(err.value)
    assert f"{os.path.basename(__file__)}:{line}" in msg and "if h.sum() > 0" in msg and "keep_full" in msg


class ChannelTokenAttention(_Three):
    """Self-attention over channel tokens (each channel's 8x8 map is one token)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(self.c1(x), 8)
        n, c, hh, ww = h.shape
        tokens = h.flatten(2)
        a, _ = self.attn(tokens, tokens, tokens)
        return self.head(self.c2(h + a.reshape(n, c, hh, ww)))


def test_attention_over_channels_is_refused_naming_the_node_and_works_with_keep_full():
    with pytest.raises(UnsupportedModelError) as err:
        make_droppable(ChannelTokenAttention(), torch.zeros(2, 3, 16, 16))
    msg = str(err.value)
    assert "'attn'" in msg and "MultiheadAttention" in msg and "keep_full=['attn']" in msg
    model = _check(ChannelTokenAttention, keep_full=["attn"])
    # c1's channels feed the attention: kept whole; c2 and c3 are droppable. The attention's
    # own MACs are constant and counted (count_macs matched FlopCounterMode above).
    assert model.dropout_layer_names == ["c2", "c3"]
    assert "c1" in model.channel_graph.kept_whole
    assert [name for name, _ in model.channel_graph.fixed_macs] == ["attn"]


def test_plain_modules_are_refused_with_a_type_error_naming_make_droppable():
    for call in (lambda: count_macs(user_cnn()), lambda: LUT.uniform(user_cnn()), lambda: LUT.from_vectors(user_cnn(), [[0.0, 0.0]])):
        with pytest.raises(TypeError, match="make_droppable"):
            call()


def test_a_model_without_convolutions_is_refused_so_it_never_reaches_a_lut():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(UnsupportedModelError, match="no droppable convolution filters .*no nn.Conv2d layer"):
        make_droppable(mlp, torch.zeros(2, 3, 8, 8))


class HardCodedFlatten(_Three):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = F.max_pool2d(self.c2(self.c1(x)), 4)
        return self.fc(h.view(-1, 128).view(2, 128))


class HardCodedViews(_Three):
    """Views with the sizes written as numbers: of the input (never dropped), and one that
    keeps the batch and channel dimensions of a droppable tensor."""

    def forward(self, x):
        h = self.c1(x.view(-1, 3, 16, 16))
        return self.head(self.c2(h.view(2, 8, 16, 16).view(2, 8, 256).view(2, 8, 16, 16)))


def test_hard_coded_views_are_rewritten_to_follow_the_kept_channels():
    model = _check(HardCodedFlatten)
    linear = next(layer for layer in model.channel_graph.layers if layer.name == "fc")
    assert linear.space.stride == 16 and linear.space.segments[0][0] >= 0
    model = _check(HardCodedViews)
    assert model.dropout_layer_names == ["c1", "c2", "c3"]


class ChannelShuffle(_Three):
    def forward(self, x):
        h = self.c1(x)
        n, c, hh, ww = h.size()
        h = h.view(n, 2, c // 2, hh, ww).transpose(1, 2).contiguous().view(n, c, hh, ww)
        return self.head(self.c2(h))


def test_channel_shuffle_is_refused_naming_the_node():
    with pytest.raises(UnsupportedModelError, match=r"graph node 'view' .*channel shuffle") as err:
        make_droppable(ChannelShuffle(), torch.zeros(2, 3, 16, 16))
    assert "test_droppable.py" in str(err.value)
    with pytest.raises(UnsupportedModelError, match=r"splits the channel dimension.*channel_shuffle"):
        make_droppable(torchvision.models.shufflenet_v2_x0_5(num_classes=10), torch.zeros(2, 3, 32, 32))


class PadChannels(_Three):
    """CIFAR ResNet "option A": the shortcut halves the resolution and zero-pads the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        shortcut = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2), "constant", 0)
        h = F.relu(self.c2(h) + shortcut)
        return self.head(h)


class PadThenConv(_Three):
    def forward(self, x):
        return self.head(self.c2(F.pad(self.c1(x)[:, :4], (0, 0, 0, 0, 2, 2))))


class PadIntoConv(_Three):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.c2(F.pad(self.c1(x), (1, 1, 1, 1, 2, 2))))


def test_channel_padding_is_a_concatenation_with_zero_channels_kept_whole():
    model = _check(PadIntoConv)
    space = next(layer.space for layer in model.channel_graph.layers if layer.name == "c2")
    assert space.segments == ((-1, 2), (0, 4), (-1, 2))
    # Option A: the padded shortcut is split differently from c2's output, so the sum keeps
    # both whole; the layers elsewhere stay droppable, and everything computes exactly.
    model = _check(PadChannels)
    assert model.dropout_layer_names == ["c3"]
    assert {"c1", "c2"} <= set(model.channel_graph.kept_whole)
    with pytest.raises(UnsupportedModelError, match="selects channels"):
        make_droppable(PadThenConv(), torch.zeros(2, 3, 16, 16))


class SpatialIndexing(_Three):
    def forward(self, x):
        h = self.c1(x)[:, :, ::2, ::2]
        return self.head(self.c2(h[..., 1:]))


class PickSample(_Three):
    def forward(self, x):
        return self.head(self.c2(self.c1(x)[0].unsqueeze(0)))


class ChannelIndexing(_Three):
    def forward(self, x):
        return self.head(self.c2(torch.cat([self.c1(x)[:, 4:], self.c1(x)[:, :4]], 1)))


def test_indexing_that_keeps_the_channels_passes_and_the_rest_is_refused():
    model = _check(SpatialIndexing)
    assert model.dropout_layer_names == ["c1", "c2", "c3"]
    with pytest.raises(UnsupportedModelError, match=r"graph node 'getitem' .*batch dimension"):
        make_droppable(PickSample(), torch.zeros(2, 3, 16, 16))
    with pytest.raises(UnsupportedModelError, match=r"graph node 'getitem\w*' .*selects channels"):
        make_droppable(ChannelIndexing(), torch.zeros(2, 3, 16, 16))


class SpatialChunk(_Three):
    def forward(self, x):
        a, b = self.c1(x).chunk(2, dim=3)
        return self.head(self.c2(torch.cat([b, a], dim=3).permute(0, 1, 3, 2)))


class ChannelChunk(_Three):
    def forward(self, x):
        a, b = torch.chunk(self.c1(x), 2, 1)
        return self.head(self.c2(torch.cat([b, a], 1)))


class ChannelsLast(_Three):
    def forward(self, x):
        return self.head(self.c2(self.c1(x).permute(0, 2, 3, 1).permute(0, 3, 1, 2)))


class MatmulAttention(_Three):
    def forward(self, x):
        h = self.c1(x)
        t = h.flatten(2)
        scores = torch.softmax(torch.matmul(t.transpose(1, 2), t), dim=-1)
        return self.head(self.c2(torch.matmul(t, scores).view_as(h)))


def test_splits_and_permutes_pass_along_spatial_dimensions_only():
    _check(SpatialChunk)
    with pytest.raises(UnsupportedModelError, match=r"graph node 'chunk' \(chunk\) splits the channel dimension"):
        make_droppable(ChannelChunk(), torch.zeros(2, 3, 16, 16))
    with pytest.raises(UnsupportedModelError, match=r"graph node 'permute' \(Tensor.permute\) moves the channel dimension"):
        make_droppable(ChannelsLast(), torch.zeros(2, 3, 16, 16))
    with pytest.raises(UnsupportedModelError, match=r"graph node 'transpose' .*moves the channel dimension"):
        make_droppable(MatmulAttention(), torch.zeros(2, 3, 16, 16))


class SelfAttention(_Three):
    def forward(self, x):
        h = self.c1(x)
        out = F.scaled_dot_product_attention(h, h, h)
        return self.head(self.c2(out))


def test_matrix_products_on_droppable_channels_are_refused():
    with pytest.raises(UnsupportedModelError, match=r"'scaled_dot_product_attention' .*multiplies matrices"):
        make_droppable(SelfAttention(), torch.zeros(2, 3, 16, 16))


class DepthwiseMultiplier(_Three):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # channel multiplier 2
        self.g = nn.Conv2d(16, 8, 3, padding=1, groups=4)
        self.c3 = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x):
        return self.head(self.g(self.dw(self.c2(self.c1(x)))))


class Depthwise(_Three):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=True)

    def forward(self, x):
        return self.head(self.dw(self.c2(self.c1(x))))


def test_grouped_and_depthwise_convolutions_count_exact_macs():
    model = _check(DepthwiseMultiplier)
    kinds = {layer.name: layer.kind for layer in model.channel_graph.layers}
    assert kinds["dw"] == kinds["g"] == "conv_full"
    assert model.dropout_layer_names == ["c1", "c3"]
    assert "groups=8" in model.channel_graph.kept_whole["c2"]
    model = _check(Depthwise)
    assert {layer.name: layer.kind for layer in model.channel_graph.layers}["dw"] == "depthwise"
    assert model.dropout_groups[1].members == ["c2"]  # the depthwise conv follows c2's kept set


class SqueezeExcite(_Three):
    def __init__(self) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(8, 4, 1)
        self.expand = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        h = self.c1(x)
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(h.mean((2, 3), keepdim=True)))))
        return F.log_softmax(self.head(self.c2(h * gate)), dim=1)


def test_squeeze_excite_gate_joins_the_group_it_scales():
    model = _check(SqueezeExcite)
    group = next(g for g in model.dropout_groups if "c1" in g.members)
    assert group.members == ["c1", "expand"]


def test_torchvision_efficientnet_b0_with_squeeze_excite_and_stochastic_depth():
    torch.manual_seed(0)
    model = make_droppable(torchvision.models.efficientnet_b0(num_classes=10), torch.zeros(2, 3, 32, 32))
    assert model.num_dropout_layers == 40
    model = _no_elementwise_dropout(model.train())
    ref = copy.deepcopy(model)
    vector = np.random.default_rng(0).uniform(0, 0.5, 40)
    model.seed_dropout(1)
    model.set_dropout(vector)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(5)  # stochastic depth draws one value per sample: the same in both runs
    with FlopCounterMode(display=False) as counter:
        out = model(x)
    assert counter.get_total_flops() // 2 // 4 == count_macs(model, vector)
    ref.set_execution("mask")
    ref.set_fixed_subsets(model.last_kept_indices())
    torch.manual_seed(5)
    _close(out, ref(x))
