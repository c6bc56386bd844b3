"""Exact MAC counts of the models, and count_macs == FlopCounterMode under random vectors."""

import numpy as np
import pytest
import torch

from flwr_distreal import build_model, count_macs, kept_count, kept_counts, list_models
from flwr_distreal.core.macs import layer_macs, macs_of_counts

from conftest import flop_macs


@pytest.mark.parametrize(
    "name, layers, macs",
    [
        ("femnist_cnn", 2, 4_015_616),
        ("femnist_cnn_small", 2, 1_196_544),
        ("densenet_bc_19", 15, 19_943_904),
        ("densenet_bc_40", 39, 72_365_352),
        ("densenet_bc_100", 99, 287_960_472),
        ("resnet20", 12, 40_813_184),
        ("resnet20_small", 12, 10_122_358),
        ("resnet18", 12, 555_422_720),
        ("resnet18_small", 12, 138_817_708),
        ("mobilenet_v2", 25, 87_976_448),
        ("mobilenet_v2_small", 25, 21_784_576),
    ],
)
def test_full_model_macs_and_layer_count(name, layers, macs):
    model = build_model(name)
    assert model.num_dropout_layers == layers
    assert len(model.dropout_layer_names) == layers
    assert len(set(model.dropout_layer_names)) == layers
    assert count_macs(model) == macs
    assert count_macs(model, np.zeros(layers)) == macs


@pytest.mark.parametrize(
    "full, small",
    [("femnist_cnn", "femnist_cnn_small"), ("resnet20", "resnet20_small"), ("resnet18", "resnet18_small"),
     ("mobilenet_v2", "mobilenet_v2_small")],
)
def test_small_networks_fit_the_weakest_device(full, small):
    """The "small network" baseline fits the weakest device (a third of the full model's MACs
    at FEMNIST's variability 3, a quarter at CIFAR's variability 4), and is not much smaller."""
    variability = 3 if full.startswith("femnist") else 4
    ratio = count_macs(build_model(small)) / count_macs(build_model(full))
    assert 0.85 / variability < ratio <= 1 / variability


def test_paper_mac_ranges():
    assert round(count_macs(build_model("femnist_cnn")) / 1e6, 2) == 4.02
    assert 72.0e6 < count_macs(build_model("densenet_bc_40")) < 72.8e6
    assert 287e6 < count_macs(build_model("densenet_bc_100")) < 289e6


def test_femnist_hand_count_under_dropout():
    model = build_model("femnist_cnn")
    # rate 0.5 keeps 16 of 32 and 32 of 64 filters: exactly the small network's MACs.
    expected = 24 * 24 * 16 * 25 + 8 * 8 * 32 * 25 * 16 + 32 * 16 * 256 + 256 * 62
    assert count_macs(model, [0.5, 0.5]) == expected == count_macs(build_model("femnist_cnn_small"))
    assert kept_counts(model, [0.3, 0.1]) == [32 - 10, 64 - 6]


def test_kept_count_rule():
    assert kept_count(0.0, 12) == 12
    assert kept_count(0.5, 12) == 6
    assert kept_count(0.3, 12) == 8  # 12 - round(3.6)
    assert kept_count(0.125, 12) == 10  # 1.5 rounds half up
    assert kept_count(0.5, 1) == 1  # never drops the last filter


def _flop_macs(model, vector, batch=2):
    model.train()
    model.set_dropout(vector)
    return flop_macs(model, torch.randn(batch, *model.input_shape))


@pytest.mark.parametrize(
    "name, trials",
    [("femnist_cnn", 6), ("densenet_bc_40", 4), ("densenet_bc_100", 2), ("resnet20", 3), ("resnet18", 1), ("mobilenet_v2", 2)],
)
def test_count_macs_equals_flop_counter(name, trials):
    model = build_model(name)
    rng = np.random.default_rng(7)
    vectors = [np.zeros(model.num_dropout_layers), np.full(model.num_dropout_layers, 0.5)]
    vectors += [rng.uniform(0, 0.5, model.num_dropout_layers) for _ in range(trials)]
    for v in vectors:
        assert _flop_macs(model, v) == count_macs(model, v)


def test_layer_macs_sum_and_refusals():
    model = build_model("densenet_bc_40")
    counts = kept_counts(model, np.full(39, 0.25))
    assert sum(m for _, m in layer_macs(model, counts)) == macs_of_counts(model, counts)
    with pytest.raises(ValueError, match="kept counts"):
        macs_of_counts(model, counts[:-1])
    with pytest.raises(ValueError, match="keeps 0 filters"):
        macs_of_counts(model, [0] + counts[1:])


def test_registry_and_widths():
    assert {
        "femnist_cnn", "femnist_cnn_small", "densenet_bc_19", "densenet_bc_40", "densenet_bc_100",
        "resnet20", "resnet20_small", "resnet18", "resnet18_small", "mobilenet_v2", "mobilenet_v2_small",
    } <= set(list_models())
    with pytest.raises(ValueError, match="registered models"):
        build_model("resnet_999")
    assert build_model("femnist_cnn", num_classes=10).num_classes == 10
    with pytest.raises(ValueError, match="num_classes"):
        build_model("femnist_cnn", num_classes=0)
    # A natively narrow network with the kept counts has exactly the dropout model's MACs.
    model = build_model("densenet_bc_40")
    v = np.random.default_rng(1).uniform(0, 0.5, 39)
    narrow = build_model("densenet_bc_40", widths=kept_counts(model, v))
    assert count_macs(narrow) == count_macs(model, v)
    with pytest.raises(ValueError, match="widths"):
        build_model("densenet_bc_40", widths=[4] * 10)
