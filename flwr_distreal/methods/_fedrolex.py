"""FedRolex's round-start planner (:class:`FedRolexPlanner`: HeteroFL's levels, the rolling
window), the torch side of :mod:`flwr_distreal.methods.fedrolex`, which loads it on first use so
that its schema imports without torch. Import it from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core import contract as C
from ..core.dropout import DropoutModel
from ..server import Assignment, HeteroFLPlanner
from .fedrolex import FEDROLEX_LEVELS, FEDROLEX_SHRINK, OFFSET_KEY, WEIGHTINGS, rolling_window

__all__ = ["FedRolexPlanner"]


class FedRolexPlanner(HeteroFLPlanner):
    """FedRolex's round start: a capacity level from the budget, the round's rolling window.

    Level ``p = 1 .. levels`` has width ``beta = shrink ** (p - 1)`` and keeps
    ``k = ceil(beta * C)`` filters of every dropout group with ``C`` filters (HeteroFL's counts
    and level rule: the widest level whose forward MACs fit the budget, the narrowest when none
    fits); which filters is the round's window :func:`rolling_window` ``(C, k, t)``,
    ``t = server_round - 1``. The train config carries ``width-level``, ``width`` and
    :data:`OFFSET_KEY`.

    Parameters
    ----------
    model : DropoutModel
        The full model.
    shrink : float, optional
        Ratio of consecutive levels' widths, in (0, 1). Defaults to 0.5 (FedRolex).
    levels : int, optional
        Number of levels (>= 1). Defaults to 5 (FedRolex).
    weighting : {"examples", "uniform"}, optional
        How :meth:`client_weights` weights the clients that hold a weight. Defaults to
        ``"examples"``.

    Raises
    ------
    ValueError
        If ``shrink``, ``levels`` or ``weighting`` is out of range.
    """

    def __init__(
        self,
        model: DropoutModel,
        *,
        shrink: float = FEDROLEX_SHRINK,
        levels: int = FEDROLEX_LEVELS,
        weighting: str = "examples",
    ) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, got {weighting!r}")
        super().__init__(model, shrink=shrink, levels=levels)
        self.weighting = weighting

    def client_weights(self, examples: Sequence[float]) -> list[float]:
        """The aggregation weights of the accepted clients (:class:`~flwr_distreal.server.SubmodelCore`
        asks): their examples (``weighting="examples"``), or 1 for every client that trained
        any (``"uniform"``, FedRolex's ``combine``)."""
        if self.weighting == "uniform":
            return [1.0 if float(n) > 0 else 0.0 for n in examples]
        return super().client_weights(examples)

    def kept_for(self, level: int, server_round: int) -> tuple[np.ndarray | None, ...]:
        """The kept filters of every group at ``level`` in round ``server_round`` (None: all).

        Raises
        ------
        ValueError
            If ``level`` is not in ``1 .. levels`` or ``server_round`` is not an int >= 1.
        """
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 1 <= level <= self.levels:
            raise ValueError(f"level must be an int in [1, {self.levels}], got {level!r}")
        if isinstance(server_round, bool) or not isinstance(server_round, (int, np.integer)) or server_round < 1:
            raise ValueError(f"server_round must be an int >= 1, got {server_round!r}")
        t = int(server_round) - 1
        return tuple(
            None if k == c else rolling_window(c, k, t % c)
            for k, c in zip(self.level_counts[level - 1], self.widths)
        )

    def assign(self, device_id: int, budget: float, server_round: int) -> tuple[Assignment, dict[str, Any]]:
        """The level from the budget; the round's window of every group."""
        p = self.level_for_budget(budget)
        kept = self.kept_for(p, server_round)
        config = {C.WIDTH_LEVEL: p, C.WIDTH: round(self.shrink ** (p - 1), 12), OFFSET_KEY: int(server_round) - 1}
        # the masks change every round: not cached (SubmodelCore's mask cache never evicts)
        return Assignment(device_id, kept, None), config
