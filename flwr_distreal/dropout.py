"""Structured filter dropout with compact execution.

This module implements the run-time half of DISTREAL (Rapp et al., AAAI 2022, section
"Dropout to Reduce Computations In Training", Fig. 1): whole convolution filters are dropped,
with one rate per convolutional layer (the *dropout vector*). A training step keeps exactly
``kept_count(p, C)`` filters of a layer with ``C`` filters, drawn uniformly at random anew for
every forward pass (one forward = one mini-batch), and **computes only those filters**:

* the activation between layers is a :class:`Compact` tensor that carries only the alive
  channels, plus their indices in the full channel space;
* a convolution slices its weight to ``W[kept_out][:, alive_in]`` (no masking, no persistent
  weight copies, no module rebuild);
* a BatchNorm layer normalises the alive channels only and writes its running statistics back
  for those channels only;
* the classifier reads only the alive channels of the final feature map.

Inverted-dropout rescaling: a layer that receives only ``k`` of ``C`` channels of a producer
multiplies those inputs by ``C / k`` so that it sees the full model's input in expectation.
The factor is folded into the (small) sliced weight of the *consuming* convolution or linear
layer, i.e. it is applied **after** any BatchNorm and ReLU that sit between producer and
consumer. BatchNorm therefore always sees unscaled values, and its running statistics stay
those of the full model that is used, never dropped, at inference. The scaling is a switch
(:meth:`DropoutModel.set_inverted_scaling`, on by default): with it off, kept channels are
passed unscaled, as a repacked narrower network (the submodel baselines' convention, see the
README's "Baseline conventions") computes them.

Static BatchNorm (HeteroFL's sBN, :meth:`DropoutModel.set_static_bn`): in training, BatchNorm
normalises with the batch's statistics and leaves its running statistics untouched;
:func:`recompute_bn_statistics` recomputes them afterwards by a cumulative pass over data.

Switching the vector between mini-batches only changes a few Python integers
(:meth:`DropoutModel.set_dropout`), so it costs almost nothing.

Gradients of dropped filters are exactly zero (their weights are not part of the graph of the
step). Plain SGD, the paper's optimiser, therefore leaves them unchanged. Optimisers with
momentum or weight decay would still move them; :class:`DroppedWeightGuard` wraps any
optimiser so that entries not used in a step keep their value and optimiser state.

This module has no Flower or Hydra imports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "MAX_RATE",
    "Compact",
    "CompactBatchNorm2d",
    "CompactLinear",
    "DropoutConv2d",
    "DropoutModel",
    "DroppedWeightGuard",
    "kept_count",
    "parameter_masks",
    "recompute_bn_statistics",
    "validate_vector",
]

#: Highest dropout rate of the design space [0, 0.5] (paper, "Design-Time DSE").
MAX_RATE = 0.5

ExecutionMode = Literal["compact", "mask"]


def kept_count(rate: float, channels: int) -> int:
    """Number of filters a layer keeps under dropout rate ``rate``.

    ``channels - round(rate * channels)``, rounding halves up, and never fewer than one.

    Parameters
    ----------
    rate : float
        Dropout rate of the layer, in [0, 0.5].
    channels : int
        Number of filters (output channels) of the layer.

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
        One dropout rate per dropout layer, in the model's layer order.
    n_layers : int
        Number of dropout layers of the model.

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


_ARANGE_CACHE: dict[tuple[int, torch.device], Tensor] = {}


def _arange(n: int, device: torch.device) -> Tensor:
    key = (n, device)
    t = _ARANGE_CACHE.get(key)
    if t is None:
        t = torch.arange(n, device=device)
        _ARANGE_CACHE[key] = t
    return t


class Compact:
    """An activation that carries only its alive channels.

    Parameters
    ----------
    tensor : Tensor
        The alive channels, shape ``(N, k, ...)`` (or ``(N, C, ...)`` in mask mode).
    idx : Tensor or None
        Indices (int64, sorted) of the alive channels in the full channel space of size
        ``channels``; ``None`` means all channels are present, in order.
    scale : Tensor or None
        Inverted-dropout factor per present channel (``C / k`` of its producer; 0 for a
        masked-out channel in mask mode) that the consuming layer applies; ``None`` means 1.
    channels : int
        Number of channels of the full model at this point.
    """

    __slots__ = ("tensor", "idx", "scale", "channels")

    def __init__(self, tensor: Tensor, idx: Tensor | None, scale: Tensor | None, channels: int):
        self.tensor = tensor
        self.idx = idx
        self.scale = scale
        self.channels = channels

    @classmethod
    def full(cls, tensor: Tensor) -> "Compact":
        """Wrap a plain tensor whose channels are all present (the network input)."""
        return cls(tensor, None, None, tensor.shape[1])

    def map(self, fn: Callable[[Tensor], Tensor]) -> "Compact":
        """Apply a channel-wise operation (ReLU, pooling) to the tensor, keeping the metadata."""
        return Compact(fn(self.tensor), self.idx, self.scale, self.channels)

    @staticmethod
    def cat(parts: Sequence["Compact"]) -> "Compact":
        """Concatenate along channels (DenseNet), shifting indices by each part's offset."""
        tensor = torch.cat([p.tensor for p in parts], dim=1)
        channels = sum(p.channels for p in parts)
        if all(p.idx is None for p in parts):
            idx = None
        else:
            device = tensor.device
            pieces, offset = [], 0
            for p in parts:
                pieces.append((p.idx if p.idx is not None else _arange(p.channels, device)) + offset)
                offset += p.channels
            idx = torch.cat(pieces)
        if all(p.scale is None for p in parts):
            scale = None
        else:
            scale = torch.cat(
                [
                    p.scale if p.scale is not None else tensor.new_ones(p.tensor.shape[1])
                    for p in parts
                ]
            )
        return Compact(tensor, idx, scale, channels)


def _strictly_channels_last(t: Tensor) -> bool:
    """Whether a 4-D tensor is stored channels-last and not also plain contiguous (1x1 kernels
    and single-channel tensors are both, and carry no layout preference)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


Source = tuple[int, int]
"""An input segment of a layer: (producing dropout layer's index or -1 for a fixed input, its
full channel count). A layer's input channel space is the concatenation of its sources."""


class DropoutConv2d(nn.Conv2d):
    """A convolution whose filters are dropped structurally (paper, Fig. 1).

    Behaves like :class:`torch.nn.Conv2d` but consumes and produces :class:`Compact` tensors.
    In training mode with rate ``p > 0`` it computes exactly ``kept_count(p, out_channels)``
    random filters (sampled anew every forward) on the alive input channels only.
    In eval mode it never drops.

    Parameters
    ----------
    in_channels, out_channels, kernel_size, stride, padding, bias
        As for :class:`torch.nn.Conv2d`.
    sources : sequence of (int, int), optional
        Input segments (producer dropout-layer index or -1, channels), set by the model
        builder; used by exact MAC counting and parameter masks.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        sources: Sequence[Source] | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.sources: tuple[Source, ...] = tuple(sources) if sources is not None else ((-1, in_channels),)
        if sum(c for _, c in self.sources) != in_channels:
            raise ValueError(f"sources {self.sources} do not add up to {in_channels} input channels")
        self.rate: float = 0.0
        self.kept: int = out_channels
        self.fixed_subset: Tensor | None = None
        self.last_kept: Tensor | None = None
        self.generator: torch.Generator | None = None
        self.execution: ExecutionMode = "compact"
        #: Whether consumers of ``k`` of this layer's filters scale them by ``C / k``.
        self.inverted_scaling: bool = True
        self._scale_cache: dict[int, Tensor] = {}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", rate={self.rate:g}"

    def set_rate(self, rate: float) -> None:
        """Set this layer's dropout rate (validated by the model)."""
        self.rate = float(rate)
        self.kept = kept_count(self.rate, self.out_channels)

    def _select_filters(self) -> Tensor | None:
        """Indices of the filters computed in this step, or ``None`` for all."""
        if not self.training:
            return None
        if self.fixed_subset is not None:
            return self.fixed_subset
        if self.kept >= self.out_channels:
            return None
        perm = torch.randperm(self.out_channels, generator=self.generator)
        return perm[: self.kept].sort().values.to(self.weight.device)

    def _out_scale(self, k: int) -> Tensor:
        t = self._scale_cache.get(k)
        if t is None or t.device != self.weight.device or t.dtype != self.weight.dtype:
            t = torch.full((k,), self.out_channels / k, dtype=self.weight.dtype, device=self.weight.device)
            self._scale_cache[k] = t
        return t

    def forward(self, x: Compact) -> Compact:  # type: ignore[override]
        kept = self._select_filters()
        self.last_kept = kept
        if self.execution == "mask":
            return self._forward_masked(x, kept)
        weight, bias = self.weight, self.bias
        if kept is not None:
            weight = weight.index_select(0, kept)
            if bias is not None:
                bias = bias.index_select(0, kept)
        if x.idx is not None:
            weight = weight.index_select(1, x.idx)
        if x.scale is not None:
            weight = weight * x.scale.view(1, -1, 1, 1)
        if weight is not self.weight and _strictly_channels_last(self.weight):
            # Slicing returns a contiguous (NCHW) weight; keep the layout the model was stored
            # in, since the convolution picks its output layout from input and weight.
            weight = weight.contiguous(memory_format=torch.channels_last)
        y = F.conv2d(x.tensor, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if kept is None:
            return Compact(y, None, None, self.out_channels)
        scale = self._out_scale(kept.numel()) if self.inverted_scaling else None
        return Compact(y, kept, scale, self.out_channels)

    def _forward_masked(self, x: Compact, kept: Tensor | None) -> Compact:
        """Reference implementation: compute every filter, multiply dropped ones by zero."""
        if x.idx is not None:
            raise RuntimeError("mask execution needs full-width inputs; set every layer to mask mode")
        weight = self.weight
        if x.scale is not None:
            weight = weight * x.scale.view(1, -1, 1, 1)
        y = F.conv2d(x.tensor, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if kept is None:
            return Compact(y, None, None, self.out_channels)
        mask = y.new_zeros(self.out_channels)
        mask[kept] = 1.0
        y = y * mask.view(1, -1, 1, 1)
        scale = mask * (self.out_channels / kept.numel()) if self.inverted_scaling else mask
        return Compact(y, None, scale, self.out_channels)


class CompactBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over the alive channels of a :class:`Compact` tensor.

    Batch statistics, affine parameters and running statistics are taken for the alive
    channels only; in training mode the running statistics are written back for those
    channels only, so statistics of dropped channels stay as they were. With ``static_stats``
    (HeteroFL's static BatchNorm) training normalises with the batch's statistics and never
    updates the running statistics (nor ``num_batches_tracked``); evaluation is unchanged.

    Parameters
    ----------
    num_features : int
        Channels of the full model.
    sources : sequence of (int, int), optional
        Input segments (see :class:`DropoutConv2d`).
    """

    def __init__(self, num_features: int, sources: Sequence[Source] | None = None, **kwargs) -> None:
        super().__init__(num_features, **kwargs)
        self.sources: tuple[Source, ...] = tuple(sources) if sources is not None else ((-1, num_features),)
        #: Static BatchNorm: training uses batch statistics and leaves the running ones alone.
        self.static_stats: bool = False

    def forward(self, x: Compact) -> Compact:  # type: ignore[override]
        if x.idx is None and not (self.training and self.static_stats):
            return Compact(super().forward(x.tensor), None, x.scale, x.channels)
        idx = x.idx
        weight, bias = self.weight, self.bias
        if idx is not None:
            weight = weight.index_select(0, idx) if weight is not None else None
            bias = bias.index_select(0, idx) if bias is not None else None
        if self.training and self.static_stats:
            y = F.batch_norm(x.tensor, None, None, weight, bias, True, 0.0, self.eps)
        elif self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            momentum = (
                1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            )
            mean = self.running_mean.index_select(0, idx)
            var = self.running_var.index_select(0, idx)
            y = F.batch_norm(x.tensor, mean, var, weight, bias, True, momentum, self.eps)
            with torch.no_grad():
                self.running_mean.index_copy_(0, idx, mean)
                self.running_var.index_copy_(0, idx, var)
        elif self.training or not self.track_running_stats:
            y = F.batch_norm(x.tensor, None, None, weight, bias, True, 0.0, self.eps)
        else:
            y = F.batch_norm(
                x.tensor,
                self.running_mean.index_select(0, idx),
                self.running_var.index_select(0, idx),
                weight,
                bias,
                False,
                0.0,
                self.eps,
            )
        return Compact(y, idx, x.scale, x.channels)


class CompactLinear(nn.Linear):
    """A linear layer reading the flattened alive channels of a :class:`Compact` tensor.

    Parameters
    ----------
    in_channels : int
        Channels of the full model feeding this layer.
    out_features : int
        Output units (never dropped).
    stride : int
        Features per channel after flattening (e.g. 16 for a 4x4 map, 1 after global pooling).
    sources : sequence of (int, int), optional
        Input segments (see :class:`DropoutConv2d`).
    """

    def __init__(
        self,
        in_channels: int,
        out_features: int,
        stride: int = 1,
        bias: bool = True,
        sources: Sequence[Source] | None = None,
    ) -> None:
        super().__init__(in_channels * stride, out_features, bias=bias)
        self.in_channels = in_channels
        self.stride = stride
        self.sources: tuple[Source, ...] = tuple(sources) if sources is not None else ((-1, in_channels),)
        if sum(c for _, c in self.sources) != in_channels:
            raise ValueError(f"sources {self.sources} do not add up to {in_channels} input channels")

    def forward(self, x: Compact) -> Tensor:  # type: ignore[override]
        flat = x.tensor.flatten(1)
        weight = self.weight
        if x.idx is None and x.scale is None:
            return F.linear(flat, weight, self.bias)
        weight = weight.view(self.out_features, self.in_channels, self.stride)
        if x.idx is not None:
            weight = weight.index_select(1, x.idx)
        if x.scale is not None:
            weight = weight * x.scale.view(1, -1, 1)
        return F.linear(flat, weight.reshape(self.out_features, -1), self.bias)


class DropoutModel(nn.Module):
    """Base class of models built from structured-dropout layers.

    Subclasses register their :class:`DropoutConv2d` layers in forward order and set
    ``input_shape`` (C, H, W) and ``num_classes``. The registry name is stored in
    ``model_name`` by :func:`flwr_distreal.models.build_model`.
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    model_name: str = ""

    # -- structure ----------------------------------------------------------------------
    @property
    def dropout_layers(self) -> list[DropoutConv2d]:
        """The dropout layers, in forward order (the order of a dropout vector)."""
        cached = self.__dict__.get("_dropout_layers")
        if cached is None:
            cached = [m for m in self.modules() if isinstance(m, DropoutConv2d)]
            self.__dict__["_dropout_layers"] = cached
        return cached

    @property
    def dropout_layer_names(self) -> list[str]:
        """Stable names of the dropout layers, in dropout-vector order."""
        return [n for n, m in self.named_modules() if isinstance(m, DropoutConv2d)]

    @property
    def num_dropout_layers(self) -> int:
        """Length of a dropout vector for this model."""
        return len(self.dropout_layers)

    @property
    def layer_widths(self) -> list[int]:
        """Filters per dropout layer of the full model."""
        return [m.out_channels for m in self.dropout_layers]

    # -- dropout control ----------------------------------------------------------------
    @property
    def dropout_vector(self) -> np.ndarray:
        """The rates currently set, one per dropout layer."""
        return np.array([m.rate for m in self.dropout_layers], dtype=np.float64)

    def set_dropout(self, vector: Sequence[float] | np.ndarray | Tensor | None) -> None:
        """Set the dropout vector used by every following training forward pass.

        Parameters
        ----------
        vector : sequence of float or None
            One rate in [0, 0.5] per dropout layer; ``None`` or all zeros trains the full model.
            Each training forward keeps exactly ``kept_count(p, C)`` random filters per layer.

        Raises
        ------
        ValueError
            If the vector has the wrong length, non-finite values or rates outside [0, 0.5].
        """
        layers = self.dropout_layers
        if vector is None:
            for m in layers:
                m.set_rate(0.0)
            return
        rates = validate_vector(vector, len(layers))
        for m, p in zip(layers, rates.tolist()):
            m.set_rate(p)

    def set_fixed_subsets(self, indices: Sequence[Tensor | Sequence[int] | None] | None) -> None:
        """Fix the kept filters per layer instead of sampling them (baselines).

        Federated Dropout keeps one random subset for a whole round; HeteroFL keeps the first
        channels. While set, random sampling is off; ``None`` switches back to sampling.

        Parameters
        ----------
        indices : sequence of index lists or None
            Per dropout layer, the filters to keep (``None`` entry = keep all).

        Raises
        ------
        ValueError
            If the list length does not match, an index is out of range or repeated, or a
            layer would keep no filter.
        """
        layers = self.dropout_layers
        if indices is None:
            for m in layers:
                m.fixed_subset = None
            return
        if len(indices) != len(layers):
            raise ValueError(f"got {len(indices)} subsets for {len(layers)} dropout layers")
        checked: list[Tensor | None] = []
        for i, (m, sub) in enumerate(zip(layers, indices)):
            if sub is None:
                checked.append(None)
                continue
            t = torch.as_tensor(sub, dtype=torch.long).flatten()
            if t.numel() == 0:
                raise ValueError(f"layer {i} ({m.out_channels} filters) would keep no filter")
            if int(t.min()) < 0 or int(t.max()) >= m.out_channels:
                raise ValueError(f"layer {i}: filter index out of range [0, {m.out_channels})")
            t = t.sort().values
            if t.numel() > 1 and bool((t[1:] == t[:-1]).any()):
                raise ValueError(f"layer {i}: repeated filter index")
            checked.append(None if t.numel() == m.out_channels else t.to(m.weight.device))
        for m, t in zip(layers, checked):
            m.fixed_subset = t

    def seed_dropout(self, seed: int | None) -> None:
        """Draw the dropped filters from a private generator seeded with ``seed``.

        ``None`` goes back to PyTorch's global generator.
        """
        gen = None
        if seed is not None:
            gen = torch.Generator()
            gen.manual_seed(int(seed))
        for m in self.dropout_layers:
            m.generator = gen

    def set_inverted_scaling(self, on: bool) -> None:
        """Switch the inverted-dropout scaling of every dropout layer.

        On (the default), a layer that reads ``k`` of a producer's ``C`` channels multiplies
        them by ``C / k`` (folded into its sliced weight, after any BatchNorm between them), so
        that it sees the full model's input in expectation; this applies to random per-batch
        dropout (DISTREAL) and to fixed subsets (:meth:`set_fixed_subsets`) alike. Off, kept
        channels are passed unscaled: the submodel is trained as the narrower network it is.
        Inference never drops and is unaffected.

        Parameters
        ----------
        on : bool
            True to scale by ``C / k``, False to pass kept channels unscaled.

        Raises
        ------
        ValueError
            If ``on`` is not a bool.
        """
        if not isinstance(on, (bool, np.bool_)):
            raise ValueError(f"inverted scaling must be True or False, got {on!r}")
        for m in self.dropout_layers:
            m.inverted_scaling = bool(on)

    @property
    def inverted_scaling(self) -> bool:
        """Whether kept channels are scaled by ``C / k`` (see :meth:`set_inverted_scaling`)."""
        return all(m.inverted_scaling for m in self.dropout_layers)

    @property
    def batchnorm_layers(self) -> list[CompactBatchNorm2d]:
        """The model's BatchNorm layers, in module order (empty for models without BN)."""
        return [m for m in self.modules() if isinstance(m, CompactBatchNorm2d)]

    def set_static_bn(self, on: bool) -> int:
        """Switch static BatchNorm (HeteroFL's sBN, Diao et al. 2021) in every BN layer.

        On, a training forward normalises with the batch's statistics and leaves the running
        statistics and ``num_batches_tracked`` untouched, so a local round never changes them;
        :func:`recompute_bn_statistics` recomputes them before evaluation. Off (the default),
        training updates the running statistics with the layer's momentum.

        Parameters
        ----------
        on : bool
            True for static BatchNorm.

        Returns
        -------
        int
            The number of BatchNorm layers switched (0: the model has none and the switch
            changes nothing).

        Raises
        ------
        ValueError
            If ``on`` is not a bool.
        """
        if not isinstance(on, (bool, np.bool_)):
            raise ValueError(f"static BatchNorm must be True or False, got {on!r}")
        layers = self.batchnorm_layers
        for m in layers:
            m.static_stats = bool(on)
        return len(layers)

    def set_execution(self, mode: ExecutionMode) -> None:
        """Choose ``"compact"`` (default, computes kept filters only) or ``"mask"`` (reference:
        computes everything and multiplies dropped filters by zero; saves nothing)."""
        if mode not in ("compact", "mask"):
            raise ValueError(f"execution mode must be 'compact' or 'mask', got {mode!r}")
        for m in self.dropout_layers:
            m.execution = mode

    def last_kept_indices(self) -> list[Tensor | None]:
        """Filters kept by each dropout layer in the last training forward (``None`` = all)."""
        return [m.last_kept for m in self.dropout_layers]

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - subclasses implement
        raise NotImplementedError


def _input_index(sources: Iterable[Source], kept: Sequence[Tensor | None]) -> Tensor | None:
    """Alive input channels of a layer (in its input channel space), or None for all."""
    pieces, offset, partial = [], 0, False
    for src, channels in sources:
        sub = kept[src] if src >= 0 else None
        if sub is None:
            pieces.append(torch.arange(channels) + offset)
        else:
            partial = True
            pieces.append(sub.cpu() + offset)
        offset += channels
    return torch.cat(pieces) if partial else None


def _channel_mask(channels: int, idx: Tensor | None) -> Tensor:
    """Boolean mask over ``channels`` with ``idx`` set (all set when ``idx`` is None)."""
    if idx is None:
        return torch.ones(channels, dtype=torch.bool)
    mask = torch.zeros(channels, dtype=torch.bool)
    mask[idx.cpu()] = True
    return mask


def _param_masks_for(module: nn.Module, kept: Sequence[Tensor | None], own: Tensor | None) -> dict[str, Tensor]:
    """Boolean masks of the entries of ``module``'s parameters/buffers used under ``kept``."""
    sources = getattr(module, "sources", None)
    in_idx = _input_index(sources, kept) if sources is not None else None
    out: dict[str, Tensor] = {}
    if isinstance(module, DropoutConv2d):
        rows = _channel_mask(module.out_channels, own)
        cols = _channel_mask(module.in_channels, in_idx)
        out["weight"] = (rows[:, None] & cols[None, :])[:, :, None, None].expand(module.weight.shape)
        if module.bias is not None:
            out["bias"] = rows
    elif isinstance(module, CompactBatchNorm2d):
        c = _channel_mask(module.num_features, in_idx)
        for name in ("weight", "bias", "running_mean", "running_var"):
            if getattr(module, name, None) is not None:
                out[name] = c
        if module.num_batches_tracked is not None:
            out["num_batches_tracked"] = torch.ones((), dtype=torch.bool)
    elif isinstance(module, CompactLinear):
        c = _channel_mask(module.in_channels, in_idx)
        out["weight"] = c.repeat_interleave(module.stride).unsqueeze(0).expand(module.out_features, -1)
        if module.bias is not None:
            out["bias"] = torch.ones(module.out_features, dtype=torch.bool)
    return out


def parameter_masks(
    model: DropoutModel, kept: Sequence[Tensor | Sequence[int] | None]
) -> dict[str, np.ndarray]:
    """Which entries of each state-dict tensor a submodel with the given kept filters trains.

    Used by the Federated Dropout and HeteroFL baselines' aggregation rules (both need the masks).

    Parameters
    ----------
    model : DropoutModel
        The full model (its structure; values are not read).
    kept : sequence of index lists or None
        Per dropout layer, the kept filters (``None`` = all).

    Returns
    -------
    dict[str, np.ndarray]
        For every ``state_dict`` key, a boolean array of the tensor's shape.
    """
    layers = model.dropout_layers
    if len(kept) != len(layers):
        raise ValueError(f"got {len(kept)} kept-index lists for {len(layers)} dropout layers")
    kept_t = [None if k is None else torch.as_tensor(k, dtype=torch.long) for k in kept]
    layer_pos = {id(m): i for i, m in enumerate(layers)}
    masks: dict[str, np.ndarray] = {}
    for mod_name, module in model.named_modules():
        own = kept_t[layer_pos[id(module)]] if id(module) in layer_pos else None
        special = _param_masks_for(module, kept_t, own)
        for pname, tensor in list(module.named_parameters(recurse=False)) + list(
            module.named_buffers(recurse=False)
        ):
            key = f"{mod_name}.{pname}" if mod_name else pname
            if pname in special:
                masks[key] = special[pname].expand(tensor.shape).numpy().copy()
            else:
                masks[key] = np.ones(tuple(tensor.shape), dtype=bool)
    state_keys = list(model.state_dict().keys())
    return {k: masks[k] for k in state_keys}


def recompute_bn_statistics(
    model: DropoutModel,
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
    model : DropoutModel
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
            if isinstance(m, CompactBatchNorm2d):
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
            if isinstance(m, CompactBatchNorm2d):
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
    model : DropoutModel
        The model whose last forward pass defines what was dropped.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: DropoutModel) -> None:
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
