"""Models built from structured-dropout layers, registered by name."""

from . import densenet, femnist_cnn, resnet  # noqa: F401  (register the builders)
from ._registry import build_model, is_model, list_models, register_model

__all__ = ["build_model", "is_model", "list_models", "register_model"]
