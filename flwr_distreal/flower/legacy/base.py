"""The legacy-API adapter base: Flower's legacy ``FedAvg`` over a Flower-free reply gate.

:class:`_ResourceAwareFedAvg` is what every strategy of :mod:`flwr_distreal.flower.legacy.strategy`
is built on: ``configure_fit`` samples as FedAvg does and adds per-client config,
``aggregate_fit`` unpacks every ``FitRes`` into the neutral :class:`flwr_distreal.server.Reply` and
lets the core (:mod:`flwr_distreal.server`) gate and combine them. :func:`make_evaluate_fn`
builds Flower's server-side ``evaluate_fn`` (test loss and accuracy of the full model).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.common import (
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from torch import Tensor

from ...core import contract as C
from ...methods.binding import check_minimums
from ...models import build_model
from ...server import Reply, ReplyGate, as_device_id
from ...training.trainers import evaluate_model, set_weights

__all__ = ["EvaluateFn", "make_evaluate_fn"]

#: The legacy strategies' logger: the one of :mod:`flwr_distreal.flower.legacy.strategy`, so that
#: the log lines keep the logger name they had before this module was split out of it.
log = logging.getLogger("flwr_distreal.flower.legacy.strategy")

EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


# ---------------------------------------------------------------------------- helpers


def make_evaluate_fn(
    model_name: str,
    num_classes: int | None,
    test_loader_factory: Callable[[], Iterable[tuple[Tensor, Tensor]]],
    device: str = "cpu",
    model_kwargs: Mapping[str, Any] | None = None,
) -> EvaluateFn:
    """Build Flower's server-side ``evaluate_fn``: test loss and accuracy of the full model.

    The model is built once, on first use; every call loads the global parameters
    into it and evaluates in eval mode without dropout.

    Parameters
    ----------
    model_name : str
        Registry name of the model (see :func:`flwr_distreal.models.list_models`).
    num_classes : int | None
        Classifier outputs; None keeps the model's default.
    test_loader_factory : Callable[[], Iterable[tuple[Tensor, Tensor]]]
        Returns the test data as an iterable of ``(inputs, labels)`` batches (e.g. a
        ``DataLoader``). Called once, on first use; the result is iterated every round,
        so it must be re-iterable.
    device : str, optional
        Torch device to evaluate on. Defaults to ``"cpu"``.
    model_kwargs : Mapping[str, Any] | None, optional
        Extra builder arguments (e.g. ``widths``). Defaults to None.

    Returns
    -------
    EvaluateFn
        ``evaluate_fn(server_round, parameters_ndarrays, config)`` returning
        ``(mean cross-entropy loss, {"accuracy": fraction correct, "num_examples": n})``.
    """
    state: dict[str, Any] = {}

    def evaluate_fn(
        server_round: int, parameters_ndarrays: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]]:
        if "model" not in state:
            model = build_model(model_name, num_classes, **dict(model_kwargs or {}))
            state["model"] = model.to(device)
            state["loader"] = test_loader_factory()
        model = state["model"]
        set_weights(model, parameters_ndarrays)
        loss, accuracy, n = evaluate_model(model, state["loader"], device)
        log.info("round %s: server-side test accuracy %.4f, loss %.4f", server_round, accuracy, loss)
        return loss, {"accuracy": accuracy, "num_examples": n}

    return evaluate_fn



def _check_minimums(fedavg_kwargs: Mapping[str, Any]) -> None:
    """Fail fast on inconsistent client minimums (legacy FedAvg only warns)."""
    check_minimums(fedavg_kwargs, unit="clients", train="fit", fraction_evaluate_default=1.0)


# -------------------------------------------------------------------- the base class


class _ResourceAwareFedAvg(FedAvg):
    """FedAvg over a :class:`flwr_distreal.server.ReplyGate`: the adapter.

    ``configure_fit`` samples as FedAvg does (through the client manager), hands the
    broadcast parameters to the core and adds per-client config (:meth:`_client_configs`);
    ``aggregate_fit`` turns every ``FitRes`` into a :class:`~flwr_distreal.server.Reply`
    and lets the core gate and combine them.

    Parameters
    ----------
    core : ReplyGate
        The Flower-free gate and aggregation rule.
    **fedavg_kwargs : Any
        Passed to :class:`flwr.server.strategy.FedAvg`.
    """

    def __init__(self, core: ReplyGate, **fedavg_kwargs: Any) -> None:
        _check_minimums(fedavg_kwargs)
        super().__init__(**fedavg_kwargs)
        self.core = core

    # metric keys, read from the core
    @property
    def macs_key(self) -> str:
        """Fit metric with the MACs spent."""
        return self.core.macs_key

    @property
    def num_batches_key(self) -> str:
        """Fit metric with the mini-batches trained."""
        return self.core.num_batches_key

    @property
    def straggler_key(self) -> str:
        """Fit metric that is true for a straggler."""
        return self.core.straggler_key

    @property
    def available_macs_key(self) -> str:
        """Fit metric with the MACs the device could have spent."""
        return self.core.available_macs_key

    # -- configure ---------------------------------------------------------------------
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample clients as FedAvg does, keep the broadcast parameters, add config.

        Parameters
        ----------
        server_round : int
            The current round (1-based).
        parameters : Parameters
            The global parameters ``theta_{t-1}`` broadcast this round.
        client_manager : ClientManager
            Holds the available clients.

        Returns
        -------
        list[tuple[ClientProxy, FitIns]]
            One instruction per selected client; every config has ``"server-round"``
            plus the strategy's own keys.
        """
        self.core.broadcast(server_round, parameters_to_ndarrays(parameters))
        pairs = super().configure_fit(server_round, parameters, client_manager)
        self.last_sampled = [client for client, _ in pairs]  # the round's draw, for the audit trail
        extra = self._client_configs(server_round, [client for client, _ in pairs])
        out: list[tuple[ClientProxy, FitIns]] = []
        for client, fit_ins in pairs:
            if client.cid not in extra:
                continue
            config: dict[str, Scalar] = dict(fit_ins.config)
            config[C.SERVER_ROUND] = server_round
            config.update(extra[client.cid])
            out.append((client, FitIns(fit_ins.parameters, config)))
        return out

    def _client_configs(
        self, server_round: int, clients: list[ClientProxy]
    ) -> dict[str, dict[str, Scalar]]:
        """Extra fit config per client cid; a client missing from the result is not trained."""
        return {client.cid: {} for client in clients}

    # -- aggregate ---------------------------------------------------------------------
    def _reply(self, proxy: ClientProxy, fit_res: FitRes) -> Reply:
        """A ``FitRes`` as the core's neutral reply."""
        metrics = fit_res.metrics or {}
        return Reply(
            node=proxy.cid,
            device_id=as_device_id(metrics.get(self.core.partition_id_key)),
            arrays=parameters_to_ndarrays(fit_res.parameters),
            num_examples=fit_res.num_examples,
            metrics=metrics,
        )

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Drop stragglers, validate replies, aggregate the rest (in device order).

        Parameters
        ----------
        server_round : int
            The current round.
        results : list[tuple[ClientProxy, FitRes]]
            Successful replies.
        failures : list[tuple[ClientProxy, FitRes] | BaseException]
            Replies that failed in Flower (tolerated unless ``accept_failures`` is False).

        Returns
        -------
        tuple[Parameters | None, dict[str, Scalar]]
            The new global parameters (the broadcast ones, unchanged, when no reply
            could be aggregated; None when failures are not accepted) and the metrics
            ``received``, ``failures``, ``stragglers``, ``refused``, ``clipped``, ``accepted``,
            ``mean_macs`` and ``mean_utilisation`` (over the accepted replies), plus
            whatever ``fit_metrics_aggregation_fn`` returns for the accepted replies.

        Raises
        ------
        RuntimeError
            If no parameters were broadcast by :meth:`configure_fit` before.
        """
        if failures:
            log.warning("round %s: %s client failures, ignored", server_round, len(failures))
            if not self.accept_failures:
                log.warning("round %s: failures not accepted, global model unchanged", server_round)
                return None, {
                    "received": len(results),
                    "failures": len(failures),
                    "stragglers": 0,
                    "refused": 0,
                    "clipped": 0,
                    "accepted": 0,
                }
        global_arrays = self.core.global_arrays
        outcome = self.core.aggregate(
            server_round,
            [self._reply(proxy, fit_res) for proxy, fit_res in results],
            failures=len(failures),
            logger=log,
        )
        metrics: dict[str, Scalar] = dict(outcome.metrics)
        if self.fit_metrics_aggregation_fn is not None and outcome.accepted:
            user = self.fit_metrics_aggregation_fn(
                [(int(a.reply.num_examples), dict(a.reply.metrics)) for a in outcome.accepted]
            )
            metrics.update(user)
        new_arrays = global_arrays if outcome.arrays is None else outcome.arrays
        return ndarrays_to_parameters(new_arrays), metrics
