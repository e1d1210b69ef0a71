"""Shadow traffic overhead: primary latency of an alias with a 10% shadow fraction against none, in one
run, at moderate load, on a real `loraplex serve` (the default model, bf16, two rank-16 all-linear
adapters: `support-v1` serves, `support-v2` is the shadow candidate).

The same Poisson arrivals (seeded) run in alternating rounds: no shadow, 10% shadow, no shadow, ...
(alternation spreads the drift of a shared machine over both modes). Each request is a streamed
completion of `--max-tokens` greedy tokens; its end-to-end latency and TTFT are measured client-side.
Prints a table and writes JSON; --write-results puts a section into RESULTS.md.

    python benchmarks/shadow_overhead.py [--rate 1.5] [--seconds 40] [--rounds 2] [--fraction 0.1]
        [--max-tokens 32] [--out benchmarks/out/shadow_overhead.json] [--write-results] [--from-json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from benchutil import cpu_name, free_port, write_results_section

from loraplex.engine.demo_adapters import ALL_LINEAR_MODULES, DemoAdapterSpec, write_lora_adapter
from loraplex.engine.loader import base_shapes_of, resolve_model_dir

WORDS = "the quick brown fox jumps over a lazy dog while support agents answer questions about billing".split()
BEGIN, END = "<!-- shadow-overhead:begin -->", "<!-- shadow-overhead:end -->"


def start_server(adapters: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--port", str(port), "--dtype", "bfloat16", "--max-lora-rank", "16"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready")


def arrivals(rng: random.Random, rate: float, seconds: float) -> list[tuple[float, str]]:
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        out.append((t, " ".join(rng.choice(WORDS) for _ in range(rng.randrange(20, 60)))))


async def one(http: httpx.AsyncClient, prompt: str, max_tokens: int, i: int) -> dict:
    t0 = time.perf_counter()
    first = None
    body = {"model": "support", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "user": f"u{i}"}
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": r.status_code}
        async for line in r.aiter_lines():
            if line.startswith("data: {") and first is None and '"text":""' not in line:
                first = time.perf_counter()
    return {"e2e": time.perf_counter() - t0, "ttft": (first or time.perf_counter()) - t0}


async def run_round(url: str, schedule: list[tuple[float, str]], max_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        t0 = time.perf_counter()

        async def at(i: int, t: float, prompt: str) -> dict:
            await asyncio.sleep(max(0.0, t - (time.perf_counter() - t0)))
            return await one(http, prompt, max_tokens, i)

        return await asyncio.gather(*(at(i, t, p) for i, (t, p) in enumerate(schedule)))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=1.5, help="requests per second (Poisson)")
    ap.add_argument("--seconds", type=float, default=40.0, help="arrival window of one round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per mode (alternating)")
    ap.add_argument("--fraction", type=float, default=0.1)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/out/shadow_overhead.json")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--from-json", help="only write the RESULTS.md section of an earlier run's JSON")
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        write_results(saved["meta"], saved["table"], saved["ratio"], saved["shadow"]["candidates"].get("support-v2", {}))
        return
    model_dir = resolve_model_dir(None)
    shapes = base_shapes_of(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-shadow-"))
    adapters = {}
    for i, name in enumerate(("support-v1", "support-v2")):
        spec = DemoAdapterSpec(name, r=16, lora_alpha=32, target_modules=ALL_LINEAR_MODULES, seed=10 + i, b_std=0.002)
        adapters[name] = str(write_lora_adapter(tmp / name, spec, shapes, str(model_dir)))
    proc, url = start_server(adapters, tmp / "server.log")
    routes = {
        "none": {"versions": {"support-v1": 100}},
        "shadow": {"versions": {"support-v1": 100}, "shadow": {"version": "support-v2", "fraction": args.fraction}},
    }
    rng = random.Random(0)
    schedule = arrivals(rng, args.rate, args.seconds)
    results: dict[str, list[dict]] = {"none": [], "shadow": []}
    rounds: list[dict] = []  # per round e2e p50: the spread between rounds of one mode shows the noise
    try:
        httpx.put(f"{url}/v1/routes/support", json=routes["none"], timeout=30).raise_for_status()
        asyncio.run(run_round(url, schedule[:6], args.max_tokens))  # warm-up (both adapters resident after)
        httpx.put(f"{url}/v1/routes/support", json={"versions": {"support-v2": 1}}, timeout=30).raise_for_status()
        asyncio.run(run_round(url, schedule[:2], args.max_tokens))
        for r in range(args.rounds):
            for mode in ("none", "shadow"):
                httpx.put(f"{url}/v1/routes/support", json=routes[mode], timeout=30).raise_for_status()
                print(f"round {r + 1}/{args.rounds}: {mode} ({len(schedule)} requests)", flush=True)
                rows = asyncio.run(run_round(url, schedule, args.max_tokens))
                results[mode] += rows
                done = [x["e2e"] for x in rows if "e2e" in x]
                rounds.append({"round": r + 1, "mode": mode, "e2e_p50": pct(done, 0.5) if done else None})
                print(f"  e2e p50 {rounds[-1]['e2e_p50']:.3f} s" if done else "  no request completed", flush=True)
                time.sleep(3)  # let the last shadow runs finish before the next round
        shadow = httpx.get(f"{url}/v1/routes/support/shadow", timeout=30).json()
    finally:
        proc.terminate()
        proc.wait(30)
    table = {}
    for mode, rows in results.items():
        ok = [r for r in rows if "e2e" in r]
        e2e, ttft = [r["e2e"] for r in ok], [r["ttft"] for r in ok]
        table[mode] = dict(requests=len(rows), errors=len(rows) - len(ok), e2e_p50=pct(e2e, 0.5), e2e_p99=pct(e2e, 0.99),
                           ttft_p50=pct(ttft, 0.5), ttft_p99=pct(ttft, 0.99))
    ratio = {k: table["shadow"][k] / table["none"][k] for k in ("e2e_p50", "e2e_p99", "ttft_p50", "ttft_p99")}
    print(f"\n{'shadow':8s} {'requests':>8s} {'errors':>6s} {'e2e p50':>8s} {'e2e p99':>8s} {'TTFT p50':>9s} {'TTFT p99':>9s}")
    for mode, t in table.items():
        print(f"{mode:8s} {t['requests']:8d} {t['errors']:6d} {t['e2e_p50']:8.3f} {t['e2e_p99']:8.3f} {t['ttft_p50']:9.3f} {t['ttft_p99']:9.3f}")
    print("shadow / none: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratio.items()))
    candidate = shadow["candidates"].get("support-v2", {})
    print(f"shadow pairs compared: {candidate.get('pairs')}, exact-match rate {candidate.get('exact_match_rate')}")
    meta = dict(cpu=cpu_name(), cpus=os.cpu_count(), model="SmolLM2-135M-Instruct bf16", **vars(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, table=table, ratio=ratio, rounds=rounds, shadow=shadow), indent=2))
    print(f"wrote {out}")
    if args.write_results:
        write_results(meta, table, ratio, candidate)


def write_results(meta: dict, table: dict, ratio: dict, candidate: dict) -> None:
    rows = "\n".join(
        f"| {m} | {t['requests']} | {t['errors']} | {t['e2e_p50']:.3f} | {t['e2e_p99']:.3f} | {t['ttft_p50']:.3f} | {t['ttft_p99']:.3f} |"
        for m, t in table.items()
    )
    section = (
        f"{BEGIN}\n`python benchmarks/shadow_overhead.py --rate {meta['rate']} --seconds {meta['seconds']} --rounds {meta['rounds']} "
        f"--fraction {meta['fraction']} --max-tokens {meta['max_tokens']}` on {meta['cpu']} ({meta['cpus']} cores), "
        "default model bf16, two rank-16 all-linear adapters; the same seeded Poisson arrivals in every round, "
        "rounds alternating without and with the shadow.\n\n"
        "| shadow | requests | errors | e2e p50 (s) | e2e p99 (s) | TTFT p50 (s) | TTFT p99 (s) |\n|---|---:|---:|---:|---:|---:|---:|\n"
        f"{rows}\n\n"
        f"- primary latency with a {meta['fraction']:.0%} shadow / without: e2e p50 **{ratio['e2e_p50']:.3f}x**, "
        f"p99 **{ratio['e2e_p99']:.3f}x**; TTFT p50 {ratio['ttft_p50']:.3f}x, p99 {ratio['ttft_p99']:.3f}x\n"
        f"- shadow pairs compared: {candidate.get('pairs')} (exact-match rate {candidate.get('exact_match_rate')})\n{END}"
    )
    write_results_section(section, BEGIN, END, "Adapter lifecycle: shadow traffic overhead (issue 18)")

if __name__ == "__main__":
    main()
