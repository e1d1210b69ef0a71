"""The CPU LoRA path (every plan and strategy, the slot buffers' write path) against the per-token loop
of kernels/reference.py, in float64."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from loraplex.kernels import LoraSlots, build_lora_meta, lora_delta_cpu
from loraplex.kernels.cpu_lora import active_here, lora_linear_cpu, stack_of
from loraplex.kernels.cpu_plan import CostFigures, LinearShape, choose_plan, delta_costs, rows_width
from loraplex.kernels.lora_slots import row_tables
from loraplex.kernels.reference import lora_delta_loop

# Example figures of one machine (a 2-core x86 box), as test data for the cost model's arithmetic; the
# engine measures its own at start (kernels/cpu_calibrate.py).
EXAMPLE_FIGURES = CostFigures(
    call_seconds_16bit=50e-6,
    call_seconds_32bit=10e-6,
    flops_per_second=1e11,
    copy_bytes_per_second=1e10,
    row_call_seconds=10e-6,
    row_bytes_per_second=2.5e10,
)


def _offsets(slices: list[int]) -> list[int]:
    offsets = [0]
    for w in slices:
        offsets.append(offsets[-1] + w)
    return offsets


def _case(num_tokens: int, num_slots: int, slices: list[int], r_max: int, in_f: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ranks = [int(torch.randint(1, r_max + 1, (1,), generator=g)) for _ in range(num_slots)]
    a = torch.zeros(num_slots, len(slices), r_max, in_f, dtype=torch.float64)
    b_phys = torch.zeros(sum(slices), num_slots, r_max, dtype=torch.float64)  # the model's (slot-minor) layout
    for s, r in enumerate(ranks):  # zero-padded ranks, as the slot writer leaves them
        a[s, :, :r] = torch.randn(len(slices), r, in_f, generator=g, dtype=torch.float64)
        b_phys[:, s, :r] = torch.randn(sum(slices), r, generator=g, dtype=torch.float64)
    token_slot = torch.randint(-1, num_slots, (num_tokens,), generator=g).tolist()
    x = torch.randn(num_tokens, in_f, generator=g, dtype=torch.float64)
    y = torch.randn(num_tokens, sum(slices), generator=g, dtype=torch.float64)
    return x, y, a, b_phys.transpose(0, 1), token_slot, ranks


def _expected(x, y, a, b, offsets, token_slot) -> torch.Tensor:
    return y + lora_delta_loop(x, a, b, offsets, token_slot).delta


@pytest.mark.parametrize("strategy", ["grouped", "stacked", "split", "rows", None])
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
def test_delta_strategies_match_loop(strategy, num_tokens, num_slots, slices, r_max, in_f, seed):
    x, y, a, b, token_slot, ranks = _case(num_tokens, num_slots, slices, r_max, in_f, seed)
    offsets = _offsets(slices)
    meta = build_lora_meta(token_slot, ranks)
    if meta is None:
        pytest.skip("no LoRA token drawn")
    out = y.clone()
    lora_delta_cpu(out, x, a, b, offsets, meta, row_tables(a, b, offsets), strategy=strategy, figures=EXAMPLE_FIGURES)
    torch.testing.assert_close(out, _expected(x, y, a, b, offsets, token_slot), rtol=1e-10, atol=1e-10)
    untouched = [t for t, s in enumerate(token_slot) if s < 0]
    assert torch.equal(out[untouched], y[untouched])  # base-only tokens get exactly nothing added


def test_rows_strategy_skips_rank_padding_and_is_chosen_for_decode():
    """Slots of rank 2 in r_max 8: the rows strategy reads only the true ranks' rows of B, so garbage in
    the padding rows of the B table changes nothing; and under the example figures a decode-like step (a
    token per adapter over many slots) is costed cheapest as rows."""
    x, y, a, b, _, _ = _case(6, 12, [16, 8], 8, 24, 7)
    a[:, :, 2:] = 0
    b[:, :, 2:] = 0
    token_slot = [11, 0, 5, -1, 5, 7]
    meta = build_lora_meta(token_slot, [2] * 12)
    rows = row_tables(a, b, [0, 16, 24])
    for table in rows.b:
        table.view(12, 8, -1)[:, 2:] = 1e6  # padding rows: must never be read
    out = y.clone()
    lora_delta_cpu(out, x, a, b, [0, 16, 24], meta, rows, strategy="rows")
    torch.testing.assert_close(out, _expected(x, y, a, b, [0, 16, 24], token_slot), rtol=1e-10, atol=1e-10)

    qkv = LinearShape(out_total=960, num_slices=3, r_max=16, in_features=576, elem=2)  # SmolLM2-135M, bf16
    decode = build_lora_meta(list(range(0, 32, 2)), [16] * 32)  # 16 tokens, 16 distinct of 32 slots
    costs = delta_costs(qkv, decode, (48,) * 16, False, True, EXAMPLE_FIGURES)
    assert min(costs, key=costs.__getitem__) == "rows", costs
    prefill = build_lora_meta([3] * 300 + [9] * 200, [16] * 32)  # long prompts of two adapters
    costs = delta_costs(qkv, prefill, (48, 48), True, True, EXAMPLE_FIGURES)
    assert min(costs, key=costs.__getitem__) == "grouped", costs


def test_rows_reads_a_from_a_compact_table_at_the_steps_rank():
    """Adapters of rank <= 3 in slots of r_max 8: the rows strategy reads A from a compact copy of the
    active slots' A rows at width 3 (garbage in the slots' own table past it changes nothing), a token
    whose adapter has nothing for this linear gets nothing, the copy is kept for the same active set and
    made anew after a slot write; rows_width falls back to r_max when the step's rank fills the slots."""
    slices, r_max, in_f, num_slots = [12, 6, 6], 8, 10, 6
    offsets = _offsets(slices)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(sum(slices), in_f, generator=g, dtype=torch.float64)
    slots = LoraSlots(w, None, offsets, num_slots, r_max, with_row_tables=True)
    a = torch.zeros(num_slots, 3, r_max, in_f, dtype=torch.float64)
    b = torch.zeros(num_slots, sum(slices), r_max, dtype=torch.float64)
    slice_ranks = {0: [3, 3, 3], 2: [2, 0, 1], 3: [1, 1, 1], 5: [0, 0, 0]}  # 5: targets other linears only
    for s, per in slice_ranks.items():
        per_slice = []
        for i, r in enumerate(per):
            a[s, i, :r] = torch.randn(r, in_f, generator=g, dtype=torch.float64)
            b[s, offsets[i] : offsets[i + 1], :r] = torch.randn(slices[i], r, generator=g, dtype=torch.float64)
            per_slice.append((a[s, i, :r], b[s, offsets[i] : offsets[i + 1], :r]) if r else None)
        slots.write(s, per_slice)
    assert slots.rows is not None
    slots.rows.a.view(num_slots, in_f, 3, r_max)[:, :, :, 3:] = 1e6  # past width 3: must not be read
    token_slot = [0, 3, -1, 5, 2, 0, 3, 2, 5]
    # the adapters' ranks: slot 2's adapter has rank 5 in other linears, slot 5's rank 2 (none here);
    # the table's width is this linear's largest rank, 3
    ranks = [3, 0, 5, 1, 0, 2]
    x = torch.randn(len(token_slot), in_f, generator=g, dtype=torch.float64)
    want = _expected(x, x @ w.T, a, b, offsets, token_slot)
    y = lora_linear_cpu(x, w, None, None, slots, build_lora_meta(token_slot, ranks), plan="rows")
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert len(slots.rows_cache) == 1
    (compact,) = slots.rows_cache.values()
    assert compact.width == 3 and compact.slots == (0, 2, 3) and compact.a.shape == (3 * in_f, 3 * 3)
    y = lora_linear_cpu(x, w, None, None, slots, build_lora_meta(token_slot, ranks), plan="rows", figures=EXAMPLE_FIGURES)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert list(slots.rows_cache.values()) == [compact]  # the same set: the same copy (cached, so it pays)
    new_a = torch.randn(1, in_f, generator=g, dtype=torch.float64)
    new_b = torch.randn(slices[1], 1, generator=g, dtype=torch.float64)
    slots.write(3, [None, (new_a, new_b), None])
    a[3], b[3] = 0, 0
    a[3, 1, :1], b[3, offsets[1] : offsets[2], :1] = new_a, new_b
    y = lora_linear_cpu(x, w, None, None, slots, build_lora_meta(token_slot, ranks), plan="rows")
    torch.testing.assert_close(y, _expected(x, x @ w.T, a, b, offsets, token_slot), rtol=1e-10, atol=1e-10)
    newest = list(slots.rows_cache.values())[-1]  # the old set's copy stays until evicted (two kept)
    assert len(slots.rows_cache) == 2 and newest is not compact and newest.slots == (0, 2, 3)

    qkv = LinearShape(out_total=960, num_slices=3, r_max=64, in_features=576, elem=2)
    decode = build_lora_meta(list(range(0, 16, 2)) * 4, [16] * 16)  # 32 tokens over 8 rank-16 adapters
    assert rows_width(qkv, decode, 8, False, EXAMPLE_FIGURES) == 16
    assert rows_width(qkv, decode, 8, False, None) == 16
    full = build_lora_meta(list(range(0, 16, 2)) * 4, [16] * 14 + [64, 16])  # slot 14 holds a rank-64 adapter
    assert rows_width(qkv, full, 8, True, EXAMPLE_FIGURES) == 64
    one = build_lora_meta([4], [16] * 5)  # one token: the bytes it saves do not pay for the copy
    assert rows_width(qkv, one, 1, False, EXAMPLE_FIGURES) == 64
    assert rows_width(qkv, one, 1, True, EXAMPLE_FIGURES) == 16  # unless the copy is made already
    assert rows_width(qkv, decode, 8, False, EXAMPLE_FIGURES, width=8) == 8  # this linear's own ranks


def test_single_slot_full_batch_skips_gather():
    x, y, a, b, _, ranks = _case(9, 2, [8, 8], 4, 12, 5)
    meta = build_lora_meta([1] * 9, ranks)
    assert meta.is_single_full
    out = y.clone()
    lora_delta_cpu(out, x, a, b, [0, 8, 16], meta)
    torch.testing.assert_close(out, _expected(x, y, a, b, [0, 8, 16], [1] * 9))


def _slots_case(bias: bool, rows: bool, seed: int = 9):
    """LoraSlots of 5 slots over a q|k|v-like linear, filled through its write path, plus the same
    weights as plain tensors for the loop."""
    slices, r_max, in_f, num_slots = [20, 8, 8], 4, 16, 5
    offsets = _offsets(slices)
    x, _, a, b, token_slot, ranks = _case(11, num_slots, slices, r_max, in_f, seed)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(sum(slices), in_f, generator=g, dtype=torch.float64)
    bvec = torch.randn(sum(slices), generator=g, dtype=torch.float64) if bias else None
    slots = LoraSlots(w, bvec, offsets, num_slots, r_max, with_row_tables=rows)
    for s, r in enumerate(ranks):
        slots.write(s, [(a[s, i, :r], b[s, offsets[i] : offsets[i + 1], :r]) for i in range(len(slices))])
    base = x @ w.T + (bvec if bias else 0)
    return x, slots, base, a, b, offsets, token_slot, ranks


@pytest.mark.parametrize("plan", ["fused-single", "grouped", "stacked", "split", "rows", None])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("figures", [EXAMPLE_FIGURES, None], ids=["figures", "no-figures"])
def test_lora_linear_cpu_plans_match_loop(plan, bias, figures):
    """Base matmul + LoRA over slots written by LoraSlots.write: every plan computes the same y (plan
    None: the cost model's choice under the slots' figures, "grouped" without figures)."""
    x, slots, base, a, b, offsets, token_slot, ranks = _slots_case(bias, rows=True)
    slots.figures = figures
    if plan == "fused-single":
        token_slot = [3] * len(token_slot)
    meta = build_lora_meta(token_slot, ranks)
    y = lora_linear_cpu(x, slots.weight, slots.bias, None, slots, meta, plan=plan, figures=EXAMPLE_FIGURES)
    torch.testing.assert_close(y, _expected(x, base, a, b, offsets, token_slot), rtol=1e-10, atol=1e-10)


def test_slot_write_zeroes_leftovers_and_keeps_row_tables_in_step():
    """Writing a smaller adapter over a slot leaves nothing of the old one (padding, untargeted slices),
    and the row tables equal the ones built from the slot buffers."""
    x, slots, _, a, b, offsets, _, ranks = _slots_case(bias=False, rows=True)
    new_a = torch.ones(1, a.shape[3], dtype=torch.float64)
    slots.write(2, [None, (new_a, torch.ones(8, 1, dtype=torch.float64)), None])
    assert torch.equal(slots.lora_a[2, 1, :1], new_a) and not slots.lora_a[2, 1, 1:].any()
    assert not slots.lora_a[2, [0, 2]].any() and not slots.lora_b[2, :20].any() and not slots.lora_b[2, 28:].any()
    assert torch.equal(slots.lora_a[1], a[1]) and torch.equal(slots.lora_b[1], b[1])  # other slots untouched
    expected = row_tables(slots.lora_a, slots.lora_b, offsets)
    assert slots.rows is not None and torch.equal(slots.rows.a, expected.a)
    assert all(torch.equal(got, want) for got, want in zip(slots.rows.b, expected.b, strict=True))


def test_plan_fuses_only_unpacked_single_adapter_steps():
    """fused-single is considered only when one slot covers the whole step and W is not packed."""
    shape = LinearShape(out_total=960, num_slices=3, r_max=16, in_features=576, elem=4)
    single = build_lora_meta([0] * 8, [16] * 4)
    assert choose_plan(8, shape, single, (48,), False, has_rows=True, can_fuse=True, fig=EXAMPLE_FIGURES) == "fused-single"
    single = build_lora_meta([0] * 8, [16] * 4)
    assert choose_plan(8, shape, single, (48,), False, has_rows=True, can_fuse=False, fig=EXAMPLE_FIGURES) != "fused-single"
    mixed = build_lora_meta([0, 1] * 4, [16] * 4)
    assert choose_plan(8, shape, mixed, (48, 48), False, has_rows=True, can_fuse=True, fig=EXAMPLE_FIGURES) != "fused-single"
    assert choose_plan(8, shape, mixed, (48, 48), False, has_rows=True, can_fuse=True, fig=None) == "grouped"
    single = build_lora_meta([0] * 8, [16] * 4)
    assert choose_plan(8, shape, single, (48,), False, has_rows=True, can_fuse=True, fig=None) == "grouped"


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


@pytest.mark.parametrize("plan", ["grouped", "stacked", "split", None])
def test_stacked_copy_reads_only_true_ranks_of_targeted_slices(plan):
    """Adapters of different ranks targeting different slices: the stacked copy holds only their true-rank
    rows of the slices they target, so garbage in the padding and in untargeted slices is never read,
    and a linear no active adapter targets returns the base output exactly."""
    slices, r_max, in_f, num_slots = [20, 8, 8], 4, 16, 4
    offsets = _offsets(slices)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(sum(slices), in_f, generator=g, dtype=torch.float64)
    slots = LoraSlots(w, None, offsets, num_slots, r_max, with_row_tables=False)
    targets = {0: {0: 2, 2: 1}, 1: {1: 4}, 2: {}, 3: {0: 3, 1: 3, 2: 3}}  # slot -> {slice: rank}
    a = torch.zeros(num_slots, 3, r_max, in_f, dtype=torch.float64)
    b = torch.zeros(num_slots, sum(slices), r_max, dtype=torch.float64)
    for s, per in targets.items():
        per_slice = []
        for i in range(3):
            r = per.get(i, 0)
            a[s, i, :r] = torch.randn(r, in_f, generator=g, dtype=torch.float64)
            b[s, offsets[i] : offsets[i + 1], :r] = torch.randn(slices[i], r, generator=g, dtype=torch.float64)
            per_slice.append((a[s, i, :r], b[s, offsets[i] : offsets[i + 1], :r]) if r else None)
        slots.write(s, per_slice)
    for s, per in targets.items():  # garbage where nothing may be read
        for i in range(3):
            r = per.get(i, 0)
            slots.lora_a[s, i, r:] = 1e6
            slots.lora_b[s, offsets[i] : offsets[i + 1], r:] = 1e6
    x = torch.randn(10, in_f, generator=g, dtype=torch.float64)
    token_slot = [0, 1, 3, -1, 2, 0, 3, 3, 1, 2]
    meta = build_lora_meta(token_slot, [4] * num_slots)
    active = active_here(meta, slots.slice_ranks, 3, r_max)
    assert active.slots == (0, 1, 3) and active.ks(meta) == (3, 4, 0, 9)  # slot 2 holds nothing here
    y = lora_linear_cpu(x, w, None, None, slots, meta, plan=plan, figures=EXAMPLE_FIGURES)
    torch.testing.assert_close(y, _expected(x, x @ w.T, a, b, offsets, token_slot), rtol=1e-10, atol=1e-10)
    assert stack_of(slots, active).a.shape == (16, in_f)  # 3 + 4 + 9 columns: true ranks, targeted slices
    only_empty = build_lora_meta([2, -1, 2], [4] * num_slots)
    assert torch.equal(lora_linear_cpu(x[:3], w, None, None, slots, only_empty, plan=plan, figures=EXAMPLE_FIGURES), x[:3] @ w.T)


def test_stacked_copy_is_reused_until_a_slot_is_rewritten():
    """The same active set step after step reuses the cached stacked copy; a write to one of its slots
    makes the next step use the new weights."""
    x, slots, base, a, b, offsets, token_slot, ranks = _slots_case(bias=False, rows=False)
    meta = build_lora_meta(token_slot, ranks)
    active = active_here(meta, slots.slice_ranks, 3, 4)
    first = stack_of(slots, active)
    assert stack_of(slots, active_here(build_lora_meta(token_slot, ranks), slots.slice_ranks, 3, 4)) is first
    s = meta.slot_ids_list[0]
    new_a, new_b = torch.ones(1, a.shape[3], dtype=torch.float64), torch.ones(8, 1, dtype=torch.float64)
    slots.write(s, [None, (new_a, new_b), None])
    a[s], b[s] = 0, 0
    a[s, 1, :1], b[s, 20:28, :1] = new_a, new_b
    meta = build_lora_meta(token_slot, ranks)
    y = lora_linear_cpu(x, slots.weight, None, None, slots, meta, plan="stacked", figures=EXAMPLE_FIGURES)
    torch.testing.assert_close(y, _expected(x, base, a, b, offsets, token_slot), rtol=1e-10, atol=1e-10)
    assert stack_of(slots, active_here(meta, slots.slice_ranks, 3, 4)) is not first


def test_split_serves_a_prompt_chunk_next_to_decodes():
    """A step with a 150-token prompt chunk of one adapter and 15 decode tokens of six others (what a
    busy server runs): "split" gives the chunk its own matmul pair and the decodes one stacked pass, is
    the cheapest of the matmul strategies under the example figures (without row tables), and equals the
    loop; without the chunk it is not chosen."""
    qkv = LinearShape(out_total=960, num_slices=3, r_max=64, in_features=576, elem=2)
    decodes = [1 + t % 6 for t in range(15)]
    mixed = build_lora_meta(decodes[:7] + [0] * 150 + decodes[7:], [16] * 8)
    costs = delta_costs(qkv, mixed, (48,) * 7, False, False, EXAMPLE_FIGURES)
    assert min(costs, key=costs.__getitem__) == "split", costs
    decode_only = build_lora_meta(decodes, [16] * 8)
    costs = delta_costs(qkv, decode_only, (48,) * 6, True, False, EXAMPLE_FIGURES)
    assert min(costs, key=costs.__getitem__) != "split", costs

    x, y, a, b, _, ranks = _case(40, 5, [12, 4, 4], 4, 9, 11)
    token_slot = [1, 2, -1, 3] + [0] * 30 + [4, 1, 2, -1, 3, 4]
    meta = build_lora_meta(token_slot, ranks)
    out = y.clone()
    lora_delta_cpu(out, x, a, b, [0, 12, 16, 20], meta, strategy="split")  # no figures: chunks of >= 8 tokens
    torch.testing.assert_close(out, _expected(x, y, a, b, [0, 12, 16, 20], token_slot), rtol=1e-10, atol=1e-10)


def test_stacked_slots_written_for_all_layers_keep_the_stacked_copy_in_step():
    """A LoraSlotStack write (the host tier's path: all layers at once) updates every layer's true ranks
    and versions exactly as LoraSlots.write does: after a step has cached a stacked copy of slot 1's
    adapter, rewriting slot 1 with another adapter (lower rank, fewer slices, another slice only; by
    either path) makes the next step of every plan serve the new adapter, next to a slot written per
    layer. Expected: the float64 loop over the adapters' own tensors (not read back from the slots)."""
    from loraplex.kernels.lora_slots import LoraSlotStack

    g = torch.Generator().manual_seed(4)
    layers, in_f, offsets, num_slots, r_max = 2, 6, [0, 5, 8], 3, 4
    stack = LoraSlotStack(layers, in_f, offsets, num_slots, r_max, torch.float64, torch.device("cpu"), with_row_tables=True)
    ws = [torch.randn(8, in_f, generator=g, dtype=torch.float64) for _ in range(layers)]
    views = [LoraSlots(w, None, offsets, num_slots, r_max, with_row_tables=True, stack=stack, layer=i) for i, w in enumerate(ws)]
    widths = [c1 - c0 for c0, c1 in zip(offsets, offsets[1:], strict=False)]
    # what each layer's slots must hold: [num_slots, num_slices, r_max, in] and [num_slots, out, r_max]
    truth_a = [torch.zeros(num_slots, 2, r_max, in_f, dtype=torch.float64) for _ in range(layers)]
    truth_b = [torch.zeros(num_slots, 8, r_max, dtype=torch.float64) for _ in range(layers)]

    def adapter(ranks):  # per slice (A [layers, r, in], B [layers, width, r]) or None
        return [
            None if r == 0 else (torch.randn(layers, r, in_f, generator=g, dtype=torch.float64),
                                 torch.randn(layers, width, r, generator=g, dtype=torch.float64))
            for r, width in zip(ranks, widths, strict=True)
        ]  # fmt: skip

    def expect(slot, per_slice):
        for i in range(layers):
            truth_a[i][slot], truth_b[i][slot] = 0, 0
            for j, ab in enumerate(per_slice):
                if ab is not None:
                    r = ab[0].shape[1]
                    truth_a[i][slot, j, :r] = ab[0][i]
                    truth_b[i][slot, offsets[j] : offsets[j + 1], :r] = ab[1][i]

    x = torch.randn(6, in_f, generator=g, dtype=torch.float64)
    token_slot = [1, 2, -1, 1, 2, 1]
    neighbour = adapter([2, 3])
    for i, view in enumerate(views):  # slot 2 by the per-layer path
        view.write(2, [None if ab is None else (ab[0][i], ab[1][i]) for ab in neighbour])
    expect(2, neighbour)
    by_layer = [False, False, True, False]  # the third rewrite of slot 1 goes per layer, the others stacked
    for ranks, per_layer in zip(([4, 3], [2, 0], [3, 2], [0, 1]), by_layer, strict=True):
        before = [view.versions[1] for view in views]
        new = adapter(ranks)
        if per_layer:
            for i, view in enumerate(views):
                view.write(1, [None if ab is None else (ab[0][i], ab[1][i]) for ab in new])
        else:
            stack.write(1, new)
        expect(1, new)
        for i, view in enumerate(views):
            assert view.slice_ranks[1] == ranks and view.slice_ranks[2] == [2, 3]
            assert view.versions[1] == before[i] + 1
            slot_ranks = [max(view.slice_ranks[s]) for s in range(num_slots)]  # the adapters' ranks, as the engine's
            meta = build_lora_meta(token_slot, slot_ranks)
            want = x @ ws[i].T + lora_delta_loop(x, truth_a[i], truth_b[i], offsets, token_slot).delta
            for plan in ("stacked", "grouped", "split", "rows"):  # "stacked" / "split" cached slot 1's last adapter
                got = lora_linear_cpu(x, view.weight, None, None, view, meta, plan=plan, figures=EXAMPLE_FIGURES)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, p=plan, r=ranks: f"{p} {r}: {m}")
            # fused-single multiplies slot 1's whole r_max-wide B (earlier adapters' values above the
            # ranks after a stacked rewrite) by h from weight_ext, zero there
            only1 = build_lora_meta([1] * len(token_slot), slot_ranks)
            want1 = x @ ws[i].T + lora_delta_loop(x, truth_a[i], truth_b[i], offsets, [1] * len(token_slot)).delta
            got1 = lora_linear_cpu(x, view.weight, None, None, view, only1, plan="fused-single", figures=EXAMPLE_FIGURES)
            torch.testing.assert_close(got1, want1, rtol=1e-10, atol=1e-10, msg=lambda m, r=ranks: f"fused-single {r}: {m}")
        if not per_layer and ranks != [4, 3]:  # a lower-rank stacked rewrite kept older values above the ranks
            assert stack.lora_b[:, :, 1, max(ranks) :].any()


def test_a_lower_rank_rewrite_leaves_nothing_any_reader_reaches():
    """LoraSlotStack.write zeroes only A and the B row table, only below the adapter's rank R (the step
    meta's rank for the slot) and above each slice's own rank, and leaves earlier adapters' large values
    everywhere else. Every CPU plan (per-slice ranks, or the meta's R for rows) and the Triton shrink /
    expand (the meta's R; the interpreter on CPU) still give exactly the new adapter's delta: after a
    rank-8 adapter, one whose slices have ranks (2, 0, 3) inside an adapter of rank 6 (its other modules),
    then a uniform rank-4 one, which zeroes nothing."""
    from loraplex.kernels.lora_slots import LoraSlotStack

    g = torch.Generator().manual_seed(9)
    layers, in_f, offsets, num_slots, r_max = 2, 12, [0, 10, 14, 18], 3, 8
    stack = LoraSlotStack(layers, in_f, offsets, num_slots, r_max, torch.float64, torch.device("cpu"), with_row_tables=True)
    ws = [torch.randn(18, in_f, generator=g, dtype=torch.float64) for _ in range(layers)]
    views = [LoraSlots(w, None, offsets, num_slots, r_max, with_row_tables=True, stack=stack, layer=i) for i, w in enumerate(ws)]
    widths = [c1 - c0 for c0, c1 in zip(offsets, offsets[1:], strict=False)]
    stack.write(2, [(torch.randn(layers, 3, in_f, generator=g, dtype=torch.float64), torch.randn(layers, w, 3, generator=g, dtype=torch.float64)) for w in widths])
    x = torch.randn(5, in_f, generator=g, dtype=torch.float64)
    token_slot = [1, 2, 1, -1, 1]
    for ranks, rank, scale in (([8, 8, 8], 8, 1e3), ([2, 0, 3], 6, 1.0), ([4, 4, 4], 4, 1.0)):
        new = [
            None if r == 0 else (scale * torch.randn(layers, r, in_f, generator=g, dtype=torch.float64),
                                 scale * torch.randn(layers, w, r, generator=g, dtype=torch.float64))
            for r, w in zip(ranks, widths, strict=True)
        ]  # fmt: skip
        stack.write(1, new, rank=rank)
        meta = build_lora_meta(token_slot, [0, rank, 3])
        for i, view in enumerate(views):
            a = view.lora_a.clone()  # the loop's slots: what each adapter holds, zero elsewhere
            b = view.lora_b.clone()
            a[1], b[1] = 0, 0
            for j, ab in enumerate(new):
                if ab is not None:
                    a[1, j, : ranks[j]], b[1, offsets[j] : offsets[j + 1], : ranks[j]] = ab[0][i], ab[1][i]
            want = x @ ws[i].T + lora_delta_loop(x, a, b, offsets, token_slot).delta
            for plan in ("stacked", "grouped", "split", "rows"):
                got = lora_linear_cpu(x, view.weight, None, None, view, meta, plan=plan, figures=EXAMPLE_FIGURES)
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, p=plan, r=ranks: f"{p} {r}: {m}")
            only1 = build_lora_meta([1] * len(token_slot), [0, rank, 3])
            want1 = x @ ws[i].T + lora_delta_loop(x, a, b, offsets, [1] * len(token_slot)).delta
            got1 = lora_linear_cpu(x, view.weight, None, None, view, only1, plan="fused-single", figures=EXAMPLE_FIGURES)
            torch.testing.assert_close(got1, want1, rtol=1e-10, atol=1e-10)
            if importlib.util.find_spec("triton") is not None and not torch.cuda.is_available():  # interpreter (conftest.py)
                from loraplex.kernels import lora_apply

                y = torch.zeros(len(token_slot), 18, dtype=torch.float32)
                lora_apply(y, x.float(), view.lora_a.float(), view.lora_b.float(), offsets, meta, backend="triton")
                torch.testing.assert_close(y.double(), want - x @ ws[i].T, rtol=1e-4, atol=1e-3)
        if rank < 8:  # earlier values stayed where no reader looks
            assert stack.lora_b[:, :, 1, rank:].abs().max() > 10 and stack.weight_ext[:, 18 + 24 : 18 + 48].abs().max() > 10


def _bf16_slots_case(seed: int = 4):
    """bfloat16 LoraSlots (q|k|v-like, with bias) and its packed base weight, for the fused-packed plan
    (16-bit CPU only); the loop's inputs are the same bf16 values in float64."""
    from loraplex.kernels.cpu_linear import pack_weight

    slices, r_max, in_f, num_slots = [40, 16, 16], 8, 32, 4
    offsets = _offsets(slices)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(sum(slices), in_f, generator=g) / 4).to(torch.bfloat16)
    bias = torch.randn(sum(slices), generator=g).to(torch.bfloat16)
    packed = pack_weight(w)
    if packed is None:
        pytest.skip("this torch build has no oneDNN packed linear")
    slots = LoraSlots(w, bias, offsets, num_slots, r_max, with_row_tables=True)
    a = torch.zeros(num_slots, 3, r_max, in_f, dtype=torch.float64)
    b = torch.zeros(num_slots, sum(slices), r_max, dtype=torch.float64)
    ranks = [2, 8, 5, 3]
    for s, r in enumerate(ranks):
        write_adapter_bf16(slots, a, b, s, r, offsets, g, targets=(0, 1, 2) if s != 2 else (1,))
    slots.figures = EXAMPLE_FIGURES
    return slots, w, bias, packed, a, b, offsets, ranks, g


def write_adapter_bf16(slots, a, b, s, r, offsets, g, targets=(0, 1, 2)) -> None:
    """Write a random rank-r adapter (bf16) into slot s and mirror it into the loop's float64 a / b."""
    a[s], b[s] = 0, 0
    per_slice = []
    for i in range(len(offsets) - 1):
        if i not in targets:
            per_slice.append(None)
            continue
        ai = torch.randn(r, a.shape[3], generator=g).to(torch.bfloat16)
        bi = torch.randn(offsets[i + 1] - offsets[i], r, generator=g).to(torch.bfloat16)
        a[s, i, :r], b[s, offsets[i] : offsets[i + 1], :r] = ai.double(), bi.double()
        per_slice.append((ai, bi))
    slots.write(s, per_slice)


def _assert_bf16_close(y, expected) -> None:
    """bf16 rounding of the base output, of h and of the sum: a few 2**-8 of the output's scale."""
    assert y.dtype == torch.bfloat16
    err = (y.double() - expected).abs().max().item()
    assert err <= 0.03 * expected.abs().max().item(), err


@pytest.mark.parametrize("token_slot", [[1, 1, -1, 1, 1, 1, -1, 1, 1], [0, 1, -1, 1, 0, 1, 0, 0, -1]], ids=["one-and-base", "mixed"])
def test_fused_packed_is_made_for_a_steady_active_set_and_follows_rewrites(token_slot):
    """16-bit CPU, packed W: after FUSE_AFTER_STEPS steps with one active set the cost model's plan is
    fused-packed (the shrink rides in the packed base matmul); every step, before and after, equals the
    loop; a rewritten slot retires the fused copy at once (the next step serves the new weights); a new
    one is made once the steps held would have repaid the time the last copy took; a step with another
    active set does not use it."""
    from loraplex.kernels.cpu_lora import FUSE_AFTER_STEPS

    slots, w, bias, packed, a, b, offsets, ranks, g = _bf16_slots_case()
    x = torch.randn(len(token_slot), w.shape[1], generator=g).to(torch.bfloat16)
    base = x.double() @ w.double().T + bias.double()

    def step(ts):
        meta = build_lora_meta(ts, ranks)
        y = lora_linear_cpu(x[: len(ts)], w, bias, packed, slots, meta)
        _assert_bf16_close(y, _expected(x[: len(ts)].double(), base[: len(ts)], a, b, offsets, ts))
        return meta

    for i in range(FUSE_AFTER_STEPS + 2):
        step(token_slot)
        assert (slots.fused is not None) == (i >= FUSE_AFTER_STEPS - 1)
    made = slots.fused
    assert any(v == "fused-packed" for k, v in step(token_slot).cache.items() if k[0] == "plan")
    assert slots.fused is made  # reused, not made again
    other = [0, 1, 2, 3, -1, 3, 2, 1, 0]  # more adapters than FUSE_MAX_ADAPTERS: never fused
    for _ in range(FUSE_AFTER_STEPS + 1):
        meta = step(other)  # another active set: served without the fused copy, which stays
    assert not any(v == "fused-packed" for k, v in meta.cache.items() if k[0] == "plan") and slots.fused is made
    write_adapter_bf16(slots, a, b, 1, 6, offsets, g)  # slot 1 gets another adapter
    assert slots.fused is None  # stale: dropped with the write
    slots.fuse_seconds = 1e9  # a copy that took this long is not repaid by a few steps' savings
    for _ in range(2 * FUSE_AFTER_STEPS):
        meta = step(token_slot)
        assert not any(v == "fused-packed" for k, v in meta.cache.items() if k[0] == "plan") and slots.fused is None
    slots.fuse_seconds = 0.0  # a cheap one is
    step(token_slot)
    assert slots.fused is not None and slots.fused.key[0] == made.key[0] and slots.fused.key != made.key


def test_merged_copy_serves_steps_of_one_adapter_and_follows_rewrites():
    """Steps whose every token uses one adapter: after FUSE_AFTER_STEPS steps a merged copy (W + B A,
    packed) serves them with no LoRA call; every step equals the loop (within bf16 rounding); a step of
    the same adapter next to base-only rows is not served by it (those rows would get the adapter: the
    loop would catch it); a rewrite of the slot retires it and the next steps serve the new weights."""
    from loraplex.kernels.cpu_lora import FUSE_AFTER_STEPS, MergedPacked

    slots, w, bias, packed, a, b, offsets, ranks, g = _bf16_slots_case(seed=7)
    x = torch.randn(9, w.shape[1], generator=g).to(torch.bfloat16)
    base = x.double() @ w.double().T + bias.double()

    def step(ts):
        meta = build_lora_meta(ts, ranks)
        y = lora_linear_cpu(x[: len(ts)], w, bias, packed, slots, meta)
        _assert_bf16_close(y, _expected(x[: len(ts)].double(), base[: len(ts)], a, b, offsets, ts))
        return meta

    for s in (1, 2):  # slot 2 targets only the k slice: the other slices merge nothing
        slots.fuse_seconds = 0.0  # the repay rule (tested with fused-packed) is not what this test is about
        for i in range(FUSE_AFTER_STEPS + 1):
            step([s] * 9)
            mine = isinstance(slots.fused, MergedPacked) and slots.fused.key[0] == (s,)
            assert mine == (i >= FUSE_AFTER_STEPS - 1)
        made = slots.fused
        meta = step([s] * 9)
        assert slots.fused is made and not any(k[0] == "plan" for k in meta.cache)  # no plan: the merged copy
        meta = step([s, -1, s, s, -1, s, s, s, s])  # same set, with base-only rows
        assert slots.fused is made and any(k[0] == "plan" for k in meta.cache)
    write_adapter_bf16(slots, a, b, 2, 4, offsets, g)  # rank 4 <= the meta's 5, every slice now
    assert slots.fused is None  # stale: dropped with the write
    slots.fuse_seconds = 0.0
    for _ in range(FUSE_AFTER_STEPS + 1):
        step([2] * 9)
    assert isinstance(slots.fused, MergedPacked) and slots.fused.key != made.key


def test_no_merged_copy_without_memory_for_it(monkeypatch):
    """Where the machine's available memory would not keep MERGE_MEMORY_HEADROOM after one more copy of W,
    one-adapter steps take the fused packed copy (a few A rows more than W) instead of a merged one."""
    import os

    from loraplex.kernels import cpu_lora

    if not os.path.exists("/proc/meminfo"):
        pytest.skip("no /proc/meminfo: memory_allows cannot tell, and says yes")
    assert cpu_lora.memory_allows(1)  # this machine has room for a byte
    monkeypatch.setattr(cpu_lora, "MERGE_MEMORY_HEADROOM", 1 << 60)
    assert not cpu_lora.memory_allows(1)
    slots, w, bias, packed, a, b, offsets, ranks, g = _bf16_slots_case(seed=7)
    x = torch.randn(9, w.shape[1], generator=g).to(torch.bfloat16)
    for _ in range(cpu_lora.FUSE_AFTER_STEPS + 1):
        y = lora_linear_cpu(x, w, bias, packed, slots, build_lora_meta([1] * 9, ranks))
        _assert_bf16_close(y, _expected(x.double(), x.double() @ w.double().T + bias.double(), a, b, offsets, [1] * 9))
    assert isinstance(slots.fused, cpu_lora.FusedPacked)


def test_copies_made_per_step_stay_within_the_step_budget(monkeypatch):
    """At most COPY_STEP_SECONDS of merged / fused copies per step: the linears that come after the budget
    is spent make theirs in the next steps (one step's latency does not carry the whole model's copies)."""
    monkeypatch.setattr("loraplex.kernels.cpu_lora.COPY_STEP_SECONDS", 1e-12)  # one copy per step
    from loraplex.kernels.cpu_lora import FUSE_AFTER_STEPS

    linears = [_bf16_slots_case(seed=7) for _ in range(3)]
    x = torch.randn(9, linears[0][1].shape[1]).to(torch.bfloat16)
    ranks = linears[0][7]
    made = []
    for _ in range(FUSE_AFTER_STEPS + 3):
        meta = build_lora_meta([1] * 9, ranks)  # one step: every linear sees the same meta
        for slots, w, bias, packed, *_ in linears:
            lora_linear_cpu(x, w, bias, packed, slots, meta)
        made.append(sum(lin[0].fused is not None for lin in linears))
    assert made[FUSE_AFTER_STEPS - 1 :] == [1, 2, 3, 3]


def test_fused_packed_priced_against_the_separate_plans():
    """With the fused copy made, a single-adapter decode step is cheaper fused (one call saved); with
    many adapters of a few tokens each the mask times every adapter's columns may cost more: the cost
    model decides, and without figures nothing fuses."""
    from loraplex.kernels.cpu_plan import fused_packed_cost, plan_cost

    qkv = LinearShape(out_total=960, num_slices=3, r_max=16, in_features=576, elem=2)
    single = build_lora_meta([0] * 32, [16])
    assert choose_plan(32, qkv, single, (48,), True, True, can_fuse=False, fig=EXAMPLE_FIGURES, fused_packed=True) == "fused-packed"
    single = build_lora_meta([0] * 32, [16])
    assert choose_plan(32, qkv, single, (48,), True, True, can_fuse=False, fig=EXAMPLE_FIGURES) != "fused-packed"
    assert choose_plan(32, qkv, single, (48,), True, True, can_fuse=False, fig=None, fused_packed=True) == "grouped"
    many = build_lora_meta(list(range(32)) * 16, [16] * 32)  # a prompt-sized step over 32 adapters
    fused = fused_packed_cost(512, qkv, many, (48,) * 32, EXAMPLE_FIGURES)
    best = min(plan_cost(p, 512, qkv, many, (48,) * 32, True, True, EXAMPLE_FIGURES) for p in ("grouped", "stacked", "rows"))
    plan = choose_plan(512, qkv, many, (48,) * 32, True, True, can_fuse=False, fig=EXAMPLE_FIGURES, fused_packed=True)
    assert (plan == "fused-packed") == (fused < best)


def test_stacked_write_retires_every_layers_fused_packed_copy():
    """16-bit CPU: once each layer's steady active set has its fused packed copy, a LoraSlotStack write
    into one of its slots (all layers at once) drops every layer's copy, as LoraSlots.write does, and the
    next steps serve the new adapter (against the loop over its own tensors)."""
    from loraplex.kernels.cpu_linear import pack_weight
    from loraplex.kernels.cpu_lora import FUSE_AFTER_STEPS
    from loraplex.kernels.lora_slots import LoraSlotStack

    g = torch.Generator().manual_seed(6)
    layers, slices, r_max, in_f, num_slots = 2, [40, 16, 16], 8, 32, 3
    offsets = _offsets(slices)
    stack = LoraSlotStack(layers, in_f, offsets, num_slots, r_max, torch.bfloat16, torch.device("cpu"), with_row_tables=True)
    ws = [(torch.randn(sum(slices), in_f, generator=g) / 4).to(torch.bfloat16) for _ in range(layers)]
    packed = [pack_weight(w) for w in ws]
    if packed[0] is None:
        pytest.skip("this torch build has no oneDNN packed linear")
    views = [LoraSlots(w, None, offsets, num_slots, r_max, with_row_tables=True, stack=stack, layer=i) for i, w in enumerate(ws)]
    truth_a = [torch.zeros(num_slots, 3, r_max, in_f, dtype=torch.float64) for _ in range(layers)]
    truth_b = [torch.zeros(num_slots, sum(slices), r_max, dtype=torch.float64) for _ in range(layers)]

    slot_ranks = [0] * num_slots  # the adapters' ranks, for the step meta (as the engine's)

    def write(slot, r):
        slot_ranks[slot] = r
        per_slice = []
        for j, width in enumerate(slices):
            a = torch.randn(layers, r, in_f, generator=g).to(torch.bfloat16)
            b = torch.randn(layers, width, r, generator=g).to(torch.bfloat16)
            for i in range(layers):
                truth_a[i][slot, j], truth_b[i][slot, offsets[j] : offsets[j + 1]] = 0, 0
                truth_a[i][slot, j, :r], truth_b[i][slot, offsets[j] : offsets[j + 1], :r] = a[i].double(), b[i].double()
            per_slice.append((a, b))
        stack.write(slot, per_slice)

    write(0, 4)
    write(1, 8)
    for view in views:
        view.figures = EXAMPLE_FIGURES
    token_slot = [1] * 9
    x = torch.randn(9, in_f, generator=g).to(torch.bfloat16)

    def step():
        meta = build_lora_meta(token_slot, slot_ranks)
        for i, view in enumerate(views):
            y = lora_linear_cpu(x, ws[i], None, packed[i], view, meta)
            base = x.double() @ ws[i].double().T
            _assert_bf16_close(y, _expected(x.double(), base, truth_a[i], truth_b[i], offsets, token_slot))

    for _ in range(FUSE_AFTER_STEPS + 1):
        step()
    assert all(view.fused is not None for view in views)
    write(1, 5)  # slot 1 gets another adapter, all layers at once
    assert all(view.fused is None for view in views)
    step()  # the new adapter's weights, every layer
    write(0, 3)  # a slot the fused copies do not hold leaves them be
    for view in views:
        view.fuse_seconds = 0.0  # a new copy is repaid at once (cpu_lora.py's rule)
    for _ in range(FUSE_AFTER_STEPS + 1):
        step()
    kept = [view.fused for view in views]
    assert all(f is not None for f in kept)
    write(2, 2)
    assert [view.fused for view in views] == kept
