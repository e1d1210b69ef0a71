"""LoRA kernels: per-step metadata, the torch reference (CPU path) and Triton kernels (CUDA path).

Triton is imported lazily (first Triton call), so this package imports where triton is missing.
"""

from __future__ import annotations

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


BACKENDS = ("auto", "torch", "triton")


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    """auto: Triton for CUDA tensors, the torch reference otherwise; torch / triton force one."""
    if backend not in BACKENDS:
        raise ValueError(f"LoRA backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return backend == "triton" or (backend == "auto" and x.is_cuda)


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
    backend: str = "auto",
) -> torch.Tensor:
    """y = x W^T + b (+ every token's LoRA delta), W = weight_ext[:out_total] and lora_a = the rows below it.

    x: [T, in]; weight_ext: [out_total + num_slots * num_slices * r_max, in]; returns y: [T, out_total]
    (on CPU possibly a column slice of a wider result: a strided view). packed: W packed by
    cpu_linear.pack_weight, used by the CPU path when the base matmul runs on its own. lora_at / lora_bt:
    the CPU row tables of the same slots (reference.py), or None. backend: as for lora_apply.
    """
    out_total = slice_offsets[-1]
    if meta is not None and not _use_triton(x, backend):
        return lora_linear_cpu(x, weight_ext, bias_ext, lora_a, lora_b, slice_offsets, meta, packed, lora_at, lora_bt)
    y = F.linear(x, weight_ext[:out_total], None if bias_ext is None else bias_ext[:out_total])
    if meta is not None:
        lora_apply(y, x, lora_a, lora_b, slice_offsets, meta, backend=backend)
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
    backend: str = "auto",
) -> None:
    """Add every token's own LoRA delta to y in place (see reference.py for the math and layouts).

    backend "auto": Triton shrink + expand for CUDA tensors, the torch reference otherwise; "triton" or
    "torch" forces one (Config.lora_backend, for A/B measurements).
    """
    if _use_triton(x, backend):
        from .lora_expand import lora_expand
        from .lora_shrink import lora_shrink

        h = lora_shrink(x, lora_a, meta)  # [num_tokens, num_slices, r_max] fp32
        lora_expand(y, h, lora_b, slice_offsets, meta)
    else:
        lora_apply_ref(y, x, lora_a, lora_b, slice_offsets, meta, lora_at, lora_bt)
