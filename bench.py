"""Load generator for any OpenAI-compatible server: `loraplex bench` and `benchmarks/loadtest.py`.

Every request streams (`stream_options.include_usage`), so each one yields its time to first token, the
gaps between content chunks (inter-token latency), its end-to-end latency and its output token count (the
final usage chunk; the number of content chunks when a server sends no usage). Arrivals are open loop
(Poisson, or Gamma with a coefficient of variation, at a target rate) or closed loop (a fixed number of
clients, each sending its next request when the last one ends). The `model` of each request is drawn
from N adapter names, uniformly or Zipf(alpha) (name i has weight 1 / (i + 1) ** alpha).

Bounds: at most `num_requests` requests, none sent after `duration` seconds, and each one cut off after
`timeout` seconds, so a run ends within duration + timeout. Only loopback URLs unless `allow_remote`.

    result = asyncio.run(run_benchmark(BenchConfig(models=("a0", "a1"), rate=2.0, num_requests=20)))
    print(result.summary["output_throughput"], result.summary["ttft"]["p99"])
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .bench_stats import RequestResult, summarize

# Common short English words: with a leading space each is one token in GPT-2-style BPE vocabularies
# (SmolLM, Llama 3, Qwen), so `prompt_len` words make a prompt of about that many tokens.
_WORDS = (
    "the of and to in is was for on that with as by at from it an be this are or his her one all "
    "we can had not but what when there so out up if about who get which go me new like time no just "
    "him know take people into year your good some could them see other than then now look only come"
).split()


@dataclass(frozen=True)
class LengthSpec:
    """A token count: fixed (`low == high`) or uniform in [low, high]. Parsed from "64" or "32:128"."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str | int) -> LengthSpec:
        lo, _, hi = str(text).partition(":")
        spec = cls(int(lo), int(hi or lo))
        if spec.low < 1 or spec.high < spec.low:
            raise ValueError(f"a length is N or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}")
        return spec

    def sample(self, rng: random.Random) -> int:
        return self.low if self.low == self.high else rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}:{self.high}"


@dataclass(frozen=True)
class BenchConfig:
    url: str = "http://127.0.0.1:8000"  # base URL; the OpenAI routes are under /v1
    endpoint: str = "chat"  # chat | completions
    models: tuple[str, ...] = ()  # the `model` names to draw from; empty: the adapters in /v1/models
    num_adapters: int | None = None  # use only the first N of `models`
    popularity: str = "uniform"  # uniform | zipf
    zipf_alpha: float = 1.0
    rate: float | None = None  # open loop: requests per second (math.inf: all at once); None: closed loop
    arrival: str = "poisson"  # poisson | gamma (open loop)
    cv: float = 1.0  # gamma arrivals: coefficient of variation of the gaps (1 = Poisson)
    concurrency: int = 16  # closed loop: clients, each with one request in flight
    num_requests: int = 100
    duration: float = 60.0  # seconds after which no request is sent
    timeout: float = 120.0  # seconds one request may take (then it counts as a "timeout" error)
    prompt_len: LengthSpec = LengthSpec(128, 128)
    output_len: LengthSpec = LengthSpec(64, 64)
    dataset: str | None = None  # JSONL: {"prompt": str} or {"messages": [...]}, optional "max_tokens"
    temperature: float = 0.0
    ignore_eos: bool = True  # every request produces exactly its max_tokens
    seed: int = 0
    warmup: int = 0  # requests sent (all at once) before the measured run, not counted
    api_key: str | None = None
    allow_remote: bool = False

    def __post_init__(self) -> None:
        if self.endpoint not in ("chat", "completions"):
            raise ValueError(f"endpoint must be chat or completions, got {self.endpoint!r}")
        if self.popularity not in ("uniform", "zipf"):
            raise ValueError(f"popularity must be uniform or zipf, got {self.popularity!r}")
        if self.arrival not in ("poisson", "gamma"):
            raise ValueError(f"arrival must be poisson or gamma, got {self.arrival!r}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be > 0 (inf: all at once)")
        positive = dict(
            concurrency=self.concurrency,
            num_requests=self.num_requests,
            cv=self.cv,
            duration=self.duration,
            timeout=self.timeout,
            zipf_alpha=self.zipf_alpha + 1,
        )
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be > 0" if name != "zipf_alpha" else "zipf_alpha must be >= 0")
        if self.num_adapters is not None and self.num_adapters < 1:
            raise ValueError("num_adapters must be >= 1")
        check_target(self.url, self.allow_remote)

    @property
    def load_label(self) -> str:
        return f"conc={self.concurrency}" if self.rate is None else f"rate={self.rate:g}"


@dataclass(frozen=True)
class RequestSpec:
    index: int
    model: str
    prompt: str | list[dict]  # text (completions, or one user message) or chat messages
    max_tokens: int
    send_at: float  # seconds after the start (open loop; 0 in closed loop)


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


def check_target(url: str, allow_remote: bool) -> None:
    """Refuse a URL whose host is not loopback (127.0.0.0/8, ::1, localhost) unless allow_remote."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url must be http(s)://HOST[:PORT], got {url!r}")
    host = parts.hostname
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not allow_remote:
        raise ValueError(f"{host} is not a loopback address: pass allow_remote (--allow-remote) to target it")


def base_url(url: str) -> str:
    """The server of a URL: http://h:p, http://h:p/ and http://h:p/v1 all mean http://h:p."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


# ---- workload -------------------------------------------------------------------------------------
def popularity_weights(num: int, popularity: str, alpha: float) -> list[float]:
    """Probability of each of `num` names: equal, or proportional to 1 / (rank + 1) ** alpha."""
    raw = [1.0] * num if popularity == "uniform" else [1.0 / (i + 1) ** alpha for i in range(num)]
    total = sum(raw)
    return [w / total for w in raw]


def arrival_gaps(cfg: BenchConfig, rng: random.Random, count: int) -> list[float]:
    """Gaps between sends: Gamma(shape 1/cv^2) with mean 1/rate (exponential when Poisson or cv = 1)."""
    if cfg.rate is None or math.isinf(cfg.rate):
        return [0.0] * count
    if cfg.arrival == "poisson" or cfg.cv == 1.0:
        return [rng.expovariate(cfg.rate) for _ in range(count)]
    shape = 1.0 / cfg.cv**2
    return [rng.gammavariate(shape, 1.0 / (cfg.rate * shape)) for _ in range(count)]


def _read_dataset(path: str) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
                raise ValueError(f"{path}:{n}: each line needs a 'prompt' or 'messages' field")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no requests")
    return rows


def build_workload(
    cfg: BenchConfig, models: list[str], count: int | None = None, seed: int | None = None
) -> list[RequestSpec]:
    """`count` (default num_requests) requests, seeded: same config, same workload."""
    rng = random.Random(cfg.seed if seed is None else seed)
    count = cfg.num_requests if count is None else count
    weights = popularity_weights(len(models), cfg.popularity, cfg.zipf_alpha)
    chosen = rng.choices(models, weights=weights, k=count)
    rows = _read_dataset(cfg.dataset) if cfg.dataset else None
    specs, t = [], 0.0
    for i, gap in enumerate(arrival_gaps(cfg, rng, count)):
        max_tokens = cfg.output_len.sample(rng)
        if rows is not None:
            row = rows[rng.randrange(len(rows))]
            prompt = row["messages"] if "messages" in row else row["prompt"]
            if cfg.endpoint == "completions" and not isinstance(prompt, str):
                raise ValueError("the completions endpoint needs 'prompt' text in the dataset")
            max_tokens = int(row.get("max_tokens", row.get("output_len", max_tokens)))
        else:
            prompt = " ".join(rng.choice(_WORDS) for _ in range(cfg.prompt_len.sample(rng)))
        specs.append(RequestSpec(i, chosen[i], prompt, max_tokens, t))
        t += gap
    return specs


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
        specs = build_workload(cfg, models)
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
                pending = iter(specs)

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
