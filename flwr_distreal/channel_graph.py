"""The channel graph of any PyTorch CNN, discovered by tracing (``torch.fx``).

Structured filter dropout (Rapp et al., AAAI 2022, Fig. 1) removes whole filters of a
convolution; every layer that reads those channels must then read only the kept ones. Which
layers read which channels is a property of the model's data flow, so this module derives it
from the module itself, in the manner of Torch-Pruning's dependency graph (nodes, groups,
index mapping), but found by symbolic tracing instead of autograd names and declared nowhere
by hand:

* **producers** (``nn.Conv2d`` with ``groups == 1``, ``nn.Linear``, the network input) open a
  new *channel source*;
* **channel-wise pass-through** (BatchNorm, activations, pooling, dropout, interpolation,
  spatial reductions) keeps the channels as they are;
* **concatenation** along channels lays its operands' channels side by side (offset ranges,
  as DenseNet needs);
* **residual addition** (and any element-wise op between two channel-carrying tensors)
  *couples* its operands: the channels at the same position must be kept together, so their
  sources join one group (union-find);
* **depthwise convolution** (``groups == in_channels == out_channels``) couples its output
  with its input; other grouped convolutions keep their input and output whole;
* **flatten into linear** expands each channel into ``stride`` features (the spatial size);
* the network's **output** (the classifier) is never dropped, nor is anything coupled to the
  input or to a linear layer's output.

A *dropout group* is a set of coupled convolution outputs: it gets one rate of the dropout
vector and one kept set of filters per mini-batch. Anything the tracer cannot follow
(data-dependent control flow) or an operation on channel-carrying tensors that is not known to
be channel-wise (attention, channel shuffles, channel reductions, ...) is refused with an error
naming the graph node and its op; such a module can be kept whole with ``keep_full``.

This module has no Flower or Hydra imports.
"""

from __future__ import annotations

import operator
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

__all__ = [
    "ChannelGraph",
    "ComputeLayer",
    "DropoutGroupInfo",
    "InputSpace",
    "UnsupportedModelError",
    "trace_channel_graph",
]


class UnsupportedModelError(ValueError):
    """The model cannot be made droppable; the message names the graph node and op."""


# -- what the tracer treats as channel-wise -------------------------------------------------
_PASS_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d,
    nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.ZeroPad2d,
    nn.ConstantPad2d, nn.ReflectionPad2d, nn.ReplicationPad2d,
)
_PASS_FUNCTIONS: set[Any] = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus, F.sigmoid, F.tanh,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.nn.functional.dropout,
    F.dropout2d, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    F.interpolate, F.pad, torch.clamp, torch.clip, torch.abs, torch.neg, torch.exp,
    operator.neg, torch.square,
}
_PASS_METHODS: set[str] = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
    "contiguous", "clone", "detach", "float", "half", "bfloat16", "to", "type_as", "abs",
    "neg", "exp", "square", "requires_grad_",
}
_ELEMENTWISE: set[Any] = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
_ELEMENTWISE_METHODS: set[str] = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCTIONS_FN: set[Any] = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTIONS_METHODS: set[str] = {"mean", "sum", "amax", "amin"}
_FLATTEN_METHODS: set[str] = {"view", "reshape", "flatten"}


def _is_standard_leaf(m: nn.Module) -> bool:
    mod = type(m).__module__
    return (mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")) and not isinstance(
        m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)
    )


class _Tracer(fx.Tracer):
    """``torch.fx`` tracer whose leaves are torch.nn's own layers and the ``keep_full`` modules.

    A subclass of ``nn.Conv2d`` (or BatchNorm, Linear) that overrides ``forward`` is traced
    through, so its functional call is seen (and refused) instead of being taken for the
    standard layer.
    """

    def __init__(self, keep_full: set[str]) -> None:
        super().__init__()
        self.keep_full = keep_full

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.keep_full:
            return True
        for base in (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm):
            if isinstance(m, base) and type(m).forward is not base.forward:
                return False
        return _is_standard_leaf(m)


def _user_frame(err: BaseException) -> str:
    """The innermost frame of the user's code in a tracing error: 'file:line in fn: code'."""
    frames = traceback.extract_tb(err.__traceback__)
    torch_dir = torch.__file__.rsplit("/", 1)[0]
    mine = __file__
    for fr in reversed(frames):
        if not fr.filename.startswith(torch_dir) and fr.filename != mine:
            return f"{fr.filename}:{fr.lineno} in {fr.name}: {(fr.line or '').strip()}"
    return "<unknown location>"


def trace(module: nn.Module, keep_full: Sequence[str] = ()) -> fx.Graph:
    """Symbolically trace ``module``'s forward in its current mode (train or eval).

    Raises
    ------
    UnsupportedModelError
        If the forward cannot be traced (data-dependent control flow, ...), naming the line.
    """
    tracer = _Tracer(set(keep_full))
    try:
        return tracer.trace(module)
    except Exception as err:  # fx raises TraceError, TypeError, RuntimeError ...
        raise UnsupportedModelError(
            f"cannot trace {type(module).__name__}.forward with torch.fx at {_user_frame(err)}: "
            f"{type(err).__name__}: {err}. Data-dependent control flow (an `if` on a tensor's "
            "value) cannot be traced; move it out of forward or pass the submodule that holds it "
            "in keep_full so it is kept whole."
        ) from err


# -- the result -----------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpace:
    """The channel layout a compute layer reads: segments of (group index or -1, channels).

    ``-1`` marks a segment that is never dropped. ``stride`` is the number of features per
    channel (flatten into a linear layer; 1 otherwise).
    """

    segments: tuple[tuple[int, int], ...]
    stride: int = 1

    @property
    def channels(self) -> int:
        """Channels of the full model in this space."""
        return sum(c for _, c in self.segments)

    @property
    def droppable(self) -> bool:
        """Whether any segment of the space can be dropped."""
        return any(g >= 0 for g, _ in self.segments)

    def kept(self, counts: Sequence[int]) -> int:
        """Channels present when dropout group ``g`` keeps ``counts[g]`` filters."""
        return sum(counts[g] if g >= 0 else c for g, c in self.segments)


@dataclass
class ComputeLayer:
    """One call of a module whose weights are sliced under dropout.

    ``kind`` is ``"conv"`` (dense conv: rows follow ``out_group``, columns ``space``),
    ``"depthwise"`` (rows and columns follow ``space``), ``"conv_full"`` (grouped conv whose
    input and output are kept whole), ``"linear"`` (columns follow ``space`` with its stride),
    ``"bn"`` (channels follow ``space``).
    """

    name: str
    kind: str
    space: InputSpace
    out_group: int = -1
    out_channels: int = 0
    area: int = 1
    macs_per_io: int = 0  # kernel area (conv) or 1 (linear): MACs per (in, out) channel pair and pixel


@dataclass
class DropoutGroupInfo:
    """A set of coupled convolution outputs that share one rate and one kept set."""

    name: str
    channels: int
    members: list[str] = field(default_factory=list)


@dataclass
class ChannelGraph:
    """What tracing found: the dropout groups and every layer's input space."""

    groups: list[DropoutGroupInfo]
    layers: list[ComputeLayer]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kept_whole: dict[str, str]  # why a producer's channels are never dropped, by module name

    def describe(self) -> str:
        """A short human-readable summary (one line per group)."""
        lines = [f"{len(self.groups)} dropout groups over {len(self.layers)} sliced layer calls"]
        for i, g in enumerate(self.groups):
            lines.append(f"  [{i}] {g.name}: {g.channels} channels, {len(g.members)} producer(s)")
        return "\n".join(lines)


# -- analysis -------------------------------------------------------------------------------
class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclass(frozen=True)
class _Spec:
    """Channel layout of a traced value: source segments at dim 1, ``stride`` features each."""

    segments: tuple[tuple[int, int], ...]  # (source id, channels)
    stride: int = 1

    @property
    def channels(self) -> int:
        return sum(c for _, c in self.segments)


def _meta_shape(node: Any) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    tm = node.meta.get("tensor_meta")
    if tm is None or not hasattr(tm, "shape"):
        return None
    return tuple(int(s) for s in tm.shape)


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


class _Analysis:
    def __init__(self, gm: fx.GraphModule, keep_full: set[str]) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.keep_full = keep_full
        self.uf = _UnionFind()
        self.src_size: list[int] = []
        self.src_owner: list[str | None] = []  # conv module name for droppable producers
        self.fixed: dict[int, str] = {}  # source id -> reason it is kept whole
        self.spec: dict[fx.Node, _Spec | None] = {}
        self.pending: list[tuple[str, str, fx.Node, _Spec, int, int, int]] = []
        self.rewrites: list[fx.Node] = []  # view/reshape nodes that flatten

    # sources
    def new_source(self, size: int, owner: str | None, fixed_reason: str | None = None) -> int:
        s = self.uf.add()
        self.src_size.append(size)
        self.src_owner.append(owner)
        if fixed_reason is not None:
            self.fixed[s] = fixed_reason
        return s

    def fix(self, spec: _Spec | None, reason: str) -> None:
        if spec is None:
            return
        for s, _ in spec.segments:
            self.fixed.setdefault(s, reason)

    def refuse(self, node: fx.Node, why: str) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"make_droppable: graph node {node.name!r} (op {_op_name(node, self.modules)}, "
            f"target {node.target!r}) {why}. Keep the module that holds it whole with "
            "keep_full=[...] (its input and output channels are then never dropped)."
        )

    def couple(self, node: fx.Node, specs: list[_Spec]) -> _Spec:
        base = specs[0]
        for other in specs[1:]:
            if [c for _, c in other.segments] == [c for _, c in base.segments] and other.stride == base.stride:
                for (a, _), (b, _) in zip(base.segments, other.segments):
                    self.uf.union(a, b)
            elif other.channels == base.channels:
                # Same channel count, different splits: keep everything involved whole.
                self.fix(base, f"element-wise op {node.name} between differently split tensors")
                self.fix(other, f"element-wise op {node.name} between differently split tensors")
            else:
                raise self.refuse(node, f"combines tensors of {base.channels} and {other.channels} channels")
        return base

    # main loop
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.spec[node] = self.visit(node)

    def arg_specs(self, node: fx.Node) -> list[tuple[fx.Node, _Spec]]:
        out = []
        for a in node.all_input_nodes:
            sp = self.spec.get(a)
            if sp is not None:
                out.append((a, sp))
        return out

    def visit(self, node: fx.Node) -> _Spec | None:
        shape = _meta_shape(node)
        if node.op == "placeholder":
            if shape is None or len(shape) < 2:
                return None
            return _Spec(((self.new_source(shape[1], None, "network input"), shape[1]),))
        if node.op == "get_attr":
            return None
        if node.op == "output":
            for _, sp in self.arg_specs(node):
                self.fix(sp, "network output (the classifier is never dropped)")
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target], shape)
        if node.op in ("call_function", "call_method"):
            return self.visit_function(node, shape)
        raise self.refuse(node, "is of an unknown kind")

    def input_spec(self, node: fx.Node) -> _Spec | None:
        first = node.args[0] if node.args else None
        return self.spec.get(first) if isinstance(first, fx.Node) else None

    def visit_module(self, node: fx.Node, m: nn.Module, shape) -> _Spec | None:
        name = str(node.target)
        x = self.input_spec(node)
        if name in self.keep_full:
            for _, sp in self.arg_specs(node):
                self.fix(sp, f"read by {name}, kept whole (keep_full)")
            if shape is not None and len(shape) >= 2:
                return _Spec(((self.new_source(shape[1], None, f"output of {name}, kept whole"), shape[1]),))
            return None
        if isinstance(m, nn.Conv2d):
            if x is None:
                raise self.refuse(node, "reads a tensor whose channels the tracer cannot follow")
            if x.stride != 1:
                raise self.refuse(node, "reads a flattened tensor")
            area = shape[2] * shape[3] if shape is not None and len(shape) == 4 else 1
            kh, kw = m.kernel_size
            if m.groups == 1:
                owner = name
                src = self.new_source(m.out_channels, owner)
                self.pending.append(("conv", name, node, x, src, area, kh * kw))
                return _Spec(((src, m.out_channels),))
            if m.groups == m.in_channels == m.out_channels:
                self.pending.append(("depthwise", name, node, x, -1, area, kh * kw))
                return x
            self.fix(x, f"read by grouped convolution {name} (groups={m.groups})")
            src = self.new_source(m.out_channels, None, f"output of grouped convolution {name}")
            self.pending.append(("conv_full", name, node, x, src, area, kh * kw))
            return _Spec(((src, m.out_channels),))
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if x is not None:
                if x.stride != 1:
                    raise self.refuse(node, "normalises a flattened tensor")
                self.pending.append(("bn", name, node, x, -1, 1, 0))
            return x
        if isinstance(m, nn.Linear):
            if x is not None:
                in_shape = _meta_shape(node.args[0])
                if in_shape is None or len(in_shape) != 2:
                    raise self.refuse(node, "applies a linear layer to a tensor with channels not in its last dimension")
                if x.channels * x.stride != m.in_features:
                    raise self.refuse(node, f"reads {x.channels} x {x.stride} features but has {m.in_features} inputs")
                self.pending.append(("linear", name, node, x, -1, 1, 1))
            src = self.new_source(m.out_features, None, f"output of linear layer {name}")
            return _Spec(((src, m.out_features),))
        if isinstance(m, nn.Flatten):
            return self.flatten(node, x, int(m.start_dim), int(m.end_dim))
        if isinstance(m, _PASS_MODULES):
            return x
        if x is None and not self.arg_specs(node):
            return None
        raise self.refuse(node, "is not known to treat channels independently")

    def flatten(self, node: fx.Node, x: _Spec | None, start: int, end: int) -> _Spec | None:
        if x is None:
            return None
        in_shape = _meta_shape(node.args[0])
        if in_shape is None:
            raise self.refuse(node, "flattens a tensor of unknown shape")
        nd = len(in_shape)
        start, end = start % nd, end % nd
        if start >= 2:
            return x  # flattening spatial dimensions only
        if start == 1 and end == nd - 1:
            spatial = 1
            for s in in_shape[2:]:
                spatial *= s
            return _Spec(x.segments, x.stride * spatial)
        raise self.refuse(node, "flattens the channel dimension into another one")

    def visit_function(self, node: fx.Node, shape) -> _Spec | None:
        target = node.target
        specs = self.arg_specs(node)
        method = node.op == "call_method"
        if not specs:
            return None
        x = self.input_spec(node)
        if (not method and target in _PASS_FUNCTIONS) or (method and target in _PASS_METHODS):
            if x is None:  # e.g. clamp(min=tensor)
                raise self.refuse(node, "applies a channel-wise op to a tensor in a non-leading argument")
            return x
        if (not method and target in _ELEMENTWISE) or (method and target in _ELEMENTWISE_METHODS):
            return self.elementwise(node, specs, shape)
        if not method and target is torch.cat or (not method and target is torch.concat):
            return self.concat(node, shape)
        if (not method and target is torch.flatten) or (method and target == "flatten"):
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            if start == 0:
                raise self.refuse(node, "flattens the batch dimension")
            return self.flatten(node, x, int(start), int(end))
        if method and target in _FLATTEN_METHODS or (not method and target is torch.reshape):
            in_shape = _meta_shape(node.args[0])
            if x is not None and in_shape is not None and shape is not None:
                if shape == in_shape:
                    return x
                if len(shape) == 2 and shape[0] == in_shape[0] and len(in_shape) >= 2:
                    self.rewrites.append(node)
                    return self.flatten(node, x, 1, -1)
            raise self.refuse(node, f"reshapes {in_shape} to {shape}, which moves channels")
        if (not method and target in _REDUCTIONS_FN) or (method and target in _REDUCTIONS_METHODS):
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            in_shape = _meta_shape(node.args[0])
            if dims is None or in_shape is None:
                raise self.refuse(node, "reduces over every dimension, channels included")
            dims = [dims] if isinstance(dims, int) else list(dims)
            nd = len(in_shape)
            if any(d % nd in (0, 1) for d in dims):
                raise self.refuse(node, "reduces over the channel (or batch) dimension")
            return x
        if not method and target is operator.getitem and x is not None:
            raise self.refuse(node, "indexes a channel-carrying tensor")
        raise self.refuse(node, "is not known to treat channels independently")

    def elementwise(self, node: fx.Node, specs: list[tuple[fx.Node, _Spec]], shape) -> _Spec:
        out_nd = len(shape) if shape is not None else None
        for a in node.all_input_nodes:
            if self.spec.get(a) is not None:
                continue
            ash = _meta_shape(a)
            if ash is None or out_nd is None:
                continue
            # A channel-less operand broadcast along channels is fine; one with a channel axis
            # of full size (e.g. a per-channel parameter) needs every channel present.
            offset = out_nd - len(ash)
            ch_axis = 1 - offset
            if 0 <= ch_axis < len(ash) and ash[ch_axis] != 1:
                for _, sp in specs:
                    self.fix(sp, f"element-wise op {node.name} with a per-channel tensor")
        return self.couple(node, [sp for _, sp in specs])

    def concat(self, node: fx.Node, shape) -> _Spec:
        tensors = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
            raise self.refuse(node, "concatenates tensors the tracer cannot follow")
        nd = len(shape) if shape is not None else 4
        dim = int(dim) % nd
        specs = [self.spec.get(t) for t in tensors]
        if dim == 1:
            segments: list[tuple[int, int]] = []
            for t, sp in zip(tensors, specs):
                if sp is None:
                    tsh = _meta_shape(t)
                    if tsh is None:
                        raise self.refuse(node, "concatenates a tensor of unknown shape")
                    sp = _Spec(((self.new_source(tsh[1], None, f"constant input of {node.name}"), tsh[1]),))
                if sp.stride != 1:
                    raise self.refuse(node, "concatenates flattened tensors")
                segments.extend(sp.segments)
            return _Spec(tuple(segments))
        if dim == 0:
            raise self.refuse(node, "concatenates along the batch dimension")
        present = [sp for sp in specs if sp is not None]
        return self.couple(node, present)

    # groups
    def finish(self, input_shape, output_shape) -> tuple[ChannelGraph, list[fx.Node]]:
        uf = self.uf
        n = len(self.src_size)
        root_fixed: dict[int, str] = {}
        for s, why in self.fixed.items():
            root_fixed.setdefault(uf.find(s), why)
        for s in range(n):
            if self.src_owner[s] is None:
                root_fixed.setdefault(uf.find(s), "not produced by a convolution")
        members: dict[int, list[str]] = {}
        for s in range(n):
            r = uf.find(s)
            if self.src_size[s] != self.src_size[r]:
                raise UnsupportedModelError(
                    f"make_droppable: coupled channels of different sizes ({self.src_size[s]} and {self.src_size[r]})"
                )
            if self.src_owner[s] is not None:
                members.setdefault(r, []).append(self.src_owner[s])
        group_of_root: dict[int, int] = {}
        groups: list[DropoutGroupInfo] = []
        kept_whole: dict[str, str] = {}
        # Forward order: the order in which each group's first producer appears.
        for s in range(n):
            r = uf.find(s)
            owner = self.src_owner[s]
            if owner is None:
                continue
            if r in root_fixed:
                kept_whole.setdefault(owner, root_fixed[r])
                continue
            if r not in group_of_root:
                group_of_root[r] = len(groups)
                groups.append(DropoutGroupInfo(owner, self.src_size[r], list(members[r])))

        def space(spec: _Spec) -> InputSpace:
            segs: list[tuple[int, int]] = []
            for s, c in spec.segments:
                g = group_of_root.get(uf.find(s), -1)
                if segs and g == -1 and segs[-1][0] == -1:
                    segs[-1] = (-1, segs[-1][1] + c)
                else:
                    segs.append((g, c))
            return InputSpace(tuple(segs), spec.stride)

        layers: list[ComputeLayer] = []
        for kind, name, node, spec, src, area, k in self.pending:
            m = self.modules[name]
            out_group = group_of_root.get(uf.find(src), -1) if src >= 0 else -1
            out_ch = getattr(m, "out_channels", getattr(m, "out_features", getattr(m, "num_features", 0)))
            layers.append(ComputeLayer(name, kind, space(spec), out_group, int(out_ch), int(area), int(k)))
        graph = ChannelGraph(groups, layers, tuple(input_shape), tuple(output_shape), kept_whole)
        return graph, self.rewrites


def trace_channel_graph(
    module: nn.Module,
    example_input: Tensor,
    keep_full: Sequence[str] = (),
) -> tuple[ChannelGraph, fx.GraphModule]:
    """Trace ``module`` (in its current mode) and derive its dropout groups.

    Parameters
    ----------
    module : nn.Module
        Any PyTorch CNN whose forward takes one image batch.
    example_input : Tensor
        A batch of the shape the model is trained on (its spatial size fixes the MACs).
    keep_full : sequence of str
        Qualified names of submodules treated as opaque: their input and output channels are
        never dropped (e.g. an attention block).

    Returns
    -------
    (ChannelGraph, torch.fx.GraphModule)
        The groups and sliced layers; the traced graph module (flattening views rewritten as
        ``torch.flatten(x, 1)`` so they follow the kept channel count).

    Raises
    ------
    UnsupportedModelError
        If tracing fails or an op on channel-carrying tensors is not supported; the message
        names the graph node and op.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"make_droppable needs an nn.Module, got {type(module).__name__}")
    if not isinstance(example_input, Tensor) or example_input.dim() < 2:
        raise ValueError("example_input must be a batch tensor (N, C, ...), e.g. torch.zeros(2, 3, 32, 32)")
    names = dict(module.named_modules())
    unknown = [k for k in keep_full if k not in names]
    if unknown:
        raise ValueError(f"keep_full names no submodule: {unknown}")
    graph = trace(module, keep_full)
    gm = fx.GraphModule(module, graph)
    # Shapes are read in eval mode, so that BatchNorm's running statistics stay as they are.
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as err:
        raise ValueError(
            f"the model failed on example_input of shape {tuple(example_input.shape)}: {err}"
        ) from err
    finally:
        for m, mode in modes.items():
            m.training = mode
    analysis = _Analysis(gm, set(keep_full))
    analysis.run()
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_arg = out_node.args[0]
    out_shape = _meta_shape(out_arg) if isinstance(out_arg, fx.Node) else None
    cg, rewrites = analysis.finish(tuple(example_input.shape[1:]), tuple(out_shape[1:]) if out_shape else ())
    for node in rewrites:
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(torch.flatten, (node.args[0], 1))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return cg, gm
