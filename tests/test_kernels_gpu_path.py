"""What the CUDA path of the LoRA kernels needs beyond matching the reference (test_kernels_triton.py):
aligned metadata (no recompiles mid-serving), true per-slot ranks (no bytes read past them), a split-K
fixed by the shape alone, and native 16-bit dots when compiled. Under the interpreter on CPU, except the
`gpu` tests, which check what only a compiled kernel shows."""

from __future__ import annotations

import os
import re

import pytest
import torch

from loraplex.kernels import MetaBuffers, build_lora_meta
from loraplex.kernels.lora_expand import _lora_expand_kernel, lora_expand
from loraplex.kernels.lora_shrink import SPLIT_K, _lora_shrink_kernel, lora_shrink, num_splits, upcast_dots
from loraplex.kernels.lora_slots import LoraSlots
from loraplex.kernels.reference import lora_delta_loop

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def test_packed_meta_arrays_start_on_16_byte_boundaries():
    """Every array handed to a kernel starts 16-byte aligned whatever the lengths before it (Triton
    specializes pointers on that alignment: a flip would recompile mid-serving)."""
    buffers = MetaBuffers("cpu", capacity=4)
    for token_slot in ([0], [1, -1, 0], [2, 2], [0, 1, 2, 3, 4], [-1, 3, 3, 1, 0, 0, 2], list(range(9))):
        meta = build_lora_meta(token_slot, [4] * 10, buffers=buffers)
        assert meta is not None
        for name in ("token_slot", "sorted_idx", "slot_ids", "seg_starts", "seg_ranks"):
            assert getattr(meta, name).data_ptr() % 16 == 0, (token_slot, name)
        fresh = build_lora_meta(token_slot, [4] * 10)
        for name in ("token_slot", "sorted_idx", "slot_ids", "seg_starts", "seg_ranks"):
            assert torch.equal(getattr(meta, name), getattr(fresh, name)), name


def test_seg_ranks_are_the_true_ranks_of_the_active_slots():
    meta = build_lora_meta([3, -1, 0, 3, 5], [16, 1, 1, 8, 1, 4])
    assert meta is not None
    assert meta.slot_ids.tolist() == [0, 3, 5]
    assert meta.seg_ranks.tolist() == [16, 8, 4]
    unknown = build_lora_meta([1, 0], None)
    assert unknown is not None and unknown.seg_ranks.tolist() == [-1, -1]  # the kernels then use r_max


def test_split_count_depends_on_in_features_only():
    assert SPLIT_K % 64 == 0
    assert [num_splits(n) for n in (1, SPLIT_K, SPLIT_K + 1, 4096, 14336)] == [
        1,
        1,
        2,
        -(-4096 // SPLIT_K),
        -(-14336 // SPLIT_K),
    ]
    x_in = 2 * SPLIT_K + 3  # three splits, the last one 3 wide
    a = torch.randn(2, 1, 16, x_in).to(DEVICE)
    for num_tokens in (1, 17):
        meta = build_lora_meta([t % 2 for t in range(num_tokens)], [16, 16], device=DEVICE)
        h = lora_shrink(torch.randn(num_tokens, x_in).to(DEVICE), a, meta)
        assert h.shape == (3, num_tokens, 1, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padding_past_the_true_rank_is_never_read(dtype):
    """Slots of r_max 32 holding rank 8 and 4 adapters, with NaN in the padding of A and B: the result
    is still right, so the kernels read nothing past each slot's true rank. With the ranks unknown they
    read the padding, which the NaN shows (the test can fail)."""
    gen = torch.Generator().manual_seed(0)
    r_max, in_f, ranks = 32, SPLIT_K + 40, [8, 4]
    offsets = [0, 48, 64]
    a = torch.randn(2, 2, r_max, in_f, generator=gen) / in_f**0.5
    b = torch.randn(2, 64, r_max, generator=gen) / 4
    for s, r in enumerate(ranks):
        a[s, :, r:], b[s, :, r:] = 0, 0
    token_slot = [0, 1, -1, 1, 0, 0, 1]
    x = torch.randn(len(token_slot), in_f, generator=gen)
    _, delta = lora_delta_loop(x, a, b, offsets, token_slot)  # zero padding: the true answer
    for s, r in enumerate(ranks):
        a[s, :, r:], b[s, :, r:] = float("nan"), float("nan")
    x, a, b = x.to(DEVICE, dtype), a.to(DEVICE, dtype), b.to(DEVICE, dtype)

    def run(slot_ranks):
        meta = build_lora_meta(token_slot, slot_ranks, device=DEVICE)
        y = torch.zeros(len(token_slot), 64, dtype=dtype, device=DEVICE)
        lora_expand(y, lora_shrink(x, a, meta), b, offsets, meta)
        return y.cpu().double()

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(run(ranks), delta, rtol=tol, atol=tol)
    assert torch.isnan(run(None)[[0, 1]]).any()


def test_upcast_only_under_the_interpreter():
    assert upcast_dots(torch.zeros(1))  # CPU tensors only ever run under the interpreter
    if torch.cuda.is_available():
        assert upcast_dots(torch.zeros(1, device="cuda")) == (os.environ.get("TRITON_INTERPRET") == "1")


def _kernel_cache_size(fn) -> int:
    return sum(len(entry[0]) for entry in fn.device_caches.values())


@pytest.mark.gpu
def test_no_recompile_across_batches():
    """Steps of every token count, adapter count and rank mix reuse one compiled shrink and expand per
    dtype (aligned metadata, stride_hs not specialized)."""
    slots = LoraSlots(torch.randn(192, 128, device="cuda"), None, [0, 128, 192], 6, 16, with_row_tables=False)
    gen = torch.Generator().manual_seed(0)
    for s in range(6):
        slots.write(s, [(torch.randn(8 + s, 128, generator=gen), torch.randn(w, 8 + s, generator=gen)) for w in (128, 64)])
    sizes, buffers = [], MetaBuffers("cuda")
    for step in range(24):
        n = 1 + (step * 7) % 23
        token_slot = [(t * (step + 1)) % 7 - 1 for t in range(n)]
        meta = build_lora_meta(token_slot, [8 + s for s in range(6)], device="cuda", buffers=buffers)
        if meta is None:
            continue
        x = torch.randn(n, 128, device="cuda")
        y = torch.zeros(n, 192, device="cuda")
        lora_expand(y, lora_shrink(x, slots.lora_a, meta), slots.lora_b, slots.slice_offsets, meta)
        sizes.append((_kernel_cache_size(_lora_shrink_kernel), _kernel_cache_size(_lora_expand_kernel)))
    torch.cuda.synchronize()
    assert len(set(sizes)) == 1, sizes


@pytest.mark.gpu
def test_compiled_16_bit_dots_are_native():
    """Compiled for the GPU, bf16 tiles meet in bf16 MMA instructions (tensor cores), not fp32 FMAs."""
    slots = LoraSlots(torch.randn(64, 256, device="cuda", dtype=torch.bfloat16), None, [0, 64], 2, 16, with_row_tables=False)
    meta = build_lora_meta([0, 1, 0], [16, 16], device="cuda")
    x = torch.randn(3, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(3, 64, device="cuda", dtype=torch.bfloat16)
    lora_expand(y, lora_shrink(x, slots.lora_a, meta), slots.lora_b, slots.slice_offsets, meta)
    for fn in (_lora_shrink_kernel, _lora_expand_kernel):
        ptx = [k.asm["ptx"] for entry in fn.device_caches.values() for k in entry[0].values()]
        assert any(re.search(r"mma[^\n]*\.bf16", p) for p in ptx), fn  # an MMA instruction on bf16 operands
