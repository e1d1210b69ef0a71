"""What every generation endpoint shares: reading the JSON body under limits, a Job (the engine
requests of one HTTP request, merged into one stream), disconnect watching, and the SSE response.

A client that goes away aborts its engine requests: non-streaming handlers race the job against an
`http.disconnect` watcher; streams do the same inside EventStream. Either way the job is closed,
which closes the AsyncEngine iterators (that aborts the requests and frees their KV blocks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ..engine.protocol import EngineClient, RequestOutput
from ..errors import InvalidRequestError
from .errors import PayloadTooLargeError, UnsupportedMediaTypeError
from .metrics import ServerMetrics

log = logging.getLogger(__name__)
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the response was complete."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, max_bytes: int) -> Any:
    """The request body as JSON: 415 for a non-JSON content type, 413 over max_bytes (checked on the
    declared length first, then while reading), 400 for malformed JSON."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and media_type != "application/json" and not media_type.endswith("+json"):
        raise UnsupportedMediaTypeError(f"Content-Type must be application/json, got {media_type!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLargeError(f"request body of {declared} bytes is over the limit of {max_bytes} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLargeError(f"request body is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
    except ClientDisconnect as exc:
        raise ClientGone() from exc
    try:
        return json.loads(b"".join(chunks), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"malformed JSON body: {exc}", param="body", code="invalid_json") from exc


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise ClientGone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        watcher.cancel()
    if task.cancelled():
        raise ClientGone()
    return task.result()


@dataclass
class Choice:
    """One engine request of a job and what it produced so far."""

    index: int
    request_id: str
    prompt_ids: list[int]
    seed: int | None = None
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the engine's prefix cache
    first_token_at: float | None = None
    version: str | None = None  # the adapter version that serves it (None: the base model)
    started: bool = False  # its pump has begun iterating (so closing it aborts the request)

    @property
    def text(self) -> str:
        return "".join(self.texts)


class Job:
    """The engine requests (choices) of one HTTP request, merged into one stream of (choice, output)."""

    def __init__(
        self, engine: EngineClient, metrics: ServerMetrics, adapter: str | None, label: str, call: Any = None
    ) -> None:
        self.engine, self.metrics, self.adapter, self.label = engine, metrics, adapter, label
        self.call = call  # the state.Call: told the version that served (headers, metrics)
        self.shadow: Any = None  # a shadow.ShadowRun to tell how the primary ended
        self.arrival = time.perf_counter()
        self.choices: list[Choice] = []
        self._counted_prompts: list[Choice] = []  # one choice per distinct prompt (usage counts it once)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._pumps: list[asyncio.Task] = []
        self._left = 0
        self._closed = False

    async def submit(
        self, prompt_ids: list[int], params: Any, request_id: str, first_of_prompt: bool
    ) -> Choice:
        """Queue one engine request (validation errors raise here)."""
        stream = await self.engine.submit(prompt_ids, self.adapter, params, request_id)
        choice = Choice(len(self.choices), request_id, prompt_ids, params.seed)
        self.choices.append(choice)
        if first_of_prompt:
            self._counted_prompts.append(choice)
        self.metrics.request_queued(request_id, self.adapter)
        self._left += 1
        self._pumps.append(asyncio.create_task(self._pump(choice, stream)))
        return choice

    async def _pump(self, choice: Choice, stream: AsyncGenerator[RequestOutput, None]) -> None:
        choice.started = True
        try:
            async for out in stream:
                self._queue.put_nowait((choice, out))
        finally:
            await stream.aclose()  # a no-op after the final output; aborts the request otherwise

    async def next_event(self) -> tuple[Choice, RequestOutput] | None:
        """The next (choice, RequestOutput), or None once every choice has finished."""
        if self._left == 0:
            return None
        choice, out = await self._queue.get()
        now = time.perf_counter()
        choice.texts.append(out.new_text)
        choice.token_ids.extend(out.new_token_ids)
        choice.logprobs.extend(out.new_logprobs or [])
        choice.num_output_tokens = out.num_output_tokens
        choice.num_cached_tokens = out.num_cached_tokens
        if choice.version is None and out.adapter_version is not None:
            choice.version = out.adapter_version
            if self.call is not None and self.call.version is None:
                self.call.version = out.adapter_version
        if out.new_token_ids and choice.first_token_at is None:
            choice.first_token_at = now
            self.metrics.request_running(choice.request_id)
        if out.finished:
            self._left -= 1
            choice.finish_reason, choice.error = out.finish_reason or "stop", out.error
            self.metrics.request_done(
                choice.request_id,
                choice.finish_reason,
                self.arrival,
                choice.first_token_at,
                choice.num_output_tokens,
                (self.label, choice.version) if choice.version else None,
            )
        return choice, out

    async def run_to_end(self) -> None:
        while await self.next_event() is not None:
            pass

    @property
    def usage(self) -> dict[str, Any]:
        prompt = sum(len(c.prompt_ids) for c in self._counted_prompts)
        completion = sum(c.num_output_tokens for c in self.choices)
        cached = sum(c.num_cached_tokens for c in self._counted_prompts)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def first_error(self) -> Choice | None:
        return next((c for c in self.choices if c.finish_reason == "error"), None)

    async def start(self) -> None:
        """Let every pump take its first step (so that closing the job aborts every request)."""
        await asyncio.sleep(0)

    async def close(self) -> None:
        """Abort what is unfinished, record usage. Idempotent; safe in `finally` blocks."""
        if self._closed:
            return
        self._closed = True
        if not all(c.started for c in self.choices):
            await asyncio.sleep(0)  # a submit failed right after others: let their pumps start first
        for choice, pump in zip(self.choices, self._pumps, strict=True):
            if choice.finish_reason is None:
                if not pump.done():
                    pump.cancel()
                if not choice.started:  # still never ran (cannot abort through the iterator)
                    self.engine.abort(choice.request_id)
                self.metrics.request_done(
                    choice.request_id, "abort", self.arrival, None, choice.num_output_tokens
                )
        for pump in self._pumps:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump
        usage = self.usage
        version = self.choices[0].version if self.choices else None
        self.metrics.count_usage(self.label, usage["prompt_tokens"], usage["completion_tokens"], version)
        if self.shadow is not None:
            first = self.choices[0]
            ok = first.finish_reason in ("stop", "length")
            seconds = time.perf_counter() - self.arrival
            self.shadow.primary_done((first.text, first.num_output_tokens, seconds) if ok else None)


def finite_logprob(value: float) -> float:
    """JSON has no -inf: a log-probability of an impossible token is reported as -9999."""
    return value if math.isfinite(value) else -9999.0


def sse(data: Any) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


class EventStream(StreamingResponse):
    """Server-sent events from an async iterator of strings. When the client disconnects, the
    iterator is closed (its `finally` aborts the job) and `on_end(499)` runs; else `on_end(200)`."""

    def __init__(
        self, events: AsyncIterator[str], on_end: Callable[[int], None], extra_headers: dict[str, str] | None = None
    ) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(extra_headers or {})}
        super().__init__(events, media_type="text/event-stream", headers=headers)
        self._on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 499
        try:
            await until_disconnect(self._send_all(send), receive)
            status = 200
        except (ClientGone, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self._on_end(status)

    async def _send_all(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for chunk in self.body_iterator:
            body = chunk.encode("utf-8") if isinstance(chunk, str) else bytes(chunk)
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
