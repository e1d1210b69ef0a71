"""Triton LoRA shrink: project every LoRA token onto its own adapter's A, for all slices of a fused linear.

Math, as a loop (token_slot[t] = -1 tokens are skipped; rank = the slot's true rank, <= r_max):
    for t in range(num_tokens):
        s = token_slot[t]
        if s < 0:
            continue
        for i in range(num_slices):
            for k in range(num_splits):                                # split-K over in_features
                lo, hi = k * SPLIT_K, min((k + 1) * SPLIT_K, in_features)
                h[k, t, i, :rank] = x[t, lo:hi].float() @ lora_a[s, i, :rank, lo:hi].float().T   # fp32

h holds one partial sum per split; lora_expand adds them up in split order (no atomics), so
h[t] = sum over k of h[k, t] as x[t] @ A.T. Columns rank..r_max of h are not written, and expand reads
only up to the same rank (above it a slot may hold an earlier adapter's values: LoraSlotStack.write).

Work split: tokens come grouped by slot (meta.sorted_idx, one segment per active slot), so one program
handles BLOCK_M tokens of one segment against one (slice, rank block, K split) of that segment's A; the A
tile is read once per BLOCK_M tokens instead of once per token, and only its first `rank` rows are read.
The split depends on in_features alone (never on the batch), and each split reduces in one fixed
order, so a token's h is bit-identical across batch compositions. At decode the split turns the one
program per adapter of a wide projection (o, down) into several, so more SMs pull A from memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .meta import LoraMeta

# Fixed block sizes: they must not depend on the batch (batch-composition invariance), and every
# tl.dot dimension stays >= 16 (GPUs reject smaller dot blocks; the interpreter would not notice).
_BLOCK_M = 16  # tokens per program
_BLOCK_K = 64  # in_features per loop step
_MAX_BLOCK_R = 64  # rank per program (r_max above this uses several rank blocks)
SPLIT_K = 1024  # in_features per split (a multiple of _BLOCK_K): 4096 -> 4 splits, 14336 -> 14

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def num_splits(in_features: int) -> int:
    """How many partial sums the shrink of an in_features-wide linear leaves (a function of the shape
    alone, so the result never depends on the batch)."""
    return max(1, triton.cdiv(in_features, SPLIT_K))


# stride_hs = num_tokens * num_slices * r_max changes with the batch: Triton would specialize it on
# divisibility by 16 and compile again whenever that flips (the other ints are fixed per linear).
@triton.jit(do_not_specialize=["stride_hs"])
def _lora_shrink_kernel(
    x_ptr,  # [num_tokens, in_features]
    a_ptr,  # [num_slots, num_slices, r_max, in_features]
    h_ptr,  # [num_splits, num_tokens, num_slices, r_max] fp32
    sorted_idx_ptr,  # [num_lora_tokens] int64, token ids grouped by slot
    slot_ids_ptr,  # [num_active] int64
    seg_starts_ptr,  # [num_active + 1] int64
    seg_ranks_ptr,  # [num_active] int64 true rank (<= 0 or > r_max: unknown, use r_max)
    in_features,
    r_max,
    num_r_blocks,
    num_k_splits,
    stride_xt,
    stride_xk,
    stride_as,
    stride_ai,
    stride_ar,
    stride_ak,
    stride_hs,
    stride_ht,
    stride_hi,
    stride_hr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_seg = tl.program_id(0)  # which active slot
    pid_m = tl.program_id(1)  # which block of that slot's tokens
    pid_z = tl.program_id(2)  # which (slice, rank block, K split)
    split = pid_z % num_k_splits
    slice_idx = (pid_z // num_k_splits) // num_r_blocks
    r_block = (pid_z // num_k_splits) % num_r_blocks

    seg_start = tl.load(seg_starts_ptr + pid_seg)
    seg_end = tl.load(seg_starts_ptr + pid_seg + 1)
    rank = tl.load(seg_ranks_ptr + pid_seg)
    rank = tl.where((rank > 0) & (rank < r_max), rank, r_max)
    m_start = seg_start + pid_m * BLOCK_M
    # The grid covers the longest segment and r_max: programs past their segment's end or past the
    # slot's true rank do nothing (the padding above it is never read: stale there, see lora_slots.py).
    if (m_start < seg_end) & (r_block * BLOCK_R < rank):
        slot = tl.load(slot_ids_ptr + pid_seg)  # int64: offsets below are computed in 64 bits
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_end
        tok = tl.load(sorted_idx_ptr + offs_m, mask=mask_m, other=0)  # [BLOCK_M] int64
        offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        k_lo = split * SPLIT
        k_len = tl.minimum(in_features - k_lo, SPLIT)
        offs_k = tl.arange(0, BLOCK_K)

        x_ptrs = x_ptr + tok[:, None] * stride_xt + (k_lo + offs_k[None, :]) * stride_xk  # [BLOCK_M, BLOCK_K]
        a_ptrs = (
            a_ptr
            + slot * stride_as
            + slice_idx * stride_ai
            + offs_r[None, :] * stride_ar
            + (k_lo + offs_k[:, None]) * stride_ak
        )  # [BLOCK_K, BLOCK_R]: A[slot, slice].T
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k in range(0, tl.cdiv(k_len, BLOCK_K)):
            k_left = k_len - k * BLOCK_K
            x_tile = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            a_tile = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_r[None, :], other=0.0)
            if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot; fp32 is exact for 16-bit
                x_tile = x_tile.to(tl.float32)
                a_tile = a_tile.to(tl.float32)
            acc = tl.dot(x_tile, a_tile, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K * stride_xk
            a_ptrs += BLOCK_K * stride_ak

        h_ptrs = h_ptr + split * stride_hs + tok[:, None] * stride_ht + slice_idx * stride_hi + offs_r[None, :] * stride_hr
        tl.store(h_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


def upcast_dots(t: torch.Tensor) -> bool:
    """Whether kernels upcast 16-bit tiles to fp32 before tl.dot: only under the Triton interpreter
    (TRITON_INTERPRET=1 when the kernels were defined: @triton.jit then gives an interpreted function;
    CPU tensors only ever run there), which computes bf16 dots wrongly. Compiled for a GPU, the dots
    stay native 16-bit with fp32 accumulation (tensor cores)."""
    return not t.is_cuda or not isinstance(_lora_shrink_kernel, triton.runtime.JITFunction)


def _rank_block(r_max: int) -> int:
    return min(_MAX_BLOCK_R, max(16, triton.next_power_of_2(r_max)))


def lora_shrink(
    x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta, out: torch.Tensor | None = None
) -> torch.Tensor:
    """h[k, t, i] = x[t, split k] @ lora_a[slot[t], i, :, split k].T for every token with a slot, in fp32.

    x:      [num_tokens, in_features] float32/float16/bfloat16, last dim contiguous
    lora_a: [num_slots, num_slices, r_max, in_features], same dtype as x, last dim contiguous
    meta:   its tensors on x's device (meta.seg_ranks: each slot's true rank)
    out:    optional [num_splits(in_features), num_tokens, num_slices, r_max] float32 to write into
    Returns the partial sums h [num_splits, num_tokens, num_slices, r_max] float32 (lora_expand adds them).
    Rows of slot -1 tokens, and columns at or past a slot's true rank, are not written (uninitialized
    when `out` is None); lora_expand skips them too.
    """
    if x.dim() != 2 or lora_a.dim() != 4:
        raise ValueError(
            f"want x [T, in] and lora_a [slots, slices, r, in], got {tuple(x.shape)}, {tuple(lora_a.shape)}"
        )
    num_tokens, in_features = x.shape
    _, num_slices, r_max, a_in = lora_a.shape
    if a_in != in_features:
        raise ValueError(f"lora_a in_features {a_in} != x in_features {in_features}")
    if num_tokens != meta.num_tokens:
        raise ValueError(f"x has {num_tokens} tokens, meta has {meta.num_tokens}")
    if x.dtype not in _DTYPES or lora_a.dtype != x.dtype:
        raise TypeError(f"want x and lora_a of one dtype in {_DTYPES}, got {x.dtype}, {lora_a.dtype}")
    if x.stride(-1) != 1 or lora_a.stride(-1) != 1:
        raise ValueError("x and lora_a need a contiguous last dim")
    if lora_a.device != x.device or meta.sorted_idx.device != x.device:
        raise ValueError("x, lora_a and meta must be on one device")
    splits = num_splits(in_features)
    shape = (splits, num_tokens, num_slices, r_max)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
    elif out.shape != shape or out.dtype != torch.float32 or out.device != x.device:
        raise ValueError(f"out must be float32 {list(shape)} on {x.device}")
    if meta.num_active == 0 or num_tokens == 0:
        return out

    block_r = _rank_block(r_max)
    num_r_blocks = triton.cdiv(r_max, block_r)
    upcast = upcast_dots(x)
    grid = (meta.num_active, triton.cdiv(meta.max_seg_len, _BLOCK_M), num_slices * num_r_blocks * splits)
    _lora_shrink_kernel[grid](
        x,
        lora_a,
        out,
        meta.sorted_idx,
        meta.slot_ids,
        meta.seg_starts,
        meta.seg_ranks,
        in_features,
        r_max,
        num_r_blocks,
        splits,
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        lora_a.stride(3),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        out.stride(3),
        BLOCK_M=_BLOCK_M,
        BLOCK_R=block_r,
        BLOCK_K=_BLOCK_K,
        SPLIT=SPLIT_K,
        UPCAST=upcast,
        # fp32 models need full fp32 dots. For 16-bit models "tf32" is Triton's default: native 16-bit
        # dots ignore it, and the interpreter's upcast tiles hold 16-bit values, exact in tf32.
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
    )
    return out
