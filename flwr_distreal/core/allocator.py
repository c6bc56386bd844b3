"""Keep freed tensor memory in the process instead of handing it back to the kernel (glibc).

Why: glibc's ``malloc`` serves every allocation above its mmap threshold (at most 32 MiB on
64-bit) with a fresh ``mmap`` and returns it with ``munmap`` when freed. A DenseNet forward pass
allocates many such tensors (every dense block concatenates its growing feature maps; an
evaluation batch of 512 CIFAR images makes tensors of hundreds of MiB), so each pass maps, faults
in and zero-fills the same amount of fresh pages again: on a 2-core CPU a CIFAR-10 DenseNet-BC-40
evaluation spent more time in the kernel (page faults) than computing. ``scripts/bench_cifar_round.py``
measures it side by side.

:func:`keep_freed_memory` turns mmap serving off (``M_MMAP_MAX = 0``) and trimming of the heap's
top off (``M_TRIM_THRESHOLD``), so freed blocks are reused. The cost: a process keeps its peak
heap until it exits. Set ``FLWR_DISTREAL_MALLOC=default`` to keep glibc's defaults. No effect
(and ``False``) on other C libraries (musl, macOS, Windows).

No Flower or Hydra imports.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["ENV", "keep_freed_memory"]

log = logging.getLogger(__name__)

#: Environment variable: ``default`` keeps glibc's allocator settings.
ENV = "FLWR_DISTREAL_MALLOC"

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc reuse freed memory instead of unmapping it (once per process).

    Returns
    -------
    bool
        True when the settings are in effect (glibc, not disabled by ``FLWR_DISTREAL_MALLOC``).
    """
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get(ENV, "").strip().lower() in ("default", "off", "0", "false"):
        return False
    mallopt = _glibc_function("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    _done = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    if not _done:
        log.debug("mallopt refused the settings; glibc's defaults stay")
    return _done


def _glibc_function(name: str, argtypes: list) -> ctypes._CFuncPtr | None:
    """The C library's function ``name`` (returning int) on Linux, None elsewhere or when missing."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function
