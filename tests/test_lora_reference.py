"""The CPU LoRA path (every one of its strategies) against a per-token loop in float64."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import build_lora_meta
from loraplex.kernels.reference import (
    _apply_dense,
    _apply_dense_compact,
    _apply_grouped,
    _apply_rows,
    _ref_costs,
    lora_apply_ref,
    row_tables,
)


def _case(num_tokens: int, num_slots: int, slices: list[int], r_max: int, in_f: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ranks = [int(torch.randint(1, r_max + 1, (1,), generator=g)) for _ in range(num_slots)]
    a = torch.zeros(num_slots, len(slices), r_max, in_f, dtype=torch.float64)
    b_phys = torch.zeros(sum(slices), num_slots, r_max, dtype=torch.float64)  # the model's layout
    for s, r in enumerate(ranks):  # zero-padded ranks, as the slot writer leaves them
        a[s, :, :r] = torch.randn(len(slices), r, in_f, generator=g, dtype=torch.float64)
        b_phys[:, s, :r] = torch.randn(sum(slices), r, generator=g, dtype=torch.float64)
    token_slot = torch.randint(-1, num_slots, (num_tokens,), generator=g).tolist()
    x = torch.randn(num_tokens, in_f, generator=g, dtype=torch.float64)
    y = torch.randn(num_tokens, sum(slices), generator=g, dtype=torch.float64)
    return x, y, a, b_phys.transpose(0, 1), token_slot, ranks


def _loop(x, y, a, b, offsets, token_slot):
    out = y.clone()
    for t, s in enumerate(token_slot):
        if s < 0:
            continue
        for i in range(len(offsets) - 1):
            out[t, offsets[i] : offsets[i + 1]] += (x[t] @ a[s, i].T) @ b[s, offsets[i] : offsets[i + 1]].T
    return out


@pytest.mark.parametrize("strategy", ["grouped", "dense", "compact", "rows", "auto"])
@pytest.mark.parametrize(
    "num_tokens, num_slots, slices, r_max, in_f, seed",
    [
        (1, 1, [40], 8, 24, 0),
        (7, 3, [48, 16, 16], 8, 24, 1),
        (33, 8, [30, 30], 16, 17, 2),
        (64, 32, [24], 4, 40, 3),
        (5, 5, [12, 4, 4], 1, 9, 4),
    ],
)
def test_cpu_path_matches_loop(strategy, num_tokens, num_slots, slices, r_max, in_f, seed):
    x, y, a, b, token_slot, ranks = _case(num_tokens, num_slots, slices, r_max, in_f, seed)
    offsets = [0]
    for w in slices:
        offsets.append(offsets[-1] + w)
    meta = build_lora_meta(token_slot, ranks)
    if meta is None:
        pytest.skip("no LoRA token drawn")
    expected = _loop(x, y, a, b, offsets, token_slot)
    out = y.clone()
    if strategy == "grouped":
        _apply_grouped(out, x, a, b, offsets, meta)
    elif strategy == "compact":
        _apply_dense_compact(out, x, a, b.transpose(0, 1), offsets, meta)
    elif strategy == "dense":
        lo = meta.slot_ids_list[0]
        _apply_dense(out, x, a, b.transpose(0, 1), offsets, meta, lo, meta.slot_ids_list[-1] - lo + 1)
    elif strategy == "rows":
        _apply_rows(out, x, *row_tables(a, b, offsets), offsets, meta, a.shape[2])
    else:
        lora_apply_ref(out, x, a, b, offsets, meta, *row_tables(a, b, offsets))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    untouched = [t for t, s in enumerate(token_slot) if s < 0]
    assert torch.equal(out[untouched], y[untouched])  # base-only tokens get exactly nothing added


def test_rows_strategy_skips_rank_padding_and_is_chosen_for_decode():
    """Slots of rank 2 in r_max 8: the rows strategy reads only the true ranks' rows of B, so garbage in
    the padding rows of the B table changes nothing; and a decode-like step (a token per adapter over
    many slots) is costed cheapest as rows."""
    x, y, a, b, _, _ = _case(6, 12, [16, 8], 8, 24, 7)
    a[:, :, 2:] = 0
    b[:, :, 2:] = 0
    token_slot = [11, 0, 5, -1, 5, 7]
    meta = build_lora_meta(token_slot, [2] * 12)
    at, bt = row_tables(a, b, [0, 16, 24])
    for table in bt:
        table.view(12, 8, -1)[:, 2:] = 1e6  # padding rows: must never be read
    out = y.clone()
    _apply_rows(out, x, at, bt, [0, 16, 24], meta, 8)
    torch.testing.assert_close(out, _loop(x, y, a, b, [0, 16, 24], token_slot), rtol=1e-10, atol=1e-10)

    decode = build_lora_meta(list(range(0, 32, 2)), [16] * 32)  # 16 tokens, 16 distinct of 32 slots
    costs = _ref_costs(960, 3, 16, 576, 2, True, decode, has_rows=True)
    assert min(costs, key=costs.__getitem__) == "rows", costs
    prefill = build_lora_meta([3] * 300 + [9] * 200, [16] * 32)  # long prompts of two adapters
    costs = _ref_costs(960, 3, 16, 576, 2, True, prefill, has_rows=True)
    assert min(costs, key=costs.__getitem__) == "grouped", costs


def test_single_slot_full_batch_skips_gather():
    x, y, a, b, _, ranks = _case(9, 2, [8, 8], 4, 12, 5)
    meta = build_lora_meta([1] * 9, ranks)
    assert meta.is_single_full
    out = y.clone()
    lora_apply_ref(out, x, a, b, [0, 8, 16], meta)
    torch.testing.assert_close(out, _loop(x, y, a, b, [0, 8, 16], [1] * 9))


@pytest.mark.parametrize("plan", ["separate", "fused-single", "fused-dense", "fused-grouped"])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_cpu_plans_match_loop(plan, bias):
    """Base matmul + LoRA with the A rows stacked under W: every plan computes the same y."""
    from loraplex.kernels.reference import lora_linear_cpu

    slices, r_max, in_f, num_slots = [20, 8, 8], 4, 16, 5
    single = plan == "fused-single"
    x, y0, a, b, token_slot, ranks = _case(11, num_slots, slices, r_max, in_f, seed=9)
    if single:
        token_slot = [3] * 11
    out_total = sum(slices)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out_total, in_f, generator=g, dtype=torch.float64)
    weight_ext = torch.cat([w, a.reshape(-1, in_f)])
    lora_a = weight_ext[out_total:].view_as(a)
    bias_ext = torch.cat([torch.randn(out_total, generator=g, dtype=torch.float64), torch.zeros(a.numel() // in_f, dtype=torch.float64)]) if bias else None
    offsets = [0, 20, 28, 36]
    meta = build_lora_meta(token_slot, ranks)
    key = ("plan", out_total, 3, r_max, in_f)
    meta.cache[key] = plan  # force the strategy under test
    y = lora_linear_cpu(x, weight_ext, bias_ext, lora_a, b, offsets, meta)
    base = x @ w.T + (bias_ext[:out_total] if bias else 0)
    torch.testing.assert_close(y, _loop(x, base, a, b, offsets, token_slot), rtol=1e-10, atol=1e-10)


def test_packed_cpu_linear_equals_plain_linear():
    """16-bit CPU models use oneDNN-packed weights; the result must equal F.linear up to the bf16 rounding.

    Not bit for bit: which oneDNN kernel runs (AMX, AVX-512 bf16, AVX2) depends on the CPU, and two kernels
    may sum in different orders, so one output may round to the neighbouring bf16 value (2**-8 relative)."""
    from loraplex.kernels.cpu_linear import pack_weight, packed_linear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 40, generator=g).to(torch.bfloat16)
    b = torch.randn(96, generator=g).to(torch.bfloat16)
    packed = pack_weight(w)
    if packed is None:
        pytest.skip("this torch build has no oneDNN packed linear")
    for t in (1, 7, 64):
        x = torch.randn(t, 40, generator=g).to(torch.bfloat16)
        got, want = packed_linear(x, packed, b), torch.nn.functional.linear(x, w, b)
        assert got.dtype == want.dtype == torch.bfloat16
        torch.testing.assert_close(got, want, rtol=2**-7, atol=1e-3)
    assert pack_weight(w.float()) is None  # float32 keeps the plain path


def test_meta_in_preallocated_buffers_equals_fresh_meta():
    """The runner's reused buffers give the same metadata as fresh tensors, step after step (and grow)."""
    from loraplex.kernels import MetaBuffers

    buffers = MetaBuffers("cpu", capacity=8)
    g = torch.Generator().manual_seed(4)
    for n in (5, 3, 40, 7):  # 40 tokens outgrow the initial capacity
        token_slot = torch.randint(-1, 6, (n,), generator=g).tolist()
        fresh = build_lora_meta(token_slot, [4] * 6)
        reused = build_lora_meta(token_slot, [4] * 6, buffers=buffers)
        if fresh is None:
            assert reused is None
            continue
        for name in ("token_slot", "sorted_idx", "slot_ids", "seg_starts"):
            assert torch.equal(getattr(fresh, name), getattr(reused, name)), name
        assert reused.slot_ids_list == fresh.slot_ids_list and reused.is_single_full == fresh.is_single_full
    assert buffers.capacity >= 40
