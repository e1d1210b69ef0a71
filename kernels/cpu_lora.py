"""The CPU path of a LoRA-aware linear: y = x W^T + b + every token's own LoRA delta, in x's dtype.

Math (reference.py holds it as a loop): for token t with slot s = token_slot[t] >= 0 and output slice i
at columns off[i]:off[i + 1],
    y[t, off[i]:off[i + 1]] += (x[t] @ A[s, i].T) @ B[s, off[i]:off[i + 1]].T
Layouts: lora_slots.py. Each strategy below computes that same sum exactly; cpu_plan.py picks the
cheapest per step and shape:
    fused-single  one adapter covers the whole step: x @ [W; A rows]^T in one matmul, then the expand
    grouped       a matmul pair per distinct slot (per slice for the expand), rank padding skipped
    dense         every token times every slot of the contiguous active slot range in one matmul, other
                  slots masked out: a few large calls instead of many tiny ones (short steps, many slots)
    compact       dense over only the active slots, copied side by side (active slots far apart)
    rows          embedding_bag reads each token's own A and B rows in place from the row tables: only
                  the bytes of the adapters used (decode steps: many adapters, few tokens each)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .cpu_linear import base_linear
from .cpu_plan import CostFigures, DeltaStrategy, LinearShape, Plan, choose_delta, choose_plan, true_rank
from .lora_slots import LoraSlots, RowTables
from .meta import LoraMeta


def lora_linear_cpu(
    x: torch.Tensor,  # [num_tokens, in]
    weight: torch.Tensor,  # [out_total, in]
    bias: torch.Tensor | None,  # [out_total]
    packed: torch.Tensor | None,  # W packed by cpu_linear.pack_weight, or None
    slots: LoraSlots,
    meta: LoraMeta,
    plan: Plan | None = None,  # None: the cost model's choice; tests and benchmarks force one
) -> torch.Tensor:
    """y = x W^T + b + every token's LoRA delta -> [num_tokens, out_total] (possibly a strided view).
    The cost model prices with slots.figures (cpu_calibrate.py); without them the plan is "grouped"."""
    lora_a = slots.lora_a
    shape = LinearShape(slots.out_total, lora_a.shape[1], lora_a.shape[2], lora_a.shape[3], x.element_size())
    if plan is None:
        # Fusing gives up the packed base matmul, which costs more than it saves: only unpacked W fuses.
        plan = choose_plan(x.shape[0], shape, meta, slots.rows is not None, packed is None, slots.figures)
    if plan == "fused-single":
        assert meta.is_single_full, "fused-single needs one slot covering the whole step"
        return fused_single(x, slots.weight_ext, slots.bias_ext, slots.lora_b, slots.slice_offsets, meta.slot_ids_list[0])
    y = base_linear(x, weight, bias, packed)  # [num_tokens, out_total]
    apply_delta(plan, y, x, lora_a, slots.lora_b, slots.slice_offsets, meta, slots.rows)
    return y


def lora_delta_cpu(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slots, num_slices, r_max, in]
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max]
    slice_offsets: list[int],
    meta: LoraMeta,
    rows: RowTables | None = None,
    strategy: DeltaStrategy | None = None,  # None: the cost model's choice; tests and benchmarks force one
    figures: CostFigures | None = None,  # the cost model's per-machine figures; None: "grouped"
) -> None:
    """y += every token's LoRA delta, by the cheapest delta strategy under the cost model."""
    if strategy is None:
        shape = LinearShape(y.shape[1], lora_a.shape[1], lora_a.shape[2], lora_a.shape[3], lora_a.element_size())
        slot_minor_b = lora_b.transpose(0, 1).is_contiguous()
        strategy = choose_delta(shape, meta, rows is not None, slot_minor_b, figures)
    apply_delta(strategy, y, x, lora_a, lora_b, slice_offsets, meta, rows)


def apply_delta(
    strategy: DeltaStrategy,
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slots, num_slices, r_max, in]
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max]; slot-minor for dense / compact
    slice_offsets: list[int],
    meta: LoraMeta,
    rows: RowTables | None = None,  # required for "rows"
) -> None:
    """y += every token's LoRA delta by the named strategy (same math for each)."""
    if strategy == "rows":
        assert rows is not None, "the rows strategy needs the row tables"
        delta_rows(y, x, rows, slice_offsets, meta)
    elif strategy == "dense":
        delta_dense(y, x, lora_a, lora_b, slice_offsets, meta)
    elif strategy == "compact":
        delta_compact(y, x, lora_a, lora_b, slice_offsets, meta)
    else:
        delta_grouped(y, x, lora_a, lora_b, slice_offsets, meta)


def fused_single(
    x: torch.Tensor,  # [num_tokens, in]
    weight_ext: torch.Tensor,  # [out_total + num_slots * num_slices * r_max, in]: W, then every slot's A rows
    bias_ext: torch.Tensor | None,  # [out_total + ...], zeros under the A rows
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max]
    slice_offsets: list[int],
    slot: int,  # the one slot every token uses
) -> torch.Tensor:
    """y = x W^T + b + x A[slot, i]^T B[slot, slice i]^T per slice, for a step whose tokens all use `slot`.
    One matmul x @ weight_ext[:out_total + (slot + 1) * rows_per_slot]^T gives the base output and the
    shrink h together (slots below `slot` ride along unused). Returns a [num_tokens, out_total] view."""
    out_total, num_slices, r_max = slice_offsets[-1], len(slice_offsets) - 1, lora_b.shape[2]
    per_slot = num_slices * r_max
    n = out_total + (slot + 1) * per_slot
    y_ext = F.linear(x, weight_ext[:n], None if bias_ext is None else bias_ext[:n])  # [num_tokens, n]
    y = y_ext[:, :out_total]
    h = y_ext[:, n - per_slot :]  # [num_tokens, num_slices * r_max]
    bt = lora_b[slot].T  # [r_max, out_total]
    for j, (c0, c1) in enumerate(zip(slice_offsets, slice_offsets[1:], strict=False)):
        y[:, c0:c1].addmm_(h[:, j * r_max : (j + 1) * r_max], bt[:, c0:c1])
    return y


def _shrink_one(x: torch.Tensor, a: torch.Tensor, rank: int) -> torch.Tensor:
    """x [n, in] @ a[:, :rank]^T for every slice of one slot's a [num_slices, r_max, in] -> [n, num_slices * rank]."""
    num_slices, r_max, in_f = a.shape
    rank = true_rank(rank, r_max)
    flat = a.view(num_slices * r_max, in_f) if rank == r_max else a[:, :rank].reshape(num_slices * rank, in_f)
    return F.linear(x, flat)


def delta_grouped(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slots, num_slices, r_max, in]
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max]
    slice_offsets: list[int],
    meta: LoraMeta,
) -> None:
    """y += delta, one slot at a time: gather the slot's tokens, h = x_s A[s]^T (true rank only), then
    y_s[:, slice i] += h_i B[s, slice i]^T; scatter back. One adapter covering the whole step needs no
    gather / scatter."""
    slices = list(zip(slice_offsets, slice_offsets[1:], strict=False))
    if meta.is_single_full:
        slot, rank = meta.slot_ids_list[0], meta.slot_ranks_list[0]
        h = _shrink_one(x, lora_a[slot], rank)  # [num_tokens, num_slices * rank]
        rank = h.shape[1] // len(slices)
        for j, (lo, hi) in enumerate(slices):
            y[:, lo:hi].addmm_(h[:, j * rank : (j + 1) * rank], lora_b[slot, lo:hi, :rank].T)
        return
    xs = x.index_select(0, meta.sorted_idx)  # [num_lora_tokens, in]
    delta = torch.zeros(xs.shape[0], y.shape[1], dtype=y.dtype, device=y.device)  # [num_lora_tokens, out_total]
    for i, slot in enumerate(meta.slot_ids_list):
        a, b = meta.seg_starts_list[i], meta.seg_starts_list[i + 1]
        h = _shrink_one(xs[a:b], lora_a[slot], meta.slot_ranks_list[i])  # [seg_len, num_slices * rank]
        rank = h.shape[1] // len(slices)
        for j, (lo, hi) in enumerate(slices):
            delta[a:b, lo:hi].addmm_(h[:, j * rank : (j + 1) * rank], lora_b[slot, lo:hi, :rank].T)
    y.index_add_(0, meta.sorted_idx, delta)


def delta_dense(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slots, num_slices, r_max, in]
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max], a view of a slot-minor buffer
    slice_offsets: list[int],
    meta: LoraMeta,
) -> None:
    """y += delta over the active slot range lo..hi: h = x A[lo..hi]^T for every token and slot (one
    matmul), zeroed where the slot is not the token's own, then y[:, slice i] += h_i B[lo..hi, slice i]^T
    (one matmul per slice; slot-minor B makes the range one 2-D matrix)."""
    num_slices, r_max, in_f = lora_a.shape[1], lora_a.shape[2], lora_a.shape[3]
    lo = meta.slot_ids_list[0]
    span = meta.slot_ids_list[-1] - lo + 1
    a_range = lora_a[lo : lo + span].view(span * num_slices * r_max, in_f)  # contiguous slots lo..hi
    h = F.linear(x, a_range).view(x.shape[0], span, num_slices, r_max)
    b_range = lora_b.transpose(0, 1)[:, lo : lo + span]  # [out_total, span, r_max]
    _dense_expand(y, h, b_range, meta.slot_onehot(lo, span, h.dtype), slice_offsets)


def delta_compact(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    lora_a: torch.Tensor,  # [num_slots, num_slices, r_max, in]
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max], a view of a slot-minor buffer
    slice_offsets: list[int],
    meta: LoraMeta,
) -> None:
    """delta_dense over only the step's active slots (A and B copied side by side), not the whole range."""
    num_slices, r_max, in_f = lora_a.shape[1], lora_a.shape[2], lora_a.shape[3]
    k = meta.num_active
    a_act = lora_a.index_select(0, meta.slot_ids).view(k * num_slices * r_max, in_f)
    h = F.linear(x, a_act).view(x.shape[0], k, num_slices, r_max)
    b_act = lora_b.transpose(0, 1).index_select(1, meta.slot_ids)  # [out_total, k, r_max]
    _dense_expand(y, h, b_act, meta.active_onehot(h.dtype), slice_offsets)


def _dense_expand(
    y: torch.Tensor,  # [num_tokens, out_total]
    h: torch.Tensor,  # [num_tokens, k, num_slices, r_max]: every token shrunk by each selected slot
    b_sel: torch.Tensor,  # [out_total, k, r_max]
    onehot: torch.Tensor,  # [num_tokens, k]: 1 where the selected slot is the token's own
    slice_offsets: list[int],
) -> None:
    """y += each token's own slot's expand, for every selected slot at once: one matmul per slice."""
    t, k, _, r_max = h.shape
    h = h * onehot[:, :, None, None]  # keep each token's own slot only
    for j, (c0, c1) in enumerate(zip(slice_offsets, slice_offsets[1:], strict=False)):
        b = b_sel[c0:c1].reshape(c1 - c0, k * r_max)  # a view for a slot range: rows stride num_slots * r_max
        y[:, c0:c1].addmm_(h[:, :, j].reshape(t, k * r_max), b.T)


class _RowIndex:
    """Index arrays of the rows strategy for one step and shape. Bags follow token order; a base-only
    token gets empty bags (embedding_bag's sum of nothing: a zero row).

    Running example: token_slot = [2, -1, 0], in_f = 3, num_slices = 2, r_max = 2, ranks: slot 0 -> 1, slot 2 -> 2
      a_idx = [6, 7, 8, 0, 1, 2]   rows s * in_f + i of the A table, token by token
      a_off = [0, 3, 3]            token 1 has an empty bag
      b_idx = [4, 5, 0]            rows s * r_max + k of each slice's B table, k < the slot's rank
      b_off = [0, 2, 2]
      h_idx = [[0, 1, 8], [2, 3, 10]]   per slice j: where each b_idx weight sits in h.view(-1) (h [3, 2 * 2])
      lora_rows = None             token indices with a slot, or None when every token has one
    """

    def __init__(self, meta: LoraMeta, in_f: int, num_slices: int, r_max: int) -> None:
        slot = meta.token_slot  # [num_tokens]
        dev = slot.device
        is_lora = slot >= 0
        rows = is_lora.nonzero().view(-1)  # [num_lora_tokens] token indices, in token order
        slot_l = slot.index_select(0, rows)
        rank_of = torch.zeros(meta.slot_ids_list[-1] + 1, dtype=torch.int64)
        rank_of[meta.slot_ids_list] = torch.tensor([true_rank(r, r_max) for r in meta.slot_ranks_list])
        rank_l = rank_of.to(dev).index_select(0, slot_l)  # [num_lora_tokens]

        def exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(counts, 0) - counts

        self.a_idx = (slot_l[:, None] * in_f + torch.arange(in_f, device=dev)).view(-1)
        self.a_off = exclusive_cumsum(is_lora.to(torch.int64) * in_f)
        k = torch.arange(r_max, device=dev)
        keep = (k[None, :] < rank_l[:, None]).view(-1)  # [num_lora_tokens * r_max]
        self.b_idx = (slot_l[:, None] * r_max + k).view(-1)[keep]
        self.b_off = exclusive_cumsum(torch.zeros_like(slot).index_put_((rows,), rank_l))
        h_idx0 = (rows[:, None] * (num_slices * r_max) + k).view(-1)[keep]
        self.h_idx = [h_idx0 + j * r_max for j in range(num_slices)]
        self.lora_rows = None if meta.num_lora_tokens == meta.num_tokens else rows


def delta_rows(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    rows: RowTables,  # a: [num_slots * in, num_slices * r_max]; b: per slice [num_slots * r_max, width]
    slice_offsets: list[int],
    meta: LoraMeta,
) -> None:
    """y += delta with each token's own rows read in place: h[t] = sum_i x[t, i] * A_table[s * in + i]
    (one embedding_bag weighted by x), then per slice y[t, slice] += sum_k h[t, slice, k] *
    B_table[s * r_max + k] over the slot's true rank (one embedding_bag weighted by h)."""
    num_slices = len(slice_offsets) - 1
    in_f = x.shape[1]
    r_max = rows.a.shape[1] // num_slices
    key = ("rows", in_f, num_slices, r_max)
    idx = meta.cache.get(key)
    if idx is None:
        idx = meta.cache[key] = _RowIndex(meta, in_f, num_slices, r_max)
    xs = x if idx.lora_rows is None else x.index_select(0, idx.lora_rows)  # the shrink's weights
    h = F.embedding_bag(idx.a_idx, rows.a, idx.a_off, mode="sum", per_sample_weights=xs.reshape(-1))
    h_flat = h.view(-1)  # h: [num_tokens, num_slices * r_max]
    for j, (c0, c1) in enumerate(zip(slice_offsets, slice_offsets[1:], strict=False)):
        weights = h_flat.index_select(0, idx.h_idx[j])
        y[:, c0:c1] += F.embedding_bag(idx.b_idx, rows.b[j], idx.b_off, mode="sum", per_sample_weights=weights)
