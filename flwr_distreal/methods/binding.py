"""What the two Flower APIs' strategies share about the method they run, Flower-free: which
method a strategy class runs (:func:`bound_method`), the constructor a class bound to one
method gets (:func:`bind_constructor`), and the read-only views of a rule's state that the public
classes expose (:class:`DistrealView`, :class:`SubmodelView`).

``flwr_distreal.flower.serverapp`` (Message API) and ``flwr_distreal.flower.legacy.strategy``
(legacy API) each have one generic ``MethodStrategy``; their public classes (``Distreal``,
``HeteroFL``, ...) are it bound to one method through these helpers, so the two APIs cannot
drift apart in how they do it.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..core.dropout import DropoutModel
from .base import Method, strategy_signature
from .registry import get_method, list_methods

__all__ = ["DistrealView", "SubmodelView", "bind_constructor", "bound_method", "check_minimums"]


def bound_method(cls: type, method: str | Method | None) -> Method:
    """The method a strategy of class ``cls`` runs: the class's bound one (``cls.method_name``),
    or the ``method`` argument of an unbound class.

    Raises
    ------
    TypeError
        If a bound class gets another method, or an unbound class gets none.
    """
    if cls.method_name is not None:  # type: ignore[attr-defined]
        if method is not None and get_method(method).name != cls.method_name:  # type: ignore[attr-defined]
            raise TypeError(f"{cls.__name__} runs method {cls.method_name!r}; got method={method!r}")  # type: ignore[attr-defined]
        return get_method(cls.method_name)  # type: ignore[attr-defined]
    if method is None:
        raise TypeError(f"{cls.__name__} needs a method: one of {list_methods()}")
    return get_method(method)


def check_minimums(
    fedavg_kwargs: Mapping[str, Any], *, unit: str, train: str, fraction_evaluate_default: float
) -> None:
    """Fail fast on inconsistent participant minimums of a FedAvg, in either API's names:
    ``min_<train>_<unit>``, ``min_evaluate_<unit>``, ``min_available_<unit>`` (each 2 by default,
    as FedAvg's); the evaluation minimum only when ``fraction_evaluate`` (default
    ``fraction_evaluate_default``) asks for evaluation.

    Raises
    ------
    ValueError
        If a minimum exceeds ``min_available_<unit>``, naming both.
    """
    min_train = fedavg_kwargs.get(f"min_{train}_{unit}", 2)
    min_eval = fedavg_kwargs.get(f"min_evaluate_{unit}", 2)
    min_avail = fedavg_kwargs.get(f"min_available_{unit}", 2)
    if min_train > min_avail:
        raise ValueError(f"min_available_{unit} ({min_avail}) must be >= min_{train}_{unit} ({min_train})")
    if fedavg_kwargs.get("fraction_evaluate", fraction_evaluate_default) > 0 and min_eval > min_avail:
        raise ValueError(
            f"min_available_{unit} ({min_avail}) must be >= min_evaluate_{unit} ({min_eval}) "
            f"when {unit} evaluate (fraction_evaluate > 0)"
        )


def bind_constructor(
    cls: type,
    generic_init: Callable[..., None],
    leading: Sequence[inspect.Parameter],
    drop: Sequence[str] = (),
) -> None:
    """Give ``cls`` (bound to ``cls.method_name``) a constructor that calls ``generic_init(self,
    method, **kwargs)`` and whose signature lists the adapter's ``leading`` arguments, then the
    method's own (:func:`~flwr_distreal.methods.base.strategy_signature`), with their defaults."""
    method = get_method(cls.method_name)  # type: ignore[attr-defined]

    def __init__(self: Any, **kwargs: Any) -> None:
        generic_init(self, kwargs.pop("method", None), **kwargs)  # a method= is refused there

    __init__.__signature__ = strategy_signature(method, leading, drop)  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__doc__ = f"A MethodStrategy of method {method.name!r} (arguments: see the class)."
    cls.__init__ = __init__  # type: ignore[misc]


class DistrealView:
    """Algorithm 2's settings, read from the strategy's :class:`flwr_distreal.server.DistrealCore`."""

    core: Any

    @property
    def full_macs_per_sample(self) -> float:
        """The full model's forward MACs per sample: the most one mini-batch adds to ``macs``."""
        return self.core.full_macs_per_sample

    @property
    def full_macs_per_batch(self) -> float:
        """Deprecated name of :attr:`full_macs_per_sample` (a ``DeprecationWarning``)."""
        warnings.warn("full_macs_per_batch is deprecated, read full_macs_per_sample", DeprecationWarning, stacklevel=2)
        return self.core.full_macs_per_sample

    @property
    def on_excess(self) -> str:
        """"refuse" or "clip" MACs above the maximum."""
        return self.core.on_excess


class SubmodelView:
    """The round-start submodels' settings, read from the strategy's
    :class:`flwr_distreal.server.SubmodelCore`."""

    core: Any

    @property
    def model(self) -> DropoutModel:
        """The full model (for MACs and masks)."""
        return self.core.model

    @property
    def model_name(self) -> str:
        """Registry name of the full model."""
        return self.core.model.model_name

    @property
    def aggregation(self) -> str:
        """The submodel rule: ``"per_weight"`` or ``"all_clients"``."""
        return self.core.aggregation
