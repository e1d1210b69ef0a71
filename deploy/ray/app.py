"""Ray Serve scale-out: an ingress that answers the OpenAI (and LoRAX) routes, and replicas that each
run a whole loraplex server in-process (engine + Starlette app). A request goes to a replica that
already holds its adapter:

    client -HTTP-> Ray proxy -> LoraplexIngress.__call__       reads `model`; no torch in this process
        -> replicas.options(multiplexed_model_id=model, stream=True).forward(...)
    LoraplexReplica.forward                                     loads `model` through @serve.multiplexed,
        -> the loraplex app over in-process ASGI                then streams the app's answer back

Ray Serve's model multiplexing keys on the request's `model` (an adapter name): a replica reports the
adapters it holds and the router sends requests for one of them there; a replica holds at most
`max_adapters_per_replica` adapters (also its engine's host tier size) and drops the least recently
used beyond that (from the engine too). Base-model requests carry no model id and go to any replica.
The replica deployment autoscales on ongoing requests with `min_replicas: 0`; the first request after
scale-to-zero waits for a replica to build its engine.

    serve run deploy/ray/serve_config.yaml                      # or, in Python:
    serve.run(build_app({"adapter_dir": "/models/adapters"}))

The app args are the names of Config and ServerConfig fields (the same list as `loraplex serve`'s flags),
less what Ray Serve itself sets (see REPLICA_SERVER_FIELDS).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from loraplex.config import Config, ServerConfig, build, settings
from loraplex.engine.default_model import DEFAULT_MODEL_NAME
from loraplex.errors import InvalidRequestError, LoraplexError
from loraplex.server.errors import (
    NotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
    error_response,
)

from .asgi import Head, call_asgi

log = logging.getLogger("ray.serve")

REPLICA_HEADER = "x-loraplex-replica"  # which replica answered (for clients and tests)
ADAPTERS_HEADER = "x-loraplex-replica-adapters"  # the adapters that replica holds, least recent first
MODEL_ROUTES = {  # path -> where its body names the model
    "/v1/completions": ("model",),
    "/v1/chat/completions": ("model",),
    "/generate": ("parameters", "adapter_id"),
    "/generate_stream": ("parameters", "adapter_id"),
    "/": ("parameters", "adapter_id"),  # POST / (TGI compat, the LoRAX client's route)
}
# Answered by the ingress itself: probes must not wake a replica (that would defeat scale-to-zero), and
# load/unload would change one replica only. The ingress never forwards /metrics either (a scrape would
# keep a replica alive); Ray exports its own serve metrics.
LOCAL_ROUTES = {"/health", "/ready", "/metrics", "/v1/load_lora_adapter", "/v1/unload_lora_adapter"}


# Config fields an app arg may set: all but max_host_adapters, which is max_adapters_per_replica.
REPLICA_CONFIG_FIELDS = tuple(s.name for s in settings(Config) if s.name != "max_host_adapters")
# ServerConfig fields that apply per replica; the bind address, the shutdown grace and logging are Ray
# Serve's own (http_options, graceful_shutdown_timeout_s, logging_config).
REPLICA_SERVER_FIELDS = ("served_model_name", "api_key", "api_keys_file", "max_queue", "max_body_bytes")


@dataclass(frozen=True)
class AppArgs:
    """The application's arguments (`args:` in the Serve config): Config and ServerConfig fields by name
    (REPLICA_CONFIG_FIELDS, REPLICA_SERVER_FIELDS; Config ones also grouped under `engine:`), plus the
    Ray-only settings below."""

    engine: Mapping[str, Any] = field(default_factory=dict)  # Config fields (adapters: NAME=SOURCE list)
    server: ServerConfig = field(default_factory=ServerConfig)
    max_adapters_per_replica: int = 8  # multiplexed models per replica = the engine's host tier size
    replica_options: dict = field(default_factory=dict)  # Ray deployment options (YAML: `deployments:`)
    ingress_options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, args: Mapping[str, Any] | None) -> AppArgs:
        args = dict(args or {})
        nested = args.pop("engine", None) or {}
        if not isinstance(nested, Mapping):
            raise ValueError("loraplex app arg engine must be a mapping of Config fields")
        own = ("max_adapters_per_replica", "replica_options", "ingress_options")
        known = {*REPLICA_CONFIG_FIELDS, *REPLICA_SERVER_FIELDS, *own, "engine"}
        unknown = sorted(set(args) - known) + sorted(f"engine.{k}" for k in set(nested) - set(REPLICA_CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"unknown loraplex app args {unknown}; known: {sorted(known)}")
        twice = sorted(set(args) & set(nested))
        if twice:
            raise ValueError(f"loraplex app args {twice} given both at the top level and under engine")
        engine = {**nested, **{k: v for k, v in args.items() if k in REPLICA_CONFIG_FIELDS}}
        server = build(ServerConfig, {k: v for k, v in args.items() if k in REPLICA_SERVER_FIELDS})
        return cls(engine, server, **{k: v for k, v in args.items() if k in own})

    def config(self) -> Config:
        engine = dict(self.engine)
        if "max_active_adapters" not in engine:  # device slots never outnumber the adapters held
            engine["max_active_adapters"] = min(Config.max_active_adapters, self.max_adapters_per_replica)
        return build(Config, {**engine, "max_host_adapters": self.max_adapters_per_replica})

    def base_names(self) -> list[str]:
        """Names the base model answers to: requests for them carry no multiplexed model id."""
        model = self.engine.get("model")
        return sorted({n for n in (self.server.served_model_name, model or DEFAULT_MODEL_NAME) if n})


def build_app(args: dict[str, Any] | None = None) -> Any:
    """The Serve application (the `import_path` of the Serve config): ingress + replica deployment.
    Deployment options come from the code defaults below, then `replica_options` / `ingress_options`,
    then the `deployments:` section of a Serve config."""
    a = AppArgs.parse(args)
    config = a.config()  # a bad value fails here, at deploy time, not in every replica
    server = a.server
    # One replica runs max_num_seqs requests at once and queues up to max_queue more (max_num_seqs more
    # without one): its concurrency limit, as Knative's containerConcurrency. Autoscaling aims at full
    # batches.
    concurrency = config.max_num_seqs + (server.max_queue if server.max_queue is not None else config.max_num_seqs)
    replica_options = {
        "max_ongoing_requests": concurrency,
        "autoscaling_config": {
            "min_replicas": 0,
            "initial_replicas": 1,
            "max_replicas": 4,
            "target_ongoing_requests": config.max_num_seqs,
            "upscale_delay_s": 5,
            "downscale_delay_s": 120,
            "downscale_to_zero_delay_s": 600,
        },
        **a.replica_options,
    }
    if "num_replicas" in a.replica_options:  # a fixed count replaces autoscaling
        replica_options.pop("autoscaling_config", None)
    replicas = LoraplexReplica.options(**replica_options).bind(config, server, a.max_adapters_per_replica)
    return LoraplexIngress.options(**a.ingress_options).bind(replicas, a.base_names(), server.max_body_bytes)


def _model_of(path: str, body: bytes) -> str:
    """The adapter a generation request names ("" when none or unreadable: the replica will say why)."""
    try:
        value: Any = json.loads(body)
        for key in MODEL_ROUTES[path]:
            value = value.get(key) if isinstance(value, dict) else None
    except (ValueError, RecursionError):
        return ""
    return value if isinstance(value, str) else ""


@serve.deployment(
    name="LoraplexIngress",
    num_replicas=1,
    max_ongoing_requests=1000,
    ray_actor_options={"num_cpus": 0.1},
)
class LoraplexIngress:
    """Routes each HTTP request to a replica; the replica's loraplex app produces the whole answer."""

    def __init__(self, replicas: DeploymentHandle, base_names: list[str], max_body_bytes: int) -> None:
        self.replicas = replicas
        self.base_names = set(base_names)
        self.max_body_bytes = max_body_bytes

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        root = request.scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path in LOCAL_ROUTES:
            return self._local(path)
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return error_response(PayloadTooLargeError(f"request body is over {self.max_body_bytes} bytes"))
        body = await request.body()
        if len(body) > self.max_body_bytes:
            return error_response(PayloadTooLargeError(f"request body is over {self.max_body_bytes} bytes"))
        model = _model_of(path, body) if request.method == "POST" and path in MODEL_ROUTES else ""
        handle = self.replicas.options(stream=True)
        if model and model not in self.base_names:
            handle = self.replicas.options(stream=True, multiplexed_model_id=model)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        query = request.scope.get("query_string", b"")
        stream = handle.forward.remote(request.method, path, query, headers, body)
        try:
            head: Head = await stream.__anext__()
        except Exception as exc:  # the replica failed to start or died: an OpenAI error, not a bare 500
            log.exception("forwarding %s failed", path)
            stream.cancel()
            return error_response(ServiceUnavailableError(f"no replica could answer: {type(exc).__name__}"))
        if head.is_stream:
            return StreamingResponse(_relay(stream), status_code=head.status, headers=dict(head.headers))
        chunks = [chunk async for chunk in stream]
        return Response(b"".join(chunks), status_code=head.status, headers=dict(head.headers))

    def _local(self, path: str) -> Response:
        if path in ("/health", "/ready"):  # the ingress is up; replicas start on demand
            return JSONResponse({"status": "ok" if path == "/health" else "ready"})
        if path == "/metrics":
            return error_response(NotFoundError("behind Ray Serve, use Ray's serve metrics (ray_serve_*)"))
        return error_response(
            InvalidRequestError(
                "behind Ray Serve adapters come from adapter_dir / adapters (shared by every replica); "
                "load and unload per replica are not exposed",
                code="not_supported",
            )
        )


async def _relay(stream: Any) -> AsyncIterator[bytes]:
    try:
        async for chunk in stream:
            yield chunk
    finally:  # the client went away (or the stream ended): stop the replica's generator too
        stream.cancel()


class _Held:
    """One adapter held by a replica (the object @serve.multiplexed caches). Ray calls __del__ when it
    evicts the adapter (least recently used past max_adapters_per_replica): drop it from the engine too."""

    def __init__(self, replica: LoraplexReplica, name: str) -> None:
        self.replica, self.name = replica, name

    def __del__(self) -> None:
        replica, self.replica = self.replica, None
        if replica is not None:
            replica.release(self.name)


@serve.deployment(name="LoraplexReplica", graceful_shutdown_timeout_s=30, ray_actor_options={"num_cpus": 1})
class LoraplexReplica:
    """One engine and its loraplex Starlette app (auth, validation, errors, streaming: all unchanged)."""

    def __init__(self, config: Config, server: ServerConfig, max_adapters: int) -> None:
        from loraplex.engine.async_engine import AsyncEngine
        from loraplex.engine.demo_adapters import demo_adapter_sources
        from loraplex.engine.engine import Engine
        from loraplex.server.app import create_app
        from loraplex.server.auth import build_key_table

        if config.model is None and not config.adapters and config.adapter_dir is None:
            config = replace(config, adapters=demo_adapter_sources())  # as `loraplex serve` does
        # built and stepped on one thread of its own (one OpenMP team: AsyncEngine.run_here); the app's
        # lifespan would start it, but it never runs here
        self.aengine = AsyncEngine.launch(lambda: Engine(config))
        keys = build_key_table(server.api_key, server.api_keys_file)
        self.app = create_app(
            self.aengine,
            api_keys=keys,
            served_model_name=server.served_model_name,
            max_queue=server.max_queue,
            max_body_bytes=server.max_body_bytes,
        )
        self.state = self.app.state.loraplex
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.held: OrderedDict[str, None] = OrderedDict()  # mirrors the multiplexed set, LRU first
        self.held_lock = threading.Lock()  # Ray runs _Held.__del__ in a worker thread

        async def load_adapter(name: str) -> _Held:
            await asyncio.to_thread(self.aengine.load_adapter, name, 600.0)
            with self.held_lock:
                self.held[name] = None
            return _Held(self, name)

        # Built here, not as a decorated method, so that the limit is a deployment argument.
        self.hold = serve.multiplexed(max_num_models_per_replica=max_adapters)(load_adapter)

    async def forward(
        self, method: str, path: str, query: bytes, headers: list[tuple[str, str]], body: bytes
    ) -> AsyncIterator[Head | bytes]:
        name = serve.get_multiplexed_model_id()
        if name and self._may_use(name, headers):
            try:
                await self.hold(name)
                with self.held_lock:
                    self.held.move_to_end(name)
            except Exception:  # unknown or broken adapter: the app answers with the precise error (404, 422)
                log.debug("adapter %s not held", name, exc_info=True)
        with self.held_lock:
            held = ",".join(self.held)
        extra = [(REPLICA_HEADER, self.replica_id), (ADAPTERS_HEADER, held)]
        async for part in call_asgi(self.app, method, path, query, headers, body, extra):
            yield part

    def _may_use(self, name: str, headers: list[tuple[str, str]]) -> bool:
        """Load only for callers allowed to use the adapter (the app checks again and answers)."""
        auth = next((v for k, v in headers if k.lower() == "authorization"), None)
        try:
            return self.state.auth.check(auth).may_use(name)
        except LoraplexError:
            return False

    def release(self, name: str) -> None:
        with self.held_lock:
            self.held.pop(name, None)
        try:
            self.aengine.unload_adapter(name)
        except LoraplexError:  # running requests still use it: the engine's own LRU drops it later
            pass

    def describe(self) -> dict[str, Any]:
        """Which replica this is, what it holds, and the engine's view of each adapter (for tests)."""
        aborted = self.state.metrics.registry.get_sample_value(
            "loraplex_request_finished_total", {"reason": "abort"}
        )
        with self.held_lock:
            held = list(self.held)
        return {
            "replica": self.replica_id,
            "held": held,
            "engine": {r.name: r.tier for r in self.aengine.list_adapters()},
            "num_running": self.aengine.status().num_running,
            "num_aborted": int(aborted or 0),
        }

    def __del__(self) -> None:  # Ray calls this once in-flight requests finished (or the grace ran out)
        aengine = self.__dict__.get("aengine")
        if aengine is None:
            return
        self.__dict__.pop("aengine")
        self.state.begin_drain()
        aengine.stop()  # also closes the adapter cache
