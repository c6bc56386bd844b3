"""Exact forward multiply-accumulates (MACs) of a model under a dropout vector.

The paper represents resource requirements by the MACs of the forward pass (section
"Design-Time DSE", "Resource Requirements"; appendix equations per layer type). Because a
training step keeps an exact number of filters per layer (:func:`~flwr_distreal.dropout.kept_count`),
the MACs of a step are a deterministic function of the dropout vector, not just an expectation.

Counted are the multiply-accumulates of convolution and linear layers (as
``torch.utils.flop_counter.FlopCounterMode`` does, FLOPs / 2); a layer's input count depends on
the kept counts of the layers that feed it, as declared by the model's ``sources``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .dropout import CompactLinear, DropoutConv2d, DropoutModel, kept_count, validate_vector

__all__ = ["count_macs", "kept_counts", "layer_macs", "macs_of_counts"]


def _geometry(model: DropoutModel) -> list[tuple[nn.Module, int]]:
    """(compute layer, output spatial area) in forward order, traced once and cached."""
    cached = model.__dict__.get("_macs_geometry")
    if cached is not None:
        return cached
    areas: dict[int, int] = {}

    def hook(module: nn.Module, _inp, out) -> None:
        t = out.tensor if hasattr(out, "tensor") else out
        areas[id(module)] = int(np.prod(t.shape[2:])) if t.dim() > 2 else 1

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros((1, *model.input_shape), dtype=param.dtype, device=param.device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    geometry = [(m, areas[id(m)]) for m in layers if id(m) in areas]
    model.__dict__["_macs_geometry"] = geometry
    return geometry


def kept_counts(model: DropoutModel, vector: Sequence[float] | np.ndarray | Tensor | None = None) -> list[int]:
    """Filters kept per dropout layer under ``vector`` (``None`` = full model).

    Raises
    ------
    ValueError
        If the vector does not fit the model or holds rates outside [0, 0.5].
    """
    widths = model.layer_widths
    if vector is None:
        return list(widths)
    rates = validate_vector(vector, len(widths))
    return [kept_count(p, c) for p, c in zip(rates.tolist(), widths)]


def _in_count(sources, counts: Sequence[int]) -> int:
    return sum(counts[src] if src >= 0 else ch for src, ch in sources)


def layer_macs(model: DropoutModel, counts: Sequence[int]) -> list[tuple[str, int]]:
    """Forward MACs per sample of every conv/linear layer, given kept counts per dropout layer.

    Parameters
    ----------
    model : DropoutModel
        The model.
    counts : sequence of int
        Filters kept per dropout layer (length ``model.num_dropout_layers``).

    Returns
    -------
    list of (str, int)
        Module name and MACs, in forward order.
    """
    layers = model.dropout_layers
    if len(counts) != len(layers):
        raise ValueError(f"got {len(counts)} kept counts for {len(layers)} dropout layers")
    for i, (k, m) in enumerate(zip(counts, layers)):
        if not 1 <= int(k) <= m.out_channels:
            raise ValueError(f"layer {i} keeps {k} filters, must be in [1, {m.out_channels}]")
    pos = {id(m): i for i, m in enumerate(layers)}
    names = {id(m): n for n, m in model.named_modules()}
    out: list[tuple[str, int]] = []
    for module, area in _geometry(model):
        if isinstance(module, DropoutConv2d):
            kh, kw = module.kernel_size
            k_out = int(counts[pos[id(module)]])
            k_in = _in_count(module.sources, counts)
            macs = area * kh * kw * k_out * (k_in // module.groups)
        elif isinstance(module, CompactLinear):
            macs = module.out_features * module.stride * _in_count(module.sources, counts)
        elif isinstance(module, nn.Linear):
            macs = module.in_features * module.out_features
        else:  # a plain convolution that is not a dropout layer
            kh, kw = module.kernel_size
            macs = area * kh * kw * module.out_channels * (module.in_channels // module.groups)
        out.append((names[id(module)], int(macs)))
    return out


def macs_of_counts(model: DropoutModel, counts: Sequence[int]) -> int:
    """Forward MACs per sample when each dropout layer keeps ``counts[i]`` filters."""
    return sum(m for _, m in layer_macs(model, counts))


def count_macs(model: DropoutModel, vector: Sequence[float] | np.ndarray | Tensor | None = None) -> int:
    """Exact forward MACs per sample of ``model`` under dropout vector ``vector``.

    Parameters
    ----------
    model : DropoutModel
        A model from :func:`flwr_distreal.models.build_model`.
    vector : sequence of float, optional
        One rate in [0, 0.5] per dropout layer; ``None`` counts the full model.

    Returns
    -------
    int
        Multiply-accumulates of one sample's forward pass through the compact model; equal to
        ``FlopCounterMode`` FLOPs / 2 / batch size for a training forward under ``vector``.
    """
    return macs_of_counts(model, kept_counts(model, vector))
