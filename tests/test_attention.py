"""engine/attention.py: step indices built on the device from block tables, fp32 decode scores, and GQA
with a mask kept off SDPA's math backend on CUDA (grouped query rows)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from loraplex.engine.attention import SeqSpan, attention, build_attn_meta, grouped_sdpa

BS = 4  # block size


def kv_row(table: list[int], pos: int) -> int:
    return table[pos // BS] * BS + pos % BS


def random_step(rng: random.Random, num_blocks: int = 64) -> list[SeqSpan]:
    """Decodes and prompt chunks (fresh and after a prefix) over shuffled, non-contiguous KV blocks."""
    free = list(range(num_blocks))
    rng.shuffle(free)
    spans, row = [], 0
    for num_new, start in ((1, 0), (1, 9), (5, 0), (1, 22), (3, 6), (1, 3)):
        need = -(-(start + num_new) // BS)
        table = [free.pop() for _ in range(need)]
        spans.append(SeqSpan(row, num_new, start, table))
        row += num_new
    return spans


@pytest.mark.parametrize("window", [None, 5])
def test_step_indices_match_the_block_tables(window):
    spans = random_step(random.Random(0))
    meta = build_attn_meta(spans, BS, window, torch.device("cpu"))
    want_write = [kv_row(sp.block_table, p) for sp in spans for p in range(sp.start_pos, sp.start_pos + sp.num_new)]
    assert meta.kv_write_rows.tolist() == want_write
    decodes = [sp for sp in spans if sp.num_new == 1]
    assert meta.decode is not None
    assert meta.decode.rows.tolist() == [sp.row_start for sp in decodes]
    max_len = max(sp.start_pos + 1 for sp in decodes)
    for b, sp in enumerate(decodes):
        n = sp.start_pos + 1
        assert meta.decode.kv_idx[b, :n].tolist() == [kv_row(sp.block_table, j) for j in range(n)]
        lo = max(0, n - window) if window else 0
        want_attend = [lo <= j < n for j in range(max_len)]
        assert meta.decode.attend[b, 0, 0].tolist() == want_attend
        assert torch.equal(meta.decode.masked, ~meta.decode.attend)
    chunked = [sp for sp in spans if sp.num_new > 1]
    assert len(meta.prefills) == len(chunked)
    for p, sp in zip(meta.prefills, chunked, strict=True):
        kv_len = sp.start_pos + sp.num_new
        if sp.start_pos == 0 and not (window and kv_len > window):
            assert p.kv_idx is None and p.mask is None
            continue
        assert p.kv_idx is not None and p.mask is not None
        assert p.kv_idx.tolist() == [kv_row(sp.block_table, j) for j in range(kv_len)]
        for qi in range(sp.num_new):
            qp = sp.start_pos + qi
            assert p.mask[qi].tolist() == [j <= qp and (window is None or j > qp - window) for j in range(kv_len)]


def test_spans_must_tile_the_step():
    with pytest.raises(ValueError, match="tile"):
        build_attn_meta([SeqSpan(0, 1, 0, [0]), SeqSpan(2, 1, 0, [1])], BS, None, torch.device("cpu"))


def reference_attention(q, k_ctx, v_ctx, q_pos):
    """float64 causal GQA attention of query rows at positions q_pos over a context [L, KVH, D]."""
    num_heads, num_kv = q.shape[1], k_ctx.shape[1]
    k64 = k_ctx.double().repeat_interleave(num_heads // num_kv, 1)
    v64 = v_ctx.double().repeat_interleave(num_heads // num_kv, 1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k64) * q.shape[-1] ** -0.5
    future = torch.arange(k_ctx.shape[0])[None, :] > torch.tensor(q_pos)[:, None]
    scores = scores.masked_fill(future[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v64)


def test_bf16_decode_scores_are_fp32():
    """Large, close logits (the raw q.k near 1000, where bf16 steps by 8): with the scores rounded to
    bf16 before scaling, softmax weights move by tens of percent; in fp32 the output stays at bf16
    accuracy of the float64 answer."""
    gen = torch.Generator().manual_seed(0)
    num_heads, num_kv, d, ctx = 4, 2, 64, 20
    q = torch.full((1, num_heads, d), 4.0) + 0.05 * torch.randn(1, num_heads, d, generator=gen)
    k = torch.full((ctx, num_kv, d), 4.0) + 0.05 * torch.randn(ctx, num_kv, d, generator=gen)
    v = torch.randn(ctx, num_kv, d, generator=gen)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    want = reference_attention(q, k, v, [ctx - 1])

    table = list(range(-(-ctx // BS)))
    k_cache = torch.zeros(len(table) * BS, num_kv, d, dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    k_cache[:ctx], v_cache[:ctx] = k, v  # the context, but for the last token, which the step writes
    meta = build_attn_meta([SeqSpan(0, 1, ctx - 1, table)], BS, None, torch.device("cpu"))
    got = attention(q, k[-1:], v[-1:], k_cache, v_cache, meta).view(1, num_heads, d)
    err = (got.double() - want).abs().max().item()
    assert err < 2e-2, err

    # What rounding the scores to bf16 first gives on the same input: far off (the check above can fail).
    kd = k.repeat_interleave(2, 1).permute(1, 2, 0)  # [H, D, L]
    rounded = torch.matmul(q.transpose(0, 1), kd).float() * d**-0.5  # bf16 matmul, then fp32
    bad = torch.matmul(rounded.softmax(-1).to(torch.bfloat16), v.repeat_interleave(2, 1).transpose(0, 1))
    assert (bad.transpose(0, 1).double() - want).abs().max().item() > 5 * err


@pytest.mark.parametrize("q_len", [1, 6])
def test_grouped_rows_equal_sdpa_with_gqa(q_len):
    gen = torch.Generator().manual_seed(q_len)
    b, kvh, g, d, kv_len = 2, 2, 3, 16, 9
    q = torch.randn(b, kvh, g, q_len, d, generator=gen)
    k = torch.randn(b, kvh, kv_len, d, generator=gen)
    v = torch.randn(b, kvh, kv_len, d, generator=gen)
    if q_len == 1:
        attend = torch.rand(b, 1, 1, kv_len, generator=gen) < 0.7
        attend[..., 0] = True
        plain_mask = attend
    else:
        attend = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        plain_mask = attend
    got = grouped_sdpa(q, k, v, attend)  # [b, kvh, g, q_len, d]
    want = F.scaled_dot_product_attention(
        q.reshape(b, kvh * g, q_len, d), k, v, attn_mask=plain_mask, enable_gqa=True
    ).view(b, kvh, g, q_len, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_attention_without_the_math_backend(dtype):
    """Decodes and a chunk after a prefix (masked GQA) run with SDPA's math backend switched off, and
    match the CPU path. (A fresh float32 prompt with GQA has no fused kernel in torch 2.11, flash being
    16-bit only: float32 steps leave it out; bf16 ones keep it, on flash.)"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    spans = random_step(random.Random(3))
    if dtype == torch.float32:
        kept, row = [], 0
        for sp in spans:
            if sp.num_new == 1 or sp.start_pos > 0:
                kept.append(SeqSpan(row, sp.num_new, sp.start_pos, sp.block_table))
                row += sp.num_new
        spans = kept
    num_heads, num_kv, d = 8, 2, 64
    num_tokens = sum(sp.num_new for sp in spans)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(num_tokens, num_heads, d, generator=gen).to(dtype)
    k = torch.randn(num_tokens, num_kv, d, generator=gen).to(dtype)
    v = torch.randn(num_tokens, num_kv, d, generator=gen).to(dtype)
    caches = [torch.randn(64 * BS, num_kv, d, generator=gen).to(dtype) for _ in range(2)]
    want = attention(q, k, v, *(c.clone() for c in caches), build_attn_meta(spans, BS, None, torch.device("cpu")))
    dev = torch.device("cuda")
    meta = build_attn_meta(spans, BS, None, dev)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        got = attention(q.to(dev), k.to(dev), v.to(dev), *(c.to(dev) for c in caches), meta)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.cpu(), want, rtol=tol, atol=tol)
