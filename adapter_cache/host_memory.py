"""Host memory for the host tier's adapter copies, recycled.

Every adapter the host tier takes needs buffers of its own (its host copy; the transposed copy for CPU
row tables): 10-20 MB for a rank-16 adapter of the default model. Memory the process never touched
costs a page fault per 4 KiB page on its first write, and in a VM the hypervisor must back the page
too; a guest that hands freed pages back to the host (free page reporting, as on Firecracker) pays
that again for memory it freed a moment ago. Measured on a 2-core VM: ~0.3 ms/MB for pages the guest
still had backed, ~3 ms/MB for the others, 30-60 ms of a rank-16 cold load, more than all its parsing,
casting and copying together.

HostMemory hands out populated buffers and keeps those the host tier lets go:
- A block is an anonymous memory map made with MAP_POPULATE (the kernel faults it in within the one
  call). take() views it through a memoryview; when the last tensor viewing it is freed (whoever held
  it: the host tier, an install) a weakref finalizer puts the block back on the free list instead of
  unmapping it. A block is never handed out while a tensor views it.
- take() reuses a free block of at least the size asked and at most MAX_WASTE more (best fit: host
  copies of one adapter shape have one size, so most reuse is exact; the host tier counts the size
  asked, and the bound keeps what the blocks really hold close to it), zeroed when asked; else it
  maps a new one.
- Free blocks are kept while all blocks (in use + free) stay within the byte budget (the host tier's:
  what the operator allows host copies to take); above it the oldest free blocks are unmapped.

Where anonymous maps cannot be populated (not Linux), take() returns torch.zeros and keeps nothing.
"""

from __future__ import annotations

import mmap
import threading
import weakref
from collections import deque
from dataclasses import dataclass

import torch

_PAGE = mmap.PAGESIZE
_FLAG_NAMES = ("MAP_PRIVATE", "MAP_ANONYMOUS", "MAP_POPULATE")
POOLED = all(hasattr(mmap, flag) for flag in _FLAG_NAMES)
MAP_FLAGS = sum(getattr(mmap, flag, 0) for flag in _FLAG_NAMES)


@dataclass
class HostMemoryStats:
    mapped_bytes: int = 0  # all blocks: in use + free
    free_bytes: int = 0
    fresh: int = 0  # take() that mapped a new block
    reused: int = 0  # take() served from the free list


class HostMemory:
    """Recycled, populated host buffers within a byte budget (see the module docstring). Thread-safe."""

    MAX_WASTE = 0.25  # a reused block is at most this much larger than asked

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError("budget_bytes must be >= 0")
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []  # oldest first
        # Blocks whose last view was freed: appended by finalizers, on any thread and possibly while
        # this thread holds _lock (so they never take it); moved to _free under the lock.
        self._returned: deque[mmap.mmap] = deque()
        self._mapped = 0
        self._closed = False
        self.counters = HostMemoryStats()

    def take(self, nbytes: int, zero: bool = True) -> torch.Tensor:
        """A 1-D uint8 CPU tensor of `nbytes` (zero-filled unless zero=False: then its contents are
        whatever a previous user left), backed by a block of its own until every view of it is freed."""
        if not POOLED or nbytes <= 0:
            return torch.zeros(max(0, nbytes), dtype=torch.uint8)
        size = -(-nbytes // _PAGE) * _PAGE
        with self._lock:
            if self._closed:
                return torch.zeros(nbytes, dtype=torch.uint8)
            self._collect()
            block = self._best_fit(size)
            dirty = block is not None  # a previous user wrote it
            if block is not None:
                self._free.remove(block)
                self.counters.reused += 1
            else:
                self.counters.fresh += 1
        if block is None:
            block = mmap.mmap(-1, size, flags=MAP_FLAGS)  # zero-filled, pages populated
            with self._lock:
                self._mapped += size
        view = memoryview(block)
        weakref.finalize(view, self._returned.append, block)
        t = torch.frombuffer(view, dtype=torch.uint8, count=nbytes)
        return t.zero_() if zero and dirty else t

    def stats(self) -> HostMemoryStats:
        with self._lock:
            self._collect()
            return HostMemoryStats(
                self._mapped,
                sum(len(b) for b in self._free),
                self.counters.fresh,
                self.counters.reused,
            )

    def trim(self) -> None:
        """Unmap every free block now (idle offload that drops the host tier: its memory goes back to
        the system)."""
        with self._lock:
            self._collect()
            for block in self._free:
                self._unmap(block)
            self._free.clear()

    def close(self) -> None:
        """trim(), and from now on keep nothing: blocks still viewed are unmapped when their last view
        is freed; take() returns plain torch memory."""
        with self._lock:
            self._closed = True
        self.trim()

    # ---- internals ---------------------------------------------------------------------------------
    def _collect(self) -> None:
        """(lock held) Move returned blocks to the free list; unmap the oldest free blocks while all
        blocks exceed the budget (all returned ones once closed)."""
        while self._returned:
            block = self._returned.popleft()
            if self._closed:
                self._unmap(block)
            else:
                self._free.append(block)
        while self._free and self._mapped > self.budget_bytes:
            self._unmap(self._free.pop(0))

    def _unmap(self, block: mmap.mmap) -> None:
        """(lock held) Stop counting `block` and unmap it (if something still exported it, which the
        finalizer order rules out, dropping our reference leaves the unmapping to its last user)."""
        self._mapped -= len(block)
        try:
            block.close()
        except BufferError:
            pass

    def _best_fit(self, size: int) -> mmap.mmap | None:
        fits = [b for b in self._free if size <= len(b) <= size * (1 + self.MAX_WASTE)]
        return min(fits, key=len, default=None)
