"""AsyncEngine: the step loop in its own thread, and an asyncio API for the server.

The event loop never waits on model compute: `submit` queues the request and awaits outputs that the
loop thread hands over with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator

from ..errors import InvalidRequestError
from ..scheduler.request import SamplingParams
from .engine import Engine, RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="loraplex-step-loop", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        cfg = self.engine.config
        idle_since = time.monotonic()
        while not self._stop.is_set():
            if not self.engine.has_work():
                if (
                    cfg.idle_offload_seconds is not None
                    and self.engine.offloaded is None
                    and time.monotonic() - idle_since >= cfg.idle_offload_seconds
                ):
                    try:
                        self.engine.offload(cfg.idle_offload)
                    except Exception:
                        log.exception("idle offload failed")
                        idle_since = time.monotonic()  # retry after another idle period
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
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request; iterate its outputs until the one with finished=True. Validation errors raise
        here, before the first output. Closing the iterator early (client gone) aborts the request."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        self._streams[request_id] = (loop, queue)  # before the engine can produce its first output
        try:
            self.engine.add_request(prompt, adapter, params, request_id)
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        self._wake.set()
        return self._stream(request_id, queue)

    async def _stream(self, request_id: str, queue: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
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

    def abort(self, request_id: str) -> bool:
        ok = self.engine.abort(request_id)
        self._wake.set()
        return ok
