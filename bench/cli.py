"""`loraplex bench`: flags, a sweep over load points and adapter counts, the table, JSON and the plot."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from .loadgen import BenchResult, run_benchmark
from .report import plot_sweep, table
from .workload import BenchConfig, LengthSpec


def _floats(text: str) -> list[float]:
    return [math.inf if x.strip() in ("inf", "Inf") else float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_bench_args(p: argparse.ArgumentParser) -> None:
    d = BenchConfig()
    p.add_argument(
        "--url", default=d.url, help=f"server base URL (default {d.url}); loopback only unless --allow-remote"
    )
    p.add_argument("--allow-remote", action="store_true", help="allow a URL whose host is not loopback")
    p.add_argument("--endpoint", default=d.endpoint, choices=["chat", "completions"])
    p.add_argument(
        "--api-key", default=os.environ.get("LORAPLEX_API_KEY"), help="Bearer key (env LORAPLEX_API_KEY)"
    )
    p.add_argument(
        "--model",
        action="append",
        default=None,
        metavar="NAME",
        help="a model (adapter) name to draw from, repeatable or comma-separated; default: the adapters in /v1/models",
    )
    p.add_argument("--num-adapters", default=None, help="use the first N names; a comma list sweeps N")
    p.add_argument("--popularity", default=d.popularity, choices=["uniform", "zipf"])
    p.add_argument("--zipf-alpha", type=float, default=d.zipf_alpha, help="name i has weight 1/(i+1)^alpha")
    p.add_argument(
        "--rate", default=None, help="open loop: requests/s (inf = all at once); a comma list sweeps"
    )
    p.add_argument("--arrival", default=d.arrival, choices=["poisson", "gamma"])
    p.add_argument(
        "--cv", type=float, default=d.cv, help="gamma arrivals: coefficient of variation of the gaps"
    )
    p.add_argument(
        "--concurrency",
        default=str(d.concurrency),
        help="closed loop (no --rate): clients; a comma list sweeps",
    )
    p.add_argument(
        "--num-requests", type=int, default=d.num_requests, help="at most this many requests per point"
    )
    p.add_argument(
        "--duration", type=float, default=d.duration, help="no request is sent after this many seconds"
    )
    p.add_argument("--timeout", type=float, default=d.timeout, help="seconds one request may take")
    p.add_argument("--prompt-len", default=str(d.prompt_len), help="prompt words (~tokens): N or LOW:HIGH")
    p.add_argument("--output-len", default=str(d.output_len), help="max_tokens: N or LOW:HIGH")
    p.add_argument(
        "--dataset", default=None, help='JSONL lines {"prompt" | "messages", optional "max_tokens"}'
    )
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument(
        "--no-ignore-eos", action="store_true", help="let requests stop at EOS (default: exact lengths)"
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--warmup", type=int, default=d.warmup, help="requests sent before each point, not counted"
    )
    p.add_argument("--out", default="loraplex-bench.json", help="JSON results (default loraplex-bench.json)")
    p.add_argument("--plot", default=None, help="PNG plot (default: --out with .png; needs matplotlib)")
    p.add_argument("--save-requests", action="store_true", help="put every request's timings into the JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def configs_from_args(args: argparse.Namespace) -> list[BenchConfig]:
    """One BenchConfig per (adapter count, load point)."""
    models = tuple(m for flag in args.model or () for m in flag.split(",") if m)
    base = BenchConfig(
        url=args.url, endpoint=args.endpoint, models=models, popularity=args.popularity,
        zipf_alpha=args.zipf_alpha, arrival=args.arrival, cv=args.cv, num_requests=args.num_requests,
        duration=args.duration, timeout=args.timeout, prompt_len=LengthSpec.parse(args.prompt_len),
        output_len=LengthSpec.parse(args.output_len), dataset=args.dataset, temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos, seed=args.seed, warmup=args.warmup, api_key=args.api_key,
        allow_remote=args.allow_remote,
    )  # fmt: skip
    counts: list[int | None] = list(_ints(args.num_adapters)) if args.num_adapters else [None]
    if args.rate is not None:
        loads = [replace(base, rate=r) for r in _floats(args.rate)]
    else:
        loads = [replace(base, concurrency=c) for c in _ints(args.concurrency)]
    return [replace(load, num_adapters=n) for n in counts for load in loads]


def cmd_bench(args: argparse.Namespace) -> int:
    import httpx

    try:
        configs = configs_from_args(args)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc
    runs: list[BenchResult] = []
    rows = []
    for cfg in configs:
        label = f"adapters={cfg.num_adapters or 'all'} {cfg.load_label}"
        try:
            result = asyncio.run(run_benchmark(cfg, progress=not args.no_progress, label=label))
        except httpx.HTTPError as exc:  # listing the models failed: the server is not there
            raise SystemExit(f"error: {cfg.url}: {type(exc).__name__}: {exc}") from exc
        runs.append(result)
        rows.append(_row(urlsplit(cfg.url).netloc, result))
    text = table(rows)
    print(text)
    meta = {
        "command": "loraplex bench "
        + shlex.join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"meta": meta, "runs": [r.to_json(args.save_requests) for r in runs]}, indent=2)
    )
    print(f"wrote {out}")
    if len({r["load"] for r in rows}) > 1:  # against rate (or clients), one line per adapter count
        x_label = "request rate (1/s)" if args.rate is not None else "concurrent requests"
        points = [dict(r, x=r["rate"] if r["rate"] is not None else r["concurrency"]) for r in rows]
        series = "adapters"
    else:  # against the number of adapters
        points, x_label, series = [dict(r, x=r["adapters"]) for r in rows], "distinct adapters", "load"
    path = Path(args.plot or out.with_suffix(".png"))
    plot = plot_sweep(points, path, "x", series, f"loraplex bench {args.url}", x_label)
    if plot is not None:
        print(f"wrote {plot}")
    return 1 if all(r.summary["num_ok"] == 0 for r in runs) else 0


def _row(server: str, result: BenchResult) -> dict:
    cfg = result.config
    return {
        "server": server,
        "adapters": len(result.models),
        "load": cfg.load_label,
        "rate": cfg.rate,
        "concurrency": None if cfg.rate is not None else cfg.concurrency,
        "summary": result.summary,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraplex bench", description=__doc__)
    add_bench_args(parser)
    return cmd_bench(parser.parse_args(argv))
