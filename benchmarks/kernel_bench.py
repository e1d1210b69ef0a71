"""Kernel benchmark: Triton lora_shrink + lora_expand vs the torch reference vs the base matmul (CUDA only).

For each shape it times, on one fused-projection-free linear (hidden -> hidden):
    base:   y = x @ W.T                                       (the frozen base layer)
    triton: h = lora_shrink(x, A, meta); lora_expand(y, h, B, [0, hidden], meta)
    torch:  lora_apply_ref(y, x, A, B, [0, hidden], meta)     (one matmul pair per distinct adapter)
Decode: one token per sequence, batch 1..256; prefill: whole prompts. Tokens are spread over 1/8/32/64
distinct adapters (fewer when there are fewer sequences), rank 16 and 64. Metadata is built outside
the timed region: the engine builds it once per step and shares it across every layer.

    python benchmarks/kernel_bench.py [--out benchmarks/out/kernel_bench.json] [--dtype bfloat16]

Not a test; prints that it needs CUDA and exits 0 elsewhere.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

HIDDEN = 4096
NUM_SLOTS = 64
DECODE_BATCHES = [1, 8, 32, 64, 128, 256]
PREFILL_SHAPES = [(1, 512), (4, 512), (16, 512)]  # (num_seqs, prompt_len)
ADAPTER_COUNTS = [1, 8, 32, 64]
RANKS = [16, 64]


def bench_one(
    phase: str, num_seqs: int, seq_len: int, num_adapters: int, rank: int, dtype: torch.dtype, weights: dict
) -> dict:
    import triton.testing

    from loraplex.kernels import build_lora_meta, lora_apply_ref
    from loraplex.kernels.lora_expand import lora_expand
    from loraplex.kernels.lora_shrink import lora_shrink

    num_tokens = num_seqs * seq_len
    # Sequence j uses adapter slot j % num_adapters; all of a sequence's tokens share its adapter.
    token_slot = [(t // seq_len) % num_adapters for t in range(num_tokens)]
    meta = build_lora_meta(token_slot, [rank] * NUM_SLOTS, device="cuda")
    lora_a, lora_b, base_w = weights["a"][rank], weights["b"][rank], weights["w"]
    x = torch.randn(num_tokens, HIDDEN, device="cuda", dtype=dtype)  # [T, hidden]
    y = torch.zeros(num_tokens, HIDDEN, device="cuda", dtype=dtype)  # [T, hidden]
    offsets = [0, HIDDEN]

    def run_base() -> None:
        torch.matmul(x, base_w.T, out=y)

    def run_triton() -> None:
        h = lora_shrink(x, lora_a, meta)  # [T, 1, rank] fp32
        lora_expand(y, h, lora_b, offsets, meta)

    def run_torch() -> None:
        lora_apply_ref(y, x, lora_a, lora_b, offsets, meta)

    # One correctness check per shape, against the reference, before timing.
    y_tri, y_ref = torch.zeros_like(y), torch.zeros_like(y)
    lora_expand(y_tri, lora_shrink(x, lora_a, meta), lora_b, offsets, meta)
    lora_apply_ref(y_ref, x, lora_a, lora_b, offsets, meta)
    max_abs_diff = (y_tri.float() - y_ref.float()).abs().max().item()

    def time_us(fn) -> float:
        return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")

    base_us, triton_us, torch_us = time_us(run_base), time_us(run_triton), time_us(run_torch)
    return {
        "phase": phase,
        "num_seqs": num_seqs,
        "num_tokens": num_tokens,
        "distinct_adapters": meta.num_active,
        "rank": rank,
        "base_us": round(base_us, 2),
        "triton_us": round(triton_us, 2),
        "torch_us": round(torch_us, 2),
        "triton_over_base": round(triton_us / base_us, 3),
        "torch_over_base": round(torch_us / base_us, 3),
        "max_abs_diff_vs_torch": max_abs_diff,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out/kernel_bench.json", help="where to write the JSON")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        print("kernel_bench: needs a CUDA device (and TRITON_INTERPRET unset); nothing to do.")
        return 0

    import triton

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    weights = {
        "w": torch.randn(HIDDEN, HIDDEN, device="cuda", dtype=dtype) / HIDDEN**0.5,  # [out, in]
        # [num_slots, 1 slice, rank, hidden] and [num_slots, hidden, rank], one stacked buffer per rank
        "a": {
            r: torch.randn(NUM_SLOTS, 1, r, HIDDEN, device="cuda", dtype=dtype) / HIDDEN**0.5 for r in RANKS
        },
        "b": {r: torch.randn(NUM_SLOTS, HIDDEN, r, device="cuda", dtype=dtype) / r**0.5 for r in RANKS},
    }
    shapes = [("decode", b, 1) for b in DECODE_BATCHES] + [("prefill", n, s) for n, s in PREFILL_SHAPES]
    rows = []
    header = f"{'phase':8} {'tokens':>6} {'adapt':>5} {'rank':>4} {'base_us':>9} {'triton_us':>9} {'torch_us':>9} {'tri/base':>8} {'torch/base':>10}"
    print(header)
    print("-" * len(header))
    for phase, num_seqs, seq_len in shapes:
        for rank in RANKS:
            # With fewer sequences than adapters, only num_seqs adapters are distinct: measure each count once.
            for num_adapters in sorted({min(a, num_seqs) for a in ADAPTER_COUNTS}):
                row = bench_one(phase, num_seqs, seq_len, num_adapters, rank, dtype, weights)
                rows.append(row)
                print(
                    f"{row['phase']:8} {row['num_tokens']:>6} {row['distinct_adapters']:>5} {row['rank']:>4} "
                    f"{row['base_us']:>9.1f} {row['triton_us']:>9.1f} {row['torch_us']:>9.1f} "
                    f"{row['triton_over_base']:>8.2f} {row['torch_over_base']:>10.2f}",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "hidden": HIDDEN,
        "num_slots": NUM_SLOTS,
        "rows": rows,
    }
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
