"""The two in-memory tiers as plain bookkeeping (no locks, no threads, no device writes): AdapterCache
owns one of each and guards them with its lock."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .peft_format import LoraAdapter


class HostTier:
    """Parsed adapters in host memory, least recently used first, bounded by a count and a byte
    budget. It feeds device slots without touching the disk again."""

    def __init__(self, max_adapters: int, bytes_budget: int) -> None:
        self.max_adapters, self.bytes_budget = max_adapters, bytes_budget
        self._entries: OrderedDict[str, LoraAdapter] = OrderedDict()
        self.num_bytes = 0

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> LoraAdapter | None:
        return self._entries.get(name)

    def touch(self, name: str) -> None:
        self._entries.move_to_end(name)

    def pop(self, name: str) -> LoraAdapter | None:
        adapter = self._entries.pop(name, None)
        if adapter is not None:
            self.num_bytes -= adapter.num_bytes
        return adapter

    def put(self, name: str, adapter: LoraAdapter, spare: Callable[[str], bool]) -> list[str]:
        """Insert `name` as most recently used, then evict least recently used entries while either bound
        is exceeded; entries for which `spare(name)` is true go last. The new entry always stays, even
        alone over the byte budget, since someone is waiting for it. Returns the evicted names."""
        self.pop(name)
        self._entries[name] = adapter
        self.num_bytes += adapter.num_bytes
        return self._evict(name, spare)

    def _evict(self, keep: str, spare: Callable[[str], bool]) -> list[str]:
        evicted = []
        while len(self._entries) > self.max_adapters or self.num_bytes > self.bytes_budget:
            others = [n for n in self._entries if n != keep]
            if not others:
                break
            victim = next((n for n in others if not spare(n)), others[0])
            self.pop(victim)
            evicted.append(victim)
        return evicted


class SlotTable:
    """Device slots: which adapter holds which slot (least recently used first), free slots, pin counts
    of running sequences, and adapters held by an explicit load(pin=True)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self._resident: OrderedDict[str, int] = OrderedDict()
        self._meta: dict[str, tuple[int, int]] = {}  # name -> (rank, bytes) of the adapter in the slot
        self._free: list[int] = list(range(num_slots))
        self.pins: dict[str, int] = {}
        self.held: set[str] = set()

    def __contains__(self, name: object) -> bool:
        return name in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def names(self) -> list[str]:
        return list(self._resident)

    @property
    def num_bytes(self) -> int:
        return sum(b for _, b in self._meta.values())

    def meta(self, name: str) -> tuple[int, int] | None:
        return self._meta.get(name)

    def lookup(self, name: str, touch: bool = True) -> int | None:
        slot = self._resident.get(name)
        if slot is not None and touch:
            self._resident.move_to_end(name)
        return slot

    def pin(self, name: str) -> None:
        if name not in self._resident:
            raise ValueError(f"adapter {name!r} is not resident")
        self.pins[name] = self.pins.get(name, 0) + 1

    def unpin(self, name: str) -> None:
        if self.pins.get(name, 0) < 1:
            raise ValueError(f"adapter {name!r} is not pinned")
        self.pins[name] -= 1
        if not self.pins[name]:
            del self.pins[name]

    def take(self) -> tuple[int, str | None] | None:
        """Reserve a slot: the lowest free one, else the least recently used one that no running
        sequence pins and no load(pin=True) holds (its adapter leaves the device; returned as the
        second item). None when every slot is pinned, held or reserved."""
        if self._free:
            self._free.sort()
            return self._free.pop(0), None
        for name, slot in self._resident.items():
            if not self.pins.get(name) and name not in self.held:
                self.release(name)
                self._free.remove(slot)
                return slot, name
        return None

    def assign(self, name: str, slot: int, rank: int, num_bytes: int) -> None:
        """Make a reserved slot visible as holding `name` (most recently used)."""
        self._resident[name] = slot
        self._meta[name] = (rank, num_bytes)

    def release(self, name: str) -> int | None:
        """Drop `name` from the device; its slot becomes free. Returns the slot, or None."""
        slot = self._resident.pop(name, None)
        if slot is not None:
            self._meta.pop(name, None)
            self._free.append(slot)
        return slot

    def give_back(self, slot: int) -> None:
        """Return a slot reserved by take() that was never assigned."""
        self._free.append(slot)
