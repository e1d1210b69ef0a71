"""The oracle of every LoRA kernel: a plain per-token loop, in float64.

Slots hold one adapter each (see lora_slots.py for the buffers):
    lora_a: [num_slots, num_slices, r_max, in_features]
    lora_b: [num_slots, out_total, r_max]        scale (alpha / r or alpha / sqrt(r)) already folded in
    slice_offsets: [num_slices + 1] column offsets of each output slice (q | k | v, gate | up)
Ranks below r_max are zero-padded, so padding contributes nothing.

Nothing else in the package calls this: the CPU strategies (cpu_lora.py) and the Triton kernels
(lora_shrink.py, lora_expand.py) are tested against it. It is slow on purpose: it says what they compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class LoopResult(NamedTuple):
    h: torch.Tensor  # [num_tokens, num_slices, r_max] float64; zero rows for base-only tokens
    delta: torch.Tensor  # [num_tokens, out_total] float64; zero rows for base-only tokens


def lora_delta_loop(
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a: torch.Tensor,  # [num_slots, num_slices, r_max, in_features]
    lora_b: torch.Tensor,  # [num_slots, out_total, r_max]
    slice_offsets: Sequence[int],  # [num_slices + 1]
    token_slot: Sequence[int],  # [num_tokens]; -1 = base model only
) -> LoopResult:
    """Every token's own LoRA delta, one token and one slice at a time, in float64 on the CPU:

        for t with s = token_slot[t] >= 0, for slice i with columns lo:hi = off[i]:off[i + 1]:
            h[t, i]         = x[t] @ lora_a[s, i].T                    # shrink  [r_max]
            delta[t, lo:hi] = h[t, i] @ lora_b[s, lo:hi].T             # expand  [hi - lo]

    so that y + delta is what a LoRA-aware linear must return for base output y.
    """
    x64, a64, b64 = (t.detach().to("cpu", torch.float64) for t in (x, lora_a, lora_b))
    num_slices, r_max = a64.shape[1], a64.shape[2]
    h = torch.zeros(x64.shape[0], num_slices, r_max, dtype=torch.float64)
    delta = torch.zeros(x64.shape[0], b64.shape[1], dtype=torch.float64)
    for t, s in enumerate(token_slot):
        if s < 0:
            continue
        for i in range(num_slices):
            lo, hi = slice_offsets[i], slice_offsets[i + 1]
            h[t, i] = x64[t] @ a64[s, i].T
            delta[t, lo:hi] = h[t, i] @ b64[s, lo:hi].T
    return LoopResult(h, delta)
