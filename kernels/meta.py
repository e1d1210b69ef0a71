"""Per-step LoRA metadata: built once per step, passed explicitly to every LoRA-aware linear."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LoraMeta:
    """Tokens of one step grouped by adapter device slot.

    Running example: token_slot = [2, -1, 0, 2, 0]
      sorted_idx = [2, 4, 0, 3]      tokens with a slot, stably sorted by slot
      slot_ids   = [0, 2]            distinct active slots, ascending
      seg_starts = [0, 2, 4]         segment i is sorted_idx[seg_starts[i]:seg_starts[i + 1]]
      seg_ranks  = [16, 8]           true rank of slot_ids[i] (the kernels skip the zero padding above it)
    Tokens with slot -1 get no LoRA delta and appear in no segment.
    """

    token_slot: torch.Tensor  # [num_tokens] int64, -1 = base model only
    sorted_idx: torch.Tensor  # [num_lora_tokens] int64
    slot_ids: torch.Tensor  # [num_active] int64
    seg_starts: torch.Tensor  # [num_active + 1] int64
    seg_ranks: torch.Tensor  # [num_active] int64 true rank of each active slot; -1 = unknown (use r_max)
    slot_ids_list: list[int]  # host copies, so the CPU path never syncs
    seg_starts_list: list[int]
    slot_ranks_list: list[int]  # true rank of each active slot (<= r_max); lets the CPU path skip padding
    num_tokens: int
    max_seg_len: int
    is_single_full: bool  # one slot covers every token in order: no gather/scatter needed
    cache: dict = field(default_factory=dict, repr=False, compare=False)  # per-step derived values (masks, plans)

    @property
    def num_active(self) -> int:
        return len(self.slot_ids_list)

    @property
    def num_lora_tokens(self) -> int:
        return self.seg_starts_list[-1]

    def active_onehot(self, dtype: torch.dtype) -> torch.Tensor:
        """[num_tokens, num_active]: 1 where the token's slot is the j-th active slot (cached per step)."""
        key = ("active_onehot", dtype)
        if key not in self.cache:
            self.cache[key] = (self.token_slot[:, None] == self.slot_ids[None, :]).to(dtype)
        return self.cache[key]

    def slot_onehot(self, lo: int, span: int, dtype: torch.dtype) -> torch.Tensor:
        """[num_tokens, span] mask, 1 where token t uses slot lo + j; built once per step and dtype."""
        key = (lo, span, dtype)
        if key not in self.cache:
            slots = torch.arange(lo, lo + span, device=self.token_slot.device)
            self.cache[key] = (self.token_slot[:, None] == slots[None, :]).to(dtype)
        return self.cache[key]


# Each packed array starts on a multiple of this many int64 elements (16 bytes). Triton specializes a
# pointer argument on whether it is 16-byte aligned: arrays packed back to back would flip that with the
# parity of the lengths before them and trigger a fresh compile in the middle of serving.
_ALIGN_ELEMS = 2


def _aligned(n: int) -> int:
    return -(-n // _ALIGN_ELEMS) * _ALIGN_ELEMS


class MetaBuffers:
    """Preallocated storage for a step's LoRA index arrays. The arrays are packed into one host buffer
    (pinned on CUDA), each starting on a 16-byte boundary, and reach the device in one copy; the
    LoraMeta tensors are views into a device buffer that is reused from step to step (grown only when
    a step needs more)."""

    def __init__(self, device: torch.device | str, capacity: int = 4096) -> None:
        self.device = torch.device(device)
        self._allocate(capacity)

    def _allocate(self, capacity: int) -> None:
        self.capacity = capacity
        on_cuda = self.device.type == "cuda"
        self.host = torch.empty(capacity, dtype=torch.int64, pin_memory=on_cuda)
        self.dev = torch.empty(capacity, dtype=torch.int64, device=self.device) if on_cuda else self.host

    def pack(self, arrays: list[list[int]]) -> list[torch.Tensor]:
        """One view per array, each starting on a 16-byte boundary (the buffers themselves are)."""
        starts, total = [], 0
        for a in arrays:
            starts.append(total)
            total += _aligned(len(a))
        if total > self.capacity:
            self._allocate(max(total, 2 * self.capacity))
        flat: list[int] = []
        for a in arrays:
            flat.extend(a)
            flat.extend([0] * (_aligned(len(a)) - len(a)))  # padding, never read
        self.host[:total] = torch.tensor(flat, dtype=torch.int64)
        if self.dev is not self.host:
            self.dev[:total].copy_(self.host[:total], non_blocking=True)
        return [self.dev[start : start + len(a)] for start, a in zip(starts, arrays, strict=True)]


def build_lora_meta(
    token_slot: list[int],
    slot_ranks: list[int] | None,
    device: torch.device | str = "cpu",
    buffers: MetaBuffers | None = None,
) -> LoraMeta | None:
    """Group a step's tokens by slot. `slot_ranks[s]` is the rank loaded in slot s (None: unknown).
    With `buffers` (the runner keeps one), the tensors are views into its preallocated storage: valid
    until the next build with the same buffers.

    Returns None when no token uses an adapter (the whole step is base-only).
    """
    order = sorted((s, t) for t, s in enumerate(token_slot) if s >= 0)
    if not order:
        return None
    sorted_idx = [t for _, t in order]
    slot_ids: list[int] = []
    seg_starts: list[int] = []
    for i, (s, _) in enumerate(order):
        if not slot_ids or slot_ids[-1] != s:
            slot_ids.append(s)
            seg_starts.append(i)
    seg_starts.append(len(order))
    max_seg = max(b - a for a, b in zip(seg_starts, seg_starts[1:], strict=False))
    ranks = [slot_ranks[s] if slot_ranks is not None else -1 for s in slot_ids]
    is_single_full = len(slot_ids) == 1 and len(order) == len(token_slot)

    arrays = [list(token_slot), sorted_idx, slot_ids, seg_starts, ranks]
    if buffers is not None:
        tensors = buffers.pack(arrays)
    else:
        tensors = [torch.tensor(a, dtype=torch.int64, device=device) for a in arrays]
    return LoraMeta(
        token_slot=tensors[0],
        sorted_idx=tensors[1],
        slot_ids=tensors[2],
        seg_starts=tensors[3],
        seg_ranks=tensors[4],
        slot_ids_list=slot_ids,
        seg_starts_list=seg_starts,
        slot_ranks_list=ranks,
        num_tokens=len(token_slot),
        max_seg_len=max_seg,
        is_single_full=is_single_full,
    )
