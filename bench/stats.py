"""Load-test statistics: the per-request result, the one percentile of the load generator, and the
summary of a run (counts, errors by kind, throughput, latency distributions). Tables and plots of
these summaries are in `report`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestResult:
    """One request as the client saw it. Times are time.perf_counter() seconds; latencies in seconds."""

    index: int
    model: str
    start: float
    end: float = 0.0
    error: str | None = None  # http_<status>, stream_error, timeout, connect, transport, incomplete
    detail: str = ""
    ttft: float | None = None  # send -> first content chunk
    latency: float | None = None  # send -> [DONE]
    itl: list[float] = field(default_factory=list)  # gaps between content chunks
    output_tokens: int = 0  # from the usage chunk, else the number of content chunks
    prompt_tokens: int | None = None

    def failed(self, kind: str, detail: str) -> RequestResult:
        self.end, self.error, self.detail = _now(), kind, detail
        return self

    def succeeded(self, chunk_times: list[float], end: float) -> RequestResult:
        self.end = end
        self.latency = end - self.start
        if chunk_times:
            self.ttft = chunk_times[0] - self.start
            self.itl = [b - a for a, b in zip(chunk_times, chunk_times[1:], strict=False)]
        if not self.output_tokens:  # the server sent no usage
            self.output_tokens = len(chunk_times)
        return self

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (latency - ttft) / (output_tokens - 1)."""
        if self.ttft is None or self.latency is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def _now() -> float:
    import time

    return time.perf_counter()


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {"mean": sum(values) / len(values) if values else None}
    out.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return out


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """Counts, errors by kind, throughput over `duration` (first send to last finish) and latency
    percentiles of the successful requests."""
    ok = [r for r in results if r.error is None]
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "num_requests": len(results),
        "num_ok": len(ok),
        "num_errors": len(results) - len(ok),
        "errors": dict(sorted(errors.items())),
        "distinct_models": len({r.model for r in results}),
        "duration_s": duration,
        "output_tokens": output_tokens,
        "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "ttft": distribution([r.ttft for r in ok if r.ttft is not None]),
        "tpot": distribution([t for r in ok if (t := r.tpot) is not None]),
        "itl": distribution([g for r in ok for g in r.itl]),
        "e2e": distribution([r.latency for r in ok if r.latency is not None]),
    }
