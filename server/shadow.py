"""Shadow traffic: a sampled fraction of a route's requests also runs on a candidate version, at
background priority (the scheduler admits it only into spare capacity and preempts it first). The
candidate's output is never returned; each (primary, candidate) pair is compared once both ended:

    exact match     the candidate's text equals the primary's
    length diff     candidate tokens - primary tokens (mean, and mean of the absolute value)
    latency         submission to last token of the candidate (and of the primary, to compare)
    JSON            for pairs whose primary text parses as JSON: whether the candidate's does too

A pair whose primary did not complete (client gone, error) is dropped; a candidate that fails counts
as an error. Figures are kept per (alias, candidate) and read by GET /v1/routes/{alias}/shadow and
/metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

from ..engine.protocol import EngineClient
from ..scheduler.sampling_params import SamplingParams

log = logging.getLogger(__name__)

SHADOW_PRIORITY = 1  # background: below every real request
LATENCY_WINDOW = 2048  # latest candidate latencies kept for percentiles


@dataclass
class ShadowStats:
    """Comparison figures of one candidate on one route."""

    pairs: int = 0
    exact_matches: int = 0
    length_diff_sum: int = 0  # candidate - primary tokens, summed
    abs_length_diff_sum: int = 0
    candidate_seconds_sum: float = 0.0
    primary_seconds_sum: float = 0.0
    json_pairs: int = 0  # pairs whose primary text is JSON
    json_both_parse: int = 0
    errors: int = 0  # candidate runs that failed
    dropped: int = 0  # pairs whose primary did not complete
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def add(self, primary: tuple[str, int, float], candidate: tuple[str, int, float]) -> None:
        (p_text, p_tokens, p_seconds), (c_text, c_tokens, c_seconds) = primary, candidate
        self.pairs += 1
        self.exact_matches += p_text == c_text
        self.length_diff_sum += c_tokens - p_tokens
        self.abs_length_diff_sum += abs(c_tokens - p_tokens)
        self.candidate_seconds_sum += c_seconds
        self.primary_seconds_sum += p_seconds
        self.latencies.append(c_seconds)
        if _parses(p_text):
            self.json_pairs += 1
            self.json_both_parse += _parses(c_text)

    def to_json(self) -> dict[str, Any]:
        n = self.pairs
        ordered = sorted(self.latencies)
        return {
            "pairs": n,
            "exact_matches": self.exact_matches,
            "exact_match_rate": self.exact_matches / n if n else None,
            "mean_length_diff_tokens": self.length_diff_sum / n if n else None,
            "mean_abs_length_diff_tokens": self.abs_length_diff_sum / n if n else None,
            "candidate_latency_seconds": {
                "mean": self.candidate_seconds_sum / n if n else None,
                "p50": _quantile(ordered, 0.5),
                "p99": _quantile(ordered, 0.99),
            },
            "primary_latency_seconds": {"mean": self.primary_seconds_sum / n if n else None},
            "json": {
                "pairs": self.json_pairs,
                "both_parse": self.json_both_parse,
                "both_parse_rate": self.json_both_parse / self.json_pairs if self.json_pairs else None,
            },
            "errors": self.errors,
            "dropped": self.dropped,
        }


def _parses(text: str) -> bool:
    stripped = text.strip()
    if not stripped or stripped[0] not in "{[":  # JSON responses are objects or arrays
        return False
    try:
        json.loads(stripped)
    except ValueError:
        return False
    return True


def _quantile(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class ShadowRun:
    """One candidate run paired with one primary request."""

    def __init__(self, owner: ShadowRunner, alias: str, version: str) -> None:
        self.owner, self.alias, self.version = owner, alias, version
        self.primary: asyncio.Future[tuple[str, int, float] | None] = asyncio.get_running_loop().create_future()

    def primary_done(self, result: tuple[str, int, float] | None) -> None:
        """The primary ended: (text, output tokens, seconds), or None when it did not complete."""
        if not self.primary.done():
            self.primary.set_result(result)


class ShadowRunner:
    """Starts candidate runs and keeps their comparison figures (thread-safe reads for /metrics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[tuple[str, str], ShadowStats] = {}
        self._tasks: set[asyncio.Task] = set()  # strong references until each run ends

    def start(
        self,
        engine: EngineClient,
        alias: str,
        version: str,
        adapter: str | None,
        prompt_ids: list[int],
        params: SamplingParams,
    ) -> ShadowRun:
        """Run the candidate `version` (engine `adapter`: None for the base model) on one prompt."""
        run = ShadowRun(self, alias, version)
        # The candidate needs no logprobs; everything that decides its text stays the same.
        task = asyncio.create_task(self._run(engine, run, adapter, list(prompt_ids), replace(params, logprobs=None)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return run

    async def _run(
        self, engine: EngineClient, run: ShadowRun, adapter: str | None, ids: list[int], params: SamplingParams
    ) -> None:
        t0 = time.perf_counter()
        texts: list[str] = []
        tokens, failed = 0, False
        stream = None
        try:
            stream = await engine.submit(ids, adapter, params, f"shadow-{uuid.uuid4().hex}", SHADOW_PRIORITY)
            async for out in stream:
                texts.append(out.new_text)
                tokens = out.num_output_tokens
                if out.finished and out.finish_reason not in ("stop", "length"):
                    failed = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the candidate alone fails; the primary never hears of it
            log.warning("shadow run on %r for alias %r failed: %s", run.version, run.alias, exc)
            failed = True
        finally:
            if stream is not None:
                with contextlib.suppress(Exception):
                    await stream.aclose()
        seconds = time.perf_counter() - t0
        primary = await run.primary
        with self._lock:
            stats = self._stats.setdefault((run.alias, run.version), ShadowStats())
            if primary is None:
                stats.dropped += 1
            elif failed:
                stats.errors += 1
            else:
                stats.add(primary, ("".join(texts), tokens, seconds))

    def stats(self, alias: str) -> dict[str, dict[str, Any]]:
        """{candidate version: figures} of one alias."""
        with self._lock:
            return {v: s.to_json() for (a, v), s in sorted(self._stats.items()) if a == alias}

    def snapshot(self) -> list[tuple[str, str, ShadowStats]]:
        """(alias, candidate, copy of its figures) for the metrics scrape."""
        with self._lock:
            return [(a, v, replace(s, latencies=deque())) for (a, v), s in sorted(self._stats.items())]

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
