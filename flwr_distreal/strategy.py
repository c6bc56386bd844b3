"""Flower strategies: DISTREAL (Algorithm 2) and the paper's baselines.

Every strategy here is a legacy :class:`flwr.server.strategy.FedAvg` subclass for
clients that are ``NumPyClient`` instances wired through ``ClientApp(client_fn=...)``.
The maths lives in :mod:`flwr_distreal.aggregate` (pure NumPy); the classes only
unpack Flower's messages, validate, and delegate.

Model parameters travel as the model's ``state_dict()`` values in ``state_dict``
order, in both directions.

Strategies
----------
Distreal
    Algorithm 2 of Rapp et al. (AAAI 2022): the server averages the clients'
    updates weighted by the MACs each reports having spent.
FullResources
    FedAvg on the full model, with clients told to ignore their resource limits
    (the paper's upper bound).
SmallNetwork
    FedAvg on a network small enough for the weakest device.
FederatedDropout
    Caldas et al. (2018), extended as in the paper: one dropout rate for all
    layers per device, chosen by the server at round start from the device's
    availability; a random filter subset fixed for the round; per-weight averaging.
HeteroFL
    Diao et al. (2021): width levels ``s**(p-1)``, the first channels of every
    layer, a level per device chosen at round start; per-weight averaging.

What a client sends and receives
--------------------------------
Fit config (server to client, kebab-case): ``"server-round"`` (int) always;
``"unlimited"`` (bool, :class:`FullResources` only); for the submodel baselines
``"device-id"`` (int), ``"fixed-subsets"`` (JSON, see :func:`encode_subsets`),
``"submodel-macs"`` (forward MACs per sample of the assigned submodel) and
``"dropout-rate"`` (:class:`FederatedDropout`) or ``"width-level"`` and
``"width"`` (:class:`HeteroFL`).

Fit metrics (client to server; key names are constructor arguments): ``"macs"``
(the MACs ``c`` spent, Algorithm 1), ``"num_batches"``, ``"straggler"`` (bool),
``"available_macs"`` (what the device could have spent in the round, same unit as
``"macs"``) and, for the submodel baselines, ``"partition-id"``.

Client properties (``NumPyClient.get_properties``), used by the submodel baselines
at round start: ``"partition-id"`` (the device id of the resource model) and
``"round-samples"`` (samples processed in one round of local training: the sum of
the mini-batch sizes over all local steps).
"""

from __future__ import annotations

import logging
import math
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.common import (
    FitIns,
    FitRes,
    Metrics,
    NDArray,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg
from torch import Tensor, nn

from .aggregate import (
    OnExcess,
    RefusalReason,
    ValidationResult,
    mac_weighted_update,
    masked_average,
    validate_arrays,
    validate_reply,
    weighted_average,
)
from .client_manager import fetch_properties
from .contract import decode_subsets, encode_subsets, is_number, is_straggler
from .dropout import DropoutModel, kept_count, parameter_masks
from .macs import macs_of_counts

log = logging.getLogger(__name__)

__all__ = [
    "Distreal",
    "FederatedDropout",
    "FullResources",
    "HeteroFL",
    "SmallNetwork",
    "SubmodelStrategy",
    "decode_subsets",
    "encode_subsets",
    "fit_metrics_aggregation",
    "make_evaluate_fn",
]

AvailabilityFn = Callable[[int, float], float]
EvaluateFn = Callable[[int, NDArrays, dict[str, Scalar]], tuple[float, dict[str, Scalar]] | None]


# ---------------------------------------------------------------------------- helpers


def fit_metrics_aggregation(
    fit_metrics: list[tuple[int, Metrics]],
    *,
    macs_key: str = "macs",
    straggler_key: str = "straggler",
    available_macs_key: str = "available_macs",
) -> Metrics:
    """Aggregate clients' fit metrics into per-round resource metrics.

    Usable as FedAvg's ``fit_metrics_aggregation_fn`` (its signature), and used by
    every strategy of this module on the replies it received.

    Parameters
    ----------
    fit_metrics : list[tuple[int, Metrics]]
        ``(num_examples, metrics)`` per reply.
    macs_key : str, optional
        Metric holding the MACs a client spent. Defaults to ``"macs"``.
    straggler_key : str, optional
        Metric that is true for a client that missed the round's deadline.
        Defaults to ``"straggler"``.
    available_macs_key : str, optional
        Metric holding the MACs the client could have spent in the round.
        Defaults to ``"available_macs"``.

    Returns
    -------
    Metrics
        ``received`` (replies), ``stragglers`` (how many were stragglers),
        ``mean_macs`` (mean reported MACs over the non-stragglers that report a
        finite value) and ``mean_utilisation`` (mean of ``macs / available_macs``
        over the non-stragglers that report both, with ``available_macs > 0``).
        A mean over no reply is NaN.
    """
    stragglers = 0
    macs: list[float] = []
    utilisation: list[float] = []
    for _, metrics in fit_metrics:
        if is_straggler(metrics, straggler_key):
            stragglers += 1
            continue
        c = metrics.get(macs_key)
        if not is_number(c) or not math.isfinite(float(c)):  # type: ignore[arg-type]
            continue
        macs.append(float(c))  # type: ignore[arg-type]
        avail = metrics.get(available_macs_key)
        if is_number(avail) and math.isfinite(float(avail)) and float(avail) > 0:  # type: ignore[arg-type]
            utilisation.append(float(c) / float(avail))  # type: ignore[arg-type]
    return {
        "received": len(fit_metrics),
        "stragglers": stragglers,
        "mean_macs": float(np.mean(macs)) if macs else math.nan,
        "mean_utilisation": float(np.mean(utilisation)) if utilisation else math.nan,
    }


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
    from .models import build_model  # local import: registry builds torch models

    state: dict[str, Any] = {}

    def evaluate_fn(
        server_round: int, parameters_ndarrays: NDArrays, config: dict[str, Scalar]
    ) -> tuple[float, dict[str, Scalar]]:
        if "model" not in state:
            model = build_model(model_name, num_classes, **dict(model_kwargs or {}))
            state["model"] = model.to(device)
            state["loader"] = test_loader_factory()
        model = state["model"]
        _load_arrays(model, parameters_ndarrays)
        model.set_dropout(None)
        model.set_fixed_subsets(None)
        model.eval()
        total_loss, correct, n = 0.0, 0, 0
        with torch.no_grad():
            for inputs, labels in state["loader"]:
                inputs, labels = inputs.to(device), labels.to(device)
                logits = model(inputs)
                total_loss += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
                correct += int((logits.argmax(dim=1) == labels).sum())
                n += int(labels.shape[0])
        if n == 0:
            raise ValueError("the test loader yielded no samples")
        log.info(
            "round %s: server-side test accuracy %.4f, loss %.4f", server_round, correct / n, total_loss / n
        )
        return total_loss / n, {"accuracy": correct / n, "num_examples": n}

    return evaluate_fn


def _load_arrays(model: nn.Module, arrays: Sequence[NDArray]) -> None:
    """Load ``state_dict``-ordered arrays into a model."""
    keys = list(model.state_dict().keys())
    if len(arrays) != len(keys):
        raise ValueError(
            f"got {len(arrays)} arrays for a model with {len(keys)} state_dict entries: "
            "wrong model for these parameters?"
        )
    model.load_state_dict({k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, arrays)})


@dataclass
class _Reply:
    """An accepted reply: its proxy, result, arrays and validated MACs."""

    proxy: ClientProxy
    fit_res: FitRes
    arrays: NDArrays
    macs: float | None = None


# -------------------------------------------------------------------- the base class


class _ResourceAwareFedAvg(FedAvg):
    """FedAvg that drops stragglers, validates every reply and keeps the broadcast model.

    Subclasses implement :meth:`_check_reply` and :meth:`_aggregate`; they may add
    per-client fit config with :meth:`_client_configs`.
    """

    def __init__(
        self,
        *,
        macs_key: str = "macs",
        num_batches_key: str = "num_batches",
        straggler_key: str = "straggler",
        available_macs_key: str = "available_macs",
        **fedavg_kwargs: Any,
    ) -> None:
        min_fit = fedavg_kwargs.get("min_fit_clients", 2)
        min_eval = fedavg_kwargs.get("min_evaluate_clients", 2)
        min_avail = fedavg_kwargs.get("min_available_clients", 2)
        if min_fit > min_avail:
            raise ValueError(
                f"min_available_clients ({min_avail}) must be >= min_fit_clients ({min_fit})"
            )
        if fedavg_kwargs.get("fraction_evaluate", 1.0) > 0 and min_eval > min_avail:
            raise ValueError(
                f"min_available_clients ({min_avail}) must be >= min_evaluate_clients ({min_eval}) "
                "when clients evaluate (fraction_evaluate > 0)"
            )
        for name, key in (
            ("macs_key", macs_key),
            ("num_batches_key", num_batches_key),
            ("straggler_key", straggler_key),
            ("available_macs_key", available_macs_key),
        ):
            if not isinstance(key, str) or not key:
                raise ValueError(f"{name} must be a non-empty string, got {key!r}")
        super().__init__(**fedavg_kwargs)
        self.macs_key = macs_key
        self.num_batches_key = num_batches_key
        self.straggler_key = straggler_key
        self.available_macs_key = available_macs_key
        self._global: NDArrays | None = None
        self._global_round: int | None = None

    # -- configure ---------------------------------------------------------------------
    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Sample clients as FedAvg does, keep a copy of the broadcast parameters, add config.

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
        self._global = parameters_to_ndarrays(parameters)
        self._global_round = server_round
        pairs = super().configure_fit(server_round, parameters, client_manager)
        extra = self._client_configs(server_round, [client for client, _ in pairs])
        out: list[tuple[ClientProxy, FitIns]] = []
        for client, fit_ins in pairs:
            if client.cid not in extra:
                continue
            config: dict[str, Scalar] = dict(fit_ins.config)
            config["server-round"] = server_round
            config.update(extra[client.cid])
            out.append((client, FitIns(fit_ins.parameters, config)))
        return out

    @staticmethod
    def _reply_order(result: tuple[ClientProxy, FitRes]) -> tuple[int, str]:
        """Aggregation order of the replies: by the reported device id, then ``cid``.

        Replies arrive in completion order; summing them in a fixed order makes a seeded run
        reproducible to the last bit.
        """
        proxy, fit_res = result
        device = fit_res.metrics.get("partition-id") if fit_res.metrics else None
        if isinstance(device, bool) or not isinstance(device, int):
            device = -1
        return device, proxy.cid

    def _client_configs(
        self, server_round: int, clients: list[ClientProxy]
    ) -> dict[str, dict[str, Scalar]]:
        """Extra fit config per client cid; a client missing from the result is not trained."""
        return {client.cid: {} for client in clients}

    # -- aggregate ---------------------------------------------------------------------
    @abstractmethod
    def _check_reply(self, proxy: ClientProxy, fit_res: FitRes, arrays: NDArrays) -> ValidationResult:
        """Validate one non-straggler reply."""

    @abstractmethod
    def _aggregate(self, global_arrays: NDArrays, replies: list[_Reply]) -> NDArrays | None:
        """Aggregate accepted replies; None when they carry no weight."""

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Drop stragglers, validate replies, aggregate the rest.

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
            ``received``, ``failures``, ``stragglers``, ``refused``, ``accepted``,
            ``mean_macs`` and ``mean_utilisation`` (over the accepted replies), plus
            whatever ``fit_metrics_aggregation_fn`` returns for the accepted replies.

        Raises
        ------
        RuntimeError
            If no parameters were broadcast by :meth:`configure_fit` before.
        """
        metrics: dict[str, Scalar] = {
            "received": len(results),
            "failures": len(failures),
            "stragglers": 0,
            "refused": 0,
            "accepted": 0,
        }
        if failures:
            log.warning("round %s: %s client failures, ignored", server_round, len(failures))
            if not self.accept_failures:
                log.warning("round %s: failures not accepted, global model unchanged", server_round)
                return None, metrics
        global_arrays = self._require_global()
        if self._global_round != server_round:
            log.warning(
                "aggregate_fit for round %s, but the last broadcast was in round %s",
                server_round,
                self._global_round,
            )

        accepted: list[_Reply] = []
        for proxy, fit_res in sorted(results, key=self._reply_order):
            if is_straggler(fit_res.metrics, self.straggler_key):
                metrics["stragglers"] = int(metrics["stragglers"]) + 1
                continue
            arrays = parameters_to_ndarrays(fit_res.parameters)
            check = self._check_reply(proxy, fit_res, arrays)
            if not check.ok:
                metrics["refused"] = int(metrics["refused"]) + 1
                log.warning(
                    "round %s: refused reply of client %s (%s): %s",
                    server_round,
                    proxy.cid,
                    check.reason.value if check.reason is not None else "invalid",
                    check.message,
                )
                continue
            accepted.append(_Reply(proxy, fit_res, arrays, check.macs))
        metrics["accepted"] = len(accepted)

        resource_metrics = fit_metrics_aggregation(
            [(r.fit_res.num_examples, r.fit_res.metrics) for r in accepted],
            macs_key=self.macs_key,
            straggler_key=self.straggler_key,
            available_macs_key=self.available_macs_key,
        )
        metrics["mean_macs"] = resource_metrics["mean_macs"]
        metrics["mean_utilisation"] = resource_metrics["mean_utilisation"]
        if self.fit_metrics_aggregation_fn is not None and accepted:
            user = self.fit_metrics_aggregation_fn(
                [(r.fit_res.num_examples, r.fit_res.metrics) for r in accepted]
            )
            metrics.update(user)

        new_arrays = self._aggregate(global_arrays, accepted) if accepted else None
        if new_arrays is None:
            log.warning(
                "round %s: no update to aggregate (%s received, %s stragglers, %s refused); "
                "keeping the previous global model",
                server_round,
                len(results),
                metrics["stragglers"],
                metrics["refused"],
            )
            return ndarrays_to_parameters(global_arrays), metrics
        log.info(
            "round %s: aggregated %s of %s replies (%s stragglers, %s refused, %s failures)",
            server_round,
            len(accepted),
            len(results),
            metrics["stragglers"],
            metrics["refused"],
            len(failures),
        )
        return ndarrays_to_parameters(new_arrays), metrics

    def _require_global(self) -> NDArrays:
        """The parameters broadcast by the last :meth:`configure_fit`."""
        if self._global is None:
            raise RuntimeError(
                "no parameters were broadcast yet: configure_fit must run before aggregate_fit"
            )
        return self._global

    def _check_arrays(self, arrays: NDArrays) -> ValidationResult:
        global_arrays = self._require_global()
        return validate_arrays(
            arrays, [g.shape for g in global_arrays], [g.dtype.kind for g in global_arrays]
        )


# ---------------------------------------------------------------------------- DISTREAL


class Distreal(_ResourceAwareFedAvg):
    """DISTREAL server: average updates weighted by the MACs each client spent.

    Implements Algorithm 2 of Rapp et al. (AAAI 2022):
    ``theta_t = theta_{t-1} + sum_i c_i (theta_i - theta_{t-1}) / sum_i c_i``, where
    ``c_i`` is the MACs client ``i`` reports (accumulated per mini-batch by
    Algorithm 1, see :class:`flwr_distreal.client.DistrealClient`). With equal
    ``c_i`` this is FedAvg.

    A reply is discarded when its straggler metric is true (the client missed the
    round's deadline). Every other reply passes :func:`flwr_distreal.aggregate.validate_reply`:
    it is refused, with a logged reason, when its MACs are missing, not a number,
    NaN/inf, negative or above ``num_batches * full_macs_per_batch`` (the most the
    client could have spent), or when its arrays have the wrong count, shapes or
    dtypes or non-finite values. Failures reported by Flower are tolerated. When no
    valid reply remains, the previous global model is kept.

    Parameters
    ----------
    full_macs_per_batch : float
        The most MACs a client can report for one mini-batch: the full model's MACs
        for one step, in the unit of the clients' ``macs`` metric. When clients add
        the LUT's forward MACs per sample once per mini-batch (Algorithm 1), this is
        ``count_macs(model)``; when they count a step's MACs, it is that step's cost
        for a full batch (``resources.step_macs(count_macs(model), batch_size)``).
    on_excess : {"refuse", "clip"}, optional
        What to do with a reply whose MACs exceed the maximum: refuse it, or clip
        its MACs to the maximum (logged). Defaults to "refuse".
    macs_key : str, optional
        Fit metric with the MACs ``c_i`` spent. Defaults to ``"macs"``.
    num_batches_key : str, optional
        Fit metric with the number of mini-batches trained. Defaults to ``"num_batches"``.
    straggler_key : str, optional
        Fit metric that is true for a client that missed the deadline. Defaults to
        ``"straggler"``.
    available_macs_key : str, optional
        Fit metric with the MACs the client could have spent in the round (for the
        ``mean_utilisation`` metric). Defaults to ``"available_macs"``.
    **fedavg_kwargs : Any
        Passed to :class:`flwr.server.strategy.FedAvg` (``fraction_fit``,
        ``min_fit_clients``, ``evaluate_fn``, ``on_fit_config_fn``,
        ``initial_parameters``, ``accept_failures``, ``fit_metrics_aggregation_fn``,
        ...). ``min_available_clients`` must not be below ``min_fit_clients``, nor
        below ``min_evaluate_clients`` unless ``fraction_evaluate`` is 0.

    Raises
    ------
    ValueError
        If ``full_macs_per_batch`` is not a positive finite number, ``on_excess`` is
        not "refuse" or "clip", a key is empty, or the client minimums are inconsistent.
    """

    def __init__(
        self,
        *,
        full_macs_per_batch: float,
        on_excess: OnExcess = "refuse",
        macs_key: str = "macs",
        num_batches_key: str = "num_batches",
        straggler_key: str = "straggler",
        available_macs_key: str = "available_macs",
        **fedavg_kwargs: Any,
    ) -> None:
        if not is_number(full_macs_per_batch) or not (
            math.isfinite(float(full_macs_per_batch)) and float(full_macs_per_batch) > 0
        ):
            raise ValueError(
                f"full_macs_per_batch must be a positive finite number, got {full_macs_per_batch!r}"
            )
        if on_excess not in ("refuse", "clip"):
            raise ValueError(f"on_excess must be 'refuse' or 'clip', got {on_excess!r}")
        self.full_macs_per_batch = float(full_macs_per_batch)
        self.on_excess: OnExcess = on_excess
        super().__init__(
            macs_key=macs_key,
            num_batches_key=num_batches_key,
            straggler_key=straggler_key,
            available_macs_key=available_macs_key,
            **fedavg_kwargs,
        )

    def __repr__(self) -> str:
        return (
            f"Distreal(full_macs_per_batch={self.full_macs_per_batch:g}, on_excess={self.on_excess!r}, "
            f"accept_failures={self.accept_failures})"
        )

    def _check_reply(self, proxy: ClientProxy, fit_res: FitRes, arrays: NDArrays) -> ValidationResult:
        global_arrays = self._require_global()
        return validate_reply(
            arrays,
            [g.shape for g in global_arrays],
            fit_res.metrics.get(self.macs_key),
            fit_res.metrics.get(self.num_batches_key),
            self.full_macs_per_batch,
            expected_kinds=[g.dtype.kind for g in global_arrays],
            on_excess=self.on_excess,
        )

    def _aggregate(self, global_arrays: NDArrays, replies: list[_Reply]) -> NDArrays | None:
        macs = [float(r.macs or 0.0) for r in replies]
        if sum(macs) <= 0.0:
            log.warning("every accepted reply reports zero MACs: nothing to weight by")
            return None
        return mac_weighted_update(global_arrays, [r.arrays for r in replies], macs)


# --------------------------------------------------------------- FedAvg-type baselines


class SmallNetwork(_ResourceAwareFedAvg):
    """Baseline "small network": FedAvg on a network that fits the weakest device.

    The small model (e.g. ``femnist_cnn_small``, DenseNet-BC-19 for CIFAR-10) lives
    on the clients and in the initial parameters; server-side this is FedAvg
    weighted by the number of examples, with stragglers discarded and every reply's
    arrays validated (count, shapes, dtypes, finiteness; refusals are logged).

    Parameters
    ----------
    straggler_key : str, optional
        Fit metric that is true for a client that missed the deadline. Defaults to
        ``"straggler"``.
    macs_key : str, optional
        Fit metric with the MACs spent (only for the ``mean_macs`` metric).
        Defaults to ``"macs"``.
    available_macs_key : str, optional
        Fit metric with the MACs available (for ``mean_utilisation``). Defaults to
        ``"available_macs"``.
    **fedavg_kwargs : Any
        Passed to :class:`flwr.server.strategy.FedAvg`.
    """

    def __init__(
        self,
        *,
        straggler_key: str = "straggler",
        macs_key: str = "macs",
        available_macs_key: str = "available_macs",
        **fedavg_kwargs: Any,
    ) -> None:
        super().__init__(
            macs_key=macs_key,
            straggler_key=straggler_key,
            available_macs_key=available_macs_key,
            **fedavg_kwargs,
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(accept_failures={self.accept_failures})"

    def _check_reply(self, proxy: ClientProxy, fit_res: FitRes, arrays: NDArrays) -> ValidationResult:
        return self._check_arrays(arrays)

    def _aggregate(self, global_arrays: NDArrays, replies: list[_Reply]) -> NDArrays | None:
        weights = [r.fit_res.num_examples for r in replies]
        if sum(weights) <= 0:
            log.warning("every accepted reply reports zero examples: nothing to weight by")
            return None
        return weighted_average(global_arrays, [r.arrays for r in replies], weights)


class FullResources(SmallNetwork):
    """Baseline "full resources": FedAvg on the full model with no resource limits.

    The paper's upper bound. Every fit config carries ``"unlimited": True`` so that
    clients train the full model on every mini-batch and never become stragglers.
    Aggregation is FedAvg weighted by the number of examples (see
    :class:`SmallNetwork` for the arguments).
    """

    def _client_configs(
        self, server_round: int, clients: list[ClientProxy]
    ) -> dict[str, dict[str, Scalar]]:
        return {client.cid: {"unlimited": True} for client in clients}


# ------------------------------------------------------------ submodel baselines (base)


@dataclass(frozen=True)
class _Assignment:
    """The submodel a client trains in one round."""

    device_id: int
    kept: tuple[np.ndarray | None, ...]
    mask_key: str | None  # cache key for masks that repeat (HeteroFL levels); None = no cache


class SubmodelStrategy(_ResourceAwareFedAvg):
    """Shared base of the baselines that assign a fixed submodel per client at round start.

    At round start, for every selected client, the server finds the device id and
    its round workload (client properties ``"partition-id"`` and ``"round-samples"``,
    asked once per client proxy with ``get_properties`` and cached), reads the
    device's availability at the round's start time, converts it into a forward-MACs
    budget per sample, and lets the subclass choose a submodel (kept filters per
    dropout layer). The client receives the subset in ``"fixed-subsets"`` and trains
    it for the whole round, so a drop in resources mid-round makes it a straggler.
    Aggregation averages every weight over the clients whose submodel trained it
    (:func:`flwr_distreal.aggregate.masked_average`, weighted by examples), with the
    masks of :func:`flwr_distreal.dropout.parameter_masks` for the assigned subsets.

    The budget assumes the availability at round start lasts the whole round:
    ``availability_fn(device, t0) * round_duration / (step_macs_factor * round_samples)``
    forward MACs per sample, with ``t0 = (server_round - 1) * round_duration`` (the
    round timing of :class:`flwr_distreal.resources.ResourceModel`).

    Parameters
    ----------
    model_name : str
        Registry name of the full model the clients train (the server builds one
        instance to compute MACs and masks).
    availability_fn : Callable[[int, float], float]
        ``availability_fn(device_id, t)``: the device's resource availability in
        MACs per second at simulated time ``t``, e.g.
        ``lambda d, t: resource_model.trace(d).rate_at(t)``.
    round_duration : float
        Round duration ``T`` in seconds of simulated time (the deadline).
    num_classes : int | None, optional
        Classifier outputs of the model; None keeps its default. Defaults to None.
    model_kwargs : Mapping[str, Any] | None, optional
        Extra builder arguments for the model. Defaults to None.
    step_macs_factor : float, optional
        Cost of a training step relative to its forward pass, as in
        :func:`flwr_distreal.resources.step_macs`. Defaults to 3.0.
    round_samples_fn : Callable[[int], int] | None, optional
        ``round_samples_fn(device_id)``: samples the device processes in one round
        of local training (sum of mini-batch sizes over its local steps). None
        (default) asks the client's ``"round-samples"`` property.
    device_id_fn : Callable[[ClientProxy], int] | None, optional
        Maps a client proxy to its device id. None (default) asks the client's
        ``"partition-id"`` property (Flower's ``cid`` is a node id, not the
        partition id).
    seed : int, optional
        Seed for the random parts of the assignment. Defaults to 0.
    properties_timeout : float | None, optional
        Timeout in seconds of each ``get_properties`` call. Defaults to None.
    partition_id_key : str, optional
        Property and fit-metric key with the device id. Defaults to ``"partition-id"``.
    round_samples_key : str, optional
        Property key with the round's samples. Defaults to ``"round-samples"``.
    straggler_key, macs_key, available_macs_key : str, optional
        Fit metric keys, as in :class:`Distreal`.
    **fedavg_kwargs : Any
        Passed to :class:`flwr.server.strategy.FedAvg`.

    Raises
    ------
    ValueError
        If the model name is unknown, ``round_duration`` or ``step_macs_factor`` is
        not a positive finite number, or the FedAvg arguments are inconsistent.
    """

    def __init__(
        self,
        *,
        model_name: str,
        availability_fn: AvailabilityFn,
        round_duration: float,
        num_classes: int | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        step_macs_factor: float = 3.0,
        round_samples_fn: Callable[[int], int] | None = None,
        device_id_fn: Callable[[ClientProxy], int] | None = None,
        seed: int = 0,
        properties_timeout: float | None = None,
        partition_id_key: str = "partition-id",
        round_samples_key: str = "round-samples",
        straggler_key: str = "straggler",
        macs_key: str = "macs",
        available_macs_key: str = "available_macs",
        **fedavg_kwargs: Any,
    ) -> None:
        from .models import build_model

        for name, value in (("round_duration", round_duration), ("step_macs_factor", step_macs_factor)):
            if not is_number(value) or not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not callable(availability_fn):
            raise ValueError("availability_fn must be a callable (device_id, t) -> MACs per second")
        super().__init__(
            macs_key=macs_key,
            straggler_key=straggler_key,
            available_macs_key=available_macs_key,
            **fedavg_kwargs,
        )
        self.model: DropoutModel = build_model(model_name, num_classes, **dict(model_kwargs or {}))
        self.model_name = model_name
        self.availability_fn = availability_fn
        self.round_duration = float(round_duration)
        self.step_macs_factor = float(step_macs_factor)
        self.round_samples_fn = round_samples_fn
        self.device_id_fn = device_id_fn
        self.seed = int(seed)
        self.properties_timeout = properties_timeout
        self.partition_id_key = partition_id_key
        self.round_samples_key = round_samples_key
        self.widths: list[int] = list(self.model.layer_widths)
        self._state_keys = list(self.model.state_dict().keys())
        self._properties: dict[str, dict[str, Scalar]] = {}
        self._assignments: dict[str, _Assignment] = {}
        self._mask_cache: dict[str, list[NDArray]] = {}

    # -- device look-up ----------------------------------------------------------------
    def _required_properties(self) -> list[str]:
        keys = []
        if self.device_id_fn is None:
            keys.append(self.partition_id_key)
        if self.round_samples_fn is None:
            keys.append(self.round_samples_key)
        return keys

    def _fetch_properties(self, clients: list[ClientProxy]) -> None:
        """Ask uncached clients for their properties, in parallel, and cache them."""
        required = self._required_properties()
        todo = [c for c in clients if c.cid not in self._properties]
        if required and todo:
            self._properties.update(fetch_properties(todo, required, self.properties_timeout))

    def _device_of(self, client: ClientProxy) -> tuple[int, int]:
        """(device id, round samples) of a client; raises ValueError if unknown or invalid."""
        props = self._properties.get(client.cid, {})
        if self.device_id_fn is not None:
            device_id = self.device_id_fn(client)
        else:
            device_id = props.get(self.partition_id_key)  # type: ignore[assignment]
        samples = (
            self.round_samples_fn(int(device_id))  # type: ignore[arg-type]
            if self.round_samples_fn is not None and is_number(device_id)
            else props.get(self.round_samples_key)
        )
        for name, value in (("device id", device_id), ("round samples", samples)):
            if not is_number(value) or float(value) != int(value) or int(value) < 0:  # type: ignore[arg-type]
                raise ValueError(f"client {client.cid} has invalid {name} {value!r}")
        if int(samples) == 0:  # type: ignore[arg-type]
            raise ValueError(f"client {client.cid} has no training samples")
        return int(device_id), int(samples)  # type: ignore[arg-type]

    def round_start(self, server_round: int) -> float:
        """Simulated time at which round ``server_round`` starts, ``(server_round - 1) * T``."""
        return (server_round - 1) * self.round_duration

    def forward_budget(self, device_id: int, server_round: int, round_samples: int) -> float:
        """Forward MACs per sample a device can afford this round, judged at round start.

        Parameters
        ----------
        device_id : int
            The device.
        server_round : int
            The round (its start time is :meth:`round_start`).
        round_samples : int
            Samples the device processes in the round.

        Returns
        -------
        float
            ``r(t0) * T / (step_macs_factor * round_samples)``.

        Raises
        ------
        ValueError
            If the availability is negative, NaN or not a number.
        """
        rate = self.availability_fn(device_id, self.round_start(server_round))
        if not is_number(rate) or math.isnan(float(rate)) or float(rate) < 0:
            raise ValueError(f"availability of device {device_id} is {rate!r}, expected MACs/s >= 0")
        return float(rate) * self.round_duration / (self.step_macs_factor * round_samples)

    # -- assignment --------------------------------------------------------------------
    @abstractmethod
    def _assign(
        self, device_id: int, budget: float, server_round: int
    ) -> tuple[_Assignment, dict[str, Scalar]]:
        """Choose a submodel for a device with ``budget`` forward MACs per sample."""

    def _client_configs(
        self, server_round: int, clients: list[ClientProxy]
    ) -> dict[str, dict[str, Scalar]]:
        global_arrays = self._require_global()
        if len(global_arrays) != len(self._state_keys):
            raise ValueError(
                f"the global parameters have {len(global_arrays)} arrays but model "
                f"{self.model_name!r} has {len(self._state_keys)} state_dict entries"
            )
        self._assignments = {}
        if self.device_id_fn is None or self.round_samples_fn is None:
            self._fetch_properties(clients)
        configs: dict[str, dict[str, Scalar]] = {}
        for client in clients:
            try:
                device_id, samples = self._device_of(client)
                budget = self.forward_budget(device_id, server_round, samples)
            except ValueError as err:
                log.warning("round %s: client %s not trained: %s", server_round, client.cid, err)
                continue
            assignment, config = self._assign(device_id, budget, server_round)
            self._assignments[client.cid] = assignment
            counts = [self.widths[i] if k is None else len(k) for i, k in enumerate(assignment.kept)]
            configs[client.cid] = {
                "device-id": device_id,
                "fixed-subsets": encode_subsets(assignment.kept),
                "submodel-macs": int(macs_of_counts(self.model, counts)),
                **config,
            }
        return configs

    # -- aggregation -------------------------------------------------------------------
    def _check_reply(self, proxy: ClientProxy, fit_res: FitRes, arrays: NDArrays) -> ValidationResult:
        assignment = self._assignments.get(proxy.cid)
        if assignment is None:
            return ValidationResult.refuse(
                RefusalReason.UNASSIGNED_CLIENT, "no submodel was assigned to this client this round"
            )
        reported = fit_res.metrics.get(self.partition_id_key)
        if reported is not None and (
            not is_number(reported) or int(reported) != assignment.device_id  # type: ignore[arg-type]
        ):
            return ValidationResult.refuse(
                RefusalReason.DEVICE_MISMATCH,
                f"reply reports {self.partition_id_key}={reported!r} but the submodel was "
                f"assigned to device {assignment.device_id}",
            )
        return self._check_arrays(arrays)

    def _masks(self, assignment: _Assignment) -> list[NDArray]:
        key = assignment.mask_key
        if key is not None and key in self._mask_cache:
            return self._mask_cache[key]
        kept = [None if k is None else torch.as_tensor(k, dtype=torch.long) for k in assignment.kept]
        by_key = parameter_masks(self.model, kept)
        masks = [by_key[k] for k in self._state_keys]
        if key is not None:
            self._mask_cache[key] = masks
        return masks

    def _aggregate(self, global_arrays: NDArrays, replies: list[_Reply]) -> NDArrays | None:
        weights = [r.fit_res.num_examples for r in replies]
        if sum(weights) <= 0:
            log.warning("every accepted reply reports zero examples: nothing to weight by")
            return None
        masks = [self._masks(self._assignments[r.proxy.cid]) for r in replies]
        return masked_average(global_arrays, [r.arrays for r in replies], masks, weights)


# -------------------------------------------------------------------- Federated Dropout


class FederatedDropout(SubmodelStrategy):
    """Baseline Federated Dropout (Caldas et al. 2018), extended as in the paper.

    At round start the server picks, per selected device, ONE dropout rate for all
    layers from the device's availability at that moment (the most expensive rate
    whose submodel fits the device's budget, see :class:`SubmodelStrategy`), and a
    random subset of ``kept_count(rate, C)`` filters per layer, fixed for the
    whole round and seeded by ``(seed, server_round, device_id)``. Clients get
    ``"dropout-rate"`` and ``"fixed-subsets"``; aggregation averages every weight
    over the clients that trained it.

    Parameters
    ----------
    rate_for_budget : Callable[[float], float] | None, optional
        Maps a forward-MACs-per-sample budget to a rate in [0, 0.5]. None (default)
        uses a uniform LUT over ``rates``: the lowest rate whose MACs fit, or 0.5
        when none fits (the device will then likely be a straggler).
    rates : Sequence[float] | None, optional
        Candidate rates of the default selection. Defaults to 0, 0.01, ..., 0.5.
    **kwargs : Any
        The arguments of :class:`SubmodelStrategy` (``model_name``,
        ``availability_fn``, ``round_duration``, ...) and of FedAvg.

    Raises
    ------
    ValueError
        As :class:`SubmodelStrategy`, or if a rate is outside [0, 0.5].
    """

    def __init__(
        self,
        *,
        rate_for_budget: Callable[[float], float] | None = None,
        rates: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if rate_for_budget is None:
            from .lut import LUT

            grid = np.round(np.linspace(0.0, 0.5, 51), 10) if rates is None else np.asarray(rates, float)
            if grid.size == 0 or not np.all(np.isfinite(grid)) or grid.min() < 0 or grid.max() > 0.5:
                raise ValueError(f"rates must be non-empty and within [0, 0.5], got {list(grid)}")
            lut = LUT.uniform(self.model, grid.tolist())

            def rate_for_budget(budget: float) -> float:
                vector, _ = lut.select(budget, fallback_to_cheapest=True)
                return float(vector[0])

        self.rate_for_budget = rate_for_budget

    def __repr__(self) -> str:
        return f"FederatedDropout(model_name={self.model_name!r}, seed={self.seed})"

    def _assign(
        self, device_id: int, budget: float, server_round: int
    ) -> tuple[_Assignment, dict[str, Scalar]]:
        rate = float(self.rate_for_budget(budget))
        if not (math.isfinite(rate) and 0.0 <= rate <= 0.5):
            raise ValueError(f"rate_for_budget returned {rate!r}, expected a rate in [0, 0.5]")
        rng = np.random.default_rng([self.seed, server_round, device_id])
        kept: list[np.ndarray | None] = []
        for width in self.widths:
            k = kept_count(rate, width)
            kept.append(None if k == width else np.sort(rng.choice(width, size=k, replace=False)))
        return _Assignment(device_id, tuple(kept), None), {"dropout-rate": rate}


# ---------------------------------------------------------------------------- HeteroFL


class HeteroFL(SubmodelStrategy):
    """Baseline HeteroFL (Diao, Ding and Tarokh 2021) as in the paper.

    Width level ``p = 1 .. levels`` keeps the FIRST ``ceil(s**(p-1) * C)`` filters of
    every dropout layer with ``C`` filters. At round start each selected device gets
    the widest level whose forward MACs fit its budget (see
    :class:`SubmodelStrategy`), or the narrowest level when none fits. Clients get
    ``"width-level"``, ``"width"`` and ``"fixed-subsets"``; aggregation averages every
    weight over the clients that trained it.

    Parameters
    ----------
    shrink : float, optional
        Shrinking ratio ``s`` in (0, 1). Defaults to 0.7 (the paper's choice).
    levels : int, optional
        Number of width levels (>= 1). Defaults to 5 (widths 1, 0.7, 0.49, 0.343, 0.24).
    **kwargs : Any
        The arguments of :class:`SubmodelStrategy` and of FedAvg.

    Raises
    ------
    ValueError
        As :class:`SubmodelStrategy`, or if ``shrink`` or ``levels`` is out of range.
    """

    def __init__(self, *, shrink: float = 0.7, levels: int = 5, **kwargs: Any) -> None:
        if not is_number(shrink) or not 0.0 < float(shrink) < 1.0:
            raise ValueError(f"shrink must be in (0, 1), got {shrink!r}")
        if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)) or levels < 1:
            raise ValueError(f"levels must be an int >= 1, got {levels!r}")
        super().__init__(**kwargs)
        self.shrink = float(shrink)
        self.levels = int(levels)
        self.level_counts: list[list[int]] = [
            self.counts_for_width(self.shrink ** (p - 1)) for p in range(1, self.levels + 1)
        ]
        self.level_macs: list[int] = [int(macs_of_counts(self.model, c)) for c in self.level_counts]

    def __repr__(self) -> str:
        return f"HeteroFL(model_name={self.model_name!r}, shrink={self.shrink}, levels={self.levels})"

    def counts_for_width(self, width: float) -> list[int]:
        """Filters kept per dropout layer at width fraction ``width``: ``ceil(width * C)``."""
        return [
            min(c, max(1, math.ceil(round(width * c, 9)))) for c in self.widths
        ]

    def level_for_budget(self, budget: float) -> int:
        """The widest level (smallest ``p``) whose MACs fit ``budget``; the last if none fits."""
        for p, macs in enumerate(self.level_macs, start=1):
            if macs <= budget:
                return p
        return self.levels

    def _assign(
        self, device_id: int, budget: float, server_round: int
    ) -> tuple[_Assignment, dict[str, Scalar]]:
        p = self.level_for_budget(budget)
        counts = self.level_counts[p - 1]
        kept = tuple(None if k == c else np.arange(k) for k, c in zip(counts, self.widths))
        config: dict[str, Scalar] = {"width-level": p, "width": round(self.shrink ** (p - 1), 12)}
        return _Assignment(device_id, kept, f"level-{p}"), config
