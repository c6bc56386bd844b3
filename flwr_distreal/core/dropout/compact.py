"""Compact execution: the forwards of the user's own convolution, BatchNorm and linear layers
under dropout.

Each sliced layer's class is swapped for a subclass that mixes in one of these forwards: a
convolution slices its weight to ``W[kept_out][:, alive_in]`` (with the inverted-dropout scale
folded in), BatchNorm normalises the alive channels and writes its running statistics back for
those only, a linear layer after a flatten reads the alive channels' features. The per-step
state (:class:`_StepState`) resolves the kept filters and each input space's alive indices
once per forward; ``"mask"`` execution (the reference) computes everything and multiplies
dropped filters by zero. Part of :mod:`flwr_distreal.core.dropout`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..channel_graph import InputSpace
from .vector import DropoutGroup


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
        # Named after the package (flwr_distreal.core.dropout), the public path, as when it was one module.
        new = type(f"Droppable{cls.__name__}", (mixin, cls), {"__module__": __package__})
        _CLASS_CACHE[(cls, mixin)] = new
    module.__class__ = new


def _make_sliced_bn(m: nn.Module, state: _StepState, space: int) -> None:
    _swap_class(m, _SlicedBatchNorm)
    m.__dict__["_dr_state"] = state
    m.__dict__["_dr_space"] = space
    m.__dict__.setdefault("static_stats", False)
