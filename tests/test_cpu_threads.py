"""Background threads keep their torch ops off OpenMP (cpu_threads.limit_this_thread): a loader thread
that runs a large torch op must not get an OpenMP team of its own (more OpenMP threads than CPUs make
every parallel op of the stepping thread sleep and wake at its barriers: ~2x slower decode steps)."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from loraplex.adapter_cache.cache import AdapterCache
from loraplex.adapter_cache.peft_format import BaseShapes
from loraplex.adapter_cache.sources import AdapterSources
from loraplex.cpu_threads import limit_this_thread

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or torch.get_num_threads() < 2
    or "OpenMP" not in torch.__config__.parallel_info(),
    reason="needs Linux, ATen's OpenMP backend and at least 2 intra-op threads",
)


def _thread_ids() -> set[str]:
    return set(os.listdir("/proc/self/task"))


def _large_op() -> float:
    return torch.ones(1 << 22).add_(1).sum().item()  # far above ATen's grain size: parallel when allowed


def _team_growth(pool: ThreadPoolExecutor) -> tuple[int, int]:
    """(the pool thread's torch thread count, threads its large op started). New thread ids, not a count:
    threads of earlier tests' closed pools may exit meanwhile."""
    n = pool.submit(torch.get_num_threads).result()  # the pool thread exists from here on
    before = _thread_ids()
    pool.submit(_large_op).result()
    return n, len(_thread_ids() - before)


def test_a_plain_thread_gets_a_team_and_a_limited_one_does_not():
    """The premise (a plain thread's large op starts OpenMP threads) and the fix (none after
    limit_this_thread); the calling thread keeps its own thread count."""
    main_threads = torch.get_num_threads()
    with ThreadPoolExecutor(1) as plain:
        n, grown = _team_growth(plain)
        assert n == main_threads and grown > 0
    with ThreadPoolExecutor(1, initializer=limit_this_thread) as limited:
        n, grown = _team_growth(limited)
        assert n == 1 and grown == 0
    assert torch.get_num_threads() == main_threads


def test_adapter_loader_threads_start_no_openmp_team():
    cache = AdapterCache(
        AdapterSources(named={}), BaseShapes("none", 1, {}), 8, torch.float32, 1, 1, 1 << 20,
        lambda slot, weights, rank: None, lambda slot: None,
    )  # fmt: skip
    try:
        n, grown = _team_growth(cache._pool)
        assert n == 1 and grown == 0
    finally:
        cache.close()
