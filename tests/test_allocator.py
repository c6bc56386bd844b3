"""The glibc allocator settings (:mod:`flwr_distreal.core.allocator`): freed memory is kept by
:func:`keep_freed_memory` (not handed back to the kernel and faulted in again every step)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings (Linux)")

_PROGRAM = """
from pathlib import Path
from flwr_distreal.core.allocator import keep_freed_memory

def rss_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS"))
    return int(line.split()[1]) / 1024

assert keep_freed_memory()
blocks = [bytearray(64 * 1024 * 1024) for _ in range(4)]  # 256 MB, from the heap (mmap serving off)
for b in blocks:
    b[::4096] = b"x" * len(b[::4096])  # touch every page
peak = rss_mb()
del blocks
kept = rss_mb()
print(f"{peak:.0f} {kept:.0f}")
"""


def test_freed_memory_is_kept() -> None:
    result = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "AssertionError" in result.stderr and "keep_freed_memory" in result.stderr:
        pytest.skip("not glibc: the settings do not apply")
    assert result.returncode == 0, result.stderr[-2000:]
    peak, kept = (float(x) for x in result.stdout.split())
    assert peak > 256 and kept > peak - 32, f"freed memory was handed back: {peak} -> {kept} MB"
