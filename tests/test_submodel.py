"""Physically narrow submodels (flwr_distreal.core.submodel): class, shapes, and equality with the
compact training forward under the same fixed subsets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flwr_distreal.core.dropout import DroppableModel, make_droppable
from flwr_distreal.core.macs import count_macs, kept_counts, macs_of_counts
from flwr_distreal.models import build_model
from flwr_distreal.models.densenet import DenseNetBC
from flwr_distreal.models.femnist_cnn import FemnistCNN
from flwr_distreal.models.resnet import CifarResNet
from flwr_distreal.core.submodel import extract_submodel, plain_class, resolve_kept


class _DepthwiseNet(nn.Module):
    """Stem, an inverted residual (expand, depthwise, project) with a residual sum, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=True)
        self.bn2 = nn.BatchNorm2d(24)
        self.project = nn.Conv2d(24, 8, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn0(self.stem(x)))
        y = F.relu6(self.bn1(self.expand(h)))
        y = F.relu6(self.bn2(self.dw(y)))
        h = h + self.bn3(self.project(y))
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


def _seq_cnn() -> nn.Sequential:
    """A user's nn.Sequential CNN whose flatten feeds a linear layer (stride 16 per channel)."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 10, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(10 * 4 * 4, 7),
    )


def _random_kept(model: DroppableModel, gen: torch.Generator) -> list[torch.Tensor]:
    """About half of each group's filters, at random (never all, never none)."""
    out = []
    for g in model.dropout_groups:
        k = max(1, g.out_channels // 2)
        out.append(torch.randperm(g.out_channels, generator=gen)[:k])
    return out


def _compare(model: DroppableModel, kept, fold: bool, batch: int = 4, both: bool = True) -> None:
    narrow = extract_submodel(model, kept, fold_scaling=fold)
    model.set_fixed_subsets(resolve_kept(model, kept))
    model.set_inverted_scaling(fold)
    model.train()
    narrow.train()
    x = torch.randn(batch, *model.input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(x)
        got = narrow(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if not both:
        return
    # Scaling matters: the folded and the unfolded submodel differ.
    other = extract_submodel(model, kept, fold_scaling=not fold)
    other.train()
    with torch.no_grad():
        assert not torch.allclose(other(x), want, atol=1e-4)


@pytest.mark.parametrize(
    ("factory", "cls"),
    [
        (lambda: build_model("femnist_cnn_small"), FemnistCNN),
        (lambda: build_model("resnet20_small"), CifarResNet),
        (lambda: build_model("densenet_bc_19"), DenseNetBC),
        (lambda: make_droppable(_DepthwiseNet(), torch.zeros(2, 3, 8, 8)), _DepthwiseNet),
        (lambda: make_droppable(_seq_cnn(), torch.zeros(2, 1, 16, 16)), nn.Sequential),
    ],
    ids=["femnist_cnn", "resnet20_residual", "densenet_concat", "depthwise", "sequential_flatten"],
)
def test_submodel_equals_compact_forward_with_fixed_subsets(factory, cls):
    torch.manual_seed(0)
    model = factory()
    kept = _random_kept(model, torch.Generator().manual_seed(3))
    _compare(model, kept, fold=True)  # also checks that the unfolded copy differs
    _compare(model, kept, fold=False, both=False)
    narrow = extract_submodel(model, kept)
    assert type(narrow) is cls
    assert not isinstance(narrow, DroppableModel)
    for m in narrow.modules():
        assert type(m).__module__ != "flwr_distreal.core.dropout"
        assert not any(k.startswith("_dr_") for k in vars(m))


def test_torchvision_resnet18_counts_first_channels_and_its_own_class():
    torchvision = pytest.importorskip("torchvision")
    model = make_droppable(torchvision.models.resnet18(num_classes=10), torch.zeros(2, 3, 32, 32))
    counts = kept_counts(model, [0.5] * model.num_dropout_layers)
    narrow = extract_submodel(model, counts)
    assert type(narrow) is torchvision.models.ResNet
    assert narrow.conv1.out_channels == counts[0] == narrow.bn1.num_features
    assert narrow.fc.in_features == narrow.layer4[-1].conv2.out_channels
    # First channels (HeteroFL): the narrow stem is the full stem's first filters.
    torch.testing.assert_close(narrow.conv1.weight, model.conv1.weight[: counts[0]])
    _compare(model, counts, fold=False, batch=2, both=False)


def test_shapes_bn_statistics_and_gradients_follow_the_kept_filters():
    model = build_model("femnist_cnn_small", channels_last=False)
    kept = [torch.tensor([0, 3, 5, 9]), torch.tensor([1, 2, 30])]
    narrow = extract_submodel(model, kept)
    assert tuple(narrow.conv1.weight.shape) == (4, 1, 5, 5)
    assert tuple(narrow.conv2.weight.shape) == (3, 4, 5, 5)
    torch.testing.assert_close(narrow.conv2.weight, model.conv2.weight[kept[1]][:, kept[0]])
    torch.testing.assert_close(narrow.conv2.bias, model.conv2.bias[kept[1]])
    # Flatten into fc1: 16 features per channel, the kept channels' columns.
    cols = (kept[1][:, None] * 16 + torch.arange(16)).flatten()
    torch.testing.assert_close(narrow.fc1.weight, model.fc1.weight[:, cols])
    assert narrow.fc1.in_features == 48
    # Gradients of the narrow network are the droppable model's on the kept entries.
    model.set_fixed_subsets(kept)
    model.set_inverted_scaling(False)
    model.train()
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 62, (8,))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(narrow(x), y).backward()
    torch.testing.assert_close(narrow.conv2.weight.grad, model.conv2.weight.grad[kept[1]][:, kept[0]])
    torch.testing.assert_close(narrow.fc1.weight.grad, model.fc1.weight.grad[:, cols])


def test_batchnorm_running_statistics_are_the_kept_channels():
    model = build_model("resnet20_small")
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))  # non-trivial running statistics
    kept = _random_kept(model, torch.Generator().manual_seed(5))
    narrow = extract_submodel(model, kept)
    idx = resolve_kept(model, kept)[0]
    torch.testing.assert_close(narrow.bn1.running_mean, model.bn1.running_mean[idx])
    torch.testing.assert_close(narrow.bn1.running_var, model.bn1.running_var[idx])
    # After one training forward each, the statistics still agree (same momentum, same channels).
    model.set_fixed_subsets(kept)
    model.set_inverted_scaling(False)  # as the plain narrow network (scaling would change BN inputs)
    narrow.train()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        model(x)
        narrow(x)
    torch.testing.assert_close(narrow.bn1.running_mean, model.bn1.running_mean[idx])
    g = next(i for i, grp in enumerate(model.dropout_groups) if "layer3.0.conv2" in grp.members)
    idx3 = resolve_kept(model, kept)[g]
    assert narrow.layer3[0].bn2.num_features == idx3.numel()
    torch.testing.assert_close(narrow.layer3[0].bn2.running_var, model.layer3[0].bn2.running_var[idx3])


def test_narrow_model_has_the_compact_macs_and_keeps_the_layout():
    model = build_model("resnet20")
    vector = [0.5] * model.num_dropout_layers
    counts = kept_counts(model, vector)
    narrow = extract_submodel(model, counts)
    assert narrow.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    again = make_droppable(narrow, torch.zeros(2, 3, 32, 32))
    assert again.layer_widths == counts
    assert count_macs(again) == macs_of_counts(model, counts) == count_macs(model, vector)


def test_original_model_is_untouched():
    model = build_model("femnist_cnn_small")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    narrow = extract_submodel(model, [3, 5], fold_scaling=True)
    with torch.no_grad():
        narrow.conv1.weight.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.conv1.out_channels == 16
    assert model.conv1.weight.shape[0] == 16
    model.set_dropout([0.5, 0.5])
    model.train()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 62)
    assert model.last_kept_indices()[0].numel() == 8


def test_none_and_full_counts_keep_a_group_whole():
    model = build_model("femnist_cnn_small")
    narrow = extract_submodel(model, [None, 32])
    assert narrow.conv1.out_channels == 16 and narrow.conv2.out_channels == 32
    model.eval()
    narrow.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(narrow(x), model(x))


@pytest.mark.parametrize(
    ("kept", "match"),
    [
        ([4], "2 dropout groups"),
        ([0, 4], r"outside \[1, 16\]"),
        ([17, 4], r"outside \[1, 16\]"),
        ([torch.tensor([], dtype=torch.long), 4], "no filter"),
        ([[0, 16], 4], "out of range"),
        ([[1, 1], 4], "repeated"),
        ([[0.0, 1.0], 4], "integers"),
        (torch.tensor([4, 4]), "sequence"),
    ],
)
def test_bad_kept_refused(kept, match):
    model = build_model("femnist_cnn_small")
    with pytest.raises(ValueError, match=match):
        extract_submodel(model, kept)


def test_plain_model_refused_with_type_error():
    with pytest.raises(TypeError, match="make_droppable"):
        extract_submodel(_seq_cnn(), [3, 5])


class _HardCodedView(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.conv(x)).view(-1, 4 * 8 * 8))


def test_forward_that_hard_codes_a_width_is_refused_clearly():
    model = make_droppable(_HardCodedView(), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="hard-codes"):
        extract_submodel(model, [2])
    # Without the check the copy is returned; its forward is what fails.
    narrow = extract_submodel(model, [2], check=False)
    with pytest.raises(RuntimeError):
        narrow(torch.zeros(2, 1, 8, 8))


def test_plain_class_unwraps_droppable_classes_only():
    model = build_model("femnist_cnn_small")
    assert plain_class(type(model)) is FemnistCNN
    assert plain_class(type(model.conv1)) is nn.Conv2d
    assert plain_class(nn.Conv2d) is nn.Conv2d
    assert type(model).__mro__[type(model).__mro__.index(DroppableModel) + 1] is FemnistCNN
