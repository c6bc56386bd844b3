"""Physically narrow submodels of a droppable model (HeteroFL-style submodel extraction).

:func:`extract_submodel` turns a :class:`~flwr_distreal.core.dropout.DroppableModel` and a choice of
kept filters per dropout group into a *natively narrow* network: a plain ``nn.Module`` of the
user's own class whose sliced layers (every layer of ``model.channel_graph.layers``) have been
resized to the kept channels, and whose forward is the user's own forward running at the narrow
width. It is

* the "natively narrow model of the same kept widths" against which compact execution is timed
  (``scripts/bench_droppable.py``): the same MACs, computed by ordinary narrow layers with no
  per-step slicing;
* HeteroFL's submodel extraction (Diao, Ding and Tarokh, ICLR 2021, section 3.1, "Heterogeneous
  Models": a local model of width ``r`` keeps the first ``r`` of each layer's channels) when the
  kept filters are given as counts, and Federated Dropout's (Caldas et al. 2018) when they are
  given as index sets.

What is resized, per kind of :class:`~flwr_distreal.core.channel_graph.ComputeLayer`:

* ``conv``: weight ``W[kept_out][:, alive_in]`` (and the bias of the kept filters),
  ``in_channels``/``out_channels``;
* ``depthwise``: weight and bias of the alive channels, ``in_channels = out_channels =
  groups`` = their number;
* ``conv_full`` (grouped convolutions kept whole): unchanged;
* ``linear``: the columns of the alive channels' features (``stride`` features per channel
  after a flatten), ``in_features``;
* ``bn``: affine parameters and running statistics of the alive channels, ``num_features``.

With ``fold_scaling=True`` the inverted-dropout factor ``C / k`` of every consumer of a dropped
group is multiplied into its (narrow) weight, exactly as compact execution folds it in
(:mod:`flwr_distreal.core.dropout`); the submodel's output then equals the droppable model's compact
training forward with the same fixed subsets and inverted scaling on. With the default
``fold_scaling=False`` it equals the compact forward with inverted scaling off, i.e. the
narrower network as HeteroFL trains it.

This module has no Flower or Hydra imports.
"""

from __future__ import annotations

import copy
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .channel_graph import ComputeLayer, InputSpace
from .dropout import _MIXINS, DroppableModel, require_droppable

__all__ = ["extract_submodel", "plain_class", "resolve_kept"]

_MIXIN_TYPES = frozenset(_MIXINS.values())

KeptSpec = int | Tensor | Sequence[int] | None


def plain_class(cls: type) -> type:
    """The user's class behind a class that :func:`~flwr_distreal.core.dropout.make_droppable` derived.

    ``make_droppable`` gives the model the class ``Droppable<Net>(DroppableModel, Net)`` and each
    sliced layer ``Droppable<Conv2d>(<mixin>, Conv2d)``; this returns ``Net`` (``Conv2d``) and any
    other class unchanged.
    """
    while len(cls.__bases__) == 2 and (cls.__bases__[0] is DroppableModel or cls.__bases__[0] in _MIXIN_TYPES):
        cls = cls.__bases__[1]
    return cls


def resolve_kept(model: DroppableModel, kept: Sequence[KeptSpec]) -> list[Tensor | None]:
    """Kept filters per dropout group as sorted index tensors (``None`` = all).

    Parameters
    ----------
    model : DroppableModel
        The droppable model.
    kept : sequence
        One entry per dropout group, in vector order (:attr:`DroppableModel.dropout_layer_names`):
        an ``int`` ``k`` keeps the first ``k`` filters (HeteroFL), a sequence or tensor of
        indices keeps those filters (any order, no repeats), ``None`` keeps all.

    Returns
    -------
    list of Tensor or None
        Sorted ``long`` index tensors on the CPU; ``None`` where a group keeps all filters.

    Raises
    ------
    ValueError
        If the length does not match the model's groups, a count lies outside ``[1, C]``, or an
        index list is empty, out of range, repeated or not integral.
    """
    groups = require_droppable(model, "resolve_kept").dropout_groups
    if isinstance(kept, (Tensor, str)) or not isinstance(kept, Sequence):
        raise ValueError(
            f"kept must be a sequence with one entry per dropout group ({len(groups)}), got {type(kept).__name__}"
        )
    if len(kept) != len(groups):
        raise ValueError(f"got {len(kept)} kept entries for {len(groups)} dropout groups")
    out: list[Tensor | None] = []
    for i, (g, k) in enumerate(zip(groups, kept)):
        c = g.out_channels
        if k is None:
            out.append(None)
            continue
        if isinstance(k, numbers.Integral) and not isinstance(k, bool):
            k = int(k)
            if not 1 <= k <= c:
                raise ValueError(f"group {i} ({g.name}, {c} filters): kept count {k} is outside [1, {c}]")
            out.append(None if k == c else torch.arange(k))
            continue
        t = torch.as_tensor(k)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"group {i} ({g.name}): kept indices must be integers, got dtype {t.dtype}")
        t = t.to(torch.long).flatten().cpu()
        if t.numel() == 0:
            raise ValueError(f"group {i} ({g.name}): would keep no filter")
        if int(t.min()) < 0 or int(t.max()) >= c:
            raise ValueError(f"group {i} ({g.name}): filter index out of range [0, {c})")
        t = t.sort().values
        if t.numel() > 1 and bool((t[1:] == t[:-1]).any()):
            raise ValueError(f"group {i} ({g.name}): repeated filter index")
        out.append(None if t.numel() == c else t)
    return out


def _space(space: InputSpace, kept: Sequence[Tensor | None]) -> tuple[Tensor | None, Tensor | None]:
    """(alive channel indices, inverted-dropout scale per alive channel) of an input space.

    Both ``None`` when nothing of the space is dropped; the same layout as the compact
    execution's (segments side by side, kept indices shifted by the segment's offset).
    """
    parts = [(kept[g] if g >= 0 else None, c) for g, c in space.segments]
    if all(k is None for k, _ in parts):
        return None, None
    idx, scale, offset = [], [], 0
    for k, c in parts:
        if k is None:
            idx.append(torch.arange(offset, offset + c))
            scale.append(torch.ones(c))
        else:
            idx.append(k + offset)
            scale.append(torch.full((k.numel(),), c / k.numel()))
        offset += c
    return torch.cat(idx), torch.cat(scale)


def _replace(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace parameter or buffer ``name`` by ``value``, keeping its kind, layout and grad flag."""
    old = getattr(module, name)
    if old.dim() == 4 and old.is_contiguous(memory_format=torch.channels_last) and not old.is_contiguous():
        value = value.contiguous(memory_format=torch.channels_last)
    else:
        value = value.contiguous()
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        module._buffers[name] = value


def _narrow_layer(m: nn.Module, layer: ComputeLayer, kept: Sequence[Tensor | None], fold: bool) -> None:
    idx, scale = _space(layer.space, kept)
    if not fold:
        scale = None
    if layer.kind == "conv":
        out = kept[layer.out_group] if layer.out_group >= 0 else None
        w = m.weight.detach()
        if out is not None:
            w = w.index_select(0, out.to(w.device))
            if m.bias is not None:
                _replace(m, "bias", m.bias.detach().index_select(0, out.to(w.device)))
        if idx is not None:
            w = w.index_select(1, idx.to(w.device))
        if scale is not None:
            w = w * scale.to(w.device, w.dtype).view(1, -1, 1, 1)
        _replace(m, "weight", w)
        m.out_channels, m.in_channels = int(w.shape[0]), int(w.shape[1]) * m.groups
    elif layer.kind == "depthwise":
        if idx is None:
            return
        i = idx.to(m.weight.device)
        _replace(m, "weight", m.weight.detach().index_select(0, i))
        if m.bias is not None:
            _replace(m, "bias", m.bias.detach().index_select(0, i))
        m.in_channels = m.out_channels = m.groups = int(i.numel())
    elif layer.kind == "linear":
        if idx is None:
            return
        stride = layer.space.stride
        w = m.weight.detach().view(m.out_features, layer.space.channels, stride)
        w = w.index_select(1, idx.to(w.device))
        if scale is not None:
            w = w * scale.to(w.device, w.dtype).view(1, -1, 1)
        _replace(m, "weight", w.reshape(m.out_features, -1))
        m.in_features = int(idx.numel()) * stride
    elif layer.kind == "bn":
        if idx is None:
            return
        for pname in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(m, pname, None)
            if t is not None:
                _replace(m, pname, t.detach().index_select(0, idx.to(t.device)))
        m.num_features = int(idx.numel())
    # conv_full: grouped convolution kept whole, nothing to resize


def _strip(module: nn.Module) -> None:
    """Give a module of the copy its user's class back and drop the dropout machinery."""
    module.__class__ = plain_class(type(module))
    d = module.__dict__
    for key in [k for k in d if k.startswith("_dr_")]:
        del d[key]
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        d.pop("static_stats", None)
    d.pop("channel_graph", None)


def extract_submodel(
    model: DroppableModel,
    kept: Sequence[KeptSpec],
    *,
    fold_scaling: bool = False,
    check: bool = True,
) -> nn.Module:
    """A physically narrow copy of ``model`` that keeps the given filters of each dropout group.

    Parameters
    ----------
    model : DroppableModel
        A model from :func:`~flwr_distreal.core.dropout.make_droppable` or
        :func:`~flwr_distreal.models.build_model`. It is not changed.
    kept : sequence
        One entry per dropout group (see :func:`resolve_kept`): a count ``k`` keeps the first
        ``k`` filters (HeteroFL), an index list keeps those filters, ``None`` keeps all. For a
        dropout vector, pass ``flwr_distreal.core.macs.kept_counts(model, vector)``.
    fold_scaling : bool
        Multiply the inverted-dropout factor ``C / k`` into the weights of every consumer of a
        dropped group (as compact execution does). Off (default): the plain narrow network.
    check : bool
        Run one forward of two zero samples of ``model.input_shape`` (eval mode, no gradient)
        to make sure the user's forward runs at the narrow width (default).

    Returns
    -------
    nn.Module
        An instance of the user's own class (``type(model)`` without the dropout subclass; its
        layers of their own classes too), in ``model``'s training mode, on ``model``'s device,
        with resized parameters and buffers. Its output in training mode equals ``model``'s
        compact training forward under ``model.set_fixed_subsets(kept)`` (with inverted scaling
        on if ``fold_scaling``, off otherwise); a BatchNorm's running statistics are those of
        the kept channels.

    Raises
    ------
    TypeError
        If ``model`` is not droppable.
    ValueError
        If ``kept`` does not fit the model (:func:`resolve_kept`), a layer is shared with
        different channel layouts, or the narrow forward fails (typically a forward that
        hard-codes a channel count, e.g. ``x.view(-1, 1024)``: build the narrow network with
        its builder's widths instead).
    """
    model = require_droppable(model, "extract_submodel")
    kept_t = resolve_kept(model, kept)
    # Deep-copy the module tree but not the dropout state (groups, step state, generators,
    # channel graph): the memo maps them to None, and _strip removes the attributes.
    memo: dict[int, object] = {id(model._dr_state): None, id(model._dr_groups): None, id(model.channel_graph): None}
    for g in model._dr_groups:
        memo[id(g)] = None
    narrow = copy.deepcopy(model, memo)
    for m in narrow.modules():
        _strip(m)
    modules = dict(narrow.named_modules())
    seen: dict[str, ComputeLayer] = {}
    with torch.no_grad():
        for layer in model.channel_graph.layers:
            prev = seen.get(layer.name)
            if prev is not None:
                if (prev.kind, prev.space, prev.out_group) != (layer.kind, layer.space, layer.out_group):
                    raise ValueError(f"extract_submodel: module {layer.name!r} is called with different channel layouts")
                continue
            seen[layer.name] = layer
            _narrow_layer(modules[layer.name], layer, kept_t, bool(fold_scaling))
    if check:
        _check_forward(narrow, model)
    return narrow


def _check_forward(narrow: nn.Module, model: DroppableModel) -> None:
    shape = getattr(model, "input_shape", None)
    if shape is None:
        return
    try:
        device = next(narrow.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = narrow.training
    narrow.eval()
    try:
        with torch.no_grad():
            out = narrow(torch.zeros((2, *shape), device=device))
    except Exception as err:  # the user's forward: anything can go wrong
        raise ValueError(
            f"extract_submodel: {type(narrow).__name__}.forward fails at the narrow width "
            f"({type(err).__name__}: {err}). A forward that hard-codes a channel or feature count "
            "(e.g. x.view(-1, 1024)) cannot run narrower; build the narrow network with its "
            "builder's widths instead, or use x.flatten(1)."
        ) from err
    finally:
        narrow.train(was_training)
    want = model.channel_graph.output_shape
    if isinstance(out, Tensor) and want and tuple(out.shape[1:]) != tuple(want):
        raise ValueError(
            f"extract_submodel: the narrow {type(narrow).__name__} outputs samples of shape "
            f"{tuple(out.shape[1:])}, the full model {tuple(want)}"
        )
