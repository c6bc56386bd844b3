"""Group derivation: one pass over the traced graph that follows every value's channel layout.

Producers open channel sources, pass-through ops keep them, concatenations lay them side by
side, element-wise ops and depthwise convolutions couple them (union-find); an op on droppable
channels that is not known to be channel-wise is refused, naming the graph node. :meth:`_Analysis.finish`
turns the sources into dropout groups and the sliced layers' input spaces. Part of
:mod:`flwr_distreal.core.channel_graph`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .graph import ChannelGraph, ComputeLayer, DropoutGroupInfo, InputSpace, UnsupportedModelError
from .ops import (
    _ELEMENTWISE,
    _ELEMENTWISE_METHODS,
    _FLATTEN_METHODS,
    _MATMUL_FN,
    _MATMUL_METHODS,
    _META_ATTRS,
    _META_METHODS,
    _PASS_EXTERNAL,
    _PASS_FUNCTIONS,
    _PASS_METHODS,
    _PASS_MODULES,
    _PERMUTE_FN,
    _PERMUTE_METHODS,
    _REDUCTIONS_FN,
    _REDUCTIONS_METHODS,
    _SOFTMAX_FN,
    _SOFTMAX_METHODS,
    _SPLIT_FN,
    _SPLIT_METHODS,
    _SQUEEZE_FN,
    _SQUEEZE_METHODS,
    _arg,
    _is_full_slice,
    _is_tuple_value,
    _meta_shape,
    _movedim_perm,
    _op_name,
    _reshape_keep_channels,
)


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
