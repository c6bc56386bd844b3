"""Tests of datasets and federated partitions (flwr_distreal.data)."""

from __future__ import annotations

import gzip
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from flwr_distreal.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DataError,
    FederatedData,
    RandomCropFlip,
    dirichlet_partition,
    distort,
    iid_partition,
    list_datasets,
    load_cifar10,
    load_cifar100,
    load_digits,
    load_federated,
    load_femnist,
    load_mnist,
    load_npz,
    shard_partition,
    split_indices,
)

from conftest import cifar_images, write_cifar10, write_leaf

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# --------------------------------------------------------------------------- LEAF FEMNIST


def test_leaf_loader_on_generated_shards(tmp_path: Path) -> None:
    writers = {"f0001": (5, 2), "f0002": (3, 1), "f0003": (7, 2)}
    root = write_leaf(tmp_path / "leaf", writers)
    data = load_femnist(root)
    assert data.name == "femnist" and data.num_classes == 62 and data.input_shape == (1, 28, 28)
    # shard 0 holds writers 1 and 3, shard 1 writer 2
    assert data.device_names == ["f0001", "f0003", "f0002"]
    assert data.partition_sizes() == [5, 7, 3]
    assert len(data.test) == 5
    shard = json.loads((root / "train" / "all_data_0_niid_0_keep_0_train_9.json").read_text())
    x, y = data.partitions[1].tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(x.reshape(7, 784).numpy(), np.asarray(shard["user_data"]["f0003"]["x"], np.float32))
    np.testing.assert_array_equal(y.numpy(), shard["user_data"]["f0003"]["y"])
    assert len(data.centralized_train()) == 15
    small = load_femnist(root, max_devices=2)
    assert small.device_names == ["f0001", "f0003"] and len(small.test) == 5


@pytest.mark.skipif(not (SHARED_DATA / "femnist_leaf").is_dir(), reason="shared FEMNIST LEAF data not present")
def test_leaf_loader_on_shared_femnist() -> None:
    data = load_femnist(SHARED_DATA / "femnist_leaf")
    assert data.num_devices == 105
    assert sum(data.partition_sizes()) == 14_708
    assert len(data.test) == 1_685
    assert data.num_classes == 62
    x, y = data.centralized_train().tensors
    assert x.shape == (14_708, 1, 28, 28) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.median()) == 1.0  # LEAF: white background = 1, ink = 0
    assert int(y.max()) <= 61 and len(torch.unique(y)) == 62


def _leaf_refusal(tmp_path: Path, mutate) -> Path:  # noqa: ANN001
    root = write_leaf(tmp_path / "bad", {"a": (2, 1), "b": (2, 1)}, shards=1)
    file = root / "train" / "all_data_0_niid_0_keep_0_train_9.json"
    shard = json.loads(file.read_text())
    text = mutate(shard)
    file.write_text(text if isinstance(text, str) else json.dumps(shard))
    return file


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda s: "{not json", "not readable json"),
        (lambda s: s.pop("user_data"), "expected keys 'users' and 'user_data'"),
        (lambda s: s["user_data"]["a"].pop("y"), "user 'a' needs 'x' and 'y'"),
        (lambda s: s["user_data"]["a"]["x"][0].pop(), "ragged"),
        (lambda s: s["user_data"]["a"].update(x=[[0.5] * 783] * 2), r"x of shape \(n, 784\)"),
        (lambda s: s["user_data"]["a"].update(y=[1]), r"y of shape \(n,\)"),
        (lambda s: s.update(num_samples=[3, 2]), "num_samples says 3"),
        (lambda s: s.update(num_samples=[2]), "one count per user"),
        (lambda s: s["user_data"]["b"].update(y=[0, 62]), "labels outside"),
        (lambda s: s["user_data"]["b"].update(y=[0, 1.5]), "labels outside"),
        (lambda s: s["user_data"]["b"]["x"][1].__setitem__(3, 255.0), r"outside \[0, 1\]"),
    ],
)
def test_leaf_malformed_shards_refused(tmp_path: Path, mutate, match: str) -> None:  # noqa: ANN001
    file = _leaf_refusal(tmp_path, mutate)
    with pytest.raises(DataError, match=match) as info:
        load_femnist(file.parent.parent)
    assert str(file) in str(info.value)


def test_leaf_missing_directories_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        load_femnist(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value)
    (tmp_path / "only_train" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no \\*.json shards"):
        load_femnist(tmp_path / "only_train")
    write_leaf(tmp_path / "no_test", {"a": (1, 1)}, shards=1)
    for f in (tmp_path / "no_test" / "test").iterdir():
        f.unlink()
    (tmp_path / "no_test" / "test").rmdir()
    with pytest.raises(DataError, match=r"no_test/test not found"):
        load_femnist(tmp_path / "no_test")
    with pytest.raises(DataError, match="test_fraction"):
        load_femnist(tmp_path / "no_test", test_fraction=1.0)


def test_leaf_empty_test_split_refused_naming_the_folder(tmp_path: Path) -> None:
    root = write_leaf(tmp_path / "leaf", {"a": (3, 0), "b": (2, 0)}, shards=2)  # writers without test samples
    with pytest.raises(DataError, match="holds no samples") as info:
        load_femnist(root)
    assert f"FEMNIST LEAF test split {root / 'test'}" in str(info.value)
    for file in (root / "test").iterdir():  # shards listing no users at all
        file.write_text(json.dumps({"users": [], "num_samples": [], "user_data": {}}))
    with pytest.raises(DataError, match=re.escape(f"{root / 'test'} holds no samples")):
        load_femnist(root)


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_loader_on_generated_pickles(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    data = load_cifar10(tmp_path, num_devices=4, samples_per_device=10, seed=3)
    assert data.input_shape == (3, 32, 32) and data.num_classes == 10
    assert data.partition_sizes() == [10, 10, 10, 10] and len(data.test) == 6
    assert data.mean == CIFAR10_MEAN and data.std == CIFAR10_STD
    assert isinstance(data.augment, RandomCropFlip)
    # undo the normalisation and recover the sample index from the first byte: the split
    # is a partition of the 40 training samples, and labels travel with their images
    x, y = data.centralized_train().tensors
    raw = x[:, 0, 0, 0] * CIFAR10_STD[0] + CIFAR10_MEAN[0]
    idx = torch.round(raw * 255).long()
    assert sorted(idx.tolist()) == list(range(40))
    expected_labels = torch.tensor([(j % 8 + j // 8 + 1) % 10 for j in idx.tolist()])
    assert torch.equal(y, expected_labels)
    # exact normalisation of a known pixel
    with (folder / "test_batch").open("rb") as fh:
        test_raw = pickle.load(fh)["data"]
    want = (test_raw[2, 1024 + 5] / 255.0 - CIFAR10_MEAN[1]) / CIFAR10_STD[1]
    assert float(data.test.tensors[0][2, 1, 0, 5]) == pytest.approx(want, abs=1e-6)
    # the folder itself is accepted as root; another seed gives another split
    other = load_cifar10(folder, num_devices=4, samples_per_device=10, seed=4)
    assert not torch.equal(other.partitions[0].tensors[1], data.partitions[0].tensors[1]) or not torch.equal(
        other.partitions[0].tensors[0], data.partitions[0].tensors[0]
    )
    plain = load_cifar10(tmp_path, num_devices=2, samples_per_device=None, augment=False, normalize=False)
    assert plain.augment is None and plain.mean is None and plain.partition_sizes() == [20, 20]
    assert float(plain.test.tensors[0].max()) <= 1.0


def test_cifar100_loader_on_generated_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, n in (("train", 12), ("test", 4)):
        with (folder / split).open("wb") as fh:
            pickle.dump({"data": cifar_images(n, 0), "fine_labels": [99 - i for i in range(n)],
                         "coarse_labels": [0] * n}, fh)
    data = load_cifar100(tmp_path, num_devices=3, samples_per_device=4)
    assert data.num_classes == 100 and data.partition_sizes() == [4, 4, 4]
    assert sorted(data.centralized_train().tensors[1].tolist()) == list(range(88, 100))


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"data": np.zeros((4, 3072), np.uint8)}, "expected keys 'data' and 'labels'"),
        ({"data": np.zeros((4, 3071), np.uint8), "labels": [0] * 4}, r"shape \(n, 3072\)"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}, r"shape \(n, 3072\)"),
        ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}, r"labels must be in \[0, 10\)"),
        ({"data": np.full((4, 3072), 300), "labels": [0] * 4}, "bytes 0..255"),
    ],
)
def test_cifar_malformed_batches_refused(tmp_path: Path, batch: dict, match: str) -> None:
    folder = write_cifar10(tmp_path)
    with (folder / "data_batch_3").open("wb") as fh:
        pickle.dump(batch, fh)
    with pytest.raises(DataError, match=match) as info:
        load_cifar10(tmp_path, num_devices=2, samples_per_device=4)
    assert str(folder / "data_batch_3") in str(info.value)


def test_cifar_missing_or_unreadable_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cifar10 not found under .*cifar-10-batches-py.*download=True"):
        load_cifar10(tmp_path, num_devices=2)
    folder = write_cifar10(tmp_path)
    (folder / "data_batch_5").unlink()
    with pytest.raises(DataError, match="data_batch_5"):
        load_cifar10(tmp_path, num_devices=2)
    (folder / "data_batch_5").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable python pickle"):
        load_cifar10(tmp_path, num_devices=2)


def test_cifar_too_many_samples_per_device_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="cannot give 100 devices 500 samples each from 40"):
        load_cifar10(tmp_path)


def test_random_crop_flip_is_a_shifted_window() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    aug = RandomCropFlip(padding=2, flip=False, fill=(-1.0, -2.0, -3.0))
    padded = torch.empty(2, 3, 10, 10)
    for c, v in enumerate((-1.0, -2.0, -3.0)):
        padded[:, c] = v
    padded[:, :, 2:8, 2:8] = x
    seen_offsets = set()
    for _ in range(30):
        out = aug(x, generator=gen)
        assert out.shape == x.shape
        for n in range(2):
            matches = [
                (oy, ox)
                for oy in range(5)
                for ox in range(5)
                if torch.equal(out[n], padded[n, :, oy : oy + 6, ox : ox + 6])
            ]
            assert matches, "output is not a window of the padded input"
            seen_offsets.update(matches)
    assert len(seen_offsets) > 10  # offsets vary per sample and call
    flip = RandomCropFlip(padding=0, flip=True)
    outs = [flip(x, generator=gen) for _ in range(20)]
    assert all(torch.equal(o[0], x[0]) or torch.equal(o[0], x[0].flip(2)) for o in outs)
    assert any(torch.equal(o[0], x[0].flip(2)) for o in outs) and any(torch.equal(o[0], x[0]) for o in outs)
    a = RandomCropFlip()(x, generator=torch.Generator().manual_seed(5))
    b = RandomCropFlip()(x, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(DataError, match="fill has 1 values"):
        RandomCropFlip(fill=(0.0,))(x)


# --------------------------------------------------------------------------- MNIST (idx)


def _idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_mnist(root: Path, n_train: int = 40, n_test: int = 10, gz: bool = True) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    for name, arr in files.items():
        payload = _idx_bytes(np.asarray(arr))
        if gz:
            (raw / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (raw / name).write_bytes(payload)
    return raw


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_loader_on_generated_idx(tmp_path: Path, gz: bool) -> None:
    _write_mnist(tmp_path, gz=gz)
    data = load_mnist(tmp_path, num_devices=5, partition="shards", shards_per_device=2)
    assert data.input_shape == (1, 28, 28) and data.partition_sizes() == [8] * 5 and len(data.test) == 10
    for part in data.partitions:
        assert len(torch.unique(part.tensors[1])) <= 2  # two label-sorted shards of 4 samples
    iid = load_mnist(tmp_path, num_devices=4, samples_per_device=10)
    assert iid.partition_sizes() == [10] * 4


def test_mnist_refusals(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="MNIST not found under .*MNIST/raw"):
        load_mnist(tmp_path / "none")
    raw = _write_mnist(tmp_path, gz=False)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic number"):
        load_mnist(tmp_path, num_devices=2)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(9) % 10))
    with pytest.raises(DataError, match="expected images"):
        load_mnist(tmp_path, num_devices=2)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(10) % 10)[:-3])
    with pytest.raises(DataError, match="data bytes"):
        load_mnist(tmp_path, num_devices=2)


@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason="shared MNIST not present")
def test_mnist_loader_on_shared_gz_files() -> None:
    data = load_mnist(SHARED_DATA, num_devices=100)
    assert sum(data.partition_sizes()) == 60_000 and len(data.test) == 10_000
    assert data.test.tensors[1][:5].tolist() == [7, 2, 1, 0, 4]  # the official t10k label order


# --------------------------------------------------------------------------- npz


def test_npz_layouts(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    nhwc = tmp_path / "nhwc.npz"
    np.savez(nhwc, x_train=rng.integers(0, 256, (30, 16, 16, 3), dtype=np.uint8), y_train=np.arange(30) % 5,
             x_test=rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8), y_test=np.arange(7) % 5)
    data = load_npz(nhwc, num_devices=3)
    assert data.input_shape == (3, 16, 16) and data.num_classes == 5 and data.partition_sizes() == [10, 10, 10]
    with np.load(nhwc) as raw:
        assert float(data.test.tensors[0][1, 2, 3, 4]) == pytest.approx(raw["x_test"][1, 3, 4, 2] / 255.0)
    nchw = tmp_path / "nchw.npz"
    xf = rng.random((12, 3, 8, 8)).astype(np.float32) * 4 - 2  # floats kept as they are
    np.savez(nchw, x_train=xf, y_train=np.arange(12) % 3, x_test=xf[:2], y_test=np.array([0, 1]))
    data = load_npz(nchw, num_devices=2, num_classes=10, partition="dirichlet", alpha=100.0, name="mine")
    assert data.name == "mine" and data.num_classes == 10 and data.input_shape == (3, 8, 8)
    assert sum(data.partition_sizes()) == 12
    assert torch.equal(data.test.tensors[0], torch.from_numpy(xf[:2]))
    grey = tmp_path / "grey.npz"
    np.savez(grey, x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.array([0, 1, 0, 1]),
             x_test=np.zeros((2, 28, 28), np.uint8), y_test=np.array([1, 0]))
    assert load_npz(grey, num_devices=2).input_shape == (1, 28, 28)
    forced = load_npz(nhwc, num_devices=3, layout="nchw")
    assert forced.input_shape == (16, 16, 3)


def _npz_arrays(**changes: np.ndarray | None) -> dict[str, np.ndarray]:
    """Valid small npz arrays with some replaced (a None value removes the array)."""
    arrays: dict[str, np.ndarray] = {
        "x_train": np.zeros((4, 8, 8)),
        "y_train": np.zeros(4, int),
        "x_test": np.zeros((2, 8, 8)),
        "y_test": np.zeros(2, int),
    }
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    return arrays


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (_npz_arrays(y_test=None), r"missing arrays \['y_test'\]"),
        (_npz_arrays(y_train=np.zeros(3, int)), r"y_train must have shape \(4,\)"),
        (_npz_arrays(x_test=np.zeros((2, 9, 9))), "differ in shape"),
        (_npz_arrays(y_train=np.full(4, 0.5)), "integer labels"),
        (_npz_arrays(x_train=np.zeros((4, 8)), x_test=np.zeros((2, 8))), "3 .* or 4 dimensions"),
        (_npz_arrays(x_train=np.zeros((4, 8, 8), np.int32)), "uint8 .* or float"),
        (_npz_arrays(x_train=np.full((4, 8, 8), np.nan)), "NaN"),
        (_npz_arrays(y_train=-np.ones(4, int)), "negative labels"),
    ],
)
def test_npz_refusals(tmp_path: Path, arrays: dict, match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=match) as info:
        load_npz(path, num_devices=2)
    assert str(path) in str(info.value)


def test_npz_file_refusals(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        load_npz(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"junk\.npz is not an \.npz archive"):
        load_npz(tmp_path / "junk.npz")
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.npz is empty"):
        load_npz(tmp_path / "empty.npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"broken\.npz is not a readable \.npz"):
        load_npz(tmp_path / "broken.npz")
    ok = tmp_path / "ok.npz"
    np.savez(ok, **_npz_arrays(y_train=np.array([0, 1, 2, 3])))
    with pytest.raises(DataError, match="labels go up to 3 but num_classes is 3"):
        load_npz(ok, num_devices=2, num_classes=3)
    with pytest.raises(DataError, match="layout"):
        load_npz(ok, layout="hwc")


@pytest.mark.parametrize("name", ["arrays.npy", "arrays.npz"])
def test_npy_given_where_an_npz_is_expected(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with path.open("wb") as fh:  # np.save appends .npy to a name without it
        np.save(fh, np.zeros((4, 8, 8)))
    with pytest.raises(DataError) as info:
        load_npz(path)
    message = str(info.value)
    assert f"npz dataset {path} is a .npy file" in message
    assert "expected an .npz file with x_train, y_train, x_test, y_test" in message
    with pytest.raises(DataError, match="is a .npy file"):
        load_federated("npz", path=str(path))


@pytest.mark.parametrize("seed", [-1, True, 1.5])
def test_bad_seed_is_refused_naming_the_key(seed) -> None:  # noqa: ANN001
    with pytest.raises(DataError, match=r"seed must be an integer >= 0.*got"):
        load_federated("digits", seed=seed)


# --------------------------------------------------------------------------- digits (embedded default)


def test_digits_default_shapes_and_split() -> None:
    data = load_digits()
    assert data.name == "digits" and data.num_classes == 10 and data.input_shape == (1, 28, 28)
    assert data.num_devices == 20
    assert sum(data.partition_sizes()) + len(data.test) == 1797
    assert len(data.test) == round(0.2 * 1797)
    assert max(data.partition_sizes()) - min(data.partition_sizes()) <= 1
    x = data.test.tensors[0]
    assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    # the upsampled image keeps the 8x8 original's content
    from sklearn.datasets import load_digits as sk

    small = torch.nn.functional.interpolate(data.test.tensors[0][:1], size=(8, 8), mode="area")
    originals = torch.as_tensor(sk().images / 16.0, dtype=torch.float32)
    best = ((originals - small[0, 0]) ** 2).mean(dim=(1, 2)).argmin()
    assert int(sk().target[int(best)]) == int(data.test.tensors[1][0])


def test_digits_split_is_deterministic_from_seed() -> None:
    a, b, c = load_digits(seed=1), load_digits(seed=1), load_digits(seed=2)
    for pa, pb in zip(a.partitions, b.partitions):
        assert torch.equal(pa.tensors[0], pb.tensors[0]) and torch.equal(pa.tensors[1], pb.tensors[1])
    assert torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])


def test_digits_dirichlet_is_non_iid() -> None:
    iid = load_digits(num_devices=10, seed=0)
    skew = load_digits(num_devices=10, partition="dirichlet", alpha=0.1, seed=0)
    assert sum(skew.partition_sizes()) == sum(iid.partition_sizes())

    def mean_top_share(data: FederatedData) -> float:
        shares = [np.bincount(p.tensors[1].numpy(), minlength=10).max() / len(p) for p in data.partitions]
        return float(np.mean(shares))

    assert mean_top_share(iid) < 0.25
    assert mean_top_share(skew) > 0.5
    with pytest.raises(DataError, match="test_fraction"):
        load_digits(test_fraction=0.0)


# --------------------------------------------------------------------------- partition helpers


def test_partition_helpers() -> None:
    labels = np.repeat(np.arange(10), 30)
    parts = iid_partition(300, 7, seed=1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))
    fixed = iid_partition(300, 7, seed=1, samples_per_device=40)
    assert [p.size for p in fixed] == [40] * 7 and len(set(np.concatenate(fixed).tolist())) == 280
    with pytest.raises(DataError, match="cannot give 7 devices 50"):
        iid_partition(300, 7, samples_per_device=50)
    dirichlet = dirichlet_partition(labels, 5, alpha=0.3, seed=0)
    assert sorted(np.concatenate(dirichlet).tolist()) == list(range(300))
    assert all(p.size >= 1 for p in dirichlet)
    shards = shard_partition(labels, 10, shards_per_device=1, seed=0)
    assert all(len(np.unique(labels[p])) == 1 for p in shards)
    with pytest.raises(DataError, match="unknown partition scheme 'bogus'"):
        split_indices(labels, 3, partition="bogus")
    with pytest.raises(DataError, match="samples_per_device applies to the 'iid'"):
        split_indices(labels, 3, partition="shards", samples_per_device=5)
    with pytest.raises(DataError, match="alpha"):
        dirichlet_partition(labels, 3, alpha=0.0)
    with pytest.raises(DataError, match="could not give every one of 200 devices"):
        dirichlet_partition(labels, 200, alpha=0.01, seed=0, min_samples=1, max_tries=3)


# --------------------------------------------------------------------------- distortion


def test_distort_greyscale_and_colour() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(distort(x, factor=1.0), x)
    flat = torch.full((1, 1, 4, 4), 0.8)
    # brightness 0.8 -> 0.4; contrast blends with the (now uniform) mean: unchanged
    assert torch.allclose(distort(flat, 0.5), torch.full_like(flat, 0.4))
    grey = torch.rand(2, 1, 8, 8)
    out = distort(grey, 0.5)
    expected = 0.5 * (grey * 0.5) + 0.5 * (grey * 0.5).mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(out, expected, atol=1e-6)
    col = distort(x, 0.5)
    # contrast and saturation halved: spread across pixels and across channels shrinks
    assert col.std() < 0.5 * x.std()
    def channel_spread(img: torch.Tensor) -> torch.Tensor:
        return (img.max(dim=1).values - img.min(dim=1).values).mean()

    assert channel_spread(col) < 0.5 * channel_spread(x)
    # on normalised images the distortion happens in [0, 1] space
    mean, std = CIFAR10_MEAN, CIFAR10_STD
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(distort((x - m) / s, 0.5, mean, std), (distort(x, 0.5) - m) / s, atol=1e-5)


def test_distort_refusals() -> None:
    with pytest.raises(DataError, match="C in \\(1, 3\\)"):
        distort(torch.zeros(1, 2, 4, 4))
    with pytest.raises(DataError, match="C in \\(1, 3\\)"):
        distort(torch.zeros(3, 4, 4))
    with pytest.raises(DataError, match="float"):
        distort(torch.zeros(1, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(DataError, match="factor"):
        distort(torch.zeros(1, 1, 4, 4), factor=-0.1)
    with pytest.raises(DataError, match="both mean and std"):
        distort(torch.zeros(1, 3, 4, 4), mean=CIFAR10_MEAN)


def test_distorted_train_uses_dataset_normalisation(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    data = load_cifar10(tmp_path, num_devices=2, samples_per_device=20)
    raw = load_cifar10(tmp_path, num_devices=2, samples_per_device=20, normalize=False)
    dist = data.distorted_train(0.5).tensors[0]
    m, s = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.allclose(dist * s + m, distort(raw.centralized_train().tensors[0], 0.5), atol=1e-5)


# --------------------------------------------------------------------------- container & dispatch


def test_federated_data_loaders() -> None:
    data = load_digits(num_devices=4)
    loader = data.train_loader(2, batch_size=16, seed=7)
    batches = list(loader)
    assert sum(b[0].shape[0] for b in batches) == len(data.partitions[2])
    again = list(data.train_loader(2, batch_size=16, seed=7))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = list(data.train_loader(1, batch_size=16, seed=7))
    assert not torch.equal(other[0][0], batches[0][0])
    assert len(list(data.train_loader(2, batch_size=16, drop_last=True))) == len(data.partitions[2]) // 16
    assert sum(b[0].shape[0] for b in data.test_loader(100)) == len(data.test)
    with pytest.raises(DataError, match="device_id 4 out of range"):
        data.train_loader(4, 16)
    with pytest.raises(DataError, match="batch_size"):
        data.train_loader(0, 0)


def test_train_loader_applies_augmentation(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    data = load_cifar10(tmp_path, num_devices=2, samples_per_device=20)
    aug = next(iter(data.train_loader(0, 20, shuffle=False, seed=1)))[0]
    plain = next(iter(data.train_loader(0, 20, shuffle=False, augment=False)))[0]
    assert torch.equal(plain, data.partitions[0].tensors[0])
    assert not torch.equal(aug, plain)
    assert torch.equal(aug, next(iter(data.train_loader(0, 20, shuffle=False, seed=1)))[0])


def test_federated_data_validation() -> None:
    good = TensorDataset(torch.zeros(3, 1, 4, 4), torch.zeros(3, dtype=torch.int64))
    kwargs = {"name": "t", "num_classes": 2, "input_shape": (1, 4, 4), "test": good}
    FederatedData(partitions=[good], **kwargs)
    with pytest.raises(DataError, match="no device partitions"):
        FederatedData(partitions=[], **kwargs)
    with pytest.raises(DataError, match="images must be float32"):
        doubles = TensorDataset(torch.zeros(3, 1, 4, 4, dtype=torch.float64), good.tensors[1])
        FederatedData(partitions=[doubles], **kwargs)
    with pytest.raises(DataError, match=r"labels must be in \[0, 2\)"):
        FederatedData(partitions=[TensorDataset(good.tensors[0], torch.tensor([0, 1, 2]))], **kwargs)
    with pytest.raises(DataError, match="partition 0 is empty"):
        FederatedData(partitions=[TensorDataset(torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.int64))], **kwargs)
    with pytest.raises(DataError, match="one value per channel"):
        FederatedData(partitions=[good], mean=(0.5, 0.5), std=(1.0, 1.0), **kwargs)


def test_load_federated_dispatch(tmp_path: Path) -> None:
    assert list_datasets() == ["cifar10", "cifar100", "digits", "femnist", "mnist", "npz", "synthetic"]
    data = load_federated("digits", num_devices=5, seed=None, alpha=None)
    assert data.num_devices == 5
    write_cifar10(tmp_path)
    assert load_federated("cifar10", root=str(tmp_path), num_devices=2, samples_per_device=4).num_devices == 2
    with pytest.raises(DataError, match=r"unknown dataset 'imagenet'; valid: \['cifar10'"):
        load_federated("imagenet")
    with pytest.raises(DataError, match=r"does not accept \['lam'\]; accepted: .*num_devices"):
        load_federated("digits", lam=2.0)
    with pytest.raises(DataError, match=r"dataset 'cifar10' needs \['root'\]"):
        load_federated("cifar10", root=None)
