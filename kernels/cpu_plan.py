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

DeltaStrategy = Literal["grouped", "dense", "compact", "rows"]
Plan = Literal["fused-single", "grouped", "dense", "compact", "rows"]


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
    r_max: int  # slot rank (adapters of lower rank are zero-padded)
    in_features: int
    elem: int  # bytes per element of x and the weights


def true_rank(rank: int, r_max: int) -> int:
    """The rank to compute with: the slot's true rank when known, else r_max (padding is zero)."""
    return rank if 0 < rank <= r_max else r_max


def delta_costs(
    shape: LinearShape, meta: LoraMeta, has_rows: bool, slot_minor_b: bool, fig: CostFigures
) -> dict[DeltaStrategy, float]:
    """Estimated seconds of each delta strategy that applies to this step (cached on meta):
    grouped always; rows when the row tables exist; dense over the slot range and compact (the active
    slots copied side by side) when several slots are active and B is slot-minor."""
    key = ("delta-costs", *shape, has_rows, slot_minor_b, fig)
    cached = meta.cache.get(key)
    if cached is not None:
        return cached
    out_total, num_slices, r_max, in_f, elem = shape
    call = fig.call_seconds(elem)
    costs: dict[DeltaStrategy, float] = {"grouped": (meta.num_active * (1 + num_slices) + 2) * call}
    if has_rows:
        token_ranks = sum(
            (meta.seg_starts_list[i + 1] - meta.seg_starts_list[i]) * true_rank(r, r_max)
            for i, r in enumerate(meta.slot_ranks_list)
        )
        row_bytes = (meta.num_lora_tokens * in_f * num_slices * r_max + token_ranks * out_total) * elem
        costs["rows"] = (2 + 3 * num_slices) * fig.row_call_seconds + row_bytes / fig.row_bytes_per_second
    if meta.num_active > 1 and slot_minor_b:
        span = meta.slot_ids_list[-1] - meta.slot_ids_list[0] + 1
        dense_calls = 2 + 2 * num_slices
        per_token = r_max * (num_slices * in_f + out_total)
        wasted = 2 * (meta.num_tokens * span - meta.num_lora_tokens) * per_token
        costs["dense"] = dense_calls * call + wasted / fig.flops_per_second
        if span > meta.num_active:
            compact_wasted = 2 * (meta.num_tokens * meta.num_active - meta.num_lora_tokens) * per_token
            copied = 2 * meta.num_active * per_token * elem
            costs["compact"] = (dense_calls + 2) * call + compact_wasted / fig.flops_per_second
            costs["compact"] += copied / fig.copy_bytes_per_second
    meta.cache[key] = costs
    return costs


def choose_delta(
    shape: LinearShape, meta: LoraMeta, has_rows: bool, slot_minor_b: bool, fig: CostFigures | None
) -> DeltaStrategy:
    """The cheapest delta strategy for this step under the cost model; "grouped" without figures."""
    if fig is None:
        return "grouped"
    costs = delta_costs(shape, meta, has_rows, slot_minor_b, fig)
    return min(costs, key=costs.__getitem__)


def fused_single_cost(num_tokens: int, shape: LinearShape, meta: LoraMeta, fig: CostFigures) -> float:
    """Estimated extra seconds of the fused-single plan over the base matmul alone."""
    # The fused matmul computes every slot 0..slot (their A rows sit under W in order).
    rows = (meta.slot_ids_list[0] + 1) * shape.num_slices * shape.r_max
    fused = 2 * num_tokens * rows * shape.in_features / fig.flops_per_second
    return fused + shape.num_slices * fig.call_seconds(shape.elem)


def choose_plan(
    num_tokens: int, shape: LinearShape, meta: LoraMeta, has_rows: bool, can_fuse: bool, fig: CostFigures | None
) -> Plan:
    """'fused-single' (the shrink rides in the base matmul: one adapter covers the whole step and W is not
    packed) or the delta strategy that follows a base matmul of its own. Cached on meta. Without figures
    (no calibration): "grouped"."""
    if fig is None:
        return "grouped"
    key = ("plan", *shape, has_rows, can_fuse, fig)
    plan: Plan | None = meta.cache.get(key)
    if plan is None:
        plan = choose_delta(shape, meta, has_rows, True, fig)  # LoraSlots keeps B slot-minor
        if can_fuse and meta.is_single_full:
            separate = delta_costs(shape, meta, has_rows, True, fig)[plan]
            if fused_single_cost(num_tokens, shape, meta, fig) < separate:
                plan = "fused-single"
        meta.cache[key] = plan
    return plan
