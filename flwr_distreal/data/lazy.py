"""Device partitions made on demand: a federation of thousands of devices that holds none of them.

:class:`LazyPartitions` is a ``Sequence[TensorDataset]`` that :class:`~flwr_distreal.data.FederatedData`
takes as its ``partitions``: its length and every device's size are known up front (so ``r_max``
per device and the draws need no data), but a device's samples are made only when it is indexed,
by a picklable callable, and only the last few are kept (a small LRU cache). A run of 10,000
devices with 35 drawn per round then makes 35 devices' data per round, not 10,000 at start-up,
in the server and in every simulation worker alike.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import overload

import numpy as np
from torch.utils.data import TensorDataset

from .errors import DataError, _check_int

__all__ = ["LazyPartitions"]


class LazyPartitions(Sequence):
    """Device partitions built when indexed, sizes known up front.

    Parameters
    ----------
    sizes : sequence of int
        Training samples of every device (each >= 1); ``len(sizes)`` is the number of devices.
    make : Callable[[int], TensorDataset]
        Builds device ``i``'s ``(images, labels)`` dataset; must return exactly ``sizes[i]``
        samples and be deterministic (server and every worker process build the same device).
        Picklable (a module-level function or an object), so the container can be sent to a
        worker process.
    cache_size : int (default: 64)
        Devices kept after being built (least recently used dropped first).

    Notes
    -----
    :class:`~flwr_distreal.data.FederatedData` checks a built device when it is first made (dtype,
    shape, label range, size), not all devices at construction: set through :attr:`check`.
    Iterating over all partitions builds every device, one after another (keeping at most
    ``cache_size``): what pooling the data (:meth:`FederatedData.centralized_train`) costs.
    """

    def __init__(self, sizes: Sequence[int], make: Callable[[int], TensorDataset], cache_size: int = 64) -> None:
        arr = np.asarray(sizes)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise DataError(f"sizes must be a non-empty 1-D sequence of ints, got {sizes!r:.80}")
        if int(arr.min()) < 1:
            raise DataError(f"every device needs at least one sample; device {int(arr.argmin())} has {int(arr.min())}")
        if not callable(make):
            raise TypeError(f"make must be callable, got {type(make).__name__}")
        self._sizes = arr.astype(np.int64)
        self.make = make
        self.cache_size = _check_int("cache_size", cache_size, 1)
        self._cache: OrderedDict[int, TensorDataset] = OrderedDict()
        #: Called as ``check(dataset, what)`` on every device when it is built (set by FederatedData).
        self.check: Callable[[TensorDataset, str], None] | None = None
        #: How many devices were built so far (a device built again after eviction counts again).
        self.built = 0

    def __len__(self) -> int:
        return int(self._sizes.size)

    def sizes(self) -> list[int]:
        """Training samples of every device, without building any."""
        return self._sizes.tolist()

    def size(self, index: int) -> int:
        """Training samples of device ``index``, without building it."""
        return int(self._sizes[self._index(index)])

    def _index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"a device index must be an int, got {index!r}")
        i = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(f"device {index} out of range: {len(self)} devices")
        return i

    @overload
    def __getitem__(self, index: int) -> TensorDataset: ...

    @overload
    def __getitem__(self, index: slice) -> list[TensorDataset]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = self._index(index)
        part = self._cache.get(i)
        if part is not None:
            self._cache.move_to_end(i)
            return part
        part = self.make(i)
        if not isinstance(part, TensorDataset):
            raise DataError(f"device {i}: make returned {type(part).__name__}, not a TensorDataset")
        if len(part) != self._sizes[i]:
            raise DataError(f"device {i}: make returned {len(part)} samples, its size is {int(self._sizes[i])}")
        if self.check is not None:
            self.check(part, f"partition {i}")
        self.built += 1
        self._cache[i] = part
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return part

    def __iter__(self) -> Iterator[TensorDataset]:
        for i in range(len(self)):
            yield self[i]

    def cached(self) -> list[int]:
        """The devices currently held in memory, least recently used first."""
        return list(self._cache)

    def __repr__(self) -> str:
        return f"LazyPartitions({len(self)} devices, {int(self._sizes.sum())} samples, {len(self._cache)} built)"
