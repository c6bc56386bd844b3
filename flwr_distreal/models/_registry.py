"""Model registry by name (in the style of timm's ``_registry``/``create_model``)."""

from __future__ import annotations

import logging
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from ..core.dropout import DroppableModel, make_droppable

__all__ = ["build_model", "is_model", "list_models", "register_model"]

log = logging.getLogger(__name__)

_MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_INPUT_SHAPES: dict[str, tuple[int, ...]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


def register_model(fn: F | None = None, *, input_shape: tuple[int, ...] | None = None) -> Any:
    """Register a builder of a plain ``nn.Module`` under its function name.

    Use as ``@register_model`` or ``@register_model(input_shape=(3, 32, 32))``. The sample
    shape is what :func:`build_model` traces the model with (and counts MACs for); without it,
    the built module's ``input_shape`` attribute is used.
    """

    def add(f: F) -> F:
        name = f.__name__
        if name in _MODEL_BUILDERS:
            log.warning("model %s registered twice; the later builder wins", name)
        _MODEL_BUILDERS[name] = f
        if input_shape is not None:
            _INPUT_SHAPES[name] = tuple(int(s) for s in input_shape)
        return f

    return add(fn) if fn is not None else add


def list_models() -> list[str]:
    """Names of all registered models, sorted."""
    return sorted(_MODEL_BUILDERS)


def is_model(name: str) -> bool:
    """Whether ``name`` is a registered model."""
    return name in _MODEL_BUILDERS


def build_model(
    name: str, num_classes: int | None = None, *, channels_last: bool = True, **kwargs: Any
) -> DroppableModel:
    """Build a registered model and make it droppable (:func:`~flwr_distreal.core.dropout.make_droppable`).

    Parameters
    ----------
    name : str
        Registry name, e.g. ``"femnist_cnn"`` or ``"densenet_bc_40"`` (see :func:`list_models`).
    num_classes : int, optional
        Classifier outputs; ``None`` keeps the model's default (62 for FEMNIST, 10 for
        DenseNet-BC-40/19, 100 for DenseNet-BC-100).
    channels_last : bool
        Store the 4-D weights channels-last (NHWC), as ``model.to(memory_format=
        torch.channels_last)`` does. Convolutions follow the weight's layout, so inputs need no
        conversion and every activation stays channels-last. Which layout is faster depends on
        the CPU, the model, the batch size and the dropout rate (channels-last was 0.71x NCHW on
        one CPU and slower than NCHW for compact steps on another), so the runner does not rely
        on this default: its ``layout: auto`` measures both per machine
        (:func:`flwr_distreal.training.layout.resolve_layout`) and passes the answer here;
        ``scripts/bench_layout_precision.py`` times both side by side. Values, names and shapes
        of parameters are the same in both layouts. ``False`` keeps the classic contiguous
        (NCHW) layout.
    **kwargs
        Builder options, e.g. ``widths`` (filters per dropout layer, for natively narrow
        reference networks and HeteroFL submodels). ``None`` values are dropped so that unset
        config keys keep the model's defaults.

    Returns
    -------
    DroppableModel
        The model, in training mode, with ``model_name`` set.

    Raises
    ------
    ValueError
        If ``name`` is not registered (the message lists the valid names).
    """
    if name not in _MODEL_BUILDERS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if num_classes is not None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        kwargs["num_classes"] = int(num_classes)
    module = _MODEL_BUILDERS[name](**kwargs)
    shape = _INPUT_SHAPES.get(name) or getattr(module, "input_shape", None)
    if shape is None:
        raise ValueError(f"model {name!r} was registered without input_shape and has no input_shape attribute")
    module.train()
    model = make_droppable(module, torch.zeros((2, *shape)), name=name, copy_module=False)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
