"""Federated Dropout (Caldas et al. 2018), extended as in the DISTREAL paper: one dropout rate
for all layers per device, from its availability at round start, and a random filter subset
fixed for the round (:class:`flwr_distreal.server.FederatedDropoutPlanner`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .. import server  # its submodel planners load on first use (torch)
from .base import Method, SubmodelStrategyConfig
from .registry import register_method

__all__ = ["FEDDROPOUT", "FedDropoutStrategyConfig"]


@dataclass
class FedDropoutStrategyConfig(SubmodelStrategyConfig):
    """Federated Dropout (Caldas et al. 2018), extended as in the paper; see
    :class:`~flwr_distreal.methods.base.SubmodelStrategyConfig`. Defaults: unscaled submodels,
    per-weight averaging, static BatchNorm."""

    name: str = "feddropout"
    # false: the client trains its random subset as a repacked narrower network, unscaled
    # (DISTREAL paper, Related Work "Train NN Subsets": FD trains "a repacked smaller network";
    # the DISTREAL authors' own FD, github.com/k1l1/SLT nets/SubsetNets/*.py, has no scaler).
    # aggregation per_weight: each weight averaged over the clients whose submodel holds it
    # (k1l1/SLT algorithms/fd.py, model_averaging). static_bn true: k1l1/SLT builds every
    # BatchNorm of its models (nets/Baseline and nets/SubsetNets densenet_cifar.py,
    # resnet_cifar.py) with track_running_stats=False: running statistics are never kept; with
    # running statistics of the submodels averaged, DenseNet-BC-40's full model stays at chance
    # (README, "Baseline conventions").
    inverted_scaling: bool = False


def _feddropout_planner(
    model, *, rate_for_budget: Callable[[float], float] | None = None, rates=None, seed: int = 0
):
    """:class:`flwr_distreal.server.FederatedDropoutPlanner` (a random subset per device and round,
    from ``seed``), built when first used: the planner needs torch, the schema above does not."""
    return server.FederatedDropoutPlanner(model, rate_for_budget=rate_for_budget, rates=rates, seed=seed)


FEDDROPOUT = register_method(
    Method(
        name="feddropout",
        label="Fed. Dropout (Caldas 2018)",
        schema=FedDropoutStrategyConfig,
        rule="submodel",
        planner=_feddropout_planner,
        description="one rate per device at round start, a random filter subset fixed for the round",
    )
)
