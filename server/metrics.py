"""Every Prometheus metric of the server, in one private registry per app (prefix `loraplex_`).

Counted as requests happen: HTTP requests by endpoint, adapter and status; prompt and generation
tokens by adapter (usage metering per tenant, the same numbers as `usage`); finished engine requests
by reason; histograms of time to first token, time per output token and end-to-end latency.

Read from the engine at scrape time: running / waiting requests, KV block usage, the adapter cache's
hits, misses, evictions, loads and residency per tier, and `loraplex_lora_requests_info`, whose labels
name the adapters with running and waiting requests (as vLLM's `vllm:lora_requests_info`, which
LoRA-aware gateways read for routing).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)

from ..engine.protocol import EngineClient, EngineStatus

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(
        self, get_engine: Callable[[], EngineClient | None], get_status: Callable[[], dict[str, bool]]
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "loraplex_requests",
            "HTTP requests by endpoint, adapter and status",
            ["endpoint", "adapter", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens processed, by adapter", ["adapter"], registry=r
        )
        self.generation_tokens = Counter(
            "loraplex_generation_tokens", "Tokens generated, by adapter", ["adapter"], registry=r
        )
        self.finished = Counter(
            "loraplex_request_finished", "Engine requests finished, by finish reason", ["reason"], registry=r
        )
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "loraplex_time_per_output_token_seconds",
            "Mean time between output tokens of a request",
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "loraplex_e2e_request_latency_seconds",
            "Arrival to last token of a request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._lock = threading.Lock()
        self._inflight: dict[
            str, tuple[str, bool]
        ] = {}  # engine request id -> (adapter, has produced tokens)
        r.register(_ScrapeCollector(self, get_engine, get_status))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- recorded by the request handlers ------------------------------------------------------
    def count_request(self, endpoint: str, adapter: str, status: int) -> None:
        self.requests.labels(endpoint, adapter, str(status)).inc()

    def count_usage(self, adapter: str, prompt_tokens: int, generation_tokens: int) -> None:
        if prompt_tokens:
            self.prompt_tokens.labels(adapter).inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.labels(adapter).inc(generation_tokens)

    def request_queued(self, request_id: str, adapter: str | None) -> None:
        with self._lock:
            self._inflight[request_id] = (adapter or "", False)

    def request_running(self, request_id: str) -> None:
        with self._lock:
            entry = self._inflight.get(request_id)
            if entry is not None:
                self._inflight[request_id] = (entry[0], True)

    def request_done(
        self, request_id: str, reason: str, arrival: float, first_token: float | None, num_output: int
    ) -> None:
        """One engine request ended (any reason): latency histograms and the finish counter."""
        now = time.perf_counter()
        with self._lock:
            self._inflight.pop(request_id, None)
        self.finished.labels(reason).inc()
        if reason not in ("stop", "length"):
            return
        self.e2e.observe(now - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if num_output > 1:
                self.tpot.observe((now - first_token) / (num_output - 1))

    def adapters_by_phase(self) -> tuple[list[str], list[str]]:
        """(adapters with running requests, adapters with only waiting requests), sorted, base excluded."""
        with self._lock:
            entries = list(self._inflight.values())
        running = {a for a, r in entries if a and r}
        waiting = {a for a, r in entries if a and not r} - running
        return sorted(running), sorted(waiting)


class _ScrapeCollector:
    """Gauges and counters read from the engine (and its adapter cache) at scrape time."""

    def __init__(
        self, metrics: ServerMetrics, get_engine: Callable[[], EngineClient | None], get_status
    ) -> None:
        self._metrics, self._get_engine, self._get_status = metrics, get_engine, get_status

    def collect(self) -> Iterator[Metric]:
        status = self._get_status()
        yield _gauge(
            "loraplex_server_ready",
            "1 when the server accepts requests (model built, not draining)",
            status["ready"],
        )
        yield _gauge(
            "loraplex_server_draining",
            "1 while shutting down (finishing in-flight requests)",
            status["draining"],
        )
        engine = self._get_engine()
        if engine is None:
            return
        snap = engine.status()
        yield _gauge(
            "loraplex_num_requests_running", "Requests admitted to the running batch", snap.num_running
        )
        yield _gauge("loraplex_num_requests_waiting", "Requests waiting for admission", snap.num_waiting)
        used, total = snap.kv_blocks_used, snap.kv_blocks_total
        yield _gauge("loraplex_kv_cache_blocks_used", "KV cache blocks in use", used)
        yield _gauge("loraplex_kv_cache_blocks_total", "KV cache blocks in the pool", total)
        yield _gauge(
            "loraplex_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", used / max(1, total)
        )

        running, waiting = self._metrics.adapters_by_phase()
        info = GaugeMetricFamily(
            "loraplex_lora_requests_info",
            "Adapters with running and waiting requests (comma-separated labels); value: scrape time",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric(
            [",".join(running), ",".join(waiting), str(engine.info.max_active_adapters)], time.time()
        )
        yield info
        yield from _cache_metrics(snap.adapter_cache)
        yield from _offload_metrics(snap)
        yield from _prefix_cache_metrics(snap)
        yield from _structured_output_metrics(snap.structured_output)


def _structured_output_metrics(stats: dict) -> Iterator[Metric]:
    """Grammar compiles (engine/grammar.py): seconds, cache hits and misses, constrained requests by kind."""
    if not stats:
        return
    yield HistogramMetricFamily(
        "loraplex_structured_output_compile_seconds",
        "Time to compile a structured output's grammar (cache misses only)",
        buckets=[(str(le), float(n)) for le, n in stats["compile_buckets"]]
        + [("+Inf", float(stats["compile_count"]))],
        sum_value=stats["compile_sum"],
    )
    yield CounterMetricFamily(
        "loraplex_structured_output_cache_hits",
        "Structured requests whose grammar was compiled already (or compiling)",
        value=stats["hits"],
    )
    yield CounterMetricFamily(
        "loraplex_structured_output_cache_misses", "Structured requests that compiled a grammar", value=stats["misses"]
    )
    by_kind = CounterMetricFamily(
        "loraplex_structured_output_requests",
        "Constrained engine requests, by kind (json_schema, json_object, regex, choice, grammar)",
        labels=["kind"],
    )
    for kind, count in sorted(stats["requests_by_kind"].items()):
        by_kind.add_metric([kind], float(count))
    yield by_kind


def _prefix_cache_metrics(snap: EngineStatus) -> Iterator[Metric]:
    yield CounterMetricFamily(
        "loraplex_prefix_cache_queries",
        "Prompt tokens looked up in the prefix cache at admission",
        value=snap.prefix_cache_queries,
    )
    yield CounterMetricFamily(
        "loraplex_prefix_cache_hits",
        "Prompt tokens found in the prefix cache (not computed again)",
        value=snap.prefix_cache_hits,
    )
    yield _gauge(
        "loraplex_prefix_cache_blocks",
        "KV blocks holding a reusable prefix (held or idle)",
        snap.prefix_cache_blocks,
    )
    yield CounterMetricFamily(
        "loraplex_prefix_cache_evictions",
        "Idle cached KV blocks reused for other tokens",
        value=snap.prefix_cache_evictions,
    )


def _offload_metrics(snap: EngineStatus) -> Iterator[Metric]:
    yield _gauge(
        "loraplex_offloaded",
        "1 while the model's device copies are released after idling (--idle-offload-seconds)",
        snap.offloaded,
    )
    yield _gauge(
        "loraplex_device_bytes",
        "Bytes of base weights, adapter slots and KV cache the engine holds on its device (0 offloaded)",
        snap.device_bytes,
    )
    yield CounterMetricFamily("loraplex_offloads", "Idle offloads of the model", value=snap.offloads)
    yield CounterMetricFamily(
        "loraplex_wakeups", "Wake-ups of the model after an idle offload", value=snap.wakeups
    )
    yield SummaryMetricFamily(
        "loraplex_wakeup_seconds",
        "Time to bring the offloaded model back (within the first request's latency)",
        count_value=snap.wakeups,
        sum_value=snap.wakeup_seconds_sum,
    )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _per_tier(name: str, doc: str, kind: type, stats: dict, key: str) -> Metric:
    family = kind(name, doc, labels=["tier"])
    for tier in ("device", "host"):
        family.add_metric([tier], float(stats[tier][key]))
    return family


def _cache_metrics(stats: dict) -> Iterator[Metric]:
    yield _per_tier(
        "loraplex_adapter_cache_hits",
        "Adapter lookups that found it in the tier",
        CounterMetricFamily,
        stats,
        "hits",
    )
    yield _per_tier(
        "loraplex_adapter_cache_misses", "Adapter lookups that did not", CounterMetricFamily, stats, "misses"
    )
    yield _per_tier(
        "loraplex_adapter_cache_evictions",
        "Adapters evicted from the tier",
        CounterMetricFamily,
        stats,
        "evictions",
    )
    yield _per_tier(
        "loraplex_adapters_resident", "Adapters resident in the tier", GaugeMetricFamily, stats, "resident"
    )
    yield _per_tier(
        "loraplex_adapter_cache_bytes",
        "Bytes of adapter weights in the tier",
        GaugeMetricFamily,
        stats,
        "bytes",
    )
    yield CounterMetricFamily(
        "loraplex_adapter_loads", "Adapter loads started (disk or Hub to host)", value=stats["loads"]
    )
    yield CounterMetricFamily(
        "loraplex_adapter_load_failures", "Adapter loads that failed", value=stats["load_failures"]
    )
    yield _gauge("loraplex_adapters_loading", "Adapter loads in progress", stats.get("loading", 0))
    yield _gauge("loraplex_device_slots", "Device adapter slots", stats["device"]["slots"])
    for key, name, doc in (
        (
            "load_seconds",
            "loraplex_adapter_load_seconds",
            "Time to read and validate an adapter into the host tier",
        ),
        (
            "install_seconds",
            "loraplex_adapter_install_seconds",
            "Time to write an adapter into a device slot",
        ),
    ):
        s = stats[key]
        yield SummaryMetricFamily(name, doc, count_value=s["count"], sum_value=s["sum"])
