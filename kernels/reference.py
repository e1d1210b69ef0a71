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

from .meta import LoraMeta


def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraMeta) -> torch.Tensor:
    """h[t, i, :] = x[t] @ lora_a[slot[t], i].T in float32; rows of slot -1 tokens are zero."""
    num_slices, r_max = lora_a.shape[1], lora_a.shape[2]
    h = torch.zeros(x.shape[0], num_slices, r_max, dtype=torch.float32, device=x.device)
    for i, slot in enumerate(meta.slot_ids_list):
        idx = meta.sorted_idx[meta.seg_starts_list[i] : meta.seg_starts_list[i + 1]]
        xs = x.index_select(0, idx).float()  # [n, in]
        h[idx] = torch.matmul(xs, lora_a[slot].float().transpose(-1, -2)).transpose(0, 1)
    return h


def lora_expand_ref(
    y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, slice_offsets: list[int], meta: LoraMeta
) -> None:
    """y[t, off[i]:off[i+1]] += h[t, i] @ lora_b[slot[t], off[i]:off[i+1]].T, in place."""
    for i, slot in enumerate(meta.slot_ids_list):
        idx = meta.sorted_idx[meta.seg_starts_list[i] : meta.seg_starts_list[i + 1]]
        hs = h.index_select(0, idx)  # [n, num_slices, r_max]
        delta = torch.cat(
            [
                hs[:, j] @ lora_b[slot, lo:hi].float().T
                for j, (lo, hi) in enumerate(zip(slice_offsets, slice_offsets[1:], strict=False))
            ],
            dim=1,
        )
        y.index_add_(0, idx, delta.to(y.dtype))


def lora_apply_ref(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slice_offsets: list[int],
    meta: LoraMeta,
) -> None:
    """Shrink + expand fused for the CPU path: one matmul pair per distinct slot (and slice), never per token.

    Works in x's dtype (like PEFT's own forward) and skips rank padding using meta.slot_ranks_list.
    y: [num_tokens, out_total] (added in place); x: [num_tokens, in_features].
    """
    num_slices = lora_a.shape[1]
    slices = list(zip(slice_offsets, slice_offsets[1:], strict=False))
    if meta.is_single_full:
        slot, rank = meta.slot_ids_list[0], meta.slot_ranks_list[0]
        rank = rank if rank > 0 else lora_a.shape[2]
        h = torch.matmul(x, lora_a[slot, :, :rank].transpose(-1, -2))  # [num_slices, T, rank]
        for j, (lo, hi) in enumerate(slices):
            y[:, lo:hi].addmm_(h[j], lora_b[slot, lo:hi, :rank].T)
        return
    xs = x.index_select(0, meta.sorted_idx)  # [num_lora_tokens, in]
    delta = torch.empty(xs.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    for i, slot in enumerate(meta.slot_ids_list):
        a, b = meta.seg_starts_list[i], meta.seg_starts_list[i + 1]
        rank = meta.slot_ranks_list[i]
        rank = rank if rank > 0 else lora_a.shape[2]
        h = torch.matmul(xs[a:b], lora_a[slot, :, :rank].transpose(-1, -2))  # [num_slices, n, rank]
        if num_slices == 1:
            torch.mm(h[0], lora_b[slot, :, :rank].T, out=delta[a:b])
        else:
            for j, (lo, hi) in enumerate(slices):
                delta[a:b, lo:hi] = h[j] @ lora_b[slot, lo:hi, :rank].T
    y.index_add_(0, meta.sorted_idx, delta)
