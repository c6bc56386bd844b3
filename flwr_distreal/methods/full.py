"""Full resources: FedAvg on the full model with no resource limits (the paper's upper bound)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, StrategyConfig
from .registry import register_method

__all__ = ["FULL", "FullStrategyConfig"]


@dataclass
class FullStrategyConfig(StrategyConfig):
    """Full resources: FedAvg on the full model, no resource limits (only the options of
    :class:`~flwr_distreal.methods.base.StrategyConfig`: ``static_bn``, ``bn_devices``)."""

    name: str = "full"


FULL = register_method(
    Method(
        name="full",
        label="Full res. avail. (upper bound)",
        schema=FullStrategyConfig,
        rule="examples",
        unlimited=True,
        description="FedAvg on the full model, every device unlimited (upper bound)",
    )
)
