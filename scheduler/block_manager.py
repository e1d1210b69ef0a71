"""Paged KV cache bookkeeping (pure Python): a pool of fixed-size blocks and a block table per sequence."""

from __future__ import annotations

from collections.abc import Iterable


class OutOfBlocks(Exception):
    pass


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._is_free = bytearray(b"\x01" * num_blocks)  # catches double frees in O(1)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        """Extra blocks a sequence holding `num_held` blocks needs to store `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._is_free[b] = 0
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return `blocks` to the pool and empty the list (so a second free of the same table is a no-op)."""
        for b in blocks:  # check all before changing anything
            if not 0 <= b < self.num_blocks or self._is_free[b] or blocks.count(b) > 1:
                raise ValueError(f"KV block {b} is not allocated (double free or foreign id)")
        for b in blocks:
            self._is_free[b] = 1
        self._free.extend(reversed(blocks))
        blocks.clear()

    def check(self, held: Iterable[list[int]]) -> None:
        """Raise AssertionError unless every block is in exactly one place: the free list or one of the
        `held` block tables (all tables in use). Cheap enough to run after every step in tests."""
        seen = bytearray(self.num_blocks)
        for b in [*self._free, *(b for table in held for b in table)]:
            if not 0 <= b < self.num_blocks:
                raise AssertionError(f"KV block id {b} out of range [0, {self.num_blocks})")
            if seen[b]:
                raise AssertionError(f"KV block {b} is both free and held, or held twice")
            seen[b] = 1
        if sum(seen) != self.num_blocks:
            lost = [b for b in range(self.num_blocks) if not seen[b]]
            raise AssertionError(f"KV blocks leaked (neither free nor held): {lost[:10]}")
        if sum(self._is_free) != len(self._free) or not all(self._is_free[b] for b in self._free):
            raise AssertionError("free flags out of sync with the free list")
