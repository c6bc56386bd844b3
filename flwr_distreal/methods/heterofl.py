"""HeteroFL (Diao, Ding and Tarokh, ICLR 2021): width levels ``s**(p-1)``; each device gets the
widest level whose MACs fit its budget at round start and trains the first channels of every
layer (:class:`flwr_distreal.server.HeteroFLPlanner`); every weight is averaged over the
clients that hold it."""

from __future__ import annotations

from dataclasses import dataclass

from ..core import defaults as D
from .. import server  # its submodel planners load on first use (torch)
from .base import ConfigError, Method, SubmodelStrategyConfig
from .registry import register_method

__all__ = ["HETEROFL", "HeteroFLStrategyConfig"]


@dataclass
class HeteroFLStrategyConfig(SubmodelStrategyConfig):
    """HeteroFL (Diao, Ding and Tarokh, ICLR 2021); see
    :class:`~flwr_distreal.methods.base.SubmodelStrategyConfig`.

    ``shrink``: the shrinking ratio ``s`` in (0, 1) (0.7, the DISTREAL paper's choice);
    ``levels``: width levels ``s**(p-1)``, ``p = 1 .. levels``. Defaults: scaled submodels,
    per-weight averaging, static BatchNorm (the paper's sBN).
    """

    name: str = "heterofl"
    # s; level p keeps the first ceil(s**(p-1) * C) filters (DISTREAL paper: s = 0.7)
    shrink: float = D.HETEROFL_SHRINK
    levels: int = D.HETEROFL_LEVELS
    # true: HeteroFL's Scaler (paper, section 3 "Scaler"; repository diaoenmao/HeteroFL-...
    # src/modules/modules.py, on in every run of src/make.py): the k of C kept channels are scaled
    # by C/k. aggregation per_weight: HeteroFL's per-parameter average over the clients holding it
    # (src/fed.py, Federation.combine). static_bn true: sBN (paper, section 3 "Static Batch
    # Normalization"; models built with track_running_stats=False, statistics recomputed before
    # testing by src/train_classifier_fed.py, stats).
    inverted_scaling: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.shrink < 1:
            raise ConfigError(f"strategy.shrink must be in (0, 1), got {self.shrink}")
        if self.levels < 1:
            raise ConfigError(f"strategy.levels must be >= 1, got {self.levels}")


def _heterofl_planner(model, *, seed: int, shrink: float = D.HETEROFL_SHRINK, levels: int = D.HETEROFL_LEVELS):
    """HeteroFL's planner (deterministic: ``seed`` is not used)."""
    return server.HeteroFLPlanner(model, shrink=shrink, levels=levels)  # loaded on first use (torch)


HETEROFL = register_method(
    Method(
        name="heterofl",
        label="HeteroFL (Diao 2021)",
        schema=HeteroFLStrategyConfig,
        rule="submodel",
        planner=_heterofl_planner,
        planner_options=("shrink", "levels"),
        description="width levels s^(p-1) assigned at round start, per-weight averaging",
    )
)
