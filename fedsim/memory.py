"""Keep freed memory in the process: large blocks are reused, not faulted in again.

A round moves large buffers: a model's tensor frames (636 KB each for the 784-200-10 MLP,
copied once on encode and once on receive), the stacked weights of a group of clients, the
gradients. glibc's ``malloc`` serves blocks above its mmap threshold (128 KiB at start,
adapting upwards as such blocks are freed) with fresh ``mmap``-ed pages and gives them back
to the kernel on ``free``, and returns the top of the heap to the kernel once 128 KiB lie
free there. Each new block then page-faults in again, page by page, zeroed by the kernel.
Measured on the 784-200-10 MLP workload, one process, 2-core VM: with 100 clients (16
rounds) 340k-460k minor page faults without this setting, 118k-121k with it, and the steady
round's CPU time 0.24-0.28 s against 0.26-0.35 s (three alternations); with 1,000 clients,
whose replies (636 MB) are freed together after each aggregation, 2.27-2.49 s a round with
trimming off against 2.78-3.39 s with a 256 MiB trim threshold.

The setting is process-wide and stays for the life of the process (setting the threshold
back would switch glibc's adaptive threshold off). Blocks below ``mmap_threshold_bytes`` come
from the heap, and free heap is kept for reuse rather than returned (``trim_threshold_bytes``
-1: never, as ``mallopt(3)`` documents): the resident size stays at its peak instead of
shrinking between rounds. Blocks above the threshold are still mapped and unmapped.
Elsewhere than glibc (musl, macOS) it does nothing.
"""
from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_applied = False


def keep_freed_memory(mmap_threshold_bytes: int = 32 * 1024 * 1024,
                      trim_threshold_bytes: int = -1) -> bool:
    """Apply the setting once per process; True when glibc took it (see the module docstring).
    32 MiB is glibc's largest allowed mmap threshold on 64-bit systems."""
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # a libc without mallopt (musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold_bytes))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold_bytes)))
    return _applied
