"""LoRA kernels: per-step metadata, the torch reference (CPU path) and Triton kernels (CUDA path).

Triton is imported lazily (first Triton call), so this package imports where triton is missing.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .meta import LoraMeta, MetaBuffers, build_lora_meta
from .reference import lora_apply_ref, lora_linear_cpu

__all__ = [
    "LoraMeta",
    "MetaBuffers",
    "build_lora_meta",
    "lora_apply",
    "lora_apply_ref",
    "lora_linear",
]


def _backend() -> str:
    backend = os.environ.get("LORAPLEX_LORA_BACKEND", "")
    if backend not in ("", "triton", "torch"):
        raise ValueError(f"LORAPLEX_LORA_BACKEND must be 'triton' or 'torch', got {backend!r}")
    return backend


def lora_linear(
    x: torch.Tensor,
    weight_ext: torch.Tensor,
    bias_ext: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slice_offsets: list[int],
    meta: LoraMeta | None,
    packed: torch.Tensor | None = None,
    lora_at: torch.Tensor | None = None,
    lora_bt: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """y = x W^T + b (+ every token's LoRA delta), W = weight_ext[:out_total] and lora_a = the rows below it.

    x: [T, in]; weight_ext: [out_total + num_slots * num_slices * r_max, in]; returns y: [T, out_total]
    (on CPU possibly a column slice of a wider result: a strided view). packed: W packed by
    cpu_linear.pack_weight, used by the CPU path when the base matmul runs on its own. lora_at / lora_bt:
    the CPU row tables of the same slots (reference.py), or None.
    """
    out_total = slice_offsets[-1]
    if meta is not None and not (_backend() == "triton" or (x.is_cuda and _backend() != "torch")):
        return lora_linear_cpu(x, weight_ext, bias_ext, lora_a, lora_b, slice_offsets, meta, packed, lora_at, lora_bt)
    y = F.linear(x, weight_ext[:out_total], None if bias_ext is None else bias_ext[:out_total])
    if meta is not None:
        lora_apply(y, x, lora_a, lora_b, slice_offsets, meta)
    return y


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slice_offsets: list[int],
    meta: LoraMeta,
    lora_at: torch.Tensor | None = None,
    lora_bt: list[torch.Tensor] | None = None,
) -> None:
    """Add every token's own LoRA delta to y in place (see reference.py for the math and layouts).

    Backend: Triton shrink + expand for CUDA tensors, the torch reference otherwise;
    LORAPLEX_LORA_BACKEND=triton|torch forces one (read per call: a dict lookup).
    """
    backend = _backend()
    if backend == "triton" or (x.is_cuda and backend != "torch"):
        from .lora_expand import lora_expand
        from .lora_shrink import lora_shrink

        h = lora_shrink(x, lora_a, meta)  # [num_tokens, num_slices, r_max] fp32
        lora_expand(y, h, lora_b, slice_offsets, meta)
    else:
        lora_apply_ref(y, x, lora_a, lora_b, slice_offsets, meta, lora_at, lora_bt)
