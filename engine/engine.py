"""Engine: owns the model, tokenizer, adapter slots, KV cache and scheduler; one `step()` runs the step
contract for every admitted request at once (requests of different adapters share each step):

    batch = scheduler.schedule()                 # who runs, which tokens, which KV blocks
    logits = runner.run(batch.seqs)              # one forward pass over the flat batch
    scheduler.postprocess(batch, sampled_ids)    # append, detokenize, stop, free

`generate()` drives steps in the caller's thread (offline use); AsyncEngine drives them in a thread of
its own for the server.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from ..adapter_cache.cache import AdapterCache
from ..adapter_cache.sources import AdapterSources
from ..config import Config
from ..errors import AdapterNotFoundError, InvalidRequestError
from ..scheduler.block_manager import BlockAllocator
from ..scheduler.request import Request
from ..scheduler.sampling_params import SamplingParams
from ..scheduler.scheduler import Scheduler
from .detokenizer import IncrementalDetokenizer, StopMatcher
from .loader import (
    DTYPES,
    base_shapes,
    export_weights,
    load_hf_config,
    load_model,
    load_tokenizer,
    resolve_model_dir,
)
from .model import CausalLM, KernelOptions, ModelSpec
from .protocol import RequestOutput, TokenLogprob
from .runner import ModelRunner
from .sampler import make_generator, sample_batch

log = logging.getLogger(__name__)

@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (EOS or stop string) | "length" | "abort" | "error"
    logprobs: list[TokenLogprob] | None = None
    error: str | None = None


@dataclass
class _Track:
    """Engine-side state of one request, kept across preemptions (so nothing is redrawn or re-streamed)."""

    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    stops: StopMatcher
    text: str = ""  # all text emitted so far
    pending_text: str = ""  # emitted by this step, not yet handed out
    pending_tokens: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    sampled: TokenLogprob | None = None  # this step's draw, consumed by the finish check
    logprobs: list[TokenLogprob] = field(default_factory=list)


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.model_dir = resolve_model_dir(config.model, config.cache_dir)
        self.model_name = config.model or self.model_dir.name
        self.hf_config = hf_cfg = load_hf_config(self.model_dir)
        if config.dtype == "auto":
            dtype = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None) or torch.float32
            self.dtype = DTYPES.get(str(dtype).removeprefix("torch."), torch.float32)
        else:
            self.dtype = DTYPES[config.dtype]
        self.device = _pick_device(config.device)
        # Start-up runs three things at once: the tokenizer (mostly imports) in a thread, the adapters to
        # preload in the cache's load pool, and the base weights here (copies that release the GIL).
        tokenizer_job = ThreadPoolExecutor(1, thread_name_prefix="tokenizer-load")
        tokenizer_future = tokenizer_job.submit(self._load_tokenizer)
        tokenizer_job.shutdown(wait=False)
        self.spec = ModelSpec.from_hf_config(hf_cfg)
        self.base_shapes = base_shapes(self.spec, self.model_name)
        self.model: CausalLM | None = None
        self.runner: ModelRunner | None = None
        self.wake = threading.Event()  # set when an adapter finished loading (the step loop may proceed)
        self.adapter_cache = AdapterCache(
            AdapterSources(dict(config.adapters), config.adapter_dir, config.allow_hub),
            self.base_shapes,
            config.max_lora_rank,
            self.dtype,
            num_slots=config.max_active_adapters,
            max_host_adapters=config.max_host_adapters,
            host_bytes_budget=int(config.host_cache_gib * 2**30),
            write_slot=lambda slot, weights, rank: self._live_runner().load_slot(slot, weights, rank),
            clear_slot=lambda slot: self._live_runner().load_slot(slot, {}, 0),
            failure_ttl=config.adapter_failure_ttl,
            on_failure=lambda name, message: self.scheduler.fail_adapter(name, message),
            on_ready=lambda name: self.wake.set(),
        )
        # Adapters named on the command line (--adapter, --preload) are read and validated during start
        # (a broken one stops it, naming the cause); the first max_active_adapters go into device slots.
        preload = list(dict.fromkeys([name for name, _ in config.adapters] + list(config.preload)))
        for name in preload:
            self.adapter_cache.load(name)  # queued in the load pool, parsed while the weights load
        self._build_model()
        self.tokenizer = tokenizer_future.result()
        self.eos_token_ids = self._eos_ids()
        self.max_model_len = config.max_model_len or self.spec.max_position_embeddings
        self.blocks = BlockAllocator(self.runner.num_blocks, config.block_size)
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_active_adapters=config.max_active_adapters,
            blocks=self.blocks,
            residency=self.adapter_cache,
            prefill_chunk_size=config.prefill_chunk_size,
            max_wait_steps=config.max_wait_steps,
        )
        for name in preload:
            self.adapter_cache.load(name, wait=600.0)
        self.adapter_cache.install_ready()
        self._tracks: dict[str, _Track] = {}
        self._chat_templates: dict[str, str | None] = {}  # adapter -> its own chat template, if any
        self._ids = itertools.count()
        self.last_step_ran = False  # False: the last step had nothing to run (e.g. adapters still loading)
        # (num tokens fed, num sequences, seconds) per step when a caller sets a list here (benchmarks)
        self.step_log: list[tuple[int, int, float]] | None = None
        # Idle offload (offload() / wake_up()): None while the model is on the device, else the mode.
        self.offloaded: str | None = None
        self._host_weights: list[tuple[str, torch.Tensor]] | None = None
        self.offload_stats = {"offloads": 0, "wakeups": 0, "wakeup_seconds_sum": 0.0}

    def _build_model(self, weights: list[tuple[str, torch.Tensor]] | None = None) -> None:
        """Base model with its LoRA slots and the KV cache on the device, from the checkpoint or from
        host copies of its weights (wake_up)."""
        cfg = self.config
        slots = (cfg.max_active_adapters, cfg.max_lora_rank)
        model, _ = load_model(
            self.model_dir, self.dtype, self.device, lora_slots=slots, weights=weights, hf_config=self.hf_config,
            kernels=KernelOptions(cfg.lora_backend, cfg.cpu_packed_linear, cfg.cpu_lora_rows),
        )
        block_bytes = ModelRunner.kv_bytes_per_block(self.spec, cfg.block_size, self.dtype)
        num_blocks = max(2, int(cfg.kv_cache_gib * 2**30) // block_bytes)
        self.model = model
        self.runner = ModelRunner(model, self.spec, num_blocks, cfg.block_size)

    def _live_runner(self) -> ModelRunner:
        if self.runner is None:  # install_ready runs only in step(), which wakes the model first
            raise RuntimeError("the model is offloaded")
        return self.runner

    # ---- idle offload -------------------------------------------------------------------------
    def offload(self, mode: str) -> bool:
        """Release the device copies of the base model, the adapter slots and the KV cache. mode "host":
        keep host (CPU) copies of the base weights and the adapters' host tier, so wake_up() only copies
        back; "drop": keep nothing (weights reload from disk, adapters on demand). Only when idle (no
        request admitted or waiting): returns False otherwise. Call it from the thread that steps."""
        if mode not in ("host", "drop"):
            raise ValueError(f"offload mode must be 'host' or 'drop', not {mode!r}")
        if self.offloaded is not None or self.has_work() or self.model is None:
            return False
        if mode == "host":
            self._host_weights = export_weights(self.model, self.spec)
        self.adapter_cache.release_device(drop_host=mode == "drop")
        self.model = self.runner = None
        gc.collect()  # the modules hold reference cycles: free the device memory now
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.offloaded = mode
        self.offload_stats["offloads"] += 1
        log.info("idle: offloaded the model (%s)", mode)
        return True

    def wake_up(self) -> None:
        """Bring the offloaded model back (step() calls it when work arrives)."""
        if self.offloaded is None:
            return
        t0 = time.perf_counter()
        self._build_model(self._host_weights)
        self._host_weights = None
        mode, self.offloaded = self.offloaded, None
        self.adapter_cache.restore_held()
        seconds = time.perf_counter() - t0
        stats = self.offload_stats
        stats["wakeups"] += 1
        stats["wakeup_seconds_sum"] += seconds
        log.info("woke the model up from %s offload in %.2f s", mode, seconds)

    def device_bytes(self) -> int:
        """Bytes of base weights, packed copies, adapter slots and KV cache the engine holds on its
        device (CPU memory on a CPU engine); 0 while offloaded."""
        model, runner = self.model, self.runner  # read once: the step thread may offload meanwhile
        if model is None or runner is None:
            return 0
        seen: set[int] = set()
        total = 0
        tensors = [*model.parameters(), model.lm_head_packed]
        for lin in model.lora_linears():
            tensors += [lin.weight_ext, lin.bias_ext, lin.lora_b, lin.packed, lin.lora_at, *(lin.lora_bt or [])]
        tensors += [t for kv in runner.kv_caches for t in kv]
        for t in tensors:
            if t is None:
                continue
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # opaque (oneDNN packed) tensors
                total += t.numel() * t.element_size()
                continue
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        return total

    # ---- text helpers -------------------------------------------------------------------------
    def _load_tokenizer(self):
        if not any((self.model_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None  # weights-only directory: prompts must be token ids
        return load_tokenizer(self.model_dir)

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

    def chat_prompt(self, messages: list[dict], adapter: str | None = None) -> list[int]:
        """Token ids of `messages` through the chat template, with the assistant turn opened. An adapter
        that ships its own template (chat_template.jinja, or chat_template in tokenizer_config.json)
        uses it; otherwise the base tokenizer's."""
        template = None if self.is_base(adapter) else self._adapter_chat_template(adapter)
        if self.tokenizer is None or not (template or getattr(self.tokenizer, "chat_template", None)):
            raise InvalidRequestError("this model has no chat template", param="messages")
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, chat_template=template
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _adapter_chat_template(self, adapter: str) -> str | None:
        if adapter not in self._chat_templates:
            path = self.adapter_cache.sources.resolve(adapter)  # raises for unknown / escaping names
            template = None
            if (path / "chat_template.jinja").is_file():
                template = (path / "chat_template.jinja").read_text()
            elif (path / "tokenizer_config.json").is_file():
                found = json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
                if isinstance(found, list):  # named templates: take the default one
                    found = next((t.get("template") for t in found if t.get("name") == "default"), None)
                template = found if isinstance(found, str) else None
            self._chat_templates[adapter] = template
        return self._chat_templates[adapter]

    def is_base(self, adapter: str | None) -> bool:
        return adapter is None or adapter == self.model_name

    def slot_of(self, adapter: str | None) -> int:
        """Device slot of a resident adapter (-1 for the base model); raises when it is not resident."""
        if self.is_base(adapter):
            return -1
        slot = self.adapter_cache.slot_of(adapter)
        if slot is None:
            raise AdapterNotFoundError(adapter, "adapter is not resident in a device slot")
        return slot

    # ---- requests -----------------------------------------------------------------------------
    def add_request(
        self, prompt: str | list[int], adapter: str | None = None, params: SamplingParams | None = None, request_id: str | None = None
    ) -> Request:
        """Validate and queue one request (thread-safe). Raises InvalidRequestError / AdapterError."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty", param="prompt")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context length "
                f"{self.max_model_len}",
                param="max_tokens",
            )
        if max(ids) >= self.spec.vocab_size or min(ids) < 0:
            raise InvalidRequestError(f"token ids must be in [0, {self.spec.vocab_size})", param="prompt")
        if not self.is_base(adapter):
            error = self.adapter_cache.admission_error(adapter)
            if error is not None:
                raise error
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._tracks:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        detok = IncrementalDetokenizer(self.tokenizer, ids) if self.tokenizer is not None else None
        self._tracks[request_id] = _Track(make_generator(params.seed), detok, StopMatcher(params.stop))
        request = Request(request_id, ids, params, None if self.is_base(adapter) else adapter)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Stop a request; its KV blocks are freed at the next step."""
        return self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns what each touched request produced (finished ones included)."""
        t0 = time.perf_counter()
        if self.offloaded is not None:
            if not self.has_work():
                self.last_step_ran = False
                return []
            self.wake_up()
        self.adapter_cache.install_ready()  # device slot writes happen here, between forward passes
        batch = self.scheduler.schedule()
        outputs = [self._output(r) for r in (*batch.aborted, *batch.failed)]
        self.last_step_ran = bool(batch.seqs)
        if not batch.seqs:
            return outputs
        try:
            logits = self.runner.run(batch.seqs)
            rows = [s.request for s in batch.seqs if s.want_logits]
            tracks = [self._tracks[r.request_id] for r in rows]
            sampled = sample_batch(
                logits,
                [r.params for r in rows],
                [t.generator for t in tracks],
                [(r.prompt_token_ids, r.output_token_ids) for r in rows],
            )
            for i, t in enumerate(tracks):
                t.sampled = (sampled.token_ids[i], sampled.logprobs[i], sampled.top_logprobs[i])
            touched = self.scheduler.postprocess(batch, list(sampled.token_ids), self._finish_check)
        except Exception as exc:  # a failing step fails only its own requests; the engine goes on
            log.exception("step %d failed", batch.step)
            touched = self.scheduler.fail(batch, f"internal error in step {batch.step}: {type(exc).__name__}: {exc}")
        outputs.extend(self._output(r) for r in touched)
        if self.step_log is not None:
            self.step_log.append((batch.num_tokens, len(batch.seqs), time.perf_counter() - t0))
        return outputs

    def _finish_check(self, r: Request) -> str | None:
        """Called by the scheduler right after it appended this step's token to r (under its lock)."""
        t = self._tracks[r.request_id]
        token, logprob, top = t.sampled or (r.output_token_ids[-1], None, None)
        t.sampled = None
        if token in self.eos_token_ids and not r.params.ignore_eos:
            r.output_token_ids.pop()  # EOS ends the text; it is reported as finish_reason, not as a token
            return self._flush(t, "stop")
        t.pending_tokens.append(token)
        if r.params.logprobs is not None:
            entry = (token, float(logprob), list(top or []))
            t.logprobs.append(entry)
            t.pending_logprobs.append(entry)
        if t.detok is not None:
            check = t.stops.add(t.detok.add(token))
            t.pending_text += check.emit
            if check.stopped:
                return "stop"
        if len(r.output_token_ids) >= r.params.max_tokens:
            return self._flush(t, "length")
        return None

    def _flush(self, t: _Track, reason: str) -> str:
        """Release held-back text (an incomplete character, a possible stop-string prefix) at the end."""
        if t.detok is None:
            return reason
        check = t.stops.add(t.detok.flush())
        t.pending_text += check.emit
        if check.stopped:
            return "stop"
        t.pending_text += t.stops.flush().emit
        return reason

    def _output(self, r: Request) -> RequestOutput:
        t = self._tracks[r.request_id]
        out = RequestOutput(
            request_id=r.request_id,
            new_token_ids=t.pending_tokens,
            new_text=t.pending_text,
            finished=r.is_finished,
            finish_reason=r.finish_reason,
            error=r.error,
            new_logprobs=t.pending_logprobs if r.params.logprobs is not None else None,
            num_prompt_tokens=len(r.prompt_token_ids),
            num_output_tokens=len(r.output_token_ids),
        )
        t.text += t.pending_text
        t.pending_text, t.pending_tokens, t.pending_logprobs = "", [], []
        if r.is_finished:
            del self._tracks[r.request_id]
        return out

    # ---- offline generation -------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[str | list[int]],
        adapters: Sequence[str | None] | str | None = None,
        sampling: Sequence[SamplingParams] | SamplingParams | None = None,
    ) -> list[GenerationResult]:
        """Generate for every prompt in this thread; prompt i uses adapters[i] (None = base) and sampling[i]."""
        n = len(prompts)
        adapter_list = list(adapters) if isinstance(adapters, list | tuple) else [adapters] * n
        params_list = list(sampling) if isinstance(sampling, list | tuple) else [sampling or SamplingParams()] * n
        if len(adapter_list) != n or len(params_list) != n:
            raise InvalidRequestError("prompts, adapters and sampling must have the same length")
        requests = [self.add_request(p, a, s) for p, a, s in zip(prompts, adapter_list, params_list, strict=True)]
        texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
        logprobs: dict[str, list[TokenLogprob]] = {r.request_id: [] for r in requests}
        try:
            while self.has_work():
                outputs = self.step()
                if not self.last_step_ran:  # waiting on an adapter load: do not spin
                    self.wake.wait(0.005)
                    self.wake.clear()
                for out in outputs:
                    if out.request_id in texts:
                        texts[out.request_id].append(out.new_text)
                        logprobs[out.request_id].extend(out.new_logprobs or [])
        finally:
            for r in requests:
                if not r.is_finished:
                    self.abort(r.request_id)
        return [
            GenerationResult(
                r.prompt_token_ids,
                r.output_token_ids,
                "".join(texts[r.request_id]) if self.tokenizer is not None else None,
                r.finish_reason or "length",
                logprobs[r.request_id] if r.params.logprobs is not None else None,
                r.error,
            )
            for r in requests
        ]
