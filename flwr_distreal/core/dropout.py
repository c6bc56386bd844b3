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

This module has no Flower or Hydra imports.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from .channel_graph import ChannelGraph, ComputeLayer, InputSpace, UnsupportedModelError, trace_channel_graph

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

#: Highest dropout rate of the design space [0, 0.5] (paper, "Design-Time DSE").
MAX_RATE = 0.5

ExecutionMode = Literal["compact", "mask"]


def kept_count(rate: float, channels: int) -> int:
    """Number of filters a group keeps under dropout rate ``rate``.

    ``channels - round(rate * channels)``, rounding halves up, and never fewer than one.

    Parameters
    ----------
    rate : float
        Dropout rate of the group, in [0, 0.5].
    channels : int
        Number of filters (output channels) of the group.

    Returns
    -------
    int
        Exact number of filters computed in a training step.
    """
    dropped = math.floor(rate * channels + 0.5)
    return max(1, channels - dropped)


def validate_vector(vector: Sequence[float] | np.ndarray | Tensor, n_layers: int) -> np.ndarray:
    """Check a dropout vector and return it as a float64 array.

    Parameters
    ----------
    vector : sequence of float
        One dropout rate per dropout group, in the model's group order.
    n_layers : int
        Number of dropout groups of the model.

    Returns
    -------
    np.ndarray
        The rates as a 1-D float64 array of length ``n_layers``.

    Raises
    ------
    ValueError
        If the vector is not 1-D, has the wrong length, holds NaN/inf, or a rate lies outside
        [0, 0.5].
    """
    if isinstance(vector, Tensor):
        vector = vector.detach().cpu().numpy()
    try:
        arr = np.asarray(vector, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"dropout vector must be a sequence of numbers, got {vector!r}") from err
    if arr.ndim != 1:
        raise ValueError(f"dropout vector must be 1-D, got shape {arr.shape}")
    if arr.shape[0] != n_layers:
        raise ValueError(
            f"dropout vector has {arr.shape[0]} rates but the model has {n_layers} dropout layers"
        )
    bad = ~np.isfinite(arr)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"dropout vector holds a non-finite rate {arr[i]} at layer {i}")
    out = (arr < 0.0) | (arr > MAX_RATE)
    if out.any():
        i = int(np.flatnonzero(out)[0])
        raise ValueError(
            f"dropout rate {arr[i]} at layer {i} is outside [0, {MAX_RATE}]"
        )
    return arr


class DropoutGroup:
    """Coupled convolution outputs that share one rate and one kept set per mini-batch.

    Attributes
    ----------
    name : str
        Qualified name of the group's first producer (a convolution), its name in LUTs.
    out_channels : int
        Channels of the full model.
    members : list of str
        Every convolution whose output channels belong to the group.
    rate, kept : float, int
        The rate set by the dropout vector and the number of filters it keeps.
    fixed_subset : Tensor or None
        Kept filters fixed by :meth:`DroppableModel.set_fixed_subsets` (baselines).
    last_kept : Tensor or None
        Filters kept in the last training forward (``None`` = all).
    generator : torch.Generator or None
        Where random subsets are drawn from (``None``: PyTorch's global generator).
    """

    __slots__ = ("name", "out_channels", "members", "rate", "kept", "fixed_subset", "last_kept", "generator")

    def __init__(self, name: str, out_channels: int, members: Sequence[str]) -> None:
        self.name = name
        self.out_channels = int(out_channels)
        self.members = list(members)
        self.rate = 0.0
        self.kept = self.out_channels
        self.fixed_subset: Tensor | None = None
        self.last_kept: Tensor | None = None
        self.generator: torch.Generator | None = None

    def __repr__(self) -> str:
        return f"DropoutGroup({self.name!r}, channels={self.out_channels}, members={len(self.members)}, rate={self.rate:g})"

    def set_rate(self, rate: float) -> None:
        """Set the group's dropout rate (validated by the model)."""
        self.rate = float(rate)
        self.kept = kept_count(self.rate, self.out_channels)

    def select(self, device: torch.device) -> Tensor | None:
        """Filters computed in this training step (sorted), or ``None`` for all."""
        if self.fixed_subset is not None:
            sub = self.fixed_subset
            return sub if sub.device == device else sub.to(device)
        if self.kept >= self.out_channels:
            return None
        perm = torch.randperm(self.out_channels, generator=self.generator)
        return perm[: self.kept].sort().values.to(device)


_MISS = object()


class _StepState:
    """What every sliced layer reads in one forward: kept filters per group, and the alive
    indices and scale of each input space (resolved once per step, on first use)."""

    __slots__ = ("active", "mask", "scaling", "kept", "spaces", "_cache", "device")

    def __init__(self, spaces: list[InputSpace], groups: list[DropoutGroup]) -> None:
        self.active = False
        self.mask = False
        self.scaling = True
        self.kept: list[Tensor | None] = [None] * len(groups)
        self.spaces = spaces
        self._cache: list[Any] = [_MISS] * len(spaces)
        self.device = torch.device("cpu")

    def begin(self, groups: list[DropoutGroup], device: torch.device) -> None:
        self.device = device
        kept = [g.select(device) for g in groups]
        for g, k in zip(groups, kept):
            g.last_kept = k
        self.kept = kept
        self.active = any(k is not None for k in kept)
        self._cache = [_MISS] * len(self.spaces)

    def space(self, sid: int) -> tuple[Tensor | None, Tensor | None]:
        """(alive indices, per-channel scale) of input space ``sid``; None = all / 1."""
        r = self._cache[sid]
        if r is _MISS:
            r = self._resolve(sid)
            self._cache[sid] = r
        return r

    def _resolve(self, sid: int) -> tuple[Tensor | None, Tensor | None]:
        sp = self.spaces[sid]
        parts = [(self.kept[g] if g >= 0 else None, c) for g, c in sp.segments]
        if all(k is None for k, _ in parts):
            return None, None
        dev = self.device
        if self.mask:  # full width: scale 0 for dropped channels, C/k (or 1) for kept ones
            pieces = []
            for k, c in parts:
                if k is None:
                    pieces.append(torch.ones(c, device=dev))
                else:
                    m = torch.zeros(c, device=dev)
                    m[k] = c / k.numel() if self.scaling else 1.0
                    pieces.append(m)
            return None, torch.cat(pieces)
        idx, scale, offset = [], [], 0
        for k, c in parts:
            if k is None:
                idx.append(torch.arange(offset, offset + c, device=dev))
                scale.append(torch.ones(c, device=dev))
            else:
                idx.append(k + offset)
                scale.append(torch.full((k.numel(),), c / k.numel(), device=dev))
            offset += c
        return torch.cat(idx), (torch.cat(scale) if self.scaling else None)

    def keep_mask(self, sid: int) -> Tensor | None:
        """0/1 per channel of space ``sid`` in mask execution (None: all kept)."""
        sp = self.spaces[sid]
        parts = [(self.kept[g] if g >= 0 else None, c) for g, c in sp.segments]
        if all(k is None for k, _ in parts):
            return None
        pieces = []
        for k, c in parts:
            m = torch.ones(c, device=self.device) if k is None else torch.zeros(c, device=self.device)
            if k is not None:
                m[k] = 1.0
            pieces.append(m)
        return torch.cat(pieces)


def _strictly_channels_last(t: Tensor) -> bool:
    """Whether a 4-D tensor is stored channels-last and not also plain contiguous."""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _out_mask(state: _StepState, group: int, channels: int) -> Tensor | None:
    k = state.kept[group] if group >= 0 else None
    if k is None:
        return None
    m = torch.zeros(channels, device=state.device)
    m[k] = 1.0
    return m


# -- sliced layers: the user's modules, their class swapped for a subclass with these forwards --
class _SlicedConv2d:
    """Forward of a convolution under dropout (mixed into the module's own class)."""

    _dr_state: _StepState
    _dr_kind: str
    _dr_space: int
    _dr_out: int

    def _dr_conv(self, x: Tensor, w: Tensor, b: Tensor | None, groups: int) -> Tensor:
        if w is not self.weight and _strictly_channels_last(self.weight):
            # Slicing returns a contiguous (NCHW) weight; keep the layout the model was stored
            # in, since the convolution picks its output layout from input and weight.
            w = w.contiguous(memory_format=torch.channels_last)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(x, w, b, self.stride, _pair(0), self.dilation, groups)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, groups)

    def forward(self, x: Tensor) -> Tensor:
        st = self._dr_state
        kind = self._dr_kind
        if not st.active or kind == "conv_full":
            return super().forward(x)  # type: ignore[misc]
        if st.mask:
            return self._dr_forward_masked(x, st)
        w, b = self.weight, self.bias
        if kind == "depthwise":
            idx = st.space(self._dr_space)[0]
            if idx is None:
                return super().forward(x)  # type: ignore[misc]
            w = w.index_select(0, idx)
            b = b.index_select(0, idx) if b is not None else None
            return self._dr_conv(x, w, b, int(idx.numel()))
        idx, scale = st.space(self._dr_space)
        out = st.kept[self._dr_out] if self._dr_out >= 0 else None
        if out is not None:
            w = w.index_select(0, out)
            b = b.index_select(0, out) if b is not None else None
        if idx is not None:
            w = w.index_select(1, idx)
        if scale is not None:
            w = w * scale.to(w.dtype).view(1, -1, 1, 1)
        if w is self.weight:
            return super().forward(x)  # type: ignore[misc]
        return self._dr_conv(x, w, b, self.groups)

    def _dr_forward_masked(self, x: Tensor, st: _StepState) -> Tensor:
        """Reference execution: every filter computed, dropped ones multiplied by zero."""
        w = self.weight
        if self._dr_kind == "depthwise":
            y = super().forward(x)  # type: ignore[misc]
            m = st.keep_mask(self._dr_space)
            return y if m is None else y * m.to(y.dtype).view(1, -1, 1, 1)
        scale = st.space(self._dr_space)[1]
        if scale is not None:
            w = w * scale.to(w.dtype).view(1, -1, 1, 1)
        y = self._dr_conv(x, w, self.bias, self.groups) if w is not self.weight else super().forward(x)  # type: ignore[misc]
        m = _out_mask(st, self._dr_out, self.out_channels)
        return y if m is None else y * m.to(y.dtype).view(1, -1, 1, 1)


class _SlicedBatchNorm:
    """BatchNorm over the alive channels (mixed into the module's own class).

    Batch statistics, affine parameters and running statistics are taken for the alive
    channels only; in training the running statistics are written back for those channels
    only. With ``static_stats`` (HeteroFL's static BatchNorm) training normalises with the
    batch's statistics and never updates the running statistics.
    """

    _dr_state: _StepState
    _dr_space: int
    static_stats: bool

    def forward(self, x: Tensor) -> Tensor:
        st = self._dr_state
        idx = st.space(self._dr_space)[0] if (st.active and not st.mask) else None
        if idx is None:
            if self.training and self.static_stats:
                return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
            return super().forward(x)  # type: ignore[misc]
        weight = self.weight.index_select(0, idx) if self.weight is not None else None
        bias = self.bias.index_select(0, idx) if self.bias is not None else None
        if self.training and self.static_stats:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            mean = self.running_mean.index_select(0, idx)
            var = self.running_var.index_select(0, idx)
            y = F.batch_norm(x, mean, var, weight, bias, True, momentum, self.eps)
            with torch.no_grad():
                self.running_mean.index_copy_(0, idx, mean)
                self.running_var.index_copy_(0, idx, var)
            return y
        if self.training or not self.track_running_stats:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)
        return F.batch_norm(
            x, self.running_mean.index_select(0, idx), self.running_var.index_select(0, idx),
            weight, bias, False, 0.0, self.eps,
        )


class _SlicedLinear:
    """A linear layer reading the alive channels' features (mixed into the module's class)."""

    _dr_state: _StepState
    _dr_space: int
    _dr_channels: int
    _dr_stride: int

    def forward(self, x: Tensor) -> Tensor:
        st = self._dr_state
        if not st.active:
            return super().forward(x)  # type: ignore[misc]
        idx, scale = st.space(self._dr_space)
        if idx is None and scale is None:
            return super().forward(x)  # type: ignore[misc]
        w = self.weight.view(self.out_features, self._dr_channels, self._dr_stride)
        if idx is not None:
            w = w.index_select(1, idx)
        if scale is not None:
            w = w * scale.to(w.dtype).view(1, -1, 1)
        return F.linear(x, w.reshape(self.out_features, -1), self.bias)


_MIXINS: dict[str, type] = {
    "conv": _SlicedConv2d, "depthwise": _SlicedConv2d, "conv_full": _SlicedConv2d,
    "bn": _SlicedBatchNorm, "linear": _SlicedLinear,
}
_CLASS_CACHE: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type) -> None:
    cls = type(module)
    if issubclass(cls, mixin):
        return
    new = _CLASS_CACHE.get((cls, mixin))
    if new is None:
        new = type(f"Droppable{cls.__name__}", (mixin, cls), {"__module__": __name__})
        _CLASS_CACHE[(cls, mixin)] = new
    module.__class__ = new


class DroppableModel(nn.Module):
    """The dropout interface of a model made droppable by :func:`make_droppable`.

    Mixed into a subclass of the user's model class: the object is the user's model (a copy),
    with these methods added and the forward of training steps under dropout replaced by the
    traced, compact one. A dropout vector has one rate per :class:`DropoutGroup`, in forward
    order (:attr:`dropout_layer_names`).

    Attributes
    ----------
    input_shape : tuple of int
        Shape of one input sample (from the example input); MACs are counted for it.
    num_classes : int
        Size of the output's last dimension.
    model_name : str
        Registry name, or the class name for a user's model.
    channel_graph : ChannelGraph
        What tracing found (groups and every sliced layer's input space).
    """

    input_shape: tuple[int, ...]
    num_classes: int
    model_name: str
    channel_graph: ChannelGraph

    # -- structure --------------------------------------------------------------------
    @property
    def dropout_groups(self) -> list[DropoutGroup]:
        """The dropout groups, in forward order (the order of a dropout vector)."""
        return self._dr_groups

    #: The pre-tracing name of :attr:`dropout_groups` (one "dropout layer" per group).
    dropout_layers = dropout_groups

    @property
    def dropout_layer_names(self) -> list[str]:
        """Stable names of the dropout groups (their first convolution), in vector order."""
        return [g.name for g in self._dr_groups]

    @property
    def num_dropout_layers(self) -> int:
        """Length of a dropout vector for this model."""
        return len(self._dr_groups)

    @property
    def layer_widths(self) -> list[int]:
        """Channels per dropout group of the full model."""
        return [g.out_channels for g in self._dr_groups]

    # -- dropout control --------------------------------------------------------------
    @property
    def dropout_vector(self) -> np.ndarray:
        """The rates currently set, one per dropout group."""
        return np.array([g.rate for g in self._dr_groups], dtype=np.float64)

    def set_dropout(self, vector: Sequence[float] | np.ndarray | Tensor | None) -> None:
        """Set the dropout vector used by every following training forward pass.

        Parameters
        ----------
        vector : sequence of float or None
            One rate in [0, 0.5] per dropout group; ``None`` or all zeros trains the full
            model. Each training forward keeps exactly ``kept_count(p, C)`` random filters per
            group.

        Raises
        ------
        ValueError
            If the vector has the wrong length, non-finite values or rates outside [0, 0.5].
        """
        groups = self._dr_groups
        if vector is None:
            for g in groups:
                g.set_rate(0.0)
            return
        rates = validate_vector(vector, len(groups))
        for g, p in zip(groups, rates.tolist()):
            g.set_rate(p)

    def set_fixed_subsets(self, indices: Sequence[Tensor | Sequence[int] | None] | None) -> None:
        """Fix the kept filters per group instead of sampling them (baselines).

        Federated Dropout keeps one random subset for a whole round; HeteroFL keeps the first
        channels. While set, random sampling is off; ``None`` switches back to sampling.

        Parameters
        ----------
        indices : sequence of index lists or None
            Per dropout group, the filters to keep (``None`` entry = keep all).

        Raises
        ------
        ValueError
            If the list length does not match, an index is out of range or repeated, or a
            group would keep no filter.
        """
        groups = self._dr_groups
        if indices is None:
            for g in groups:
                g.fixed_subset = None
            return
        if len(indices) != len(groups):
            raise ValueError(f"got {len(indices)} subsets for {len(groups)} dropout layers")
        checked: list[Tensor | None] = []
        for i, (g, sub) in enumerate(zip(groups, indices)):
            if sub is None:
                checked.append(None)
                continue
            t = torch.as_tensor(sub, dtype=torch.long).flatten()
            if t.numel() == 0:
                raise ValueError(f"layer {i} ({g.out_channels} filters) would keep no filter")
            if int(t.min()) < 0 or int(t.max()) >= g.out_channels:
                raise ValueError(f"layer {i}: filter index out of range [0, {g.out_channels})")
            t = t.sort().values
            if t.numel() > 1 and bool((t[1:] == t[:-1]).any()):
                raise ValueError(f"layer {i}: repeated filter index")
            checked.append(None if t.numel() == g.out_channels else t)
        for g, t in zip(groups, checked):
            g.fixed_subset = t

    def seed_dropout(self, seed: int | None) -> None:
        """Draw the dropped filters from a private generator seeded with ``seed``.

        ``None`` goes back to PyTorch's global generator.
        """
        gen = None
        if seed is not None:
            gen = torch.Generator()
            gen.manual_seed(int(seed))
        for g in self._dr_groups:
            g.generator = gen

    def set_inverted_scaling(self, on: bool) -> None:
        """Switch the inverted-dropout scaling (``C / k`` for a consumer of ``k`` of ``C``).

        On (the default), a layer that reads ``k`` of a group's ``C`` channels multiplies them
        by ``C / k`` (folded into its sliced weight, after any BatchNorm between them), for
        random per-batch dropout (DISTREAL) and fixed subsets alike. Off, kept channels are
        passed unscaled: the submodel is trained as the narrower network it is. Inference never
        drops and is unaffected.

        Raises
        ------
        ValueError
            If ``on`` is not a bool.
        """
        if not isinstance(on, (bool, np.bool_)):
            raise ValueError(f"inverted scaling must be True or False, got {on!r}")
        self._dr_state.scaling = bool(on)

    @property
    def inverted_scaling(self) -> bool:
        """Whether kept channels are scaled by ``C / k`` (see :meth:`set_inverted_scaling`)."""
        return self._dr_state.scaling

    @property
    def batchnorm_layers(self) -> list[nn.Module]:
        """The model's BatchNorm layers, in module order (empty for models without BN)."""
        return [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def set_static_bn(self, on: bool) -> int:
        """Switch static BatchNorm (HeteroFL's sBN, Diao et al. 2021) in every BN layer.

        On, a training forward normalises with the batch's statistics and leaves the running
        statistics and ``num_batches_tracked`` untouched; :func:`recompute_bn_statistics`
        recomputes them before evaluation. Off (the default), training updates them.

        Returns
        -------
        int
            The number of BatchNorm layers switched (0: the model has none).

        Raises
        ------
        ValueError
            If ``on`` is not a bool, or the model has a BatchNorm layer that reads a flattened
            tensor (it cannot be switched).
        """
        if not isinstance(on, (bool, np.bool_)):
            raise ValueError(f"static BatchNorm must be True or False, got {on!r}")
        layers = self.batchnorm_layers
        for m in layers:
            if not isinstance(m, _SlicedBatchNorm):
                _make_sliced_bn(m, self._dr_state, self._dr_full_space)
            m.static_stats = bool(on)
        return len(layers)

    def set_execution(self, mode: ExecutionMode) -> None:
        """Choose ``"compact"`` (default, computes kept filters only) or ``"mask"`` (reference:
        computes everything and multiplies dropped filters by zero; saves nothing)."""
        if mode not in ("compact", "mask"):
            raise ValueError(f"execution mode must be 'compact' or 'mask', got {mode!r}")
        self._dr_state.mask = mode == "mask"

    def last_kept_indices(self) -> list[Tensor | None]:
        """Filters kept by each group in the last training forward (``None`` = all)."""
        return [g.last_kept for g in self._dr_groups]

    # -- forward ----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        st = self._dr_state
        if self.training:
            st.begin(self._dr_groups, self._dr_probe.device)
            if st.active:
                try:
                    return self._dr_traced(self, *args, **kwargs)
                finally:
                    st.active = False
        else:
            for g in self._dr_groups:
                g.last_kept = None
            st.active = False
        return self._dr_user_forward(self, *args, **kwargs)


_MODEL_CLASSES: dict[type, type] = {}


def _droppable_class(cls: type) -> type:
    if issubclass(cls, DroppableModel):
        return cls
    new = _MODEL_CLASSES.get(cls)
    if new is None:
        new = type(f"Droppable{cls.__name__}", (DroppableModel, cls), {"__module__": cls.__module__})
        _MODEL_CLASSES[cls] = new
    return new


def _make_sliced_bn(m: nn.Module, state: _StepState, space: int) -> None:
    _swap_class(m, _SlicedBatchNorm)
    m.__dict__["_dr_state"] = state
    m.__dict__["_dr_space"] = space
    m.__dict__.setdefault("static_stats", False)


def make_droppable(
    module: nn.Module,
    example_input: Tensor,
    *,
    keep_full: Sequence[str] = (),
    name: str | None = None,
    copy_module: bool = True,
) -> DroppableModel:
    """Give any PyTorch CNN DISTREAL's structured dropout, derived from the model itself.

    The module is traced with ``torch.fx`` (:func:`~flwr_distreal.core.channel_graph.trace_channel_graph`):
    its convolutions' output channels form dropout groups (coupled by residual sums and
    depthwise convolutions, laid side by side by concatenations), and every layer that reads
    them is sliced to the kept channels in training (compact execution: only kept filters
    are computed). Nothing is declared by hand.

    Parameters
    ----------
    module : nn.Module
        The user's model (any CNN whose forward takes one image batch). It is not changed:
        a deep copy is made droppable (unless ``copy_module=False``).
    example_input : Tensor
        A batch of the shape the model trains on, e.g. ``torch.zeros(2, 3, 32, 32)``; its
        sample shape is what MACs are counted for.
    keep_full : sequence of str
        Qualified names of submodules that the tracer treats as opaque and whose input and
        output channels are never dropped (e.g. an attention block).
    name : str, optional
        Name recorded in LUTs (``model_name``); defaults to the class name.
    copy_module : bool
        Deep-copy ``module`` first (default). ``False`` converts the module in place.

    Returns
    -------
    DroppableModel
        The model: an instance of a subclass of ``type(module)`` with the dropout interface
        (``set_dropout``, ``dropout_layer_names``, ``set_fixed_subsets``, ...), usable with
        :func:`~flwr_distreal.core.macs.count_macs`, :class:`~flwr_distreal.core.lut.LUT` and the DSE.
        Its ``state_dict()`` equals the module's, and its eval-mode output equals the module's.

    Raises
    ------
    UnsupportedModelError
        If the forward cannot be traced, an op on channel-carrying tensors is not supported
        (the message names the graph node and op), or the model has nothing to drop.
    """
    if isinstance(module, DroppableModel):
        raise ValueError("make_droppable: the module is already droppable")
    work = copy.deepcopy(module) if copy_module else module
    was_training = work.training
    with torch.no_grad():
        work.train()
        try:
            graph, gm = trace_channel_graph(work, example_input, keep_full)
        finally:
            work.train(was_training)
    if not graph.groups:
        whys = sorted({f"{k}: {v}" for k, v in graph.kept_whole.items()})
        detail = ("; ".join(whys[:6])) if whys else "it has no nn.Conv2d layer"
        raise UnsupportedModelError(
            f"make_droppable: {type(module).__name__} has no droppable convolution filters ({detail}). "
            "DISTREAL drops whole filters of nn.Conv2d layers whose outputs reach neither the "
            "network output nor a layer kept whole."
        )
    modules = dict(work.named_modules())
    spaces: list[InputSpace] = []
    space_id: dict[InputSpace, int] = {}

    def sid(space: InputSpace) -> int:
        if space not in space_id:
            space_id[space] = len(spaces)
            spaces.append(space)
        return space_id[space]

    full = sid(InputSpace(((-1, 1),)))  # placeholder space for BN layers no graph node reaches
    groups = [DropoutGroup(g.name, g.channels, g.members) for g in graph.groups]
    state = _StepState(spaces, groups)  # holds the list of spaces, filled below; begin() sizes its cache
    seen: dict[str, ComputeLayer] = {}
    for layer in graph.layers:
        prev = seen.get(layer.name)
        if prev is not None:
            if (prev.kind, prev.space, prev.out_group) != (layer.kind, layer.space, layer.out_group):
                raise UnsupportedModelError(
                    f"make_droppable: module {layer.name!r} is called more than once with different channel layouts"
                )
            continue
        seen[layer.name] = layer
        m = modules[layer.name]
        if layer.kind == "bn":
            _make_sliced_bn(m, state, sid(layer.space))
            continue
        _swap_class(m, _MIXINS[layer.kind])
        d = m.__dict__
        d["_dr_state"] = state
        d["_dr_kind"] = layer.kind
        d["_dr_space"] = sid(layer.space)
        d["_dr_out"] = layer.out_group
        if layer.kind == "linear":
            d["_dr_channels"] = layer.space.channels
            d["_dr_stride"] = layer.space.stride
    user_forward = type(work).forward
    work.__class__ = _droppable_class(type(work))
    d = work.__dict__
    d["_dr_groups"] = groups
    d["_dr_state"] = state
    d["_dr_full_space"] = full
    d["_dr_traced"] = type(gm).forward
    d["_dr_user_forward"] = user_forward
    params = list(work.parameters())
    if not params:
        raise UnsupportedModelError("make_droppable: the model has no parameters")
    d["_dr_probe"] = params[0]
    d["channel_graph"] = graph
    d["input_shape"] = tuple(int(s) for s in example_input.shape[1:])
    if "num_classes" not in d and graph.output_shape:
        d["num_classes"] = int(graph.output_shape[-1])
    d["model_name"] = name or d.get("model_name") or type(module).__name__
    for attr, value in vars(gm).items():  # tensor constants the tracer lifted (get_attr)
        if attr.startswith("_tensor_constant") and attr not in d:
            d[attr] = value
    return work  # type: ignore[return-value]


def require_droppable(model: Any, what: str) -> DroppableModel:
    """Return ``model`` if it has the dropout interface, else raise a TypeError saying how.

    Raises
    ------
    TypeError
        If ``model`` was not made droppable, naming ``what`` needed it and the call that fixes it.
    """
    if isinstance(model, DroppableModel):
        return model
    raise TypeError(
        f"{what} needs a droppable model, got a plain {type(model).__name__}: call "
        f"flwr_distreal.make_droppable(model, example_input) first (example_input: one batch of "
        "the shape the model trains on), or build a registered one with flwr_distreal.build_model(name)"
    )


#: The dropout interface's earlier name (models were hand-declared subclasses of it).
DropoutModel = DroppableModel


def _space_mask(space: InputSpace, kept: Sequence[Tensor | None]) -> Tensor:
    pieces = []
    for g, c in space.segments:
        k = kept[g] if g >= 0 else None
        if k is None:
            pieces.append(torch.ones(c, dtype=torch.bool))
        else:
            m = torch.zeros(c, dtype=torch.bool)
            m[k.cpu()] = True
            pieces.append(m)
    return torch.cat(pieces)


def _layer_masks(module: nn.Module, layer: ComputeLayer, kept: Sequence[Tensor | None]) -> dict[str, Tensor]:
    """Boolean masks of the entries of ``module``'s parameters/buffers used under ``kept``."""
    cols = _space_mask(layer.space, kept)
    out: dict[str, Tensor] = {}
    if layer.kind == "conv":
        k = kept[layer.out_group] if layer.out_group >= 0 else None
        rows = torch.ones(module.out_channels, dtype=torch.bool)
        if k is not None:
            rows = torch.zeros(module.out_channels, dtype=torch.bool)
            rows[k.cpu()] = True
        out["weight"] = (rows[:, None] & cols[None, :])[:, :, None, None].expand(module.weight.shape)
        if module.bias is not None:
            out["bias"] = rows
    elif layer.kind == "depthwise":
        out["weight"] = cols[:, None, None, None].expand(module.weight.shape)
        if module.bias is not None:
            out["bias"] = cols
    elif layer.kind == "linear":
        out["weight"] = cols.repeat_interleave(layer.space.stride).unsqueeze(0).expand(module.weight.shape)
    elif layer.kind == "bn":
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, name, None) is not None:
                out[name] = cols
    return out


def parameter_masks(
    model: DroppableModel, kept: Sequence[Tensor | Sequence[int] | None]
) -> dict[str, np.ndarray]:
    """Which entries of each state-dict tensor a submodel with the given kept filters trains.

    Used by the Federated Dropout and HeteroFL baselines' aggregation rules and by
    :class:`DroppedWeightGuard`; derived from the traced channel graph.

    Parameters
    ----------
    model : DroppableModel
        The full model (its structure; values are not read).
    kept : sequence of index lists or None
        Per dropout group, the kept filters (``None`` = all).

    Returns
    -------
    dict[str, np.ndarray]
        For every ``state_dict`` key, a boolean array of the tensor's shape.
    """
    groups = model.dropout_groups
    if len(kept) != len(groups):
        raise ValueError(f"got {len(kept)} kept-index lists for {len(groups)} dropout layers")
    kept_t = [None if k is None else torch.as_tensor(k, dtype=torch.long) for k in kept]
    modules = dict(model.named_modules())
    special: dict[str, Tensor] = {}
    for layer in model.channel_graph.layers:
        m = modules[layer.name]
        for pname, mask in _layer_masks(m, layer, kept_t).items():
            key = f"{layer.name}.{pname}" if layer.name else pname
            special[key] = mask if key not in special else (special[key] | mask)
    out: dict[str, np.ndarray] = {}
    for key, tensor in model.state_dict().items():
        mask = special.get(key)
        if mask is None:
            out[key] = np.ones(tuple(tensor.shape), dtype=bool)
        else:
            out[key] = mask.expand(tensor.shape).numpy().copy()
    return out


def recompute_bn_statistics(
    model: DroppableModel,
    batches: Iterable[Tensor | Sequence[Tensor]],
    device: str | torch.device | None = None,
) -> int:
    """Recompute the running statistics of every BatchNorm layer of the full model from data.

    HeteroFL's static BatchNorm (Diao, Ding and Tarokh, ICLR 2021, section 3, "Static Batch
    Normalization"; repository ``src/train_classifier_fed.py``, ``stats``): the running
    statistics are reset and then accumulated by a cumulative moving average (momentum
    ``None``: every batch counts equally) over one pass of training-mode forwards of the full
    model (no dropout, no fixed subsets), without gradients. The running mean of a layer is thus the mean of its per-batch means,
    and its running variance the mean of its per-batch unbiased variances. Each layer's
    momentum, its static flag and the model's training mode are restored afterwards; the
    model's dropout vector and fixed subsets are cleared (as for evaluation).

    Parameters
    ----------
    model : DroppableModel
        The model whose BatchNorm statistics are recomputed in place.
    batches : iterable
        Input batches: tensors, or ``(inputs, labels, ...)`` tuples (only ``inputs`` is used),
        e.g. one or more DataLoaders chained.
    device : str or torch.device, optional
        Where the inputs go; defaults to the device of the model's first parameter.

    Returns
    -------
    int
        The number of samples the statistics were computed from (0 when the model has no
        BatchNorm layer: then nothing is read and nothing changes).

    Raises
    ------
    ValueError
        If the model has BatchNorm layers but ``batches`` yields no sample.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    if device is None:
        device = next(model.parameters()).device
    saved = [(m, m.momentum, getattr(m, "static_stats", False), m.track_running_stats) for m in layers]
    was_training = model.training
    model.set_dropout(None)
    model.set_fixed_subsets(None)
    seen = 0
    try:
        for m in layers:
            m.track_running_stats = True
            m.reset_running_stats()
            m.momentum = None
            if hasattr(m, "static_stats"):
                m.static_stats = False
        model.train()
        with torch.no_grad():
            for batch in batches:
                inputs = batch if isinstance(batch, Tensor) else batch[0]
                if inputs.shape[0] == 0:
                    continue
                model(inputs.to(device))
                seen += int(inputs.shape[0])
    finally:
        for m, momentum, static, track in saved:
            m.momentum = momentum
            m.track_running_stats = track
            if hasattr(m, "static_stats"):
                m.static_stats = static
        model.train(was_training)
    if seen == 0:
        raise ValueError("recompute_bn_statistics: the batches yielded no sample")
    return seen


class DroppedWeightGuard:
    """Wrap an optimiser so that a step never moves weights that were dropped in it.

    Dropped filters get exactly zero gradient, so plain SGD (the paper's optimiser) leaves
    them unchanged by itself; the guard then steps directly. With momentum, weight decay or
    adaptive optimisers a zero gradient still moves a weight; the guard saves the entries not
    used in the last training forward (and their optimiser state, e.g. momentum buffers)
    before the step and restores them after, so a dropped filter resumes with the state it
    had ("lazy" updates, as sparse optimisers do).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimiser over ``model``'s parameters.
    model : DroppableModel
        The model whose last forward pass defines what was dropped.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: DroppableModel) -> None:
        self.optimizer = optimizer
        self.model = model
        self._names = {id(p): n for n, p in model.named_parameters()}

    @property
    def param_groups(self):  # noqa: D401 - mirrors torch.optim.Optimizer
        """The wrapped optimiser's parameter groups."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear gradients (as :meth:`torch.optim.Optimizer.zero_grad`)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The wrapped optimiser's state."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Load the wrapped optimiser's state."""
        self.optimizer.load_state_dict(state)

    def _needs_guard(self) -> bool:
        opt = self.optimizer
        if type(opt) is torch.optim.SGD:
            return any(g.get("momentum", 0) != 0 or g.get("weight_decay", 0) != 0 for g in opt.param_groups)
        return True

    def step(self) -> None:
        """Take an optimiser step that leaves dropped entries (and their state) untouched."""
        kept = self.model.last_kept_indices()
        if all(k is None for k in kept) or not self._needs_guard():
            self.optimizer.step()
            return
        masks = parameter_masks(self.model, kept)
        saved: list[tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]] = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                name = self._names.get(id(p))
                if name is None or name not in masks:
                    continue
                frozen = torch.from_numpy(~masks[name]).to(p.device)
                if not bool(frozen.any()):
                    continue
                state = self.optimizer.state.get(p, {})
                state_saved = [
                    (v, v.detach()[frozen].clone())
                    for v in state.values()
                    if isinstance(v, Tensor) and v.shape == p.shape
                ]
                saved.append((p, frozen, [(p, p.detach()[frozen].clone())] + state_saved))
        self.optimizer.step()
        with torch.no_grad():
            for p, frozen, pairs in saved:
                state = self.optimizer.state.get(p, {})
                # State tensors created lazily by this very step (first step) start at zero.
                known = {id(t) for t, _ in pairs}
                for v in state.values():
                    if isinstance(v, Tensor) and v.shape == p.shape and id(v) not in known:
                        v[frozen] = 0
                for target, values in pairs:
                    target[frozen] = values
