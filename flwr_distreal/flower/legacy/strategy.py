"""Flower strategies (legacy API): DISTREAL (Algorithm 2) and the paper's baselines.

Every strategy here is a legacy :class:`flwr.server.strategy.FedAvg` subclass for
clients that are ``NumPyClient`` instances wired through ``ClientApp(client_fn=...)``.
The classes are thin adapters: they unpack Flower's ``FitRes`` into the neutral
:class:`flwr_distreal.server.Reply`, let the Flower-free core
(:mod:`flwr_distreal.server`: the gate, the aggregation rules, the submodel
planners) decide, and pack ``Parameters``. The Message-API twins in
:mod:`flwr_distreal.flower.serverapp` run the same core, so both APIs give bit-identical
global models for the same replies.

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
    availability; a random filter subset fixed for the round; the ``aggregation``
    rule (per-weight by default).
HeteroFL
    Diao et al. (2021): width levels ``s**(p-1)``, the first channels of every
    layer, a level per device chosen at round start; the ``aggregation`` rule
    (per-weight by default).

What a client sends and receives
--------------------------------
The keys are those of :mod:`flwr_distreal.core.contract`. Fit config (server to client,
kebab-case): ``"server-round"`` (int) always; ``"unlimited"`` (bool,
:class:`FullResources` only); for the submodel baselines ``"device-id"`` (int),
``"fixed-subsets"`` (JSON, see :func:`encode_subsets`), ``"submodel-macs"`` (forward
MACs per sample of the assigned submodel) and ``"dropout-rate"``
(:class:`FederatedDropout`) or ``"width-level"`` and ``"width"`` (:class:`HeteroFL`).

Fit metrics (client to server; key names are constructor arguments): ``"macs"``
(the MACs ``c`` spent, Algorithm 1), ``"num_batches"``, ``"straggler"`` (bool),
``"available_macs"`` (what the device could have spent in the round, same unit as
``"macs"``) and ``"partition-id"`` (replies are combined in device order).

Client properties (``NumPyClient.get_properties``), used by the submodel baselines
at round start: ``"partition-id"`` (the device id of the resource model) and
``"round-samples"`` (samples processed in one round of local training: the sum of
the mini-batch sizes over all local steps).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from flwr.common import Scalar
from flwr.server.client_proxy import ClientProxy

from ...core import contract as C
from ...core import defaults as D
from ...core.contract import decode_subsets, encode_subsets, is_number
from ...methods import Method, build_core, core_arguments, get_method
from ...methods.binding import DistrealView, SubmodelView, bind_constructor, bound_method
from ...server import (
    AvailabilityFn,
    DistrealCore,
    HeteroFLPlanner,
    SubmodelCore,
    fit_metrics_aggregation,
)

# The adapter base lives in .base; its names stay importable from here.
from .base import _check_minimums, _ResourceAwareFedAvg, make_evaluate_fn
from .client_manager import fetch_properties

log = logging.getLogger(__name__)

__all__ = [
    "Distreal",
    "FederatedDropout",
    "FullResources",
    "HeteroFL",
    "MethodStrategy",
    "SmallNetwork",
    "SubmodelStrategy",
    "decode_subsets",
    "encode_subsets",
    "fit_metrics_aggregation",
    "make_evaluate_fn",
]


# --------------------------------------------------------------- one strategy, any method
class MethodStrategy(_ResourceAwareFedAvg):
    """The legacy-API strategy of any registered method (:mod:`flwr_distreal.methods`).

    The legacy twin of :class:`flwr_distreal.flower.serverapp.MethodStrategy`: the method's
    record picks the server rule (:func:`flwr_distreal.methods.build_core`) and what each client's
    fit config carries; the public classes below are this class bound to one method.

    Parameters
    ----------
    method : str | Method
        A registered method's name (or record). Bound classes take none.
    properties_timeout : float | None, optional
        Timeout in seconds of each ``get_properties`` call. Defaults to None.
    round_samples_key : str, optional
        Client property with the samples of one round. Defaults to ``"round-samples"``.
    round_samples_fn : Callable[[int], int] | None, optional
        Rule ``submodel`` only: ``round_samples_fn(device_id)`` instead of the property.
    device_id_fn : Callable[[ClientProxy], int] | None, optional
        Rule ``submodel`` only: maps a client proxy to its device id instead of its
        ``"partition-id"`` property (Flower's ``cid`` is a node id, not the partition id).
    **kwargs : Any
        The method's arguments (:func:`flwr_distreal.methods.core_arguments`), then
        :class:`flwr.server.strategy.FedAvg`'s.
    """

    #: The method a public subclass is bound to (None: the ``method`` argument names it).
    method_name: str | None = None

    def __init__(
        self,
        method: str | Method | None = None,
        *,
        properties_timeout: float | None = None,
        round_samples_key: str = C.ROUND_SAMPLES,
        round_samples_fn: Callable[[int], int] | None = None,
        device_id_fn: Callable[[ClientProxy], int] | None = None,
        **kwargs: Any,
    ) -> None:
        self.method = bound_method(type(self), method)
        rule = self.method.rule
        if rule != "submodel" and (round_samples_fn is not None or device_id_fn is not None):
            raise TypeError(
                f"round_samples_fn and device_id_fn are arguments of the submodel methods, not of {self.method.name!r}"
            )
        known = core_arguments(self.method)
        core_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in known}
        if rule == "submodel":
            _check_minimums(kwargs)  # before the core builds the model (the base checks again, cheaply)
        super().__init__(build_core(self.method, **core_kwargs), **kwargs)
        self.properties_timeout = properties_timeout
        self.round_samples_key = round_samples_key
        self.round_samples_fn = round_samples_fn
        self.device_id_fn = device_id_fn
        self.seed = int(core_kwargs.get("seed", D.SEED))
        self._properties: dict[str, dict[str, Scalar]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method_name"):
            _bind_signature(cls)

    # -- what the rule needs from the clients --------------------------------------------
    def _required_properties(self) -> list[str]:
        if self.method.rule == "macs":
            core = self.core
            return [core.partition_id_key] if core.max_batches_fn is not None else [self.round_samples_key]
        keys = []
        if self.device_id_fn is None:
            keys.append(self.core.partition_id_key)
        if self.round_samples_fn is None:
            keys.append(self.round_samples_key)
        return keys

    def _fetch_properties(self, clients: list[ClientProxy]) -> None:
        """Ask uncached clients for their properties, in parallel, and cache them."""
        required = self._required_properties()
        todo = [c for c in clients if c.cid not in self._properties]
        if required and todo:
            self._properties.update(fetch_properties(todo, required, self.properties_timeout))

    def _raw_device(self, client: ClientProxy) -> tuple[object, object]:
        """(device id, round samples) of a client as known, unvalidated."""
        props = self._properties.get(client.cid, {})
        if self.device_id_fn is not None:
            device_id: object = self.device_id_fn(client)
        else:
            device_id = props.get(self.core.partition_id_key)
        if self.round_samples_fn is not None and is_number(device_id):
            samples: object = self.round_samples_fn(int(device_id))  # type: ignore[arg-type]
        else:
            samples = props.get(self.round_samples_key)
        return device_id, samples

    def _client_configs(
        self, server_round: int, clients: list[ClientProxy]
    ) -> dict[str, dict[str, Scalar]]:
        """Each client's fit config: ``macs``: its ``num_batches`` limit from its properties
        (asked once per client proxy) when the batches are bounded, and the batch size and local
        epochs it is bounded by; ``examples``: nothing, or ``unlimited`` for a method without
        resource limits; ``submodel``: the submodel the planner chose for its device."""
        core, rule = self.core, self.method.rule
        if rule == "macs":
            if core.bounds_batches:
                self._fetch_properties(clients)
                core.limit_round(server_round, {c.cid: self._raw_device(c) for c in clients}, logger=log)
            return {client.cid: core.train_config() for client in clients}
        if rule == "submodel":
            if self.device_id_fn is None or self.round_samples_fn is None:
                self._fetch_properties(clients)
            return core.plan_round(server_round, {c.cid: self._raw_device(c) for c in clients}, logger=log)
        if self.method.unlimited:
            return {client.cid: {C.UNLIMITED: True} for client in clients}
        return super()._client_configs(server_round, clients)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method.name!r}, accept_failures={self.accept_failures})"


def _bind_signature(cls: type) -> None:
    """Give a class bound to a method a constructor whose signature lists that method's
    arguments and defaults (it calls :meth:`MethodStrategy.__init__`)."""
    method = get_method(cls.method_name)
    leading = [
        inspect.Parameter("properties_timeout", inspect.Parameter.KEYWORD_ONLY, default=None),
        inspect.Parameter("round_samples_key", inspect.Parameter.KEYWORD_ONLY, default=C.ROUND_SAMPLES),
    ]
    if method.rule == "submodel":
        leading += [
            inspect.Parameter("round_samples_fn", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("device_id_fn", inspect.Parameter.KEYWORD_ONLY, default=None),
        ]

    bind_constructor(cls, MethodStrategy.__init__, leading)


# ------------------------------------------------------------- the paper's methods, by name
class Distreal(DistrealView, MethodStrategy):
    """DISTREAL server: average updates weighted by the MACs each client spent.

    Implements Algorithm 2 of Rapp et al. (AAAI 2022):
    ``theta_t = theta_{t-1} + sum_i c_i (theta_i - theta_{t-1}) / sum_i c_i``, where
    ``c_i`` is the MACs client ``i`` reports (accumulated per mini-batch by
    Algorithm 1, see :class:`flwr_distreal.flower.legacy.client.DistrealClient`). With equal
    ``c_i`` this is FedAvg. The rule is :class:`flwr_distreal.server.DistrealCore`.

    A reply is discarded when its straggler metric is true (the client missed the
    round's deadline). Every other reply passes :func:`flwr_distreal.server.aggregate.validate_reply`:
    it is refused, with a logged reason, when its MACs are missing, not a number,
    NaN/inf, negative or above ``num_batches * full_macs_per_sample`` (the most the
    client could have spent), or when its arrays have the wrong count, shapes or
    dtypes or non-finite values. With ``batch_size`` (or ``max_batches_fn``) the
    reported ``num_batches`` is also bounded by what the server configured: the
    clients' ``round-samples`` property (asked once per client), the batch size and
    the local epochs. The survivors are screened against each other
    (:class:`flwr_distreal.server.RoundBounds`): an update whose norm per
    ``sqrt(num_batches)`` exceeds ``update_bound`` times the round's median is refused
    or clipped, a MACs claim above ``claim_bound`` times the round's median clipped or
    refused. Failures reported by Flower are tolerated. When no valid reply remains,
    the previous global model is kept.

    Parameters
    ----------
    full_macs_per_sample : float
        The full model's forward MACs per sample, ``count_macs(model)``. Algorithm 1
        adds, once per mini-batch, the forward MACs per sample of the (sub)model it
        trained, so this is the most one mini-batch adds to a reply's ``macs``
        (bound: ``num_batches`` times it).
    on_excess : {"refuse", "clip"}, optional
        What to do with a reply whose MACs exceed the maximum (or whose
        ``num_batches`` exceeds the server's limit): refuse it, or clip its MACs to
        the maximum (logged). Defaults to "refuse".
    batch_size : int | None, optional
        The clients' mini-batch size; with ``local_epochs`` and each client's
        ``round-samples`` property it bounds ``num_batches``. Defaults to None (no
        such bound).
    local_epochs : int, optional
        The clients' local epochs per round. Defaults to 1.
    max_batches_fn : Callable[[int], int] | None, optional
        ``max_batches_fn(device_id)``: the most mini-batches a device trains per
        round (device id from the ``partition-id`` property); overrides
        ``batch_size``. Defaults to None.
    update_bound : float | None, optional
        ``k`` (> 1): an update norm (per ``sqrt(batches)``) above ``k`` times the
        round's median is an outlier; None disables it. Defaults to 10.
    on_outlier : {"refuse", "clip"}, optional
        Refuse an outlier update, or scale it down to the bound. Defaults to "refuse".
    update_norm : {"model", "layer"}, optional
        Compare whole-model norms or per-array norms. Defaults to "model".
    claim_bound : float | None, optional
        ``m`` (> 1): a MACs claim above ``m`` times the round's median is an outlier;
        None disables it. Defaults to 10.
    on_claim_outlier : {"refuse", "clip"}, optional
        Clip an outlier claim to ``m`` times the median, or refuse the reply.
        Defaults to "clip".
    share_bound : float | None, optional
        ``k`` (>= 1): no reply weighs more than ``k`` times the mean of the round's other
        accepted replies, i.e. holds at most ``k / (n + k - 1)`` of the round's weight, whatever
        it claims (:func:`flwr_distreal.server.cap_shares`); None disables it. Defaults to
        :data:`~flwr_distreal.server.SHARE_BOUND` (4).
    robust : {"clip-to-median", "median", "trimmed-mean"} | None, optional
        Robust aggregation for adversarial settings. Defaults to None (Algorithm 2).
    trim_beta : float, optional
        Fraction trimmed at each end with ``robust="trimmed-mean"``. Defaults to 0.2.
    properties_timeout : float | None, optional
        Timeout in seconds of each ``get_properties`` call. Defaults to None.
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
    full_macs_per_batch : float, optional
        Deprecated name of ``full_macs_per_sample`` (a ``DeprecationWarning``; same value).
    **fedavg_kwargs : Any
        Passed to :class:`flwr.server.strategy.FedAvg` (``fraction_fit``,
        ``min_fit_clients``, ``evaluate_fn``, ``on_fit_config_fn``,
        ``initial_parameters``, ``accept_failures``, ``fit_metrics_aggregation_fn``,
        ...). ``min_available_clients`` must not be below ``min_fit_clients``, nor
        below ``min_evaluate_clients`` unless ``fraction_evaluate`` is 0.

    Raises
    ------
    ValueError
        If ``full_macs_per_sample`` is not a positive finite number, ``on_excess`` is
        not "refuse" or "clip", a bound is out of range, a key is empty, or the client
        minimums are inconsistent.
    TypeError
        If both or neither of ``full_macs_per_sample`` and ``full_macs_per_batch`` are given.
    """

    method_name = "distreal"
    core: DistrealCore

    def __repr__(self) -> str:
        return (
            f"Distreal(full_macs_per_sample={self.full_macs_per_sample:g}, on_excess={self.on_excess!r}, "
            f"accept_failures={self.accept_failures})"
        )


class SmallNetwork(MethodStrategy):
    """Baseline "small network": FedAvg on a network that fits the weakest device.

    The small model (e.g. ``femnist_cnn_small``, DenseNet-BC-19 for CIFAR-10) lives
    on the clients and in the initial parameters; server-side this is FedAvg
    weighted by the number of examples, with stragglers discarded and every reply's
    arrays validated (count, shapes, dtypes, finiteness; refusals are logged). The
    rule is :class:`flwr_distreal.server.FedAvgCore`.

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
    update_bound, on_outlier, update_norm, robust, trim_beta : optional
        The round's update bounds and robust aggregation, as in :class:`Distreal`
        (defaults 10, "refuse", "model", None, 0.2); robust rules weight by examples.
    **fedavg_kwargs : Any
        Passed to :class:`flwr.server.strategy.FedAvg`.
    """

    method_name = "small"

    def __repr__(self) -> str:
        return f"{type(self).__name__}(accept_failures={self.accept_failures})"


class FullResources(SmallNetwork):
    """Baseline "full resources": FedAvg on the full model with no resource limits.

    The paper's upper bound. Every fit config carries ``"unlimited": True`` so that
    clients train the full model on every mini-batch and never become stragglers.
    Aggregation is FedAvg weighted by the number of examples (see
    :class:`SmallNetwork` for the arguments).
    """

    method_name = "full"


class SubmodelStrategy(SubmodelView, MethodStrategy):
    """Shared base of the baselines that assign a fixed submodel per client at round start.

    At round start, for every selected client, the server finds the device id and
    its round workload (client properties ``"partition-id"`` and ``"round-samples"``,
    asked once per client proxy with ``get_properties`` and cached), reads the
    device's availability at the round's start time, converts it into a forward-MACs
    budget per sample, and lets the planner choose a submodel (kept filters per
    dropout layer). The client receives the subset in ``"fixed-subsets"`` and trains
    it for the whole round, so a drop in resources mid-round makes it a straggler.
    Aggregation combines the replies, weighted by examples, with the ``aggregation``
    rule (``per_weight``: every weight averaged over the clients whose submodel trained
    it; ``all_clients``: FedAvg over the zero-padded updates), with the masks of
    :func:`flwr_distreal.core.dropout.parameter_masks` for the assigned subsets. The round
    logic is :class:`flwr_distreal.server.SubmodelCore`.

    The budget assumes the availability at round start lasts the whole round:
    ``availability_fn(device, t0) * round_duration / (step_macs_factor * round_samples)``
    forward MACs per sample, with ``t0 = (server_round - 1) * round_duration`` (the
    round timing of :class:`flwr_distreal.core.resources.ResourceModel`).

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
        :func:`flwr_distreal.core.resources.step_macs`. Defaults to 3.0.
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
    aggregation : {"per_weight", "all_clients"}, optional
        The submodel rule (:data:`flwr_distreal.server.aggregate.SUBMODEL_RULES`). Defaults to
        ``"per_weight"``.
    update_bound, on_outlier, update_norm : optional
        The round's update bounds, as in :class:`Distreal` (defaults 10, "refuse",
        "model").
    robust : {"clip-to-median"} | None, optional
        Every update clipped to the round's median normalised norm. Defaults to None.
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
        not a positive finite number, a bound is out of range (``robust`` other than
        "clip-to-median"), or the FedAvg arguments are inconsistent.
    
    Bound to no method: its subclasses are; ``SubmodelStrategy(method=...)`` runs any
    registered method of rule ``submodel``.
    """

    core: SubmodelCore

    def __init__(self, method: str | Method | None = None, **kwargs: Any) -> None:
        super().__init__(method, **kwargs)
        if self.method.rule != "submodel":
            raise TypeError(f"{type(self).__name__} runs submodel methods; {self.method.name!r} is rule {self.method.rule!r}")

    # state of the core, as attributes of the strategy
    @property
    def widths(self) -> list[int]:
        """Filters per dropout layer of the full model."""
        return self.core.widths

    @property
    def availability_fn(self) -> AvailabilityFn:
        """``availability_fn(device_id, t)`` in MACs per second."""
        return self.core.availability_fn

    @property
    def round_duration(self) -> float:
        """Round duration ``T``."""
        return self.core.round_duration

    @property
    def step_macs_factor(self) -> float:
        """Cost of a training step relative to its forward pass."""
        return self.core.step_macs_factor

    @property
    def partition_id_key(self) -> str:
        """Property and fit-metric key with the device id."""
        return self.core.partition_id_key

    def round_start(self, server_round: int) -> float:
        """Simulated time at which round ``server_round`` starts, ``(server_round - 1) * T``."""
        return self.core.round_start(server_round)

    def forward_budget(self, device_id: int, server_round: int, round_samples: int) -> float:
        """Forward MACs per sample a device can afford this round, judged at round start
        (see :meth:`flwr_distreal.server.SubmodelCore.forward_budget`)."""
        return self.core.forward_budget(device_id, server_round, round_samples)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_name={self.model_name!r}, seed={self.seed}, aggregation={self.aggregation!r})"


class FederatedDropout(SubmodelStrategy):
    """Baseline Federated Dropout (Caldas et al. 2018), extended as in the paper.

    At round start the server picks, per selected device, ONE dropout rate for all
    layers from the device's availability at that moment (the most expensive rate
    whose submodel fits the device's budget, see :class:`SubmodelStrategy`), and a
    random subset of ``kept_count(rate, C)`` filters per layer, fixed for the
    whole round and seeded by ``(seed, server_round, device_id)``
    (:class:`flwr_distreal.server.FederatedDropoutPlanner`). Clients get
    ``"dropout-rate"`` and ``"fixed-subsets"``; aggregation by the ``aggregation``
    rule of :class:`SubmodelStrategy`.

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

    method_name = "feddropout"

    @property
    def rate_for_budget(self) -> Callable[[float], float]:
        """Maps a forward-MACs-per-sample budget to a dropout rate."""
        return self.core.planner.rate_for_budget  # type: ignore[attr-defined, no-any-return]


class HeteroFL(SubmodelStrategy):
    """Baseline HeteroFL (Diao, Ding and Tarokh 2021) as in the paper.

    Width level ``p = 1 .. levels`` keeps the FIRST ``ceil(s**(p-1) * C)`` filters of
    every dropout layer with ``C`` filters. At round start each selected device gets
    the widest level whose forward MACs fit its budget (see
    :class:`SubmodelStrategy`), or the narrowest level when none fits
    (:class:`flwr_distreal.server.HeteroFLPlanner`). Clients get
    ``"width-level"``, ``"width"`` and ``"fixed-subsets"``; aggregation by the
    ``aggregation`` rule of :class:`SubmodelStrategy`.

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

    method_name = "heterofl"

    @property
    def _planner(self) -> HeteroFLPlanner:
        return self.core.planner  # type: ignore[return-value]

    @property
    def shrink(self) -> float:
        """Shrinking ratio ``s``."""
        return self._planner.shrink

    @property
    def levels(self) -> int:
        """Number of width levels."""
        return self._planner.levels

    @property
    def level_counts(self) -> list[list[int]]:
        """Filters kept per dropout layer at each level."""
        return self._planner.level_counts

    @property
    def level_macs(self) -> list[int]:
        """Forward MACs per sample at each level."""
        return self._planner.level_macs

    def counts_for_width(self, width: float) -> list[int]:
        """Filters kept per dropout layer at width fraction ``width``: ``ceil(width * C)``."""
        return self._planner.counts_for_width(width)

    def level_for_budget(self, budget: float) -> int:
        """The widest level (smallest ``p``) whose MACs fit ``budget``; the last if none fits."""
        return self._planner.level_for_budget(budget)

    def __repr__(self) -> str:
        return (
            f"HeteroFL(model_name={self.model_name!r}, shrink={self.shrink}, levels={self.levels}, "
            f"aggregation={self.aggregation!r})"
        )
