"""gpu_check stage 1: the environment. Versions (python, torch, triton, transformers, peft, CUDA, driver),
the GPU, which optional packages are importable (the GPU host has no starlette, uvicorn or gguf), and
which SDPA backends really run the two attention calls loraplex makes on CUDA: decode (grouped query
rows with a padding mask) and a masked GQA prompt chunk (engine/attention.py).

    python benchmarks/gpu_env.py --out OUT/env.json

Without CUDA it reports the versions and marks the SDPA checks "no CUDA".
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch


def versions() -> dict:
    out: dict = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__}
    for name in ("triton", "transformers", "peft", "safetensors", "numpy", "starlette", "uvicorn", "gguf"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - absent or broken: both worth a line
            out[name] = f"not importable ({type(exc).__name__})"
    out["torch_cuda"] = torch.version.cuda
    out["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out["gpu"] = props.name
        out["gpu_count"] = torch.cuda.device_count()
        out["capability"] = f"{props.major}.{props.minor}"
        out["sm_count"] = props.multi_processor_count
        out["memory_gib"] = round(props.total_memory / 2**30, 1)
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.mem", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            out["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            out["nvidia_smi"] = f"failed: {exc}"
    return out


def sdpa_backends() -> dict:
    """Which backends run loraplex's two masked attention calls, each tried alone (bf16, head_dim 128)."""
    if not torch.cuda.is_available():
        return {"status": "no CUDA"}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from loraplex.engine.attention import grouped_sdpa

    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    kvh, grp, d = 8, 4, 128

    def decode() -> None:  # 64 sequences, context up to 1000, grouped query rows
        q = torch.randn(64, kvh, grp, 1, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(64, kvh, 1000, d, device=dev, dtype=dt, generator=g)
        attend = torch.arange(1000, device=dev)[None, None, None, :] < torch.randint(1, 1001, (64, 1, 1, 1), device=dev, generator=g)
        grouped_sdpa(q, k, k, attend)

    def chunk_grouped() -> None:  # a 256-token chunk after 768 cached tokens, as engine/attention.py runs it
        q = torch.randn(1, kvh, grp, 256, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(1, kvh, 1024, d, device=dev, dtype=dt, generator=g)
        grouped_sdpa(q, k, k, torch.ones(256, 1024, dtype=torch.bool, device=dev).tril(768))

    def chunk_enable_gqa() -> None:  # the same chunk through enable_gqa=True (what the code avoids)
        q = torch.randn(1, kvh * grp, 256, d, device=dev, dtype=dt, generator=g)
        k = torch.randn(1, kvh, 1024, d, device=dev, dtype=dt, generator=g)
        mask = torch.ones(256, 1024, dtype=torch.bool, device=dev).tril(768)
        torch.nn.functional.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)

    out: dict = {
        "flash_enabled": torch.backends.cuda.flash_sdp_enabled(),
        "mem_efficient_enabled": torch.backends.cuda.mem_efficient_sdp_enabled(),
        "math_enabled": torch.backends.cuda.math_sdp_enabled(),
        "cudnn_enabled": torch.backends.cuda.cudnn_sdp_enabled(),
    }
    for name, fn in (("decode_grouped", decode), ("chunk_grouped", chunk_grouped), ("chunk_enable_gqa", chunk_enable_gqa)):
        runs = {}
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    fn()
                torch.cuda.synchronize()
                runs[backend.name] = "runs"
            except RuntimeError as exc:
                runs[backend.name] = "refused: " + str(exc).splitlines()[0][:120]
        out[name] = runs
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/out/env.json")
    args = ap.parse_args()
    report = {"versions": versions(), "sdpa": sdpa_backends()}
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    sdpa = report["sdpa"]
    if "decode_grouped" in sdpa:
        for name in ("decode_grouped", "chunk_grouped"):
            fused = [b for b, r in sdpa[name].items() if b != "MATH" and r == "runs"]
            print(f"{name}: fused backends that run it: {fused or 'NONE (math fallback)'}")
            if not fused:
                raise SystemExit(1)


if __name__ == "__main__":
    main()
