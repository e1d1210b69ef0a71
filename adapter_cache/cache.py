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
load_peft_adapter, write_slot, clear_slot, on_failure and on_ready are all called without it (a slot
being written is reserved but invisible to slot_of until the write is done).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..cpu_threads import limit_this_thread
from ..errors import AdapterError, AdapterNotFoundError
from .host_memory import HostMemory
from .peft_format import AdapterWeights, BaseShapes, LoraAdapter, load_peft_adapter
from .sources import AdapterSources
from .stats import CacheCounters
from .tiers import HostTier, SlotTable

log = logging.getLogger(__name__)

# (slot, weights, rank): weights is an AdapterWeights (per module, all layers; a mapping
# {(layer, module): (A, B)} too), written by engine.model.write_lora_slot in a few large copies
WriteSlot = Callable[[int, AdapterWeights, int], None]


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
        host_rows: bool = False,
    ) -> None:
        """host_rows: host copies also get the transposed layout (for device slots with CPU row tables),
        so every slot write from the host tier, the first included, is plain copies (memory: twice the
        host copy). The loader makes it right after the host copy, while those bytes are in cache: on
        the loader thread it costs a rank-16 load ~2-4 ms, against ~5 ms more of the step thread's
        install when the write transposed (measured on a 2-core EPYC, adapter_load.py)."""
        if num_slots < 1 or max_host_adapters < 1 or load_workers < 1:
            raise ValueError("num_slots, max_host_adapters and load_workers must be >= 1")
        if host_bytes_budget < 0 or failure_ttl < 0:
            raise ValueError("host_bytes_budget and failure_ttl must be >= 0")
        self.sources, self.base, self.max_rank, self.dtype = sources, base, max_rank, dtype
        self.num_slots, self.failure_ttl = num_slots, failure_ttl
        self._write_slot, self._clear_slot = write_slot, clear_slot
        self._on_failure, self._on_ready = on_failure, on_ready
        self._clock = clock
        # Page-locked host copies make host -> GPU copies fast (and asynchronous-capable).
        self._pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._host_rows = host_rows
        # The loaders' torch ops (casts, transposes, checks) stay on their own thread: an OpenMP team of
        # theirs would slow every model step (cpu_threads.py).
        self._pool = ThreadPoolExecutor(
            max_workers=load_workers, thread_name_prefix="adapter-load", initializer=limit_this_thread
        )
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # notified when a load or install finishes
        self._closed = False
        self._host = HostTier(max_host_adapters, host_bytes_budget)
        # Buffers of host copies: recycled when the host tier drops them, kept within its byte budget
        self.host_memory = HostMemory(host_bytes_budget)
        self._device = SlotTable(num_slots)
        self._installing: dict[str, int] = {}  # slot reserved, write in progress, not yet visible
        self._wanted: OrderedDict[str, None] = OrderedDict()  # install queue, first asked first
        self._loading: dict[str, object] = {}  # name -> token of the live load job
        self._failed: dict[str, tuple[AdapterError, float]] = {}  # name -> (error, clock at failure)
        self._notify: list[tuple[str, str]] = []  # fast failures to report from install_ready
        self._clears: list[int] = []  # slots freed by unload, zeroed from install_ready
        self.counters = CacheCounters()
        self._digests: dict[str, str] = {}  # name -> weights digest of the version in its device slot

    # ---- Residency protocol (called by the scheduler under its lock: never call back into it) ------
    def slot_of(self, adapter: str) -> int | None:
        """Device slot of `adapter` if resident (and mark it recently used), else None."""
        with self._lock:
            slot = self._device.lookup(adapter)
            if slot is not None:
                self.counters.device_hits += 1
            return slot

    def request_load(self, adapter: str) -> None:
        """Make `adapter` resident soon (idempotent). A failure within the TTL is reported again (from
        install_ready, since the caller holds the scheduler lock) without reading anything."""
        with self._lock:
            self._want(adapter, notify_failure=True)

    def pin(self, adapter: str) -> None:
        """One more running sequence uses `adapter`: its slot is not evicted until unpinned."""
        with self._lock:
            self._device.pin(adapter)

    def unpin(self, adapter: str) -> None:
        with self._lock:
            self._device.unpin(adapter)

    def digest_of(self, adapter: str) -> str | None:
        """Weights digest of the version of `adapter` last written into a device slot (None: never was).
        The engine's prefix-cache namespace includes it, so a reloaded, changed adapter gets new blocks."""
        with self._lock:
            return self._digests.get(adapter)

    # ---- engine step thread -------------------------------------------------------------------------
    def install_ready(self, max_installs: int | None = None) -> list[str]:
        """Write wanted host-tier adapters into device slots; returns the names installed. Call it from
        the step thread between steps (never while a forward pass runs). An adapter waits while every
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
                        del self._wanted[name]  # dropped from the host tier; the scheduler asks again
                    continue
                taken = self._device.take()
                if taken is None:
                    break  # every slot is pinned, held or being filled: wait for an unpin
                slot, evicted = taken
                if evicted is not None:
                    self.counters.device_evictions += 1
                del self._wanted[name]
                self._host.touch(name)
                self._installing[name] = slot
                plan.append((name, slot, adapter))
        if self._clear_slot is not None:
            for slot in clears:
                self._clear_slot(slot)
        for name, message in notify:
            self._report_failure(name, message)
        return [name for name, slot, adapter in plan if self._install(name, slot, adapter)]

    def _install(self, name: str, slot: int, adapter: LoraAdapter) -> bool:
        t0 = time.perf_counter()
        try:
            self._write_slot(slot, adapter.weights, adapter.rank)
        except Exception as exc:  # a broken write fails this adapter only
            log.exception("writing adapter %r into slot %d failed", name, slot)
            error = AdapterError(name, f"writing to device slot {slot} failed: {type(exc).__name__}: {exc}")
            with self._lock:
                self._installing.pop(name, None)
                self._device.give_back(slot)
                self._failed[name] = (error, self._clock())
                self.counters.load_failures += 1
                self._changed.notify_all()
            self._report_failure(name, error.message)
            return False
        with self._lock:
            if self._installing.pop(name, None) is None:  # unloaded while being written
                self._device.give_back(slot)
                self._clears.append(slot)
                return False
            self._device.assign(name, slot, adapter.rank, adapter.num_bytes)
            self._digests[name] = adapter.digest
            self.counters.install_seconds.add(time.perf_counter() - t0)
            self._changed.notify_all()
        return True

    # ---- runtime control (server) -------------------------------------------------------------------
    def load(self, name: str, pin: bool = False, wait: float | None = None) -> dict:
        """Load `name` (the load endpoint, --preload). With `pin` its slot is never evicted until
        unload(name). With `wait`, block up to that many seconds until it is on host (validated) or
        failed; the device write follows at the next install_ready(). Returns its list() row; raises
        the AdapterError of an unknown name or of a failed load."""
        if not self.known(name):
            self.sources.resolve(name)  # raises the precise cause (cheap for names that are not known)
            raise AdapterNotFoundError(name, "unknown adapter")
        deadline = None if wait is None else time.monotonic() + wait
        with self._lock:
            error = self._fresh_failure(name)
            if error is not None:
                raise error
            if pin and name not in self._device.held:
                if len(self._device.held) >= self.num_slots:
                    raise AdapterError(
                        name,
                        f"cannot pin: all {self.num_slots} device slots are pinned by load",
                        code="adapter_pin_limit",
                    )
                self._device.held.add(name)
            self._want(name, notify_failure=False)
            while deadline is not None and name in self._loading:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            error = self._fresh_failure(name)
            if error is not None:
                self._device.held.discard(name)
                raise error
            return self._row(name)

    def unload(self, name: str) -> bool:
        """Drop `name` from the device and host tiers (and its pin by load). Refused while running
        requests use it: unload is not deferred, retry once they finish. False when nothing was held."""
        with self._lock:
            running = self._device.pins.get(name, 0)
            if running:
                raise AdapterError(
                    name,
                    f"cannot unload: {running} running request(s) use it; it stays loaded, retry after they finish",
                    code="adapter_in_use",
                )
            found = name in self._device.held or name in self._failed or name in self._wanted
            self._device.held.discard(name)
            self._failed.pop(name, None)
            self._wanted.pop(name, None)
            found |= self._loading.pop(name, None) is not None  # its result is then dropped
            found |= self._installing.pop(name, None) is not None  # its slot is given back after the write
            slot = self._device.release(name)
            if slot is not None:
                self._clears.append(slot)
            found |= slot is not None
            found |= self._host.pop(name) is not None
            return found

    def release_device(self, drop_host: bool = False) -> None:
        """Idle offload: every adapter leaves its device slot (the engine frees the slot buffers); with
        drop_host the host tier is emptied too. Loads already running go on. Adapters held by
        load(pin=True) stay held and come back at restore_held(). Refused while a request pins a slot."""
        with self._lock:
            if self._device.pins or self._installing:
                raise RuntimeError("cannot release the device slots while requests use them")
            for name in self._device.names():
                self._device.release(name)
            self._clears = []  # the buffers are gone: nothing to zero
            if drop_host:
                for name in self._host.names():
                    self._host.pop(name)
        if drop_host:
            self.host_memory.trim()  # the dropped copies' memory goes back to the system too

    def restore_held(self) -> None:
        """After an offload: queue the adapters held by load(pin=True) for their slots again."""
        with self._lock:
            for name in sorted(self._device.held):
                self._want(name, notify_failure=False)

    def list(self) -> list[dict]:
        """One row per adapter the cache holds or the sources name locally, sorted by name."""
        local = self.sources.local_names()  # reads the adapter directory: outside the lock
        with self._lock:
            names = set(local) | set(self._device.names()) | set(self._host.names()) | set(self._loading)
            names |= {n for n in list(self._failed) if self._fresh_failure(n) is not None}
            return [self._row(n) for n in sorted(names | set(self._installing))]

    def stats(self) -> dict:
        """Counters and gauges for the metrics module (a snapshot of plain ints, floats and lists)."""
        with self._lock:
            return self.counters.snapshot(
                device_resident=len(self._device),
                device_bytes=self._device.num_bytes,
                num_slots=self.num_slots,
                host_resident=len(self._host),
                host_bytes=self._host.num_bytes,
                host_bytes_budget=self._host.bytes_budget,
                max_host_adapters=self._host.max_adapters,
                loading=len(self._loading),
                waiting_install=len(self._wanted),
                failed=sum(self._fresh_failure(n) is not None for n in list(self._failed)),
                pinned=sum(self._device.pins.values()),
                held=len(self._device.held),
                host_free_bytes=self.host_memory.stats().free_bytes,
            )

    # ---- admission-time checks (any thread) ---------------------------------------------------------
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

    def admission_error(self, name: str) -> AdapterError | None:
        """Why a request for `name` should be refused now, or None: a load failure within the TTL, or
        an unknown name (with the precise cause: invalid name, no such folder, Hub disabled...)."""
        error = self.error_of(name)
        if error is not None or self.known(name):
            return error
        try:
            self.sources.resolve(name)  # cheap for names that are not known: it only raises
        except AdapterError as exc:
            return exc
        return None

    def close(self) -> None:
        """Stop the loader pool: queued jobs are cancelled, results of running ones are dropped."""
        with self._lock:
            self._closed = True
            self._loading.clear()
            self._changed.notify_all()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.host_memory.close()

    # ---- internals (lock held) ----------------------------------------------------------------------
    def _want(self, name: str, notify_failure: bool) -> None:
        if name in self._device or name in self._installing:
            return
        if name in self._wanted and (name in self._host or name in self._loading):
            return  # already on its way: concurrent first requests share one load
        self.counters.device_misses += 1
        if name in self._host:
            self.counters.host_hits += 1
            self._host.touch(name)
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

    def _row(self, name: str) -> dict:
        slot = self._device.lookup(name, touch=False)
        adapter = self._host.get(name)
        error = self._fresh_failure(name)
        rank, num_bytes = (
            (adapter.rank, adapter.num_bytes) if adapter else (self._device.meta(name) or (None, None))
        )
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
            "pinned": self._device.pins.get(name, 0),
            "held": name in self._device.held,
            "error": error.message if error is not None else None,
        }

    # ---- background loading (no lock held while reading) --------------------------------------------
    def _load_job(self, name: str, token: object) -> None:
        t0 = time.perf_counter()
        adapter: LoraAdapter | None = None
        error: AdapterError | None = None
        try:
            path = self.sources.resolve(name)
            adapter = load_peft_adapter(
                name, path, self.base, self.max_rank, self.dtype, pin_memory=self._pin_memory,
                memory=self.host_memory, with_rows=self._host_rows,
            )
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
                self._device.held.discard(name)
                self.counters.load_failures += 1
            elif adapter is not None:
                # Adapters waiting for a slot are evicted last: dropping one costs a re-read.
                evicted = self._host.put(name, adapter, spare=lambda n: n in self._wanted)
                for victim in evicted:
                    self._wanted.pop(victim, None)  # last resort: the scheduler will ask again
                self.counters.host_evictions += len(evicted)
                self.counters.load_seconds.add(time.perf_counter() - t0)
            self._changed.notify_all()
        if error is not None:
            self._report_failure(name, error.message)
            return
        if self._on_ready is not None:
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
