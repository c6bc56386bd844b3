"""Exact forward multiply-accumulates (MACs) of a model under a dropout vector.

The paper represents resource requirements by the MACs of the forward pass (section
"Design-Time DSE", "Resource Requirements"; appendix equations per layer type). Because a
training step keeps an exact number of filters per layer (:func:`~flwr_distreal.core.dropout.kept_count`),
the MACs of a step are a deterministic function of the dropout vector, not just an expectation.

Counted are the multiply-accumulates of convolution and linear layers (as
``torch.utils.flop_counter.FlopCounterMode`` does, FLOPs / 2); a layer's input count depends on
the kept counts of the groups that feed it, as the traced channel graph
(:mod:`flwr_distreal.core.channel_graph`) records.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor

from .dropout import DroppableModel, kept_count, require_droppable, validate_vector

__all__ = ["count_macs", "kept_counts", "layer_macs", "macs_of_counts"]


def kept_counts(model: DroppableModel, vector: Sequence[float] | np.ndarray | Tensor | None = None) -> list[int]:
    """Filters kept per dropout layer under ``vector`` (``None`` = full model).

    Raises
    ------
    ValueError
        If the vector does not fit the model or holds rates outside [0, 0.5].
    """
    widths = require_droppable(model, "kept_counts").layer_widths
    if vector is None:
        return list(widths)
    rates = validate_vector(vector, len(widths))
    return [kept_count(p, c) for p, c in zip(rates.tolist(), widths)]


def _in_count(sources, counts: Sequence[int]) -> int:
    return sum(counts[src] if src >= 0 else ch for src, ch in sources)


def layer_macs(model: DroppableModel, counts: Sequence[int]) -> list[tuple[str, int]]:
    """Forward MACs per sample of every conv/linear call, given kept counts per dropout group.

    Read off the traced channel graph: a dense convolution costs
    ``area * kh * kw * k_out * k_in`` (``k_in`` the channels present in its input space), a
    depthwise one ``area * kh * kw * k`` (one input channel per filter), a grouped one its full
    cost (kept whole), a linear layer ``out * stride * k_in``; then the constant MACs of compute
    outside the sliced layers (``channel_graph.fixed_macs``: modules kept whole, ...).

    Parameters
    ----------
    model : DroppableModel
        The model.
    counts : sequence of int
        Filters kept per dropout group (length ``model.num_dropout_layers``).

    Returns
    -------
    list of (str, int)
        Module name and MACs, in forward order (a module called twice appears twice), the
        constant parts last.
    """
    widths = require_droppable(model, "layer_macs").layer_widths
    if len(counts) != len(widths):
        raise ValueError(f"got {len(counts)} kept counts for {len(widths)} dropout layers")
    for i, (k, w) in enumerate(zip(counts, widths)):
        if not 1 <= int(k) <= w:
            raise ValueError(f"layer {i} keeps {k} filters, must be in [1, {w}]")
    counts = [int(k) for k in counts]
    modules = dict(model.named_modules())
    out: list[tuple[str, int]] = []
    for layer in model.channel_graph.layers:
        if layer.kind == "bn":
            continue
        k_in = layer.space.kept(counts)
        if layer.kind == "conv":
            k_out = counts[layer.out_group] if layer.out_group >= 0 else layer.out_channels
            macs = layer.area * layer.macs_per_io * k_out * k_in
        elif layer.kind == "depthwise":
            macs = layer.area * layer.macs_per_io * k_in
        elif layer.kind == "conv_full":
            m = modules[layer.name]
            macs = layer.area * layer.macs_per_io * m.out_channels * (m.in_channels // m.groups)
        else:  # linear
            macs = layer.out_channels * layer.space.stride * k_in
        out.append((layer.name, int(macs)))
    # Compute outside the sliced layers (keep_full modules, ...) reads only channels kept whole.
    out.extend((name, int(macs)) for name, macs in model.channel_graph.fixed_macs)
    return out


def macs_of_counts(model: DroppableModel, counts: Sequence[int]) -> int:
    """Forward MACs per sample when each dropout layer keeps ``counts[i]`` filters."""
    return sum(m for _, m in layer_macs(model, counts))


def count_macs(model: DroppableModel, vector: Sequence[float] | np.ndarray | Tensor | None = None) -> int:
    """Exact forward MACs per sample of ``model`` under dropout vector ``vector``.

    Parameters
    ----------
    model : DroppableModel
        A model from :func:`flwr_distreal.models.build_model` or
        :func:`~flwr_distreal.core.dropout.make_droppable`.
    vector : sequence of float, optional
        One rate in [0, 0.5] per dropout layer; ``None`` counts the full model.

    Returns
    -------
    int
        Multiply-accumulates of one sample's forward pass through the compact model; equal to
        ``FlopCounterMode`` FLOPs / 2 / batch size for a training forward under ``vector``.
    """
    require_droppable(model, "count_macs")
    return macs_of_counts(model, kept_counts(model, vector))
