"""The vocabulary of the analysis: which modules, functions and tensor methods are channel-wise,
which combine, reduce, split or move the channel dimension, and helpers that read a traced node.

Part of :mod:`flwr_distreal.core.channel_graph`.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn


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
