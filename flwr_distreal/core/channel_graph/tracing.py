"""Tracing with ``torch.fx``: the tracer (torch.nn's layers and the ``keep_full`` modules are its
leaves), shape and FLOP propagation, the source location of a refused node, and
:func:`trace_channel_graph`, which ties tracing and the analysis together.

Part of :mod:`flwr_distreal.core.channel_graph` (import the public names from there).
"""

from __future__ import annotations

import os
import re
import traceback
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

from .analysis import _Analysis
from .graph import ChannelGraph, UnsupportedModelError
from .ops import _meta_shape

#: This package's folder: its frames are left out of the locations named in errors (as are
#: PyTorch's), so that the location is the user's code.
_PACKAGE_DIR = os.path.dirname(__file__) + os.sep


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
    for fr in reversed(frames):
        if not fr.filename.startswith(torch_dir) and not fr.filename.startswith(_PACKAGE_DIR):
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
        frames = [
            f for f in _FRAME.findall(node.stack_trace)
            if not f[0].startswith(torch_dir) and not f[0].startswith(_PACKAGE_DIR)
        ]
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
