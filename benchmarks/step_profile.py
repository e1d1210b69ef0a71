"""gpu_check stage 7: a one-step profile of the runner's decode step (batch 64, 64 distinct rank-16
adapters, context 128, the random Llama-3-8B-shaped bf16 model of runner_decode.py): the top kernels by
GPU time, kernel launches per step, and peak device memory.

    python benchmarks/step_profile.py --out OUT/step_profile.json [--tiny]

--tiny (and without CUDA): the toy model on the CPU, CPU ops instead of kernels.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from runner_decode import BLOCK, LLAMA3_8B, TINY, build_runner, decode_seqs
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/step_profile.json")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    tiny = args.tiny or not torch.cuda.is_available()
    cuda = not tiny
    device = torch.device("cuda" if cuda else "cpu")
    if tiny:
        torch.set_num_threads(1)
    batch, adapters, ctx = (4, 4, 16) if tiny else (64, 64, 128)
    runner, _, _ = build_runner(TINY if tiny else LLAMA3_8B, torch.float32 if tiny else torch.bfloat16, device,
                                adapters, batch * (ctx + BLOCK + 1))  # fmt: skip
    seqs = decode_seqs(batch, adapters, ctx, ctx)
    for _ in range(3):  # compile and warm up outside the profile
        runner.run(seqs)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        runner.run(seqs)
        if cuda:
            torch.cuda.synchronize()
    events = prof.key_averages()
    if cuda:
        # Raw events: each kernel execution is one event on the CUDA device (one launch)
        kernels = [e for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
        by_name: dict[str, list[float]] = {}
        for e in kernels:
            by_name.setdefault(e.name, []).append(e.time_range.elapsed_us())
        ranked = sorted(by_name.items(), key=lambda kv: sum(kv[1]), reverse=True)
        top = [dict(name=name[:120], calls=len(ts), gpu_us=sum(ts)) for name, ts in ranked[:15]]
        launches = len(kernels)
        gpu_total = sum(sum(ts) for ts in by_name.values())
    else:
        ops = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)
        top = [dict(name=e.key[:120], calls=e.count, cpu_us=e.self_cpu_time_total) for e in ops[:15]]
        launches, gpu_total = None, None
    report = dict(
        device=str(device), batch=batch, adapters=adapters, ctx=ctx, top=top, kernel_launches_per_step=launches,
        gpu_us_per_step=gpu_total, peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    )  # fmt: skip
    for row in top:
        print(row)
    print(json.dumps({k: v for k, v in report.items() if k != "top"}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
