"""Engine: owns the model, tokenizer, adapter slots and KV cache; `generate` runs requests to completion.

Every step follows the step contract: pick the sequences (schedule), one forward pass for all of them
(run), then sample and account (postprocess). Requests of different adapters share every step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter_cache.peft_format import BaseShapes, LoraAdapter, load_peft_adapter
from ..config import Config
from ..errors import AdapterNotFoundError, InvalidRequestError
from ..scheduler.block_manager import BlockAllocator
from ..scheduler.request import SamplingParams
from .loader import DTYPES, load_hf_config, load_model, resolve_model_dir
from .runner import ModelRunner, StepSeq
from .sampler import make_generator, sample

log = logging.getLogger(__name__)


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or stop string) | "length"


@dataclass
class _Seq:
    prompt: list[int]
    slot: int
    params: SamplingParams
    generator: torch.Generator | None
    output: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the cache
    finish_reason: str | None = None
    text: str | None = None

    @property
    def all_tokens(self) -> list[int]:
        return self.prompt + self.output


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.model_dir = resolve_model_dir(config.model)
        self.model_name = config.model or self.model_dir.name
        hf_cfg = load_hf_config(self.model_dir)
        if config.dtype == "auto":
            dtype = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None) or torch.float32
            self.dtype = DTYPES.get(str(dtype).removeprefix("torch."), torch.float32)
        else:
            self.dtype = DTYPES[config.dtype]
        self.device = _pick_device(config.device)
        self.model, self.spec = load_model(self.model_dir, self.dtype, self.device)
        self.tokenizer = self._load_tokenizer()
        self.eos_token_ids = self._eos_ids()
        self.max_model_len = config.max_model_len or self.spec.max_position_embeddings

        self.base_shapes = BaseShapes(self.model_name, self.spec.num_layers, self.spec.lora_shapes())
        self.adapters: dict[str, LoraAdapter] = {}
        for name, source in config.adapters:
            self.adapters[name] = load_peft_adapter(name, Path(source), self.base_shapes, config.max_lora_rank, self.dtype)
        num_slots = max(config.max_active_adapters, len(self.adapters))
        self.model.allocate_lora_slots(num_slots, config.max_lora_rank)

        block_bytes = ModelRunner.kv_bytes_per_block(self.spec, config.block_size, self.dtype)
        num_blocks = max(2, int(config.kv_cache_gib * 2**30) // block_bytes)
        self.runner = ModelRunner(self.model, self.spec, num_blocks, config.block_size)
        self.blocks = BlockAllocator(num_blocks, config.block_size)
        self.adapter_slot: dict[str, int] = {}
        # (num tokens fed, num sequences, seconds) per step when a caller sets a list here (benchmarks)
        self.step_log: list[tuple[int, int, float]] | None = None
        for slot, (name, adapter) in enumerate(self.adapters.items()):
            self.runner.load_slot(slot, adapter.weights, adapter.rank)
            self.adapter_slot[name] = slot

    # ---- text helpers -------------------------------------------------------------------------
    def _load_tokenizer(self):
        if not any((self.model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None  # weights-only directory: prompts must be token ids
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_cfg = self.model_dir / "generation_config.json"
        if gen_cfg.is_file():
            eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass token ids", param="prompt")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of `messages` through the tokenizer's chat template, with the assistant turn opened."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("this model has no chat template", param="messages")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    # ---- generation ---------------------------------------------------------------------------
    def slot_of(self, adapter: str | None) -> int:
        if adapter is None or adapter == self.model_name:
            return -1
        if adapter not in self.adapter_slot:
            raise AdapterNotFoundError(adapter, f"unknown adapter; known: {sorted(self.adapter_slot)}")
        return self.adapter_slot[adapter]

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        adapters: Sequence[str | None] | str | None = None,
        sampling: Sequence[SamplingParams] | SamplingParams | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt; prompt i uses adapters[i] (None = base model) and sampling[i]."""
        n = len(prompts)
        adapter_list = list(adapters) if isinstance(adapters, list | tuple) else [adapters] * n
        params_list = list(sampling) if isinstance(sampling, list | tuple) else [sampling or SamplingParams()] * n
        if len(adapter_list) != n or len(params_list) != n:
            raise InvalidRequestError("prompts, adapters and sampling must have the same length")
        seqs = []
        for prompt, adapter, params in zip(prompts, adapter_list, params_list, strict=True):
            ids = self.encode(prompt)
            if not ids:
                raise InvalidRequestError("prompt is empty", param="prompt")
            if len(ids) + params.max_tokens > self.max_model_len:
                raise InvalidRequestError(
                    f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                    f"length {self.max_model_len}",
                    param="max_tokens",
                )
            seqs.append(_Seq(ids, self.slot_of(adapter), params, make_generator(params.seed)))
        pending = list(seqs)
        running: list[_Seq] = []
        try:
            while pending or running:
                while pending and len(running) < self.config.max_num_seqs:
                    running.append(pending.pop(0))
                t0 = time.perf_counter()
                step = self._schedule(running)
                logits = self.runner.run(step)
                self._postprocess(running, logits)
                if self.step_log is not None:
                    self.step_log.append((sum(len(s.token_ids) for s in step), len(step), time.perf_counter() - t0))
                for s in [s for s in running if s.finish_reason]:
                    self.blocks.free(s.blocks)
                    running.remove(s)
        finally:
            for s in running:
                self.blocks.free(s.blocks)
        return [GenerationResult(s.prompt, s.output, s.text, s.finish_reason or "length") for s in seqs]

    def _schedule(self, running: list[_Seq]) -> list[StepSeq]:
        step = []
        for s in running:
            tokens = s.all_tokens
            new = tokens[s.num_computed :]
            need = self.blocks.blocks_needed(len(tokens), len(s.blocks))
            s.blocks.extend(self.blocks.allocate(need))
            step.append(StepSeq(new, s.num_computed, s.blocks, s.slot, True))
            s.num_computed = len(tokens)
        return step

    def _postprocess(self, running: list[_Seq], logits: torch.Tensor) -> None:
        next_ids = sample(logits, [s.params for s in running], [s.generator for s in running])
        for s, tok in zip(running, next_ids, strict=True):
            p = s.params
            if tok in self.eos_token_ids and not p.ignore_eos:
                s.finish_reason = "stop"
                s.text = self.decode(s.output)
                continue
            s.output.append(tok)
            if p.stop and self.tokenizer is not None:
                text = self.decode(s.output)
                hits = [text.find(x) for x in p.stop if x in text]
                if hits:
                    s.finish_reason, s.text = "stop", text[: min(hits)]
                    continue
            if len(s.output) >= p.max_tokens:
                s.finish_reason = "length"
                s.text = self.decode(s.output)
