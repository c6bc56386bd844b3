"""Reproducible client sampling for Flower.

Flower's :class:`~flwr.server.client_manager.SimpleClientManager` draws the clients of a round
with the global :mod:`random` module over node ids, and the simulation engine creates node ids
at random. Neither is seeded, so two runs with the same configuration train different devices
in every round. :class:`SeededClientManager` orders the available clients by their device
(partition) id, asked once per client with ``get_properties`` and cached, and draws with its
own seeded generator: the same seed selects the same devices in every round of every run. The
draw itself is :func:`flwr_distreal.server.sampling.seeded_draw`, shared with the Message-API
strategies of :mod:`flwr_distreal.flower.serverapp`, so both APIs draw the same devices for a seed.

This module lives at the Flower edge of the package.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random

from flwr.common import Code, GetPropertiesIns, Scalar
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.criterion import Criterion

from ...server import seeded_draw

__all__ = ["SeededClientManager", "fetch_properties"]

log = logging.getLogger(__name__)


def fetch_properties(
    clients: list[ClientProxy], required: list[str], timeout: float | None = None
) -> dict[str, dict[str, Scalar]]:
    """Ask clients for their properties (``NumPyClient.get_properties``) in parallel.

    Parameters
    ----------
    clients : list[ClientProxy]
        The clients to ask.
    required : list[str]
        Property keys every reply must hold.
    timeout : float, optional
        Timeout in seconds of each call.

    Returns
    -------
    dict[str, dict[str, Scalar]]
        Properties by client ``cid``, for the clients that answered with every required key;
        a client that failed is logged and left out.
    """

    def ask(client: ClientProxy) -> dict[str, Scalar]:
        res = client.get_properties(GetPropertiesIns(config={}), timeout=timeout, group_id=None)
        if res.status.code != Code.OK:
            raise ValueError(f"get_properties failed: {res.status.message}")
        missing = [k for k in required if k not in res.properties]
        if missing:
            raise ValueError(f"client properties lack {missing}; got {sorted(res.properties)}")
        return dict(res.properties)

    out: dict[str, dict[str, Scalar]] = {}
    if not clients:
        return out
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(clients), 32)) as pool:
        futures = {pool.submit(ask, c): c for c in clients}
        for future in concurrent.futures.as_completed(futures):
            client = futures[future]
            try:
                out[client.cid] = future.result()
            except Exception as err:  # noqa: BLE001 - one client's failure must not stop the round
                log.warning("could not get properties of client %s: %s", client.cid, err)
    return out


class SeededClientManager(SimpleClientManager):
    """A client manager whose sampling is reproducible from a seed.

    Parameters
    ----------
    seed : int
        Seed of the sampling generator; one generator serves all rounds, so round ``t`` of two
        runs with the same seed selects the same devices.
    partition_id_key : str, optional
        Client property that holds the device (partition) id. Defaults to ``"partition-id"``,
        which :class:`flwr_distreal.flower.legacy.client.DistrealClient` and ``BaselineClient`` report.
    properties_timeout : float, optional
        Timeout in seconds of each ``get_properties`` call. Defaults to None.
    """

    def __init__(
        self, seed: int, partition_id_key: str = "partition-id", properties_timeout: float | None = None
    ) -> None:
        super().__init__()
        self.seed = int(seed)
        self.partition_id_key = partition_id_key
        self.properties_timeout = properties_timeout
        self._rng = random.Random(self.seed)
        self._device_ids: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"SeededClientManager(seed={self.seed}, clients={len(self)})"

    def unregister(self, client: ClientProxy) -> None:
        """Forget a client and its cached device id."""
        self._device_ids.pop(client.cid, None)
        super().unregister(client)

    def device_ids(self, clients: list[ClientProxy]) -> dict[str, int]:
        """Device id of each client by ``cid`` (asked once per client, then cached).

        Raises
        ------
        ValueError
            If a client does not report an integer device id.
        """
        todo = [c for c in clients if c.cid not in self._device_ids]
        if todo:
            props = fetch_properties(todo, [self.partition_id_key], self.properties_timeout)
            for client in todo:
                if client.cid not in props:
                    raise ValueError(
                        f"client {client.cid} did not answer get_properties (see the warning above); "
                        f"SeededClientManager needs its {self.partition_id_key!r} property"
                    )
                value = props[client.cid].get(self.partition_id_key)
                if isinstance(value, bool) or not isinstance(value, int):
                    raise ValueError(
                        f"client {client.cid} reports no integer {self.partition_id_key!r} property "
                        f"(got {value!r}); SeededClientManager orders clients by it"
                    )
                self._device_ids[client.cid] = value
        return {c.cid: self._device_ids[c.cid] for c in clients}

    def sample(
        self, num_clients: int, min_num_clients: int | None = None, criterion: Criterion | None = None
    ) -> list[ClientProxy]:
        """Draw ``num_clients`` clients, ordered by device id first, with the seeded generator.

        Parameters
        ----------
        num_clients : int
            Clients to draw.
        min_num_clients : int, optional
            Clients to wait for before drawing; defaults to ``num_clients``.
        criterion : Criterion, optional
            Only clients it selects are drawn.

        Returns
        -------
        list[ClientProxy]
            The drawn clients; empty when fewer than ``num_clients`` are available.
        """
        if min_num_clients is None:
            min_num_clients = num_clients
        self.wait_for(min_num_clients)
        available = [c for c in self.clients.values() if criterion is None or criterion.select(c)]
        if num_clients > len(available):
            log.info(
                "sampling failed: %d clients available, %d requested", len(available), num_clients
            )
            return []
        ids = self.device_ids(available)
        by_cid = {c.cid: c for c in available}
        return [by_cid[cid] for cid in seeded_draw(self._rng, ids, num_clients)]
