"""AdapterCache: disk/Hub -> host tier (CPU, LRU) -> device slots (LRU, pinned while used).

It implements the scheduler's `Residency` protocol. The scheduler decides who runs; the cache only
answers "which slot holds adapter X" and moves adapters between tiers:

    request_load(x)   scheduler (under its lock): x is wanted. Host hit -> queued for install; else ONE
                      background job resolves the source and parses + validates it into the host tier.
    install_ready()   engine step thread, before each schedule(): writes queued adapters into free or
                      least-recently-used unpinned slots. Device writes happen only here, between
                      steps, because a forward pass may be reading the slot buffers at any other time.
    slot_of/pin/unpin scheduler: residency lookups and running-sequence pin counts.

A failed load is remembered for `failure_ttl` seconds: requests fail fast with the cause and nothing
is re-read; after the TTL the next request reads the disk again, so a fixed copy is picked up.

Locking: one lock guards all state. Nothing slow or re-entrant runs under it: sources.resolve,
load_peft_adapter, write_slot, clear_slot, on_failure and on_ready are all called without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import AdapterError, AdapterNotFoundError
from .peft_format import BaseShapes, LoraAdapter, load_peft_adapter
from .sources import AdapterSources
from .stats import CacheCounters

log = logging.getLogger(__name__)

WriteSlot = Callable[[int, dict, int], None]  # (slot, weights {(layer, module): (A, B)}, rank)


class AdapterCache:
    def __init__(
        self,
        sources: AdapterSources,
        base: BaseShapes,
        max_rank: int,
        dtype: torch.dtype,
        num_slots: int,
        max_host_adapters: int,
        host_bytes_budget: int,
        write_slot: WriteSlot,
        clear_slot: Callable[[int], None] | None = None,
        load_workers: int = 2,
        failure_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_failure: Callable[[str, str], None] | None = None,
        on_ready: Callable[[str], None] | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        if num_slots < 1 or max_host_adapters < 1 or load_workers < 1:
            raise ValueError("num_slots, max_host_adapters and load_workers must be >= 1")
        if host_bytes_budget < 0 or failure_ttl < 0:
            raise ValueError("host_bytes_budget and failure_ttl must be >= 0")
        self.sources, self.base, self.max_rank, self.dtype = sources, base, max_rank, dtype
        self.num_slots = num_slots
        self.max_host_adapters, self.host_bytes_budget = max_host_adapters, host_bytes_budget
        self.failure_ttl = failure_ttl
        self._write_slot, self._clear_slot = write_slot, clear_slot
        self._on_failure, self._on_ready = on_failure, on_ready
        self._clock = clock
        # Page-locked host copies make host -> GPU copies fast and asynchronous-capable.
        self._pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._pool = ThreadPoolExecutor(max_workers=load_workers, thread_name_prefix="adapter-load")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when a load finishes
        self._closed = False

        # host tier: name -> adapter, least recently used first
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._host_bytes = 0
        # device tier: name -> slot, least recently used first; (rank, bytes) of each resident
        self._device: OrderedDict[str, int] = OrderedDict()
        self._device_meta: dict[str, tuple[int, int]] = {}
        self._free_slots: list[int] = list(range(num_slots))
        self._installing: dict[str, int] = {}  # being written by install_ready, not yet visible
        self._pins: dict[str, int] = {}  # running sequences per adapter
        self._held: set[str] = set()  # load(pin=True): never evicted until unload
        self._wanted: OrderedDict[str, None] = OrderedDict()  # install queue, first asked first
        self._loading: dict[str, object] = {}  # name -> token of the live load job
        self._failed: dict[str, tuple[AdapterError, float]] = {}  # name -> (error, clock at failure)
        self._notify: list[tuple[str, str]] = []  # failures to report from install_ready
        self._clears: list[int] = []  # freed slots to zero from install_ready
        self.counters = CacheCounters()

    # ---- Residency protocol (called by the scheduler under its lock: never call back into it) ------
    def slot_of(self, adapter: str) -> int | None:
        """Device slot of `adapter` if resident (and mark it recently used), else None."""
        with self._lock:
            slot = self._device.get(adapter)
            if slot is not None:
                self._device.move_to_end(adapter)
                self.counters.device_hits += 1
            return slot

    def request_load(self, adapter: str) -> None:
        """Make `adapter` resident soon (idempotent). A failure within the TTL is reported again (from
        install_ready, since the caller holds the scheduler lock) without reading anything."""
        with self._lock:
            self._want(adapter, notify_failure=True)

    def pin(self, adapter: str) -> None:
        with self._lock:
            if adapter not in self._device:
                raise ValueError(f"adapter {adapter!r} is not resident")
            self._pins[adapter] = self._pins.get(adapter, 0) + 1

    def unpin(self, adapter: str) -> None:
        with self._lock:
            if self._pins.get(adapter, 0) < 1:
                raise ValueError(f"adapter {adapter!r} is not pinned")
            self._pins[adapter] -= 1
            if not self._pins[adapter]:
                del self._pins[adapter]

    # ---- engine step thread -------------------------------------------------------------------------
    def install_ready(self, max_installs: int | None = None) -> list[str]:
        """Write wanted host-tier adapters into device slots; returns the names installed. Call it from
        the step thread between steps (never while a forward pass runs). An adapter waits when every
        slot is pinned. Also zeroes slots freed by unload and reports queued fast failures."""
        plan: list[tuple[str, int, LoraAdapter]] = []
        with self._lock:
            clears, self._clears = self._clears, []
            notify, self._notify = self._notify, []
            for name in list(self._wanted):
                if max_installs is not None and len(plan) >= max_installs:
                    break
                if name in self._device or name in self._installing:
                    del self._wanted[name]
                    continue
                adapter = self._host.get(name)
                if adapter is None:
                    if name not in self._loading:
                        del self._wanted[name]  # dropped from host; a later request_load asks again
                    continue
                slot = self._take_slot()
                if slot is None:
                    break  # every slot is pinned or being filled: wait for an unpin
                del self._wanted[name]
                self._host.move_to_end(name)
                self._installing[name] = slot
                plan.append((name, slot, adapter))
        for slot in clears:
            if self._clear_slot is not None:
                self._clear_slot(slot)
        for name, message in notify:
            self._report_failure(name, message)
        installed = []
        for name, slot, adapter in plan:
            t0 = time.perf_counter()
            try:
                self._write_slot(slot, adapter.weights, adapter.rank)
            except Exception as exc:  # a broken write fails this adapter only
                log.exception("writing adapter %r into slot %d failed", name, slot)
                error = AdapterError(name, f"writing to device slot {slot} failed: {type(exc).__name__}: {exc}")
                with self._lock:
                    self._installing.pop(name, None)
                    self._free_slots.append(slot)
                    self._failed[name] = (error, self._clock())
                    self.counters.load_failures += 1
                self._report_failure(name, error.message)
                continue
            with self._lock:
                if self._installing.pop(name, None) is None:  # unloaded meanwhile
                    self._free_slots.append(slot)
                    continue
                self._device[name] = slot
                self._device_meta[name] = (adapter.rank, adapter.num_bytes)
                self.counters.install_seconds.add(time.perf_counter() - t0)
                self._changed.notify_all()
            installed.append(name)
        return installed

    # ---- runtime control (server) -------------------------------------------------------------------
    def load(self, name: str, pin: bool = False, wait: float | None = None) -> dict:
        """Load `name` (for the load endpoint and --preload). With `pin` its slot is never evicted until
        unload(name). With `wait`, block up to that many seconds until it is on host (validated) or
        failed; the device write follows at the next install_ready(). Returns its list() row; raises
        AdapterNotFoundError for unknown names and the load error when it failed."""
        if not self.known(name):
            raise AdapterNotFoundError(name, "unknown adapter")
        deadline = None if wait is None else time.monotonic() + wait
        with self._lock:
            error = self._fresh_failure(name)
            if error is not None:
                raise error
            if pin and name not in self._held:
                if len(self._held) >= self.num_slots:
                    raise AdapterError(
                        name, f"cannot pin: all {self.num_slots} device slots are already pinned by load", code="adapter_pin_limit"
                    )
                self._held.add(name)
            self._want(name, notify_failure=False)
            while deadline is not None and name in self._loading:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            error = self._fresh_failure(name)
            if error is not None:
                self._held.discard(name)
                raise error
            return self._row(name)

    def unload(self, name: str) -> bool:
        """Drop `name` from the device and host tiers (and its pin by load). Refused while running
        requests use it: unload is not deferred, retry once they finish. False when nothing was held."""
        with self._lock:
            running = self._pins.get(name, 0)
            if running:
                raise AdapterError(
                    name,
                    f"cannot unload: {running} running request(s) use it; it was left loaded, retry after they finish",
                    code="adapter_in_use",
                )
            found = name in self._held or name in self._failed or name in self._wanted
            self._held.discard(name)
            self._failed.pop(name, None)
            self._wanted.pop(name, None)
            found |= self._loading.pop(name, None) is not None  # the finished job is then discarded
            found |= self._installing.pop(name, None) is not None
            slot = self._device.pop(name, None)
            if slot is not None:
                self._device_meta.pop(name, None)
                self._free_slots.append(slot)
                self._clears.append(slot)
                found = True
            adapter = self._host.pop(name, None)
            if adapter is not None:
                self._host_bytes -= adapter.num_bytes
                found = True
            return found

    def list(self) -> list[dict]:
        """One row per adapter the cache holds or the sources name locally, by name."""
        local = self.sources.local_names()  # file system: outside the lock
        with self._lock:
            names = set(local) | set(self._device) | set(self._host) | set(self._loading) | set(self._installing)
            names |= {n for n in list(self._failed) if self._fresh_failure(n) is not None}
            return [self._row(n) for n in sorted(names)]

    def stats(self) -> dict:
        """Counters and gauges for the metrics module (a snapshot; plain ints, floats and lists)."""
        with self._lock:
            return self.counters.snapshot(
                device_resident=len(self._device),
                device_bytes=sum(b for _, b in self._device_meta.values()),
                num_slots=self.num_slots,
                host_resident=len(self._host),
                host_bytes=self._host_bytes,
                host_bytes_budget=self.host_bytes_budget,
                max_host_adapters=self.max_host_adapters,
                loading=len(self._loading),
                waiting_install=len(self._wanted),
                failed=sum(self._fresh_failure(n) is not None for n in list(self._failed)),
                pinned=sum(self._pins.values()),
                held=len(self._held),
            )

    # ---- admission-time checks (server/engine, any thread) ------------------------------------------
    def known(self, name: str) -> bool:
        """Cheap: whether `name` is cached or could resolve (no parsing, no download)."""
        with self._lock:
            if name in self._device or name in self._host or name in self._loading:
                return True
        return self.sources.known(name)

    def error_of(self, name: str) -> AdapterError | None:
        """The cause of a failed load of `name` within the failure TTL, else None."""
        with self._lock:
            return self._fresh_failure(name)

    def close(self) -> None:
        """Stop the loader pool; in-flight jobs finish, queued ones are cancelled, results are dropped."""
        with self._lock:
            self._closed = True
            self._loading.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals (lock held) ----------------------------------------------------------------------
    def _want(self, name: str, notify_failure: bool) -> None:
        if name in self._device or name in self._installing:
            return
        if name in self._wanted and (name in self._host or name in self._loading):
            return  # already on its way: concurrent first requests share one load
        self.counters.device_misses += 1
        if name in self._host:
            self.counters.host_hits += 1
            self._host.move_to_end(name)
            self._wanted[name] = None
            return
        if name in self._loading:
            self.counters.load_joins += 1
            self._wanted[name] = None
            return
        error = self._fresh_failure(name)
        if error is not None:
            if notify_failure:
                self._notify.append((name, error.message))
            return
        if self._closed:
            return
        self._wanted[name] = None
        self.counters.host_misses += 1
        self.counters.loads += 1
        token = object()
        self._loading[name] = token
        self._pool.submit(self._load_job, name, token)

    def _fresh_failure(self, name: str) -> AdapterError | None:
        record = self._failed.get(name)
        if record is None:
            return None
        error, at = record
        if self._clock() - at < self.failure_ttl:
            return error
        del self._failed[name]  # expired: the next request reads the disk again
        return None

    def _take_slot(self) -> int | None:
        """A free slot, else the least recently used slot nobody pins (its adapter leaves the device)."""
        if self._free_slots:
            self._free_slots.sort()
            return self._free_slots.pop(0)
        for name, slot in self._device.items():
            if self._pins.get(name) or name in self._held:
                continue
            del self._device[name]
            self._device_meta.pop(name, None)
            self.counters.device_evictions += 1
            return slot
        return None

    def _host_put(self, name: str, adapter: LoraAdapter) -> None:
        """Insert into the host tier, then evict least recently used entries over either bound. Entries
        still waiting for a device slot go last; the new entry always stays (even if over budget)."""
        old = self._host.pop(name, None)
        if old is not None:
            self._host_bytes -= old.num_bytes
        self._host[name] = adapter
        self._host_bytes += adapter.num_bytes
        while len(self._host) > self.max_host_adapters or self._host_bytes > self.host_bytes_budget:
            others = [n for n in self._host if n != name]
            if not others:
                break
            victim = next((n for n in others if n not in self._wanted), others[0])
            self._wanted.pop(victim, None)  # last resort: the scheduler will ask again
            self._host_bytes -= self._host.pop(victim).num_bytes
            self.counters.host_evictions += 1

    def _row(self, name: str) -> dict:
        slot = self._device.get(name)
        adapter = self._host.get(name)
        error = self._fresh_failure(name)
        rank, num_bytes = self._device_meta.get(name, (None, None))
        if adapter is not None:
            rank, num_bytes = adapter.rank, adapter.num_bytes
        if slot is not None:
            tier = "device"
        elif name in self._loading:
            tier = "loading"
        elif adapter is not None:
            tier = "host"
        elif error is not None:
            tier = "failed"
        else:
            tier = "disk"
        return {
            "name": name,
            "tier": tier,
            "slot": slot,
            "bytes": num_bytes,
            "rank": rank,
            "pinned": self._pins.get(name, 0),
            "held": name in self._held,
            "error": error.message if error is not None else None,
        }

    # ---- background loading (no lock held while reading) --------------------------------------------
    def _load_job(self, name: str, token: object) -> None:
        t0 = time.perf_counter()
        adapter: LoraAdapter | None = None
        error: AdapterError | None = None
        try:
            path = self.sources.resolve(name)
            adapter = load_peft_adapter(name, path, self.base, self.max_rank, self.dtype)
            if self._pin_memory:
                adapter.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.weights.items()}
        except AdapterError as exc:
            error = exc
        except Exception as exc:  # a bug or an odd OS error: still only this adapter fails
            log.exception("loading adapter %r failed", name)
            error = AdapterError(name, f"loading failed: {type(exc).__name__}: {exc}")
        with self._lock:
            if self._loading.get(name) is not token:
                return  # unloaded or closed while loading: drop the result
            del self._loading[name]
            if error is not None:
                self._failed[name] = (error, self._clock())
                self._wanted.pop(name, None)
                self._held.discard(name)
                self.counters.load_failures += 1
            elif adapter is not None:
                self._host_put(name, adapter)
                self.counters.load_seconds.add(time.perf_counter() - t0)
            self._changed.notify_all()
        if error is not None:
            self._report_failure(name, error.message)
        elif self._on_ready is not None:
            try:
                self._on_ready(name)
            except Exception:
                log.exception("on_ready(%r) raised", name)

    def _report_failure(self, name: str, message: str) -> None:
        if self._on_failure is None:
            return
        try:
            self._on_failure(name, message)
        except Exception:
            log.exception("on_failure(%r) raised", name)
