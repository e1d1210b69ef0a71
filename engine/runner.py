"""ModelRunner: turns one step's sequences into flat tensors, runs the model, returns next-token logits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from ..kernels import MetaBuffers, build_lora_meta
from .attention import SeqSpan, build_attn_meta
from .model import CausalLM, ModelSpec, lazy_zeros, write_lora_slot


@dataclass(frozen=True)
class StepSeq:
    """One sequence's part of a step (pure data handed over by the step loop)."""

    token_ids: list[int]  # the new tokens fed this step
    start_pos: int  # position of token_ids[0]
    block_table: list[int]  # KV blocks holding positions [0, start_pos + len(token_ids))
    slot: int  # adapter device slot, -1 = base model only
    want_logits: bool  # True when the last new token is the end of the known text


class StepSeqLike(Protocol):
    """What run() reads of each sequence (StepSeq, or the scheduler's ScheduledSeq)."""

    @property
    def token_ids(self) -> list[int]: ...
    @property
    def start_pos(self) -> int: ...
    @property
    def block_table(self) -> list[int]: ...
    @property
    def slot(self) -> int: ...
    @property
    def want_logits(self) -> bool: ...


class ModelRunner:
    def __init__(self, model: CausalLM, spec: ModelSpec, num_blocks: int, block_size: int) -> None:
        self.model, self.spec = model, spec
        self.block_size = block_size
        p = next(model.parameters())
        self.device, dtype = p.device, p.dtype
        shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
        self.kv_caches = [
            (lazy_zeros(shape, dtype, self.device), lazy_zeros(shape, dtype, self.device))
            for _ in range(spec.num_layers)
        ]
        self.slot_ranks = [0] * model.num_lora_slots
        self.meta_buffers = MetaBuffers(self.device)  # per-step LoRA index arrays, reused every step

    @staticmethod
    def kv_bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem

    def load_slot(self, slot: int, weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], rank: int) -> None:
        """Write an adapter into a slot (write_lora_slot: an AdapterWeights in a few large copies)."""
        write_lora_slot(self.model, slot, weights)
        self.slot_ranks[slot] = rank

    def run(self, seqs: Sequence[StepSeqLike]) -> torch.Tensor:
        """Forward one step; returns float32 logits [num seqs with want_logits, vocab] in seq order."""
        token_ids: list[int] = []
        positions: list[int] = []
        token_slot: list[int] = []
        spans: list[SeqSpan] = []
        logits_rows: list[int] = []
        for s in seqs:
            row = len(token_ids)
            n = len(s.token_ids)
            token_ids.extend(s.token_ids)
            positions.extend(range(s.start_pos, s.start_pos + n))
            token_slot.extend([s.slot] * n)
            spans.append(SeqSpan(row, n, s.start_pos, s.block_table))
            if s.want_logits:
                logits_rows.append(row + n - 1)
        dev = self.device
        attn = build_attn_meta(spans, self.block_size, self.spec.sliding_window, dev)
        lora = build_lora_meta(token_slot, self.slot_ranks, dev, self.meta_buffers)
        return self.model(
            torch.tensor(token_ids, dtype=torch.int64, device=dev),
            torch.tensor(positions, dtype=torch.int64, device=dev),
            self.kv_caches,
            attn,
            lora,
            torch.tensor(logits_rows, dtype=torch.int64, device=dev),
        )
