"""Host memory for CPU training: freed blocks kept in the process for the next step.

A training step on a CPU allocates the same large tensors every step (a small LLM's logits, the vocabulary
matrix's bf16 copy under autocast, its dense gradient). glibc's malloc serves each allocation above its
mmap threshold with a fresh ``mmap`` and returns it with ``munmap`` when freed, so every step touches
hundreds of MB of new pages and the kernel zeroes each one: on the demo's 2-core machine a third of a
replay step's time went to page faults (benchmarks/bench_allocator.py). Telling malloc never to ``mmap``
(``M_MMAP_MAX = 0``) and never to trim the heap (``M_TRIM_THRESHOLD`` at its maximum) keeps those pages
mapped and reused. Numbers are unchanged (only where the bytes live changes); the cost is that the process
keeps its peak heap until it exits (3-9% more peak resident memory on the demo's steps).

The `gere` command does this for ``run``, ``sweep``, ``demo`` and ``extract`` when no CUDA device is
present, on glibc only; ``GERE_CPU_MALLOC=system`` leaves malloc as it is. A library user gets the same
with `keep_freed_memory()` at the top of a training script, or by starting Python with
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment (glibc's own variables).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from gere.errors import GeReError, shown

logger = logging.getLogger(__name__)

#: Environment variable: ``keep`` (the default) or ``system`` (leave glibc's malloc settings alone).
ENV = "GERE_CPU_MALLOC"
CHOICES = ("keep", "system")

# mallopt parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: The largest trim threshold mallopt takes (an int): in effect, never trim.
NEVER_TRIM = 2**31 - 1


def _glibc():
    """glibc's C library, or None (macOS, musl, Windows: their allocators do not take these settings)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (no mmap for large blocks, no trimming); True when
    it took both settings, False where the C library is not glibc or refused one."""
    libc = _glibc()
    if libc is None:
        logger.info("host allocator left as it is: the C library is not glibc")
        return False
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    done = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
    logger.info("host allocator: freed memory %s", "kept for reuse" if done else "settings refused by malloc")
    return done


def choice(environ=None) -> str:
    """``GERE_CPU_MALLOC``'s value (``keep`` when unset); anything else is an error naming the choices."""
    value = (environ if environ is not None else os.environ).get(ENV, "keep").strip().lower() or "keep"
    if value not in CHOICES:
        raise GeReError(f"{ENV}={shown(value)} is not valid: use keep (the default) or system")
    return value


def for_cpu_training(environ=None) -> bool:
    """What the `gere` command calls before it trains or extracts: `keep_freed_memory` when
    ``GERE_CPU_MALLOC`` is ``keep`` and no CUDA device is present (on a GPU machine host memory is not where
    the steps' tensors live, and a process that kept its peak heap would hold host memory for nothing)."""
    if choice(environ) != "keep":
        return False
    import torch

    if torch.cuda.is_available():
        return False
    return keep_freed_memory()
