"""Which nodes train: the seeded client draw shared by both Flower APIs.

:func:`seeded_draw` and :func:`sample_size` serve
:class:`flwr_distreal.flower.legacy.client_manager.SeededClientManager` (legacy API) and the
Message-API strategies alike, so both APIs train the same devices for the same seed. No Flower
or Hydra imports.
"""

from __future__ import annotations

import random
from collections.abc import Hashable, Iterable, Mapping
from typing import TypeVar

__all__ = ["sample_size", "seeded_draw"]

N = TypeVar("N", bound=Hashable)


def sample_size(num_available: int, fraction: float, min_nodes: int) -> int:
    """Clients to draw in a round, as Flower's FedAvg counts them (both APIs).

    ``max(int(num_available * fraction), min_nodes)``.
    """
    return max(int(num_available * fraction), int(min_nodes))


def seeded_draw(
    rng: random.Random, devices: Mapping[N, int], k: int, unidentified: Iterable[N] = ()
) -> list[N]:
    """Draw ``k`` nodes reproducibly: sorted by device id, then node key, then ``rng.sample``.

    Flower draws with the global, unseeded :mod:`random` over node ids that the simulation
    engine creates at random, so two runs train different devices. Sorting by the device
    (partition) id first makes the draw a function of the seed alone; one generator serving
    all rounds makes round ``t`` of two runs with the same seed draw the same devices. Used by
    :class:`flwr_distreal.flower.legacy.client_manager.SeededClientManager` (legacy) and the Message-API
    strategies alike, so both APIs draw the same devices for the same seed.

    Parameters
    ----------
    rng : random.Random
        The draw's generator, ``random.Random(seed)``, kept across rounds.
    devices : Mapping[N, int]
        Device id of every node that may be drawn, by node key (legacy ``cid`` or Message-API
        node id; ties between equal device ids are broken by ``str(node)``).
    k : int
        Nodes to draw, at most ``len(devices)`` plus the unidentified nodes.
    unidentified : Iterable[N], optional
        Nodes that may be drawn but reported no device id (a ClientApp without a query
        handler): they follow the identified ones, sorted by node id (numerically for
        non-negative integer ids), so the draw is as reproducible as the node ids are.
        Defaults to none; without them the draw is exactly the one by device id.

    Returns
    -------
    list[N]
        The drawn node keys, in draw order.

    Raises
    ------
    ValueError
        If ``k`` is negative or larger than the number of nodes.
    """
    ordered = sorted(devices, key=lambda n: (devices[n], str(n)))
    # (length, text) orders non-negative integer ids numerically, and text ids deterministically
    ordered += sorted(set(unidentified) - set(devices), key=lambda n: (len(str(n)), str(n)))
    return rng.sample(ordered, k)
