"""AsyncEngine: the step loop in its own thread, and the `EngineClient` interface the server uses.

The event loop never waits on model compute: `submit` queues the request and awaits outputs that the
loop thread hands over with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from ..adapter_cache.versions import public_name
from ..errors import AdapterError, InvalidRequestError, LoraplexError
from ..scheduler.sampling_params import SamplingParams
from ..scheduler.structured_output import StructuredOutput
from .engine import Engine
from .protocol import AdapterRow, EngineInfo, EngineStatus, RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine:
    """Implements `EngineClient` (engine/protocol.py) over one Engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info: EngineInfo = engine.info
        self._registered: set[str] = set()  # adapters added by register_adapter
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def launch(cls, make_engine: Callable[[], Engine]) -> AsyncEngine:
        """Build the Engine on a new thread and run the step loop on that same thread; returns once the
        engine is built (its exception if building fails). Prefer it (or run_here) to Engine on one
        thread and start(): see run_here."""
        built: list[AsyncEngine] = []
        failed: list[BaseException] = []
        ready = threading.Event()

        def boot() -> None:
            try:
                built.append(cls(make_engine()))
            except BaseException as exc:  # handed to the caller
                failed.append(exc)
                return
            finally:
                ready.set()
            built[0].run_here()

        thread = threading.Thread(target=boot, name="loraplex-step-loop", daemon=True)
        thread.start()
        ready.wait()
        if failed:
            raise failed[0]
        return built[0]

    def run_here(self) -> None:
        """Run the step loop on the calling thread until stop(). For the thread that built the Engine:
        then one thread runs every torch op of the model (load, packing, calibration, steps). Each
        thread that runs a parallel torch op gets an OpenMP team of its own, and once the process holds
        more OpenMP threads than CPUs, libgomp sleeps at every barrier instead of spinning: a model built
        on one thread and stepped on another decodes ~2x slower on a 2-core CPU (cpu_threads.py)."""
        if self._thread is not None and self._thread is not threading.current_thread():
            raise RuntimeError("the step loop already runs on another thread")
        self._thread = threading.current_thread()
        self._loop()

    def start(self) -> None:
        """Run the step loop on a new thread (an engine built elsewhere: tests, embedding; see run_here)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="loraplex-step-loop", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            self._thread = None
        self.engine.adapter_cache.close()
        self.engine.grammars.close()

    def _loop(self) -> None:
        cfg = self.engine.config
        idle_since = time.monotonic()
        while not self._stop.is_set():
            if not self.engine.has_work():
                if (
                    cfg.idle_offload_seconds is not None
                    and self.engine.device_model.offloaded is None
                    and time.monotonic() - idle_since >= cfg.idle_offload_seconds
                ):
                    try:
                        self.engine.offload(cfg.idle_offload)
                    except Exception:
                        log.exception("idle offload failed")
                        idle_since = time.monotonic()  # retry after another idle period
                try:
                    self.engine.when_idle()
                except Exception:
                    log.exception("idle work failed")
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()  # wakes an offloaded model first
            except Exception:  # Engine.step already fails a broken step's requests; this is a last guard
                log.exception("step loop error")
                continue
            finally:
                idle_since = time.monotonic()
            if not self.engine.last_step_ran:  # only waiting on adapter loads: sleep until one is ready
                self.engine.wake.wait(0.005)
                self.engine.wake.clear()
            for out in outputs:
                target = self._streams.get(out.request_id)
                if target is not None:
                    loop, queue = target
                    loop.call_soon_threadsafe(queue.put_nowait, out)

    async def submit(
        self,
        prompt: str | list[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Queue a request; iterate its outputs until the one with finished=True. Validation errors raise
        here, before the first output. Closing the iterator early (client gone) aborts the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        grammar = None
        if params is not None and params.structured is not None:
            grammar = await self._compile(params.structured)
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        self._streams[request_id] = (loop, queue)  # before the engine can produce its first output
        try:
            self.engine.add_request(prompt, adapter, params, request_id, priority, grammar=grammar)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self._wake.set()
        return self._stream(request_id, queue)

    async def _compile(self, spec: StructuredOutput) -> Any:
        """The compiled grammar of `spec`, waited for here (never in the step loop) up to the configured
        limit. Over the limit only this request fails; the compile goes on and lands in the cache."""
        future = self.engine.grammars.submit(spec)
        if future.done():  # a cache hit
            return future.result()
        limit = self.engine.config.structured_output_compile_timeout
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), limit)
        except TimeoutError:
            raise InvalidRequestError(
                f"compiling the grammar of '{spec.param}' took over {limit:g} s "
                "(--structured-output-compile-timeout); simplify it, or retry once it is compiled",
                param=spec.param,
                code="structured_output_timeout",
            ) from None

    async def _stream(self, request_id: str, queue: asyncio.Queue[RequestOutput]) -> AsyncGenerator[RequestOutput, None]:
        finished = False
        try:
            while not finished:
                out = await queue.get()
                finished = out.finished
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def check_request(self, num_prompt_tokens: int, max_tokens: int) -> None:
        self.info.check_request(num_prompt_tokens, max_tokens)

    def abort(self, request_id: str) -> bool:
        ok = self.engine.abort(request_id)
        self._wake.set()
        return ok

    @property
    def num_waiting(self) -> int:
        return self.engine.scheduler.num_waiting

    def status(self) -> EngineStatus:
        engine, blocks = self.engine, self.engine.blocks
        device_model = engine.device_model
        return EngineStatus(
            num_running=engine.scheduler.num_running,
            num_waiting=engine.scheduler.num_waiting,
            kv_blocks_used=blocks.num_blocks - blocks.num_free,
            kv_blocks_total=blocks.num_blocks,
            adapter_cache=engine.adapter_cache.stats(),
            offloaded=device_model.offloaded is not None,
            device_bytes=device_model.device_bytes(),
            offloads=device_model.stats.num_offloads,
            wakeups=device_model.stats.num_wakeups,
            wakeup_seconds_sum=device_model.stats.wakeup_seconds_sum,
            prefix_cache_queries=engine.scheduler.prefix_queries,
            prefix_cache_hits=engine.scheduler.prefix_hits,
            prefix_cache_blocks=blocks.num_cached,
            prefix_cache_evictions=blocks.num_evictions,
            structured_output=engine.grammars.stats.snapshot(),
        )

    # ---- text ----
    def encode(self, text: str) -> list[int]:
        return self.engine.text.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.engine.text.decode(token_ids)

    def chat_prompt(self, messages: list[dict[str, str]], adapter: str | None = None) -> list[int]:
        return self.engine.chat_prompt(messages, adapter)

    @property
    def eos_token_id(self) -> int | None:
        return self.engine.text.eos_token_id

    # ---- adapters (by name; the engine maps a name to its current version) ----
    def admission_error(self, adapter: str) -> LoraplexError | None:
        return self.engine.adapter_cache.admission_error(self.engine.versions.current(adapter))

    def adapter_error(self, adapter: str) -> LoraplexError | None:
        return self.engine.adapter_cache.error_of(self.engine.versions.current(adapter))

    def list_adapters(self) -> list[AdapterRow]:
        versions = self.engine.versions
        rows = []
        for row in self.engine.adapter_cache.list():
            key = row["name"]
            name = public_name(key)
            if versions.current(name) != key:
                continue  # a version being loaded or retired: listed under its name's row
            rows.append(AdapterRow(name, row["tier"], key, tuple(versions.retired_of(name))))
        return rows

    def register_adapter(self, name: str, path: str) -> bool:
        cache = self.engine.adapter_cache
        current = cache.sources.named.get(name)
        if current is not None:
            if Path(current).expanduser().resolve() != Path(path).expanduser().resolve():
                raise InvalidRequestError(
                    f"The lora adapter '{name}' is already registered with another path; unload it first.",
                    param="lora_name",
                )
            return False
        if cache.known(name):
            raise InvalidRequestError(
                f"The lora adapter '{name}' already exists (adapter directory).", param="lora_name"
            )
        cache.sources.named[name] = path
        self._registered.add(name)
        return True

    def unregister_adapter(self, name: str) -> bool:
        self.engine.forget_adapter(name)
        if name not in self._registered:
            return False
        self._registered.discard(name)
        self.engine.adapter_cache.sources.named.pop(name, None)
        return True

    def update_adapter(self, name: str, path: str, timeout: float) -> str:
        return self.engine.update_adapter(name, path, timeout)

    def load_adapter(self, name: str, timeout: float) -> None:
        self.engine.adapter_cache.load(self.engine.versions.current(name), False, timeout)

    def unload_adapter(self, name: str) -> bool:
        """Unload the current version of `name` (refused while requests use it, or while a replaced
        version still finishes requests) and drop its others."""
        retiring = self.engine.versions.retired_of(name)
        if retiring:
            raise AdapterError(
                name,
                f"cannot unload: the replaced version(s) {', '.join(retiring)} still finish requests; retry after they finish",
                code="adapter_in_use",
            )
        found = self.engine.adapter_cache.unload(self.engine.versions.current(name))
        return bool(self.engine.forget_adapter(name)) or found
