"""`loraplex bench`: the load generator for any OpenAI-compatible server (client side).

    workload  what one load point sends: BenchConfig, the adapters' popularity, arrivals, prompts
    loadgen   sends it: streamed requests at their times, per-request timings, run_benchmark
    stats     RequestResult, percentile, the summary of a run
    report    the Markdown table and the PNG plot of a sweep
    cli       the `loraplex bench` flags and the sweep over load points

This package talks HTTP only: it never imports engine/ or torch, so it can load-test a server from a
machine (or venv) without them.

    result = asyncio.run(run_benchmark(BenchConfig(models=("a0", "a1"), rate=2.0, num_requests=20)))
"""

from __future__ import annotations

from .loadgen import BenchResult, run_benchmark, send_request
from .report import plot_sweep, table
from .stats import RequestResult, percentile, summarize
from .workload import (
    BenchConfig,
    LengthSpec,
    RequestSpec,
    arrival_gaps,
    build_workload,
    check_target,
    iter_workload,
    popularity_weights,
)

__all__ = [
    "BenchConfig",
    "BenchResult",
    "LengthSpec",
    "RequestResult",
    "RequestSpec",
    "arrival_gaps",
    "build_workload",
    "check_target",
    "iter_workload",
    "percentile",
    "plot_sweep",
    "popularity_weights",
    "run_benchmark",
    "send_request",
    "summarize",
    "table",
]
