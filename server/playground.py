"""The playground page (GET / and /playground: plain HTML, CSS and JavaScript shipped in
`server/static/`, no build step, nothing fetched from elsewhere) and the small JSON endpoints it reads:

    GET /playground/config.json   {"auth_required": bool}: whether the page must ask for a key first
                                  (no key needed; a 401 would be a console error before the prompt)
    GET /v1/status                live numbers for the page's status strip (same auth as /info)

The page itself holds no secrets, so it loads without a key; every API call it makes sends the key
the user typed, kept in the page's memory only.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__
from ..errors import LoraplexError
from .errors import NotFoundError, error_response
from .state import ServerState

# The only files served, and their media types (a fixed table: no path ever comes from the URL).
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "playground.css": "text/css; charset=utf-8",
    "playground.js": "text/javascript; charset=utf-8",
}
# Same-origin scripts, styles and fetches only; no inline script, no frames, no plugins. A second
# line of defence behind the page's rule of never parsing server or model text as HTML.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def read_asset(name: str) -> bytes:
    """An asset's bytes from the installed package (editable or wheel); KeyError for unknown names."""
    if name not in ASSETS:
        raise KeyError(name)
    return resources.files(__package__).joinpath("static", name).read_bytes()


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


async def page(request: Request) -> Response:
    return Response(read_asset("index.html"), media_type=ASSETS["index.html"], headers=HEADERS)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name == "index.html" or name not in ASSETS:
        return error_response(NotFoundError(f"no such playground file: {name[:100]!r}"))
    return Response(read_asset(name), media_type=ASSETS[name], headers=HEADERS)


async def page_config(request: Request) -> Response:
    return JSONResponse(
        {"auth_required": _state(request).auth.enabled}, headers={"Cache-Control": "no-store"}
    )


async def status(request: Request) -> Response:
    """Running / waiting requests, KV usage, resident adapters (only those the key may use) and the
    adapter cache counters. Any valid key (as /info); 200 with "ready": false while the model loads."""
    state = _state(request)
    try:
        policy = state.auth.check(request.headers.get("authorization"))
    except LoraplexError as exc:
        return error_response(exc)
    out: dict[str, Any] = {"version": __version__, "ready": state.ready, "draining": state.draining}
    engine = state.engine
    if engine is None:
        return JSONResponse(out)
    rows = await run_in_threadpool(engine.list_adapters)  # reads the adapter dir: off the loop
    snap = engine.status()
    stats = snap.adapter_cache
    device, host = stats["device"], stats["host"]
    out.update(
        model=state.base_name,
        requests={"running": snap.num_running, "waiting": snap.num_waiting},
        kv_cache={"blocks_used": snap.kv_blocks_used, "blocks_total": snap.kv_blocks_total},
        prefix_cache={
            "queried_tokens": snap.prefix_cache_queries,
            "hit_tokens": snap.prefix_cache_hits,
            "hit_rate": snap.prefix_cache_hits / snap.prefix_cache_queries if snap.prefix_cache_queries else 0.0,
            "cached_blocks": snap.prefix_cache_blocks,
            "evictions": snap.prefix_cache_evictions,
        },
        adapters={
            "resident": [r.name for r in rows if r.tier == "device" and policy.may_use(r.name)],
            "device_slots": device["slots"],
            "device_resident": device["resident"],
            "host_resident": host["resident"],
            "loading": stats.get("loading", 0),
        },
        adapter_cache={
            "device_hits": device["hits"],
            "device_misses": device["misses"],
            "host_hits": host["hits"],
            "host_misses": host["misses"],
            "evictions": device["evictions"] + host["evictions"],
            "loads": stats["loads"],
            "load_failures": stats["load_failures"],
        },
    )
    return JSONResponse(out)
