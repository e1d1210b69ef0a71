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
Readers read a slot up to its adapter's rank R at most (the step meta's rank for the slot; some read each
slice's own rank): above R a slot may hold an earlier adapter's values (LoraSlotStack.write; a slot
written per layer by LoraSlots.write holds zeros there). Below R, above a slice's own rank, one side of
each product (A, and the B row table) is zero, so that padding contributes nothing to any sum. Reading
with the rank unknown (r_max) is exact only for slots written per layer. `slice_ranks[s][i]` is the
true rank slot s holds for slice i (0: its adapter does not target that slice), and `versions[s]` counts
writes to slot s, so a derived copy of a slot (the CPU stacked strategy's, kernels/cpu_lora.py) knows
when it is stale.

LoraSlotStack holds these buffers for one module kind of EVERY layer, stacked on a leading layer axis
([num_layers, ...]); each layer's LoraSlots then holds views of its layer (same shapes and strides as
buffers of its own), and one adapter goes into a slot of all layers with a few large copies per slice
(LoraSlotStack.write) instead of a few small copies per layer and slice.
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
        stack: LoraSlotStack | None = None,
        layer: int = 0,
    ) -> None:
        """copy_weight=False leaves W and the bias zero (the loader fills the views afterwards). With
        `stack`, the buffers are views of layer `layer` of the stack's (which must fit) instead of own."""
        out_total, in_f = weight.shape
        dtype, device = weight.dtype, weight.device
        self.slice_offsets = list(slice_offsets)
        self.num_slots, self.r_max, self.out_total = num_slots, r_max, out_total
        num_slices = len(self.slice_offsets) - 1
        self._stack = stack
        if stack is not None:
            stack.check_fits(out_total, in_f, self.slice_offsets, num_slots, r_max, with_row_tables, dtype)
            stack.views.append(self)  # its write() keeps our slice_ranks / versions
            self.weight_ext = stack.weight_ext[layer]
        else:
            self.weight_ext = zeros((out_total + num_slots * num_slices * r_max, in_f), dtype, device)
        if copy_weight:
            self.weight_ext[:out_total] = weight
        self.bias_ext: torch.Tensor | None = None
        if bias is not None:  # zeros under the A rows: the fused matmul adds nothing to h
            self.bias_ext = torch.zeros(self.weight_ext.shape[0], dtype=dtype, device=device)
            if copy_weight:
                self.bias_ext[:out_total] = bias
        self.lora_a = self.weight_ext[out_total:].view(num_slots, num_slices, r_max, in_f)
        self.slice_ranks: list[list[int]] = [[0] * num_slices for _ in range(num_slots)]
        self.versions: list[int] = [0] * num_slots
        self.stack_cache: dict = {}  # the CPU stacked strategy's copies of the active slots (cpu_lora.py)
        self.rows_cache: dict = {}  # the CPU rows strategy's compact A tables of active sets (cpu_lora.py)
        # CPU merged / fused-packed plans (cpu_lora.py): the one packed copy of an active set (a MergedPacked
        # W + B A, or a FusedPacked [W; A_stack]) and the (active set, steps in a row) count that decides
        # when to make one
        self.fused: Any = None
        self.steady: tuple[tuple | None, int] = (None, 0)
        self.fuse_seconds = 0.0  # how long the last such copy took to make
        self.merge = True  # whether the merged plan may serve (Config.cpu_lora_merge)
        # The CPU cost model's per-machine figures (cpu_calibrate.py); the model sets them after start-up
        # calibration. None: the CPU path uses "grouped" (exact for every step) without a cost model.
        self.figures: CostFigures | None = None
        self.rows: RowTables | None = None
        if stack is not None:
            self.lora_b = stack.lora_b[layer].transpose(0, 1)
            if stack.rows is not None:
                self.rows = RowTables(stack.rows.a[layer], [b[layer] for b in stack.rows.b])
            return
        self.lora_b = zeros((out_total, num_slots, r_max), dtype, device).transpose(0, 1)
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
        if self._stack is not None:  # from now on the stack must zero this slot up to r_max in every layer
            self._stack.touched(slot, r_max)
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
        if self.fused is not None and slot in self.fused.key[0]:  # stale now: free its memory at once
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
        """Every buffer this object owns (for memory accounting; views of a stack's buffers when stacked)."""
        owned = [self.weight_ext, self.lora_b]
        if self.bias_ext is not None:
            owned.append(self.bias_ext)
        if self.rows is not None:
            owned += [self.rows.a, *self.rows.b]
        return owned


class LoraSlotStack:
    """The slot buffers of one module kind (one fused linear) of all num_layers layers, stacked:
        weight_ext: [num_layers, out_total + num_slots * num_slices * r_max, in]   layer i = its weight_ext
        lora_b:     [num_layers, out_total, num_slots, r_max]   slot-minor; layer i = its lora_b buffer
        rows:       optional, a: [num_layers, num_slots * in, num_slices * r_max],
                    b: per slice j, [num_layers, num_slots * r_max, width_j]
    Each layer's LoraSlots(stack=self, layer=i) views its layer, so the kernels see the usual layouts.
    All buffers come from the zeros factory (lazily mapped on CPU: untouched pages cost nothing).

    write() puts one adapter into a slot of every layer at once: per slice one copy for A, one for B
    and one per row table, from host copies laid out [num_layers, ...].

    Every reader of a slot reads at most its adapter's rank R (the largest of its slices' ranks: the
    step meta's rank for the slot; the CPU copies read each slice's own rank). So a write zeroes only
    what R covers above a slice's own rank r_i, and only on one side of each pair the kernels multiply:
    A (weight_ext) and the row tables' B, ranks [r_i, R). Their partners (lora_b, the row table of A)
    may keep earlier adapters' values there, and every buffer may keep them at ranks >= R: no reader
    reaches those, and where one reads a partner, the other side gives an exact zero (finite values:
    loads reject inf / nan). The output equals a fresh slot's to the bit, and a host hit of a rank-16
    adapter (every slice at 16) over a rank-64 one zeroes nothing. A clear (unload: no slice given)
    zeroes everything the slot ever held. Per slot: above extent[slot], A and the row tables' B are
    zero; above dirty[slot] every buffer is."""

    def __init__(
        self,
        num_layers: int,
        in_features: int,
        slice_offsets: Sequence[int],
        num_slots: int,
        r_max: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        with_row_tables: bool,
        zeros: ZerosFactory = _zeros,
    ) -> None:
        self.slice_offsets = list(slice_offsets)
        self.num_layers, self.num_slots, self.r_max = num_layers, num_slots, r_max
        self.in_features, self.out_total = in_features, self.slice_offsets[-1]
        self.dtype, self.device = dtype, device
        num_slices = len(self.slice_offsets) - 1
        ext_rows = self.out_total + num_slots * num_slices * r_max
        self.weight_ext = zeros((num_layers, ext_rows, in_features), dtype, device)
        self.lora_b = zeros((num_layers, self.out_total, num_slots, r_max), dtype, device)
        self.rows: RowTables | None = None
        if with_row_tables:
            self.rows = RowTables(
                zeros((num_layers, num_slots * in_features, num_slices * r_max), dtype, device),
                [zeros((num_layers, num_slots * r_max, c1 - c0), dtype, device) for c0, c1 in self._slices()],
            )
        # Per slot: every rank index >= extent[slot] is zero in every layer and slice of A (weight_ext) and
        # of the row tables' B; every rank index >= dirty[slot] in all buffers (see the class docstring).
        self.extent = [0] * num_slots
        self.dirty = [0] * num_slots
        self.views: list[LoraSlots] = []  # the layers' LoraSlots viewing this stack

    def _slices(self) -> list[tuple[int, int]]:
        return list(zip(self.slice_offsets, self.slice_offsets[1:], strict=False))

    def check_fits(
        self,
        out_total: int,
        in_f: int,
        slice_offsets: list[int],
        num_slots: int,
        r_max: int,
        with_row_tables: bool,
        dtype: torch.dtype,
    ) -> None:
        """Raise ValueError unless a LoraSlots of these arguments can view this stack's layers."""
        want = (out_total, in_f, slice_offsets, num_slots, r_max, with_row_tables, dtype)
        have = (
            self.out_total, self.in_features, self.slice_offsets, self.num_slots, self.r_max,
            self.rows is not None, self.dtype,
        )  # fmt: skip
        if want != have:
            raise ValueError(f"LoraSlots {want} does not fit the stack {have}")

    def touched(self, slot: int, rank: int) -> None:
        """Someone writes slot `slot` up to rank `rank` (a per-layer LoraSlots.write, or write())."""
        self.extent[slot] = max(self.extent[slot], rank)
        self.dirty[slot] = max(self.dirty[slot], rank)

    def write(
        self,
        slot: int,
        per_slice: Sequence[tuple[torch.Tensor, torch.Tensor] | None],
        rows_per_slice: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
        rank: int | None = None,
    ) -> None:
        """Put one adapter into slot `slot` of every layer: per output slice i, (A [num_layers, r_i, in],
        B [num_layers, width_i, r_i] scaled) or None (not targeted in any layer). Layers an adapter does
        not target must hold zeros there; ranks r_i..R and untargeted slices end up zero in A and in the
        row tables' B, so nothing of the slot's previous adapter reaches an output (its values may stay
        above R, and in lora_b and the A row table above r_i; no slice given: all zeroed, see the class
        docstring). R = `rank`, the adapter's rank over all its modules (what the step meta gives
        readers), at least the largest r_i (default). The row tables follow, from rows_per_slice when given
        (the same values transposed, contiguous: (A^T [num_layers, in, r_i], B^T [num_layers, r_i,
        width_i]); plain copies instead of transposing ones). Same values as LoraSlots.write of each
        layer's slices (exactly: copies)."""
        num_slices = len(self.slice_offsets) - 1
        if len(per_slice) != num_slices or (rows_per_slice is not None and len(rows_per_slice) != num_slices):
            raise ValueError(f"expected {num_slices} slices, got {len(per_slice)}")
        ranks = [0 if ab is None else ab[0].shape[1] for ab in per_slice]
        for i, ((c0, c1), ab, r) in enumerate(zip(self._slices(), per_slice, ranks, strict=True)):
            if ab is None:
                continue
            shapes = [(self.num_layers, r, self.in_features), (self.num_layers, c1 - c0, r)]
            given = [ab[0], ab[1]]
            t_ab = None if rows_per_slice is None else rows_per_slice[i]
            if t_ab is not None:
                shapes += [(self.num_layers, self.in_features, r), (self.num_layers, r, c1 - c0)]
                given += [t_ab[0], t_ab[1]]
            if [tuple(t.shape) for t in given] != shapes:  # copy_ would broadcast a misfit silently
                raise ValueError(f"slice of width {c1 - c0}: {[tuple(t.shape) for t in given]} do not fit {shapes}")
        top = max(ranks) if rank is None else rank
        if top > self.r_max or top < max(ranks):
            raise ValueError(f"rank {top} (slices {ranks}) is above the slots' r_max {self.r_max} or below a slice's")
        clear = top == 0
        # zero [r_i, old): of every buffer for a clear, else of A and the row tables' B up to the rank R
        old = self.dirty[slot] if clear else min(self.extent[slot], top)
        self.touched(slot, top)  # kept if a copy below fails: the next write zeroes it all
        r_max, in_f = self.r_max, self.in_features
        own_a, own_rows_a, own_rows_b = self._own(slot)
        a_slot = own_a.view(self.num_layers, num_slices, r_max, in_f)
        b_slot = self.lora_b[:, :, slot]  # [num_layers, out_total, r_max], rows of stride num_slots * r_max
        rows_a = None
        if own_rows_a is not None:
            rows_a = own_rows_a.view(self.num_layers, in_f, num_slices, r_max)
        for i, ((c0, c1), ab, r) in enumerate(zip(self._slices(), per_slice, ranks, strict=True)):
            if ab is not None and r:
                a, b = ab
                a_slot[:, i, :r].copy_(a)
                b_slot[:, c0:c1, :r].copy_(b)
                if rows_a is not None and self.rows is not None:
                    t_ab = None if rows_per_slice is None else rows_per_slice[i]
                    a_t, b_t = (a.transpose(1, 2), b.transpose(1, 2)) if t_ab is None else t_ab
                    rows_a[:, :, i, :r].copy_(a_t)
                    own_rows_b[i][:, :r].copy_(b_t)
            if r < old:  # what the previous adapter left above this rank: one side of each pair
                a_slot[:, i, r:old].zero_()
                if rows_a is not None and self.rows is not None:
                    own_rows_b[i][:, r:old].zero_()
                if clear:
                    b_slot[:, c0:c1, r:old].zero_()
                    if rows_a is not None and self.rows is not None:
                        rows_a[:, :, i, r:old].zero_()
        if clear:
            self.extent[slot] = self.dirty[slot] = 0
        for view in self.views:  # every layer now holds this adapter's slices at these ranks (as LoraSlots.write)
            view.slice_ranks[slot] = list(ranks)
            view.versions[slot] += 1
            if view.fused is not None and slot in view.fused.key[0]:  # stale now: free its memory at once
                view.fused = None

    def _own(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """What slot `slot` alone owns, all layers: its A rows [num_layers, num_slices * r_max, in], its
        rows of the row tables a [num_layers, in, num_slices * r_max] and b (per slice [num_layers, r_max,
        width]); None / [] without row tables. (lora_b is slot-minor: every slot shares its pages.)"""
        num_slices = len(self.slice_offsets) - 1
        r_max, in_f = self.r_max, self.in_features
        ext = self.out_total + slot * num_slices * r_max
        a = self.weight_ext[:, ext : ext + num_slices * r_max]
        if self.rows is None:
            return a, None, []
        rows_b = [b[:, slot * r_max : (slot + 1) * r_max] for b in self.rows.b]
        return a, self.rows.a[:, slot * in_f : (slot + 1) * in_f], rows_b

    def slot_chunks(self, slot: int) -> list[torch.Tensor]:
        """Contiguous views of what slot `slot` alone owns (_own), layer by layer. For warming the slot's
        pages before a write (engine/model.py SlotPages)."""
        a, rows_a, rows_b = self._own(slot)
        whole = [a] + ([] if rows_a is None else [rows_a, *rows_b])
        return [t[layer] for t in whole for layer in range(self.num_layers)]

    def tensors(self) -> list[torch.Tensor]:
        """Every stacked buffer (memory accounting)."""
        owned = [self.weight_ext, self.lora_b]
        if self.rows is not None:
            owned += [self.rows.a, *self.rows.b]
        return owned
