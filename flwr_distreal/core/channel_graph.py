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
  spatial reductions, spatial padding, indexing and permutations that leave dimensions 0 and 1
  in place, splits along a spatial dimension, reshapes that keep dimensions 0 and 1) keeps the
  channels as they are;
* **concatenation** along channels lays its operands' channels side by side (offset ranges,
  as DenseNet needs); constant **padding of the channel dimension** (``F.pad`` with a pad tuple
  that reaches dimension 1, as the zero-padding "option A" shortcuts of CIFAR ResNets do) is a
  concatenation with zero channels that are never dropped;
* **residual addition** (and any element-wise op between two channel-carrying tensors)
  *couples* its operands: the channels at the same position must be kept together, so their
  sources join one group (union-find); operands whose channels are split differently (e.g. a
  zero-padded shortcut added to a convolution's output) are kept whole;
* **depthwise convolution** (``groups == in_channels == out_channels``) couples its output
  with its input; other grouped convolutions (a depthwise one with a channel multiplier
  included) keep their input and output whole;
* **flatten into linear** expands each channel into ``stride`` features (the spatial size);
* the network's **output** (the classifier) is never dropped, nor is anything coupled to the
  input or to a linear layer's output.

A *dropout group* is a set of coupled convolution outputs: it gets one rate of the dropout
vector and one kept set of filters per mini-batch. Anything the tracer cannot follow
(data-dependent control flow) or an operation on droppable channels that is not known to be
channel-wise (attention and matrix products, channel shuffles, splits or selections of
channels, reductions or softmax over channels, permutations that move the channel dimension,
torch.nn layers such as ``nn.MultiheadAttention``, ...) is refused with an error naming the
graph node, its op, where it is in the source and which submodule to keep whole with
``keep_full``. Such an operation on tensors whose channels are never dropped anyway (the
network input, a linear layer's output, a ``keep_full`` module's output, ...) is accepted as
an opaque part of the model whose output is never dropped either.

MACs: compute outside the sliced layers (the ``keep_full`` modules, matrix products on
channels kept whole) does not depend on the dropout vector; tracing measures it once with
``FlopCounterMode`` (:attr:`ChannelGraph.fixed_macs`), so the MACs of a dropout vector stay
exact for such models too.

This module has no Flower or Hydra imports.
"""

from __future__ import annotations

import operator
import re
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "ChannelGraph",
    "ComputeLayer",
    "DropoutGroupInfo",
    "InputSpace",
    "UnsupportedModelError",
    "trace_channel_graph",
]


class UnsupportedModelError(ValueError):
    """The model cannot be made droppable; the message names the graph node and op.

    Attributes
    ----------
    node : str or None
        Name of the refused graph node (``None`` when the refusal is not about one node).
    """

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


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
    F.interpolate, torch.clamp, torch.clip, torch.abs, torch.neg, torch.exp,
    operator.neg, torch.square,
}
_PASS_METHODS: set[str] = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
    "contiguous", "clone", "detach", "float", "half", "bfloat16", "to", "type_as", "abs",
    "neg", "exp", "square", "requires_grad_",
}
#: Functions of other libraries known to act per sample and channel, by (module, name): fx
#: sees them as calls when the library wraps them (torchvision's stochastic depth does).
_PASS_EXTERNAL: set[tuple[str, str]] = {("torchvision.ops.stochastic_depth", "stochastic_depth")}
_ELEMENTWISE: set[Any] = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
_ELEMENTWISE_METHODS: set[str] = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "expand_as"}
_REDUCTIONS_FN: set[Any] = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCTIONS_METHODS: set[str] = {"mean", "sum", "amax", "amin"}
_FLATTEN_METHODS: set[str] = {"view", "reshape", "flatten"}
#: Methods and attributes that read a tensor's metadata, not its values.
_META_METHODS: set[str] = {"size", "dim", "ndimension", "get_device", "is_contiguous", "is_floating_point"}
_META_ATTRS: set[str] = {"shape", "ndim", "dtype", "device", "is_cuda", "layout", "requires_grad"}
_SPLIT_FN: set[Any] = {torch.chunk, torch.split, torch.unbind, torch.tensor_split}
_SPLIT_METHODS: set[str] = {"chunk", "split", "unbind", "tensor_split", "split_with_sizes"}
_PERMUTE_FN: set[Any] = {torch.permute, torch.transpose, torch.swapaxes, torch.swapdims, torch.movedim, torch.moveaxis}
_PERMUTE_METHODS: set[str] = {"permute", "transpose", "transpose_", "swapaxes", "swapdims", "movedim", "moveaxis"}
_SQUEEZE_FN: set[Any] = {torch.squeeze, torch.unsqueeze}
_SQUEEZE_METHODS: set[str] = {"squeeze", "unsqueeze", "squeeze_", "unsqueeze_"}
_SOFTMAX_FN: set[Any] = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax}
_SOFTMAX_METHODS: set[str] = {"softmax", "log_softmax"}
_MATMUL_FN: set[Any] = {
    torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.einsum, torch.baddbmm, torch.addmm,
    torch.addbmm, torch.tensordot, F.linear, F.bilinear, F.scaled_dot_product_attention,
}
_MATMUL_METHODS: set[str] = {"matmul", "bmm", "mm", "baddbmm", "addmm"}


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
    torch_dir = torch.__file__.rsplit("/", 1)[0] + "/"
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
    #: (module or node name, MACs per sample) of compute outside the sliced layers (keep_full
    #: modules, matrix products on channels kept whole): the same under every dropout vector.
    fixed_macs: list[tuple[str, int]] = field(default_factory=list)

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


def _is_tuple_value(node: Any) -> bool:
    """Whether a traced value is a tuple or list (e.g. the pieces of a split)."""
    if not isinstance(node, fx.Node):
        return False
    tm = node.meta.get("tensor_meta")
    return isinstance(tm, (tuple, list)) and not hasattr(tm, "shape")  # TensorMetadata is a NamedTuple


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"module {node.target}: {type(modules[node.target]).__name__}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return str(node.target)


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` (counting the tensor itself as 0) or keyword ``name`` of a call."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_full_slice(item: Any, size: int) -> bool:
    """Whether an index item keeps every entry of a dimension of ``size`` (any smaller size too)."""
    if not isinstance(item, slice):
        return False
    start, stop, step = item.start, item.stop, item.step
    return (
        step in (None, 1)
        and start in (None, 0)
        and (stop is None or (isinstance(stop, int) and not isinstance(stop, bool) and stop >= size))
    )


def _reshape_keep_channels(x: Tensor, *tail: Any) -> Tensor:
    """``x.reshape(batch, channels, *tail)`` with the batch and channel sizes read at run time.

    Replaces a user's reshape that keeps dimensions 0 and 1 but names their sizes as numbers
    (``x.view(2, 64, -1)``), so that it follows the kept channel count under dropout.
    """
    return x.reshape(x.shape[0], x.shape[1], *tail)


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
        # Values that are tuples/lists of tensors: "same" (every item has the node's layout,
        # e.g. a split along a spatial dimension) or "fixed" (each item is kept whole).
        self.containers: dict[fx.Node, str] = {}
        self.pending: list[tuple[str, str, fx.Node, _Spec, int, int, int]] = []
        self.rewrites: list[tuple[fx.Node, Any, tuple[Any, ...]]] = []  # (node, function, args after x)

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

    def fixed_roots(self) -> set[int]:
        """Roots of the sources that are (so far) kept whole."""
        find = self.uf.find
        return {find(s) for s in range(len(self.src_size)) if s in self.fixed or self.src_owner[s] is None}

    def all_fixed(self, specs: Sequence[_Spec]) -> bool:
        """Whether every channel of ``specs`` is (already) kept whole."""
        roots = self.fixed_roots()
        return all(self.uf.find(s) in roots for sp in specs for s, _ in sp.segments)

    def refuse(self, node: fx.Node, why: str) -> UnsupportedModelError:
        if node.op == "call_module":
            hint = f"keep_full=[{str(node.target)!r}]"
        else:
            stack = node.meta.get("nn_module_stack") or {}
            holders = [v[0] if isinstance(v, tuple) else k for k, v in stack.items()]
            holders = [h for h in holders if h and not isinstance(self.modules.get(h), (nn.Sequential, nn.ModuleList))]
            hint = (
                f"keep_full=[{holders[-1]!r}]" if holders
                else "keep_full=[...] naming a submodule (this op is in the model's own forward: move it into one)"
            )
        return UnsupportedModelError(
            f"make_droppable: graph node {node.name!r} ({_op_name(node, self.modules)}) {why}. "
            f"To keep the part that holds it whole (its input and output channels are then never "
            f"dropped), pass {hint}.",
            node=node.name,
        )

    def couple(self, node: fx.Node, specs: list[_Spec]) -> _Spec:
        base = specs[0]
        for other in specs[1:]:
            if [c for _, c in other.segments] == [c for _, c in base.segments] and other.stride == base.stride:
                for (a, _), (b, _) in zip(base.segments, other.segments):
                    self.uf.union(a, b)
            elif other.channels * other.stride == base.channels * base.stride:
                # Same channel count, different splits: keep everything involved whole.
                self.fix(base, f"element-wise op {node.name} between differently split tensors")
                self.fix(other, f"element-wise op {node.name} between differently split tensors")
            else:
                raise self.refuse(node, f"combines tensors of {base.channels} and {other.channels} channels")
        return base

    def opaque(self, node: fx.Node) -> _Spec | None:
        """The output of an op that reads only channels kept whole: kept whole as well."""
        if _is_tuple_value(node):
            self.containers[node] = "fixed"
            return None
        shape = _meta_shape(node)
        if shape is None or len(shape) < 2:
            return None
        reason = f"output of {node.name} ({_op_name(node, self.modules)}), computed from channels kept whole"
        return _Spec(((self.new_source(shape[1], None, reason), shape[1]),))

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
        if node.op not in ("call_module", "call_function", "call_method"):
            raise self.refuse(node, "is of an unknown kind")
        if node.op == "call_function" and node.target is operator.getitem:
            src = node.args[0]
            if isinstance(src, fx.Node) and src in self.containers:
                return self.container_item(node, src)
        specs = self.arg_specs(node)
        try:
            if node.op == "call_module":
                return self.visit_module(node, self.modules[node.target], shape)
            if not specs:
                return None
            return self.visit_function(node, shape)
        except UnsupportedModelError:
            # An op that reads only channels kept whole cannot be affected by dropout: it is
            # kept as it is (its compute, if any, is counted in fixed_macs). Convolutions and
            # BatchNorm layers are the exception: their refusals are about their own input.
            sliced_kind = node.op == "call_module" and isinstance(
                self.modules[node.target], (nn.Conv2d, nn.modules.batchnorm._BatchNorm)
            )
            if specs and not sliced_kind and self.all_fixed([sp for _, sp in specs]):
                return self.opaque(node)
            raise

    def container_item(self, node: fx.Node, src: fx.Node) -> _Spec | None:
        kind = self.containers[src]
        if _is_tuple_value(node):  # a slice of the tuple
            self.containers[node] = kind
            return self.spec.get(src) if kind == "same" else None
        if kind == "same":
            return self.spec.get(src)
        return self.opaque(node)

    def input_spec(self, node: fx.Node) -> _Spec | None:
        first = node.args[0] if node.args else None
        return self.spec.get(first) if isinstance(first, fx.Node) else None

    def visit_module(self, node: fx.Node, m: nn.Module, shape) -> _Spec | None:
        name = str(node.target)
        x = self.input_spec(node)
        if name in self.keep_full:
            for _, sp in self.arg_specs(node):
                self.fix(sp, f"read by {name}, kept whole (keep_full)")
            if _is_tuple_value(node):
                self.containers[node] = "fixed"
                return None
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
            # A grouped convolution, or a depthwise one with a channel multiplier
            # (out_channels = m * in_channels): input and output kept whole.
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
        if isinstance(m, (nn.Softmax, nn.LogSoftmax)) and x is not None:
            return self.softmax_dim(node, x, m.dim)
        if isinstance(m, _PASS_MODULES):
            return x
        if x is None and not self.arg_specs(node):
            return None
        raise self.refuse(
            node,
            "is a layer that is not known to treat channels independently (attention, recurrent "
            "and normalisation layers mix channels or need all of them)",
        )

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
        if start == 1 and end == 1:
            return x
        raise self.refuse(node, "flattens the channel dimension into another one")

    def visit_function(self, node: fx.Node, shape) -> _Spec | None:
        target = node.target
        method = node.op == "call_method"

        def among(functions: set[Any], methods: set[str]) -> bool:
            return target in methods if method else target in functions

        specs = self.arg_specs(node)
        x = self.input_spec(node)
        if among(set(), _META_METHODS) or (
            not method and target is getattr and len(node.args) > 1 and node.args[1] in _META_ATTRS
        ):
            return None  # metadata (sizes follow the kept channels at run time)
        external = (getattr(target, "__module__", None), getattr(target, "__name__", None))
        if among(_PASS_FUNCTIONS, _PASS_METHODS) or (not method and external in _PASS_EXTERNAL):
            if x is None:  # e.g. clamp(min=tensor)
                raise self.refuse(node, "applies a channel-wise op to a tensor in a non-leading argument")
            return x
        if not method and target is F.pad:
            return self.pad(node, x)
        if among(_ELEMENTWISE, _ELEMENTWISE_METHODS):
            return self.elementwise(node, specs, shape)
        if not method and (target is torch.cat or target is torch.concat):
            return self.concat(node, shape)
        if (not method and target is torch.flatten) or (method and target == "flatten"):
            start = _arg(node, 1, "start_dim", 0)
            end = _arg(node, 2, "end_dim", -1)
            if start == 0:
                raise self.refuse(node, "flattens the batch dimension")
            return self.flatten(node, x, int(start), int(end))
        if (method and target in _FLATTEN_METHODS) or (not method and target is torch.reshape):
            return self.reshape(node, x, shape)
        if among(_REDUCTIONS_FN, _REDUCTIONS_METHODS):
            dims = _arg(node, 1, "dim")
            in_shape = _meta_shape(node.args[0])
            if dims is None or in_shape is None:
                raise self.refuse(node, "reduces over every dimension, channels included")
            dims = [dims] if isinstance(dims, int) else list(dims)
            nd = len(in_shape)
            if any(d % nd in (0, 1) for d in dims):
                raise self.refuse(node, "reduces over the channel (or batch) dimension")
            return x
        if not method and target is operator.getitem and x is not None:
            return self.index(node, x)
        if among(_SPLIT_FN, _SPLIT_METHODS) and x is not None:
            return self.split(node, x)
        if among(_PERMUTE_FN, _PERMUTE_METHODS) and x is not None:
            return self.permute(node, x)
        if among(_SQUEEZE_FN, _SQUEEZE_METHODS) and x is not None:
            return self.squeeze(node, x, shape)
        if among(_SOFTMAX_FN, _SOFTMAX_METHODS) and x is not None:
            return self.softmax_dim(node, x, _arg(node, 1, "dim"))
        if among(_MATMUL_FN, _MATMUL_METHODS):
            raise self.refuse(
                node,
                "multiplies matrices of channel-carrying tensors (as attention does): the product "
                "sums over or mixes channels, so it cannot follow which are dropped",
            )
        raise self.refuse(node, "is not known to treat channels independently")

    def pad(self, node: fx.Node, x: _Spec | None) -> _Spec:
        """``F.pad``: spatial padding is channel-wise; constant padding of the channel dimension
        lays zero channels (never dropped) before and after the input's channels."""
        if x is None:
            raise self.refuse(node, "pads a tensor given in a non-leading argument")
        pad = _arg(node, 1, "pad")
        mode = _arg(node, 2, "mode", "constant")
        in_shape = _meta_shape(node.args[0])
        if not isinstance(pad, (list, tuple)) or in_shape is None:
            raise self.refuse(node, "pads by amounts the tracer cannot read")
        nd = len(in_shape)
        padded = len(pad) // 2  # the last `padded` dimensions
        if padded <= nd - 2:
            return x  # spatial padding only
        if padded >= nd:
            raise self.refuse(node, "pads the batch dimension")
        before, after = pad[2 * (nd - 2)], pad[2 * (nd - 2) + 1]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (before, after)):
            raise self.refuse(node, "pads the channel dimension by an amount computed at run time")
        if before == 0 and after == 0:
            return x
        if mode != "constant":
            raise self.refuse(node, f"pads the channel dimension in mode {mode!r} (copies of edge channels, which change under dropout)")
        if before < 0 or after < 0:
            raise self.refuse(node, "crops the channel dimension (negative padding)")
        if x.stride != 1:
            raise self.refuse(node, "pads the features of a flattened tensor")
        segments = list(x.segments)
        reason = f"constant channels padded by {node.name}"
        if before:
            segments.insert(0, (self.new_source(before, None, reason), before))
        if after:
            segments.append((self.new_source(after, None, reason), after))
        return _Spec(tuple(segments))

    def index(self, node: fx.Node, x: _Spec) -> _Spec:
        """``x[...]``: allowed when dimension 0 is sliced (not picked) and dimension 1 is kept
        whole and stays dimension 1."""
        src = node.args[0]
        if _is_tuple_value(src):
            return x  # an item of a tuple of channel-wise results (e.g. max-pool indices)
        in_shape = _meta_shape(src)
        idx = node.args[1]
        items = idx if isinstance(idx, tuple) else (idx,)
        if in_shape is None:
            raise self.refuse(node, "indexes a tensor of unknown shape")
        for it in items:
            if isinstance(it, (list, Tensor)) or (isinstance(it, fx.Node) and _meta_shape(it) is not None):
                raise self.refuse(node, "indexes a channel-carrying tensor with a tensor or list (advanced indexing), which can pick or reorder channels")
        nd = len(in_shape)
        n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
        d_in = d_out = 0
        ch_out: int | None = None
        for it in items:
            if it is Ellipsis:
                skip = max(nd - n_real, 0)
                if d_in <= 1 < d_in + skip:
                    ch_out = d_out + (1 - d_in)
                d_in += skip
                d_out += skip
                continue
            if it is None:
                d_out += 1
                continue
            if d_in == 1:
                if not _is_full_slice(it, in_shape[1]):
                    raise self.refuse(node, f"selects channels (index {it!r} on the channel dimension), which change under dropout")
                ch_out = d_out
            elif d_in == 0 and not isinstance(it, slice):
                raise self.refuse(node, "picks one sample (an integer index on the batch dimension), which moves the channels to dimension 0")
            d_in += 1
            if isinstance(it, slice):
                d_out += 1
        if ch_out is None and d_in <= 1:
            ch_out = d_out + (1 - d_in)
        if ch_out != 1:
            raise self.refuse(node, f"moves the channel dimension to dimension {ch_out}")
        return x

    def split(self, node: fx.Node, x: _Spec) -> _Spec | None:
        """chunk/split/unbind: fine along a spatial (or the batch) dimension, not the channels."""
        in_shape = _meta_shape(node.args[0])
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        dim = _arg(node, 1, "dim", 0) if name == "unbind" else _arg(node, 2, "dim", 0)
        if in_shape is None or not isinstance(dim, int):
            raise self.refuse(node, "splits along a dimension the tracer cannot read")
        if dim % len(in_shape) == 1:
            raise self.refuse(
                node,
                f"splits the channel dimension ({name}): which channels each piece holds, and how "
                "many, change under dropout (a channel split, as ShuffleNet's, cannot be followed)",
            )
        if name == "unbind" and dim % len(in_shape) == 0:
            raise self.refuse(node, "unbinds the batch dimension, which moves the channels to dimension 0")
        self.containers[node] = "same"
        return x

    def permute(self, node: fx.Node, x: _Spec) -> _Spec:
        """permute/transpose/movedim: fine when dimensions 0 and 1 stay where they are."""
        in_shape = _meta_shape(node.args[0])
        if in_shape is None:
            raise self.refuse(node, "permutes a tensor of unknown shape")
        nd = len(in_shape)
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        perm = list(range(nd))
        try:
            if name == "permute":
                dims = node.args[1:] if node.args[1:] else (node.kwargs.get("dims"),)
                if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                    dims = tuple(dims[0])
                perm = [int(d) % nd for d in dims]
            elif name in ("movedim", "moveaxis"):
                src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
                src = [src] if isinstance(src, int) else list(src)
                dst = [dst] if isinstance(dst, int) else list(dst)
                perm = _movedim_perm(nd, src, dst)
            else:  # transpose, swapaxes, swapdims
                a, b = int(_arg(node, 1, "dim0")) % nd, int(_arg(node, 2, "dim1")) % nd
                perm[a], perm[b] = perm[b], perm[a]
        except (TypeError, ValueError) as err:
            raise self.refuse(node, f"permutes dimensions the tracer cannot read ({err})") from err
        if perm[:2] != [0, 1]:
            raise self.refuse(
                node,
                f"moves the channel dimension (dimension order {tuple(perm)}), as attention over "
                "tokens and channel shuffles do: the ops after it would mix channels",
            )
        return x

    def squeeze(self, node: fx.Node, x: _Spec, shape) -> _Spec:
        name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        in_shape = _meta_shape(node.args[0])
        dim = _arg(node, 1, "dim")
        if in_shape is None or shape is None:
            raise self.refuse(node, f"{name}s a tensor of unknown shape")
        if dim is None:
            raise self.refuse(node, "squeezes every size-1 dimension, which removes the channel dimension when one channel is kept")
        dims = [dim] if isinstance(dim, int) else list(dim)
        nd = len(shape) if name.startswith("unsqueeze") else len(in_shape)
        if any(int(d) % nd < 2 for d in dims):
            raise self.refuse(node, f"{name}s dimension {dim}, which moves or removes the channel dimension")
        return x

    def softmax_dim(self, node: fx.Node, x: _Spec, dim: Any) -> _Spec:
        in_shape = _meta_shape(node.args[0])
        if dim is None or in_shape is None or not isinstance(dim, int) or dim % len(in_shape) == 1:
            raise self.refuse(node, "normalises over the channel dimension (softmax), which needs every channel")
        return x

    def reshape(self, node: fx.Node, x: _Spec | None, shape) -> _Spec:
        in_shape = _meta_shape(node.args[0])
        if x is None or in_shape is None or shape is None:
            raise self.refuse(node, "reshapes a tensor of unknown shape")
        if len(shape) == 2 and shape[0] == in_shape[0] and len(in_shape) == 2:
            # (N, features) to itself: written as torch.flatten(x, 1), so that numbers in the
            # user's view follow the kept features
            self.rewrites.append((node, torch.flatten, (1,)))
            return x
        if len(shape) == 2 and shape[0] == in_shape[0] and len(in_shape) > 2:
            out = self.flatten(node, x, 1, -1)
            self.rewrites.append((node, torch.flatten, (1,)))
            return out
        if len(shape) >= 3 and len(in_shape) >= 2 and shape[:2] == in_shape[:2] and x.stride == 1:
            # Dimensions 0 and 1 kept (a no-op view included): their sizes are read at run time.
            sizes = node.args[1:]
            if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
                sizes = tuple(sizes[0])
            if not sizes:
                sizes = tuple(node.kwargs.get("shape", ()))
            tail = tuple(sizes[2:]) if len(sizes) == len(shape) else shape[2:]
            self.rewrites.append((node, _reshape_keep_channels, tuple(tail)))
            return x
        if len(shape) > len(in_shape) and shape[0] == in_shape[0] and shape[1] * shape[2] == in_shape[1]:
            raise self.refuse(
                node,
                f"splits the channel dimension into {shape[1]} x {shape[2]} (a channel shuffle or "
                "grouped reshape): the channel order it relies on does not survive dropout",
            )
        raise self.refuse(node, f"reshapes {in_shape} to {shape}, which moves channels")

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
    def finish(self, input_shape, output_shape, batch: int) -> tuple[ChannelGraph, list[tuple[fx.Node, Any, tuple]]]:
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
        # Compute outside the sliced layers reads only channels kept whole: constant MACs.
        sliced = {id(node) for _, _, node, *_ in self.pending}
        fixed_macs: list[tuple[str, int]] = []
        for node in self.gm.graph.nodes:
            flops = int(node.meta.get("flops", 0))
            if flops <= 0 or id(node) in sliced:
                continue
            for a, sp in self.arg_specs(node):
                if any(uf.find(s) in group_of_root for s, _ in sp.segments):
                    raise self.refuse(node, "computes on droppable channels outside a sliced layer (an internal inconsistency)")
            label = str(node.target) if node.op == "call_module" else node.name
            fixed_macs.append((label, flops // 2 // max(batch, 1)))
        graph = ChannelGraph(groups, layers, tuple(input_shape), tuple(output_shape), kept_whole, fixed_macs)
        return graph, self.rewrites


def _movedim_perm(nd: int, src: list[int], dst: list[int]) -> list[int]:
    """The dimension order ``torch.movedim(x, src, dst)`` produces for an ``nd``-D tensor."""
    src = [int(s) % nd for s in src]
    dst = [int(d) % nd for d in dst]
    if len(src) != len(dst):
        raise ValueError("movedim needs as many sources as destinations")
    order: list[int | None] = [None] * nd
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(i for i in range(nd) if i not in src)
    return [o if o is not None else next(rest) for o in order]


class _ShapeFlops(ShapeProp):
    """Shape propagation that also records each node's FLOPs (``node.meta["flops"]``)."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        result = super().run_node(n)
        n.meta["flops"] = self.counter.get_total_flops() - before
        return result


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)')


def _node_location(module: nn.Module, keep_full: Sequence[str], node_name: str) -> str | None:
    """Where graph node ``node_name`` comes from in the source: 'file:line in fn: code'.

    Traces again with stack traces recorded (slow, so only when refusing a node).
    """
    tracer = _Tracer(set(keep_full))
    tracer.record_stack_traces = True
    try:
        graph = tracer.trace(module)
    except Exception:  # noqa: BLE001 - the first trace succeeded; this one only adds detail
        return None
    torch_dir = torch.__file__.rsplit("/", 1)[0] + "/"
    for node in graph.nodes:
        if node.name != node_name or not node.stack_trace:
            continue
        frames = [f for f in _FRAME.findall(node.stack_trace) if not f[0].startswith(torch_dir) and f[0] != __file__]
        if frames:
            file, line, fn, code = frames[-1]
            return f"{file}:{line} in {fn}: {code.strip()}"
    return None


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
        ``torch.flatten(x, 1)``, and reshapes that keep dimensions 0 and 1 rewritten to read
        their sizes at run time, so they follow the kept channel count).

    Raises
    ------
    UnsupportedModelError
        If tracing fails or an op on droppable channels is not supported; the message names
        the graph node, its op and its line in the source.
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
    # Shapes (and the FLOPs of every node) are read in eval mode, so that BatchNorm's running
    # statistics stay as they are, with the attention fast path off, so that layers such as
    # nn.MultiheadAttention compute (and are counted) as in training.
    modes = {m: m.training for m in module.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    try:
        module.eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            _ShapeFlops(gm, counter).propagate(example_input)
    except Exception as err:
        raise ValueError(
            f"the model failed on example_input of shape {tuple(example_input.shape)}: {err}"
        ) from err
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, mode in modes.items():
            m.training = mode
    analysis = _Analysis(gm, set(keep_full))
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_arg = out_node.args[0]
    out_shape = _meta_shape(out_arg) if isinstance(out_arg, fx.Node) else None
    try:
        analysis.run()
        cg, rewrites = analysis.finish(
            tuple(example_input.shape[1:]), tuple(out_shape[1:]) if out_shape else (), int(example_input.shape[0])
        )
    except UnsupportedModelError as err:
        where = _node_location(module, keep_full, err.node) if err.node else None
        if where is None:
            raise
        raise UnsupportedModelError(f"{err} (The node is at {where}.)", node=err.node) from err
    for node, function, extra in rewrites:  # extra: the arguments after the tensor
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(function, (node.args[0], *extra))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.recompile()
    return cg, gm
