"""Numeric precision of training and evaluation: ``fp32`` or mixed precision (``bf16``, ``fp16``).

``precision="bf16"`` runs every forward pass under :func:`torch.autocast` with bfloat16: on a
CPU with native bf16 arithmetic (AVX-512 BF16 or AMX, which oneDNN uses), on CUDA as AMP.
``precision="fp16"`` is CUDA-only AMP with a :class:`torch.amp.GradScaler` (float16 needs loss
scaling; bfloat16 has float32's exponent range and does not). What stays float32 whatever the
precision:

* the parameters, their gradients and the optimiser state (autocast casts the *inputs* of
  eligible ops, never the module's tensors);
* BatchNorm's running statistics (buffers, never cast);
* the loss: the logits are cast to float32 and the cross-entropy is computed outside autocast.

A CPU without native bf16 (oneDNN would emulate it, slower than fp32) is refused at start-up by
:func:`check_precision` with a message naming the missing CPU feature: a silent fallback would
make a ``precision=bf16`` run an fp32 run under another name. Whether bf16 pays on a machine is
measured by ``scripts/bench_layout_precision.py`` (full and compact steps side by side).

No Flower or Hydra imports.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = [
    "PRECISIONS",
    "autocast",
    "check_precision",
    "cpu_bf16_native",
    "cpu_flags",
    "make_grad_scaler",
]

log = logging.getLogger(__name__)

#: Valid values of the ``precision`` option.
PRECISIONS = ("fp32", "bf16", "fp16")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of ``/proc/cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags") and ":" in line:
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively: AVX-512 BF16 or AMX-BF16 (``/proc/cpuinfo``),
    and oneDNN (``torch.backends.mkldnn``) is there to use it. Where ``/proc/cpuinfo`` is missing
    (not Linux), oneDNN's own bf16 check decides."""
    if not torch.backends.mkldnn.is_available():
        return False
    flags = cpu_flags()
    if flags:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def _device_type(device: str | torch.device) -> str:
    return torch.device(device).type


def check_precision(precision: str, device: str | torch.device = "cpu") -> str:
    """Validate ``precision`` for ``device``; returns it.

    Raises
    ------
    ValueError
        If ``precision`` is not one of :data:`PRECISIONS`, if ``bf16`` is asked for on a CPU
        without native bf16 (AVX-512 BF16 or AMX) or a CUDA device without bf16 support, or if
        ``fp16`` is asked for on a device other than CUDA.
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    kind = _device_type(device)
    if precision == "bf16":
        if kind == "cpu" and not cpu_bf16_native():
            raise ValueError(
                "precision=bf16 needs a CPU with native bfloat16 (the avx512_bf16 or amx_bf16 flag in "
                "/proc/cpuinfo) and oneDNN; this one has neither, and emulated bf16 is slower than fp32. "
                "Use precision=fp32"
            )
        if kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("precision=bf16: this CUDA device does not support bfloat16; use precision=fp16 or fp32")
    if precision == "fp16" and kind != "cuda":
        raise ValueError(
            f"precision=fp16 is CUDA-only (AMP with a GradScaler); on {kind} use precision=bf16 or fp32"
        )
    return precision


@contextlib.contextmanager
def autocast(precision: str, device: str | torch.device = "cpu") -> Iterator[None]:
    """The context a forward pass runs in: nothing for ``fp32``, else :func:`torch.autocast` on
    ``device``'s type with the precision's dtype."""
    if precision == "fp32":
        yield
        return
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    with torch.autocast(device_type=_device_type(device), dtype=_DTYPES[precision]):
        yield


def make_grad_scaler(precision: str, device: str | torch.device = "cpu") -> Any | None:
    """A :class:`torch.amp.GradScaler` for ``fp16`` (loss scaling), ``None`` otherwise."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(_device_type(device))
