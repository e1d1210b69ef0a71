"""The cost model that picks, per step and linear shape, which exact CPU way (cpu_lora.py) computes
y = x W^T + b + every token's LoRA delta.

Every way gives the same sum (up to float rounding order); they differ only in how many small calls they
make and how many wasted multiply-adds or copied bytes they spend. Each layer of a step has one of a few
shapes, so a choice is made once per step and shape and cached on the step's LoraMeta.
The per-machine figures it prices with (CostFigures) are measured at engine start by cpu_calibrate.py
and reach it on LoraSlots.figures; without them (calibration off or failed) every step is "grouped".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from .meta import LoraMeta

DeltaStrategy = Literal["grouped", "stacked", "split", "rows"]
Plan = Literal["merged", "fused-single", "fused-packed", "grouped", "stacked", "split", "rows"]
SPLIT_MIN_TOKENS = 8  # without figures, "split" gives adapters with at least this many tokens their own pair
SAFE_DEFAULT: DeltaStrategy = "grouped"  # the plan without figures: exact for every step, never far off
# fused-packed serves active sets of at most this many adapters: every token times every adapter's columns
# inside the packed matmul cost more than the FLOP count says (measured on a 2-core AMD EPYC, bf16, batch
# 32, rank 16: 1 and 2 adapters faster fused, 8 slower than the rows strategy)
FUSE_MAX_ADAPTERS = 2


@dataclass(frozen=True)
class CostFigures:
    """Per-machine figures the cost model prices with. None are built in: cpu_calibrate.py measures
    them at engine start on the model's own shapes (one small function per field, so a field added here
    needs its measurement there). Without figures (calibration off or failed) the planner does not
    guess: it uses "grouped", exact for every step."""

    # Fixed seconds of one small matmul call (float32; bfloat16 / float16, where oneDNN lays an unpacked
    # weight out anew on every call, so it costs several times more).
    call_seconds_16bit: float
    call_seconds_32bit: float
    flops_per_second: float  # multiply-adds (x2) of large matmuls
    copy_bytes_per_second: float  # index_select / re-layout copies (bytes read + written)
    row_call_seconds: float  # one embedding_bag / index_select / add call of the rows strategy
    row_bytes_per_second: float  # weight rows embedding_bag reads in place

    def call_seconds(self, elem: int) -> float:
        """Fixed seconds of one small matmul call on elements of `elem` bytes."""
        return self.call_seconds_16bit if elem == 2 else self.call_seconds_32bit


class LinearShape(NamedTuple):
    """The sizes of one LoRA-aware linear that the cost model reads (plain ints)."""

    out_total: int  # sum of the output slices' widths
    num_slices: int  # fused projections (q | k | v: 3)
    r_max: int  # slot rank (adapters of lower rank are padded; read only up to their rank)
    in_features: int
    elem: int  # bytes per element of x and the weights


def true_rank(rank: int, r_max: int) -> int:
    """The rank to compute with: the slot's true rank when known, else r_max (exact only where the padding
    is zero: slots written per layer, not LoraSlotStack slots; the engine always knows the rank)."""
    return rank if 0 < rank <= r_max else r_max


def delta_costs(
    shape: LinearShape,
    meta: LoraMeta,
    ks: tuple[int, ...],  # stacked columns (sum of true ranks over the slices it targets here) of each active slot
    stack_cached: bool,  # the stacked copy of this active set is already made (steady decode)
    has_rows: bool,
    fig: CostFigures,
) -> dict[DeltaStrategy, float]:
    """Estimated seconds of each delta strategy (cached on meta):
    grouped   a matmul pair per adapter with something here, plus the gather / scatter of a mixed step
    stacked   2 calls (3 with the mask of a mixed step); every token times every adapter's columns
    split     long segments (a prefill) a pair each, the other tokens one stacked pass (split_big)
    rows      when the row tables exist: embedding_bag calls and the row bytes they read
    grouped and stacked share the stacked copy: its copies are priced when it is not cached yet."""
    key = ("delta-costs", *shape, ks, stack_cached, has_rows, fig)
    cached = meta.cache.get(key)
    if cached is not None:
        return cached
    out_total, num_slices, r_max, in_f, elem = shape
    call = fig.call_seconds(elem)
    io = in_f + out_total
    segs = [(meta.seg_starts_list[i + 1] - meta.seg_starts_list[i], k) for i, k in enumerate(ks) if k]
    single = meta.is_single_full and len(segs) == 1
    total_k = sum(k for _, k in segs)
    build = 0.0 if stack_cached else 3 * call + 2 * total_k * io * elem / fig.copy_bytes_per_second
    grouped_flops = sum(2 * n * k * io for n, k in segs)
    costs: dict[DeltaStrategy, float] = {
        "grouped": build + (2 * len(segs) + (0 if single else 3)) * call + grouped_flops / fig.flops_per_second,
        "stacked": build + (2 if single else 3) * call + 2 * meta.num_tokens * total_k * io / fig.flops_per_second,
    }
    big = split_big(shape, meta, ks, fig)
    if big and len(big) < len(segs):
        big_set = set(big)
        seg_slots = [s for s, k in zip(meta.slot_ids_list, ks, strict=True) if k]
        own = [seg for seg, s in zip(segs, seg_slots, strict=True) if s in big_set]
        n_small = sum(n for n, _ in segs) - sum(n for n, _ in own)
        flops = 2 * n_small * total_k * io + sum(2 * n * k * io for n, k in own)
        costs["split"] = build + (5 + 4 * len(own)) * call + flops / fig.flops_per_second
    if has_rows:
        token_ranks = sum(
            (meta.seg_starts_list[i + 1] - meta.seg_starts_list[i]) * true_rank(r, r_max)
            for i, r in enumerate(meta.slot_ranks_list)
        )
        # Priced at r_max columns of A even where the compact table (rows_width) is read: embedding_bag's
        # time per row does not shrink with the row's bytes alone (measured: mixed small adapters in rank-64
        # slots, priced at their width, moved q|k|v, o and down from stacked / fused-packed to rows and
        # ran slower), so the narrower table only speeds up a step the plan gives to rows anyway.
        row_bytes = (meta.num_lora_tokens * in_f * num_slices * r_max + token_ranks * out_total) * elem
        costs["rows"] = (2 + 3 * num_slices) * fig.row_call_seconds + row_bytes / fig.row_bytes_per_second
    meta.cache[key] = costs
    return costs


def rows_width(
    shape: LinearShape,
    meta: LoraMeta,
    num_active: int,
    rows_cached: bool,
    fig: CostFigures | None,
    width: int | None = None,
) -> int:
    """Columns per slice of the A row table the rows strategy reads: r_max (the slots' own table, read in
    place), or the step's largest true rank through a compact copy of the active slots' A rows at that
    width (cpu_lora.compact_rows), when the row bytes it saves in this step pay for making the copy, or
    the copy is made already (steady decode). Adapters of rank 16 in slots of rank 64 read a quarter of
    the A bytes that way (A is most of what the rows strategy reads). Without figures: the compact copy
    whenever it is narrower. `width`: the largest rank of this linear's active slots, when the caller
    knows it (else the step's adapters' ranks bound it). The plan choice prices rows at r_max regardless
    (see delta_costs)."""
    r_max = shape.r_max
    if width is None:
        width = max((true_rank(r, r_max) for r in meta.slot_ranks_list), default=r_max)
    if width >= r_max:
        return r_max
    if fig is None or rows_cached:
        return width
    saved = meta.num_lora_tokens * shape.in_features * shape.num_slices * (r_max - width) * shape.elem
    return width if saved / fig.row_bytes_per_second > compact_rows_seconds(shape, num_active, width, fig) else r_max


def compact_rows_seconds(shape: LinearShape, num_active: int, width: int, fig: CostFigures) -> float:
    """Estimated seconds to make the compact A table of num_active slots at `width` (one gathering copy)."""
    nbytes = num_active * shape.in_features * shape.num_slices * width * shape.elem
    return fig.row_call_seconds + 2 * nbytes / fig.copy_bytes_per_second


def split_big(shape: LinearShape, meta: LoraMeta, ks: tuple[int, ...], fig: CostFigures | None) -> tuple[int, ...]:
    """The adapters "split" gives a matmul pair of their own (the rest share one stacked pass): those
    whose tokens would waste more multiply-adds in the shared pass (times the other adapters' columns)
    than their own pair's calls cost; without figures, those with SPLIT_MIN_TOKENS tokens or more."""
    key = ("split-big", shape, ks, fig)
    big = meta.cache.get(key)
    if big is None:
        io = shape.in_features + shape.out_total
        total_k = sum(ks)
        big = []
        for i, (slot, k) in enumerate(zip(meta.slot_ids_list, ks, strict=True)):
            n = meta.seg_starts_list[i + 1] - meta.seg_starts_list[i]
            if not k:
                continue
            if fig is None:
                own = n >= SPLIT_MIN_TOKENS
            else:
                own = 2 * n * (total_k - k) * io / fig.flops_per_second > 4 * fig.call_seconds(shape.elem)
            if own:
                big.append(slot)
        big = meta.cache[key] = tuple(big)
    return big


def choose_delta(
    shape: LinearShape,
    meta: LoraMeta,
    ks: tuple[int, ...],
    stack_cached: bool,
    has_rows: bool,
    fig: CostFigures | None,
) -> DeltaStrategy:
    """The cheapest delta strategy under the cost model; without figures, the safe default."""
    if fig is None:
        return SAFE_DEFAULT
    costs = delta_costs(shape, meta, ks, stack_cached, has_rows, fig)
    return min(costs, key=costs.__getitem__)


def fused_single_cost(num_tokens: int, shape: LinearShape, meta: LoraMeta, fig: CostFigures) -> float:
    """Estimated extra seconds of the fused-single plan over the base matmul alone."""
    # The fused matmul computes every slot 0..slot at r_max (their A rows sit under W in order), then one
    # expand per slice.
    rows = (meta.slot_ids_list[0] + 1) * shape.num_slices * shape.r_max
    fused = 2 * num_tokens * rows * shape.in_features / fig.flops_per_second
    fused += 2 * num_tokens * shape.r_max * shape.out_total / fig.flops_per_second
    return fused + shape.num_slices * fig.call_seconds(shape.elem)


def fused_packed_cost(num_tokens: int, shape: LinearShape, meta: LoraMeta, ks: tuple[int, ...], fig: CostFigures) -> float:
    """Estimated extra seconds of the fused-packed plan over the base matmul alone: the stacked A columns
    ride in the packed base matmul (their multiply-adds, no call), then the mask of a mixed step and one
    expand call (every token times every active adapter's columns, as stacked)."""
    total_k = sum(ks)
    single = meta.is_single_full and sum(1 for k in ks if k) == 1
    flops = 2 * num_tokens * total_k * (shape.in_features + shape.out_total)
    return (1 if single else 2) * fig.call_seconds(shape.elem) + flops / fig.flops_per_second


def plan_cost(
    plan: Plan,
    num_tokens: int,
    shape: LinearShape,
    meta: LoraMeta,
    ks: tuple[int, ...],
    stack_cached: bool,
    has_rows: bool,
    fig: CostFigures,
) -> float:
    """Estimated extra seconds of `plan` over the base matmul alone."""
    if plan == "merged":  # the merged copy is the base matmul
        return 0.0
    if plan == "fused-single":
        return fused_single_cost(num_tokens, shape, meta, fig)
    if plan == "fused-packed":
        return fused_packed_cost(num_tokens, shape, meta, ks, fig)
    return delta_costs(shape, meta, ks, stack_cached, has_rows, fig)[plan]


def choose_plan(
    num_tokens: int,
    shape: LinearShape,
    meta: LoraMeta,
    ks: tuple[int, ...],
    stack_cached: bool,
    has_rows: bool,
    can_fuse: bool,
    fig: CostFigures | None,
    fused_packed: bool = False,
) -> Plan:
    """'fused-single' (the shrink rides in the base matmul: one adapter covers the whole step and W is not
    packed), 'fused-packed' (fused_packed: the packed [W; A_stack] copy of this active set exists) or the
    delta strategy that follows a base matmul of its own, whichever the cost model prices lowest. Cached
    on meta."""
    if fig is None:
        return SAFE_DEFAULT
    key = ("plan", *shape, ks, stack_cached, has_rows, can_fuse, fused_packed, fig)
    plan: Plan | None = meta.cache.get(key)
    if plan is None:
        plan = choose_delta(shape, meta, ks, stack_cached, has_rows, fig)
        separate = delta_costs(shape, meta, ks, stack_cached, has_rows, fig)[plan]
        if can_fuse and meta.is_single_full and fused_single_cost(num_tokens, shape, meta, fig) < separate:
            plan = "fused-single"
        elif fused_packed and fused_packed_cost(num_tokens, shape, meta, ks, fig) < separate:
            plan = "fused-packed"
        meta.cache[key] = plan
    return plan
