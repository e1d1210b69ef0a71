"""Torch reference for the LoRA ops. It is the CPU path and the oracle of the Triton kernel tests.

Weights live in stacked device-slot buffers (one pair per fused projection of one layer):
    lora_a: [num_slots, num_slices, r_max, in_features]
    lora_b: [num_slots, out_total, r_max]        scale (alpha / r or alpha / sqrt(r)) already folded in
    slice_offsets: [num_slices + 1] column offsets of each output slice in y (q | k | v, gate | up)
Ranks below r_max are zero-padded, so padding contributes nothing.

Math, as a loop over tokens t with slot s = token_slot[t] >= 0 and slice i:
    h[t, i] = x[t] @ lora_a[s, i].T                                   # shrink
    y[t, off[i]:off[i+1]] += h[t, i] @ lora_b[s, off[i]:off[i+1]].T   # expand
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_linear import packed_linear
from .meta import LoraMeta

# Cost model of the CPU path (2-core x86 figures): a small matmul costs ~20 us of fixed overhead, and
# multiply-adds run at ~1e11 flop/s. Used only to choose between two exact ways of computing the same sum.
_CALL_SECONDS = 20e-6
_FLOPS_PER_SECOND = 1e11
_COPY_BYTES_PER_SECOND = 1e10


def lora_apply_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slice_offsets: list[int],
    meta: LoraMeta,
) -> None:
    """Shrink + expand for the CPU path, in x's dtype (like PEFT's own forward). y += delta in place.

    Two exact strategies; the cheaper one under the cost model above is taken:
    - grouped: one matmul pair per distinct slot (per slice for the expand), skipping rank padding;
    - dense: when many slots are active in a short step, every token is multiplied by all slots of the
      contiguous slot range [lo, hi] in one matmul, the rows of other slots are zeroed by a one-hot mask,
      and each slice's expand is one matmul over the range: a few large calls instead of many tiny ones.
    y: [num_tokens, out_total]; x: [num_tokens, in_features].
    """
    num_slices, r_max, in_f = lora_a.shape[1], lora_a.shape[2], lora_a.shape[3]
    b_phys = lora_b.transpose(0, 1)  # [out_total, num_slots, r_max]
    costs = _ref_costs(y.shape[1], num_slices, r_max, in_f, lora_a.element_size(), b_phys.is_contiguous(), meta)
    best = min(costs, key=costs.__getitem__)
    if best == "compact":
        _apply_dense_compact(y, x, lora_a, b_phys, slice_offsets, meta)
    elif best == "dense":
        lo = meta.slot_ids_list[0]
        _apply_dense(y, x, lora_a, b_phys, slice_offsets, meta, lo, meta.slot_ids_list[-1] - lo + 1)
    else:
        _apply_grouped(y, x, lora_a, lora_b, slice_offsets, meta)


def _ref_costs(
    out_total: int, num_slices: int, r_max: int, in_f: int, elem: int, slot_minor_b: bool, meta: LoraMeta
) -> dict[str, float]:
    """Estimated seconds of lora_apply_ref's strategies for this step and shape (cached on meta):
    grouped always; dense over the slot range and compact (the active slots copied side by side) when
    several slots are active and B is the slot-minor buffer."""
    key = ("ref-costs", out_total, num_slices, r_max, in_f, elem, slot_minor_b)
    if key in meta.cache:
        return meta.cache[key]
    costs = {"grouped": (meta.num_active * (1 + num_slices) + 2) * _CALL_SECONDS}
    if meta.num_active > 1 and slot_minor_b:
        span = meta.slot_ids_list[-1] - meta.slot_ids_list[0] + 1
        dense_calls = 2 + 2 * num_slices
        per_token = r_max * (num_slices * in_f + out_total)
        wasted = 2 * (meta.num_tokens * span - meta.num_lora_tokens) * per_token
        costs["dense"] = dense_calls * _CALL_SECONDS + wasted / _FLOPS_PER_SECOND
        if span > meta.num_active:
            compact_wasted = 2 * (meta.num_tokens * meta.num_active - meta.num_lora_tokens) * per_token
            copied = 2 * meta.num_active * per_token * elem
            costs["compact"] = (dense_calls + 2) * _CALL_SECONDS + compact_wasted / _FLOPS_PER_SECOND
            costs["compact"] += copied / _COPY_BYTES_PER_SECOND
    meta.cache[key] = costs
    return costs


def _shrink_one(x: torch.Tensor, a: torch.Tensor, rank: int) -> torch.Tensor:
    """x [n, in] @ a[:, :rank]^T for every slice of one slot's a [num_slices, r_max, in] -> [n, num_slices * rank]."""
    num_slices, r_max, in_f = a.shape
    rank = rank if 0 < rank <= r_max else r_max
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
) -> torch.Tensor:
    """y = x W^T + b + every token's LoRA delta, on CPU.

    Because each slot's A rows sit right under W in one buffer, the shrink for slots 0..hi can ride along
    in the base matmul (one call: x @ weight_ext[:out_total + (hi + 1) * rows_per_slot]^T) instead of
    costing calls of its own; the cost model picks that or the separate path. Every layer of a step has
    the same shapes, so the choice is made once per step and shape (cached on meta).
    """
    num_slices, r_max, in_f = lora_a.shape[1], lora_a.shape[2], lora_a.shape[3]
    key = ("plan", slice_offsets[-1], num_slices, r_max, in_f)
    plan = meta.cache.get(key)
    if plan is None:
        plan = meta.cache[key] = _plan(x.shape[0], slice_offsets[-1], num_slices, r_max, in_f, x.element_size(), meta)
    out_total = slice_offsets[-1]
    if plan == "separate":
        bias = None if bias_ext is None else bias_ext[:out_total]
        y = F.linear(x, weight_ext[:out_total], bias) if packed is None else packed_linear(x, packed, bias)
        lora_apply_ref(y, x, lora_a, lora_b, slice_offsets, meta)
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


def _plan(t: int, out_total: int, num_slices: int, r_max: int, in_f: int, elem: int, meta: LoraMeta) -> str:
    """Cheapest exact way under the cost model: 'separate' | 'fused-single' | 'fused-dense' | 'fused-grouped'."""
    lo, hi = meta.slot_ids_list[0], meta.slot_ids_list[-1]
    span = hi - lo + 1
    fused_shrink = 2 * t * (hi + 1) * num_slices * r_max * in_f / _FLOPS_PER_SECOND
    separate = min(_ref_costs(out_total, num_slices, r_max, in_f, elem, True, meta).values())
    if meta.is_single_full:
        return "fused-single" if fused_shrink + num_slices * _CALL_SECONDS < separate else "separate"
    dense = (1 + 2 * num_slices) * _CALL_SECONDS + 2 * t * span * r_max * out_total / _FLOPS_PER_SECOND
    grouped = (meta.num_active * num_slices + 2) * _CALL_SECONDS
    if fused_shrink + min(dense, grouped) >= separate:
        return "separate"
    return "fused-dense" if dense < grouped else "fused-grouped"
