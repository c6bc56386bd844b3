"""The droppable model: :class:`DroppableModel` (the dropout interface mixed into a subclass of
the user's class), :func:`make_droppable`, which makes any CNN droppable from its traced channel
graph, and :func:`require_droppable`.

Part of :mod:`flwr_distreal.core.dropout` (import the public names from there).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..channel_graph import ChannelGraph, ComputeLayer, InputSpace, UnsupportedModelError, trace_channel_graph
from .compact import _MIXINS, _make_sliced_bn, _SlicedBatchNorm, _StepState, _swap_class
from .vector import DropoutGroup, validate_vector


ExecutionMode = Literal["compact", "mask"]


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
