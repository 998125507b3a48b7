"""CPU settings for inference: torch threads and how the C allocator keeps freed memory.

**Threads.** Convolutions gain little from a second hyper-thread on one core and lose a lot
when OpenMP threads outnumber the cores they may run on, so the default is one thread per
physical core this process may use; ``HISTOLENS_THREADS=N`` (or an explicit ``threads``)
overrides it, e.g. ``1`` on a machine shared with other jobs.

**Allocator.** glibc returns every block above 32 MB (``M_MMAP_THRESHOLD``'s ceiling) to the
system when it is freed, so each large activation of the next model call is fresh memory the
kernel must fault in and zero page by page. Measured here (AMD EPYC Zen 5, 1 thread,
``benchmarks/inference_speed.py``): that is about half the model time of a 1024 px input.
:func:`keep_freed_memory` raises the thresholds so freed blocks are reused; the resident
memory then stays near the peak of one model call instead of falling between calls.
``HISTOLENS_KEEP_MEMORY=0`` turns it off. No torch import at module level.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

__all__ = [
    "THREADS_ENV",
    "configure_cpu",
    "default_threads",
    "physical_cores",
]

#: Environment variable overriding the default thread count.
THREADS_ENV = "HISTOLENS_THREADS"
#: Set to ``0`` to leave the C allocator's settings alone.
KEEP_MEMORY_ENV = "HISTOLENS_KEEP_MEMORY"

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
#: Blocks up to this size are served from (and freed back to) the heap, not fresh mappings.
_KEEP_BYTES = 1 << 30
_KEPT: list[bool] = []


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once).

    Reads the Linux CPU topology; elsewhere (or when it is unreadable) every allowed
    logical CPU counts as a core.
    """
    allowed = _allowed_cpus()
    cores = set()
    for cpu in allowed:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return max(1, len(allowed))
        cores.add((package, core))
    return max(1, len(cores))


def default_threads() -> int:
    """``$HISTOLENS_THREADS`` if set (a positive integer), else :func:`physical_cores`."""
    raw = os.environ.get(THREADS_ENV, "").strip()
    if not raw:
        return physical_cores()
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n < 1:
        msg = (
            f"{THREADS_ENV}={raw!r} is not a positive whole number of threads; "
            f"unset it or give e.g. {THREADS_ENV}=2"
        )
        raise ValueError(msg)
    return n


def keep_freed_memory() -> bool:
    """Let glibc reuse freed large blocks instead of unmapping them (see the module notes).

    Also limits malloc to one arena, so a worker thread's tensors come from the same heap
    (a thread arena serves blocks above 64 MB by fresh mappings whatever the threshold).
    Returns True when the settings were applied (glibc only; once per process).
    """
    if _KEPT:
        return _KEPT[0]
    ok = False
    if sys.platform.startswith("linux") and os.environ.get(KEEP_MEMORY_ENV, "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            mallopt = libc.mallopt
        except (OSError, AttributeError):  # musl or another C library: leave it
            mallopt = None
        if mallopt is not None:
            ok = bool(
                mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
                and mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
                and mallopt(_M_ARENA_MAX, 1)
            )
    _KEPT.append(ok)
    return ok


def configure_cpu(threads: int | None = None) -> int:
    """Set torch's CPU threads (default :func:`default_threads`) and :func:`keep_freed_memory`.

    Call it once, early, from the main thread (before worker threads allocate). Returns the
    thread count.
    """
    n = default_threads() if threads is None else int(threads)
    if n < 1:
        msg = f"threads must be a positive whole number, got {threads!r}"
        raise ValueError(msg)
    keep_freed_memory()
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
