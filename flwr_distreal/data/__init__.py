"""Datasets and federated partitions, with the sources behind a registry by name.

Every loader returns a :class:`FederatedData`: one in-memory ``TensorDataset`` per device
(float32 images in NCHW layout, int64 labels), a centralized test set, and an optional
batch-level training augmentation on tensors. The paper's settings (Table 1 of Rapp et
al., AAAI 2022):

* FEMNIST, partitioned by writer (non-IID, 181 +- 70.7 samples per device, 62 classes):
  :func:`load_femnist` reads LEAF json shards offline, or ``flwrlabs/femnist`` through
  ``flwr_datasets`` with a natural-id partitioner when online.
* CIFAR-10/100, IID with 500 samples per device, standard augmentation (random crop 32
  with padding 4, horizontal flip) and channel normalisation: :func:`load_cifar10`,
  :func:`load_cifar100` read the extracted python-pickle archives, downloading them
  through torchvision when asked.

Beyond the paper: :func:`load_mnist` (torchvision's raw idx files, gzipped or not),
:func:`load_npz` (any array file) and :func:`load_digits`, the embedded default that needs
no download (scikit-learn's bundled 8x8 digits upsampled to 28x28, so the FEMNIST CNN runs
on it unchanged). :func:`distort` implements the DSE's distorted copy of the data
(brightness, contrast and saturation scaled by 0.5, section "Convergence Speed" of the
paper's DSE).

:meth:`FederatedData.split_validation` holds out a seeded part of every device's training
data as a validation split (what learning-rate tuning judges by, never the test set).

Layout (one file per concern, one per source):

========================  ==============================================================
``registry``              :func:`register_dataset`, :func:`build_dataset` (=
                          :func:`load_federated`), :func:`list_datasets`
``federated``             :class:`FederatedData`, the container every loader returns, and
                          :func:`federate`, which builds one from arrays
``partition``             IID, Dirichlet and shard splits (:func:`split_indices`)
``transforms``            :class:`RandomCropFlip`, :func:`distort`
``node_data``             a deployment node's data (:func:`regroup`, :func:`node_data_from_npz`)
``lazy``                  :class:`LazyPartitions`: devices made when used, sizes known up front
``digits``, ``femnist``,  the sources, each registering its loader under the name
``cifar``, ``mnist``,     ``conf/dataset/*.yaml`` uses (``cifar`` holds CIFAR-10 and
``npz``, ``synthetic``    CIFAR-100, which share one reader; ``synthetic``: FEMNIST-shaped
                          devices of any number, made when used)
========================  ==============================================================

A new dataset is one file with a loader decorated ``@register_dataset("name")`` (imported
here, or by the user's own code before the run) plus ``conf/dataset/<name>.yaml``.

Nothing here imports Flower or Hydra. ``flwr_datasets`` and ``torchvision`` are imported
lazily, only for downloads.
"""

from __future__ import annotations

from .errors import DataError
from .federated import FederatedData, federate
from .partition import PARTITIONS, dirichlet_partition, iid_partition, shard_partition, split_indices
from .registry import build_dataset, is_dataset, list_datasets, load_federated, register_dataset, unregister_dataset
from .transforms import RandomCropFlip, distort

# The sources register their loaders on import (the order does not matter).
from .cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, load_cifar10, load_cifar100  # noqa: I001
from .digits import load_digits
from .femnist import FEMNIST_CLASSES, load_femnist
from .lazy import LazyPartitions
from .mnist import load_mnist
from .npz import load_npz
from .synthetic import load_synthetic
from .node_data import node_data_from_npz, regroup

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "FEMNIST_CLASSES",
    "PARTITIONS",
    "DataError",
    "FederatedData",
    "LazyPartitions",
    "RandomCropFlip",
    "build_dataset",
    "dirichlet_partition",
    "distort",
    "federate",
    "iid_partition",
    "is_dataset",
    "list_datasets",
    "load_cifar10",
    "load_cifar100",
    "load_digits",
    "load_federated",
    "load_femnist",
    "load_mnist",
    "load_npz",
    "load_synthetic",
    "node_data_from_npz",
    "regroup",
    "register_dataset",
    "shard_partition",
    "split_indices",
    "unregister_dataset",
]
