"""Flower strategies (Message API): DISTREAL (Algorithm 2) and the paper's baselines.

Twins of the legacy strategies of :mod:`flwr_distreal.flower.legacy.strategy` for Flower's Message API
(``ServerApp`` + ``Grid`` + ``strategy.start``). Each is a subclass of
:class:`flwr.serverapp.strategy.FedAvg` that overrides the hooks it needs and delegates every
decision to the Flower-free core (:mod:`flwr_distreal.server`), the same core the legacy
strategies run: given the same replies, in any order, both APIs produce bit-identical global
models.

What these strategies add to Flower's FedAvg
--------------------------------------------
Seeded sampling
    Flower samples with the unseeded global :mod:`random` over random node ids. Here each
    node is asked once for its properties (a ``MessageType.QUERY`` message; the reply holds a
    ``MetricRecord`` under ``"properties"`` with ``partition-id`` and ``round-samples``,
    cached per node id) and the round's nodes are drawn with
    :func:`flwr_distreal.server.seeded_draw` and ``random.Random(seed)``: the same
    devices as the legacy :class:`~flwr_distreal.flower.legacy.client_manager.SeededClientManager` draws for
    the same seed. A node that does not answer is logged and not sampled that round.
A plain Flower ClientApp (no query handler)
    Nodes that answer without a device id (no ``@app.query()``, no ``"properties"`` record,
    no integer ``partition-id``) are still sampled, as Flower's FedAvg samples them: by node
    id, sorted, after the nodes that report one, drawn with the same seeded generator. This is
    warned once, with what the client could add; the causes are logged as one line per cause
    and round, naming the nodes. The first query goes to one node alone: if its ClientApp has
    no query handler, no other node is asked (one error reply per run, not one per node). The
    submodel baselines need every device id and stop with a
    :class:`~flwr_distreal.core.contract.ContractError` when no node reports one.
Per-node train config
    Every train message holds the global ``ArrayRecord`` under ``"arrays"`` and its own
    ``ConfigRecord`` under ``"config"``: ``server-round``, plus ``unlimited``
    (:class:`FullResources`) or the node's submodel (``device-id``, ``fixed-subsets``,
    ``submodel-macs``, ``dropout-rate`` or ``width-level``/``width``) for the submodel
    baselines.
Bounded waits for nodes
    Flower waits for ``min_available_nodes`` without end, every round. Here
    ``min_available_nodes`` is the number of nodes **to start**: the run's first round waits
    for them at most ``node_wait`` seconds (default :data:`DEFAULT_NODE_WAIT`) and the run ends
    with a :class:`NodeWaitError` naming the setting if they do not come. A later round that
    finds fewer nodes (a SuperNode was lost) waits at most ``node_wait`` seconds, then goes on
    with the nodes connected if at least ``min_train_nodes`` (``min_evaluate_nodes``; at least
    1), else ends the run the same way; after such a round only a further loss makes a round
    wait again.
One gate, no exceptions for one bad client
    Error replies and replies that never came count as ``failures``, once per node and round
    with one reason (an error reply stands for the node its message went to: a lost node's
    "Node Unavailable" error from the SuperLink and its missing reply are one failure);
    stragglers are dropped;
    every other reply is validated (``ArrayRecord`` names, shapes, dtypes, finiteness; for
    DISTREAL its MACs, also against the batches the server configured for the node's
    ``round-samples``) and a bad one is refused, with its reason logged, instead of Flower's
    ``InconsistentMessageReplies`` stopping the round. The survivors are screened against each
    other (:class:`flwr_distreal.server.RoundBounds`): an update norm or a MACs claim far
    above the round's median is refused or clipped. ``aggregate_train`` returns the new
    ``ArrayRecord`` (keyed by ``state_dict`` names, in order; the broadcast one unchanged when
    nothing could be combined) and a ``MetricRecord`` with ``received``, ``failures``,
    ``stragglers``, ``refused``, ``clipped``, ``accepted``, ``mean_macs`` and
    ``mean_utilisation``. A round in which every reply is refused for the same contract
    reason (:data:`CONTRACT_REASONS`: e.g. every reply lacks ``macs``, or has another model's
    arrays) raises :class:`~flwr_distreal.core.contract.ContractError`, naming the reason and what
    the clients must report, so the ServerApp fails instead of training nothing.

Federated evaluation follows Flower's ``FedAvg`` (``fraction_evaluate=1.0`` by default), so a
strategy swapped into a working app keeps the app's evaluation; the project's own runner passes
``fraction_evaluate=0.0`` and evaluates the global model on the server
(``strategy.start(..., evaluate_fn=...)``).

Example
-------
.. code:: python

    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp

    from flwr_distreal.serverapp import Distreal

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = Distreal(full_macs_per_sample=4_015_616, fraction_train=0.1, seed=0)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=100)
"""

from __future__ import annotations

import inspect
import logging
import time  # noqa: F401 - re-exported: tests patch serverapp.time (the node waits in .nodes use it)
from collections.abc import Callable
from logging import INFO
from typing import Any

from flwr.common.logger import log as flwr_log

from ..core import contract as C
from ..core import defaults as D
from ..core.contract import ContractError, is_number
from ..methods import Method, build_core, core_arguments, get_method
from ..methods.binding import DistrealView, SubmodelView, bind_constructor, bound_method
from ..server import (
    DistrealCore,
    HeteroFLPlanner,
    RefusalReason,
    SubmodelCore,
)

# The adapter base and its node half live in .fedavg_base and .nodes; their names stay importable
# from here (this module is the public path ``flwr_distreal.serverapp``).
from .fedavg_base import CONTRACT_REASONS, _check_minimums, _CoreFedAvg
from .nodes import DEFAULT_NODE_WAIT, NodeWaitError

__all__ = [
    "CONTRACT_REASONS",
    "DEFAULT_NODE_WAIT",
    "ContractError",
    "Distreal",
    "FederatedDropout",
    "FullResources",
    "HeteroFL",
    "MethodStrategy",
    "NodeWaitError",
    "SmallNetwork",
    "SubmodelStrategy",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- DISTREAL


class MethodStrategy(_CoreFedAvg):
    """The Message-API strategy of any registered method (:mod:`flwr_distreal.methods`).

    The method's record picks the server rule (:func:`flwr_distreal.methods.build_core`: Algorithm
    2's MACs weights, FedAvg's example weights, or round-start submodels with the method's
    planner and per-weight averaging) and what each node's train config carries; this class is
    the one Flower adapter for all of them. ``MethodStrategy("heterofl", shrink=0.5, ...)`` runs
    any registered method; the public classes below (:class:`Distreal`, :class:`FullResources`,
    :class:`SmallNetwork`, :class:`FederatedDropout`, :class:`HeteroFL`) are this class bound to
    one method, with that method's arguments in their signatures.

    Parameters
    ----------
    method : str | Method
        A registered method's name (or record). Bound classes take none.
    seed : int, optional
        Seed of the node sampling (and of a planner's random choices). Defaults to 0.
    properties_timeout : float | None, optional
        Timeout in seconds of the properties query. Defaults to None (wait for every node).
    round_samples_key : str, optional
        Node property with the samples of one round of local training. Defaults to
        ``"round-samples"``.
    round_samples_fn : Callable[[int], int] | None, optional
        Rule ``submodel`` only: ``round_samples_fn(device_id)`` instead of the node's
        ``round-samples`` property.
    weighted_by_key : str, optional
        Rule ``macs``: the train metric with the MACs ``c_i`` (default ``"macs"``); other rules:
        FedAvg's weight key (default ``"num-examples"``).
    **kwargs : Any
        The method's arguments (:func:`flwr_distreal.methods.core_arguments`: bounds, keys, and
        the rule's and planner's own), then ``node_wait`` (seconds a round waits for enough
        nodes, see :class:`_CoreFedAvg`; default 60) and :class:`flwr.serverapp.strategy.FedAvg`'s.
    """

    #: The method a public subclass is bound to (None: the ``method`` argument names it).
    method_name: str | None = None

    def __init__(
        self,
        method: str | Method | None = None,
        *,
        seed: int = D.SEED,
        properties_timeout: float | None = None,
        round_samples_key: str = C.ROUND_SAMPLES,
        round_samples_fn: Callable[[int], int] | None = None,
        weighted_by_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.method = bound_method(type(self), method)
        rule = self.method.rule
        if round_samples_fn is not None and rule != "submodel":
            raise TypeError(f"round_samples_fn is an argument of the submodel methods, not of {self.method.name!r}")
        known = core_arguments(self.method)
        core_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in known}
        if rule == "macs":
            if weighted_by_key is not None and "macs_key" in core_kwargs:
                raise TypeError("pass weighted_by_key or macs_key (the same key), not both")
            weighted_by_key = core_kwargs.setdefault("macs_key", C.MACS if weighted_by_key is None else weighted_by_key)
        if rule == "submodel":
            core_kwargs["seed"] = seed
            _check_minimums(kwargs)
        if weighted_by_key is not None:
            kwargs["weighted_by_key"] = weighted_by_key
        super().__init__(
            build_core(self.method, **core_kwargs),
            seed=seed,
            properties_timeout=properties_timeout,
            round_samples_key=round_samples_key,
            **kwargs,
        )
        self.round_samples_fn = round_samples_fn
        self.samples_unidentified = rule != "submodel"  # a submodel is planned for a known device

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("method_name"):
            _bind_signature(cls)

    # -- what the rule needs from the nodes ----------------------------------------------
    def _required_properties(self) -> list[str]:
        keys = [self.partition_id_key]
        if self.method.rule == "submodel" and self.round_samples_fn is None:
            keys.append(self.round_samples_key)
        return keys

    def _known_devices(self, nodes: list[int]) -> dict[str, tuple[object, object]]:
        """(device id, round samples) of every node, as learnt from its properties."""
        devices: dict[str, tuple[object, object]] = {}
        for node in nodes:
            props = self._properties.get(node, {})
            device_id = props.get(self.partition_id_key)
            if self.round_samples_fn is not None and is_number(device_id):
                samples: object = self.round_samples_fn(int(device_id))  # type: ignore[arg-type]
            else:
                samples = props.get(self.round_samples_key)
            devices[str(node)] = (device_id, samples)
        return devices

    def _node_configs(self, server_round: int, nodes: list[int]) -> dict[int, dict[str, Any]]:
        """Each node's train config: ``macs``: its ``num_batches`` limit from its
        ``round-samples`` property (when the batch size or ``max_batches_fn`` is known) and the
        batch size and local epochs it is bounded by; ``examples``: nothing, or ``unlimited``
        for a method without resource limits; ``submodel``: the submodel the planner chose for
        its device (a node left out is not trained)."""
        rule = self.method.rule
        if rule == "macs":
            if self.core.bounds_batches:
                self.core.limit_round(server_round, self._known_devices(nodes), logger=log)
            return {node: self.core.train_config() for node in nodes}
        if rule == "submodel":
            if self._keys != self.core.state_keys:
                raise ValueError(
                    f"the global ArrayRecord's names are not the state_dict names of {self.core.model.model_name!r}"
                )
            configs = self.core.plan_round(server_round, self._known_devices(nodes), logger=log)
            return {node: configs[str(node)] for node in nodes if str(node) in configs}
        if self.method.unlimited:
            return {node: {C.UNLIMITED: True} for node in nodes}
        return super()._node_configs(server_round, nodes)

    def _examples_key(self) -> str:
        if self.method.rule == "macs":
            return C.NUM_EXAMPLES  # informative only: Algorithm 2 weights by MACs
        return super()._examples_key()

    def _unidentified_costs(self) -> str:
        if self.method.rule == "macs" and self.core.bounds_batches and self.core.max_batches_fn is None:
            return f", and without {self.round_samples_key!r} their num_batches is bounded only by their own num-examples"
        return ""

    def _contract_hint(self, reason: str) -> str:
        if self.method.rule != "macs":
            return super()._contract_hint(reason)
        core = self.core
        if reason in (
            RefusalReason.MISSING_MACS.value,
            RefusalReason.NON_NUMERIC_MACS.value,
            RefusalReason.MISSING_NUM_BATCHES.value,
            RefusalReason.INVALID_NUM_BATCHES.value,
        ):
            required = {
                self.weighted_by_key: C.DISTREAL_TRAIN_METRICS[C.MACS],
                core.num_batches_key: C.DISTREAL_TRAIN_METRICS[C.NUM_BATCHES],
            }
            optional = {
                C.NUM_EXAMPLES: C.OPTIONAL_TRAIN_METRICS[C.NUM_EXAMPLES],
                self.partition_id_key: C.OPTIONAL_TRAIN_METRICS[C.PARTITION_ID],
                self.straggler_key: C.OPTIONAL_TRAIN_METRICS[C.STRAGGLER],
                self.available_macs_key: C.OPTIONAL_TRAIN_METRICS[C.AVAILABLE_MACS],
            }
            return (
                "Distreal weights each update by the MACs its client spent (Algorithm 2), so every train "
                f"reply's MetricRecord {C.METRICS_RECORD!r} must hold {C.describe_keys(required)}; it may add "
                f"{C.describe_keys(optional)}. A ClientApp written for Flower's FedAvg reports only "
                f"{C.NUM_EXAMPLES!r}; flwr_distreal.clientapp.build_client_app reports them all."
            )
        if reason == RefusalReason.EXCESS_MACS.value:
            return (
                f"Every reply claims more MACs than {core.num_batches_key!r} x full_macs_per_sample "
                f"({core.full_macs_per_sample:g}). {self.weighted_by_key!r} adds, per mini-batch, the forward "
                "MACs per sample of the (sub)model trained, at most count_macs(model) (not times the batch "
                "size, nor the backward pass), and full_macs_per_sample must be the full model's "
                "count_macs(model)."
            )
        if reason == RefusalReason.EXCESS_BATCHES.value:
            return (
                f"Every reply reports more mini-batches than batch_size={core.batch_size} and "
                f"local_epochs={core.local_epochs} allow for its node's {self.round_samples_key!r} (or "
                "max_batches_fn): pass the clients' batch size and local epochs to the strategy."
            )
        return super()._contract_hint(reason)

    def summary(self) -> None:
        """Log the method's settings, then the base summary."""
        core, rule = self.core, self.method.rule
        flwr_log(INFO, "\t├──> Method: %s (%s)", self.method.label, self.method.name)
        if rule == "macs":
            flwr_log(INFO, "\t│\t├── MACs key: %r", self.weighted_by_key)
            flwr_log(INFO, "\t│\t├── Full model's MACs per sample: %g", core.full_macs_per_sample)
            flwr_log(
                INFO,
                "\t│\t├── Batches bounded by: %s",
                "max_batches_fn" if core.max_batches_fn is not None
                else f"batch size {core.batch_size}, {core.local_epochs} local epochs, round-samples"
                if core.batch_size is not None else "the client's num_batches only",
            )
            flwr_log(INFO, "\t│\t└── On excess MACs: %s", core.on_excess)
        elif rule == "submodel":
            flwr_log(INFO, "\t│\t├── Model: %s (%s dropout layers)", core.model.model_name, len(core.widths))
            flwr_log(
                INFO, "\t│\t├── Round duration: %g s, step MACs factor %g", core.round_duration, core.step_macs_factor
            )
            flwr_log(INFO, "\t│\t└── Aggregation: %s", core.aggregation)
        super().summary()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(method={self.method.name!r}, seed={self.seed})"


#: The adapter's own arguments (before the method's) in a bound class's signature.
_COMMON_PARAMETERS = [
    inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=D.SEED),
    inspect.Parameter("properties_timeout", inspect.Parameter.KEYWORD_ONLY, default=None),
    inspect.Parameter("round_samples_key", inspect.Parameter.KEYWORD_ONLY, default=C.ROUND_SAMPLES),
]


def _bind_signature(cls: type) -> None:
    """Give a class bound to a method a constructor whose signature lists that method's
    arguments and defaults (it calls :meth:`MethodStrategy.__init__`)."""
    method = get_method(cls.method_name)
    leading = list(_COMMON_PARAMETERS)
    drop: tuple[str, ...] = ()
    if method.rule == "macs":
        leading.append(inspect.Parameter("weighted_by_key", inspect.Parameter.KEYWORD_ONLY, default=C.MACS))
        drop = ("macs_key",)
    if method.rule == "submodel":
        leading.append(inspect.Parameter("round_samples_fn", inspect.Parameter.KEYWORD_ONLY, default=None))

    bind_constructor(cls, MethodStrategy.__init__, leading, drop)


# ------------------------------------------------------------- the paper's methods, by name
class Distreal(DistrealView, MethodStrategy):
    """DISTREAL server (Message API): average updates weighted by the MACs each client spent.

    Algorithm 2 of Rapp et al. (AAAI 2022),
    ``theta_t = theta_{t-1} + sum_i c_i (theta_i - theta_{t-1}) / sum_i c_i``, with ``c_i`` the
    MACs in the reply's ``weighted_by_key`` metric (:class:`flwr_distreal.server.DistrealCore`).
    Stragglers are dropped; a reply is refused, with a logged reason, when its MACs are
    missing, not a number, NaN/inf, negative or above ``num_batches * full_macs_per_sample``,
    its ``num_batches`` above what the server configured for the node (``batch_size``,
    ``local_epochs`` and the node's ``round-samples`` property, or ``max_batches_fn``), or its
    arrays do not match the global model. The round's bounds
    (:class:`flwr_distreal.server.RoundBounds`) then refuse or clip an update whose norm
    per ``sqrt(num_batches)`` is more than ``update_bound`` times the round's median, and clip
    or refuse a MACs claim above ``claim_bound`` times the round's median claim. With equal
    ``c_i`` this is FedAvg. A round in which every reply is refused for the same contract
    reason (e.g. no ``macs`` metric: a ClientApp written for Flower's FedAvg) ends the run with
    a :class:`~flwr_distreal.core.contract.ContractError` that names what the clients must report.

    Parameters
    ----------
    full_macs_per_sample : float
        The full model's forward MACs per sample, ``count_macs(model)``. Algorithm 1 adds, once
        per mini-batch, the forward MACs per sample of the (sub)model it trained, so this is the
        most one mini-batch adds to a reply's ``macs`` (bound: ``num_batches`` times it).
    on_excess : {"refuse", "clip"}, optional
        What to do with MACs above the maximum, or ``num_batches`` above the server's limit.
        Defaults to "refuse".
    batch_size : int | None, optional
        The clients' mini-batch size; with ``local_epochs`` and each node's ``round-samples``
        property it bounds ``num_batches``. Defaults to None (no such bound).
    local_epochs : int, optional
        The clients' local epochs per round. Defaults to 1.
    max_batches_fn : Callable[[int], int] | None, optional
        ``max_batches_fn(device_id)``: the most mini-batches a device trains per round;
        overrides ``batch_size``. Defaults to None.
    update_bound : float | None, optional
        ``k`` (> 1): an update norm (per ``sqrt(batches)``) above ``k`` times the round's median
        is an outlier; None disables it. Defaults to 10.
    on_outlier : {"refuse", "clip"}, optional
        Refuse an outlier update, or scale it down to the bound. Defaults to "refuse".
    update_norm : {"model", "layer"}, optional
        Compare whole-model norms or per-array norms. Defaults to "model".
    claim_bound : float | None, optional
        ``m`` (> 1): a MACs claim above ``m`` times the round's median is an outlier; None
        disables it. Defaults to 10.
    on_claim_outlier : {"refuse", "clip"}, optional
        Clip an outlier claim to ``m`` times the median, or refuse the reply. Defaults to "clip".
    share_bound : float | None, optional
        ``k`` (>= 1): no reply weighs more than ``k`` times the mean of the round's other
        accepted replies, i.e. holds at most ``k / (n + k - 1)`` of the round's weight, whatever
        it claims (:func:`flwr_distreal.server.cap_shares`); None disables it. Defaults to
        :data:`~flwr_distreal.server.SHARE_BOUND` (4).
    robust : {"clip-to-median", "median", "trimmed-mean"} | None, optional
        Robust aggregation for adversarial settings. Defaults to None (Algorithm 2).
    trim_beta : float, optional
        Fraction trimmed at each end with ``robust="trimmed-mean"``. Defaults to 0.2.
    seed : int, optional
        Seed of the node sampling. Defaults to 0.
    weighted_by_key : str, optional
        Train metric with the MACs ``c_i`` spent. Defaults to ``"macs"``.
    num_batches_key : str, optional
        Train metric with the mini-batches trained. Defaults to ``"num_batches"``.
    straggler_key : str, optional
        Train metric that is true for a straggler. Defaults to ``"straggler"``.
    available_macs_key : str, optional
        Train metric with the MACs the device could have spent. Defaults to ``"available_macs"``.
    partition_id_key : str, optional
        Property and train metric with the device id. Defaults to ``"partition-id"``.
    properties_timeout : float | None, optional
        Timeout in seconds of the properties query. Defaults to None (wait for every node).
    node_wait : float, optional
        Seconds a round waits for enough nodes (``min_available_nodes`` to start the run; then
        the nodes the run has) before it goes on with the nodes connected, or ends the run with
        :class:`NodeWaitError` (see "Bounded waits for nodes" above). Defaults to 60.
    full_macs_per_batch : float, optional
        Deprecated name of ``full_macs_per_sample`` (a ``DeprecationWarning``; same value).
    **fedavg_kwargs : Any
        Passed to :class:`flwr.serverapp.strategy.FedAvg` (``fraction_train``,
        ``min_train_nodes``, ``min_available_nodes``, ``fraction_evaluate`` (default 1, as FedAvg's), ...).

    Raises
    ------
    ValueError
        If ``full_macs_per_sample`` is not a positive finite number, ``on_excess`` is not
        "refuse" or "clip", a bound is out of range, a key is empty, or the node minimums are
        inconsistent.
    TypeError
        If both or neither of ``full_macs_per_sample`` and ``full_macs_per_batch`` are given.
    """

    method_name = "distreal"
    core: DistrealCore

    def __repr__(self) -> str:
        return (
            f"Distreal(full_macs_per_sample={self.full_macs_per_sample:g}, on_excess={self.on_excess!r}, "
            f"seed={self.seed})"
        )


class SmallNetwork(MethodStrategy):
    """Baseline "small network" (Message API): FedAvg on a network that fits the weakest device.

    FedAvg weighted by ``weighted_by_key`` (default ``"num-examples"``) with stragglers dropped
    and every reply's arrays validated (:class:`flwr_distreal.server.FedAvgCore`); the
    round's update bounds apply as in :class:`Distreal` (there are no MACs claims to bound).

    Parameters
    ----------
    seed : int, optional
        Seed of the node sampling. Defaults to 0.
    update_bound, on_outlier, update_norm, robust, trim_beta : optional
        The round's update bounds and robust aggregation, as in :class:`Distreal` (defaults
        10, "refuse", "model", None, 0.2); robust rules weight by examples.
    straggler_key, macs_key, available_macs_key, partition_id_key : str, optional
        Train metric keys (MACs only for ``mean_macs``). Defaults from :mod:`flwr_distreal.core.contract`.
    properties_timeout : float | None, optional
        Timeout in seconds of the properties query. Defaults to None.
    node_wait : float, optional
        Seconds a round waits for enough nodes, as in :class:`Distreal`. Defaults to 60.
    **fedavg_kwargs : Any
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.
    """

    method_name = "small"


class FullResources(SmallNetwork):
    """Baseline "full resources" (Message API): FedAvg on the full model, no resource limits.

    Every train config carries ``"unlimited": True``. Arguments as :class:`SmallNetwork`.
    """

    method_name = "full"


class SubmodelStrategy(SubmodelView, MethodStrategy):
    """Shared base of the Message-API baselines that assign a fixed submodel per node.

    At round start every drawn node's device gets a forward budget from its availability at
    the round's start time, and the planner chooses its submodel
    (:class:`flwr_distreal.server.SubmodelCore`); the node's own train config carries it.
    Replies are combined with the ``aggregation`` rule (``per_weight``: every weight averaged
    over the clients that trained it; ``all_clients``: FedAvg over the zero-padded updates),
    weighted by ``weighted_by_key`` (default ``"num-examples"``).

    Parameters
    ----------
    model_name : str
        Registry name of the full model the clients train.
    availability_fn : Callable[[int, float], float]
        ``availability_fn(device_id, t)``: MACs per second at simulated time ``t``.
    round_duration : float
        Round duration ``T`` in seconds of simulated time.
    num_classes : int | None, optional
        Classifier outputs; None keeps the model's default.
    model_kwargs : Mapping[str, Any] | None, optional
        Extra builder arguments for the model.
    step_macs_factor : float, optional
        Cost of a training step relative to its forward pass. Defaults to 3.0.
    round_samples_fn : Callable[[int], int] | None, optional
        ``round_samples_fn(device_id)``; None (default) uses the node's ``round-samples``
        property.
    seed : int, optional
        Seed of the node sampling and the random submodel choices. Defaults to 0.
    aggregation : {"per_weight", "all_clients"}, optional
        The submodel rule (:data:`flwr_distreal.server.aggregate.SUBMODEL_RULES`). Defaults to
        ``"per_weight"``.
    update_bound, on_outlier, update_norm : optional
        The round's update bounds, as in :class:`Distreal` (defaults 10, "refuse", "model").
    robust : {"clip-to-median"} | None, optional
        Every update clipped to the round's median normalised norm. Defaults to None.
    properties_timeout : float | None, optional
        Timeout in seconds of the properties query. Defaults to None.
    node_wait : float, optional
        Seconds a round waits for enough nodes, as in :class:`Distreal`. Defaults to 60.
    partition_id_key, round_samples_key : str, optional
        Property keys. Defaults ``"partition-id"``, ``"round-samples"``.
    straggler_key, macs_key, available_macs_key : str, optional
        Train metric keys.
    **fedavg_kwargs : Any
        Passed to :class:`flwr.serverapp.strategy.FedAvg`.

    Raises
    ------
    ValueError
        If the model name is unknown, ``round_duration`` or ``step_macs_factor`` is not a
        positive finite number, a bound is out of range (``robust`` other than
        "clip-to-median"), or the node minimums are inconsistent.
    
    Bound to no method: its subclasses are; ``SubmodelStrategy(method=...)`` runs any
    registered method of rule ``submodel``.
    """

    core: SubmodelCore

    def __init__(self, method: str | Method | None = None, **kwargs: Any) -> None:
        super().__init__(method, **kwargs)
        if self.method.rule != "submodel":
            raise TypeError(f"{type(self).__name__} runs submodel methods; {self.method.name!r} is rule {self.method.rule!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_name={self.model_name!r}, seed={self.seed}, aggregation={self.aggregation!r})"


class FederatedDropout(SubmodelStrategy):
    """Baseline Federated Dropout (Message API; Caldas et al. 2018, extended as in the paper).

    One dropout rate for all layers per node, from its device's availability at round start,
    and a random filter subset fixed for the round, seeded by ``(seed, server_round,
    device_id)`` (:class:`flwr_distreal.server.FederatedDropoutPlanner`). Nodes get
    ``"dropout-rate"`` and ``"fixed-subsets"``.

    Parameters
    ----------
    rate_for_budget : Callable[[float], float] | None, optional
        Budget to rate; None (default) uses a uniform LUT over ``rates``.
    rates : Sequence[float] | None, optional
        Candidate rates. Defaults to 0, 0.01, ..., 0.5.
    **kwargs : Any
        The arguments of :class:`SubmodelStrategy` and of FedAvg.
    """

    method_name = "feddropout"


class HeteroFL(SubmodelStrategy):
    """Baseline HeteroFL (Message API; Diao, Ding and Tarokh 2021).

    Width level ``p`` keeps the first ``ceil(s**(p-1) * C)`` filters of every dropout layer;
    each node's device gets the widest level whose MACs fit its budget at round start
    (:class:`flwr_distreal.server.HeteroFLPlanner`). Nodes get ``"width-level"``,
    ``"width"`` and ``"fixed-subsets"``.

    Parameters
    ----------
    shrink : float, optional
        Shrinking ratio ``s`` in (0, 1). Defaults to 0.7.
    levels : int, optional
        Number of width levels (>= 1). Defaults to 5.
    **kwargs : Any
        The arguments of :class:`SubmodelStrategy` and of FedAvg.
    """

    method_name = "heterofl"

    @property
    def planner(self) -> HeteroFLPlanner:
        """The width levels (``level_counts``, ``level_macs``, ``level_for_budget``)."""
        return self.core.planner  # type: ignore[return-value]

    def __repr__(self) -> str:
        return (
            f"HeteroFL(model_name={self.model_name!r}, shrink={self.planner.shrink}, "
            f"levels={self.planner.levels}, aggregation={self.aggregation!r})"
        )
