"""Call an ASGI app in-process and hand its response out as a stream of plain objects, so a Ray Serve
replica can run the whole loraplex Starlette app and stream its answer back through a deployment handle:

    async for part in call_asgi(app, "POST", "/v1/completions", b"", headers, body):
        part is first a Head (status, headers, is_stream), then the body as bytes chunks

Closing the iterator early (the client went away, so Ray cancelled the call) tells the app
`http.disconnect`, which aborts its engine requests, exactly as a dropped HTTP connection would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

# Per-hop headers that must not be copied from one HTTP connection to the next.
HOP_HEADERS = frozenset({"connection", "keep-alive", "transfer-encoding", "upgrade", "content-length"})


@dataclass
class Head:
    status: int
    headers: list[tuple[str, str]]
    is_stream: bool  # text/event-stream: forward chunk by chunk; otherwise the body can be collected


async def call_asgi(
    app: Any,
    method: str,
    path: str,
    query_string: bytes,
    headers: list[tuple[str, str]],
    body: bytes,
    extra_headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> AsyncIterator[Head | bytes]:
    """Run one HTTP request through `app`; yields its Head, then body chunks (non-empty bytes)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query_string,
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
    }
    messages: asyncio.Queue[dict | None] = asyncio.Queue()
    gone = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()  # the app listens for a disconnect while it streams
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        await messages.put(message)

    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _: messages.put_nowait(None))
    started = False
    try:
        while True:
            message = await messages.get()
            if message is None:  # the app returned (or raised) without finishing the response
                if not started:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                    raise RuntimeError(f"{method} {path}: the app sent no response")
                return
            if message["type"] == "http.response.start":
                started = True
                out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", [])]
                media = next((v for k, v in out if k.lower() == "content-type"), "")
                kept = [(k, v) for k, v in out if k.lower() not in HOP_HEADERS]
                yield Head(
                    message["status"], kept + list(extra_headers), media.startswith("text/event-stream")
                )
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk:
                    yield bytes(chunk)
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)  # let it abort its requests
            if not task.done():
                task.cancel()
