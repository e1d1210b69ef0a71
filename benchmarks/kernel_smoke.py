"""gpu_check stage 2: Triton shrink + expand in bf16, fp16 and fp32, in the model's own layout (LoraSlots:
A under W, B slot-minor, slots of r_max 64 holding rank 8 / 16 / 64 adapters), against the float64
per-token loop (kernels/reference.py), with each dtype's first-call (compile) time.

    python benchmarks/kernel_smoke.py --out OUT/kernel_smoke.json [--tiny]

Error measure: ||delta_got - delta_ref|| / ||delta_ref|| over the LoRA rows, where delta_got = y_out - y_in
and delta_ref uses the kernels' own h rounded to the dtype (as PEFT and the kernels hold it); base-only
rows must come back bit for bit. Fresh random inputs per case, y poisoned with random values.
Without CUDA (or with --tiny) it runs toy shapes under the Triton interpreter (TRITON_INTERPRET=1 must be
set before the kernels are imported: this script sets it itself when there is no CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

TOL = {"float32": 1e-5, "bfloat16": 1e-2, "float16": 2e-3}  # relative error bounds (METHOD: fp32 far under 1e-3)
# (name, in_features, output slice widths, tokens, adapters): GQA q|k|v and down of an 8B layer
CASES = [("qkv", 4096, [4096, 1024, 1024], 64, 8), ("down", 14336, [4096], 40, 5)]
TINY_CASES = [("qkv", 80, [64, 16, 16], 12, 3), ("down", 1100, [48], 7, 2)]


def run_case(name, in_f, widths, num_tokens, num_adapters, dtype, device, seed: int) -> dict:
    from loraplex.kernels import build_lora_meta
    from loraplex.kernels.lora_expand import lora_expand
    from loraplex.kernels.lora_shrink import lora_shrink
    from loraplex.kernels.lora_slots import LoraSlots

    g = torch.Generator().manual_seed(seed)
    ranks = [(8, 16, 64)[s % 3] for s in range(num_adapters)]
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    w_stub = torch.zeros((), dtype=dtype, device=device).expand(offsets[-1], in_f)
    slots = LoraSlots(w_stub, None, offsets, num_adapters, 64, with_row_tables=False, copy_weight=False)
    for s, r in enumerate(ranks):
        slots.write(s, [(torch.randn(r, in_f, generator=g) / in_f**0.5, torch.randn(w, r, generator=g) / r**0.5) for w in widths])
    token_slot = [-1 if t % 5 == 4 else (t * 7) % num_adapters for t in range(num_tokens)]
    meta = build_lora_meta(token_slot, ranks, device=device)
    x = torch.randn(num_tokens, in_f, generator=g).to(device, dtype)
    y_in = torch.randn(num_tokens, offsets[-1], generator=g).to(device, dtype)
    y = y_in.clone()
    h = lora_shrink(x, slots.lora_a, meta)
    lora_expand(y, h, slots.lora_b, offsets, meta)
    if device.type == "cuda":
        torch.cuda.synchronize()

    lora = [t for t, s in enumerate(token_slot) if s >= 0]
    base = [t for t, s in enumerate(token_slot) if s < 0]
    # The reference: float64 products of the kernels' h (split-K partials added, rounded to the dtype)
    # and B, so the measure isolates the expand; h itself is checked against x @ A^T in float64.
    a64, b64, x64 = slots.lora_a.double().cpu(), slots.lora_b.double().cpu(), x.double().cpu()
    h_got = h.cpu().nan_to_num().sum(0)  # [T, slices, r_max]
    h_err = delta_err = 0.0
    delta_ref = torch.zeros(num_tokens, offsets[-1], dtype=torch.float64)
    h_ref_all = torch.zeros_like(h_got, dtype=torch.float64)
    for t in lora:
        s, r = token_slot[t], ranks[token_slot[t]]
        for i, (lo, hi) in enumerate(zip(offsets, offsets[1:], strict=False)):
            h_ref_all[t, i, :r] = x64[t] @ a64[s, i, :r].T
            h_rounded = h_got[t, i, :r].to(dtype).double()
            delta_ref[t, lo:hi] = h_rounded @ b64[s, lo:hi, :r].T
    mask = torch.zeros_like(h_ref_all, dtype=torch.bool)
    for t in lora:
        mask[t, :, : ranks[token_slot[t]]] = True
    h_err = float((h_got.double()[mask] - h_ref_all[mask]).norm() / h_ref_all[mask].norm())
    delta_got = y.double().cpu() - y_in.double().cpu()
    delta_err = float((delta_got[lora] - delta_ref[lora]).norm() / delta_ref[lora].norm())
    base_exact = bool(torch.equal(y.cpu()[base], y_in.cpu()[base]))
    finite = bool(torch.isfinite(y).all())
    return dict(case=name, in_features=in_f, widths=widths, tokens=num_tokens, adapters=num_adapters,
                h_rel_err=h_err, delta_rel_err=delta_err, base_rows_exact=base_exact, finite=finite)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/kernel_smoke.json")
    ap.add_argument("--tiny", action="store_true", help="toy shapes (under the interpreter without CUDA)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if not cuda:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (run_case imports them)
        if "loraplex.kernels.lora_shrink" in sys.modules:
            raise SystemExit("the kernels were imported before TRITON_INTERPRET was set")
    device = torch.device("cuda" if cuda else "cpu")
    cases = TINY_CASES if args.tiny or not cuda else CASES
    rows, ok = [], True
    for seed, dtype_name in enumerate(("bfloat16", "float16", "float32")):
        dtype = getattr(torch, dtype_name)
        for i, case in enumerate(cases):
            t0 = time.perf_counter()
            row = run_case(*case, dtype, device, seed=10 * seed + i)
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            run_case(*case, dtype, device, seed=10 * seed + i + 100)  # compiled now: fresh inputs, same kernels
            again = time.perf_counter() - t0
            row.update(dtype=dtype_name, first_call_s=first, second_call_s=again, compile_s_est=first - again)
            row["pass"] = row["delta_rel_err"] < TOL[dtype_name] and row["h_rel_err"] < 1e-5 and row["base_rows_exact"] and row["finite"]
            ok &= row["pass"]
            rows.append(row)
            print(
                f"{dtype_name:9s} {row['case']:5s} h err {row['h_rel_err']:.2e}  delta err {row['delta_rel_err']:.2e} "
                f"(bound {TOL[dtype_name]:.0e})  base rows exact {row['base_rows_exact']}  "
                f"first call {first:.2f} s, again {again:.2f} s  {'PASS' if row['pass'] else 'FAIL'}",
                flush=True,
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(dict(device=str(device), interpreter=not cuda, rows=rows, all_pass=ok), indent=2))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
