"""Keep background threads' torch ops off OpenMP, so they cannot slow the thread that steps the model.

With ATen's OpenMP backend, the first torch op large enough to run in parallel on a thread gives that
thread its own OpenMP team (get_num_threads() - 1 more threads, kept while the thread lives). Once the
process holds more OpenMP-managed threads than CPUs, the OpenMP runtime (libgomp) stops spin-waiting
at its barriers and sleeps instead, so every parallel op of the stepping thread pays for waking its team:
a background adapter loader that once cast or transposed a large tensor made every later decode step
~2x slower, base-only included (measured on a 2-core machine: a packed bf16 linear 17 -> 29 ms per 200
calls, and its CPU time no longer twice its wall time). A background thread calls limit_this_thread()
first thing (e.g. as its ThreadPoolExecutor initializer): its torch ops then run on it alone and it
never gets a team. The setting is the thread's own OpenMP one: no other thread, and none started later,
is affected (torch.set_num_threads would also change the process-wide default that new threads take).
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger(__name__)

_RUNTIMES = ("libgomp", "libiomp", "libomp")  # GNU, Intel and LLVM OpenMP runtimes


@functools.cache
def _openmp_runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process (found in /proc/self/maps: Linux), empty when torch
    does not parallelize with OpenMP or they cannot be found (then limit_this_thread does nothing)."""
    if "OpenMP" not in torch.__config__.parallel_info():
        return ()
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if any(r in line.rsplit("/", 1)[-1] for r in _RUNTIMES)})
    except OSError:
        return ()
    libs = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same library, not a second copy
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            libs.append(lib)
        except (OSError, AttributeError):
            continue
    return tuple(libs)


def limit_this_thread() -> None:
    """Make the calling thread's torch ops run on it alone (its OpenMP team size 1). For background
    threads only: never call it on the thread that steps the model."""
    # ATen sets a thread's OpenMP team size on the thread's first parallel use (lazily): trigger that
    # now, or it would overwrite the setting below.
    torch.get_num_threads()
    for lib in _openmp_runtimes():
        lib.omp_set_num_threads(1)
