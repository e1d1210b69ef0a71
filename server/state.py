"""ServerState: the engine (once built), limits, auth, metrics and the steps every endpoint shares
(authenticate, read the body, resolve the model, tokenize, check the queue, submit a job).

The server sees the engine only through `EngineClient` (engine/protocol.py, no torch): server/ never
imports torch nor reaches into the engine's parts.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..engine.protocol import EngineClient, RequestOutput
from ..errors import AdapterError, AdapterNotFoundError, InvalidRequestError, LoraplexError
from ..scheduler.sampling_params import SamplingParams
from .auth import Authenticator, KeyPolicy
from .errors import (
    ModelNotFoundError,
    QueueFullError,
    ServiceUnavailableError,
    error_response,
    to_loraplex_error,
)
from .generation import Choice, ClientGone, EventStream, Job, read_json, until_disconnect
from .metrics import ServerMetrics
from .routes import RouteError, RouteTable
from .schemas import MAX_SEED
from .shadow import ShadowRunner


class RoutesFileLike(Protocol):
    def to_json(self) -> dict[str, Any]: ...


SUBJECT_HEADER = "x-loraplex-subject"
VERSION_HEADER = "X-Loraplex-Adapter-Version"

log = logging.getLogger(__name__)

# Text longer than this is tokenized in a worker thread, so a huge prompt does not stall the loop.
INLINE_TOKENIZE_CHARS = 8192


@dataclass
class Call:
    """One HTTP request on its way through a handler."""

    request: Request
    endpoint: str
    policy: KeyPolicy | None = None  # set once authenticated
    label: str = ""  # the resolved model name (an alias, not its version), for metrics ("" until resolved)
    shadow: str | None = None  # the candidate version a sampled request of an alias also runs on
    version: str | None = None  # the adapter version that served it (from the engine's first output)


class ServerState:
    def __init__(
        self,
        engine: EngineClient | None,
        *,
        auth: Authenticator,
        served_model_name: str | None,
        max_queue: int | None,
        max_body_bytes: int,
    ) -> None:
        self.engine = engine  # None until built
        self.auth = auth
        self.served_model_name = served_model_name
        self.max_queue = max_queue
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.load_error: str | None = None
        self.started_at = int(time.time())
        self.on_fatal: Callable[[BaseException], None] | None = None  # the engine failed to build
        # Aliases (server/routes.py): replaced whole, in one assignment, so a request sees one table.
        self.routes = RouteTable()
        self.routes_lock = asyncio.Lock()  # PUT / DELETE read-modify-write the table one at a time
        self.routes_file: RoutesFileLike | None = None  # --routes (server/routes_api.py RoutesFile)
        self.shadows = ShadowRunner()
        self.metrics = ServerMetrics(lambda: self.engine, self.status, self.shadows)

    # ---- lifecycle ------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def status(self) -> dict[str, bool]:
        return {"ready": self.ready, "draining": self.draining}

    def begin_drain(self) -> None:
        """Shutdown started: /ready answers 503 and new generation requests are refused."""
        self.draining = True

    @property
    def base_name(self) -> str:
        assert self.engine is not None
        return self.served_model_name or self.engine.info.model_name

    def is_base(self, name: str) -> bool:
        return name in (self.base_name, self.require_engine().info.model_name)

    # ---- the shared handler frame -------------------------------------------------------------------
    async def handle(
        self,
        request: Request,
        endpoint: str,
        handler: Callable[[Call, Any], Awaitable[Response]],
        *,
        admin: bool = False,
        read_body: bool = True,
        tgi_errors: bool = False,
    ) -> Response:
        """Authenticate, require a built engine, read the JSON body, run `handler(call, body)`; every
        error becomes the OpenAI error body (the TGI / LoRAX one with `tgi_errors`). Counts the request
        in the metrics (streams when they end)."""
        call = Call(request, endpoint)
        try:
            header = request.headers.get("authorization")
            call.policy = self.auth.check_admin(header) if admin else self.auth.check(header)
            self.require_engine()
            body = await read_json(request, self.max_body_bytes) if read_body else None
            response = await handler(call, body)
        except ClientGone:
            self.metrics.count_request(endpoint, call.label, 499, call.version)
            return Response(status_code=499)
        except Exception as exc:
            err = to_loraplex_error(exc)
            self.metrics.count_request(endpoint, call.label, err.status, call.version)
            return error_response(err, tgi=tgi_errors)
        if not isinstance(response, EventStream):
            self.metrics.count_request(endpoint, call.label, response.status_code, call.version)
        return response

    def stream_ended(self, call: Call) -> Callable[[int], None]:
        return lambda status: self.metrics.count_request(call.endpoint, call.label, status, call.version)

    def version_headers(self, call: Call) -> dict[str, str]:
        """X-Loraplex-Adapter-Version: the adapter version that served (the base model's name for it)."""
        return {VERSION_HEADER: call.version or self.base_name}

    def require_engine(self) -> EngineClient:
        if self.draining:
            raise ServiceUnavailableError("The server is shutting down.", code="draining")
        if self.engine is None:
            if self.load_error is not None:
                raise ServiceUnavailableError(
                    f"The model failed to load: {self.load_error}", code="model_load_failed"
                )
            raise ServiceUnavailableError("The model is still loading; retry shortly.", code="model_loading")
        return self.engine

    # ---- model names --------------------------------------------------------------------------------
    def resolve_model(self, call: Call, name: str | None, subject: str | None = None) -> str | None:
        """The adapter to use for `model` (None = the base model). An alias routes to one of its
        versions (sticky for `subject` or the X-Loraplex-Subject header, which wins), and may sample a
        shadow run. Unknown and not-allowed names get the same 404; a known adapter whose last load
        failed gets that failure (e.g. 422)."""
        engine = self.require_engine()
        name = self.base_name if name is None else name
        if not name or call.policy is None or not call.policy.may_use(name):
            raise ModelNotFoundError(name)
        route = self.routes.get(name)
        if route is not None:  # a key allowed the alias is served its versions without naming them
            call.label = name
            version = route.choose(call.request.headers.get(SUBJECT_HEADER) or subject)
            if route.shadow is not None and route.wants_shadow():
                call.shadow = route.shadow.version
            if self.is_base(version):
                return None
            error = engine.admission_error(version)
            if isinstance(error, AdapterNotFoundError):
                raise ServiceUnavailableError(
                    f"The alias '{name}' routes to '{version}', which is no longer served: {error.message}",
                    code="route_target_missing",
                )
            if error is not None:
                raise error
            return version
        if self.is_base(name):
            call.label = self.base_name
            return None
        error = engine.admission_error(name)
        if isinstance(error, AdapterNotFoundError):
            raise ModelNotFoundError(name, None if self.auth.enabled else error.message)
        if error is not None:
            raise error
        call.label = name
        return name

    def check_routes(self, table: RouteTable, aliases: set[str] | None = None) -> None:
        """RouteError unless each route of `table` (those of `aliases` only, when given) has a free alias
        and names only versions served now (so a route to a missing adapter fails when it is set, not
        at request time). May touch the disk."""
        engine = self.require_engine()
        for route in table:
            if aliases is not None and route.alias not in aliases:
                continue
            if self.is_base(route.alias):
                raise RouteError(f"alias '{route.alias}' is the base model's name")
            if table.users_of(route.alias):
                raise RouteError(
                    f"alias '{route.alias}' is a version in the route(s) {', '.join(table.users_of(route.alias))}"
                )
            for version in sorted(route.names()):
                if self.is_base(version):
                    continue
                if version in table:
                    raise RouteError(f"route '{route.alias}': '{version}' is an alias, not an adapter version")
                error = engine.admission_error(version)
                if error is not None:
                    raise RouteError(f"route '{route.alias}': version '{version}' cannot serve: {error.message}")

    # ---- prompts ------------------------------------------------------------------------------------
    async def encode(self, prompt: str | list[int]) -> list[int]:
        engine = self.require_engine()
        if isinstance(prompt, list):
            return list(prompt)
        try:
            if len(prompt) > INLINE_TOKENIZE_CHARS:
                return await run_in_threadpool(engine.encode, prompt)
            return engine.encode(prompt)
        except LoraplexError:
            raise
        except Exception as exc:  # e.g. a lone surrogate the tokenizer cannot take
            raise InvalidRequestError(f"the prompt cannot be tokenized: {exc}", param="prompt") from exc

    async def chat_ids(self, messages: list[dict[str, str]], adapter: str | None = None) -> list[int]:
        """Token ids through the chat template (the adapter's own when it ships one)."""
        engine = self.require_engine()
        size = sum(len(m["content"]) for m in messages)
        try:
            if size > INLINE_TOKENIZE_CHARS:
                return await run_in_threadpool(engine.chat_prompt, messages, adapter)
            return engine.chat_prompt(messages, adapter)
        except LoraplexError:
            raise
        except Exception as exc:  # the chat template refused the conversation (jinja raise_exception...)
            raise InvalidRequestError(f"the chat template failed: {exc}", param="messages") from exc

    def check_fits(self, prompt_ids: list[int], max_tokens: int) -> None:
        """400 before queueing when the request can never run: the engine's own rule, asked up front."""
        self.require_engine().check_request(len(prompt_ids), max_tokens)

    # ---- jobs ---------------------------------------------------------------------------------------
    async def start_job(
        self,
        call: Call,
        adapter: str | None,
        prompts: list[list[int]],
        params: SamplingParams,
        n: int,
        prefix: str,
    ) -> tuple[Job, str]:
        """Submit n engine requests per prompt (seed + j for choice j of a seeded request); on any
        refusal, abort what was already submitted. Returns (job, response id)."""
        engine = self.require_engine()
        num = len(prompts) * n
        waiting = engine.num_waiting
        if self.max_queue is not None and waiting + num > self.max_queue:
            raise QueueFullError(
                f"The server queue is full ({waiting} waiting, limit {self.max_queue}); retry shortly."
            )
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        job = Job(engine, self.metrics, adapter, call.label, call)
        try:
            for ids in prompts:
                for j in range(n):
                    p = params
                    if params.seed is not None and j:
                        p = replace(params, seed=(params.seed + j) % MAX_SEED)
                    await job.submit(ids, p, f"{response_id}-{len(job.choices)}", first_of_prompt=j == 0)
            # The first prompt's first choice also runs on the candidate, unless the queue is half full
            # (waiting shadow runs count against --max-queue, and must never cost real requests a 429).
            if call.shadow is not None and (self.max_queue is None or 2 * engine.num_waiting < self.max_queue):
                candidate = None if self.is_base(call.shadow) else call.shadow
                job.shadow = self.shadows.start(engine, call.label, call.shadow, candidate, prompts[0], params)
            await job.start()
        except BaseException:
            await job.close()
            raise
        return job, response_id

    async def first_event(self, call: Call, job: Job, adapter: str | None) -> tuple[Choice, RequestOutput]:
        """Wait for a streaming job's first output (so that an adapter that fails to load answers with
        an error status instead of an empty 200 stream); closes the job on failure or disconnect."""
        try:
            first = await until_disconnect(job.next_event(), call.request.receive)
        except BaseException:
            await job.close()
            raise
        assert first is not None  # a job has at least one choice
        choice, out = first
        if out.finished and out.finish_reason == "error" and not choice.token_ids:
            await job.close()
            raise self.generation_error(adapter, out.error)
        return first

    async def finish_job(self, call: Call, job: Job, adapter: str | None) -> None:
        """Run a non-streaming job to the end (abort on disconnect); raise the first choice's error."""
        try:
            await until_disconnect(job.run_to_end(), call.request.receive)
        finally:
            await job.close()
        failed = job.first_error()
        if failed is not None:
            raise self.generation_error(adapter, failed.error)

    def generation_error(self, adapter: str | None, message: str | None) -> LoraplexError:
        """The error to answer when an engine request ended with finish_reason 'error'."""
        if adapter is not None:
            cause = self.require_engine().adapter_error(adapter)
            if isinstance(cause, AdapterError):
                return cause
        return LoraplexError(f"generation failed: {message or 'unknown error'}", code="generation_failed")
