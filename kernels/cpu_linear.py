"""Base-model linears on CPU through oneDNN with weights packed once (bfloat16 / float16).

A plain F.linear on a 16-bit CPU weight lets oneDNN re-lay the weight out on every call; at decode sizes
that re-layout costs as much as the product itself (measured 2.2x slower at batch 8 on this 2-core
machine). Packing once at load time removes it. float32 keeps F.linear (MKL), and so do CUDA tensors.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def _ops() -> Any:
    mkldnn = getattr(torch.ops, "mkldnn", None)
    if mkldnn is None or not hasattr(mkldnn, "_reorder_linear_weight") or not hasattr(mkldnn, "_linear_pointwise"):
        return None
    return mkldnn


# (shape, dtype, batch_hint) -> packed_linear equals F.linear on this build
_PROBED: dict[tuple[tuple[int, ...], torch.dtype, int], bool] = {}


def pack_weight(weight: torch.Tensor, batch_hint: int = 32) -> torch.Tensor | None:
    """A packed copy of weight [out, in] for packed_linear, or None where packing does not apply. (The
    caller turns packing off by not calling this: Config.cpu_packed_linear, see engine/model.py.)"""
    ops = _ops()
    if ops is None or weight.device.type != "cpu" or weight.dtype not in (torch.bfloat16, torch.float16):
        return None
    try:
        packed = ops._reorder_linear_weight(weight.contiguous(), batch_hint)
        key = (tuple(weight.shape), weight.dtype, batch_hint)
        if key not in _PROBED:  # once per shape: the kernel oneDNN picks depends on shape and dtype only
            probe = torch.randn(2, weight.shape[1], dtype=weight.dtype)
            got = ops._linear_pointwise(probe, packed, None, "none", [], "")
            _PROBED[key] = torch.equal(got, torch.nn.functional.linear(probe, weight))
        return packed if _PROBED[key] else None  # False: this build computes differently, keep the plain path
    except RuntimeError:
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, in] @ W^T + bias with W packed by pack_weight -> [T, out] in x's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def base_linear(
    x: torch.Tensor,  # [num_tokens, in]
    weight: torch.Tensor,  # [out, in]
    bias: torch.Tensor | None,  # [out]
    packed: torch.Tensor | None,  # weight packed by pack_weight, or None
) -> torch.Tensor:
    """y = x W^T + b -> [num_tokens, out], through the packed copy of W when there is one."""
    return F.linear(x, weight, bias) if packed is None else packed_linear(x, packed, bias)
