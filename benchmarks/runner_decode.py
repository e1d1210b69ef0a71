"""gpu_check stage 6: runner-level decode on a random-weight Llama-3-8B-shaped bf16 model, built without the
server or a checkpoint (CausalLM from a ModelSpec, random weights, rank-16 adapters written straight
into slots of r_max 64, the serving default). ModelRunner.run() steps exactly as the engine's loop
calls it.

Cases: batch 1/8/32/64 x 0/1/8/32/64 distinct adapters (never more than the batch) at context 128;
batch 64 at context 1k and 2k with 0 and 64 adapters; one 2k-token prefill with and without an adapter.
Per case: GPU time per step (CUDA events around run(), synchronized: the stream's span, idle gaps
included) and host time per step (run()'s own wall time, before the synchronize: Python, metadata,
launches). Host close to GPU means the GPU waits on launches (CUDA graphs would help); stage 7
(step_profile.py) gives the kernels' own time for one step to compare. P7 comes first: batch 64 x 64 adapters against base-only at
context 128, as kept throughput over the memory-traffic bound base_bytes / (base_bytes + adapter_bytes).

    python benchmarks/runner_decode.py --out OUT/runner_decode.json [--tiny]

--tiny (and without CUDA): a toy model on the CPU, a few cases (checks that the script runs).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

LLAMA3_8B = dict(arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
                 num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 qk_norm=False, sliding_window=None, max_position_embeddings=8192)  # fmt: skip
TINY = dict(LLAMA3_8B, vocab_size=512, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)
RANK, R_MAX, BLOCK = 16, 64, 16


def build_runner(spec_kw: dict, dtype: torch.dtype, device: torch.device, num_slots: int, max_tokens: int):
    """A ModelRunner over a random-weight CausalLM with num_slots rank-16 adapters and a KV cache of
    max_tokens tokens (random too: timing on zeros can flatter)."""
    from loraplex.engine.model import CausalLM, ModelSpec
    from loraplex.engine.runner import ModelRunner

    spec = ModelSpec(**spec_kw)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim))
    model = CausalLM(spec, inv_freq, 1.0, {"qkv": False, "o": False, "mlp": False}, dtype=dtype, device=device)
    model.inv_freq = inv_freq.to(device)
    model.allocate_lora_slots(num_slots, R_MAX, copy_weights=False)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:  # norms stay 1
                p.normal_(0.0, 0.02, generator=g)
        for lin in model.lora_linears():
            assert lin.slots is not None
            a, b = lin.slots.lora_a, lin.slots.lora_b  # [slots, slices, r_max, in], [slots, out, r_max]
            a[:, :, :RANK].normal_(0.0, a.shape[-1] ** -0.5, generator=g)
            b[:, :, :RANK].normal_(0.0, 0.02, generator=g)
    model.pack()
    model.num_weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    runner = ModelRunner(model.eval(), spec, math.ceil(max_tokens / BLOCK) + 8, BLOCK)
    for k, v in runner.kv_caches:
        k.normal_(generator=g)
        v.normal_(generator=g)
    runner.slot_ranks = [RANK] * num_slots
    adapter_bytes = sum(
        (lin.slots.lora_a.shape[1] * lin.slots.lora_a.shape[3] + lin.slots.out_total) * RANK * lin.slots.lora_a.element_size()
        for lin in model.lora_linears() if lin.slots is not None
    )  # fmt: skip
    return runner, spec, adapter_bytes


def time_steps(runner, seqs, device: torch.device, warmup: int = 3, steps: int = 10) -> dict:
    """Median GPU and host time per step of runner.run(seqs) (the same step, repeated: timing only)."""
    cuda = device.type == "cuda"
    gpu, host = [], []
    for i in range(warmup + steps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        runner.run(seqs)
        t_host = time.perf_counter() - t0
        if cuda:
            end.record()
            end.synchronize()
        t_all = time.perf_counter() - t0
        if i >= warmup:
            host.append(t_host)
            gpu.append(start.elapsed_time(end) / 1e3 if cuda else t_all)
    return dict(gpu_ms=1e3 * sorted(gpu)[len(gpu) // 2], host_ms=1e3 * sorted(host)[len(host) // 2])


def decode_seqs(batch: int, adapters: int, ctx: int, max_ctx: int):
    """batch single-token sequences at position ctx, each with its own KV blocks, adapters round-robin."""
    from loraplex.engine.runner import StepSeq

    per_seq = math.ceil((max_ctx + 1) / BLOCK)
    return [
        StepSeq([7 + b], ctx, list(range(b * per_seq, b * per_seq + math.ceil((ctx + 1) / BLOCK))), b % adapters if adapters else -1, True)
        for b in range(batch)
    ]


def cases(tiny: bool) -> list[dict]:
    if tiny:
        return [dict(kind="decode", batch=b, adapters=a, ctx=16) for b, a in ((4, 0), (4, 4), (1, 1))] + [
            dict(kind="prefill", batch=1, adapters=a, ctx=32) for a in (0, 1)
        ]
    out = [dict(kind="decode", batch=64, adapters=a, ctx=128) for a in (0, 64)]  # P7 first
    out += [dict(kind="decode", batch=b, adapters=a, ctx=128) for b in (1, 8, 32, 64) for a in (0, 1, 8, 32, 64)
            if a <= b and not (b == 64 and a in (0, 64))]  # fmt: skip
    out += [dict(kind="decode", batch=64, adapters=a, ctx=c) for c in (1024, 2048) for a in (0, 64)]
    out += [dict(kind="prefill", batch=1, adapters=a, ctx=2048) for a in (0, 1)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/runner_decode.json")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args()
    tiny = args.tiny or not torch.cuda.is_available()
    device = torch.device("cpu" if tiny else "cuda")
    dtype = torch.float32 if tiny else torch.bfloat16
    if tiny:
        torch.set_num_threads(1)  # toy ops: OpenMP barriers on a shared CPU cost more than the work
    todo = cases(tiny)
    max_ctx = max(c["ctx"] for c in todo)
    t0 = time.perf_counter()
    runner, spec, adapter_bytes = build_runner(TINY if tiny else LLAMA3_8B, dtype, device, 4 if tiny else 64, 64 * (max_ctx + BLOCK + 1))
    print(f"built the model in {time.perf_counter() - t0:.1f} s; base {runner.model.num_weight_bytes / 1e9:.2f} GB, "
          f"one rank-{RANK} adapter {adapter_bytes / 1e6:.1f} MB; device {device}", flush=True)  # fmt: skip
    from loraplex.engine.runner import StepSeq

    rows = []
    for c in todo:
        if c["kind"] == "decode":
            seqs = decode_seqs(c["batch"], c["adapters"], c["ctx"], max_ctx)
        else:
            seqs = [StepSeq(list(range(1, c["ctx"] + 1)), 0, list(range(math.ceil(c["ctx"] / BLOCK))), 0 if c["adapters"] else -1, True)]
        row = dict(c, **time_steps(runner, seqs, device))
        kv_bytes = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * dtype.itemsize * c["batch"] * c["ctx"]
        row["bytes_floor"] = runner.model.num_weight_bytes + min(c["adapters"], c["batch"]) * adapter_bytes + kv_bytes
        rows.append(row)
        print(row, flush=True)
    report: dict = dict(device=str(device), dtype=str(dtype), rank=RANK, r_max=R_MAX, rows=rows)
    base, lora = rows[0], rows[1]
    if base["kind"] == "decode" and base["adapters"] == 0 and lora["adapters"] == base["batch"]:
        kept = base["gpu_ms"] / lora["gpu_ms"]
        bound = base["bytes_floor"] / lora["bytes_floor"]
        report["p7"] = dict(batch=base["batch"], adapters=lora["adapters"], ctx=base["ctx"], kept=kept, bound=bound,
                            kept_over_bound=kept / bound, meets_target=kept / bound >= 0.9)  # fmt: skip
        print(f"P7: batch {base['batch']} x {lora['adapters']} adapters kept {kept:.3f} of base-only GPU time per step; "
              f"memory-traffic bound {bound:.3f}; kept/bound {kept / bound:.3f} (target >= 0.9)")  # fmt: skip
    print("| kind | batch | adapters | ctx | GPU ms/step | host ms/step | host/GPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['batch']} | {r['adapters']} | {r['ctx']} | {r['gpu_ms']:.2f} | {r['host_ms']:.2f} | {r['host_ms'] / r['gpu_ms']:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
