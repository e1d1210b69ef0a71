"""Paged-KV attention over a flat step: single-token decodes batched in one SDPA call, prompt chunks one
SDPA call per sequence. All index tensors are built once per step (AttnMeta) and reused by every layer.

KV cache of one layer: k_cache, v_cache [num_blocks * block_size, num_kv_heads, head_dim]; the context of
a sequence lives at flat KV rows block_table[j // block_size] * block_size + j % block_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's share of a step: rows [row_start, row_start + num_new) of the flat batch hold
    its tokens at positions [start_pos, start_pos + num_new)."""

    row_start: int
    num_new: int
    start_pos: int
    block_table: list[int]


@dataclass(frozen=True)
class PrefillSpan:
    row_start: int
    row_end: int
    kv_idx: torch.Tensor | None  # [kv_len] flat KV cache rows of the whole context; None: no prefix, use k/v as is
    mask: torch.Tensor | None  # [q_len, kv_len] bool, True = attend; None: plain causal


@dataclass(frozen=True)
class DecodeMeta:
    """The single-token sequences of a step, attended all at once."""

    rows: torch.Tensor  # [B] rows of single-token sequences
    kv_idx: torch.Tensor  # [B, L] context KV rows of each, padded with 0
    masked: torch.Tensor  # [B, 1, 1, L] bool, True = not attended (padding, out of window)
    attend: torch.Tensor  # [B, 1, 1, L] bool, ~masked (SDPA's sense of a bool mask)


@dataclass(frozen=True)
class AttnMeta:
    kv_write_rows: torch.Tensor  # [T] flat KV cache row written by each new token
    decode: DecodeMeta | None  # None: no single-token sequence in this step
    prefills: list[PrefillSpan]


def build_attn_meta(
    spans: list[SeqSpan], block_size: int, sliding_window: int | None, device: torch.device
) -> AttnMeta:
    """Index tensors of one step, built on `device` from the block tables and lengths: the host sends
    one small int64 buffer (per sequence: row start, new tokens, start position, number of blocks; the
    decode sequences; then every block table back to back) and never lists a sequence's context token
    by token, so the host cost per step does not grow with the context (only with its blocks).

    KV row of position p of sequence i: blocks[block_start[i] + p // block_size] * block_size + p % block_size.
    """
    num_seqs = len(spans)
    header: list[int] = []
    num_tokens = 0
    decode_seqs: list[int] = []
    for i, sp in enumerate(spans):
        if sp.row_start != num_tokens:
            raise ValueError(f"span {i} starts at row {sp.row_start}, not {num_tokens}: spans must tile the step")
        header += (sp.row_start, sp.num_new, sp.start_pos, len(sp.block_table))
        num_tokens += sp.num_new
        if sp.num_new == 1:
            decode_seqs.append(i)
    flat = header + decode_seqs + list(chain.from_iterable(sp.block_table for sp in spans))
    dev = torch.tensor(flat, dtype=torch.int64).to(device, non_blocking=True)
    row_start, num_new, start_pos, num_blocks = dev[: 4 * num_seqs].view(num_seqs, 4).unbind(1)
    dec = dev[4 * num_seqs : 4 * num_seqs + len(decode_seqs)]  # [B] indices of the decode sequences
    blocks = dev[4 * num_seqs + len(decode_seqs) :]  # every block table, back to back
    block_start = torch.cumsum(num_blocks, 0) - num_blocks  # [S] where sequence i's table starts

    def kv_rows(seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        # broadcastable int64 sequence indices and positions -> flat KV rows; a position past the
        # sequence's table reads its last block (callers mask those)
        blk = torch.minimum(pos // block_size, num_blocks[seq] - 1)
        return blocks[block_start[seq] + blk] * block_size + pos % block_size

    # Row r of the step belongs to sequence seq_of[r], at position start_pos + (r - row_start).
    seq_of = torch.repeat_interleave(torch.arange(num_seqs, device=device), num_new, output_size=num_tokens)
    pos = start_pos[seq_of] + torch.arange(num_tokens, device=device) - row_start[seq_of]
    kv_write_rows = kv_rows(seq_of, pos)

    decode = None
    if decode_seqs:
        max_len = max(spans[i].start_pos + 1 for i in decode_seqs)
        j = torch.arange(max_len, device=device)[None, :]  # [1, L]
        length = (start_pos[dec] + 1)[:, None]  # [B, 1]
        attend = j < length
        idx = torch.where(attend, kv_rows(dec[:, None], j), 0)  # [B, L]
        if sliding_window:
            attend &= j >= length - sliding_window
        attend = attend[:, None, None, :]
        decode = DecodeMeta(rows=row_start[dec], kv_idx=idx, masked=~attend, attend=attend)
    prefills = []
    for i, sp in enumerate(spans):
        if sp.num_new == 1:
            continue
        kv_len = sp.start_pos + sp.num_new
        window_applies = sliding_window is not None and kv_len > sliding_window
        if sp.start_pos == 0 and not window_applies:
            prefills.append(PrefillSpan(sp.row_start, sp.row_start + sp.num_new, None, None))
            continue
        k_pos = torch.arange(kv_len, device=device)
        q_pos = k_pos[sp.start_pos :, None]
        mask = k_pos[None, :] <= q_pos
        if sliding_window is not None:
            mask &= k_pos[None, :] > q_pos - sliding_window
        kv_idx = kv_rows(torch.full_like(k_pos, i), k_pos)
        prefills.append(PrefillSpan(sp.row_start, sp.row_start + sp.num_new, kv_idx, mask))
    return AttnMeta(kv_write_rows=kv_write_rows, decode=decode, prefills=prefills)


def grouped_sdpa(
    q: torch.Tensor,  # [B, KVH, G, Q, D]: the G query heads that share each KV head
    k: torch.Tensor,  # [B, KVH, L, D]
    v: torch.Tensor,  # [B, KVH, L, D]
    attend: torch.Tensor,  # bool, True = attend: [B, 1, 1, L] (Q == 1) or [Q, L]
) -> torch.Tensor:
    """Masked GQA attention as plain SDPA without enable_gqa -> [B, KVH, G, Q, D]: the G query heads of a
    KV head become G x Q query rows against that head. Torch's fused CUDA kernels take a mask or GQA
    but (through 2.11) not both: masked GQA falls to the math backend, which materializes the scores.
    Grouped rows keep the memory-efficient kernel (fp32 scores and softmax inside) and read each KV
    head once, with no repeated K/V."""
    b, kvh, g, q_len, d = q.shape
    if q_len > 1:
        attend = attend.repeat(g, 1)  # [G * Q, L]: rows in (g, q) order, as the reshape below
    out = F.scaled_dot_product_attention(q.reshape(b, kvh, g * q_len, d), k, v, attn_mask=attend)
    return out.view(b, kvh, g, q_len, d)


def _decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: DecodeMeta
) -> torch.Tensor:
    """One query token per sequence, all sequences at once. Scores and softmax are fp32 whatever the
    model's dtype, as in prefill's SDPA (and transformers): scores rounded to bf16 first would let
    decode drift from prefill. CUDA: SDPA over grouped query rows. CPU: two batched matmuls, which beat
    the fused CPU SDPA kernel at a single query row (its per-call setup dominates at decode sizes)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv = k_cache.shape[1]
    b = meta.rows.shape[0]
    qd = q.index_select(0, meta.rows).view(b, num_kv, num_heads // num_kv, head_dim)  # [B, KVH, G, D]
    # index_select of the flat rows, not k_cache[idx]: the same gather, ~7x faster here on CPU
    flat_idx = meta.kv_idx.view(-1)  # [B * L]
    max_len = meta.kv_idx.shape[1]
    kd = k_cache.index_select(0, flat_idx).view(b, max_len, num_kv, head_dim).transpose(1, 2)  # [B, KVH, L, D]
    vd = v_cache.index_select(0, flat_idx).view(b, max_len, num_kv, head_dim).transpose(1, 2)  # [B, KVH, L, D]
    if q.is_cuda:
        return grouped_sdpa(qd[:, :, :, None], kd, vd, meta.attend).view(b, num_heads, head_dim)
    if q.dtype != torch.float32:
        qd, kd = qd.float(), kd.float()
    scores = torch.matmul(qd, kd.transpose(2, 3)) * head_dim**-0.5  # [B, KVH, G, L] fp32
    scores.masked_fill_(meta.masked, float("-inf"))
    probs = scores.softmax(dim=-1).to(q.dtype)
    return torch.matmul(probs, vd).view(b, num_heads, head_dim)  # [B, H, D]


def attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_kv_rows, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    meta: AttnMeta,
) -> torch.Tensor:
    """Write this step's k/v into the cache, attend, return [T, num_heads * head_dim]."""
    k_cache.index_copy_(0, meta.kv_write_rows, k)
    v_cache.index_copy_(0, meta.kv_write_rows, v)
    t, num_heads, head_dim = q.shape
    gqa = num_heads != k.shape[1]
    out = torch.empty_like(q)
    if meta.decode is not None:
        out.index_copy_(0, meta.decode.rows, _decode_attention(q, k_cache, v_cache, meta.decode))
    for p in meta.prefills:
        if p.kv_idx is None:
            kp, vp = k[p.row_start : p.row_end], v[p.row_start : p.row_end]
        else:
            kp, vp = k_cache.index_select(0, p.kv_idx), v_cache.index_select(0, p.kv_idx)
        kp, vp = kp.transpose(0, 1)[None], vp.transpose(0, 1)[None]  # [1, KVH, kv_len, D]
        if gqa and p.mask is not None and q.is_cuda:  # a chunk after a prefix: see grouped_sdpa
            q_len, num_kv = p.row_end - p.row_start, k.shape[1]
            qg = q[p.row_start : p.row_end].view(q_len, num_kv, num_heads // num_kv, head_dim)
            og = grouped_sdpa(qg.permute(1, 2, 0, 3)[None], kp, vp, p.mask)  # [1, KVH, G, q_len, D]
            out[p.row_start : p.row_end] = og[0].permute(2, 0, 1, 3).reshape(q_len, num_heads, head_dim)
            continue
        qp = q[p.row_start : p.row_end].transpose(0, 1)[None]  # [1, H, q_len, D]
        op = F.scaled_dot_product_attention(
            qp, kp, vp, attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=gqa
        )
        out[p.row_start : p.row_end] = op[0].transpose(0, 1)
    return out.view(t, num_heads * head_dim)
