"""Paged KV cache bookkeeping (pure Python): a pool of fixed-size blocks and a block table per sequence.

Blocks are reference counted so that sequences can share a cached prefix. Every block is in exactly one
of three places:

- *free*: never used, or released without a key; its contents mean nothing;
- *cached*: released (reference count 0) but keyed (scheduler/prefix_cache.py): its K/V may serve a
  later sequence with the same prefix, until allocation needs its space (least recently used first);
- *used*: held by one or more block tables (reference count >= 1), keyed or not.

`num_free` counts free + cached blocks: everything an allocation may take.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
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
        self._refs = [0] * num_blocks
        self._cached: OrderedDict[int, None] = OrderedDict()  # keyed, unreferenced; oldest release first
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self.num_evictions = 0  # cached blocks whose key was dropped to make room

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never used or unkeyed ones, plus cached ones (evicted on demand)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Keyed blocks, held or not: the prefixes a new sequence could reuse now."""
        return len(self._block_of)

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        """Extra blocks a sequence holding `num_held` blocks needs to store `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """`n` blocks with reference count 1: never-used (or unkeyed) ones first, then the least recently
        released cached ones, whose keys are dropped (evicted)."""
        if n > self.num_free:
            raise OutOfBlocks(f"need {n} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._cached.popitem(last=False)
                del self._block_of[self._key_of.pop(b)]
                self.num_evictions += 1
            self._refs[b] = 1
            blocks.append(b)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drop one reference to each of `blocks` and empty the list (so a second free of the same table
        is a no-op). A block nobody holds any more goes to the cache if keyed, else to the free list."""
        drops = Counter(blocks)
        for b, n in drops.items():  # check all before changing anything
            if not 0 <= b < self.num_blocks or self._refs[b] < n:
                raise ValueError(f"KV block {b} is not allocated (double free or foreign id)")
        for b in reversed(blocks):  # reversed: a table's first blocks are the last to be evicted
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._key_of:
                    self._cached[b] = None
                else:
                    self._free.append(b)
        blocks.clear()

    # ---- prefix cache -------------------------------------------------------------------------------
    def lookup(self, keys: Iterable[bytes]) -> list[int]:
        """Blocks holding the longest run of `keys` from the first (the cached prefix); takes nothing."""
        found = []
        for key in keys:
            b = self._block_of.get(key)
            if b is None:
                break
            found.append(b)
        return found

    def num_idle(self, blocks: Iterable[int]) -> int:
        """How many of `blocks` (distinct) sit in the cache unreferenced: acquiring them shrinks num_free."""
        return sum(1 for b in set(blocks) if self._refs[b] == 0)

    def acquire(self, blocks: list[int]) -> None:
        """One more reference to each of `blocks` (cached ones found by lookup)."""
        for b in blocks:
            if b not in self._key_of:
                raise ValueError(f"KV block {b} holds no cached prefix")
        for b in blocks:
            if self._refs[b] == 0:
                del self._cached[b]
            self._refs[b] += 1

    def publish(self, block: int, key: bytes) -> bool:
        """Key a held block whose K/V are fully computed. False (and nothing changes) when the block is
        already keyed or another block already holds this key (two sequences computed the same prefix
        at once: the first one serves it)."""
        if self._refs[block] < 1:
            raise ValueError(f"KV block {block} is not held")
        if block in self._key_of or key in self._block_of:
            return False
        self._key_of[block] = key
        self._block_of[key] = block
        return True

    def clear_cached(self) -> None:
        """Forget every key (the KV cache's contents are gone, e.g. released by an idle offload): idle
        cached blocks become free, held ones are freed unkeyed when released."""
        self._free.extend(reversed(self._cached))
        self._cached.clear()
        self._key_of.clear()
        self._block_of.clear()

    def check(self, held: Iterable[list[int]]) -> None:
        """Raise AssertionError unless the pool is consistent with the `held` block tables (all tables in
        use): each block's reference count equals how often the tables hold it; free + cached + used ==
        pool; free blocks carry no key, cached ones do; no key names two blocks. Cheap enough to run
        after every step in tests."""
        counts: Counter[int] = Counter()
        for table in held:
            counts.update(table)
        for b in counts:
            if not 0 <= b < self.num_blocks:
                raise AssertionError(f"KV block id {b} out of range [0, {self.num_blocks})")
        for b in range(self.num_blocks):
            refs, held_by = self._refs[b], counts.get(b, 0)
            if refs > held_by:
                raise AssertionError(f"KV block {b} leaked: reference count {refs}, held {held_by} times")
            if refs < held_by:
                raise AssertionError(f"KV block {b} is held {held_by} times (twice, or free and held) but counted {refs}")
        free, cached = set(self._free), set(self._cached)
        used = {b for b in range(self.num_blocks) if self._refs[b] > 0}
        if len(free) != len(self._free):
            raise AssertionError("a KV block is on the free list twice")
        if free & cached or free & used or cached & used:
            raise AssertionError("a KV block is in two of free / cached / used")
        if len(free) + len(cached) + len(used) != self.num_blocks:
            lost = sorted(set(range(self.num_blocks)) - free - cached - used)
            raise AssertionError(f"KV blocks leaked (neither free, cached nor used): {lost[:10]}")
        if any(b in self._key_of for b in free) or any(b not in self._key_of for b in cached):
            raise AssertionError("free blocks must carry no key and cached blocks must")
        if len(self._block_of) != len(self._key_of) or any(
            self._block_of.get(k) != b for b, k in self._key_of.items()
        ):
            raise AssertionError("a prefix key names two blocks (or the key maps are out of sync)")
