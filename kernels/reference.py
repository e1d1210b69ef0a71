"""Torch reference for the LoRA ops. It is the CPU path and the oracle of the Triton kernel tests.

Weights live in stacked device-slot buffers (one pair per fused projection of one layer):
    lora_a: [num_slots, num_slices, r_max, in_features]
    lora_b: [num_slots, out_total, r_max]        scale (alpha / r or alpha / sqrt(r)) already folded in
    slice_offsets: [num_slices + 1] column offsets of each output slice in y (q | k | v, gate | up)
Ranks below r_max are zero-padded, so padding contributes nothing.
On CPU the same weights are also kept as row tables, for the per-token "rows" strategy:
    lora_at: [num_slots * in_features, num_slices * r_max]   row (s, i) = every slice's A[s, :, :, i]
    lora_bt: one [num_slots * r_max, width_i] per slice       row (s, k) = B[s, off[i]:off[i+1], k]

Math, as a loop over tokens t with slot s = token_slot[t] >= 0 and slice i:
    h[t, i] = x[t] @ lora_a[s, i].T                                   # shrink
    y[t, off[i]:off[i+1]] += h[t, i] @ lora_b[s, off[i]:off[i+1]].T   # expand
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_linear import packed_linear
from .meta import LoraMeta

# Cost model of the CPU path (2-core x86 figures): a small matmul costs a fixed ~10 us in float32 and ~50 us
# in bfloat16 / float16 (oneDNN lays the weight out anew on every call), and multiply-adds run at ~1e11
# flop/s. Used only to choose between exact ways of computing the same sum.
_CALL_SECONDS_16BIT = 50e-6
_CALL_SECONDS_32BIT = 10e-6
_FLOPS_PER_SECOND = 1e11
_COPY_BYTES_PER_SECOND = 1e10
# The rows strategy: embedding_bag reads weight rows in place at 20-27 GB/s here, and its calls (bag sums,
# index_select, add) cost ~10 us each, less than a small 16-bit matmul.
_ROW_CALL_SECONDS = 10e-6
_ROW_BYTES_PER_SECOND = 2.5e10


def lora_apply_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slice_offsets: list[int],
    meta: LoraMeta,
    lora_at: torch.Tensor | None = None,
    lora_bt: list[torch.Tensor] | None = None,
) -> None:
    """Shrink + expand for the CPU path, in x's dtype (like PEFT's own forward). y += delta in place.

    Exact strategies; the cheapest one under the cost model above is taken:
    - grouped: one matmul pair per distinct slot (per slice for the expand), skipping rank padding;
    - dense: when many slots are active in a short step, every token is multiplied by all slots of the
      contiguous slot range [lo, hi] in one matmul, the rows of other slots are zeroed by a one-hot mask,
      and each slice's expand is one matmul over the range: a few large calls instead of many tiny ones;
    - compact: dense over only the active slots, copied side by side;
    - rows (with the row tables lora_at / lora_bt): embedding_bag reads each token's own A and B rows in
      place, weighted by x and by h: one call for the shrink and one per slice for the expand, and only the
      bytes of the adapters the step uses (the decode case: many adapters, few tokens each).
    y: [num_tokens, out_total]; x: [num_tokens, in_features].
    """
    num_slices, r_max, in_f = lora_a.shape[1], lora_a.shape[2], lora_a.shape[3]
    b_phys = lora_b.transpose(0, 1)  # [out_total, num_slots, r_max]
    has_rows = lora_at is not None and lora_bt is not None
    costs = _ref_costs(
        y.shape[1], num_slices, r_max, in_f, lora_a.element_size(), b_phys.is_contiguous(), meta, has_rows
    )
    best = min(costs, key=costs.__getitem__)
    if best == "rows":
        _apply_rows(y, x, lora_at, lora_bt, slice_offsets, meta, r_max)
    elif best == "compact":
        _apply_dense_compact(y, x, lora_a, b_phys, slice_offsets, meta)
    elif best == "dense":
        lo = meta.slot_ids_list[0]
        _apply_dense(y, x, lora_a, b_phys, slice_offsets, meta, lo, meta.slot_ids_list[-1] - lo + 1)
    else:
        _apply_grouped(y, x, lora_a, lora_b, slice_offsets, meta)


def _ref_costs(
    out_total: int,
    num_slices: int,
    r_max: int,
    in_f: int,
    elem: int,
    slot_minor_b: bool,
    meta: LoraMeta,
    has_rows: bool = False,
) -> dict[str, float]:
    """Estimated seconds of lora_apply_ref's strategies for this step and shape (cached on meta):
    grouped always; dense over the slot range and compact (the active slots copied side by side) when
    several slots are active and B is the slot-minor buffer; rows when the row tables exist."""
    key = ("ref-costs", out_total, num_slices, r_max, in_f, elem, slot_minor_b, has_rows)
    if key in meta.cache:
        return meta.cache[key]
    call = _call(elem)
    costs = {"grouped": (meta.num_active * (1 + num_slices) + 2) * call}
    if has_rows:
        token_ranks = sum(
            (meta.seg_starts_list[i + 1] - meta.seg_starts_list[i]) * _rank(r, r_max)
            for i, r in enumerate(meta.slot_ranks_list)
        )
        row_bytes = (meta.num_lora_tokens * in_f * num_slices * r_max + token_ranks * out_total) * elem
        costs["rows"] = (2 + 3 * num_slices) * _ROW_CALL_SECONDS + row_bytes / _ROW_BYTES_PER_SECOND
    if meta.num_active > 1 and slot_minor_b:
        span = meta.slot_ids_list[-1] - meta.slot_ids_list[0] + 1
        dense_calls = 2 + 2 * num_slices
        per_token = r_max * (num_slices * in_f + out_total)
        wasted = 2 * (meta.num_tokens * span - meta.num_lora_tokens) * per_token
        costs["dense"] = dense_calls * call + wasted / _FLOPS_PER_SECOND
        if span > meta.num_active:
            compact_wasted = 2 * (meta.num_tokens * meta.num_active - meta.num_lora_tokens) * per_token
            copied = 2 * meta.num_active * per_token * elem
            costs["compact"] = (dense_calls + 2) * call + compact_wasted / _FLOPS_PER_SECOND
            costs["compact"] += copied / _COPY_BYTES_PER_SECOND
    meta.cache[key] = costs
    return costs


def _call(elem: int) -> float:
    """Fixed seconds of one small matmul call for elements of `elem` bytes."""
    return _CALL_SECONDS_16BIT if elem == 2 else _CALL_SECONDS_32BIT


def _rank(rank: int, r_max: int) -> int:
    """The rank to compute with: the slot's true rank when known, else r_max (padding is zero)."""
    return rank if 0 < rank <= r_max else r_max


def _shrink_one(x: torch.Tensor, a: torch.Tensor, rank: int) -> torch.Tensor:
    """x [n, in] @ a[:, :rank]^T for every slice of one slot's a [num_slices, r_max, in] -> [n, num_slices * rank]."""
    num_slices, r_max, in_f = a.shape
    rank = _rank(rank, r_max)
    flat = a.view(num_slices * r_max, in_f) if rank == r_max else a[:, :rank].reshape(num_slices * rank, in_f)
    return F.linear(x, flat)


def _apply_grouped(y, x, lora_a, lora_b, slice_offsets, meta) -> None:
    slices = list(zip(slice_offsets, slice_offsets[1:], strict=False))
    if meta.is_single_full:  # one adapter for the whole step: no gather / scatter
        slot, rank = meta.slot_ids_list[0], meta.slot_ranks_list[0]
        h = _shrink_one(x, lora_a[slot], rank)  # [T, num_slices * rank]
        rank = h.shape[1] // len(slices)
        for j, (lo, hi) in enumerate(slices):
            y[:, lo:hi].addmm_(h[:, j * rank : (j + 1) * rank], lora_b[slot, lo:hi, :rank].T)
        return
    xs = x.index_select(0, meta.sorted_idx)  # [num_lora_tokens, in]
    delta = torch.zeros(xs.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    for i, slot in enumerate(meta.slot_ids_list):
        a, b = meta.seg_starts_list[i], meta.seg_starts_list[i + 1]
        h = _shrink_one(xs[a:b], lora_a[slot], meta.slot_ranks_list[i])
        rank = h.shape[1] // len(slices)
        for j, (lo, hi) in enumerate(slices):
            delta[a:b, lo:hi].addmm_(h[:, j * rank : (j + 1) * rank], lora_b[slot, lo:hi, :rank].T)
    y.index_add_(0, meta.sorted_idx, delta)


def _apply_dense(y, x, lora_a, b_phys, slice_offsets, meta, lo: int, span: int) -> None:
    num_slices, r_max, in_f = lora_a.shape[1], lora_a.shape[2], lora_a.shape[3]
    a_range = lora_a[lo : lo + span].view(span * num_slices * r_max, in_f)  # contiguous slots lo..hi
    h = F.linear(x, a_range).view(x.shape[0], span, num_slices, r_max)
    _dense_expand(y, h, b_phys[:, lo : lo + span], meta.slot_onehot(lo, span, h.dtype), slice_offsets)


def _apply_dense_compact(y, x, lora_a, b_phys, slice_offsets, meta) -> None:
    """_apply_dense over only the step's active slots (copied side by side), not the whole slot range."""
    num_slices, r_max, in_f = lora_a.shape[1], lora_a.shape[2], lora_a.shape[3]
    k = meta.num_active
    a_act = lora_a.index_select(0, meta.slot_ids).view(k * num_slices * r_max, in_f)
    h = F.linear(x, a_act).view(x.shape[0], k, num_slices, r_max)
    b_act = b_phys.index_select(1, meta.slot_ids)  # [out_total, k, r_max]
    _dense_expand(y, h, b_act, meta.active_onehot(h.dtype), slice_offsets)


def _row_indices(meta: LoraMeta, in_f: int, num_slices: int, r_max: int) -> tuple:
    """Index arrays of the rows strategy for this step (cached on meta). Bags follow token order; a
    base-only token gets empty bags (embedding_bag's sum of nothing: a zero row).

    Running example: token_slot = [2, -1, 0], in_f = 3, num_slices = 2, r_max = 2, ranks: slot 0 -> 1, slot 2 -> 2
      a_idx = [6, 7, 8, 0, 1, 2]   rows s * in_f + i of lora_at, token by token
      a_off = [0, 3, 3]            token 1 has an empty bag
      b_idx = [4, 5, 0]            rows s * r_max + k of each slice's lora_bt, k < the slot's rank
      b_off = [0, 2, 2]
      h_idx = [[0, 1, 8], [2, 3, 10]]   per slice j: where each b_idx weight sits in h.view(-1) (h [3, 2 * 2])
    """
    key = ("rows", in_f, num_slices, r_max)
    if key not in meta.cache:
        slot = meta.token_slot  # [T]
        dev = slot.device
        is_lora = slot >= 0
        rows = is_lora.nonzero().view(-1)  # [num_lora_tokens] token indices, in token order
        slot_l = slot.index_select(0, rows)
        rank_of = torch.zeros(meta.slot_ids_list[-1] + 1, dtype=torch.int64)
        rank_of[meta.slot_ids_list] = torch.tensor([_rank(r, r_max) for r in meta.slot_ranks_list])
        rank_l = rank_of.to(dev).index_select(0, slot_l)  # [num_lora_tokens]

        def exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(counts, 0) - counts

        a_idx = (slot_l[:, None] * in_f + torch.arange(in_f, device=dev)).view(-1)
        a_off = exclusive_cumsum(is_lora.to(torch.int64) * in_f)
        k = torch.arange(r_max, device=dev)
        keep = (k[None, :] < rank_l[:, None]).view(-1)  # [num_lora_tokens * r_max]
        b_idx = (slot_l[:, None] * r_max + k).view(-1)[keep]
        b_off = exclusive_cumsum(torch.zeros_like(slot).index_put_((rows,), rank_l))
        h_idx0 = (rows[:, None] * (num_slices * r_max) + k).view(-1)[keep]
        h_idx = [h_idx0 + j * r_max for j in range(num_slices)]
        meta.cache[key] = (a_idx, a_off, b_idx, b_off, h_idx, None if meta.num_lora_tokens == meta.num_tokens else rows)
    return meta.cache[key]


def _apply_rows(y, x, lora_at, lora_bt, slice_offsets, meta, r_max: int) -> None:
    num_slices = len(slice_offsets) - 1
    in_f = x.shape[1]
    a_idx, a_off, b_idx, b_off, h_idx, lora_rows = _row_indices(meta, in_f, num_slices, r_max)
    xs = x if lora_rows is None else x.index_select(0, lora_rows)  # the shrink's weights: LoRA tokens' x
    h = F.embedding_bag(a_idx, lora_at, a_off, mode="sum", per_sample_weights=xs.reshape(-1))  # [T, slices * r_max]
    h_flat = h.view(-1)
    for j, (c0, c1) in enumerate(zip(slice_offsets, slice_offsets[1:], strict=False)):
        weights = h_flat.index_select(0, h_idx[j])
        y[:, c0:c1] += F.embedding_bag(b_idx, lora_bt[j], b_off, mode="sum", per_sample_weights=weights)


def row_tables(
    lora_a: torch.Tensor, lora_b: torch.Tensor, slice_offsets: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The rows strategy's tables (lora_at, lora_bt; see the top of this file) built from the slot
    buffers lora_a [num_slots, num_slices, r_max, in] and lora_b [num_slots, out_total, r_max]."""
    num_slots, num_slices, r_max, in_f = lora_a.shape
    lora_at = lora_a.permute(0, 3, 1, 2).reshape(num_slots * in_f, num_slices * r_max).contiguous()
    lora_bt = [
        lora_b[:, c0:c1].transpose(1, 2).reshape(num_slots * r_max, c1 - c0).contiguous()
        for c0, c1 in zip(slice_offsets, slice_offsets[1:], strict=False)
    ]
    return lora_at, lora_bt


def copy_slot_to_row_tables(
    lora_at: torch.Tensor,
    lora_bt: list[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slice_offsets: list[int],
    slot: int,
) -> None:
    """Refresh slot `slot`'s rows of the row tables from the slot buffers (after the slot was written):
    the same values row_tables computes for the whole buffers, padding included."""
    _, num_slices, r_max, in_f = lora_a.shape
    lora_at[slot * in_f : (slot + 1) * in_f].view(in_f, num_slices, r_max).copy_(lora_a[slot].permute(2, 0, 1))
    for bt, c0, c1 in zip(lora_bt, slice_offsets, slice_offsets[1:], strict=False):
        bt[slot * r_max : (slot + 1) * r_max].copy_(lora_b[slot, c0:c1].T)


def _dense_expand(y, h, b_sel, onehot, slice_offsets) -> None:
    """y += each token's own slot's expand, for every slot of a selection at once: h [T, k, num_slices,
    r_max] (every token shrunk by each selected slot), b_sel [out_total, k, r_max], onehot [T, k] (1 where
    the selected slot is the token's own). One matmul per output slice."""
    t, k, _, r_max = h.shape
    h = h * onehot[:, :, None, None]  # keep each token's own slot only
    for j, (c0, c1) in enumerate(zip(slice_offsets, slice_offsets[1:], strict=False)):
        b = b_sel[c0:c1].reshape(c1 - c0, k * r_max)  # a view for a slot range: rows stride num_slots * r_max
        y[:, c0:c1].addmm_(h[:, :, j].reshape(t, k * r_max), b.T)


def lora_linear_cpu(
    x: torch.Tensor,  # [T, in]
    weight_ext: torch.Tensor,  # [out_total + num_slots * num_slices * r_max, in]: W, then every slot's A rows
    bias_ext: torch.Tensor | None,  # [out_total + ...] (zeros under the A rows) or None
    lora_a: torch.Tensor,  # weight_ext[out_total:] viewed [num_slots, num_slices, r_max, in]
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max] view of the slot-minor buffer
    slice_offsets: list[int],
    meta: LoraMeta,
    packed: torch.Tensor | None = None,  # oneDNN-packed W (kernels/cpu_linear.py) for the separate plan
    lora_at: torch.Tensor | None = None,  # the row tables (top of this file), for the rows strategy
    lora_bt: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """y = x W^T + b + every token's LoRA delta, on CPU.

    Because each slot's A rows sit right under W in one buffer, the shrink for slots 0..hi can ride along
    in the base matmul (one call: x @ weight_ext[:out_total + (hi + 1) * rows_per_slot]^T) instead of
    costing calls of its own; the cost model picks that or the separate path. Every layer of a step has
    the same shapes, so the choice is made once per step and shape (cached on meta).
    """
    num_slices, r_max, in_f = lora_a.shape[1], lora_a.shape[2], lora_a.shape[3]
    has_rows = lora_at is not None and lora_bt is not None
    key = ("plan", slice_offsets[-1], num_slices, r_max, in_f)
    plan = meta.cache.get(key)
    if plan is None:
        elem = x.element_size()
        plan = _plan(x.shape[0], slice_offsets[-1], num_slices, r_max, in_f, elem, meta, has_rows, packed is not None)
        meta.cache[key] = plan
    out_total = slice_offsets[-1]
    if plan == "separate":
        bias = None if bias_ext is None else bias_ext[:out_total]
        y = F.linear(x, weight_ext[:out_total], bias) if packed is None else packed_linear(x, packed, bias)
        lora_apply_ref(y, x, lora_a, lora_b, slice_offsets, meta, lora_at, lora_bt)
        return y
    lo, hi = meta.slot_ids_list[0], meta.slot_ids_list[-1]
    per_slot = num_slices * r_max
    n = out_total + (hi + 1) * per_slot
    y_ext = F.linear(x, weight_ext[:n], None if bias_ext is None else bias_ext[:n])  # [T, n]
    y = y_ext[:, :out_total]
    if plan == "fused-single":
        slot = lo
        h = y_ext[:, out_total + slot * per_slot : out_total + (slot + 1) * per_slot]  # [T, num_slices * r_max]
        bt = lora_b[slot].T  # [r_max, out_total]
        for j in range(num_slices):
            c0, c1 = slice_offsets[j], slice_offsets[j + 1]
            y[:, c0:c1].addmm_(h[:, j * r_max : (j + 1) * r_max], bt[:, c0:c1])
        return y
    t = x.shape[0]
    h = y_ext[:, out_total:].view(t, hi + 1, num_slices, r_max)  # every token x every slot 0..hi
    if plan == "fused-dense":
        span = hi - lo + 1
        b_phys = lora_b.transpose(0, 1)  # [out_total, num_slots, r_max]
        _dense_expand(y, h[:, lo:], b_phys[:, lo : lo + span], meta.slot_onehot(lo, span, h.dtype), slice_offsets)
        return y
    hs = h.index_select(0, meta.sorted_idx)  # [num_lora_tokens, hi + 1, num_slices, r_max]
    delta = torch.zeros(hs.shape[0], out_total, dtype=y.dtype, device=y.device)
    for i, slot in enumerate(meta.slot_ids_list):
        a, b = meta.seg_starts_list[i], meta.seg_starts_list[i + 1]
        bt = lora_b[slot].T
        for j in range(num_slices):
            c0, c1 = slice_offsets[j], slice_offsets[j + 1]
            delta[a:b, c0:c1].addmm_(hs[a:b, slot, j], bt[:, c0:c1])
    y.index_add_(0, meta.sorted_idx, delta)
    return y


def _plan(
    t: int,
    out_total: int,
    num_slices: int,
    r_max: int,
    in_f: int,
    elem: int,
    meta: LoraMeta,
    has_rows: bool,
    has_packed: bool = False,
) -> str:
    """Cheapest exact way under the cost model: 'separate' | 'fused-single' | 'fused-dense' | 'fused-grouped'."""
    lo, hi = meta.slot_ids_list[0], meta.slot_ids_list[-1]
    span = hi - lo + 1
    call = _call(elem)
    fused_shrink = 2 * t * (hi + 1) * num_slices * r_max * in_f / _FLOPS_PER_SECOND
    if has_packed:  # a fused plan gives up the packed base matmul: W is laid out anew, as in a copy of it
        fused_shrink += out_total * in_f * elem / _COPY_BYTES_PER_SECOND
    separate = min(_ref_costs(out_total, num_slices, r_max, in_f, elem, True, meta, has_rows).values())
    if meta.is_single_full:
        return "fused-single" if fused_shrink + num_slices * call < separate else "separate"
    dense = (1 + 2 * num_slices) * call + 2 * t * span * r_max * out_total / _FLOPS_PER_SECOND
    grouped = (meta.num_active * num_slices + 2) * call
    if fused_shrink + min(dense, grouped) >= separate:
        return "separate"
    return "fused-dense" if dense < grouped else "fused-grouped"
