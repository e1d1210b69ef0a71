"""Triton lora_shrink / lora_expand against the float64 per-token loop (kernels/reference.py), plus batch
invariance and dispatch.

Without CUDA these run under the Triton interpreter on CPU tensors (conftest.py switches it on), which
is slow: sizes stay small except a few targeted cases (hidden 2049, 300 tokens, 32 adapters, rank 64).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace

import pytest
import torch

from loraplex.kernels import build_lora_meta, lora_apply, lora_delta_cpu
from loraplex.kernels.lora_expand import lora_expand
from loraplex.kernels.lora_shrink import lora_shrink, num_splits
from loraplex.kernels.reference import lora_delta_loop

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"

# |got - want| <= atol + rtol * |want|: the final rounding to the output dtype dominates the fp32 accumulation.
TOL = {
    torch.float32: {"rtol": 2e-5, "atol": 2e-5},
    torch.float16: {"rtol": 1e-3, "atol": 1e-3},
    torch.bfloat16: {"rtol": 8e-3, "atol": 8e-3},
}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclass
class Case:
    x: torch.Tensor  # [T, in]
    lora_a: torch.Tensor  # [num_slots, num_slices, r_max, in]
    lora_b: torch.Tensor  # [num_slots, out_total, r_max]
    slice_offsets: list[int]
    token_slot: list[int]  # [T], -1 = no adapter
    slot_ranks: list[int]  # true rank per slot (<= r_max, rest zero-padded)


def make_case(
    num_tokens: int,
    num_slots: int,
    r_max: int,
    widths: list[int],
    in_features: int,
    dtype: torch.dtype,
    seed: int = 0,
    frac_base: float = 0.2,
) -> Case:
    """Random weights with O(1) h and delta; uneven segments; some slots never used; some ranks padded."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    offsets = [0]
    for w in widths:
        offsets.append(offsets[-1] + w)
    num_slices = len(widths)
    # Skewed slot popularity: segments of very different lengths; about a quarter of the slots stay empty.
    used = [s for s in range(num_slots) if rng.random() < 0.75] or [0]
    weights = [rng.random() ** 3 + 0.01 for _ in used]
    token_slot = [
        -1 if rng.random() < frac_base else rng.choices(used, weights)[0] for _ in range(num_tokens)
    ]
    slot_ranks = [r_max if s % 2 == 0 else rng.randint(1, r_max) for s in range(num_slots)]

    x = torch.randn(num_tokens, in_features, generator=gen)
    lora_a = torch.randn(num_slots, num_slices, r_max, in_features, generator=gen) / in_features**0.5
    lora_b = torch.randn(num_slots, offsets[-1], r_max, generator=gen) / r_max**0.5
    for s, rank in enumerate(slot_ranks):
        lora_a[s, :, rank:] = 0
        lora_b[s, :, rank:] = 0
    return Case(
        x=x.to(dtype).to(DEVICE),
        lora_a=lora_a.to(dtype).to(DEVICE),
        lora_b=lora_b.to(dtype).to(DEVICE),
        slice_offsets=offsets,
        token_slot=token_slot,
        slot_ranks=slot_ranks,
    )


def run_triton(case: Case, y: torch.Tensor, meta) -> torch.Tensor:
    """Shrink into NaN-poisoned split-K partials h, then expand into y (in place). Returns h
    [num_splits, T, num_slices, r_max]."""
    num_slices, r_max, in_features = case.lora_a.shape[1:]
    h = torch.full((num_splits(in_features), len(case.token_slot), num_slices, r_max), float("nan"), device=DEVICE)
    assert lora_shrink(case.x, case.lora_a, meta, out=h) is h
    lora_expand(y, h, case.lora_b, case.slice_offsets, meta)
    return h


def check_against_reference(case: Case, dtype: torch.dtype) -> None:
    meta = build_lora_meta(case.token_slot, case.slot_ranks, device=DEVICE)
    if meta is None:
        pytest.skip("no LoRA token drawn")
    out_total = case.slice_offsets[-1]
    y_in = torch.randn(len(case.token_slot), out_total, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = y_in.to(DEVICE, copy=True)  # poisoned output: random values the kernel must add to, not overwrite
    h = run_triton(case, y, meta)
    h_ref, delta_ref = lora_delta_loop(case.x, case.lora_a, case.lora_b, case.slice_offsets, case.token_slot)

    lora_rows = torch.tensor([t for t, s in enumerate(case.token_slot) if s >= 0], dtype=torch.long)
    base_rows = torch.tensor([t for t, s in enumerate(case.token_slot) if s < 0], dtype=torch.long)
    h, y = h.cpu(), y.cpu()
    # Every LoRA token's h row is written up to its slot's true rank, and its split-K partials add up to
    # the reference; columns past the rank (zero padding) and slot -1 rows are written by nobody.
    rank_of = torch.tensor([case.slot_ranks[s] if s >= 0 else 0 for s in case.token_slot])
    below_rank = torch.arange(h.shape[-1])[None, :] < rank_of[:, None]  # [T, r_max]
    written = below_rank[None, :, None, :].expand_as(h)
    assert torch.isfinite(h[written]).all()
    assert torch.isnan(h[~written]).all()
    h_sum = h.nan_to_num().double().sum(0)  # [T, num_slices, r_max], zeros where unwritten
    torch.testing.assert_close(h_sum[lora_rows], h_ref[lora_rows], rtol=1e-4, atol=1e-4)
    # y_out - y_in == delta on LoRA rows, up to the rounding of y_in + delta to the dtype (hence the
    # tolerance relative to y_in + delta); base rows untouched bit for bit. The kernel, like PEFT and the
    # CPU path, holds h in the adapter's dtype for the expand: so does the expected delta, from the h just
    # checked against the reference (rounding h_ref instead could land one ulp of h apart on a tie).
    delta_want = delta_of(h_sum.float().to(dtype).double(), case) if dtype != F32 else delta_ref
    want = y_in[lora_rows].double() + delta_want[lora_rows]
    torch.testing.assert_close(y[lora_rows].double(), want, **TOL[dtype])
    assert torch.equal(y[base_rows], y_in[base_rows])


def delta_of(h: torch.Tensor, case: Case) -> torch.Tensor:
    """[T, out_total] float64: every LoRA token's h [T, num_slices, r_max] times its slot's B."""
    b64 = case.lora_b.cpu().double()
    delta = torch.zeros(h.shape[0], case.slice_offsets[-1], dtype=torch.float64)
    for t, s in enumerate(case.token_slot):
        for i, (lo, hi) in enumerate(zip(case.slice_offsets, case.slice_offsets[1:], strict=False)):
            if s >= 0:
                delta[t, lo:hi] = h[t, i] @ b64[s, lo:hi].T
    return delta


# (num_tokens, num_slots, r_max, slice widths, in_features)
SMALL_SHAPES = [
    (1, 1, 1, [16], 32),  # one token, rank 1
    (5, 3, 8, [40, 24], 17),  # odd hidden smaller than one K block
    (40, 6, 16, [48, 16, 16], 96),  # GQA-like q | k | v
    (24, 32, 64, [70], 65),  # 32 adapters, rank 64, width not a block multiple
    (19, 4, 16, [1, 130, 64], 80),  # width-1 slice, a slice crossing two column blocks
]


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=str)
@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=str)
def test_shrink_expand_match_reference(shape, dtype):
    num_tokens, num_slots, r_max, widths, in_features = shape
    case = make_case(num_tokens, num_slots, r_max, widths, in_features, dtype, seed=num_tokens)
    check_against_reference(case, dtype)


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((300, 8, 16, [96, 32, 32], 64), BF16),  # many tokens, long segments
        ((48, 5, 8, [40, 24], 2049), F32),  # odd hidden size, many K steps
        ((64, 32, 64, [33, 33], 2049), F16),  # hidden 2049 with rank 64 and 32 adapters
        ((160, 16, 1, [50, 25, 25], 48), F16),  # rank 1, 16 adapters
        ((300, 32, 64, [576, 192, 192], 2049), BF16),  # SmolLM-like GQA qkv, everything at once
    ],
    ids=str,
)
def test_targeted_big_cases(shape, dtype):
    num_tokens, num_slots, r_max, widths, in_features = shape
    case = make_case(num_tokens, num_slots, r_max, widths, in_features, dtype, seed=7)
    check_against_reference(case, dtype)


@pytest.mark.parametrize("seed", range(12))
def test_random_configs(seed):
    rng = random.Random(1000 + seed)
    dtype = rng.choice([F32, F16, BF16])
    widths = [rng.randint(1, 100) for _ in range(rng.randint(1, 3))]
    num_tokens, num_slots = rng.randint(1, 120), rng.randint(1, 32)
    r_max, in_features = rng.choice([1, 8, 16, 64]), rng.choice([16, 33, 64, 127, 200])
    case = make_case(
        num_tokens, num_slots, r_max, widths, in_features, dtype, seed=seed, frac_base=rng.random() / 2
    )
    check_against_reference(case, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_single_slot_and_mostly_base(dtype):
    # One slot covering every token in order (meta.is_single_full), then one LoRA token among base tokens.
    case = make_case(20, 2, 16, [24, 8], 40, dtype, seed=3, frac_base=0.0)
    case.token_slot = [1] * 20
    check_against_reference(case, dtype)
    case.token_slot = [-1] * 20
    case.token_slot[13] = 0
    check_against_reference(case, dtype)


def composition_runs(dtype: torch.dtype) -> tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]:
    """h and y of the same 10 token rows run alone, crowded into one slot, and in a mixed batch (each
    time shuffled to other positions and tile offsets). Returns (rows with an adapter, [(h, y)] x 3)."""
    widths, r_max, in_features, num_slots = [40, 24, 24], 16, 70, 6
    case = make_case(70, num_slots, r_max, widths, in_features, dtype, seed=11, frac_base=0.1)
    out_total = sum(widths)
    gen = torch.Generator().manual_seed(5)
    y_all = torch.randn(70, out_total, generator=gen).to(dtype).to(DEVICE)
    # The rows under test: tokens 0..9 with their own slots (several sharing slot 2 to share a tile).
    watched = list(range(10))
    slots = [2, 2, 0, 5, -1, 2, 3, 2, 0, 2]

    def run(companions: list[int], companion_slots: list[int], order_seed: int) -> tuple[torch.Tensor, ...]:
        rows = watched + companions
        token_slot = slots + companion_slots
        perm = list(range(len(rows)))
        random.Random(order_seed).shuffle(perm)  # watched tokens land at other positions and tile offsets
        rows = [rows[p] for p in perm]
        token_slot = [token_slot[p] for p in perm]
        meta = build_lora_meta(token_slot, case.slot_ranks, device=DEVICE)
        sub = Case(case.x[rows], case.lora_a, case.lora_b, case.slice_offsets, token_slot, case.slot_ranks)
        y = y_all[rows].clone()
        h = run_triton(sub, y, meta)
        where = [perm.index(i) for i in range(len(watched))]  # position of watched token i
        return h[:, where].nan_to_num().sum(0).cpu(), y[where].cpu()  # h: the split-K partials added up

    runs = [
        run([], [], order_seed=0),  # alone
        run(list(range(10, 30)), [2] * 20, order_seed=1),  # crowded into the same slot
        run(list(range(10, 70)), [(t * 5) % 7 - 1 for t in range(60)], order_seed=2),  # mixed batch
    ]
    return [i for i, s in enumerate(slots) if s >= 0], runs


# Under the Triton interpreter a tl.dot is numpy's BLAS, and on some CPUs (seen on AMD EPYC) a row's sum
# depends on where the row sits in the tile: there the rows agree to a few ulps, not bit for bit.
# h is fp32 in every case (rel. ~1e-6 apart at most); y is rounded to the output dtype, so one ulp of it
# (bf16: 2**-8 relative) may differ.
COMPOSITION_TOL = {
    torch.float32: ({"rtol": 1e-5, "atol": 1e-5}, {"rtol": 1e-5, "atol": 1e-5}),
    torch.bfloat16: ({"rtol": 1e-5, "atol": 1e-5}, {"rtol": 2**-7, "atol": 2**-7}),
}


@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_batch_composition_invariance(dtype):
    """The same token rows give the same h and y rows whatever tokens share the batch (within the stated
    tolerance, so that this holds under the interpreter on any CPU)."""
    lora, runs = composition_runs(dtype)
    h_tol, y_tol = COMPOSITION_TOL[dtype]
    h1, y1 = runs[0]
    for h, y in runs[1:]:
        torch.testing.assert_close(h[lora], h1[lora], **h_tol)
        torch.testing.assert_close(y, y1, **y_tol)
        assert torch.equal(y[4], y1[4])  # the base-only row is never written


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_batch_composition_invariance_bit_exact(dtype):
    """Compiled for a GPU, the kernels' per-row reduction order does not depend on the batch: bit-exact."""
    lora, runs = composition_runs(dtype)
    h1, y1 = runs[0]
    for h, y in runs[1:]:
        assert torch.equal(h[lora], h1[lora])
        assert torch.equal(y, y1)


def test_lora_apply_dispatch():
    case = make_case(30, 4, 8, [32, 16, 16], 48, F32, seed=2)
    meta = build_lora_meta(case.token_slot, case.slot_ranks, device=DEVICE)
    y0 = torch.randn(30, 64, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    args = (case.x, case.lora_a, case.lora_b, case.slice_offsets, meta)

    y_ref = y0.clone()
    lora_delta_cpu(y_ref, *args)
    for backend in ("auto", "triton", "torch"):
        y = y0.clone()
        lora_apply(y, *args, backend=backend)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        lora_apply(y0.clone(), *args, backend="cuda")


def test_wrappers_reject_bad_inputs():
    case = make_case(6, 2, 8, [16, 16], 24, F32, seed=4, frac_base=0.0)
    meta = build_lora_meta(case.token_slot, case.slot_ranks, device=DEVICE)
    with pytest.raises(TypeError):
        lora_shrink(case.x.half(), case.lora_a, meta)
    with pytest.raises(ValueError):
        lora_shrink(case.x[:, :20], case.lora_a, meta)
    with pytest.raises(ValueError):
        lora_shrink(case.x.t().contiguous().t(), case.lora_a, meta)
    h = lora_shrink(case.x, case.lora_a, meta)
    y = torch.zeros(6, 32, device=DEVICE)
    with pytest.raises(ValueError):
        lora_expand(y, h, case.lora_b, [0, 16, 30], meta)
    with pytest.raises(TypeError):
        lora_expand(y, h.double(), case.lora_b, case.slice_offsets, meta)
    with pytest.raises(TypeError):
        lora_expand(y.half(), h, case.lora_b, case.slice_offsets, meta)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_gpu_realistic_shapes(dtype):
    # Llama-7B-like qkv with GQA widths, hidden 4096, 256 decode tokens over 32 adapters, rank 64.
    case = make_case(256, 32, 64, [4096, 1024, 1024], 4096, dtype, seed=9)
    check_against_reference(case, dtype)


def test_model_with_triton_path_gives_same_greedy_tokens(tmp_path, monkeypatch):
    """The whole model with LoRA through the Triton kernels (interpreter on CPU) decodes exactly like the
    torch CPU path: several adapters and base-only requests in one batch."""
    from tiny_models import save_peft_adapter, save_tiny_model

    from loraplex.config import Config
    from loraplex.engine.engine import Engine
    from loraplex.scheduler.sampling_params import SamplingParams

    base = save_tiny_model(tmp_path / "base", "llama", seed=2)
    adapters = {
        "qv": save_peft_adapter(base, tmp_path / "qv", 8, 16, ["q_proj", "v_proj"], False, seed=1),
        "all": save_peft_adapter(base, tmp_path / "all", 4, 8, "all-linear", True, seed=2),
    }
    cfg = Config(model=str(base), adapters=tuple((n, str(p)) for n, p in adapters.items()), dtype="float32", max_lora_rank=16)
    prompts = [[5, 9, 100, 7], [3] * 11, [250, 1, 2], [42, 43]]
    which = ["qv", "all", None, "all"]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    reference = [r.token_ids for r in Engine(replace(cfg, lora_backend="torch")).generate(prompts, which, params)]
    import loraplex.kernels.lora_shrink as shrink_module

    calls = {"n": 0}
    real = shrink_module.lora_shrink

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(shrink_module, "lora_shrink", counting)
    triton_tokens = [r.token_ids for r in Engine(replace(cfg, lora_backend="triton")).generate(prompts, which, params)]
    assert calls["n"] > 0  # the Triton kernels really ran
    assert triton_tokens == reference
