"""A fake engine for in-process route tests: implements `EngineClient` (engine/protocol.py) with a
character tokenizer and a deterministic "model", so routes, schemas and error mapping are tested in
milliseconds without torch or a subprocess. The real engine's behaviour is tested elsewhere.

Tokens: one per character (id = code point + 1; id 0 is EOS). The text an adapter generates is a
fixed function of (adapter, prompt): `answer(adapter, prompt)`. One-character stop strings end it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncGenerator
from pathlib import Path

from loraplex.engine.protocol import AdapterRow, EngineInfo, EngineStatus, RequestOutput
from loraplex.errors import AdapterError, AdapterNotFoundError, InvalidRequestError, LoraplexError
from loraplex.scheduler.sampling_params import SamplingParams

EOS = 0
ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def answer(adapter: str | None, prompt_ids: list[int], length: int = 64) -> str:
    """What the fake model says: letters chosen by the adapter name and the prompt."""
    seed = sum(prompt_ids) + sum(map(ord, adapter or "base"))
    return "".join(ALPHABET[(seed * 7 + i * (seed % 5 + 1)) % len(ALPHABET)] for i in range(length))


class FakeEngine:
    def __init__(
        self,
        adapters: dict[str, str] | None = None,
        broken: tuple[str, ...] = ("broken",),
        max_model_len: int = 512,
        fail_generation: tuple[str, ...] = (),
    ) -> None:
        self.info = EngineInfo(
            model_name="fake-base",
            dtype="float32",
            device="cpu",
            max_model_len=max_model_len,
            kv_blocks=64,
            block_size=16,
            max_active_adapters=4,
            max_lora_rank=16,
            max_num_seqs=8,
        )
        self.adapters = dict(
            adapters or {"a0": "/adapters/a0", "a1": "/adapters/a1", "broken": "/adapters/broken"}
        )
        self.broken = set(broken)
        self.fail_generation = set(fail_generation)  # adapters whose requests end with an error
        self.loaded: set[str] = set()
        self.in_use: set[str] = set()
        self.registered: set[str] = set()
        self.started = self.stopped = False
        self.submitted: list[tuple[list[int], str | None, SamplingParams]] = []
        self.aborted: list[str] = []
        self.priorities: list[int] = []  # of each submitted request
        self.versions: dict[str, str] = {}  # name -> version key after in-place updates
        self.waiting = 0  # what num_waiting reports (set by tests)
        self.seen_prompts: list[tuple[str | None, list[int]]] = []  # the fake prefix cache
        self.prefix_queries = self.prefix_hits = 0
        self._ids = itertools.count()

    # ---- lifecycle ----
    def start(self) -> None:
        self.started = True

    def run_here(self) -> None:  # nothing to step: the fake answers at once
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    # ---- text ----
    def encode(self, text: str) -> list[int]:
        text.encode("utf-8")  # a lone surrogate fails here, as in a real tokenizer
        return [ord(c) + 1 for c in text]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(t - 1) for t in token_ids if t != EOS)

    def chat_prompt(self, messages: list[dict[str, str]], adapter: str | None = None) -> list[int]:
        return self.encode("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")

    @property
    def eos_token_id(self) -> int | None:
        return EOS

    # ---- requests ----
    def check_request(self, num_prompt_tokens: int, max_tokens: int) -> None:
        self.info.check_request(num_prompt_tokens, max_tokens)  # the real engine's rule on the fake's limits

    async def submit(
        self,
        prompt: str | list[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncGenerator[RequestOutput, None]:
        params = params or SamplingParams()
        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_request(len(ids), params.max_tokens)
        if adapter is not None:
            error = self.admission_error(adapter)
            if error is not None:
                raise error
        self.submitted.append((ids, adapter, params))
        self.priorities.append(priority)
        cached = self._cached_prefix(adapter, ids)
        version = None if adapter is None else self.versions.get(adapter, adapter)
        return self._run(request_id or f"fake-{next(self._ids)}", ids, version, params, cached)

    def _cached_prefix(self, adapter: str | None, ids: list[int]) -> int:
        """The real engine's rule on a simple model: whole blocks of the longest prefix shared with an
        earlier prompt of the same adapter, leaving at least the last prompt token to compute."""
        bs, best = self.info.block_size, 0
        for seen_adapter, seen in self.seen_prompts:
            if seen_adapter == adapter:
                n = next((i for i, (x, y) in enumerate(zip(seen, ids, strict=False)) if x != y), min(len(seen), len(ids)))
                best = max(best, n)
        self.seen_prompts.append((adapter, list(ids)))
        cached = min(best // bs, (len(ids) - 1) // bs) * bs
        self.prefix_queries += len(ids)
        self.prefix_hits += cached
        return cached

    async def _run(
        self, request_id: str, ids: list[int], adapter: str | None, params: SamplingParams, cached: int = 0
    ) -> AsyncGenerator[RequestOutput, None]:
        if adapter in self.fail_generation:
            yield RequestOutput(request_id, [], "", True, "error", "the fake model failed", None, len(ids), 0)
            return
        text = answer(adapter, ids, params.max_tokens)
        done = False
        try:
            for i, ch in enumerate(text):
                await asyncio.sleep(0)
                token = ord(ch) + 1
                last = i == len(text) - 1
                if ch in params.stop:  # the fake matches one-character stop strings only
                    done = True
                    yield self._out(request_id, token, "", True, "stop", ids, i + 1, params, cached, adapter)
                    return
                done = last
                yield self._out(
                    request_id, token, ch, last, "length" if last else None, ids, i + 1, params, cached, adapter
                )
        finally:
            if not done:
                self.aborted.append(request_id)

    def _out(self, rid, token, text, finished, reason, ids, n, params, cached=0, version=None) -> RequestOutput:
        logprobs = None
        if params.logprobs is not None:
            top = [(token, -0.5), (token + 1, -1.5), (token + 2, -2.5)][: params.logprobs]
            logprobs = [(token, -0.5, top)]
        return RequestOutput(rid, [token], text, finished, reason, None, logprobs, len(ids), n, cached, version)

    def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return True

    @property
    def num_waiting(self) -> int:
        return self.waiting

    def status(self) -> EngineStatus:
        tier = {"hits": 3, "misses": 1, "evictions": 0, "resident": len(self.loaded), "bytes": 1024}
        stats = {
            "device": {**tier, "slots": 4},
            "host": dict(tier),
            "loads": 2,
            "load_failures": 1,
            "loading": 0,
            "load_seconds": {"count": 2, "sum": 0.5},
            "install_seconds": {"count": 2, "sum": 0.1},
        }
        return EngineStatus(
            1,
            self.waiting,
            5,
            64,
            stats,
            False,
            4096,
            0,
            0,
            0.0,
            prefix_cache_queries=self.prefix_queries,
            prefix_cache_hits=self.prefix_hits,
            prefix_cache_blocks=self.prefix_hits // self.info.block_size,
            prefix_cache_evictions=0,
        )

    # ---- adapters ----
    def admission_error(self, adapter: str) -> LoraplexError | None:
        if adapter not in self.adapters:
            return AdapterNotFoundError(adapter, "unknown adapter")
        return self.adapter_error(adapter)

    def adapter_error(self, adapter: str) -> LoraplexError | None:
        if adapter in self.broken:
            return AdapterError(adapter, "adapter_config.json is not valid JSON")
        return None

    def list_adapters(self) -> list[AdapterRow]:
        rows = []
        for name in sorted(self.adapters):
            tier = "failed" if name in self.broken else ("device" if name in self.loaded else "disk")
            rows.append(AdapterRow(name, tier, self.versions.get(name, name)))
        return rows

    def register_adapter(self, name: str, path: str) -> bool:
        current = self.adapters.get(name)
        if current is not None:
            if Path(current).resolve() != Path(path).resolve():
                raise InvalidRequestError(f"'{name}' is registered with another path", param="lora_name")
            return False
        self.adapters[name] = path
        self.registered.add(name)
        return True

    def unregister_adapter(self, name: str) -> bool:
        if name not in self.registered:
            return False
        self.registered.discard(name)
        self.adapters.pop(name, None)
        return True

    def update_adapter(self, name: str, path: str, timeout: float) -> str:
        """A new version NAME#n (its text differs); a path whose folder is named 'broken' fails."""
        if Path(path).name == "broken":
            raise AdapterError(name, "adapter_config.json is not valid JSON")
        current = self.versions.get(name, name)
        if Path(self.adapters[name]).resolve() == Path(path).resolve():
            return current
        self.adapters[name] = path
        n = int(current.rsplit("#", 1)[1]) + 1 if "#" in current else 2
        self.versions[name] = f"{name}#{n}"
        return self.versions[name]

    def load_adapter(self, name: str, timeout: float) -> None:
        error = self.admission_error(name)
        if error is not None:
            raise error
        self.loaded.add(name)

    def unload_adapter(self, name: str) -> bool:
        if name in self.in_use:
            raise AdapterError(name, "requests are using it", code="adapter_in_use")
        if name not in self.loaded:
            return False
        self.loaded.discard(name)
        return True
