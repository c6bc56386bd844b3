"""DISTREAL exactly as the paper states it (Rapp et al., AAAI 2022, Algorithm 1 and Section
"Resource-aware selection"): the dropout vector of every mini-batch is D[r] with the per-batch
budget r(t) T / B (policy ``paper``), and nothing stops at the deadline: a device whose
resources drop mid-round and that has not finished by the deadline is a straggler, and its
update is dropped (Algorithm 2 averages the rest by their MACs).

The project's variant (:mod:`flwr_distreal.methods.distreal`) differs in both: its ``deadline``
policy budgets each batch from the time and batches left, and it sends the steps finished by the
deadline. Everything else (LUT, MACs weights, recipe) is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method
from .distreal import DistrealStrategyConfig
from .registry import register_method

__all__ = ["DISTREAL_PAPER", "DistrealPaperStrategyConfig"]


@dataclass
class DistrealPaperStrategyConfig(DistrealStrategyConfig):
    """DISTREAL as in the paper: ``policy: paper`` and ``stop_at_deadline: false`` by default
    (both may still be set, which makes it the project's variant under another name)."""

    name: str = "distreal_paper"
    policy: str = "paper"
    stop_at_deadline: bool = False


DISTREAL_PAPER = register_method(
    Method(
        name="distreal_paper",
        label="DISTREAL (paper)",
        schema=DistrealPaperStrategyConfig,
        rule="macs",
        client="distreal",
        client_options=("policy", "stop_at_deadline"),
        uses_lut=True,
        description="DISTREAL as the paper states it: D[r] with r(t) T / B per batch, late devices are stragglers",
    )
)
