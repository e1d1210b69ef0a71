"""Prefix caching on the default model (bf16, the engine driven directly). Prints a table, writes JSON.

Workload A (multi-tenant): 16 adapters, each tenant with its own ~1,000-token system prompt and short
user turns, Poisson arrivals; caching on vs off in one run: TTFT p50 / p99, output tok/s, hit rate.
Target: >= 5x lower TTFT p50 with caching on.
Workload B (no sharing): every prompt unique, all requests at once; throughput with caching on vs off,
in alternating rounds (median round reported). Target: >= 0.97x.

    python benchmarks/prefix_cache.py [--requests-a 48] [--rate 1] [--requests-b 24] [--rounds-b 3]
        [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
from pathlib import Path

import torch
from engine_throughput import run_arrivals

from loraplex.config import Config
from loraplex.engine.demo_adapters import ALL_LINEAR_MODULES, DemoAdapterSpec, write_lora_adapter
from loraplex.engine.engine import Engine
from loraplex.engine.loader import base_shapes_of, resolve_model_dir

NUM_ADAPTERS = 16
RANK = 16
# Room for every request of a run at once: the comparison is about reuse, not about preemption under a
# full pool (with the default 1 GiB an overloaded caching-off run thrashes: recomputed preempted prefills).
KV_CACHE_GIB = 4.0

Workload = list[tuple[float, list[int], str, int]]  # (arrival s, prompt ids, adapter, max_tokens)


def workload_a(rng: random.Random, vocab: int, adapters: list[str], n: int, rate: float, system_len: int) -> Workload:
    systems = {a: [rng.randrange(vocab) for _ in range(system_len)] for a in adapters}
    out, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        a = rng.choice(adapters)
        out.append((t, [*systems[a], *(rng.randrange(vocab) for _ in range(rng.randrange(12, 40)))], a, 16))
    return out


def workload_b(rng: random.Random, vocab: int, adapters: list[str], n: int, prompt_len: int) -> Workload:
    return [(0.0, [rng.randrange(vocab) for _ in range(prompt_len)], rng.choice(adapters), 16) for _ in range(n)]


def make_engine(adapters: list[tuple[str, str]], caching: bool, kv_cache_gib: float) -> Engine:
    engine = Engine(
        Config(adapters=tuple(adapters), dtype="bfloat16", max_lora_rank=RANK, max_active_adapters=NUM_ADAPTERS,
               prefix_caching=caching, kv_cache_gib=kv_cache_gib)
    )
    run_arrivals(engine, [(0.0, [1, 2, 3], adapters[0][0], 2)], None)  # warm-up (3 tokens: nothing to cache)
    return engine


def measure(engine: Engine, workload: Workload) -> dict:
    q0, h0, e0 = engine.scheduler.prefix_queries, engine.scheduler.prefix_hits, engine.blocks.num_evictions
    result = run_arrivals(engine, workload, None)
    queries = engine.scheduler.prefix_queries - q0
    result["hit_rate"] = (engine.scheduler.prefix_hits - h0) / queries if queries else 0.0
    result["prompt_tokens"] = sum(len(ids) for _, ids, _, _ in workload)
    result["total_tok_s"] = result["output_tok_s"] * (1 + result["prompt_tokens"] / sum(m for *_, m in workload))
    result["evictions"] = engine.blocks.num_evictions - e0
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests-a", type=int, default=48)
    ap.add_argument("--rate", type=float, default=1.0, help="workload A: requests per second")
    ap.add_argument("--system-len", type=int, default=1000)
    ap.add_argument("--requests-b", type=int, default=24)
    ap.add_argument("--prompt-len-b", type=int, default=256)
    ap.add_argument("--rounds-b", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/out/prefix_cache.json")
    args = ap.parse_args()
    model_dir = resolve_model_dir(None)
    shapes = base_shapes_of(model_dir)
    tmp = Path(tempfile.mkdtemp(prefix="loraplex-prefix-"))
    adapters = []
    for i in range(NUM_ADAPTERS):
        spec = DemoAdapterSpec(f"tenant{i}", r=RANK, lora_alpha=2 * RANK, target_modules=ALL_LINEAR_MODULES, seed=i, b_std=0.002)
        adapters.append((spec.name, str(write_lora_adapter(tmp / spec.name, spec, shapes, str(model_dir)))))
    names = [n for n, _ in adapters]
    vocab = 49152 - 1000  # SmolLM2's vocabulary, clear of the special tokens at its end
    rng = random.Random(0)
    wa = workload_a(rng, vocab, names, args.requests_a, args.rate, args.system_len)
    results = {}
    for caching in (False, True):  # a fresh engine each: caching on starts from an empty cache
        key = f"A caching {'on' if caching else 'off'}"
        print(f"running {key} ({len(wa)} requests)", flush=True)
        results[key] = measure(make_engine(adapters, caching, KV_CACHE_GIB), wa)
    # B: short runs are noisy, so rounds alternate off / on (fresh unique prompts each round: no hits)
    # and the round with the median on/off throughput ratio is reported.
    engines = {caching: make_engine(adapters, caching, 1.0) for caching in (False, True)}
    rounds = []
    for i in range(args.rounds_b):
        wb = workload_b(rng, vocab, names, args.requests_b, args.prompt_len_b)
        print(f"running B round {i + 1}/{args.rounds_b} ({len(wb)} requests, off then on)", flush=True)
        rounds.append({caching: measure(engines[caching], wb) for caching in (False, True)})
    rounds.sort(key=lambda r: r[True]["output_tok_s"] / r[False]["output_tok_s"])
    mid = rounds[len(rounds) // 2]
    results["B caching off"], results["B caching on"] = mid[False], mid[True]
    b_ratios = [r[True]["output_tok_s"] / r[False]["output_tok_s"] for r in rounds]
    print(f"\n{'run':16s} {'out tok/s':>9s} {'all tok/s':>9s} {'TTFT p50':>9s} {'TTFT p99':>9s} {'hit rate':>8s} {'evict':>6s}")
    for key, r in results.items():
        print(f"{key:16s} {r['output_tok_s']:9.1f} {r['total_tok_s']:9.1f} {r['ttft_p50']:9.3f} {r['ttft_p99']:9.3f} "
              f"{r['hit_rate']:8.1%} {r['evictions']:6d}")
    a_off, a_on = results["A caching off"], results["A caching on"]
    b_off, b_on = results["B caching off"], results["B caching on"]
    verdict = dict(
        a_ttft_p50_speedup=a_off["ttft_p50"] / a_on["ttft_p50"],
        a_ttft_p99_speedup=a_off["ttft_p99"] / a_on["ttft_p99"],
        a_throughput_ratio=a_on["output_tok_s"] / a_off["output_tok_s"],
        b_throughput_ratio=b_on["output_tok_s"] / b_off["output_tok_s"],
        b_throughput_ratios_all_rounds=b_ratios,
    )
    print(f"A: TTFT p50 {verdict['a_ttft_p50_speedup']:.1f}x lower (target >= 5x), p99 {verdict['a_ttft_p99_speedup']:.1f}x, "
          f"throughput {verdict['a_throughput_ratio']:.2f}x; B: throughput {verdict['b_throughput_ratio']:.3f}x (target >= 0.97x; rounds: {', '.join(f'{x:.3f}' for x in b_ratios)})")
    meta = dict(machine=platform.processor() or platform.machine(), cpus=torch.get_num_threads(), torch=torch.__version__,
                dtype="bfloat16", adapters=NUM_ADAPTERS, rank=RANK, **vars(args))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=results, verdict=verdict), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
