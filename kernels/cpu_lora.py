"""The CPU path of a LoRA-aware linear: y = x W^T + b + every token's own LoRA delta, in x's dtype.

Math (reference.py holds it as a loop): for token t with slot s = token_slot[t] >= 0 and output slice i
at columns off[i]:off[i + 1],
    y[t, off[i]:off[i + 1]] += (x[t] @ A[s, i].T) @ B[s, off[i]:off[i + 1]].T
Layouts: lora_slots.py. Each strategy below computes that same sum exactly; cpu_plan.py picks the
cheapest per step and shape:
    fused-single  one adapter covers the whole step: x @ [W; A rows]^T in one matmul, then the expand
                  (W not packed: float32)
    merged        every token of the step uses one adapter: x @ (W + B A)^T through a oneDNN-packed merged
                  copy made once that adapter has held FUSE_AFTER_STEPS steps: no LoRA call at all
    fused-packed  the shrink rides in the packed base matmul: x @ [W; A_stack]^T through a oneDNN-packed
                  copy made for the step's active set once it has held FUSE_AFTER_STEPS steps (steady
                  decode), then the mask of a mixed step and one expand: one small call per linear
    grouped       a matmul pair per active adapter (gather its tokens, shrink, expand, scatter back)
    stacked       every token times every active adapter at once: one shrink matmul over the adapters'
                  stacked A, a mask keeping each token's own adapter, one expand matmul: 2-3 calls per
                  linear whatever the number of adapters and slices (decode and mixed steps)
    split         a prompt chunk next to decodes of other adapters: the long segments a pair each (as
                  grouped), the other tokens one stacked pass (as stacked), so the chunk's many tokens
                  are not multiplied by every other adapter
    rows          embedding_bag reads each token's own A and B rows in place from the row tables: only
                  the bytes of the adapters used (decode steps: many adapters, few tokens each). Where the
                  linear's adapters are of lower rank than the slots, A is read from a compact copy of
                  the active slots' A rows at their largest true rank (cached per active set, as the
                  stacked copy; made when the bytes it saves pay for it): the slots' table holds r_max
                  columns per slice, mostly unread padding then

The stacked copy (StackedAB), shared by grouped and stacked: the step's active adapters' A rows and B
columns at their TRUE rank, for only the slices each adapter targets, side by side (slot after slot), and
B block-diagonal (slice i's outputs see only slice i's columns), so one matmul pair covers every slice
of every adapter: bytes and multiply-adds proportional to what the adapters really hold, no rank padding.
A LoraSlots keeps the copies of its latest active sets (stack_cache, keyed by the slots and their write
versions): in steady decode, with the same adapters step after step, no copy is made at all. An adapter
that does not target this linear (true rank 0 in every slice) costs nothing here.

The per-set copies (16-bit CPU with packed base weights and a cost model); LoraSlots.fused keeps one
of them (memory: one more copy of the linear's packed weights while it lives):
- MergedPacked, for a set of one adapter whose steps hold only its tokens (a tenant that has the server to
  itself, steady decode or prefill): W + B A (per slice, summed in float32, rounded once to W's dtype),
  packed. A step then costs what a base-only step costs. The adapter's delta is then rounded into the
  weights (as PEFT's merge_and_unload does): within bf16 rounding of the unmerged sum, not bit-equal to it.
  A step of the same set with other tokens (base-only rows) does not use it. Made only while the
  machine's available memory keeps MERGE_MEMORY_HEADROOM after it (else the fused copy serves).
- FusedPacked, for sets of up to FUSE_MAX_ADAPTERS adapters: W with the stacked A rows under it, packed.
Either is made when the same active set (same slots, same write versions) has served FUSE_AFTER_STEPS
steps in a row, the cost model prices it below the plan it replaces, and those steps' savings would have
repaid the time the linear's previous copy took to make (so sets that change every few steps do not
repack all the time); at most COPY_STEP_SECONDS of copies are made per step (the linears of later layers
wait for the next steps, so one step's latency does not take the whole model's copies); a slot rewrite or
a new pack of W (LoraLinear.pack) retires it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.nn.functional as F

from .cpu_linear import base_linear, pack_weight, packed_linear
from .cpu_plan import (
    FUSE_MAX_ADAPTERS,
    CostFigures,
    DeltaStrategy,
    LinearShape,
    Plan,
    choose_delta,
    choose_plan,
    fused_packed_cost,
    plan_cost,
    rows_width,
    split_big,
    true_rank,
)
from .lora_slots import LoraSlots, RowTables
from .meta import LoraMeta

FUSE_AFTER_STEPS = 4  # steps in a row with one active set before its fused packed copy may be made (the first one; later ones also wait until the held steps would have repaid the previous copy's time)
COPY_STEP_SECONDS = 0.01  # per step at most this much time goes into making fused / merged copies (the rest wait for the next steps)
MERGE_MEMORY_HEADROOM = 512 << 20  # a merged copy is made only while this much memory stays available after it
STACK_CACHE_ENTRIES = 2  # active sets kept per linear in stack_cache and in rows_cache (a decode set and a prefill set alternating); memory: at most twice the bytes of the slots they copy


class StackedAB(NamedTuple):
    """The active adapters of one linear side by side (see the module docstring). Columns k of slot
    slots[j] are starts[j]:starts[j + 1]; within them, slice after slice, each at its true rank."""

    a: torch.Tensor  # [K, in]: A rows
    bt: torch.Tensor  # [K, out_total]: B^T, zero outside each column's own slice
    col_slot: torch.Tensor  # [K] int64: the slot of each column
    slots: tuple[int, ...]  # the stacked slots (active, rank > 0 here), ascending
    starts: list[int]  # [len(slots) + 1]


class Active(NamedTuple):
    """The step's adapters as this linear sees them: ranks[j] = true rank of slots[j] per slice."""

    slots: tuple[int, ...]
    ranks: tuple[tuple[int, ...], ...]

    def ks(self, meta: LoraMeta) -> tuple[int, ...]:
        """Stacked columns of each of meta's active slots (0: nothing here), aligned with slot_ids_list."""
        k_of = {s: sum(r) for s, r in zip(self.slots, self.ranks, strict=True)}
        return tuple(k_of.get(s, 0) for s in meta.slot_ids_list)


def active_here(meta: LoraMeta, slice_ranks: list[list[int]] | None, num_slices: int, r_max: int) -> Active:
    """The step's active slots that hold something for this linear, with their per-slice true ranks.
    slice_ranks (LoraSlots.slice_ranks) None: every slice at the slot's true rank from the meta."""
    slots, ranks = [], []
    for s, r in zip(meta.slot_ids_list, meta.slot_ranks_list, strict=True):
        per = tuple(slice_ranks[s]) if slice_ranks is not None else (true_rank(r, r_max),) * num_slices
        if any(per):
            slots.append(s)
            ranks.append(per)
    return Active(tuple(slots), tuple(ranks))


def build_stack(
    lora_a: torch.Tensor,  # [num_slots, num_slices, r_max, in]
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max]
    slice_offsets: list[int],
    active: Active,
) -> StackedAB:
    """Copy the active slots' true-rank A rows and B columns side by side (two index_selects and a mask)."""
    num_slots, num_slices, r_max, in_f = lora_a.shape
    out_total = lora_b.shape[1]
    a_idx: list[int] = []
    b_idx: list[int] = []
    col_slice: list[int] = []
    col_slot: list[int] = []
    starts = [0]
    for s, ranks in zip(active.slots, active.ranks, strict=True):
        for i, r in enumerate(ranks):
            first = (s * num_slices + i) * r_max
            a_idx.extend(range(first, first + r))
            b_idx.extend(range(s * r_max, s * r_max + r))
            col_slice.extend([i] * r)
            col_slot.extend([s] * r)
        starts.append(len(a_idx))
    dev = lora_a.device
    a = lora_a.reshape(num_slots * num_slices * r_max, in_f).index_select(0, torch.tensor(a_idx, device=dev))
    b_rows = lora_b.permute(0, 2, 1).reshape(num_slots * r_max, out_total)  # row s * r_max + k = B[s, :, k]
    bt = b_rows.index_select(0, torch.tensor(b_idx, device=dev))  # [K, out_total]
    row_slice = torch.repeat_interleave(
        torch.arange(num_slices, device=dev), torch.tensor(slice_offsets[1:], device=dev) - torch.tensor(slice_offsets[:-1], device=dev)
    )
    bt.mul_((torch.tensor(col_slice, device=dev)[:, None] == row_slice[None, :]).to(bt.dtype))  # block-diagonal
    return StackedAB(a, bt, torch.tensor(col_slot, dtype=torch.int64, device=dev), active.slots, starts)


class FusedPacked(NamedTuple):
    """[W; stack.a] packed for one active set (see the module docstring)."""

    key: tuple  # _cache_key of the active set it was made for
    packed: torch.Tensor  # pack_weight([W; stack.a]): [out_total + K, in]
    bias: torch.Tensor | None  # [out_total + K], zeros under the A rows
    stack: StackedAB


class MergedPacked(NamedTuple):
    """pack_weight(W + B A) for a set of one adapter (see the module docstring)."""

    key: tuple  # _cache_key of the set it was made for: ((slot,), (version,))
    packed: torch.Tensor  # [out_total, in]


def memory_allows(nbytes: int) -> bool:
    """Whether one more copy of `nbytes` leaves MERGE_MEMORY_HEADROOM of the machine's available memory
    (Linux MemAvailable; True where it cannot be read)."""
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024 >= nbytes + MERGE_MEMORY_HEADROOM
    except (OSError, ValueError, IndexError):
        pass
    return True


def _cache_key(slots: LoraSlots, active: Active) -> tuple:
    return (active.slots, tuple(slots.versions[s] for s in active.slots))


T = TypeVar("T")


def _cached(cache: dict, key: tuple, make: Callable[[], T]) -> T:
    """cache[key], or make() kept there; at most STACK_CACHE_ENTRIES entries, least recently used
    dropped first (the most recently used is last)."""
    value = cache.pop(key, None)
    if value is None:
        value = make()
        while len(cache) >= STACK_CACHE_ENTRIES:
            cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def stack_of(slots: LoraSlots, active: Active) -> StackedAB:
    """The slots' stacked copy for this active set, from its cache or built (and cached) now."""
    return _cached(
        slots.stack_cache,
        _cache_key(slots, active),
        lambda: build_stack(slots.lora_a, slots.lora_b, slots.slice_offsets, active),
    )


def lora_linear_cpu(
    x: torch.Tensor,  # [num_tokens, in]
    weight: torch.Tensor,  # [out_total, in]
    bias: torch.Tensor | None,  # [out_total]
    packed: torch.Tensor | None,  # W packed by cpu_linear.pack_weight, or None
    slots: LoraSlots,
    meta: LoraMeta,
    plan: Plan | None = None,  # None: the cost model's choice; tests and benchmarks force one
    figures: CostFigures | None = None,  # None: slots.figures (None there too: the safe default plan)
) -> torch.Tensor:
    """y = x W^T + b + every token's LoRA delta -> [num_tokens, out_total] (possibly a strided view).
    The cost model prices with slots.figures (cpu_calibrate.py); without them the plan is "grouped"."""
    lora_a = slots.lora_a
    num_slices, r_max = lora_a.shape[1], lora_a.shape[2]
    active = active_here(meta, slots.slice_ranks, num_slices, r_max)
    if not active.slots:  # no adapter of the step targets this linear
        return base_linear(x, weight, bias, packed)
    key = _cache_key(slots, active)
    single = meta.is_single_full and len(active.slots) == 1
    copy = slots.fused if slots.fused is not None and slots.fused.key == key else None
    if plan is None and single and isinstance(copy, MergedPacked):  # first: this path is the base matmul's cost
        return packed_linear(x, copy.packed, bias)
    shape = LinearShape(slots.out_total, num_slices, r_max, lora_a.shape[3], x.element_size())
    fig = figures if figures is not None else slots.figures
    ks = active.ks(meta)
    if plan is None:
        cached = key in slots.stack_cache
        fused = isinstance(copy, FusedPacked)
        # fused-single gives up the packed base matmul, which costs more than it saves: only unpacked W;
        # packed W fuses through the fused packed copy (fused-packed)
        plan = choose_plan(
            x.shape[0], shape, meta, ks, cached, slots.rows is not None, can_fuse=packed is None,
            fused_packed=fused, fig=fig,
        )  # fmt: skip
        # a set's copy is never replaced by another copy of the same set (steps with and without base-only
        # rows would trade a merged and a fused copy back and forth)
        merge = single and slots.merge
        can_make = copy is None and packed is not None and fig is not None and (merge or len(active.slots) <= FUSE_MAX_ADAPTERS)
        held = _steps_held(slots, key, meta) if can_make else 0
        if held >= FUSE_AFTER_STEPS and fig is not None and meta.cache.get("copy-seconds", 0.0) < COPY_STEP_SECONDS:
            now = plan_cost(plan, x.shape[0], shape, meta, ks, cached, slots.rows is not None, fig)
            fused_saving = now - fused_packed_cost(x.shape[0], shape, meta, ks, fig)
            # per step like this one; merged costs nothing beyond the base matmul
            saving = now if merge else fused_saving
            # worth it when the steps the set has held would have repaid the last copy this linear made
            if saving > 0 and held * saving >= slots.fuse_seconds:
                if merge and memory_allows(weight.numel() * weight.element_size()):
                    make_merged(slots, weight, key, active, meta)
                    return packed_linear(x, slots.fused.packed, bias)
                # (no room for a merged copy: the fused copy, W plus a few A rows, where it pays)
                if fused_saving > 0 and len(active.slots) <= FUSE_MAX_ADAPTERS and make_fused(slots, weight, bias, key, active, meta):
                    plan = "fused-packed"
    if plan == "merged":
        assert single and isinstance(slots.fused, MergedPacked) and slots.fused.key == key, "merged needs the merged copy of this adapter"
        return packed_linear(x, slots.fused.packed, bias)
    if plan == "fused-packed":
        return fused_packed(x, slots, key, meta)
    if plan == "fused-single":
        assert meta.is_single_full, "fused-single needs one slot covering the whole step"
        slot = meta.slot_ids_list[0]
        ranks = list(active.ranks[active.slots.index(slot)])
        return fused_single(x, slots.weight_ext, slots.bias_ext, slots.lora_b, slots.slice_offsets, slot, ranks)
    y = base_linear(x, weight, bias, packed)  # [num_tokens, out_total]
    if plan == "rows":
        assert slots.rows is not None, "the rows strategy needs the row tables"
        rows_a = slots.rows.a
        width_here = max(max(ranks) for ranks in active.ranks)  # this linear's largest true rank in the step
        rows_key = (key, width_here)  # its compact A table's
        width = rows_width(shape, meta, len(active.slots), rows_key in slots.rows_cache, fig, width_here)
        compact = None
        if width < r_max:
            compact = _cached(
                slots.rows_cache,
                rows_key,
                lambda: compact_rows(rows_a, active.slots, lora_a.shape[3], num_slices, r_max, width),
            )
        delta_rows(y, x, slots.rows, slots.slice_offsets, meta, compact)
    else:
        big = split_big(shape, meta, ks, fig) if plan == "split" else ()
        apply_stacked(plan, y, x, stack_of(slots, active), meta, big)
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
    """y += every token's LoRA delta from plain slot tensors (every slice at the slot's true rank from the
    meta; nothing is cached between calls)."""
    num_slices, r_max = lora_a.shape[1], lora_a.shape[2]
    active = active_here(meta, None, num_slices, r_max)
    if not active.slots:
        return
    shape = LinearShape(y.shape[1], num_slices, r_max, lora_a.shape[3], lora_a.element_size())
    if strategy is None:
        strategy = choose_delta(shape, meta, active.ks(meta), False, rows is not None, figures)
    if strategy == "rows":
        assert rows is not None, "the rows strategy needs the row tables"
        width = rows_width(shape, meta, len(active.slots), False, figures, max(max(r) for r in active.ranks))
        compact = None if width == r_max else compact_rows(rows.a, active.slots, lora_a.shape[3], num_slices, r_max, width)
        delta_rows(y, x, rows, slice_offsets, meta, compact)
    else:
        big = split_big(shape, meta, active.ks(meta), figures) if strategy == "split" else ()
        apply_stacked(strategy, y, x, build_stack(lora_a, lora_b, slice_offsets, active), meta, big)


def apply_stacked(
    strategy: DeltaStrategy,
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    stack: StackedAB,
    meta: LoraMeta,
    big: tuple[int, ...] = (),  # "split": the slots given a pair of their own (cpu_plan.split_big)
) -> None:
    """y += every token's LoRA delta from the stacked copy, by "grouped", "stacked" or "split"."""
    if strategy == "stacked":
        delta_stacked(y, x, stack, meta)
    elif strategy == "grouped":
        delta_grouped(y, x, stack, meta)
    elif strategy == "split":
        delta_split(y, x, stack, meta, big)
    else:
        raise ValueError(f"not a stacked-copy strategy: {strategy!r}")


def fused_single(
    x: torch.Tensor,  # [num_tokens, in]
    weight_ext: torch.Tensor,  # [out_total + num_slots * num_slices * r_max, in]: W, then every slot's A rows
    bias_ext: torch.Tensor | None,  # [out_total + ...], zeros under the A rows
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max]
    slice_offsets: list[int],
    slot: int,  # the one slot every token uses
    ranks: list[int],  # its slices' true ranks
) -> torch.Tensor:
    """y = x W^T + b + x A[slot, i]^T B[slot, slice i]^T per slice, for a step whose tokens all use `slot`.
    One matmul x @ weight_ext[:out_total + (slot + 1) * rows_per_slot]^T gives the base output and the
    shrink h together (slots below `slot` ride along unused); the expand reads each slice's true rank
    only (above it the slot may hold an earlier adapter's values: LoraSlotStack.write). Returns a
    [num_tokens, out_total] view."""
    out_total, num_slices, r_max = slice_offsets[-1], len(slice_offsets) - 1, lora_b.shape[2]
    per_slot = num_slices * r_max
    n = out_total + (slot + 1) * per_slot
    y_ext = F.linear(x, weight_ext[:n], None if bias_ext is None else bias_ext[:n])  # [num_tokens, n]
    y = y_ext[:, :out_total]
    h = y_ext[:, n - per_slot :]  # [num_tokens, num_slices * r_max]
    bt = lora_b[slot].T  # [r_max, out_total]
    for j, (c0, c1) in enumerate(zip(slice_offsets, slice_offsets[1:], strict=False)):
        r = ranks[j]
        if r:
            y[:, c0:c1].addmm_(h[:, j * r_max : j * r_max + r], bt[:r, c0:c1])
    return y


def delta_stacked(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    stack: StackedAB,
    meta: LoraMeta,
) -> None:
    """y += delta for every token and every stacked adapter at once: h = x A_stack^T (one matmul), zeroed
    where the column's adapter is not the token's own, then y += h B_stack (one matmul)."""
    expand_own(y, F.linear(x, stack.a), stack, meta)


def expand_own(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    h: torch.Tensor,  # [num_tokens, K]: every token's shrink by every stacked adapter, overwritten
    stack: StackedAB,
    meta: LoraMeta,
) -> None:
    """y += h B_stack, h first zeroed where the column's adapter is not the token's own (unless one
    adapter covers the whole step)."""
    if not (meta.is_single_full and len(stack.slots) == 1):
        h.mul_(stack_mask(meta, stack, h.dtype))
    y.addmm_(h, stack.bt)


def stack_mask(meta: LoraMeta, stack: StackedAB, dtype: torch.dtype) -> torch.Tensor:
    """[num_tokens, K]: 1 where column k belongs to the token's own adapter, else 0 (cached on meta)."""
    key = ("stack-mask", stack.slots, tuple(stack.starts), dtype)  # they fix col_slot
    mask = meta.cache.get(key)
    if mask is None:
        mask = meta.cache[key] = (meta.token_slot[:, None] == stack.col_slot[None, :]).to(dtype)
    return mask


def _steps_held(slots: LoraSlots, key: tuple, meta: LoraMeta) -> int:
    """The steps in a row (this one included) this linear has served the active set `key`; counted once
    per step (meta is the step's)."""
    mark = ("steady", id(slots))
    if mark not in meta.cache:
        meta.cache[mark] = True
        last, steps = slots.steady
        slots.steady = (key, steps + 1 if last == key else 1)
    return slots.steady[1] if slots.steady[0] == key else 0


def make_fused(
    slots: LoraSlots, weight: torch.Tensor, bias: torch.Tensor | None, key: tuple, active: Active, meta: LoraMeta | None = None
) -> bool:
    """Make (and keep on slots.fused, replacing the previous one) the fused packed copy of this active
    set; the seconds it took go to slots.fuse_seconds (what the next copy must repay). False where
    packing does not apply to its shape (then this set is not tried again)."""
    start = time.perf_counter()
    stack = stack_of(slots, active)
    slots.fused = None  # the old copy goes before the new one is made
    packed = pack_weight(torch.cat([weight, stack.a]))
    if packed is None:
        slots.steady = (key, -(1 << 62))
        return False
    bias_ext = None if bias is None else torch.cat([bias, bias.new_zeros(stack.a.shape[0])])
    slots.fused = FusedPacked(key, packed, bias_ext, stack)
    _spent(slots, start, meta)
    return True


def make_merged(slots: LoraSlots, weight: torch.Tensor, key: tuple, active: Active, meta: LoraMeta | None = None) -> None:
    """Make (and keep on slots.fused, replacing the previous copy) the merged copy of a set of one adapter:
    W + B A per slice at the slot's true ranks, summed in float32 and rounded once, then packed (16-bit
    CPU: the caller checked that W packs). The seconds it took go to slots.fuse_seconds."""
    start = time.perf_counter()
    slots.fused = None  # the old copy goes before the new one is made
    (slot,), (ranks,) = active.slots, active.ranks
    merged = weight.float()  # [out_total, in]
    for i, r in enumerate(ranks):
        if r:
            c0, c1 = slots.slice_offsets[i], slots.slice_offsets[i + 1]
            merged[c0:c1].addmm_(slots.lora_b[slot, c0:c1, :r].float(), slots.lora_a[slot, i, :r].float())
    packed = pack_weight(merged.to(weight.dtype))
    assert packed is not None, "merged copies are made only where W packs"
    slots.fused = MergedPacked(key, packed)
    _spent(slots, start, meta)


def _spent(slots: LoraSlots, start: float, meta: LoraMeta | None) -> None:
    """Book the seconds since `start` as this linear's last copy time and against the step's copy budget."""
    seconds = time.perf_counter() - start
    slots.fuse_seconds = seconds
    if meta is not None:
        meta.cache["copy-seconds"] = meta.cache.get("copy-seconds", 0.0) + seconds


def fused_packed(
    x: torch.Tensor,  # [num_tokens, in]
    slots: LoraSlots,
    key: tuple,  # the step's active set: slots.fused must be made for it
    meta: LoraMeta,
) -> torch.Tensor:
    """y = x W^T + b + delta through the fused packed copy: [y | h] = x [W; A_stack]^T + [b | 0] in one
    packed matmul, h masked to each token's own adapter (mixed steps), y += h B_stack. Returns a
    [num_tokens, out_total] view."""
    fused = slots.fused
    assert fused is not None and fused.key == key, "fused-packed needs the fused copy of this active set"
    y_ext = packed_linear(x, fused.packed, fused.bias)  # [num_tokens, out_total + K]
    y = y_ext[:, : slots.out_total]
    expand_own(y, y_ext[:, slots.out_total :], fused.stack, meta)
    return y


def delta_split(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    stack: StackedAB,
    meta: LoraMeta,
    big: tuple[int, ...],  # slots given a matmul pair of their own
) -> None:
    """y += delta: the tokens of each `big` slot by a pair of their own (gathered, as grouped), every other
    adapter token by one stacked pass over them (gathered, masked, as stacked)."""
    position = {s: j for j, s in enumerate(stack.slots)}
    key = ("split-rows", big, stack.slots)
    parts = meta.cache.get(key)
    if parts is None:
        own, small = [], []
        for i, slot in enumerate(meta.slot_ids_list):
            if slot not in position:
                continue
            rows = meta.sorted_idx[meta.seg_starts_list[i] : meta.seg_starts_list[i + 1]]
            if slot in big:
                own.append((position[slot], rows))
            else:
                small.append(rows)
        small_rows = torch.cat(small) if small else None
        mask = None
        if small_rows is not None:
            mask = (meta.token_slot.index_select(0, small_rows)[:, None] == stack.col_slot[None, :]).to(x.dtype)
        parts = meta.cache[key] = (own, small_rows, mask)
    own, small_rows, mask = parts
    if small_rows is not None:
        h = F.linear(x.index_select(0, small_rows), stack.a)  # [n_small, K]
        h.mul_(mask)
        y.index_add_(0, small_rows, torch.mm(h, stack.bt))
    for j, rows in own:
        c0, c1 = stack.starts[j], stack.starts[j + 1]
        h = F.linear(x.index_select(0, rows), stack.a[c0:c1])
        y.index_add_(0, rows, torch.mm(h, stack.bt[c0:c1]))


def delta_grouped(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    stack: StackedAB,
    meta: LoraMeta,
) -> None:
    """y += delta, one adapter at a time: gather its tokens, h = x_s A_s^T, delta_s = h B_s (every slice of
    the adapter in that one pair), scatter back. One adapter covering the whole step needs no gather."""
    if meta.is_single_full and len(stack.slots) == 1:
        y.addmm_(F.linear(x, stack.a), stack.bt)
        return
    xs = x.index_select(0, meta.sorted_idx)  # [num_lora_tokens, in]
    delta = torch.zeros(xs.shape[0], y.shape[1], dtype=y.dtype, device=y.device)  # [num_lora_tokens, out_total]
    position = {s: j for j, s in enumerate(stack.slots)}
    for i, slot in enumerate(meta.slot_ids_list):
        j = position.get(slot)
        if j is None:  # nothing of this adapter here: its tokens keep zero rows
            continue
        a, b = meta.seg_starts_list[i], meta.seg_starts_list[i + 1]
        c0, c1 = stack.starts[j], stack.starts[j + 1]
        h = F.linear(xs[a:b], stack.a[c0:c1])  # [seg_len, k_s]
        delta[a:b].addmm_(h, stack.bt[c0:c1])
    y.index_add_(0, meta.sorted_idx, delta)


class CompactRows(NamedTuple):
    """The rows strategy's A table for one active set: the active slots' A rows at `width` columns per
    slice (their true ranks; the slots' own table has r_max), block j = slots[j] (see compact_rows)."""

    a: torch.Tensor  # [len(slots) * in, num_slices * width]
    slots: tuple[int, ...]
    width: int


def compact_rows(
    rows_a: torch.Tensor, slots: tuple[int, ...], in_f: int, num_slices: int, r_max: int, width: int
) -> CompactRows:
    """One gathering copy of `slots`' rows of the A row table (rows_a: [num_slots * in, num_slices * r_max])
    keeping the first `width` columns of each slice (above a slice's true rank, its columns may hold an
    earlier adapter's values: the B row table is zero there, up to the adapter's rank)."""
    table = rows_a.view(-1, in_f, num_slices, r_max)[:, :, :, :width]
    picked = table.index_select(0, torch.tensor(slots, device=rows_a.device))  # [len(slots), in, slices, width]
    return CompactRows(picked.view(len(slots) * in_f, num_slices * width), slots, width)


class _RowIndex:
    """Index arrays of the rows strategy for one step and shape. Bags follow token order; a base-only
    token (or, with a compact A table, a token whose slot has nothing for this linear) gets empty bags
    (embedding_bag's sum of nothing: a zero row).

    Running example: token_slot = [2, -1, 0], in_f = 3, num_slices = 2, r_max = 2, ranks: slot 0 -> 1,
    slot 2 -> 2, the slots' own A table (block = slot, width = r_max)
      a_idx = [6, 7, 8, 0, 1, 2]   rows block * in_f + i of the A table, token by token
      a_off = [0, 3, 3]            token 1 has an empty bag
      b_idx = [4, 5, 0]            rows s * r_max + k of each slice's B table, k < the slot's rank
      b_off = [0, 2, 2]
      h_idx = [[0, 1, 8], [2, 3, 10]]   per slice j: where each b_idx weight sits in h.view(-1) (h [3, 2 * 2])
      lora_rows = None             token indices with A bags, or None when every token has them
    With a compact table of blocks (slot 0, slot 2) and width 2 the blocks become 1 and 0: a_idx = [3, 4,
    5, 0, 1, 2]; the rest is the same (width = r_max here). A slot rank above the width is cut to it: no
    slice of this linear has a higher rank.
    """

    def __init__(
        self, meta: LoraMeta, in_f: int, num_slices: int, r_max: int, compact: CompactRows | None = None
    ) -> None:
        slot = meta.token_slot  # [num_tokens]
        dev = slot.device
        width = r_max if compact is None else compact.width
        block = slot  # the token's block of in_f rows in the A table
        if compact is not None:
            pos = torch.full((max(meta.slot_ids_list[-1], *compact.slots) + 1,), -1, dtype=torch.int64)
            pos[list(compact.slots)] = torch.arange(len(compact.slots))
            block = torch.where(slot >= 0, pos.to(dev).index_select(0, slot.clamp(min=0)), -1)
        has = block >= 0
        rows = has.nonzero().view(-1)  # [num_a_tokens] token indices, in token order
        slot_l = slot.index_select(0, rows)
        block_l = block.index_select(0, rows)
        rank_of = torch.zeros(meta.slot_ids_list[-1] + 1, dtype=torch.int64)
        rank_of[meta.slot_ids_list] = torch.tensor([min(true_rank(r, r_max), width) for r in meta.slot_ranks_list])
        rank_l = rank_of.to(dev).index_select(0, slot_l)  # [num_a_tokens]

        def exclusive_cumsum(counts: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(counts, 0) - counts

        self.a_idx = (block_l[:, None] * in_f + torch.arange(in_f, device=dev)).view(-1)
        self.a_off = exclusive_cumsum(has.to(torch.int64) * in_f)
        k = torch.arange(width, device=dev)
        keep = (k[None, :] < rank_l[:, None]).view(-1)  # [num_a_tokens * width]
        self.b_idx = (slot_l[:, None] * r_max + k).view(-1)[keep]
        self.b_off = exclusive_cumsum(torch.zeros_like(slot).index_put_((rows,), rank_l))
        h_idx0 = (rows[:, None] * (num_slices * width) + k).view(-1)[keep]
        self.h_idx = [h_idx0 + j * width for j in range(num_slices)]
        self.lora_rows = None if rows.numel() == meta.num_tokens else rows


def delta_rows(
    y: torch.Tensor,  # [num_tokens, out_total], updated in place
    x: torch.Tensor,  # [num_tokens, in]
    rows: RowTables,  # a: [num_slots * in, num_slices * r_max]; b: per slice [num_slots * r_max, width]
    slice_offsets: list[int],
    meta: LoraMeta,
    compact: CompactRows | None = None,  # read A from this instead of rows.a (see compact_rows)
) -> None:
    """y += delta with each token's own rows read in place: h[t] = sum_i x[t, i] * A_table[s * in + i]
    (one embedding_bag weighted by x), then per slice y[t, slice] += sum_k h[t, slice, k] *
    B_table[s * r_max + k] over the slot's true rank (one embedding_bag weighted by h)."""
    num_slices = len(slice_offsets) - 1
    in_f = x.shape[1]
    r_max = rows.a.shape[1] // num_slices
    key = ("rows", in_f, num_slices, r_max, None if compact is None else (compact.slots, compact.width))
    idx = meta.cache.get(key)
    if idx is None:
        idx = meta.cache[key] = _RowIndex(meta, in_f, num_slices, r_max, compact)
    xs = x if idx.lora_rows is None else x.index_select(0, idx.lora_rows)  # the shrink's weights
    a_table = rows.a if compact is None else compact.a
    # torch.embedding_bag (F.embedding_bag without its Python checks: the indices are ours), mode 0 = sum
    h = torch.embedding_bag(a_table, idx.a_idx, idx.a_off, False, 0, False, xs.reshape(-1))[0]
    h_flat = h.view(-1)  # h: [num_tokens, num_slices * width]
    for j in range(num_slices):
        weights = h_flat.index_select(0, idx.h_idx[j])
        delta = torch.embedding_bag(rows.b[j], idx.b_idx, idx.b_off, False, 0, False, weights)[0]
        y[:, slice_offsets[j] : slice_offsets[j + 1]].add_(delta)  # (not +=: its __setitem__ copies the slice onto itself)
