"""LoRA kernels: per-step metadata, slot buffers, the CPU path (cpu_lora.py, chosen by cpu_plan.py),
Triton kernels (the CUDA path) and the per-token loop every one of them is tested against (reference.py).

Triton is imported lazily (first Triton call), so this package imports where triton is missing.
"""

from __future__ import annotations

import torch

from .cpu_linear import base_linear
from .cpu_lora import lora_delta_cpu, lora_linear_cpu
from .lora_slots import LoraSlots, RowTables
from .meta import LoraMeta, MetaBuffers, build_lora_meta

__all__ = [
    "LoraMeta",
    "LoraSlots",
    "MetaBuffers",
    "RowTables",
    "build_lora_meta",
    "lora_apply",
    "lora_delta_cpu",
    "lora_linear",
]


BACKENDS = ("auto", "torch", "triton")


def _use_triton(x: torch.Tensor, backend: str) -> bool:
    """auto: Triton for CUDA tensors, the torch path otherwise; torch / triton force one."""
    if backend not in BACKENDS:
        raise ValueError(f"LoRA backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    return backend == "triton" or (backend == "auto" and x.is_cuda)


def lora_linear(
    x: torch.Tensor,  # [num_tokens, in]
    weight: torch.Tensor,  # [out_total, in]
    bias: torch.Tensor | None,  # [out_total]
    packed: torch.Tensor | None,  # W packed by cpu_linear.pack_weight (16-bit CPU), or None
    slots: LoraSlots | None,
    meta: LoraMeta | None,  # None: no token of the step uses an adapter
    backend: str = "auto",
) -> torch.Tensor:
    """y = x W^T + b + every token's own LoRA delta -> [num_tokens, out_total] (on CPU possibly a
    strided view). backend: as for lora_apply."""
    if meta is None or slots is None:
        return base_linear(x, weight, bias, packed)
    if _use_triton(x, backend):
        y = base_linear(x, weight, bias, packed)
        lora_apply(y, x, slots.lora_a, slots.lora_b, slots.slice_offsets, meta, backend=backend)
        return y
    return lora_linear_cpu(x, weight, bias, packed, slots, meta)


def lora_apply(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slots, num_slices, r_max, in]
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max]
    slice_offsets: list[int],
    meta: LoraMeta,
    rows: RowTables | None = None,  # the CPU row tables of the same slots, or None
    backend: str = "auto",
) -> None:
    """y += every token's own LoRA delta: y[t, slice i] += x[t] A[s, i]^T B[s, slice i]^T, s = the token's
    slot (reference.py). backend "auto": Triton shrink + expand for CUDA tensors, the CPU strategies
    otherwise; "triton" or "torch" forces one (Config.lora_backend, for A/B measurements)."""
    if _use_triton(x, backend):
        from .lora_expand import lora_expand
        from .lora_shrink import lora_shrink

        h = lora_shrink(x, lora_a, meta)  # [num_tokens, num_slices, r_max] fp32
        lora_expand(y, h, lora_b, slice_offsets, meta)
    else:
        lora_delta_cpu(y, x, lora_a, lora_b, slice_offsets, meta, rows)
