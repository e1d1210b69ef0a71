"""Counters of the adapter cache, kept plain (no torch, no metrics library) so the metrics module can
read a snapshot and export it however it likes."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

RECENT_SAMPLES = 1024  # latency samples kept for percentiles


@dataclass
class Latency:
    """Durations in seconds: last, running sum and count, and the most recent samples."""

    last: float | None = None
    total: float = 0.0
    count: int = 0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_SAMPLES))

    def add(self, seconds: float) -> None:
        self.last = seconds
        self.total += seconds
        self.count += 1
        self.recent.append(seconds)

    def snapshot(self) -> dict:
        ordered = sorted(self.recent)

        def pct(q: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

        return {
            "last": self.last,
            "sum": self.total,
            "count": self.count,
            "p50": pct(0.50),
            "p99": pct(0.99),
            "recent": list(self.recent),
        }


@dataclass
class CacheCounters:
    """Monotonic counters. A device miss is a request_load for an adapter not on the device (the
    scheduler asks once per wait, not once per step); a device hit is a slot_of that found a slot."""

    device_hits: int = 0
    device_misses: int = 0
    device_evictions: int = 0
    host_hits: int = 0
    host_misses: int = 0
    host_evictions: int = 0
    loads: int = 0  # background loads started (disk or Hub -> host)
    load_failures: int = 0
    load_joins: int = 0  # requests that found a load of the same adapter in flight
    load_seconds: Latency = field(default_factory=Latency)  # resolve + read + validate, to host tier
    install_seconds: Latency = field(default_factory=Latency)  # host tier -> device slot write

    def snapshot(
        self,
        *,
        device_resident: int,
        device_bytes: int,
        num_slots: int,
        host_resident: int,
        host_bytes: int,
        host_bytes_budget: int,
        max_host_adapters: int,
        **gauges: int,
    ) -> dict:
        return {
            "device": {
                "hits": self.device_hits,
                "misses": self.device_misses,
                "evictions": self.device_evictions,
                "resident": device_resident,
                "bytes": device_bytes,
                "slots": num_slots,
            },
            "host": {
                "hits": self.host_hits,
                "misses": self.host_misses,
                "evictions": self.host_evictions,
                "resident": host_resident,
                "bytes": host_bytes,
                "bytes_budget": host_bytes_budget,
                "max_adapters": max_host_adapters,
            },
            "loads": self.loads,
            "load_failures": self.load_failures,
            "load_joins": self.load_joins,
            "load_seconds": self.load_seconds.snapshot(),
            "install_seconds": self.install_seconds.snapshot(),
            **gauges,
        }
