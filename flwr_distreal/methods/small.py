"""Small network: FedAvg on the model's small variant (``model.small``), which is meant to fit
the weakest device (the paper's lower baseline; see the README's deviations for whether it does)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, StrategyConfig
from .registry import register_method

__all__ = ["SMALL", "SmallStrategyConfig"]


@dataclass
class SmallStrategyConfig(StrategyConfig):
    """Small network: FedAvg on the model's small variant (``model.small``; only the options of
    :class:`~flwr_distreal.methods.base.StrategyConfig`: ``static_bn``, ``bn_devices``)."""

    name: str = "small"


SMALL = register_method(
    Method(
        name="small",
        label="Small NN",
        schema=SmallStrategyConfig,
        rule="examples",
        trains_small=True,
        description="FedAvg on the model's small variant (model.small)",
    )
)
