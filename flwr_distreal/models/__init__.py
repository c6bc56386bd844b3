"""Plain ``nn.Module`` models registered by name; :func:`build_model` makes them droppable by tracing."""

from . import densenet, femnist_cnn, mobilenetv2, resnet  # noqa: F401  (register the builders)
from ._registry import build_model, is_model, list_models, register_model

__all__ = ["build_model", "is_model", "list_models", "register_model"]
