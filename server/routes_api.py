"""The alias admin API and the routes file (server/routes.py has the route model):

    GET    /v1/routes                  every route the key may use (admin keys also see the file's state)
    PUT    /v1/routes/{alias}          set one route (admin): the body is the route, as in the file
    DELETE /v1/routes/{alias}          remove one route (admin)
    GET    /v1/routes/{alias}/shadow   the shadow comparison figures of the alias (keys that may use it)

Promotion and rollback are each one PUT (a weights change). A route is checked before it takes
effect: every version it names must be served now, so a route to a missing adapter fails at PUT or
reload with a clear error, never at request time. Changes replace the whole table in one assignment.

`--routes FILE` (YAML, or JSON for `.json`): the file is read when the engine is ready and re-read
whenever its content changes (polled every --routes-poll-seconds; a new content is acted on once two
polls in a row read it the same, so a file caught half-written is not loaded; the first read at
start acts at once). A file that does not parse or
check is rejected with a logged error, shown at GET /v1/routes, and the routes in force stay. A
reload replaces the whole table, so changes made through the API last until the file next changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import LoraplexError
from .errors import ModelNotFoundError
from .routes import Route, RouteTable, parse_route, read_routes_file
from .state import Call, ServerState

log = logging.getLogger(__name__)


class RoutesFile:
    """The --routes file: its last content seen, when it last loaded, and its last error."""

    def __init__(self, path: str | Path, poll_seconds: float = 1.0) -> None:
        self.path = Path(path)
        self.poll_seconds = poll_seconds
        self.digest: bytes | None = None  # of the content last tried (loaded or rejected)
        self.seen: bytes | None = None  # of the content the previous poll read
        self.loaded_at: float | None = None
        self.error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"path": str(self.path), "loaded_at": self.loaded_at, "error": self.error}

    def read_if_changed(self, state: ServerState) -> RouteTable | None:
        """Read the file; when its content changed and the previous poll read the same content (a
        writer that truncates then writes is never caught half-way), parse and check it: the new
        table, or None (no change, not settled yet, or rejected: the error is kept and logged).
        Blocking (reads the disk): off the loop."""
        content: bytes | None
        try:
            content = self.path.read_bytes()
            digest = hashlib.blake2b(content).digest()
        except OSError as exc:
            content, digest = None, repr(exc).encode()  # a missing file is a change of content, reported once
        settled, self.seen = digest == self.seen, digest
        if digest == self.digest or (self.digest is not None and not settled):  # the first read acts at once
            return None
        self.digest = digest
        try:
            table = read_routes_file(self.path, content)
            state.check_routes(table)
        except LoraplexError as exc:
            self.error = exc.message
            log.error("routes file rejected, the routes in force stay: %s", exc.message)
            return None
        self.error, self.loaded_at = None, time.time()
        log.info("routes loaded from %s: %s", self.path, ", ".join(r.alias for r in table) or "none")
        return table

    async def watch(self, state: ServerState) -> None:
        """Poll until cancelled (app shutdown); starts once the engine is ready."""
        while True:
            if state.engine is not None:
                try:
                    table = await run_in_threadpool(self.read_if_changed, state)
                    if table is not None:
                        async with state.routes_lock:  # never interleaved with a PUT / DELETE
                            state.routes = table  # one assignment: requests see the old or the new table
                except Exception:  # never let the watcher die: the next poll tries again
                    log.exception("reading the routes file failed")
            await asyncio.sleep(self.poll_seconds)


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


def _visible(call: Call, alias: str) -> bool:
    return call.policy is not None and call.policy.may_use(alias)


def _route_json(route: Route) -> dict[str, Any]:
    return {"alias": route.alias, **route.to_json(), "split": route.split()}


async def list_routes(request: Request) -> Response:
    state = _state(request)

    async def handler(call: Call, body: Any) -> Response:
        out: dict[str, Any] = {
            "object": "list",
            "data": [_route_json(r) for r in state.routes if _visible(call, r.alias)],
        }
        if call.policy is not None and call.policy.admin and state.routes_file is not None:
            out["file"] = state.routes_file.to_json()
        return JSONResponse(out)

    return await state.handle(request, "routes", handler, read_body=False)


async def put_route(request: Request) -> Response:
    state = _state(request)
    alias = request.path_params["alias"]

    async def handler(call: Call, body: Any) -> Response:
        route = parse_route(alias, body)
        async with state.routes_lock:  # read-modify-write of the table: one writer at a time
            table = state.routes.with_route(route)
            await run_in_threadpool(state.check_routes, table, {alias})
            created = alias not in state.routes
            state.routes = table
        log.info("route %r set: %s", alias, route.to_json())
        return JSONResponse(_route_json(route), status_code=201 if created else 200)

    return await state.handle(request, "routes", handler, admin=True)


async def delete_route(request: Request) -> Response:
    state = _state(request)
    alias = request.path_params["alias"]

    async def handler(call: Call, body: Any) -> Response:
        async with state.routes_lock:
            if alias not in state.routes:
                raise ModelNotFoundError(alias)
            state.routes = state.routes.without(alias)
        log.info("route %r deleted", alias)
        return JSONResponse({"alias": alias, "deleted": True})

    return await state.handle(request, "routes", handler, admin=True, read_body=False)


async def route_shadow(request: Request) -> Response:
    state = _state(request)
    alias = request.path_params["alias"]

    async def handler(call: Call, body: Any) -> Response:
        route = state.routes.get(alias)
        if route is None or not _visible(call, alias):
            raise ModelNotFoundError(alias)
        shadow = route.to_json().get("shadow")
        return JSONResponse({"alias": alias, "shadow": shadow, "candidates": state.shadows.stats(alias)})

    return await state.handle(request, "routes", handler, read_body=False)
