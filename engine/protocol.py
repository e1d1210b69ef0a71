"""What the HTTP server (server/), the playground and the Ray app may ask of an engine: one typed
interface, `EngineClient`, and the plain data it hands back. No torch here (server/ imports this).

`AsyncEngine` (engine/async_engine.py) implements it over the real engine; tests implement it with a
small fake to exercise routes, schemas and error mapping in-process.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..errors import InvalidRequestError, LoraplexError
from ..scheduler.sampling_params import SamplingParams

TokenLogprob = tuple[int, float, list[tuple[int, float]]]  # (token id, logprob, top alternatives)


@dataclass
class RequestOutput:
    """What one step produced for one request (streamed to its caller)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str  # text safe to show now (never past a stop string, never half a character)
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    new_logprobs: list[TokenLogprob] | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (usage.cached_tokens)
    # the adapter version that serves the request (`NAME`, or `NAME#2`... after in-place updates); None: base
    adapter_version: str | None = None


@dataclass(frozen=True)
class EngineInfo:
    """What does not change while the engine runs (GET /info, limits the server checks up front)."""

    model_name: str  # the base model's own name (the served name may differ)
    dtype: str  # "bfloat16", ...
    device: str  # "cpu", "cuda:0", ...
    max_model_len: int  # prompt + generated tokens
    kv_blocks: int
    block_size: int
    max_active_adapters: int  # device slots
    max_lora_rank: int
    max_num_seqs: int
    # Sampling fields the model's generation_config.json sets (Config.generation_config "auto"), used for
    # requests that leave them out; empty: plain OpenAI defaults (OPENAI_SAMPLING_DEFAULTS).
    sampling_defaults: dict[str, float] = field(default_factory=dict)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.kv_blocks * self.block_size

    def check_request(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """The one rule for whether a request can ever run: a non-empty prompt, and prompt + max_tokens
        within the context length and within the whole KV cache (a longer sequence could never hold
        its blocks). Raises InvalidRequestError (code context_length_exceeded for the limits)."""
        if num_prompt_tokens < 1:
            raise InvalidRequestError("prompt is empty", param="prompt")
        total = num_prompt_tokens + max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens, but the prompt "
                f"({num_prompt_tokens} tokens) + max_tokens ({max_tokens}) asks for {total}.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        if total > self.kv_capacity_tokens:
            raise InvalidRequestError(
                f"prompt + max_tokens ({total} tokens) is over the KV cache capacity "
                f"({self.kv_capacity_tokens} tokens)",
                param="max_tokens",
                code="context_length_exceeded",
            )


@dataclass
class AdapterRow:
    """One adapter the engine knows and where it is now."""

    name: str
    tier: str  # device | host | loading | failed | disk
    version: str | None = None  # the version new requests get (`NAME#2`... after in-place updates)
    retiring: tuple[str, ...] = ()  # replaced versions still finishing their requests


@dataclass
class EngineStatus:
    """A snapshot of the live numbers (GET /v1/status, /metrics)."""

    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    # adapter cache counters: {"device": {...}, "host": {...}, "loads", "load_failures", "loading"}
    adapter_cache: dict[str, Any] = field(default_factory=dict)
    offloaded: bool = False
    device_bytes: int = 0
    offloads: int = 0
    wakeups: int = 0
    wakeup_seconds_sum: float = 0.0
    # prefix cache (tokens looked up / found at admission; keyed blocks now; cached blocks evicted)
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_blocks: int = 0
    prefix_cache_evictions: int = 0
    # structured outputs (engine/grammar.py GrammarStats.snapshot): compile cache hits / misses, the
    # compile-seconds histogram ("compile_buckets": [(le, count)], "compile_sum", "compile_count"),
    # "requests_by_kind"
    structured_output: dict[str, Any] = field(default_factory=dict)


class EngineClient(Protocol):
    """The engine as the server sees it. Methods not marked async return at once (no model compute);
    `list_adapters` and `load_adapter` may touch the disk: call them off the event loop."""

    @property
    def info(self) -> EngineInfo: ...

    def start(self) -> None:
        """Start stepping on a thread of its own (idempotent)."""

    def run_here(self) -> None:
        """Step on the calling thread until stop(): for the thread that built the engine (one thread
        runs every model op; see AsyncEngine.run_here)."""

    def stop(self) -> None:
        """Stop stepping and release background loaders (at shutdown)."""

    # ---- text ----
    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def chat_prompt(self, messages: list[dict[str, str]], adapter: str | None = None) -> list[int]:
        """Token ids of `messages` through the chat template (the adapter's own when it ships one)."""

    @property
    def eos_token_id(self) -> int | None: ...

    # ---- requests ----
    def check_request(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise InvalidRequestError when a request of this size can never run (empty prompt; code
        context_length_exceeded when prompt + max_tokens is over the context or the KV cache). `submit`
        applies the same rule; the server calls this up front, before it queues anything."""

    async def submit(
        self,
        prompt: str | list[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Queue a request; iterate its outputs until finished. Validation errors raise here. Closing the
        iterator early aborts the request. It runs on the adapter version current at submission (each
        output names it). `priority` > 0: background work (shadow runs), admitted into spare capacity."""

    def abort(self, request_id: str) -> bool: ...

    @property
    def num_waiting(self) -> int:
        """Requests queued for admission (the server's --max-queue check)."""

    def status(self) -> EngineStatus: ...

    # ---- adapters ----
    def admission_error(self, adapter: str) -> LoraplexError | None:
        """Why a request for `adapter` cannot be admitted now (unknown, failed to load), or None."""

    def adapter_error(self, adapter: str) -> LoraplexError | None:
        """The cause of `adapter`'s last failed load, if any."""

    def list_adapters(self) -> list[AdapterRow]: ...

    def register_adapter(self, name: str, path: str) -> bool:
        """Serve the PEFT directory `path` under `name`; False if `name` already names that same path.
        Raises InvalidRequestError when `name` is taken by another path or an adapter-dir folder."""

    def unregister_adapter(self, name: str) -> bool:
        """Forget an adapter registered by `register_adapter` (after unloading it), with its versions."""

    def update_adapter(self, name: str, path: str, timeout: float) -> str:
        """In-place update of the served adapter `name`: load and validate the PEFT directory `path` as
        its new version (waiting up to `timeout` s) and route new requests to it; in-flight requests
        finish on the old version, whose slot is freed after them. Returns the new version. Raises the
        AdapterError of a failed load, leaving the old version serving."""

    def load_adapter(self, name: str, timeout: float) -> None:
        """Load `name` into the host tier (validated), waiting up to `timeout` s; raises AdapterError."""

    def unload_adapter(self, name: str) -> bool:
        """Drop `name` from the device and host tiers; False if it was not loaded. Raises AdapterError
        (code adapter_in_use) while requests use it."""
