"""The Starlette app: OpenAI-compatible and LoRAX-compatible generation, models and adapter admin,
health / readiness / info / metrics, and `serve()` (uvicorn with a graceful, draining shutdown).

    create_app(engine)                        # an EngineClient (e.g. an AsyncEngine) already built
    create_app(None, build_engine=factory)    # build it in a thread at startup; /ready is 503 until then

Routes: POST /v1/completions, /v1/chat/completions, /generate, /generate_stream, / (TGI compat),
/v1/load_lora_adapter, /v1/unload_lora_adapter (admin); GET /v1/routes, PUT / DELETE
/v1/routes/{alias} (admin), GET /v1/routes/{alias}/shadow; GET /v1/models, /v1/models/{model}, /info,
/health (alive: always 200), /ready (503 while loading or draining), /metrics (Prometheus text),
/v1/status (the playground's status strip); the playground page: / and /playground (+ its files).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from types import FrameType
from typing import Any

import prometheus_client
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import __version__
from ..engine.protocol import EngineClient
from ..errors import LoraplexError
from .auth import Authenticator, KeyPolicy
from .errors import error_response, handle_exception
from .lorax_api import compat_generate, generate, generate_stream
from .metrics import CONTENT_TYPE
from .models_api import get_model, list_models, load_adapter, unload_adapter
from .openai_api import chat_completions, completions
from .playground import asset, page, page_config, status
from .routes_api import RoutesFile, delete_route, list_routes, put_route, route_shadow
from .state import ServerState

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 2**20


def create_app(
    engine: EngineClient | None = None,
    *,
    build_engine: Callable[[], EngineClient] | None = None,
    on_build_failure: Callable[[BaseException], None] | None = None,
    api_keys: Mapping[str, KeyPolicy] | None = None,
    served_model_name: str | None = None,
    max_queue: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    routes_file: str | None = None,
    routes_poll_seconds: float = 1.0,
) -> Starlette:
    """The app. `engine` (an EngineClient, started at app startup and stopped at shutdown), or
    `build_engine` (called in a background thread at startup; `on_build_failure` hears if it raises).
    `api_keys` maps each key to its KeyPolicy (None: no auth). `max_queue` caps waiting requests (429
    past it); `max_body_bytes` caps request bodies (413). `routes_file` holds the aliases (YAML or JSON,
    re-read when it changes, polled every `routes_poll_seconds`; server/routes_api.py)."""
    state = ServerState(
        engine,
        auth=Authenticator(api_keys),
        served_model_name=served_model_name,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
    )
    if routes_file is not None:
        state.routes_file = RoutesFile(routes_file, routes_poll_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if state.engine is not None:
            state.engine.start()
        elif build_engine is not None:
            loop = asyncio.get_running_loop()
            threading.Thread(
                target=_build,
                args=(state, build_engine, loop, on_build_failure),
                name="loraplex-build",
                daemon=True,
            ).start()
        watcher = None
        if isinstance(state.routes_file, RoutesFile):
            watcher = asyncio.create_task(state.routes_file.watch(state))
        try:
            yield
        finally:
            state.begin_drain()
            if watcher is not None:
                watcher.cancel()
            await state.shadows.close()
            if state.engine is not None:
                await run_in_threadpool(state.engine.stop)

    routes = [
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/generate", generate, methods=["POST"]),
        Route("/generate_stream", generate_stream, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET"]),
        Route("/v1/load_lora_adapter", load_adapter, methods=["POST"]),
        Route("/v1/unload_lora_adapter", unload_adapter, methods=["POST"]),
        Route("/v1/routes", list_routes, methods=["GET"]),
        Route("/v1/routes/{alias:path}/shadow", route_shadow, methods=["GET"]),
        Route("/v1/routes/{alias:path}", put_route, methods=["PUT"]),
        Route("/v1/routes/{alias:path}", delete_route, methods=["DELETE"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/info", info, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/", page, methods=["GET"]),
        Route("/", compat_generate, methods=["POST"]),
        Route("/playground", page, methods=["GET"]),
        Route("/playground/config.json", page_config, methods=["GET"]),
        Route("/playground/{name}", asset, methods=["GET"]),
    ]
    handlers = {LoraplexError: handle_exception, HTTPException: handle_exception, Exception: handle_exception}
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    app.state.loraplex = state
    return app


def _build(
    state: ServerState, build_engine: Callable[[], Any], loop: asyncio.AbstractEventLoop, on_failure
) -> None:
    try:
        engine = build_engine()
    except BaseException as exc:
        log.exception("building the engine failed")
        state.load_error = f"{type(exc).__name__}: {exc}"
        for callback in (on_failure, state.on_fatal):
            if callback is not None:
                loop.call_soon_threadsafe(callback, exc)
        return

    installed = threading.Event()
    started: list[bool] = []

    def install() -> None:
        if not state.draining:  # shutting down before the engine was ready: never start it
            state.engine = engine
            log.info("engine ready: %s", state.base_name)
        started.append(not state.draining)
        installed.set()

    loop.call_soon_threadsafe(install)
    installed.wait()
    if started[0]:  # this thread built the model: it steps it too (EngineClient.run_here)
        engine.run_here()


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


# ---- probes and info ------------------------------------------------------------------------------
async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    state = _state(request)
    if state.ready:
        return JSONResponse({"status": "ready"})
    status = "draining" if state.draining else ("failed" if state.load_error else "loading")
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})


async def info(request: Request) -> Response:
    state = _state(request)
    try:
        state.auth.check(request.headers.get("authorization"))
    except LoraplexError as exc:
        return error_response(exc)
    out: dict[str, Any] = {"version": __version__, "ready": state.ready, "draining": state.draining}
    if state.engine is not None:
        e = state.engine.info
        out.update(
            model_id=state.base_name,
            model_dtype=e.dtype,
            model_device_type=e.device,
            max_total_tokens=e.max_model_len,
            max_model_len=e.max_model_len,
            max_active_adapters=e.max_active_adapters,
            max_lora_rank=e.max_lora_rank,
            max_num_seqs=e.max_num_seqs,
            max_queue=state.max_queue,
            kv_cache_blocks=e.kv_blocks,
            block_size=e.block_size,
        )
    return JSONResponse(out)


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE)


# ---- running it -----------------------------------------------------------------------------------
class _DrainingServer(uvicorn.Server):
    """uvicorn's graceful shutdown (stop accepting, let in-flight requests finish within
    timeout_graceful_shutdown), plus: /ready turns 503 at the first signal, and SIGTERM/SIGINT end
    with exit status 0 instead of being re-raised after the shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.loraplex_state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.loraplex_state.begin_drain()
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def serve(
    app: Starlette, host: str, port: int, shutdown_grace_seconds: float, log_level: str = "info"
) -> int:
    """Run the app until SIGTERM/SIGINT; returns the process exit status (1 if the engine failed to build)."""
    state: ServerState = app.state.loraplex
    prometheus_client.disable_created_metrics()  # no *_created series next to every counter
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(shutdown_grace_seconds),
        lifespan="on",
    )
    server = _DrainingServer(config, state)
    state.on_fatal = lambda exc: setattr(server, "should_exit", True)  # the engine did not build: exit 1
    server.run()
    return 1 if state.load_error is not None else 0
