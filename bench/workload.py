"""What a load point sends: its config (target, adapters, arrivals, lengths, bounds) and the seeded
list of requests it expands to (model, prompt, max_tokens, send time). No network here.

The `model` of each request is drawn from N adapter names, uniformly or Zipf(alpha) (name i has weight
1 / (i + 1) ** alpha). Arrivals are open loop (Poisson, or Gamma with a coefficient of variation, at a
target rate) or closed loop (a fixed number of clients, each sending its next request when the last one
ends; every send time is then 0). Prompts are random common words, or rows of a JSONL dataset.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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


# ---- workload -------------------------------------------------------------------------------------
def popularity_weights(num: int, popularity: str, alpha: float) -> list[float]:
    """Probability of each of `num` names: equal, or proportional to 1 / (rank + 1) ** alpha."""
    raw = [1.0] * num if popularity == "uniform" else [1.0 / (i + 1) ** alpha for i in range(num)]
    total = sum(raw)
    return [w / total for w in raw]


def arrival_gaps(cfg: BenchConfig, rng: random.Random, count: int) -> list[float]:
    """Gaps between sends: Gamma(shape 1/cv^2) with mean 1/rate (exponential when Poisson or cv = 1)."""
    return [_arrival_gap(cfg, rng) for _ in range(count)]


def _arrival_gap(cfg: BenchConfig, rng: random.Random) -> float:
    """One gap of arrival_gaps (0 in closed loop or at an infinite rate)."""
    if cfg.rate is None or math.isinf(cfg.rate):
        return 0.0
    if cfg.arrival == "poisson" or cfg.cv == 1.0:
        return rng.expovariate(cfg.rate)
    shape = 1.0 / cfg.cv**2
    return rng.gammavariate(shape, 1.0 / (cfg.rate * shape))


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


def _row_prompt(row: dict) -> str | list[dict]:
    """A dataset row's prompt: its chat messages, else its prompt text (_read_dataset checked one is there)."""
    return row["messages"] if "messages" in row else row["prompt"]


def iter_workload(
    cfg: BenchConfig, models: list[str], count: int | None = None, seed: int | None = None
) -> Iterator[RequestSpec]:
    """`count` (default num_requests) requests, seeded (same config, same workload), made one at a time
    as they are taken: a point bounded by its duration takes only what it sends, so a huge num_requests
    costs nothing (a million specs took about a minute of CPU to build up front). The dataset is read
    and checked now, before any request is made."""
    count = cfg.num_requests if count is None else count
    cum_weights = list(itertools.accumulate(popularity_weights(len(models), cfg.popularity, cfg.zipf_alpha)))
    rows = _read_dataset(cfg.dataset) if cfg.dataset else None
    if rows is not None and cfg.endpoint == "completions":
        if any(not isinstance(_row_prompt(row), str) for row in rows):
            raise ValueError("the completions endpoint needs 'prompt' text in the dataset")
    rng = random.Random(cfg.seed if seed is None else seed)

    def specs() -> Iterator[RequestSpec]:
        t = 0.0
        for i in range(count):
            model = rng.choices(models, cum_weights=cum_weights)[0]
            max_tokens = cfg.output_len.sample(rng)
            if rows is not None:
                row = rows[rng.randrange(len(rows))]
                prompt = _row_prompt(row)
                max_tokens = int(row.get("max_tokens", row.get("output_len", max_tokens)))
            else:
                prompt = " ".join(rng.choice(_WORDS) for _ in range(cfg.prompt_len.sample(rng)))
            yield RequestSpec(i, model, prompt, max_tokens, t)
            t += _arrival_gap(cfg, rng)

    return specs()


def build_workload(
    cfg: BenchConfig, models: list[str], count: int | None = None, seed: int | None = None
) -> list[RequestSpec]:
    """The whole of iter_workload as a list."""
    return list(iter_workload(cfg, models, count, seed))
