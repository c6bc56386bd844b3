"""Structured filter dropout with compact execution, for any PyTorch CNN.

The run-time half of DISTREAL (Rapp et al., AAAI 2022, section "Dropout to Reduce Computations
In Training", Fig. 1): whole convolution filters are dropped with one rate per *dropout group*
(the *dropout vector*). A training step keeps exactly ``kept_count(p, C)`` filters of a group of
``C`` channels, drawn uniformly at random anew for every forward pass (one forward = one
mini-batch), and **computes only those filters**.

:func:`make_droppable` takes a plain ``nn.Module`` and an example batch, traces the module
(:mod:`flwr_distreal.core.channel_graph`: producers, pass-through, concatenation, residual addition,
depthwise convolution, flatten into linear) and returns the same module with the dropout
interface. Nothing is declared by hand, and nothing of the user's model changes:

* the returned object is a copy of the module whose class is a subclass of the user's class
  (``isinstance(model, Net)`` holds, the user's methods and attributes are there), whose
  ``state_dict()`` has exactly the keys, shapes and values of the original;
* in eval mode, and in training without dropout, it runs the user's own ``forward``, so its
  output equals the original module's;
* in training with dropout it runs the traced forward, in which every convolution slices its
  weight to ``W[kept_out][:, alive_in]`` (no masking, no persistent weight copies, no module
  rebuild), BatchNorm normalises the alive channels only and writes its running statistics back
  for those channels only, a linear layer after a flatten reads the alive channels' features,
  and channel-wise operations (activations, pooling, concatenation, residual sums) act on the
  compact tensors as they are: coupled channels share one kept set, so the operands of a
  residual sum always carry the same channels.

Inverted-dropout rescaling: a layer that reads only ``k`` of a group's ``C`` channels multiplies
them by ``C / k`` so that it sees the full model's input in expectation. The factor is folded
into the (small) sliced weight of the *consuming* convolution or linear layer, i.e. applied
**after** any BatchNorm and activation between producer and consumer; BatchNorm therefore sees
unscaled values and its running statistics stay those of the full model used at inference.
A depthwise convolution reads one channel per filter and is not rescaled. The scaling is a
switch (:meth:`DroppableModel.set_inverted_scaling`, on by default): off, kept channels are
passed unscaled, as a repacked narrower network computes them (the submodel baselines').

Static BatchNorm (HeteroFL's sBN, :meth:`DroppableModel.set_static_bn`): in training, BatchNorm
normalises with the batch's statistics and leaves its running statistics untouched;
:func:`recompute_bn_statistics` recomputes them afterwards by a cumulative pass over data.

Switching the vector between mini-batches only changes a few Python integers
(:meth:`DroppableModel.set_dropout`), so it costs almost nothing. Gradients of dropped filters
are exactly zero (their weights are not part of the step's graph); :class:`DroppedWeightGuard`
keeps optimisers with momentum or weight decay from moving them.

The package is the public import path (``from flwr_distreal.core.dropout import ...``); its
parts, by concern: :mod:`.vector` (rates, :func:`kept_count`, :class:`DropoutGroup`),
:mod:`.compact` (the sliced layers' forwards: compact and mask execution), :mod:`.model`
(:class:`DroppableModel`, :func:`make_droppable`, :func:`require_droppable`), :mod:`.masks`
(:func:`parameter_masks`, :class:`DroppedWeightGuard`) and :mod:`.static_bn`
(:func:`recompute_bn_statistics`).

This package has no Flower or Hydra imports.
"""

from __future__ import annotations

from ..channel_graph import UnsupportedModelError
from .compact import _MIXINS  # noqa: F401 - read by flwr_distreal.core.submodel
from .masks import DroppedWeightGuard, parameter_masks
from .model import (  # noqa: F401 - ExecutionMode: public, not in __all__
    DropoutModel,
    DroppableModel,
    ExecutionMode,
    make_droppable,
    require_droppable,
)
from .static_bn import recompute_bn_statistics
from .vector import MAX_RATE, DropoutGroup, kept_count, validate_vector

__all__ = [
    "MAX_RATE",
    "DropoutGroup",
    "DropoutModel",
    "DroppableModel",
    "DroppedWeightGuard",
    "UnsupportedModelError",
    "kept_count",
    "make_droppable",
    "parameter_masks",
    "recompute_bn_statistics",
    "require_droppable",
    "validate_vector",
]
