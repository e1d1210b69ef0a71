"""Adapter loading benchmark on the default model (issue 4). Prints a table, writes JSON.

1. Cold load: disk -> host tier (parse + validate, background pool) -> device slot, for rank 8 / 16 / 64
   all-linear adapters (`--per-rank` of each): request_load, wait for the host tier, install_ready, stop
   when slot_of() answers. Next to it, the floor: safetensors.torch.load_file of the same files; and
   PEFT's `load_adapter` on a transformers model for a rank-16 adapter.
2. Host-tier hit: an adapter evicted from its device slot but still on host -> resident in a slot again.
   Ranks go in the order r8, r16, r64, r8, ... and slots are taken least recently used first, so every
   r16 hit replaces an r64 adapter (its ranks 16..63 are zeroed too) and every r64 hit an r8: the
   costlier cases.
2b. Cold again: every measured adapter unloaded (host and slot), then loaded from disk again as in 1.
   The host tier recycles the freed copies' memory (adapter_cache/host_memory.py), as a server's host
   tier does once its adapters turn over; the first pass takes memory the process never touched.
3. Time per output token (TPOT) of 16 running requests over 4 resident adapters (ignore_eos, 64 tokens)
   while 20 cold adapters load in the background, against the same run with no loads, alternating in
   rounds in one process. TPOT per request = (finish - first token) / (tokens - 1), timestamped while
   driving engine.step() here.

    python benchmarks/adapter_load.py [--per-rank 10] [--rounds 3] [--drop-page-cache] [--out FILE.json]

A host-tier copy is laid out per module for all layers (plus its transpose when the slots keep CPU row
tables), so a host hit is a few large copies per module kind; "host MB" is what one adapter takes there.

Adapter files are written into a temp dir just before they are read, so by default they sit in the OS
page cache: "cold" means not in memory in this process, read from a warm disk. --drop-page-cache asks
the kernel to drop each file's pages first (fsync + posix_fadvise DONTNEED, best effort, Linux).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from benchutil import cpu_name
from safetensors.torch import load_file

from loraplex.config import Config
from loraplex.engine.demo_adapters import (
    ADAPTER_WEIGHTS_FILE,
    ALL_LINEAR_MODULES,
    DemoAdapterSpec,
    write_lora_adapter,
)
from loraplex.engine.engine import Engine
from loraplex.engine.loader import base_shapes_of, resolve_model_dir
from loraplex.scheduler.sampling_params import SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle. Once upon a time"
RANKS = (8, 16, 64)
TARGETS = {"cold_median_ms_r16": 25.0, "host_hit_ms": 5.0, "tpot_p99_rise": 0.25}
FILE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile on sorted values (q in 0..100)."""
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def summary_ms(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return dict(
        n=len(ms), median_ms=statistics.median(ms), p90_ms=percentile(ms, 90), min_ms=min(ms), max_ms=max(ms)
    )


def drop_from_page_cache(path: Path) -> None:
    """Best effort: ask the kernel to forget the cached pages of `path` (no root needed on Linux)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def write_adapters(
    root: Path, prefix: str, rank: int, count: int, shapes, model_dir: Path, dtype, seed0: int
) -> list[str]:
    names = []
    for i in range(count):
        spec = DemoAdapterSpec(
            f"{prefix}{i}",
            r=rank,
            lora_alpha=2 * rank,
            target_modules=ALL_LINEAR_MODULES,
            seed=seed0 + i,
            b_std=0.002,
        )
        write_lora_adapter(root / spec.name, spec, shapes, str(model_dir), dtype)
        names.append(spec.name)
    return names


def tier_of(engine: Engine, name: str) -> str:
    return next(row["tier"] for row in engine.adapter_cache.list() if row["name"] == name)


# ---- 1 and 2: cold load and host-tier hit -----------------------------------------------------------
def cold_load(engine: Engine, name: str) -> tuple[float, float]:
    """(seconds to host tier, seconds to a device slot) for an adapter nobody has read yet."""
    cache = engine.adapter_cache
    engine.wake.clear()
    t0 = time.perf_counter()
    cache.request_load(name)
    if not engine.wake.wait(60.0):  # set by the cache's on_ready once the adapter is on host
        raise RuntimeError(f"{name}: not loaded within 60 s: {cache.error_of(name)}")
    t_host = time.perf_counter()
    cache.install_ready()
    if cache.slot_of(name) is None:
        raise RuntimeError(f"{name}: not installed into a slot ({cache.error_of(name)})")
    return t_host - t0, time.perf_counter() - t0


def host_hit(engine: Engine, name: str) -> float:
    cache = engine.adapter_cache
    tier = tier_of(engine, name)
    if tier != "host":
        raise RuntimeError(f"{name}: expected on host only, found tier {tier!r}")
    t0 = time.perf_counter()
    cache.request_load(name)
    cache.install_ready()
    if cache.slot_of(name) is None:
        raise RuntimeError(f"{name}: host hit did not reach a slot")
    return time.perf_counter() - t0


def peft_load_adapter_seconds(model_dir: Path, root: Path, names: list[str]) -> list[float]:
    """PeftModel.load_adapter for names[1:] on a bf16 transformers model that already holds names[0]."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    peft_model = PeftModel.from_pretrained(model, str(root / names[0]), adapter_name=names[0])
    seconds = []
    for name in names[1:]:
        t0 = time.perf_counter()
        peft_model.load_adapter(str(root / name), adapter_name=name)
        seconds.append(time.perf_counter() - t0)
    del peft_model, model
    return seconds


# ---- 3: TPOT while adapters load ----------------------------------------------------------------------
def decode_run(
    engine: Engine,
    prompt_ids: list[int],
    running: list[str],
    num_requests: int,
    tokens: int,
    cold: list[str],
    pattern: str,
    via: str,
) -> dict:
    """Run num_requests requests (adapters round-robin over `running`) to `tokens` output tokens each,
    requesting the `cold` adapters while they decode. Returns per-request TPOT and decode step times."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    first: dict[str, float] = {}
    finish: dict[str, float] = {}
    num_out: dict[str, int] = {}
    ids = [
        engine.add_request(prompt_ids, running[i % len(running)], params).request_id
        for i in range(num_requests)
    ]
    tracked = set(ids)
    # Load i starts before decode step start[i]: spread evenly over the decode steps, or all at the first.
    decode_steps = max(1, tokens - 1)
    start = [0 if pattern == "burst" else (i * decode_steps) // len(cold) for i in range(len(cold))]
    pending = list(zip(start, cold, strict=True))
    step_seconds: list[float] = []
    decode_step = 0  # decode steps run since every request had its first token
    while len(finish) < len(tracked):
        decoding = len(first) == len(tracked)
        while decoding and pending and pending[0][0] <= decode_step:
            name = pending.pop(0)[1]
            if via == "cache":
                engine.adapter_cache.request_load(name)
            else:
                engine.add_request(prompt_ids, name, SamplingParams(max_tokens=1, ignore_eos=True))
        t0 = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        if not engine.last_step_ran:
            engine.wake.wait(0.002)
            engine.wake.clear()
            continue
        if decoding:
            step_seconds.append(now - t0)
            decode_step += 1
        for out in outputs:
            if out.request_id not in tracked:
                continue
            if out.new_token_ids and out.request_id not in first:
                first[out.request_id] = now
            if out.finished:
                finish[out.request_id] = now
                num_out[out.request_id] = out.num_output_tokens
    s = engine.adapter_cache.stats()
    unfinished = len(pending) + s["loading"] + s["waiting_install"]  # loads not done when decode ended
    drain(engine)  # let loads still in flight finish (no requests run now), so the next round starts quiet
    tpot = [(finish[r] - first[r]) / max(1, num_out[r] - 1) for r in ids]
    return dict(
        tpot=tpot,
        step_seconds=step_seconds,
        loads_requested=len(cold) - len(pending),
        loads_unfinished=unfinished,
    )


def drain(engine: Engine, timeout: float = 60.0) -> None:
    """Step (installs, and the max_tokens=1 requests of --load-via requests) until nothing is loading,
    waiting for a slot or running."""
    cache = engine.adapter_cache
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = cache.stats()
        if not engine.has_work() and not s["loading"] and not s["waiting_install"]:
            return
        engine.step()
        engine.wake.wait(0.002)
        engine.wake.clear()
    raise RuntimeError("adapter loads did not finish within the drain timeout")


def tpot_rounds(engine: Engine, prompt_ids: list[int], running: list[str], cold: list[str], args) -> dict:
    cache = engine.adapter_cache
    for name in running:  # held in their slots (load(pin=True)), so loads never evict them between rounds
        cache.load(name, pin=True, wait=60.0)
    cache.install_ready()
    assert all(cache.slot_of(n) is not None for n in running)
    warm_up_tokens = 8
    decode_run(
        engine, prompt_ids, running, args.num_requests, warm_up_tokens, [], args.load_pattern, args.load_via
    )
    results: dict[str, list[dict]] = {"no loads": [], "with loads": []}
    for rnd in range(args.rounds):
        base = decode_run(
            engine, prompt_ids, running, args.num_requests, args.tokens, [], args.load_pattern, args.load_via
        )
        for name in cold:
            cache.unload(name)  # the next loaded round reads them from disk again
        loaded = decode_run(
            engine,
            prompt_ids,
            running,
            args.num_requests,
            args.tokens,
            cold,
            args.load_pattern,
            args.load_via,
        )
        s = cache.stats()
        print(
            f"  round {rnd + 1}: TPOT p99 {percentile(base['tpot'], 99) * 1e3:6.1f} ms (no loads) vs "
            f"{percentile(loaded['tpot'], 99) * 1e3:6.1f} ms ({loaded['loads_requested']} loads requested, "
            f"{loaded['loads_unfinished']} unfinished when decode ended; disk loads so far {s['loads']})",
            flush=True,
        )
        results["no loads"].append(base)
        results["with loads"].append(loaded)
    out = {}
    for key, runs in results.items():
        tpot = [t for r in runs for t in r["tpot"]]
        steps = [t for r in runs for t in r["step_seconds"]]
        out[key] = dict(
            tpot_p50_ms=percentile(tpot, 50) * 1e3,
            tpot_p99_ms=percentile(tpot, 99) * 1e3,
            step_p50_ms=percentile(steps, 50) * 1e3,
            step_p99_ms=percentile(steps, 99) * 1e3,
            step_max_ms=max(steps) * 1e3,
            tpot_ms=[t * 1e3 for t in tpot],
        )
    out["loads_unfinished_per_round"] = [r["loads_unfinished"] for r in results["with loads"]]
    out["rise_p99"] = out["with loads"]["tpot_p99_ms"] / out["no loads"]["tpot_p99_ms"] - 1.0
    return out


# ---- main -------------------------------------------------------------------------------------------
def machine() -> dict:
    return dict(
        platform=platform.platform(),
        cpu=cpu_name(),
        cores=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=platform.python_version(),
        loadavg_start=os.getloadavg(),  # the machine is shared: other work skews the figures
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-rank", type=int, default=10, help="adapters per rank for cold load and host hit")
    ap.add_argument(
        "--file-dtype", default="bfloat16", choices=sorted(FILE_DTYPES), help="dtype of the adapter files"
    )
    ap.add_argument(
        "--drop-page-cache", action="store_true", help="posix_fadvise DONTNEED each file before reading it"
    )
    ap.add_argument(
        "--peft-loads", type=int, default=3, help="timed PEFT load_adapter calls (rank 16); 0 skips"
    )
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--running-adapters", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument(
        "--cold-adapters", type=int, default=20, help="rank-16 adapters loaded during the loaded runs"
    )
    ap.add_argument("--rounds", type=int, default=3, help="alternating (no loads, with loads) rounds")
    ap.add_argument(
        "--load-pattern",
        default="spread",
        choices=["spread", "burst"],
        help="spread: loads start evenly over the decode steps; burst: all at the first decode step",
    )
    ap.add_argument(
        "--load-via",
        default="cache",
        choices=["cache", "requests"],
        help="cache: adapter_cache.request_load; requests: engine.add_request(max_tokens=1), whose prefill also runs",
    )
    ap.add_argument("--skip-tpot", action="store_true")
    ap.add_argument("--out", default="benchmarks/out/adapter_load.json")
    args = ap.parse_args()
    if args.per_rank < 3:  # with 8 slots, host hits need every measured adapter pushed out by later loads
        ap.error("--per-rank must be >= 3")
    torch.manual_seed(0)
    info = machine()
    print(
        f"machine: {info['platform']}, {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)"
    )
    model_dir = resolve_model_dir(None)
    shapes = base_shapes_of(model_dir)
    file_dtype = FILE_DTYPES[args.file_dtype]
    root = Path(tempfile.mkdtemp(prefix="loraplex-adapter-load-"))
    try:
        t0 = time.perf_counter()
        by_rank = {
            r: write_adapters(root, f"cold-r{r}-", r, args.per_rank, shapes, model_dir, file_dtype, 1000 * r)
            for r in RANKS
        }
        running = write_adapters(root, "run-", 16, args.running_adapters, shapes, model_dir, file_dtype, 7000)
        cold = write_adapters(root, "bg-", 16, args.cold_adapters, shapes, model_dir, file_dtype, 8000)
        peft_names = (
            write_adapters(root, "peft-", 16, args.peft_loads + 1, shapes, model_dir, file_dtype, 9000)
            if args.peft_loads
            else []
        )
        file_bytes = {r: (root / by_rank[r][0] / ADAPTER_WEIGHTS_FILE).stat().st_size for r in RANKS}
        print(f"wrote adapters ({args.file_dtype} files) into {root} in {time.perf_counter() - t0:.1f} s")
        disk = (
            "cold disk (page cache dropped per file, best effort)"
            if args.drop_page_cache
            else "warm disk (files in the OS page cache after writing)"
        )

        def before_read(name: str) -> None:
            if args.drop_page_cache:
                drop_from_page_cache(root / name / ADAPTER_WEIGHTS_FILE)

        engine = Engine(
            Config(
                adapter_dir=str(root),
                dtype="bfloat16",
                max_lora_rank=max(RANKS),
                max_active_adapters=8,
                max_host_adapters=64,
            )
        )
        prompt_ids = engine.encode(PROMPT)

        # Warm-up: the first load pays one-off costs (imports, allocator); its adapter is not counted.
        warm = write_adapters(root, "warm-", 16, 1, shapes, model_dir, file_dtype, 1)[0]
        cold_load(engine, warm)
        load_file(str(root / warm / ADAPTER_WEIGHTS_FILE))

        # Ranks interleaved (r8, r16, r64, r8, ...): a busy spell of the shared machine hits every rank alike.
        order = [(r, by_rank[r][i]) for i in range(args.per_rank) for r in RANKS]
        samples: dict[str, dict[int, list[float]]] = {
            k: {r: [] for r in RANKS} for k in ("cold", "to_host", "raw", "hit", "cold_again")
        }
        for r, name in order:
            before_read(name)
            h, t = cold_load(engine, name)
            samples["to_host"][r].append(h)
            samples["cold"][r].append(t)
        for r, name in order:
            before_read(name)
            t0 = time.perf_counter()
            load_file(str(root / name / ADAPTER_WEIGHTS_FILE))
            samples["raw"][r].append(time.perf_counter() - t0)
        # Host hits in the same order: each adapter was pushed out of the 8 slots by the 8+ installs after
        # it (checked in host_hit), but is still on host.
        for r, name in order:
            samples["hit"][r].append(host_hit(engine, name))
        host_bytes = {row["name"]: row["bytes"] for row in engine.adapter_cache.list()}
        for _, name in order:
            engine.adapter_cache.unload(name)
        engine.adapter_cache.install_ready()  # zeroes the freed slots, as the step thread would
        for r, name in order:
            before_read(name)
            samples["cold_again"][r].append(cold_load(engine, name)[1])
        rows = [
            dict(
                rank=r,
                file_mb=file_bytes[r] / 1e6,
                host_mb=(host_bytes.get(by_rank[r][0]) or 0) / 1e6,
                cold=summary_ms(samples["cold"][r]),
                cold_to_host=summary_ms(samples["to_host"][r]),
                raw_read=summary_ms(samples["raw"][r]),
                host_hit=summary_ms(samples["hit"][r]),
                cold_again=summary_ms(samples["cold_again"][r]),
                samples_ms={k: [x * 1e3 for x in v[r]] for k, v in samples.items()},
            )
            for r in RANKS
        ]
        for row in rows:
            print(
                f"rank {row['rank']:2d}: cold load median {row['cold']['median_ms']:.1f} ms, raw read "
                f"{row['raw_read']['median_ms']:.1f} ms, host hit {row['host_hit']['median_ms']:.1f} ms",
                flush=True,
            )
        peft = None
        if args.peft_loads:
            for name in peft_names:
                before_read(name)
            seconds = peft_load_adapter_seconds(model_dir, root, peft_names)
            peft = dict(rank=16, **summary_ms(seconds), all_ms=[s * 1e3 for s in seconds])
            print(f"PEFT load_adapter rank 16: median {peft['median_ms']:.1f} ms", flush=True)
        tpot = None
        if not args.skip_tpot:
            print(
                f"TPOT: {args.num_requests} requests over {args.running_adapters} adapters, {args.tokens} tokens, {args.cold_adapters} cold loads ({args.load_pattern}, via {args.load_via})",
                flush=True,
            )
            tpot = tpot_rounds(engine, prompt_ids, running, cold, args)
        stats = engine.adapter_cache.stats()
        engine.adapter_cache.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    info["loadavg_end"] = os.getloadavg()
    print_report(rows, peft, tpot, disk, info, args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        machine=info,
        dtype="bfloat16",
        file_dtype=args.file_dtype,
        disk=disk,
        per_rank=args.per_rank,
        targets=TARGETS,
        args=vars(args),
    )
    for key in ("load_seconds", "install_seconds"):  # keep the JSON short: summaries, not every sample
        if isinstance(stats.get(key), dict):
            stats[key].pop("recent", None)
    out.write_text(
        json.dumps(
            dict(meta=meta, cold_and_host_hit=rows, peft_load_adapter=peft, tpot=tpot, cache_stats=stats),
            indent=2,
            default=str,
        )
    )
    print(f"wrote {out}")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_report(rows: list[dict], peft: dict | None, tpot: dict | None, disk: str, info: dict, args) -> None:
    print(f"\nadapter load latency, all-linear adapters, default model in bfloat16, {disk}")
    print(
        f"machine: {info['platform']}; {info['cpu']}; {info['cores']} cores; torch {info['torch']}; "
        f"load average (1 min) {info['loadavg_start'][0]:.2f} at start, {info['loadavg_end'][0]:.2f} at end"
    )
    print(
        f"{'rank':>4s} {'file MB':>7s} {'host MB':>7s} | {'cold->slot med':>14s} {'p90':>6s} | {'(to host med)':>13s} | {'raw read med':>12s} {'p90':>6s} | {'host hit med':>12s} {'p90':>6s} | {'cold again med':>14s} {'p90':>6s}"
    )
    for r in rows:
        c, h, raw, hit, again = r["cold"], r["cold_to_host"], r["raw_read"], r["host_hit"], r["cold_again"]
        print(
            f"{r['rank']:4d} {r['file_mb']:7.1f} {r['host_mb']:7.1f} | {c['median_ms']:11.1f} ms {c['p90_ms']:6.1f} | {h['median_ms']:10.1f} ms | "
            f"{raw['median_ms']:9.1f} ms {raw['p90_ms']:6.1f} | {hit['median_ms']:9.2f} ms {hit['p90_ms']:6.2f} | "
            f"{again['median_ms']:11.1f} ms {again['p90_ms']:6.1f}"
        )
    print(
        f"(n = {args.per_rank} adapters per rank; times in ms; raw read = safetensors.torch.load_file of the same files, the floor;\n"
        " host hit: r16 replaces an r64 adapter, r64 an r8; cold again: the same loads after unloading them all)"
    )
    if peft is not None:
        print(
            f"PEFT PeftModel.load_adapter, rank 16, transformers bf16 model: median {peft['median_ms']:.1f} ms (n={peft['n']}: {', '.join(f'{x:.0f}' for x in peft['all_ms'])})"
        )
    r16 = next(r for r in rows if r["rank"] == 16)
    worst_hit = max(r["host_hit"]["median_ms"] for r in rows)
    hit16 = r16["host_hit"]["median_ms"]
    print("\ntargets (issue 15: rank 16; issue 4: every rank):")
    print(
        f"  cold load median, rank 16 <= {TARGETS['cold_median_ms_r16']:.0f} ms: {r16['cold']['median_ms']:.1f} ms  {verdict(r16['cold']['median_ms'] <= TARGETS['cold_median_ms_r16'])}"
        f" (cold again: {r16['cold_again']['median_ms']:.1f} ms  {verdict(r16['cold_again']['median_ms'] <= TARGETS['cold_median_ms_r16'])})"
    )
    print(
        f"  host hit median, rank 16 <= {TARGETS['host_hit_ms']:.0f} ms: {hit16:.2f} ms  {verdict(hit16 <= TARGETS['host_hit_ms'])}"
        f" (every rank: worst {worst_hit:.2f} ms  {verdict(worst_hit <= TARGETS['host_hit_ms'])})"
    )
    if tpot is not None:
        base, loaded = tpot["no loads"], tpot["with loads"]
        print(
            f"  p99 TPOT rise during loads <= {TARGETS['tpot_p99_rise']:.0%}: {base['tpot_p99_ms']:.1f} -> {loaded['tpot_p99_ms']:.1f} ms = {tpot['rise_p99']:+.1%}  {verdict(tpot['rise_p99'] <= TARGETS['tpot_p99_rise'])}"
        )
        print(
            f"\nTPOT, {args.num_requests} requests x {args.tokens} tokens over {args.running_adapters} resident rank-16 adapters, {args.rounds} rounds; loads: {args.cold_adapters} cold rank-16 adapters, {args.load_pattern}, via {args.load_via}"
        )
        print(
            f"{'run':10s} {'TPOT p50':>9s} {'TPOT p99':>9s} {'step p50':>9s} {'step p99':>9s} {'step max':>9s}"
        )
        for key in ("no loads", "with loads"):
            t = tpot[key]
            print(
                f"{key:10s} {t['tpot_p50_ms']:9.1f} {t['tpot_p99_ms']:9.1f} {t['step_p50_ms']:9.1f} {t['step_p99_ms']:9.1f} {t['step_max_ms']:9.1f}"
            )
        print(
            f"(ms; step = one decode step of the whole batch; loads not finished when decode ended, per round: {tpot['loads_unfinished_per_round']})"
        )


if __name__ == "__main__":
    main()
