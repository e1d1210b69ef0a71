"""Triton LoRA expand: add every LoRA token's h @ B.T into its own output slices, all slices in one launch.

Math, as a loop (off = slice_offsets; token_slot[t] = -1 tokens are skipped and their y rows untouched;
h holds lora_shrink's split-K partial sums; rank = the slot's true rank):
    for t in range(num_tokens):
        s = token_slot[t]
        if s < 0:
            continue
        for i in range(num_slices):
            ht = h[0, t, i, :rank] + h[1, t, i, :rank] + ...           # splits added in order, fp32
            ht = ht.to(y.dtype).float()                                 # h in the adapter's dtype, as PEFT
            y[t, off[i]:off[i + 1]] += (ht @ lora_b[s, off[i]:off[i + 1], :rank].float().T).to(y.dtype)

The sum y + delta is formed in fp32 and rounded once to y's dtype. One program owns one
(BLOCK_M tokens of one slot segment) x (BLOCK_N columns of one slice) tile of y: every y element is
read and written by exactly one program, with no atomics; the split-K partials are added in a fixed
order and the rank loop runs in a fixed order, so a token's output does not depend on which other
tokens share the batch. Compiled for a GPU, 16-bit h and B tiles meet in a native tensor-core dot
(fp32 accumulate); only the interpreter upcasts them to fp32 (exact, so both compute the same function).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lora_shrink import upcast_dots
from .meta import LoraMeta

# Fixed block sizes (see lora_shrink.py: batch-invariant, every tl.dot dimension >= 16).
_BLOCK_M = 16  # tokens per program
_BLOCK_N = 64  # output columns per program
_MAX_BLOCK_R = 64  # rank per dot step (larger r_max loops)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# slice_offsets as a device tensor, cached: building it per call would cost a host-to-device copy per layer.
_offsets_cache: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


@triton.jit
def _round_to_bf16(v):
    """fp32 -> the nearest bf16 value (ties to even), kept in fp32. Only the interpreter needs it: its
    fp32 -> bf16 cast truncates, where a GPU rounds to nearest."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


# stride_hs = num_tokens * num_slices * r_max changes with the batch: Triton would specialize it on
# divisibility by 16 and compile again whenever that flips (the other ints are fixed per linear).
@triton.jit(do_not_specialize=["stride_hs"])
def _lora_expand_kernel(
    y_ptr,  # [num_tokens, out_total]
    h_ptr,  # [num_splits, num_tokens, num_slices, r_max] fp32 partial sums
    b_ptr,  # [num_slots, out_total, r_max]
    offsets_ptr,  # [num_slices + 1] int64 column offsets of the slices in y
    sorted_idx_ptr,  # [num_lora_tokens] int64, token ids grouped by slot
    slot_ids_ptr,  # [num_active] int64
    seg_starts_ptr,  # [num_active + 1] int64
    seg_ranks_ptr,  # [num_active] int64 true rank (<= 0 or > r_max: unknown, use r_max)
    r_max,
    num_n_blocks,  # column blocks of the widest slice
    num_k_splits,
    stride_yt,
    stride_yn,
    stride_hs,
    stride_ht,
    stride_hi,
    stride_hr,
    stride_bs,
    stride_bn,
    stride_br,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_seg = tl.program_id(0)  # which active slot
    pid_m = tl.program_id(1)  # which block of that slot's tokens
    pid_in = tl.program_id(2)  # which (slice, column block)
    slice_idx = pid_in // num_n_blocks
    n_block = pid_in % num_n_blocks

    seg_start = tl.load(seg_starts_ptr + pid_seg)
    seg_end = tl.load(seg_starts_ptr + pid_seg + 1)
    col_lo = tl.load(offsets_ptr + slice_idx)
    col_hi = tl.load(offsets_ptr + slice_idx + 1)
    m_start = seg_start + pid_m * BLOCK_M
    n_start = col_lo + n_block * BLOCK_N
    # The grid covers the longest segment and the widest slice; the rest of the programs do nothing.
    if (m_start < seg_end) & (n_start < col_hi):
        slot = tl.load(slot_ids_ptr + pid_seg)  # int64
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_end
        tok = tl.load(sorted_idx_ptr + offs_m, mask=mask_m, other=0)  # [BLOCK_M] int64
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < col_hi
        offs_r = tl.arange(0, BLOCK_R)

        rank = tl.load(seg_ranks_ptr + pid_seg)
        rank = tl.where((rank > 0) & (rank < r_max), rank, r_max)
        h_ptrs = h_ptr + tok[:, None] * stride_ht + slice_idx * stride_hi + offs_r[None, :] * stride_hr
        b_ptrs = b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # Only up to the slot's true rank: the padding above it is never read (stale there, see lora_slots.py).
        for r in range(0, tl.cdiv(rank, BLOCK_R)):
            r_left = rank - r * BLOCK_R
            h_mask = mask_m[:, None] & (offs_r[None, :] < r_left)
            h_tile = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k in range(0, num_k_splits):  # the shrink's split-K partials, always added in this order
                h_tile += tl.load(h_ptrs + k * stride_hs, mask=h_mask, other=0.0)
            b_tile = tl.load(b_ptrs, mask=(offs_r[:, None] < r_left) & mask_n[None, :], other=0.0)
            # h in the adapter's dtype (PEFT's lora_A output is too), rounded to nearest even
            if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot; fp32 is exact for 16-bit
                if b_tile.dtype == tl.bfloat16:
                    h_tile = _round_to_bf16(h_tile)  # the interpreter's bf16 cast truncates
                else:
                    h_tile = h_tile.to(b_tile.dtype).to(tl.float32)
                b_tile = b_tile.to(tl.float32)
            else:
                h_tile = h_tile.to(b_tile.dtype)
            # [BLOCK_M, BLOCK_R] @ [BLOCK_R, BLOCK_N]
            acc = tl.dot(h_tile, b_tile, acc, input_precision=PRECISION)
            h_ptrs += BLOCK_R * stride_hr
            b_ptrs += BLOCK_R * stride_br

        y_ptrs = y_ptr + tok[:, None] * stride_yt + offs_n[None, :] * stride_yn
        y_mask = mask_m[:, None] & mask_n[None, :]
        y_tile = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (y_tile.to(tl.float32) + acc).to(y_tile.dtype), mask=y_mask)


def _offsets_tensor(slice_offsets: list[int], device: torch.device) -> torch.Tensor:
    key = (tuple(slice_offsets), device)
    offsets = _offsets_cache.get(key)
    if offsets is None:
        offsets = torch.tensor(slice_offsets, dtype=torch.int64, device=device)
        _offsets_cache[key] = offsets
    return offsets


def lora_expand(
    y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, slice_offsets: list[int], meta: LoraMeta
) -> None:
    """y[t, off[i]:off[i+1]] += h[t, i] @ lora_b[slot[t], off[i]:off[i+1]].T for tokens with a slot, in place.

    y:             [num_tokens, out_total] float32/float16/bfloat16, last dim contiguous
    h:             [num_splits, num_tokens, num_slices, r_max] float32 split-K partials (lora_shrink);
                   a 3-D [num_tokens, num_slices, r_max] h is one split
    lora_b:        [num_slots, out_total, r_max], same dtype as y, last dim contiguous, scale folded in
    slice_offsets: num_slices + 1 ascending column offsets, slice_offsets[0] == 0, [-1] == out_total;
                   slices may differ in width (GQA q | k | v)
    meta:          its tensors on y's device (meta.seg_ranks: each slot's true rank)
    """
    if h.dim() == 3:
        h = h[None]
    if y.dim() != 2 or h.dim() != 4 or lora_b.dim() != 3:
        raise ValueError(
            f"want y [T, out], h [splits, T, slices, r], lora_b [slots, out, r]; "
            f"got {tuple(y.shape)}, {tuple(h.shape)}, {tuple(lora_b.shape)}"
        )
    num_tokens, out_total = y.shape
    splits, _, num_slices, r_max = h.shape
    if h.shape[1] != num_tokens or num_tokens != meta.num_tokens:
        raise ValueError(f"token counts differ: y {num_tokens}, h {h.shape[1]}, meta {meta.num_tokens}")
    if lora_b.shape[1] != out_total or lora_b.shape[2] != r_max:
        raise ValueError(f"lora_b {tuple(lora_b.shape)} does not match out_total {out_total}, r_max {r_max}")
    if len(slice_offsets) != num_slices + 1 or slice_offsets[0] != 0 or slice_offsets[-1] != out_total:
        raise ValueError(
            f"slice_offsets {slice_offsets} do not cover {num_slices} slices of {out_total} columns"
        )
    widths = [hi - lo for lo, hi in zip(slice_offsets, slice_offsets[1:], strict=False)]
    if min(widths) < 0:
        raise ValueError(f"slice_offsets {slice_offsets} are not ascending")
    if y.dtype not in _DTYPES or lora_b.dtype != y.dtype or h.dtype != torch.float32:
        raise TypeError(
            f"want y and lora_b of one dtype in {_DTYPES} and float32 h; got {y.dtype}, {lora_b.dtype}, {h.dtype}"
        )
    if y.stride(-1) != 1 or lora_b.stride(-1) != 1:
        raise ValueError("y and lora_b need a contiguous last dim")
    if h.device != y.device or lora_b.device != y.device or meta.sorted_idx.device != y.device:
        raise ValueError("y, h, lora_b and meta must be on one device")
    if meta.num_active == 0 or num_tokens == 0 or max(widths) == 0:
        return

    block_r = min(_MAX_BLOCK_R, max(16, triton.next_power_of_2(r_max)))
    num_n_blocks = triton.cdiv(max(widths), _BLOCK_N)
    grid = (meta.num_active, triton.cdiv(meta.max_seg_len, _BLOCK_M), num_slices * num_n_blocks)
    _lora_expand_kernel[grid](
        y,
        h,
        lora_b,
        _offsets_tensor(slice_offsets, y.device),
        meta.sorted_idx,
        meta.slot_ids,
        meta.seg_starts,
        meta.seg_ranks,
        r_max,
        num_n_blocks,
        splits,
        y.stride(0),
        y.stride(1),
        h.stride(0),
        h.stride(1),
        h.stride(2),
        h.stride(3),
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        BLOCK_M=_BLOCK_M,
        BLOCK_N=_BLOCK_N,
        BLOCK_R=block_r,
        UPCAST=upcast_dots(y),
        # fp32 models need full fp32 dots. For 16-bit models "tf32" is Triton's default: native 16-bit
        # dots ignore it, and the interpreter's upcast tiles hold 16-bit values, exact in tf32.
        PRECISION="ieee" if y.dtype == torch.float32 else "tf32",
    )
