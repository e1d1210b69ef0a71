"""Load-test statistics and reports: per-request results, percentiles, the summary of a run, a text
table, JSON, and the PNG plot of a sweep (matplotlib, optional)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
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


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{1000 * value:.0f}"


TABLE_HEADER = (
    "| server | adapters | load | ok | errors | req/s | out tok/s | TTFT p50 / p90 / p99 (ms) "
    "| TPOT p50 / p90 / p99 (ms) | ITL p50 / p99 (ms) | E2E p50 / p99 (s) |"
)


def table_row(server: str, adapters: int | str, load: str, s: dict) -> str:
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "0"
    t, p, i, e = s["ttft"], s["tpot"], s["itl"], s["e2e"]
    e2e = "-" if e["p50"] is None else f"{e['p50']:.2f} / {e['p99']:.2f}"
    return (
        f"| {server} | {adapters} | {load} | {s['num_ok']} | {errors} | {s['request_throughput']:.2f} "
        f"| {s['output_throughput']:.1f} | {_ms(t['p50'])} / {_ms(t['p90'])} / {_ms(t['p99'])} "
        f"| {_ms(p['p50'])} / {_ms(p['p90'])} / {_ms(p['p99'])} | {_ms(i['p50'])} / {_ms(i['p99'])} | {e2e} |"
    )


def table(rows: list[dict]) -> str:
    """A Markdown table of rows {"server", "adapters", "load", "summary"}."""
    aligns = ["---" if n in (0, 2) else "---:" for n in range(TABLE_HEADER.count("|") - 1)]  # text left
    sep = "|" + "|".join(aligns) + "|"
    lines = [TABLE_HEADER, sep]
    lines += [table_row(r["server"], r["adapters"], r["load"], r["summary"]) for r in rows]
    return "\n".join(lines)


def plot_sweep(
    rows: list[dict], path: Path, x_key: str, series_key: str, title: str, x_label: str | None = None
) -> Path | None:
    """Throughput and latency against `x_key` (one line per value of `series_key`) into a PNG.

    rows: dicts holding x_key, series_key and "summary". Returns None (after a note on stdout) when
    matplotlib is not installed (`pip install loraplex[bench]`).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)")
        return None
    panels = [
        ("output tok/s", lambda s: s["output_throughput"], None),
        ("TTFT (s)", lambda s: s["ttft"]["p50"], lambda s: s["ttft"]["p99"]),
        ("TPOT (s)", lambda s: s["tpot"]["p50"], lambda s: s["tpot"]["p99"]),
        ("E2E latency (s)", lambda s: s["e2e"]["p50"], lambda s: s["e2e"]["p99"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    series = list(dict.fromkeys(r[series_key] for r in rows))
    for ax, (name, mid, tail) in zip(axes, panels, strict=True):
        for k, value in enumerate(series):
            points = sorted(
                ((r[x_key], r["summary"]) for r in rows if r[series_key] == value), key=lambda p: p[0]
            )
            xs = [x for x, _ in points]
            color = f"C{k}"
            label = value if isinstance(value, str) else f"{series_key}={value}"
            ax.plot(
                xs, [mid(s) for _, s in points], "o-", color=color, label=label + (" p50" if tail else "")
            )
            if tail is not None:
                ax.plot(xs, [tail(s) for _, s in points], "x--", color=color, label=label + " p99")
        ax.set_xlabel(x_label or x_key)
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
