"""Load generator for any OpenAI-compatible server: drives one load point (`loraplex bench`).

Every request streams (`stream_options.include_usage`), so each one yields its time to first token, the
gaps between content chunks (inter-token latency), its end-to-end latency and its output token count (the
final usage chunk; the number of content chunks when a server sends no usage). Open-loop requests are
sent at their scheduled times; closed-loop clients each send the next request when the last one ends.
What to send (config, adapters, arrivals, prompts) comes from `workload`; the summary from `stats`.

Bounds: at most `num_requests` requests, none sent after `duration` seconds, and each one cut off after
`timeout` seconds, so a run ends within duration + timeout. Only loopback URLs unless `allow_remote`.

    result = asyncio.run(run_benchmark(BenchConfig(models=("a0", "a1"), rate=2.0, num_requests=20)))
    print(result.summary["output_throughput"], result.summary["ttft"]["p99"])
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from .stats import RequestResult, summarize
from .workload import BenchConfig, LengthSpec, RequestSpec, build_workload, iter_workload


@dataclass
class BenchResult:
    config: BenchConfig
    models: list[str]  # the names drawn from
    results: list[RequestResult]
    duration: float  # first send to last finish
    summary: dict[str, Any] = field(default_factory=dict)

    def to_json(self, with_requests: bool = False) -> dict:
        config = {k: (str(v) if isinstance(v, LengthSpec) else v) for k, v in asdict(self.config).items()}
        config["api_key"] = None if self.config.api_key is None else "***"
        config["models"] = self.models
        out: dict[str, Any] = {"config": config, "summary": self.summary}
        if with_requests:
            out["requests"] = [asdict(r) for r in self.results]
        return out


def base_url(url: str) -> str:
    """The server of a URL: http://h:p, http://h:p/ and http://h:p/v1 all mean http://h:p."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


# ---- one request ----------------------------------------------------------------------------------
def _payload(cfg: BenchConfig, spec: RequestSpec) -> dict:
    body: dict[str, Any] = {
        "model": spec.model,
        "max_tokens": spec.max_tokens,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": cfg.ignore_eos,
        "seed": cfg.seed + spec.index,
    }
    if cfg.endpoint == "completions":
        body["prompt"] = spec.prompt
    elif isinstance(spec.prompt, str):
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["messages"] = spec.prompt
    return body


def _chunk_text(chunk: dict) -> str:
    text = ""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        text += (delta.get("content") or "") if isinstance(delta, dict) else (choice.get("text") or "")
    return text


async def send_request(client: Any, cfg: BenchConfig, spec: RequestSpec) -> RequestResult:
    """Send one streamed request; never raises (failures come back with an error kind)."""
    import httpx

    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    result = RequestResult(index=spec.index, model=spec.model, start=time.perf_counter())
    chunk_times: list[float] = []
    done = False
    try:
        async with asyncio.timeout(cfg.timeout):
            async with client.stream("POST", path, json=_payload(cfg, spec), headers=headers) as resp:
                if resp.status_code != 200:
                    body = (await resp.aread()).decode(errors="replace")
                    return result.failed(f"http_{resp.status_code}", body[:300])
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        return result.failed("stream_error", json.dumps(chunk["error"])[:300])
                    if _chunk_text(chunk):
                        chunk_times.append(time.perf_counter())
                    usage = chunk.get("usage")
                    if usage:
                        result.prompt_tokens = usage.get("prompt_tokens")
                        result.output_tokens = usage.get("completion_tokens")
    except (TimeoutError, httpx.TimeoutException):
        return result.failed("timeout", f"no complete answer within {cfg.timeout} s")
    except httpx.ConnectError as exc:
        return result.failed("connect", str(exc))
    except httpx.HTTPError as exc:
        return result.failed("transport", f"{type(exc).__name__}: {exc}")
    except (json.JSONDecodeError, AttributeError) as exc:
        return result.failed("bad_response", str(exc))
    if not done:
        return result.failed("incomplete", "the stream ended without [DONE]")
    return result.succeeded(chunk_times, time.perf_counter())


# ---- the run --------------------------------------------------------------------------------------
async def list_models(client: Any, api_key: str | None) -> list[str]:
    """The adapters the server lists (`parent` set); all its models when none has a parent."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    resp = await client.get("/v1/models", headers=headers)
    resp.raise_for_status()
    cards = resp.json()["data"]
    adapters = [c["id"] for c in cards if c.get("parent")]
    return adapters or [c["id"] for c in cards]


class _Progress:
    """A one-line stderr bar: done / total, errors, elapsed of the duration bound."""

    def __init__(self, cfg: BenchConfig, label: str, enabled: bool) -> None:
        self.cfg, self.label, self.enabled = cfg, label, enabled
        self.total = cfg.num_requests
        if cfg.rate is not None and not math.isinf(cfg.rate):
            self.total = min(cfg.num_requests, max(1, round(cfg.rate * cfg.duration)))
        self.done = self.errors = 0
        self.t0 = time.perf_counter()

    def add(self, result: RequestResult) -> None:
        self.done += 1
        self.errors += result.error is not None

    def draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        frac = 1.0 if final else min(1.0, max(self.done / self.total, elapsed / self.cfg.duration))
        bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done} done, {self.errors} errors, {elapsed:6.1f} s")
        sys.stderr.write("\n" if final else "")
        sys.stderr.flush()


async def run_benchmark(cfg: BenchConfig, progress: bool = False, label: str = "") -> BenchResult:
    """Run one load point and summarize it."""
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(cfg.timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=base_url(cfg.url), timeout=timeout, limits=limits) as client:
        models = list(cfg.models) or await list_models(client, cfg.api_key)
        models = models[: cfg.num_adapters] if cfg.num_adapters else models
        if not models:
            raise ValueError("no model names: pass models or serve some adapters")
        if cfg.warmup:
            warm = build_workload(cfg, models, cfg.warmup, seed=cfg.seed + 10**6)
            warm = [replace(s, max_tokens=min(s.max_tokens, 8)) for s in warm]  # short: they only warm up
            await asyncio.gather(*(send_request(client, cfg, s) for s in warm))
        specs = iter_workload(cfg, models)  # made as they are sent: duration-bounded points take only those
        bar = _Progress(cfg, label or cfg.load_label, progress)
        results: list[RequestResult] = []

        async def one(spec: RequestSpec) -> None:
            result = await send_request(client, cfg, spec)
            results.append(result)
            bar.add(result)

        async def drive() -> None:
            t0 = time.perf_counter()
            deadline = t0 + cfg.duration
            if cfg.rate is None:  # closed loop: every client takes the next spec when its last one ends
                pending = specs

                async def client_loop() -> None:
                    for spec in pending:
                        if time.perf_counter() >= deadline:
                            return
                        await one(spec)

                await asyncio.gather(*(client_loop() for _ in range(cfg.concurrency)))
                return
            tasks = []
            for spec in specs:
                if spec.send_at >= cfg.duration:
                    break
                await asyncio.sleep(max(0.0, t0 + spec.send_at - time.perf_counter()))
                tasks.append(asyncio.create_task(one(spec)))
            await asyncio.gather(*tasks)

        async def redraw() -> None:
            while True:
                bar.draw()
                await asyncio.sleep(0.5)

        drawer = asyncio.create_task(redraw())
        try:
            await drive()
        finally:
            drawer.cancel()
        bar.draw(final=True)
    results.sort(key=lambda r: r.index)
    first = min((r.start for r in results), default=0.0)
    last = max((r.end for r in results), default=0.0)
    result = BenchResult(cfg, models, results, max(last - first, 1e-9))
    result.summary = summarize(results, result.duration)
    return result
