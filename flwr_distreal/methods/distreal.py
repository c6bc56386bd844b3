"""DISTREAL (Rapp, Khalili, Pfeiffer, Henkel, AAAI 2022), the project's variant.

Client: Algorithm 1, a dropout vector from the LUT of Pareto-optimal vectors chosen for every
mini-batch from the resources available at that moment (``policy``), stopping at the round's
deadline with the steps finished (``stop_at_deadline``). Server: Algorithm 2, every update
weighted by the MACs its client spent. The paper-literal variant is
:mod:`flwr_distreal.methods.distreal_paper`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core import defaults as D
from .base import Method, StrategyConfig, check_choice, check_policy
from .registry import register_method

__all__ = ["DISTREAL", "DistrealStrategyConfig"]


@dataclass
class DistrealStrategyConfig(StrategyConfig):
    """DISTREAL (Rapp et al., AAAI 2022).

    ``policy``: the per-batch budget rule (``deadline``, the default: time left * r(t) /
    batches left; ``paper``: r(t) * T / B, the paper's D[r]). ``stop_at_deadline``: stop at the
    deadline and send the completed steps, weighted by their MACs. ``on_excess``: ``refuse`` or
    ``clip`` a reply that claims more MACs than possible. ``inverted_scaling``: a layer that reads
    ``k`` of a producer's ``C`` channels under the per-batch random dropout multiplies them by
    ``C / k`` (standard inverted dropout; on by default). ``static_bn``, ``bn_devices``: see
    :class:`~flwr_distreal.methods.base.StrategyConfig` (off by default: running statistics, as a
    plain full model keeps).
    """

    name: str = "distreal"
    # deadline: time left * r(t) / samples left per batch; paper: r(t) * T / B (the paper's D[r])
    policy: str = D.POLICY
    # stop at the deadline and send the completed steps, weighted by their MACs
    stop_at_deadline: bool = D.STOP_AT_DEADLINE
    # refuse or clip a reply that claims more MACs than possible
    on_excess: str = D.ON_EXCESS
    # per-batch random dropout scales the k kept of C channels by C/k (inverted dropout,
    # Srivastava et al. 2014)
    inverted_scaling: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_policy(self.policy)
        check_choice("on_excess", self.on_excess, ("refuse", "clip"))

    def apply_to(self, model: Any) -> None:
        """Switch the model's static BatchNorm and inverted-dropout scaling."""
        super().apply_to(model)
        model.set_inverted_scaling(self.inverted_scaling)


DISTREAL = register_method(
    Method(
        name="distreal",
        label="DISTREAL",
        schema=DistrealStrategyConfig,
        rule="macs",
        client="distreal",
        client_options=("policy", "stop_at_deadline"),
        uses_lut=True,
        description="a LUT dropout vector per mini-batch (Algorithm 1), MACs-weighted averaging (Algorithm 2)",
    )
)
