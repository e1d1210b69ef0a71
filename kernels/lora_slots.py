"""The adapter slots of one (possibly fused) linear: every layout the kernels read, and one write path.

Layouts (num_slices output slices at column offsets off[0..num_slices], slots of rank r_max):
    weight_ext: [out_total + num_slots * num_slices * r_max, in]   W, then every slot's A rows under it,
                so the CPU fused-single plan computes the base output and the shrink in one matmul
    lora_a:     weight_ext[out_total:] viewed [num_slots, num_slices, r_max, in]
    lora_b:     [num_slots, out_total, r_max], a view of a slot-minor [out_total, num_slots, r_max] buffer
                (scale folded in), so a contiguous range of slots of one output slice is a plain 2-D
                matrix (the CPU dense strategy)
    rows:       CPU only, optional: the same weights as row tables (RowTables), read in place by the
                CPU rows strategy; memory: one more copy of the slots
figures (not a layout): the CPU cost model's per-machine CostFigures, or None (no cost model: "grouped").
Ranks below r_max are zero-padded: padding contributes nothing to any sum. `slice_ranks[s][i]` is the
true rank slot s holds for slice i (0: its adapter does not target that slice), and `versions[s]` counts
writes to slot s, so a derived copy of a slot (the CPU stacked strategy's, kernels/cpu_lora.py) knows
when it is stale.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from .cpu_plan import CostFigures

# (shape, dtype, device) -> a zero-filled tensor; the engine passes one that maps large CPU buffers lazily.
ZerosFactory = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


class RowTables(NamedTuple):
    """The slots as row tables, for the CPU rows strategy (embedding_bag reads each token's rows):
    a: [num_slots * in, num_slices * r_max]    row s * in + i    = A[s, :, :, i] of every slice
    b: per slice j, [num_slots * r_max, width_j]   row s * r_max + k = B[s, off[j]:off[j + 1], k]"""

    a: torch.Tensor
    b: list[torch.Tensor]


def row_tables(lora_a: torch.Tensor, lora_b: torch.Tensor, slice_offsets: Sequence[int]) -> RowTables:
    """Row tables built from whole slot buffers lora_a [num_slots, num_slices, r_max, in] and
    lora_b [num_slots, out_total, r_max] (tests; the model keeps its own tables in step by LoraSlots.write)."""
    num_slots, num_slices, r_max, in_f = lora_a.shape
    a = lora_a.permute(0, 3, 1, 2).reshape(num_slots * in_f, num_slices * r_max).contiguous()
    b = [
        lora_b[:, c0:c1].transpose(1, 2).reshape(num_slots * r_max, c1 - c0).contiguous()
        for c0, c1 in zip(slice_offsets, slice_offsets[1:], strict=False)
    ]
    return RowTables(a, b)


class LoraSlots:
    """Slot buffers of one linear with base weight [out_total, in]. The base weight and bias move into
    the front of weight_ext / bias_ext (the linear keeps views of them: no second copy of W)."""

    def __init__(
        self,
        weight: torch.Tensor,  # [out_total, in]
        bias: torch.Tensor | None,  # [out_total]
        slice_offsets: Sequence[int],
        num_slots: int,
        r_max: int,
        *,
        with_row_tables: bool,
        copy_weight: bool = True,
        zeros: ZerosFactory = _zeros,
    ) -> None:
        """copy_weight=False leaves W and the bias zero (the loader fills the views afterwards)."""
        out_total, in_f = weight.shape
        dtype, device = weight.dtype, weight.device
        self.slice_offsets = list(slice_offsets)
        self.num_slots, self.r_max, self.out_total = num_slots, r_max, out_total
        num_slices = len(self.slice_offsets) - 1
        self.weight_ext = zeros((out_total + num_slots * num_slices * r_max, in_f), dtype, device)
        if copy_weight:
            self.weight_ext[:out_total] = weight
        self.bias_ext: torch.Tensor | None = None
        if bias is not None:  # zeros under the A rows: the fused matmul adds nothing to h
            self.bias_ext = torch.zeros(self.weight_ext.shape[0], dtype=dtype, device=device)
            if copy_weight:
                self.bias_ext[:out_total] = bias
        self.lora_a = self.weight_ext[out_total:].view(num_slots, num_slices, r_max, in_f)
        self.lora_b = zeros((out_total, num_slots, r_max), dtype, device).transpose(0, 1)
        self.slice_ranks: list[list[int]] = [[0] * num_slices for _ in range(num_slots)]
        self.versions: list[int] = [0] * num_slots
        self.stack_cache: dict = {}  # the CPU stacked strategy's copies of the active slots (cpu_lora.py)
        # CPU fused-packed plan (cpu_lora.py): the one packed [W; A_stack] copy (a FusedPacked) and the
        # (active set, steps in a row) count that decides when to make one
        self.fused: Any = None
        self.steady: tuple[tuple | None, int] = (None, 0)
        self.fuse_seconds = 0.0  # how long the last fused copy took to make
        self.rows: RowTables | None = None
        # The CPU cost model's per-machine figures (cpu_calibrate.py); the model sets them after start-up
        # calibration. None: the CPU path uses "grouped" (exact for every step) without a cost model.
        self.figures: CostFigures | None = None
        if with_row_tables:
            self.rows = RowTables(
                zeros((num_slots * in_f, num_slices * r_max), dtype, device),
                [zeros((num_slots * r_max, c1 - c0), dtype, device) for c0, c1 in self._slices()],
            )

    @property
    def weight(self) -> torch.Tensor:  # [out_total, in], a view
        return self.weight_ext[: self.out_total]

    @property
    def bias(self) -> torch.Tensor | None:  # [out_total], a view
        return None if self.bias_ext is None else self.bias_ext[: self.out_total]

    def _slices(self) -> list[tuple[int, int]]:
        return list(zip(self.slice_offsets, self.slice_offsets[1:], strict=False))

    def write(self, slot: int, per_slice: Sequence[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Put one adapter into slot `slot`: per output slice i, (A [r, in], B [width_i, r] scaled) or None
        (the adapter does not target it). What it does not fill (ranks r..r_max, untargeted slices) is
        zeroed, so nothing of the slot's previous adapter remains; the row tables follow the slot."""
        r_max = self.r_max
        for i, (c0, c1) in enumerate(self._slices()):
            ab = per_slice[i]
            r = 0 if ab is None else ab[0].shape[0]
            if ab is not None and r:
                self.lora_a[slot, i, :r].copy_(ab[0])
                self.lora_b[slot, c0:c1, :r].copy_(ab[1])
            if r < r_max:
                self.lora_a[slot, i, r:].zero_()
                self.lora_b[slot, c0:c1, r:].zero_()
            self.slice_ranks[slot][i] = r
        self.versions[slot] += 1
        if self.fused is not None and slot in self.fused.stack.slots:  # stale now: free its memory at once
            self.fused = None
        if self.rows is not None:
            self._copy_slot_to_rows(slot)

    def _copy_slot_to_rows(self, slot: int) -> None:
        """Refresh slot `slot`'s rows of the row tables: the values row_tables gives, padding included."""
        assert self.rows is not None
        _, num_slices, r_max, in_f = self.lora_a.shape
        at = self.rows.a[slot * in_f : (slot + 1) * in_f].view(in_f, num_slices, r_max)
        at.copy_(self.lora_a[slot].permute(2, 0, 1))
        for bt, (c0, c1) in zip(self.rows.b, self._slices(), strict=True):
            bt[slot * r_max : (slot + 1) * r_max].copy_(self.lora_b[slot, c0:c1].T)

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer this object owns (for memory accounting)."""
        owned = [self.weight_ext, self.lora_b]
        if self.bias_ext is not None:
            owned.append(self.bias_ext)
        if self.rows is not None:
            owned += [self.rows.a, *self.rows.b]
        return owned
