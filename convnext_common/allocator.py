"""The process's C memory allocator: what its environment tells it, and glibc's
malloc thresholds raised at run time (`raise_malloc_thresholds`).

glibc's malloc hands large freed blocks back to the kernel: a block above its
moving mmap threshold (at most 32 MiB) is unmapped when freed, and free memory at
the top of the heap above its trim threshold is trimmed. A process that frees and
allocates the same large buffers over and over (PyTorch's CPU tensors, one pass
after another) then page-faults them in again on every pass. Raising both
thresholds keeps freed memory in the process for the next allocation: the
process's resident size stays at its high-water mark instead of shrinking.
"""

from __future__ import annotations

import ctypes
import os

# what configures the allocator from a process's environment: glibc's malloc
# variables and tunables, and an allocator preloaded in its place (jemalloc, ...)
ALLOCATOR_ENV_PREFIXES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD")

# glibc's <malloc.h>: mallopt's parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# the largest value mallopt takes (an int): an allocation larger than this is
# mapped on its own, as it would be anyway
MAX_THRESHOLD_BYTES = 2**31 - 1


def allocator_env(environ=None) -> dict:
    """{name: value} of the variables in `environ` (default: this process's) that
    configure the allocator, sorted by name; empty where none does."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in sorted(environ.items()) if k.startswith(ALLOCATOR_ENV_PREFIXES)}


def glibc_malloc_in_use() -> bool:
    """Whether this process's malloc is glibc's: glibc is loaded and no other
    allocator was preloaded in its place."""
    if os.environ.get("LD_PRELOAD"):
        return False
    return _glibc() is not None


def _glibc():
    """The loaded C library, where it is glibc (it has `gnu_get_libc_version`);
    else None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def raise_malloc_thresholds(nbytes: int = MAX_THRESHOLD_BYTES) -> None:
    """Set glibc's mmap and trim thresholds to `nbytes` for this process (both:
    setting one switches the other's moving threshold off, which maps and unmaps
    every block above 128 KiB). Raises OSError where glibc refuses or is absent."""
    libc = _glibc()
    if libc is None:
        raise OSError("this process's C library is not glibc")
    thresholds = (("M_MMAP_THRESHOLD", _M_MMAP_THRESHOLD), ("M_TRIM_THRESHOLD", _M_TRIM_THRESHOLD))
    for name, parameter in thresholds:
        if _mallopt(libc, parameter, nbytes) != 1:
            raise OSError(f"glibc's mallopt refused {name}={nbytes}")


def _mallopt(libc, parameter: int, value: int) -> int:
    """glibc's `mallopt(parameter, value)`: 1 where it was set, 0 where refused."""
    return libc.mallopt(ctypes.c_int(parameter), ctypes.c_int(value))
