"""Which weights a submodel trains: :func:`parameter_masks` (the baselines' aggregation) and
:class:`DroppedWeightGuard` (an optimiser step that leaves dropped weights and their state as
they were).

Part of :mod:`flwr_distreal.core.dropout` (import the public names from there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..channel_graph import ComputeLayer, InputSpace
from .model import DroppableModel


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
