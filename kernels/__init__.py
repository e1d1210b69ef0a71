"""LoRA kernels: per-step metadata, the torch reference (CPU path) and Triton kernels (CUDA path).

Triton is imported lazily (first Triton call), so this package imports where triton is missing.
"""

from __future__ import annotations

import os

import torch

from .meta import LoraMeta, build_lora_meta
from .reference import lora_apply_ref, lora_expand_ref, lora_shrink_ref

__all__ = [
    "LoraMeta",
    "build_lora_meta",
    "lora_apply",
    "lora_apply_ref",
    "lora_expand_ref",
    "lora_shrink_ref",
]


def lora_apply(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slice_offsets: list[int],
    meta: LoraMeta,
) -> None:
    """Add every token's own LoRA delta to y in place (see reference.py for the math and layouts).

    Backend: Triton shrink + expand for CUDA tensors, the torch reference otherwise;
    LORAPLEX_LORA_BACKEND=triton|torch forces one (read per call: a dict lookup).
    """
    backend = os.environ.get("LORAPLEX_LORA_BACKEND", "")
    if backend not in ("", "triton", "torch"):
        raise ValueError(f"LORAPLEX_LORA_BACKEND must be 'triton' or 'torch', got {backend!r}")
    if backend == "triton" or (x.is_cuda and backend != "torch"):
        from .lora_expand import lora_expand
        from .lora_shrink import lora_shrink

        h = lora_shrink(x, lora_a, meta)  # [num_tokens, num_slices, r_max] fp32
        lora_expand(y, h, lora_b, slice_offsets, meta)
    else:
        lora_apply_ref(y, x, lora_a, lora_b, slice_offsets, meta)
