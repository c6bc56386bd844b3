"""The submodel baselines' conventions as switches: inverted scaling of fixed subsets, the two
aggregation rules, static BatchNorm, and the strategies' own config schemas that set them.

Tiny models (a 4/6-filter FEMNIST CNN, a depth-10 DenseNet-BC) and hand-computed arrays.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import tiny_cnn
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from flwr_distreal.flower import serverapp
from flwr_distreal.flower.legacy import strategy
from flwr_distreal.server.aggregate import SUBMODEL_RULES, masked_average, weighted_average, zero_padded_average
from flwr_distreal.run.config import (
    ConfigError,
    DistrealStrategyConfig,
    FedDropoutStrategyConfig,
    FullStrategyConfig,
    HeteroFLStrategyConfig,
    SmallStrategyConfig,
)
from flwr_distreal.core.dropout import make_droppable, parameter_masks, recompute_bn_statistics
from flwr_distreal.models.densenet import DenseNetBC
from flwr_distreal.models.femnist_cnn import FemnistCNN
from flwr_distreal.server import HeteroFLPlanner, Reply, RoundBounds, SubmodelCore
from flwr_distreal.training.trainers import get_weights


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _tiny_densenet() -> DenseNetBC:
    torch.manual_seed(0)
    return make_droppable(DenseNetBC(depth=10, num_classes=5), torch.zeros(2, 3, 32, 32), name="densenet_bc_10")


# ----------------------------------------------------------------------- inverted scaling


def _consumer_contribution(model, consumer, subsets, scaling: bool, x) -> torch.Tensor:
    """The consumer's output without its bias (its input contribution) in a training forward
    with the given fixed subsets."""
    captured = {}
    handle = consumer.register_forward_hook(
        lambda mod, inp, out: captured.__setitem__("out", out.tensor if hasattr(out, "tensor") else out)
    )
    with torch.no_grad():
        consumer.bias.zero_()
    model.set_inverted_scaling(scaling)
    model.set_fixed_subsets(subsets)
    model.train()
    with torch.no_grad():
        model(x)
    handle.remove()
    return captured["out"]


@pytest.mark.parametrize(
    ("subsets", "consumer", "factor"),
    [
        ([[0, 3], None], "conv2", 4 / 2),  # conv2 reads 2 of conv1's 4 filters
        ([[1], None], "conv2", 4 / 1),
        ([None, [0, 2, 5]], "fc1", 6 / 3),  # fc1 reads 3 of conv2's 6 filters
        ([None, [1, 2, 3, 4]], "fc1", 6 / 4),  # not a power of two: equal to rounding
    ],
)
def test_fixed_subset_scaling_multiplies_the_consumer_input_by_c_over_k(subsets, consumer, factor) -> None:
    model = tiny_cnn()
    x = torch.randn(5, 1, 28, 28)
    layer = getattr(model, consumer)
    on = _consumer_contribution(model, layer, subsets, True, x)
    off = _consumer_contribution(model, layer, subsets, False, x)
    assert on.abs().sum() > 0
    if factor in (2.0, 4.0):  # a power of two scales every rounding step alike: exact
        assert torch.equal(on, factor * off)
    else:
        np.testing.assert_allclose(on.numpy(), (factor * off).numpy(), rtol=1e-6, atol=1e-7)


def test_inverted_scaling_switch_is_per_model_and_leaves_inference_alone() -> None:
    model = tiny_cnn()
    assert model.inverted_scaling  # on by default (DISTREAL's per-batch dropout)
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    with torch.no_grad():
        before = model(x)
    model.set_inverted_scaling(False)
    assert not model.inverted_scaling
    with torch.no_grad():
        assert torch.equal(model(x), before)  # inference never drops, so never scales
    with pytest.raises(ValueError, match="inverted scaling must be True or False"):
        model.set_inverted_scaling("no")


def test_unscaled_compact_execution_equals_the_masking_reference() -> None:
    """With scaling off, the compact step and the mask reference still compute the same loss
    and gradients (so the switch is applied alike in both executions)."""
    subsets = [[0, 2], [1, 3, 5]]
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 0])
    grads, losses = [], []
    for mode in ("compact", "mask"):
        model = tiny_cnn()
        model.set_execution(mode)
        model.set_inverted_scaling(False)
        model.set_fixed_subsets(subsets)
        model.train()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    np.testing.assert_allclose(float(losses[0]), float(losses[1]), rtol=1e-6)
    for a, b in zip(*grads):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_strategy_configs_set_the_scaling_of_the_models_they_build() -> None:
    model = tiny_cnn()
    FedDropoutStrategyConfig().apply_to(model)
    assert not model.inverted_scaling  # Federated Dropout: a repacked narrower network
    HeteroFLStrategyConfig().apply_to(model)
    assert model.inverted_scaling  # HeteroFL's Scaler
    DistrealStrategyConfig(inverted_scaling=False).apply_to(model)
    assert not model.inverted_scaling
    FullStrategyConfig().apply_to(model)  # no switches: leaves the model as it is
    assert not model.inverted_scaling


# ------------------------------------------------------------------------ aggregation rules

# global model g, two clients with masks: client a (weight 1) trained entries 0, 1;
# client b (weight 3) trained entries 0, 2; nobody trained entry 3
G = [np.array([1.0, 2.0, 3.0, 4.0]), np.array([10, 20], dtype=np.int64)]
A = [np.array([3.0, 4.0, 99.0, 99.0]), np.array([12, 20], dtype=np.int64)]
B = [np.array([5.0, 99.0, 7.0, 99.0]), np.array([14, 20], dtype=np.int64)]
MASK_A = [np.array([True, True, False, False]), None]
MASK_B = [np.array([True, False, True, False]), None]


def test_per_weight_averages_each_entry_over_the_clients_that_hold_it() -> None:
    out = masked_average(G, [A, B], [MASK_A, MASK_B], [1, 3])
    # entry 0: 1 + (1*2 + 3*4)/4 = 4.5; entry 1: a alone, its value 4; entry 2: b alone, 7;
    # entry 3: nobody, the global 4
    np.testing.assert_array_equal(out[0], [4.5, 4.0, 7.0, 4.0])
    np.testing.assert_array_equal(out[1], [14, 20])  # (1*12 + 3*14)/4 = 13.5 -> 14 (half to even)
    assert out[1].dtype == np.int64


def test_all_clients_counts_every_client_for_every_entry() -> None:
    out = zero_padded_average(G, [A, B], [MASK_A, MASK_B], [1, 3])
    # entry 1: 2 + 1*(4-2)/4 = 2.5 (b counts with a zero update); entry 2: 3 + 3*(7-3)/4 = 6
    np.testing.assert_array_equal(out[0], [4.5, 2.5, 6.0, 4.0])
    np.testing.assert_array_equal(out[1], [14, 20])


def test_all_clients_is_fedavg_over_the_models_mapped_back_into_the_global_one() -> None:
    rng = np.random.default_rng(1)
    g = [rng.normal(size=(3, 4)), rng.normal(size=5)]
    clients = [[rng.normal(size=(3, 4)), rng.normal(size=5)] for _ in range(3)]
    masks = [[rng.random((3, 4)) < 0.5, rng.random(5) < 0.5] for _ in range(3)]
    weights = [2.0, 1.0, 5.0]
    mapped = [[np.where(m, c, gj) for c, m, gj in zip(cl, ms, g)] for cl, ms in zip(clients, masks)]
    expected = weighted_average(g, mapped, weights)
    for a, b in zip(zero_padded_average(g, clients, masks, weights), expected):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    # with every entry trained by everyone, the two rules are FedAvg
    full = [[None, None]] * 3
    for rule in SUBMODEL_RULES.values():
        for a, b in zip(rule(g, clients, full, weights), weighted_average(g, clients, weights)):
            np.testing.assert_allclose(a, b, rtol=1e-12)


def test_aggregation_rules_refuse_bad_input_alike() -> None:
    for rule in SUBMODEL_RULES.values():
        with pytest.raises(ValueError, match="mask 0 has dtype"):
            rule(G, [A], [[np.ones(4), None]], [1])
        with pytest.raises(ValueError, match="at least one client"):
            rule(G, [], [], [])
    with pytest.raises(ValueError, match="all weights are zero"):
        zero_padded_average(G, [A], [MASK_A], [0])


def _core(rule: str) -> SubmodelCore:
    """A HeteroFL core on the tiny CNN: level 1 full (4, 6 filters), level 2 half (2, 3)."""
    planner = HeteroFLPlanner(tiny_cnn(), shrink=0.5, levels=2)
    budgets = {0: 1e12, 1: 1.0}  # device 0 affords the full model, device 1 the narrowest level
    return SubmodelCore(
        planner,
        availability_fn=lambda device, t: budgets[device],
        round_duration=1.0,
        bounds=RoundBounds(update_bound=None, claim_bound=None),
        aggregation=rule,
    )


@pytest.mark.parametrize("rule", ["per_weight", "all_clients"])
def test_submodel_core_combines_with_the_configured_rule(rule) -> None:
    core = _core(rule)
    g = get_weights(core.model)
    core.broadcast(1, g)
    configs = core.plan_round(1, {"wide": (0, 10), "narrow": (1, 10)})
    assert configs["wide"]["width-level"] == 1 and configs["narrow"]["width-level"] == 2
    wide = [a + 1.0 if a.dtype.kind == "f" else a for a in g]
    narrow = [a + 2.0 if a.dtype.kind == "f" else a for a in g]
    outcome = core.aggregate(
        1, [Reply("wide", 0, wide, 10, {}), Reply("narrow", 1, narrow, 30, {})]
    )
    new = dict(zip(core.state_keys, outcome.arrays))
    old = dict(zip(core.state_keys, g))
    w = new["conv1.weight"] - old["conv1.weight"]
    # filters 0-1 of conv1: in both submodels, the same under both rules: (10*1 + 30*2)/40
    np.testing.assert_allclose(w[:2], 1.75, rtol=1e-6)
    # filters 2-3: only in the wide submodel
    np.testing.assert_allclose(w[2:], 1.0 if rule == "per_weight" else 10 / 40, rtol=1e-6)
    masks = parameter_masks(core.model, [torch.arange(2), torch.arange(3)])
    assert masks["conv1.weight"][:2].all() and not masks["conv1.weight"][2:].any()


@pytest.mark.parametrize("api", [strategy, serverapp])
@pytest.mark.parametrize("cls", ["FederatedDropout", "HeteroFL"])
def test_both_apis_pass_the_aggregation_rule_to_the_core(api, cls) -> None:
    kwargs = dict(model_name="femnist_cnn", availability_fn=lambda d, t: 1e9, round_duration=1.0)
    made = getattr(api, cls)(aggregation="all_clients", **kwargs)
    assert made.core.aggregation == "all_clients" == made.aggregation
    assert "aggregation='all_clients'" in repr(made)
    assert getattr(api, cls)(**kwargs).aggregation == "per_weight"
    with pytest.raises(ValueError, match=r"aggregation must be one of \['per_weight', 'all_clients'\]"):
        getattr(api, cls)(aggregation="mean", **kwargs)


# ---------------------------------------------------------------------------- static BN


def _bn_state(model) -> list[torch.Tensor]:
    return [t.clone() for m in model.batchnorm_layers for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


@pytest.mark.parametrize("subsets", [None, "level"])
def test_static_bn_leaves_running_statistics_unchanged_by_a_local_step(subsets) -> None:
    model = _tiny_densenet()
    if subsets == "level":  # a HeteroFL level: the first half of every layer's filters
        model.set_fixed_subsets([list(range(max(1, c // 2))) for c in model.layer_widths])
    assert model.set_static_bn(True) == len(model.batchnorm_layers) > 0
    before = _bn_state(model)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    model.train()
    F.cross_entropy(model(x), y).backward()
    with torch.no_grad():  # a plain SGD step (torch.optim's first use costs seconds of imports)
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    assert all(torch.equal(a, b) for a, b in zip(before, _bn_state(model)))
    # the same step without static BN moves them (the control)
    model.set_static_bn(False)
    model(x)
    assert not all(torch.equal(a, b) for a, b in zip(before, _bn_state(model)))


def test_static_bn_normalises_with_the_batch_statistics_in_training() -> None:
    net = make_droppable(
        torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.BatchNorm2d(3), torch.nn.Conv2d(3, 2, 1)),
        torch.zeros(2, 3, 5, 5),
    )
    net.set_static_bn(True)
    bn = net[1]
    bn.train()
    x = torch.randn(4, 3, 5, 5) * 3 + 2
    y = bn(x)
    ref = (x - x.mean(dim=(0, 2, 3), keepdim=True)) / torch.sqrt(x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + bn.eps)
    np.testing.assert_allclose(y.detach().numpy(), ref.numpy(), rtol=1e-5, atol=1e-5)
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(3))


def test_recomputed_statistics_equal_the_cumulative_mean_over_batches() -> None:
    model = _tiny_densenet()
    model.set_static_bn(True)
    momenta = [m.momentum for m in model.batchnorm_layers]
    for m in model.batchnorm_layers:  # garbage that the recomputation must not keep
        m.running_mean.fill_(7.0)
        m.running_var.fill_(9.0)
    batches = [(torch.randn(2, 3, 32, 32) + i, torch.zeros(2, dtype=torch.long)) for i in range(3)]
    seen: dict[int, list[torch.Tensor]] = {}
    hooks = [
        m.register_forward_pre_hook(lambda mod, args, i=i: seen.setdefault(i, []).append(args[0].detach()))
        for i, m in enumerate(model.batchnorm_layers)
    ]
    model.eval()
    assert recompute_bn_statistics(model, batches) == 6
    for h in hooks:
        h.remove()
    for i, m in enumerate(model.batchnorm_layers):
        inputs = seen[i]
        assert len(inputs) == 3
        mean = torch.stack([t.mean(dim=(0, 2, 3)) for t in inputs]).mean(0)
        var = torch.stack([t.var(dim=(0, 2, 3), unbiased=True) for t in inputs]).mean(0)
        np.testing.assert_allclose(m.running_mean.numpy(), mean.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(m.running_var.numpy(), var.numpy(), rtol=1e-4, atol=1e-5)
        assert int(m.num_batches_tracked) == 3
    # restored: momentum, static flag, eval mode
    assert [m.momentum for m in model.batchnorm_layers] == momenta
    assert all(m.static_stats for m in model.batchnorm_layers) and not model.training


def test_recompute_without_batchnorm_or_without_data() -> None:
    cnn = tiny_cnn()
    before = get_weights(cnn)
    assert recompute_bn_statistics(cnn, iter(())) == 0  # nothing to recompute, nothing read
    assert all(np.array_equal(a, b) for a, b in zip(before, get_weights(cnn)))
    with pytest.raises(ValueError, match="yielded no sample"):
        recompute_bn_statistics(_tiny_densenet(), [])


def test_heterofl_config_switches_static_bn_and_logs_once_when_the_model_has_none(caplog) -> None:
    cfg = HeteroFLStrategyConfig()
    dense = _tiny_densenet()
    cfg.apply_to(dense)
    assert all(m.static_stats for m in dense.batchnorm_layers)
    assert cfg.bn_recompute_devices() == 10
    assert HeteroFLStrategyConfig(static_bn=False).bn_recompute_devices() == 0
    # Federated Dropout: static BN by default too (k1l1/SLT keeps no running statistics), and a switch
    fd = FedDropoutStrategyConfig()
    assert fd.static_bn and fd.bn_recompute_devices() == 10
    assert FedDropoutStrategyConfig(static_bn=False).bn_recompute_devices() == 0
    fd_dense = _tiny_densenet()
    fd.apply_to(fd_dense)
    assert all(m.static_stats for m in fd_dense.batchnorm_layers)
    running = _tiny_densenet()
    FedDropoutStrategyConfig(static_bn=False).apply_to(running)
    assert not any(m.static_stats for m in running.batchnorm_layers)
    cnn = tiny_cnn()
    cnn.model_name = "tiny_cnn_for_the_log_test"
    with caplog.at_level(logging.INFO, logger="flwr_distreal.methods.base"):
        cfg.apply_to(cnn)
        cfg.apply_to(_tiny_cnn_named("tiny_cnn_for_the_log_test"))
    notes = [r for r in caplog.records if "has no BatchNorm" in r.getMessage()]
    assert len(notes) == 1 and "tiny_cnn_for_the_log_test" in notes[0].getMessage()


def _tiny_cnn_named(name: str) -> FemnistCNN:
    model = tiny_cnn()
    model.model_name = name
    return model


# ------------------------------------------------------- the run: model switches, sBN evaluation


class _StubData:
    """Five devices of random 32x32 images (one batch each) and a small test set."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.train = {d: [(torch.randn(2, 3, 32, 32, generator=g) + d, torch.zeros(2, dtype=torch.long))] for d in range(5)}
        x, y = torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2,), generator=g)
        self.test = DataLoader(TensorDataset(x, y), batch_size=2)  # a real loader: evaluate reads its dataset
        self.read: list[int] = []

    def train_loader(self, device_id, batch_size, shuffle=True, seed=None, augment=True, drop_last=False):
        self.read.append((device_id, shuffle, augment))
        return self.train[device_id]

    def test_loader(self, batch_size=512):
        return self.test


@pytest.fixture
def tiny_run_model(monkeypatch):
    """The run's model registry answers every name with a depth-10 DenseNet-BC (BatchNorm)."""
    monkeypatch.setattr("flwr_distreal.run.experiment.build_model", lambda name, num_classes: _tiny_densenet())


def _experiment(strategy_cfg):
    """An Experiment on a tiny DenseNet-BC with stub data, without loading a dataset."""
    from flwr_distreal.run.config import DatasetConfig, ModelConfig, ResourcesConfig, RunConfig
    from flwr_distreal.run.experiment import Experiment

    exp = Experiment.__new__(Experiment)
    exp.cfg = RunConfig(
        dataset=DatasetConfig(name="digits"),
        model=ModelConfig(name="densenet_bc_19", small="densenet_bc_19"),
        strategy=strategy_cfg,
        resources=ResourcesConfig(kind="full"),
        seed=3,
        device="cpu",
    )
    exp.model_name, exp.num_classes, exp.num_devices, exp.data = "densenet_bc_10", 5, 5, _StubData()
    return exp


def test_run_models_carry_the_strategy_switches(tiny_run_model) -> None:
    fd = _experiment(FedDropoutStrategyConfig()).build_model()
    assert not fd.inverted_scaling and all(m.static_stats for m in fd.batchnorm_layers)
    fd_running = _experiment(FedDropoutStrategyConfig(static_bn=False)).build_model()
    assert not any(m.static_stats for m in fd_running.batchnorm_layers)
    hetero = _experiment(HeteroFLStrategyConfig()).build_model()
    assert hetero.inverted_scaling and all(m.static_stats for m in hetero.batchnorm_layers)


@pytest.mark.parametrize("schema", [DistrealStrategyConfig, FullStrategyConfig, SmallStrategyConfig])
def test_every_method_can_switch_to_static_bn_and_its_evaluation_recomputes(tiny_run_model, schema) -> None:
    # off by default: running statistics, evaluation reads no training data
    default = _experiment(schema())
    assert not any(m.static_stats for m in default.build_model().batchnorm_layers)
    _, arrays = default.initial_arrays()
    default.evaluate(arrays)
    assert default.data.read == []
    # on: the model's BN keeps its running statistics out of training, the server recomputes them
    exp = _experiment(schema(static_bn=True, bn_devices=3))
    assert all(m.static_stats for m in exp.build_model().batchnorm_layers)
    exp.evaluate(arrays)
    assert len({d for d, _, _ in exp.data.read}) == 3
    with pytest.raises(ConfigError, match="bn_devices must be >= 1"):
        schema(bn_devices=0)


def test_static_bn_evaluation_recomputes_statistics_from_a_seeded_sample_of_devices(tiny_run_model) -> None:
    from flwr_distreal.training.trainers import set_weights

    exp = _experiment(HeteroFLStrategyConfig(bn_devices=2))
    _, arrays = exp.initial_arrays()
    loss, accuracy, n = exp.evaluate(arrays)
    assert n == 2 and np.isfinite(loss)
    devices = [d for d, _, _ in exp.data.read]
    assert len(devices) == 2 and len(set(devices)) == 2
    assert all(not shuffle and not augment for _, shuffle, augment in exp.data.read)
    # the evaluated model's statistics are those of a cumulative pass over those devices' data
    ref = _experiment(HeteroFLStrategyConfig(bn_devices=2)).build_model()
    set_weights(ref, arrays)
    recompute_bn_statistics(ref, [b for d in devices for b in exp.data.train[d]])
    for a, b in zip(exp._eval_model.batchnorm_layers, ref.batchnorm_layers):
        np.testing.assert_allclose(a.running_mean.numpy(), b.running_mean.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.running_var.numpy(), b.running_var.numpy(), rtol=1e-5, atol=1e-6)
    # the same seed samples the same devices
    again = _experiment(HeteroFLStrategyConfig(bn_devices=2))
    assert sum(1 for _ in again.bn_batches()) == 2 and [d for d, _, _ in again.data.read] == devices


def test_federated_dropout_evaluates_with_recomputed_statistics_by_default(tiny_run_model) -> None:
    exp = _experiment(FedDropoutStrategyConfig(bn_devices=2))
    _, arrays = exp.initial_arrays()
    exp.evaluate(arrays)
    assert len({d for d, _, _ in exp.data.read}) == 2


@pytest.mark.parametrize("schema", [HeteroFLStrategyConfig, FedDropoutStrategyConfig])
def test_evaluation_without_static_bn_reads_no_training_data(tiny_run_model, schema) -> None:
    exp = _experiment(schema(static_bn=False))
    _, arrays = exp.initial_arrays()
    exp.evaluate(arrays)
    assert exp.data.read == []
    sent = dict(zip(exp._eval_model.state_dict(), arrays))
    for key, value in exp._eval_model.state_dict().items():
        if key.endswith(("running_mean", "running_var")):  # the global model's own statistics
            np.testing.assert_array_equal(value.numpy(), sent[key])
