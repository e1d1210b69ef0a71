"""One Llama-family decoder (llama, mistral, qwen2, qwen3) over flat token batches with per-token LoRA.

Architectures differ only by flags on ModelSpec: qkv bias (qwen2), q/k RMSNorm (qwen3), sliding window
(mistral). Projections sharing an input are fused (q|k|v, gate|up) so base and LoRA each take one call.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter_cache.peft_format import AdapterWeights
from ..errors import ModelLoadError
from ..kernels import LoraMeta, LoraSlots, lora_linear
from ..kernels.cpu_linear import pack_weight, packed_linear
from ..kernels.cpu_lora import memory_allows
from ..kernels.cpu_plan import CostFigures, LinearShape
from ..kernels.lora_slots import LoraSlotStack
from .attention import AttnMeta, attention

log = logging.getLogger(__name__)

SUPPORTED_ARCHS = {"llama", "mistral", "qwen2", "qwen3"}
# LoRA target module name -> (fused group, slice index within the group)
LORA_TARGETS = {
    "q_proj": ("qkv", 0),
    "k_proj": ("qkv", 1),
    "v_proj": ("qkv", 2),
    "o_proj": ("o", 0),
    "gate_proj": ("gate_up", 0),
    "up_proj": ("gate_up", 1),
    "down_proj": ("down", 0),
}


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """torch.zeros, except that a large CPU tensor comes from an anonymous memory map: the kernel hands
    out zero pages on first touch, so allocating the (mostly unused) LoRA slot buffers and KV cache
    costs nothing at start-up, and untouched pages take no memory."""
    numel = math.prod(shape)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < 2**16:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype, count=numel).view(shape)


MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in, writable, without changing what they hold
_PAGE = mmap.PAGESIZE
_libc: ctypes.CDLL | None = None
_populate_works = True


def populate_pages(tensors: Iterable[torch.Tensor]) -> bool:
    """Fault in the pages of CPU tensors (each a contiguous range) ahead of their first write, keeping
    their contents (madvise MADV_POPULATE_WRITE; other threads may read and write them meanwhile): a
    first write to a lazy_zeros page costs a page fault (~1-2 us per 4 KiB in a VM), paid here instead,
    off the thread that writes. The GIL is released during each call. False where the kernel cannot."""
    global _libc, _populate_works
    if not _populate_works:
        return False
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except (OSError, AttributeError):
            _populate_works = False
            return False
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        start = t.data_ptr() // _PAGE * _PAGE
        end = -(-(t.data_ptr() + t.numel() * t.element_size()) // _PAGE) * _PAGE
        if _libc.madvise(start, end - start, MADV_POPULATE_WRITE) != 0:
            _populate_works = False  # an older kernel (EINVAL), or not mapped memory: stop trying
            log.debug("madvise(MADV_POPULATE_WRITE) failed: errno %d", ctypes.get_errno())
            return False
    return True


class SlotPages:
    """Warms the pages of the next never-written LoRA slots in the background, so an adapter's write
    into a fresh slot (on the step thread, between steps) does not pay first-touch page faults: 20-35 ms
    for a rank-16 adapter of the default model on a 2-core VM, against ~5 ms into a warm slot. The
    device tier hands free slots out lowest first (adapter_cache/tiers.py), so the next fresh slots
    after a write into slot s are s + 1, s + 2, ...: WARM_AHEAD of them are kept warm (slots 0.. at
    start). A slot is warmed only while the machine's available memory keeps MERGE_MEMORY_HEADROOM after
    it. Memory: at most WARM_AHEAD slots' own pages (A rows, row tables) resident before an adapter
    needs them; untouched slots further on still cost nothing."""

    WARM_AHEAD = 2

    def __init__(self, stacks: Mapping[str, LoraSlotStack], num_slots: int) -> None:
        self._stacks = dict(stacks)
        self._num_slots = num_slots
        self._cpu = all(stack.device.type == "cpu" for stack in self._stacks.values())
        self._lock = threading.Lock()
        self._asked = 0  # slots 0..asked-1 are warm or queued
        self._queue: list[int] = []
        self.thread: threading.Thread | None = None
        self.warmed: set[int] = set()

    def written(self, slot: int) -> None:
        """Slot `slot` was written (or, with -1, the slots were allocated): keep the next ones warm."""
        if not self._cpu:
            return
        with self._lock:
            end = min(self._num_slots, slot + 1 + self.WARM_AHEAD)
            self._queue += range(max(self._asked, slot + 1), end)
            self._asked = max(self._asked, end)
            if not self._queue or (self.thread is not None and self.thread.is_alive()):
                return
            # a short-lived thread: it holds the buffers only while it runs
            self.thread = threading.Thread(target=self._run, name="loraplex-slot-pages", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self.thread = None
                    return
                slot = self._queue.pop(0)
            chunks = [c for stack in self._stacks.values() for c in stack.slot_chunks(slot)]
            if memory_allows(sum(c.numel() * c.element_size() for c in chunks)) and populate_pages(chunks):
                self.warmed.add(slot)


@dataclass(frozen=True)
class KernelOptions:
    """How the model's linears compute; the engine fills it from Config (lora_backend, cpu_packed_linear,
    cpu_lora_rows, cpu_lora_merge), so the A/B switches reach the kernels as plain arguments."""

    lora_backend: str = "auto"  # auto | torch | triton (kernels.lora_linear)
    cpu_packed_linear: bool = True  # 16-bit CPU: oneDNN-packed base weights (kernels/cpu_linear.py)
    cpu_lora_rows: bool = True  # CPU: row tables of the LoRA slots (the rows strategy, kernels/cpu_lora.py)
    cpu_lora_merge: bool = True  # 16-bit CPU: the merged plan (W + B A packed for one-adapter steps, kernels/cpu_lora.py)


@dataclass(frozen=True)
class ModelSpec:
    """The shape and flags of a base model, derived once from its Hugging Face config."""

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qk_norm: bool
    sliding_window: int | None
    max_position_embeddings: int

    @classmethod
    def from_hf_config(cls, cfg) -> ModelSpec:
        arch = cfg.model_type
        if arch not in SUPPORTED_ARCHS:
            raise ModelLoadError(f"unsupported architecture {arch!r}; supported: {sorted(SUPPORTED_ARCHS)}")
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"unsupported hidden_act {act!r} (only silu)")
        window = getattr(cfg, "sliding_window", None)
        if arch != "mistral" and not getattr(cfg, "use_sliding_window", False):
            window = None  # qwen2/qwen3 configs carry a window they do not use unless use_sliding_window
        elif arch != "mistral":
            raise ModelLoadError(f"{arch} with use_sliding_window=True is not supported")
        num_heads = cfg.num_attention_heads
        return cls(
            arch=arch,
            vocab_size=cfg.vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_layers=cfg.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads,
            rms_norm_eps=cfg.rms_norm_eps,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            qk_norm=arch == "qwen3",
            sliding_window=window,
            max_position_embeddings=cfg.max_position_embeddings,
        )

    def lora_shapes(self) -> dict[str, tuple[int, int]]:
        """Target module name -> (in_features, out_features) of its base Linear."""
        q, kv, h, m = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, m),
            "up_proj": (h, m),
            "down_proj": (m, h),
        }


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None, device: torch.device | str | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Same order of operations as transformers (normalize in float32, cast, then scale).
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class LoraLinear(nn.Module):
    """A frozen (possibly fused) Linear plus the adapter slots of its output slices (kernels.LoraSlots,
    which owns every slot layout; after allocate_lora, W and the bias are views into its buffers).

    On a 16-bit CPU model a oneDNN-packed copy of W (self.packed, memory: one more copy of the linear
    weights) serves the base matmul. forward is kernels.lora_linear: base matmul + every token's delta.
    """

    def __init__(
        self,
        in_features: int,
        slice_sizes: list[int],
        bias: bool,
        kernels: KernelOptions | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.kernels = kernels or KernelOptions()
        out = sum(slice_sizes)
        self.weight = nn.Parameter(torch.empty(out, in_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out, dtype=dtype, device=device), requires_grad=False) if bias else None
        self.slice_offsets = [0]
        for s in slice_sizes:
            self.slice_offsets.append(self.slice_offsets[-1] + s)
        self.slots: LoraSlots | None = None
        self.packed: torch.Tensor | None = None  # oneDNN-packed W (16-bit CPU), see kernels/cpu_linear.py

    def uses_row_tables(self) -> bool:
        """Whether its slots keep CPU row tables (kernels/cpu_lora.py's rows strategy)."""
        return self.weight.device.type == "cpu" and self.kernels.cpu_lora_rows

    def allocate_lora(
        self,
        num_slots: int,
        r_max: int,
        *,
        copy_weight: bool = True,
        stack: LoraSlotStack | None = None,
        layer: int = 0,
    ) -> None:
        """Allocate the slot buffers; W (and the bias) move into them. With copy_weight=False the current
        W is not copied (the loader fills the views afterwards and calls pack(): no second copy of the
        weights at load time). With `stack`, the buffers are layer `layer` of the stack's (CausalLM)."""
        slots = LoraSlots(
            self.weight, self.bias, self.slice_offsets, num_slots, r_max,
            with_row_tables=self.uses_row_tables(), copy_weight=copy_weight, zeros=lazy_zeros,
            stack=stack, layer=layer,
        )  # fmt: skip
        slots.merge = self.kernels.cpu_lora_merge
        self.slots = slots
        self.weight = nn.Parameter(slots.weight, requires_grad=False)  # shares the buffer: no second copy of W
        if slots.bias is not None:
            self.bias = nn.Parameter(slots.bias, requires_grad=False)
        if copy_weight:
            self.pack()

    def pack(self) -> None:
        """(Re)build the oneDNN-packed copy of W (16-bit CPU; None elsewhere or when turned off)."""
        self.packed = pack_weight(self.weight) if self.kernels.cpu_packed_linear else None
        if self.slots is not None:  # the fused packed copy (kernels/cpu_lora.py) holds the old W
            self.slots.fused = None

    def cost_shape(self) -> LinearShape | None:
        """The sizes the CPU cost model reads (kernels/cpu_plan.py); None before allocate_lora."""
        if self.slots is None:
            return None
        _, num_slices, r_max, in_f = self.slots.lora_a.shape
        return LinearShape(self.slots.out_total, num_slices, r_max, in_f, self.weight.element_size())

    def forward(self, x: torch.Tensor, meta: LoraMeta | None) -> torch.Tensor:
        # x: [T, in] -> [T, out_total]
        return lora_linear(x, self.weight, self.bias, self.packed, self.slots, meta, self.kernels.lora_backend)

    # Read-only views of the slot buffers (inspection, memory accounting); None before allocate_lora.
    @property
    def weight_ext(self) -> torch.Tensor | None:
        return None if self.slots is None else self.slots.weight_ext

    @property
    def bias_ext(self) -> torch.Tensor | None:
        return None if self.slots is None else self.slots.bias_ext

    @property
    def lora_a(self) -> torch.Tensor | None:  # [num_slots, num_slices, r_max, in]
        return None if self.slots is None else self.slots.lora_a

    @property
    def lora_b(self) -> torch.Tensor | None:  # [num_slots, out_total, r_max]
        return None if self.slots is None else self.slots.lora_b

    @property
    def lora_at(self) -> torch.Tensor | None:  # CPU row table of A, or None
        return None if self.slots is None or self.slots.rows is None else self.slots.rows.a

    @property
    def lora_bt(self) -> list[torch.Tensor] | None:  # CPU row tables of B (one per slice), or None
        return None if self.slots is None or self.slots.rows is None else self.slots.rows.b


class DecoderLayer(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        qkv_bias: bool,
        o_bias: bool,
        mlp_bias: bool,
        kernels: KernelOptions,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        s = spec
        q, kv = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
        self.spec = spec
        self.input_norm = RMSNorm(s.hidden_size, s.rms_norm_eps, dtype, device)
        self.post_attn_norm = RMSNorm(s.hidden_size, s.rms_norm_eps, dtype, device)
        self.qkv = LoraLinear(s.hidden_size, [q, kv, kv], qkv_bias, kernels, dtype, device)
        self.o = LoraLinear(q, [s.hidden_size], o_bias, kernels, dtype, device)
        self.gate_up = LoraLinear(s.hidden_size, [s.intermediate_size] * 2, mlp_bias, kernels, dtype, device)
        self.down = LoraLinear(s.intermediate_size, [s.hidden_size], mlp_bias, kernels, dtype, device)
        if s.qk_norm:
            self.q_norm = RMSNorm(s.head_dim, s.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(s.head_dim, s.rms_norm_eps, dtype, device)

    def linears(self) -> list[LoraLinear]:
        return [self.qkv, self.o, self.gate_up, self.down]

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, head_dim]
        sin: torch.Tensor,  # [T, head_dim]
        kv: tuple[torch.Tensor, torch.Tensor],  # each [num_kv_rows, num_kv_heads, head_dim]
        attn: AttnMeta,
        lora: LoraMeta | None,
    ) -> torch.Tensor:
        s = self.spec
        t = x.shape[0]
        h = self.input_norm(x)
        qkv = self.qkv(h, lora)
        q_end, k_end = self.qkv.slice_offsets[1], self.qkv.slice_offsets[2]
        q = qkv[:, :q_end].view(t, s.num_heads, s.head_dim)
        k = qkv[:, q_end:k_end].view(t, s.num_kv_heads, s.head_dim)
        v = qkv[:, k_end:].view(t, s.num_kv_heads, s.head_dim)
        if s.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, kv[0], kv[1], attn)  # [T, num_heads * head_dim]
        x = x + self.o(out, lora)
        h = self.post_attn_norm(x)
        gu = self.gate_up(h, lora)
        m = s.intermediate_size
        x = x + self.down(F.silu(gu[:, :m]) * gu[:, m:], lora)
        return x


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the Hugging Face layout). x: [T, heads, head_dim]; cos/sin: [T, head_dim]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class CausalLM(nn.Module):
    """Embeddings, decoder layers, final norm and lm_head; forward over one flat step of tokens."""

    def __init__(
        self,
        spec: ModelSpec,
        inv_freq: torch.Tensor,
        attention_scaling: float,
        biases: dict[str, bool],
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        kernels: KernelOptions | None = None,
    ) -> None:
        """Weights are left uninitialized (torch.empty; norms 1, biases 0): the loader fills them."""
        super().__init__()
        self.spec = spec
        self.kernels = kernels = kernels or KernelOptions()
        # _weight skips nn.Embedding's random init (slow, and useless before loading).
        embed = torch.empty(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden_size, _weight=embed)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, biases["qkv"], biases["o"], biases["mlp"], kernels, dtype, device)
            for _ in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        if not spec.tie_word_embeddings:
            lm_head = torch.empty(spec.vocab_size, spec.hidden_size, dtype=dtype, device=device)
            self.lm_head_weight = nn.Parameter(lm_head, requires_grad=False)
        self.inv_freq = inv_freq.float()  # [head_dim / 2]; a plain tensor so dtype casts never touch it
        self.attention_scaling = attention_scaling
        self.num_lora_slots = 0
        self.lora_r_max = 0
        # module kind ("qkv", "o", "gate_up", "down") -> the slot buffers of all layers (allocate_lora_slots)
        self.lora_stacks: dict[str, LoraSlotStack] = {}
        self.slot_pages: SlotPages | None = None
        self.lm_head_packed: torch.Tensor | None = None
        self.num_weight_bytes = 0  # base weights, counted once at load (packing replaces some parameters)

    @property
    def lm_head(self) -> torch.Tensor:  # [vocab, hidden]
        return self.embed.weight if self.spec.tie_word_embeddings else self.lm_head_weight

    def decoder_layers(self) -> list[DecoderLayer]:
        return [cast(DecoderLayer, layer) for layer in self.layers]

    def lora_linears(self) -> list[LoraLinear]:
        return [lin for layer in self.decoder_layers() for lin in layer.linears()]

    def allocate_lora_slots(self, num_slots: int, r_max: int, *, copy_weights: bool = True) -> None:
        """Give every LoraLinear num_slots slots of rank r_max, as views of one LoraSlotStack per module
        kind (so an adapter goes into a slot of every layer in a few copies). copy_weights=False: the base
        weights are filled afterwards (load_model), which then calls pack()."""
        layers = self.decoder_layers()
        self.lora_stacks = {}
        for group in _GROUPS:
            first: LoraLinear = getattr(layers[0], group)
            w = first.weight
            stack = LoraSlotStack(
                len(layers), w.shape[1], first.slice_offsets, num_slots, r_max, w.dtype, w.device,
                with_row_tables=first.uses_row_tables(), zeros=lazy_zeros,
            )  # fmt: skip
            self.lora_stacks[group] = stack
            for i, layer in enumerate(layers):
                getattr(layer, group).allocate_lora(num_slots, r_max, copy_weight=copy_weights, stack=stack, layer=i)
        self.num_lora_slots, self.lora_r_max = num_slots, r_max
        self.slot_pages = SlotPages(self.lora_stacks, num_slots)
        self.slot_pages.written(-1)
        if copy_weights:
            self._pack_lm_head()

    def lora_shapes(self) -> list[LinearShape]:
        """The distinct shapes of the LoRA linears' slots, as the CPU cost model sees them (after
        allocate_lora_slots): what the start-up calibration measures on (kernels/cpu_calibrate.py)."""
        return sorted({s for s in (lin.cost_shape() for lin in self.lora_linears()) if s is not None})

    def set_cost_figures(self, figures: CostFigures | None) -> None:
        """Give every LoRA linear the CPU cost model's figures (None: no cost model, the "grouped" plan)."""
        for lin in self.lora_linears():
            if lin.slots is not None:
                lin.slots.figures = figures

    def pack(self) -> None:
        """(Re)build the packed copies of the base weights (after they were filled or restored)."""
        for lin in self.lora_linears():
            if lin.slots is not None:
                lin.pack()
        self._pack_lm_head()

    def _pack_lm_head(self) -> None:
        self.lm_head_packed = pack_weight(self.lm_head) if self.kernels.cpu_packed_linear else None

    def lora_linear(self, layer: int, module: str) -> tuple[LoraLinear, int]:
        group, index = LORA_TARGETS[module]
        return getattr(self.layers[layer], group), index

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)[None, :]  # [T, head_dim / 2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    @torch.inference_mode()
    def forward(
        self,
        token_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn: AttnMeta,
        lora: LoraMeta | None,
        logits_idx: torch.Tensor,  # [num_seqs_needing_logits] token rows whose next-token logits we want
    ) -> torch.Tensor:
        x = self.embed(token_ids)  # [T, hidden]
        cos, sin = self.rope(positions, x.dtype)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv, attn, lora)
        x = self.norm(x.index_select(0, logits_idx))
        if self.lm_head_packed is not None:
            return packed_linear(x, self.lm_head_packed, None).float()  # [num_seqs, vocab]
        return F.linear(x, self.lm_head).float()


_MODULE_OF = {(group, index): module for module, (group, index) in LORA_TARGETS.items()}
_GROUPS = ("qkv", "o", "gate_up", "down")  # DecoderLayer attributes, in linears() order


def write_lora_slot(
    model: CausalLM, slot: int, weights: Mapping[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Copy one adapter into device slot `slot` of every layer; what it does not fill is zeroed (in A at
    least: LoraSlotStack.write), so nothing of the slot's previous adapter reaches an output.

    weights: (layer, module) -> (A [r, in], B [out, r] scaled); empty clears the slot. An AdapterWeights
    (the host tier's layout: per module, all layers) goes in with a few large copies per module kind
    (LoraSlotStack.write); a plain mapping by LoraSlots.write per layer and module kind.
    """
    if not model.lora_stacks:
        raise RuntimeError("write_lora_slot before allocate_lora_slots")
    fits = isinstance(weights, AdapterWeights) and weights.num_layers == model.spec.num_layers
    if fits or not weights:
        stacked = weights.stacked if isinstance(weights, AdapterWeights) else {}
        rows = weights.rows if isinstance(weights, AdapterWeights) else None
        rank = max(weights.ranks.values()) if isinstance(weights, AdapterWeights) and weights.ranks else 0
        for group, stack in model.lora_stacks.items():
            modules = [_MODULE_OF[(group, i)] for i in range(len(stack.slice_offsets) - 1)]
            given_rows = None if rows is None or stack.rows is None else [rows.get(m) for m in modules]
            # rank: readers of every module kind may read up to the adapter's rank (the step meta's)
            stack.write(slot, [stacked.get(m) for m in modules], given_rows, rank)
    else:
        for layer_idx, layer in enumerate(model.decoder_layers()):
            for group, lin in zip(_GROUPS, layer.linears(), strict=True):
                assert lin.slots is not None
                per_slice = [weights.get((layer_idx, _MODULE_OF[(group, i)])) for i in range(len(lin.slice_offsets) - 1)]
                lin.slots.write(slot, per_slice)
    if model.slot_pages is not None:
        model.slot_pages.written(slot)
