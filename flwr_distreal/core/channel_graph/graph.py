"""What tracing finds: the channel graph (dropout groups and every sliced layer's input space),
and the refusal of a model that cannot be made droppable.

Part of :mod:`flwr_distreal.core.channel_graph` (import the public names from there).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


class UnsupportedModelError(ValueError):
    """The model cannot be made droppable; the message names the graph node and op.

    Attributes
    ----------
    node : str or None
        Name of the refused graph node (``None`` when the refusal is not about one node).
    """

    def __init__(self, message: str, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


# -- the result -----------------------------------------------------------------------------
@dataclass(frozen=True)
class InputSpace:
    """The channel layout a compute layer reads: segments of (group index or -1, channels).

    ``-1`` marks a segment that is never dropped. ``stride`` is the number of features per
    channel (flatten into a linear layer; 1 otherwise).
    """

    segments: tuple[tuple[int, int], ...]
    stride: int = 1

    @property
    def channels(self) -> int:
        """Channels of the full model in this space."""
        return sum(c for _, c in self.segments)

    @property
    def droppable(self) -> bool:
        """Whether any segment of the space can be dropped."""
        return any(g >= 0 for g, _ in self.segments)

    def kept(self, counts: Sequence[int]) -> int:
        """Channels present when dropout group ``g`` keeps ``counts[g]`` filters."""
        return sum(counts[g] if g >= 0 else c for g, c in self.segments)


@dataclass
class ComputeLayer:
    """One call of a module whose weights are sliced under dropout.

    ``kind`` is ``"conv"`` (dense conv: rows follow ``out_group``, columns ``space``),
    ``"depthwise"`` (rows and columns follow ``space``), ``"conv_full"`` (grouped conv whose
    input and output are kept whole), ``"linear"`` (columns follow ``space`` with its stride),
    ``"bn"`` (channels follow ``space``).
    """

    name: str
    kind: str
    space: InputSpace
    out_group: int = -1
    out_channels: int = 0
    area: int = 1
    macs_per_io: int = 0  # kernel area (conv) or 1 (linear): MACs per (in, out) channel pair and pixel


@dataclass
class DropoutGroupInfo:
    """A set of coupled convolution outputs that share one rate and one kept set."""

    name: str
    channels: int
    members: list[str] = field(default_factory=list)


@dataclass
class ChannelGraph:
    """What tracing found: the dropout groups and every layer's input space."""

    groups: list[DropoutGroupInfo]
    layers: list[ComputeLayer]
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    kept_whole: dict[str, str]  # why a producer's channels are never dropped, by module name
    #: (module or node name, MACs per sample) of compute outside the sliced layers (keep_full
    #: modules, matrix products on channels kept whole): the same under every dropout vector.
    fixed_macs: list[tuple[str, int]] = field(default_factory=list)

    def describe(self) -> str:
        """A short human-readable summary (one line per group)."""
        lines = [f"{len(self.groups)} dropout groups over {len(self.layers)} sliced layer calls"]
        for i, g in enumerate(self.groups):
            lines.append(f"  [{i}] {g.name}: {g.channels} channels, {len(g.members)} producer(s)")
        return "\n".join(lines)
