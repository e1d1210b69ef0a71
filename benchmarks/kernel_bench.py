"""LoRA kernel benchmark on 7-8B-model shapes: the fused projections of one layer (q|k|v 4096 -> 4096/1024/
1024, o 4096 -> 4096, gate|up 4096 -> 14336/14336, down 14336 -> 4096), tokens spread round-robin over
1..64 distinct adapters, rank 8..64, in the model's own layout: LoraSlots of r_max = --max-lora-rank
(64, the serving default) holding rank-r adapters, A rows under W and B slot-minor [out, slots, r_max]
(kernels/lora_slots.py). For each case it times
    triton: h = lora_shrink(x, A, meta); lora_expand(y, h, B, offsets, meta)      (CUDA only)
    torch:  lora_delta_cpu(...), the CPU strategies (kernels/cpu_lora.py) as the cost model picks them
            with figures calibrated at the start of the run on these shapes (kernels/cpu_calibrate.py;
            on CUDA, where CPU figures mean nothing, the grouped strategy)
and compares both with the memory floor: bytes of the distinct adapters' A and B at their true rank,
plus x read and y read and written, over the device's copy bandwidth measured in the same run.
The P6 rows come first: 64 tokens x 32 adapters, rank 16 (target: triton >= 60% of the floor, >= 5x torch).

    python benchmarks/kernel_bench.py [--dtype bfloat16] [--quick] [--out benchmarks/out/kernel_bench.json] [--write-results]

Runs on CUDA when available (Triton + torch), else on CPU (the torch strategies only, a smaller sweep).
--quick: the P6 rows and a short sweep (benchmarks/gpu_check.sh); --tiny: toy shapes on CPU (tests).
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
TINY_PROJECTIONS = {"qkv": (64, [64, 32, 32]), "down": (160, [64])}
P6 = dict(tokens=64, adapters=32, rank=16)
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


def model_layout_slots(in_f: int, slices: list[int], num_adapters: int, rank: int, r_max: int, dtype, device):
    """LoraSlots as the model holds them (A under W, B slot-minor), each slot a random rank-`rank` adapter.
    W itself is a zero-stride stand-in: the kernels never read it."""
    from loraplex.kernels.lora_slots import LoraSlots

    offsets = [0]
    for w in slices:
        offsets.append(offsets[-1] + w)
    w_stub = torch.zeros((), dtype=dtype, device=device).expand(offsets[-1], in_f)
    slots = LoraSlots(w_stub, None, offsets, num_adapters, r_max, with_row_tables=False, copy_weight=False)
    g = torch.Generator(device=device).manual_seed(0)
    for s in range(num_adapters):
        # Random data, not zeros: zeros can run faster than real data and hide unwritten outputs.
        per_slice = [
            (
                torch.randn(rank, in_f, generator=g, device=device, dtype=dtype) / in_f**0.5,
                torch.randn(w, rank, generator=g, device=device, dtype=dtype) / rank**0.5,
            )
            for w in slices
        ]
        slots.write(s, per_slice)
    return slots


def bench_case(
    proj: str, num_tokens: int, num_adapters: int, rank: int, dtype, device, bandwidth: float, r_max: int = 64, shapes=None,
    figures=None,
) -> dict:
    from loraplex.kernels import build_lora_meta, lora_delta_cpu

    in_f, slices = (shapes or PROJECTIONS)[proj]
    slots = model_layout_slots(in_f, slices, num_adapters, rank, max(r_max, rank), dtype, device)
    lora_a, lora_b, offsets = slots.lora_a, slots.lora_b, slots.slice_offsets
    out_total = offsets[-1]
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(num_tokens, in_f, generator=g, device=device, dtype=dtype)  # [T, in]
    y = torch.randn(num_tokens, out_total, generator=g, device=device, dtype=dtype)  # [T, out_total]
    ranks = [rank] * num_adapters
    meta = build_lora_meta([t % num_adapters for t in range(num_tokens)], ranks, device=device)
    active = min(num_adapters, num_tokens)
    elem = x.element_size()
    floor_bytes = active * (len(slices) * rank * in_f + out_total * rank) * elem + (x.numel() + 2 * y.numel()) * elem
    row = dict(
        proj=proj, tokens=num_tokens, adapters=num_adapters, rank=rank, r_max=slots.r_max,
        floor_us=floor_bytes / bandwidth * 1e6,
    )  # fmt: skip
    row["torch_us"] = median_seconds(lambda: lora_delta_cpu(y, x, lora_a, lora_b, offsets, meta, figures=figures), device) * 1e6
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


def p6_summary(rows: list[dict]) -> dict | None:
    """The P6 case over one whole layer (the four projections): times and bytes add up."""
    p6 = [r for r in rows if all(r[k] == v for k, v in P6.items())]
    if not p6 or "triton_us" not in p6[0]:
        return None
    floor, triton_us, torch_us = (sum(r[k] for r in p6) for k in ("floor_us", "triton_us", "torch_us"))
    return dict(
        case=P6, projections=[r["proj"] for r in p6], floor_us=floor, triton_us=triton_us, torch_us=torch_us,
        triton_floor_frac=floor / triton_us, triton_vs_torch=torch_us / triton_us,
        meets_target=floor / triton_us >= 0.6 and torch_us / triton_us >= 5,
    )  # fmt: skip


def table(rows: list[dict], has_triton: bool) -> str:
    head = "| proj | tokens | adapters | rank (r_max) | floor us | torch us | torch % floor |"
    head += " triton us | triton % floor | triton / torch speed-up |" if has_triton else ""
    lines = [head, "|" + "---:|" * (head.count("|") - 1)]
    for r in rows:
        line = (
            f"| {r['proj']} | {r['tokens']} | {r['adapters']} | {r['rank']} ({r['r_max']}) | {r['floor_us']:.1f} | "
            f"{r['torch_us']:.1f} | {100 * r['torch_floor_frac']:.0f}% |"
        )
        if has_triton:
            line += f" {r['triton_us']:.1f} | {100 * r['triton_floor_frac']:.0f}% | {r['triton_vs_torch']:.1f}x |"
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--max-lora-rank", type=int, default=64, help="the slots' r_max (the serving default: 64)")
    ap.add_argument("--quick", action="store_true", help="the P6 rows and a short sweep")
    ap.add_argument("--tiny", action="store_true", help="toy shapes on CPU (a check that the script runs)")
    ap.add_argument("--out", default="benchmarks/out/kernel_bench.json")
    ap.add_argument("--write-results", action="store_true", help="put the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: the interpreter is for tests, not timings")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        torch.set_num_threads(1)  # toy ops: OpenMP barriers on a shared CPU cost more than the work
    dtype = getattr(torch, args.dtype)
    shapes = TINY_PROJECTIONS if args.tiny else PROJECTIONS
    if args.tiny:
        tokens, adapter_counts, ranks = [1, 8], [1, 4], [4]
    elif device.type == "cuda" and args.quick:
        tokens, adapter_counts, ranks = [1, 64, 512], [1, 32, 64], [16]
    elif device.type == "cuda":
        tokens, adapter_counts, ranks = [1, 16, 64, 256, 512], [1, 8, 32, 64], [8, 16, 64]
    else:  # the torch strategies on 2 CPU cores: a smaller sweep keeps it to a few minutes
        tokens, adapter_counts, ranks = [1, 64, 512], [1, 8, 32, 64], [16]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    bandwidth = copy_bandwidth(device)
    print(f"device: {name}; copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write); dtype {args.dtype}; "
          f"slots of r_max {args.max_lora_rank}", flush=True)  # fmt: skip
    figures = cpu_figures(shapes, dtype, args.max_lora_rank) if device.type == "cpu" else None
    cases = [(proj, t, k, r) for proj in shapes for t in tokens for k in adapter_counts for r in ranks]
    if not args.tiny:  # the P6 rows first, so a run cut short still has them
        p6 = [(proj, P6["tokens"], P6["adapters"], P6["rank"]) for proj in shapes]
        cases = p6 + [c for c in cases if c not in p6]
    rows = []
    for proj, t, k, r in cases:
        row = bench_case(proj, t, k, r, dtype, device, bandwidth, args.max_lora_rank, shapes, figures)
        rows.append(row)
        print(row, flush=True)
    text = table(rows, device.type == "cuda")
    summary = p6_summary(rows)
    if summary is not None:
        text += (
            f"\n\nP6 (one layer, {summary['projections']}, 64 tokens x 32 adapters, rank 16): triton "
            f"{summary['triton_us']:.1f} us = {100 * summary['triton_floor_frac']:.0f}% of the floor "
            f"({summary['floor_us']:.1f} us), {summary['triton_vs_torch']:.1f}x torch; target >= 60% and >= 5x: "
            f"{'met' if summary['meets_target'] else 'NOT met'}"
        )
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        device=name, dtype=args.dtype, r_max=args.max_lora_rank, copy_bandwidth_bytes_per_s=bandwidth,
        torch=torch.__version__, triton=_triton_version(),
    )  # fmt: skip
    out.write_text(json.dumps(dict(meta=meta, rows=rows, p6=summary), indent=2))
    print(f"wrote {out}")
    if args.write_results:
        section = (
            f"{MARK_BEGIN}\n`python benchmarks/kernel_bench.py --dtype {args.dtype} --write-results` on {name}, "
            f"copy bandwidth {bandwidth / 1e9:.1f} GB/s, torch {torch.__version__}:\n\n{text}\n{MARK_END}"
        )
        write_results_section(section, MARK_BEGIN, MARK_END, "LoRA kernels (issue 5)")


def cpu_figures(shapes: dict, dtype, r_max: int):
    """The CPU cost model's figures measured now on these projections (slots of r_max), as the engine
    does at start (kernels/cpu_calibrate.py); None (grouped) when the calibration fails."""
    from loraplex.kernels.cpu_calibrate import CalibrationError, calibrate, format_figures
    from loraplex.kernels.cpu_plan import LinearShape

    elem = torch.empty((), dtype=dtype).element_size()
    linear_shapes = [LinearShape(sum(widths), len(widths), r_max, in_f, elem) for in_f, widths in shapes.values()]
    try:
        figures = calibrate(linear_shapes, dtype)
    except CalibrationError as exc:
        print(f"cpu calibration failed ({exc}): the grouped strategy throughout", flush=True)
        return None
    print(f"cpu cost figures: {format_figures(figures)}", flush=True)
    return figures


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
