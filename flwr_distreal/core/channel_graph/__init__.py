"""The channel graph of any PyTorch CNN, discovered by tracing (``torch.fx``).

Structured filter dropout (Rapp et al., AAAI 2022, Fig. 1) removes whole filters of a
convolution; every layer that reads those channels must then read only the kept ones. Which
layers read which channels is a property of the model's data flow, so this package derives it
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

The package is the public import path (``from flwr_distreal.core.channel_graph import ...``);
its parts, by concern: :mod:`.graph` (the result: :class:`ChannelGraph`, :class:`ComputeLayer`,
:class:`InputSpace`, and the refusal :class:`UnsupportedModelError`), :mod:`.ops` (which ops
are channel-wise), :mod:`.analysis` (the group derivation over the traced graph) and
:mod:`.tracing` (``torch.fx`` tracing and :func:`trace_channel_graph`).

This package has no Flower or Hydra imports.
"""

from __future__ import annotations

from .graph import ChannelGraph, ComputeLayer, DropoutGroupInfo, InputSpace, UnsupportedModelError
from .tracing import trace, trace_channel_graph  # noqa: F401 - trace: public, not in __all__

__all__ = [
    "ChannelGraph",
    "ComputeLayer",
    "DropoutGroupInfo",
    "InputSpace",
    "UnsupportedModelError",
    "trace_channel_graph",
]
