"""Structured outputs with xgrammar: compile a request's `StructuredOutput` once (LRU cache keyed by its
canonical text), give each sequence its own matcher, and mask a step's logits to what the grammars allow.

    compile:  GrammarCache.submit(spec) -> Future[CompiledGrammar]   (a worker thread; cached, deduplicated)
    request:  GrammarCache.matcher(compiled) -> GrammarState           (one per sequence: n > 1 gets n)
    step:     GrammarCache.apply_masks(logits, states)                 (in place, before penalties and sampling)
    finish:   GrammarState.accept(token) after the token is appended; EOS is allowed once the grammar is complete

xgrammar is imported on the first structured request only (it costs ~1 s of imports), in the compile
thread. Compiles release the GIL, so the step loop keeps stepping while one runs; the server waits for a
compile with a time limit (AsyncEngine.submit), and a compile over it fails only its own request (the
compile finishes in the background and is cached for the next request with that schema).

JSON kinds compile without free whitespace (`any_whitespace=False`, separators ", " and ": "): a small
model sampling at temperature 1 could otherwise emit whitespace until max_tokens.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..cpu_threads import limit_this_thread
from ..errors import InvalidRequestError
from ..scheduler.structured_output import StructuredOutput

COMPILE_THREADS = 2
COMPILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_CPP_PREFIX = re.compile(r"^\[[0-9:]+\] \S+?:\d+: ")  # "[06:29:51] /project/cpp/x.cc:94: " before messages


@dataclass
class GrammarStats:
    """Counters for /metrics: cache hits and misses, the compile-seconds histogram, requests by kind."""

    hits: int = 0
    misses: int = 0
    compile_failures: int = 0
    compile_sum: float = 0.0
    compile_buckets: list[int] = field(default_factory=lambda: [0] * len(COMPILE_BUCKETS))
    compile_count: int = 0
    requests_by_kind: dict[str, int] = field(default_factory=dict)

    def observe_compile(self, seconds: float) -> None:
        self.compile_count += 1
        self.compile_sum += seconds
        for i, le in enumerate(COMPILE_BUCKETS):
            if seconds <= le:
                self.compile_buckets[i] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "hits": self.hits,
            "misses": self.misses,
            "compile_failures": self.compile_failures,
            "compile_count": self.compile_count,
            "compile_sum": self.compile_sum,
            "compile_buckets": list(zip(COMPILE_BUCKETS, self.compile_buckets, strict=True)),
            "requests_by_kind": dict(self.requests_by_kind),
        }


class GrammarState:
    """One sequence's matcher: the grammar state after the tokens it has emitted (kept across
    preemptions, which recompute K/V but never re-emit tokens)."""

    def __init__(self, matcher: Any, not_stop: torch.Tensor, also: torch.Tensor | None = None) -> None:
        self.matcher = matcher
        self._not_stop = not_stop  # [ceil(vocab / 32)] int32: every bit set but the stop tokens'
        self.also = also  # [ceil(vocab / 32)] int32 ANDed into the grammar's mask (JSON: no raw control bytes)

    def accept(self, token_id: int) -> bool:
        return bool(self.matcher.accept_token(token_id))

    @property
    def is_terminated(self) -> bool:
        return bool(self.matcher.is_terminated())

    def only_stop_allowed(self) -> bool:
        """The grammar is complete and nothing but a stop token may follow (e.g. after a JSON object's
        closing brace): the request can end now instead of spending a step on the forced EOS."""
        if not self.matcher.is_completed():
            return False
        bitmask = torch.zeros((1, self._not_stop.shape[0]), dtype=torch.int32)
        self.matcher.fill_next_token_bitmask(bitmask, 0)
        return not bool((bitmask.numpy()[0] & self._not_stop.numpy()).any())


class GrammarCache:
    """Compiles `StructuredOutput`s for one tokenizer and vocabulary, keeps the last `capacity` of them."""

    def __init__(
        self,
        get_tokenizer: Callable[[], Any | None],
        vocab_size: int,  # the lm_head's rows (may exceed the tokenizer's vocabulary: padding)
        stop_token_ids: Iterable[int],
        capacity: int = 256,
    ) -> None:
        self._get_tokenizer = get_tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self.capacity = capacity
        self.stats = GrammarStats()
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._inflight: dict[tuple[str, str], Future[Any]] = {}
        # two workers: one slow compile does not hold up a different schema queued behind it
        # (their torch ops, e.g. the masks, stay on their own thread: cpu_threads.py)
        self._pool = ThreadPoolExecutor(
            max_workers=COMPILE_THREADS, thread_name_prefix="loraplex-grammar", initializer=limit_this_thread
        )
        self._compiler_lock = threading.Lock()
        self._compiler: Any = None  # xgrammar.GrammarCompiler, built in the pool on first use
        self._not_stop: torch.Tensor | None = None
        self._json_mask: torch.Tensor | None = None
        self._bitmask: torch.Tensor | None = None  # reused by apply_masks, step after step

    def submit(self, spec: StructuredOutput) -> Future[Any]:
        """The compiled grammar of `spec`: done at once from the cache, else compiling in the worker
        thread (one compile per key at a time; concurrent requests for it share that future)."""
        with self._lock:
            compiled = self._cache.get(spec.key)
            if compiled is not None:
                self._cache.move_to_end(spec.key)
                self.stats.hits += 1
                done: Future[Any] = Future()
                done.set_result(compiled)
                return done
            running = self._inflight.get(spec.key)
            if running is not None:
                self.stats.hits += 1
                return running
            self.stats.misses += 1
            future = self._pool.submit(self._compile, spec)
            self._inflight[spec.key] = future
            return future

    def compile(self, spec: StructuredOutput, timeout: float | None = None) -> Any:
        """Blocking `submit` (offline use and tests); raises InvalidRequestError on a bad spec."""
        return self.submit(spec).result(timeout)

    def matcher(self, compiled: Any, kind: str = "grammar") -> GrammarState:
        import xgrammar as xgr

        if self._not_stop is None:
            words = -(-self.vocab_size // 32)
            not_stop = torch.full((words,), -1, dtype=torch.int32)
            for token in compiled.tokenizer_info.stop_token_ids:
                if 0 <= token < self.vocab_size:
                    not_stop[token // 32] &= ~(1 << (token % 32)) if token % 32 < 31 else 0x7FFFFFFF
            self._not_stop = not_stop
        also = self._json_text_mask(compiled) if kind in ("json_schema", "json_object") else None
        return GrammarState(xgr.GrammarMatcher(compiled), self._not_stop, also)

    def _json_text_mask(self, compiled: Any) -> torch.Tensor:
        """Tokens without bytes below 0x20, plus the stop tokens. JSON never holds such a byte raw (only
        escaped), and our JSON grammars allow no free whitespace, yet xgrammar's string rule for a
        length-bounded string lets them through, which would break strict JSON parsers."""
        if self._json_mask is None:
            info = compiled.tokenizer_info
            mask = torch.zeros((-(-self.vocab_size // 32)) * 32, dtype=torch.bool)
            for token, text in enumerate(info.decoded_vocab[: self.vocab_size]):
                mask[token] = bool(text) and min(text) >= 0x20
            for token in info.stop_token_ids:
                if 0 <= token < self.vocab_size:
                    mask[token] = True
            self._json_mask = _pack_bits(mask)
        return self._json_mask

    def count_request(self, kind: str) -> None:
        with self._lock:
            self.stats.requests_by_kind[kind] = self.stats.requests_by_kind.get(kind, 0) + 1

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- the step (the step loop's thread only) ---------------------------------------------------
    def apply_masks(
        self,
        logits: torch.Tensor,  # [B, vocab] the step's logits of the sampled rows; masked in place
        states: Sequence[GrammarState | None],  # per row; None = unconstrained (costs nothing)
    ) -> None:
        """Set every logit a row's grammar forbids to -inf. Only constrained rows are filled and masked.

        Bit work goes through numpy views (single-threaded, no per-op thread start-up): on a loaded
        2-core machine a handful of small torch ops per step cost more than the matchers themselves."""
        rows = [i for i, s in enumerate(states) if s is not None]
        if not rows:
            return
        import xgrammar as xgr

        batch, vocab = logits.shape
        if self._bitmask is None or self._bitmask.shape[0] < batch or self._bitmask.shape[1] * 32 < vocab:
            self._bitmask = xgr.allocate_token_bitmask(max(batch, 64), vocab)  # [rows, ceil(vocab / 32)] int32
        bitmask = self._bitmask[:batch]  # rows not filled below are never applied (indices=rows)
        narrow: list[int] = []  # rows whose grammar mask is narrowed further (JSON: no raw control bytes)
        also: torch.Tensor | None = None
        for i in rows:
            state = states[i]
            assert state is not None
            state.matcher.fill_next_token_bitmask(bitmask, i)
            if state.also is not None:
                narrow.append(i)
                also = state.also  # every JSON row shares the same one
        if also is not None:  # one AND for all of them
            words = bitmask.numpy()
            grammar_mask = words[narrow]  # [N, W]
            narrowed = grammar_mask & also.numpy()
            # never narrow to nothing: the grammar's own mask then stands
            words[narrow] = np.where(narrowed.any(axis=1, keepdims=True), narrowed, grammar_mask)
        if logits.device.type == "cpu":
            xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab, indices=rows)
        else:
            device_mask = bitmask.to(logits.device, non_blocking=True)
            xgr.apply_token_bitmask_inplace(logits, device_mask, vocab_size=vocab, indices=rows)

    # ---- the worker thread ----------------------------------------------------------------------
    def _compile(self, spec: StructuredOutput) -> Any:
        t0 = time.perf_counter()
        try:
            compiled = self._compile_uncached(spec)
        except InvalidRequestError:
            with self._lock:
                self.stats.compile_failures += 1
                self._inflight.pop(spec.key, None)
            raise
        except Exception as exc:  # xgrammar raises RuntimeError with the parser's message
            with self._lock:
                self.stats.compile_failures += 1
                self._inflight.pop(spec.key, None)
            raise InvalidRequestError(
                f"'{spec.param}' is invalid: {_clean(str(exc))}", param=spec.param, code="invalid_structured_output"
            ) from exc
        if spec.kind in ("json_schema", "json_object"):
            self._json_text_mask(compiled)  # built once, here rather than in the caller's thread
        seconds = time.perf_counter() - t0
        with self._lock:
            self.stats.observe_compile(seconds)
            self._cache[spec.key] = compiled
            self._cache.move_to_end(spec.key)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
            self._inflight.pop(spec.key, None)
        return compiled

    def _compile_uncached(self, spec: StructuredOutput) -> Any:
        compiler = self._xgrammar_compiler(spec.param)
        if spec.kind == "json_schema":
            return compiler.compile_json_schema(spec.spec, any_whitespace=False, strict_mode=True)
        if spec.kind == "json_object":  # any object: strict mode off, or only {} would be allowed
            return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        if spec.kind == "regex":
            return compiler.compile_regex(spec.spec)
        if spec.kind == "choice":
            return compiler.compile_grammar(choice_ebnf(spec.choices))
        return compiler.compile_grammar(spec.spec)

    def _xgrammar_compiler(self, param: str) -> Any:
        with self._compiler_lock:
            return self._compiler or self._build_compiler(param)

    def _build_compiler(self, param: str) -> Any:
        if self._compiler is None:
            import xgrammar as xgr

            tokenizer = self._get_tokenizer()
            if tokenizer is None:
                raise InvalidRequestError(
                    "structured outputs need the model's tokenizer, and this model has none", param=param
                )
            info = xgr.TokenizerInfo.from_huggingface(
                tokenizer, vocab_size=self.vocab_size, stop_token_ids=self._stop_token_ids or None
            )
            # xgrammar's own cache is off: ours is keyed by the request's canonical text and bounded
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:  # [32 * W] bool -> [W] int32, bit j of word w = token 32w + j
    words = mask.view(-1, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
    packed = words.sum(dim=1)  # [W] in [0, 2**32)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def choice_ebnf(choices: list[str]) -> str:
    """`root ::= "a" | "b"`: exactly one of the strings, as a grammar of string literals."""
    return "root ::= " + " | ".join(_ebnf_literal(c) for c in choices)


def _ebnf_literal(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _clean(message: str) -> str:
    lines = [_CPP_PREFIX.sub("", line).strip() for line in message.strip().splitlines()]
    return " ".join(line for line in lines if line)
