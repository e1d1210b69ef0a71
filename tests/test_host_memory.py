"""HostMemory (adapter_cache/host_memory.py): host-tier buffers recycled once every view of them is freed,
never while one is alive, within a byte budget; and the adapter cache's loads going through it."""

from __future__ import annotations

import gc

import pytest
import torch
from test_adapter_cache import NAMES, make_cache, settle, world  # noqa: F401  (world: a fixture)

import loraplex.adapter_cache.peft_format as peft_format
from loraplex.adapter_cache.host_memory import POOLED, HostMemory
from loraplex.adapter_cache.peft_format import load_peft_adapter

pytestmark = pytest.mark.skipif(not POOLED, reason="no populated anonymous maps (not Linux): nothing is pooled")

MIB = 2**20


def test_a_freed_buffer_is_reused_zeroed_and_a_viewed_one_never():
    mem = HostMemory(64 * MIB)
    t = mem.take(MIB + 100)
    assert t.dtype == torch.uint8 and t.numel() == MIB + 100 and not t.any()
    t.fill_(7)
    ptr = t.data_ptr()
    del t
    u = mem.take(MIB + 5)  # same page-rounded size class: the freed block, zeroed again
    assert u.data_ptr() == ptr and not u.any()
    kept = u[10:20].view(torch.int16)  # a view keeps the whole block in use
    kept.fill_(3)
    del u
    gc.collect()
    v = mem.take(MIB + 5)
    assert v.data_ptr() != ptr
    v.fill_(9)
    assert (kept == 3).all()  # never handed out while viewed
    del kept
    w = mem.take(MIB + 5)
    assert w.data_ptr() == ptr and not w.any()
    s = mem.stats()
    assert (s.fresh, s.reused) == (2, 2)


def test_zero_false_skips_the_fill_and_best_fit_wastes_at_most_a_quarter():
    mem = HostMemory(64 * MIB)
    small, big = mem.take(MIB), mem.take(4 * MIB)  # page-sized multiples: blocks of exactly these sizes
    small.fill_(1)
    big.fill_(2)
    small_ptr, big_ptr = small.data_ptr(), big.data_ptr()
    del small, big
    mid = mem.take(3 * MIB)  # 1 MiB is too small, 4 MiB a third more: a new block
    assert mid.data_ptr() not in (small_ptr, big_ptr)
    reused = mem.take(4 * MIB - 100_000, zero=False)  # the 4 MiB block; its old bytes are left as they were
    assert reused.data_ptr() == big_ptr and (reused == 2).all()


def test_free_blocks_are_kept_within_the_budget_then_trimmed():
    mem = HostMemory(3 * MIB)
    bufs = [mem.take(MIB) for _ in range(5)]  # in use may exceed the budget: it only bounds what is kept
    assert mem.stats().mapped_bytes == 5 * MIB
    del bufs
    s = mem.stats()
    assert s.mapped_bytes == s.free_bytes == 3 * MIB
    keep = mem.take(MIB)
    assert mem.stats().free_bytes == 2 * MIB
    mem.trim()
    assert mem.stats().free_bytes == 0 and mem.stats().mapped_bytes == MIB
    del keep
    mem.close()
    assert mem.stats().mapped_bytes == 0
    after = mem.take(MIB)  # closed: plain memory, nothing kept
    assert not after.any() and mem.stats().mapped_bytes == 0


def test_cache_reloads_reuse_host_memory_with_exact_weights(world, monkeypatch):  # noqa: F811
    """Unload, then load another adapter of the same shape: its host copy lands in the freed copy's
    block, and equals a parse of its own file; a copy still referenced (as by a slot write in flight)
    keeps its block and its values."""
    monkeypatch.setattr(peft_format, "HOST_MMAP_MIN_BYTES", 0)  # the tiny model's copies are small
    _, _, adapters, shapes = world
    cache, device = make_cache(world, num_slots=2, max_host=3)
    try:
        first, second = NAMES[0], NAMES[6]  # both all-linear at rank 4: host copies of one size
        third = first  # read from disk again after its unload
        cache.load(first, wait=20.0)
        settle(cache)
        assert cache.slot_of(first) is not None
        held = device.slots[cache.slot_of(first)]  # what the slot write got: the host copy itself
        before = {k: (a.clone(), b.clone()) for k, (a, b) in held.items()}
        cache.unload(first)
        cache.load(second, wait=20.0)  # `held` still views first's copy: a new block
        s = cache.host_memory.stats()
        assert s.reused == 0
        for k, (a, b) in held.items():
            assert torch.equal(a, before[k][0]) and torch.equal(b, before[k][1])
        del held, before, a, b
        device.slots.clear()
        gc.collect()
        cache.unload(second)
        cache.load(third, wait=20.0)
        assert cache.host_memory.stats().reused >= 1
        got = cache._host.get(third).weights
        want = load_peft_adapter(third, adapters / third, shapes, 16, torch.float32).weights
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k][0], want[k][0]) and torch.equal(got[k][1], want[k][1])
        # idle offload that drops the host tier gives the kept memory back to the system too
        cache.load(second, wait=20.0)
        del got, want
        device.slots.clear()
        cache.release_device(drop_host=True)
        gc.collect()
        cache.host_memory.trim()  # blocks whose last view went after release_device's own trim
        assert cache.stats()["host_free_bytes"] == 0 and cache.host_memory.stats().mapped_bytes == 0
    finally:
        cache.close()
