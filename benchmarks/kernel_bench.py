"""LoRA kernel benchmark on 7-8B-model shapes: the fused projections of one layer (q|k|v 4096 -> 4096/1024/
1024, o 4096 -> 4096, gate|up 4096 -> 14336/14336, down 14336 -> 4096), tokens spread round-robin over
1..64 distinct adapters, rank 8..64. For each case it times
    triton: h = lora_shrink(x, A, meta); lora_expand(y, h, B, offsets, meta)      (CUDA only)
    torch:  lora_delta_cpu(...), the CPU strategies (kernels/cpu_lora.py) as the cost model picks them
and compares both with the memory floor: bytes of the distinct adapters' A and B plus x read and y read
and written, over the device's copy bandwidth measured in the same run.

    python benchmarks/kernel_bench.py [--dtype bfloat16] [--out benchmarks/out/kernel_bench.json] [--write-results]

Runs on CUDA when available (Triton + torch), else on CPU (the torch strategies only, a smaller sweep).
--write-results puts the table into benchmarks/RESULTS.md (between the kernel-benchmark markers).
Not a test. (Named kernel_bench.py, not kernels.py: a top-level `kernels` module on sys.path would
shadow the Hugging Face `kernels` package that transformers probes for.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from benchutil import write_results_section

PROJECTIONS = {  # name: (in_features, output slice widths)
    "qkv": (4096, [4096, 1024, 1024]),
    "o": (4096, [4096]),
    "gate_up": (4096, [14336, 14336]),
    "down": (14336, [4096]),
}
MARK_BEGIN, MARK_END = "<!-- kernel-bench:begin -->", "<!-- kernel-bench:end -->"


def copy_bandwidth(device: torch.device) -> float:
    """Bytes read + written per second for a large device-to-device copy."""
    a = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    a.fill_(1)
    seconds = median_seconds(lambda: b.copy_(a), device, repeats=5)
    return 2 * a.numel() / seconds


def median_seconds(fn, device: torch.device, repeats: int = 10) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def bench_case(proj: str, num_tokens: int, num_adapters: int, rank: int, dtype, device, bandwidth: float) -> dict:
    from loraplex.kernels import build_lora_meta, lora_delta_cpu

    in_f, slices = PROJECTIONS[proj]
    offsets = [0]
    for w in slices:
        offsets.append(offsets[-1] + w)
    out_total = offsets[-1]
    g = torch.Generator(device="cpu").manual_seed(0)
    # Random data, not zeros: zeros can run faster than real data and hide unwritten outputs.
    lora_a = (torch.randn(num_adapters, len(slices), rank, in_f, generator=g) / in_f**0.5).to(device, dtype)
    lora_b = (torch.randn(num_adapters, out_total, rank, generator=g) / rank**0.5).to(device, dtype)
    x = torch.randn(num_tokens, in_f, generator=g).to(device, dtype)  # [T, in]
    y = torch.randn(num_tokens, out_total, generator=g).to(device, dtype)  # [T, out_total]
    meta = build_lora_meta([t % num_adapters for t in range(num_tokens)], [rank] * num_adapters, device=device)
    active = min(num_adapters, num_tokens)
    elem = x.element_size()
    floor_bytes = active * (len(slices) * rank * in_f + out_total * rank) * elem + (x.numel() + 2 * y.numel()) * elem
    row = dict(proj=proj, tokens=num_tokens, adapters=num_adapters, rank=rank, floor_us=floor_bytes / bandwidth * 1e6)
    row["torch_us"] = median_seconds(lambda: lora_delta_cpu(y, x, lora_a, lora_b, offsets, meta), device) * 1e6
    if device.type == "cuda":
        from loraplex.kernels.lora_expand import lora_expand
        from loraplex.kernels.lora_shrink import lora_shrink

        def run_triton() -> None:
            lora_expand(y, lora_shrink(x, lora_a, meta), lora_b, offsets, meta)

        row["triton_us"] = median_seconds(run_triton, device) * 1e6
        row["triton_vs_torch"] = row["torch_us"] / row["triton_us"]
        row["triton_floor_frac"] = row["floor_us"] / row["triton_us"]
    row["torch_floor_frac"] = row["floor_us"] / row["torch_us"]
    return row


def table(rows: list[dict], has_triton: bool) -> str:
    head = "| proj | tokens | adapters | rank | floor us | torch us | torch % floor |"
    head += " triton us | triton % floor | triton / torch speed-up |" if has_triton else ""
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r['proj']} | {r['tokens']} | {r['adapters']} | {r['rank']} | {r['floor_us']:.1f} | "
            f"{r['torch_us']:.1f} | {100 * r['torch_floor_frac']:.0f}% |"
        )
        if has_triton:
            line += f" {r['triton_us']:.1f} | {100 * r['triton_floor_frac']:.0f}% | {r['triton_vs_torch']:.1f}x |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--out", default="benchmarks/out/kernel_bench.json")
    ap.add_argument("--write-results", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter is for tests, not timings")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    if device.type == "cuda":
        tokens, adapter_counts, ranks = [1, 16, 64, 256, 512], [1, 8, 32, 64], [8, 16, 64]
        name = torch.cuda.get_device_name()
    else:  # the torch strategies on 2 CPU cores: a smaller sweep keeps it to a few minutes
        tokens, adapter_counts, ranks = [1, 64, 512], [1, 8, 32, 64], [16]
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    bandwidth = copy_bandwidth(device)
    print(f"device: {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); dtype {args.dtype}", flush=True)
    rows = []
    for proj in PROJECTIONS:
        for t in tokens:
            for k in adapter_counts:
                for r in ranks:
                    row = bench_case(proj, t, k, r, dtype, device, bandwidth)
                    rows.append(row)
                    print(row, flush=True)
    text = table(rows, device.type == "cuda")
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=name, dtype=args.dtype, copy_bandwidth_bytes_per_s=bandwidth, torch=torch.__version__)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"wrote {out}")
    if args.write_results:
        section = (
            f"{MARK_BEGIN}\n`python benchmarks/kernel_bench.py --dtype {args.dtype} --write-results` on {name}, "
            f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, torch {torch.__version__}:\n\n{text}\n{MARK_END}"
        )
        write_results_section(section, MARK_BEGIN, MARK_END, "LoRA kernels (issue 5)")


if __name__ == "__main__":
    main()
