"""Engine: requests in, outputs out. It owns the scheduler and the KV block pool and runs one step at a
time; its parts are the model on the device (DeviceModel, engine/offload.py: build, idle offload, wake
up) and the text side (TextCodec, engine/text.py: tokenizer, chat templates, output text streams).

One `step()` runs the step contract for every admitted request at once (requests of different adapters
share each step):

    batch = scheduler.schedule()                           # who runs, which tokens, which KV blocks
    logits = runner.run(batch.seqs)                        # one forward pass over the flat batch
    scheduler.postprocess(batch, token_ids, finish_check)  # append, detokenize, stop, free

`generate()` drives steps in the caller's thread (offline use); AsyncEngine drives them in a thread of
its own for the server.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapter_cache.cache import AdapterCache
from ..adapter_cache.sources import AdapterSources
from ..adapter_cache.versions import AdapterVersions, public_name
from ..config import Config
from ..errors import AdapterError, AdapterNotFoundError, ConfigError, InvalidRequestError
from ..scheduler.block_manager import BlockAllocator
from ..scheduler.prefix_cache import adapter_namespace, base_namespace
from ..scheduler.request import Request
from ..scheduler.sampling_params import SamplingParams
from ..scheduler.scheduler import Batch, Scheduler
from .grammar import GrammarCache, GrammarState
from .loader import DTYPES, base_shapes, generation_defaults, load_hf_config, resolve_model_dir
from .model import CausalLM, ModelSpec
from .offload import DeviceModel
from .protocol import EngineInfo, RequestOutput, TokenLogprob
from .runner import ModelRunner
from .sampler import make_generator, sample_batch
from .text import RequestText, TextCodec, load_tokenizer_in_background

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
    text: RequestText | None  # None without a tokenizer
    new_token_ids: list[int] = field(default_factory=list)  # since the last output
    new_logprobs: list[TokenLogprob] = field(default_factory=list)  # since the last output
    # this step's draw with its logprobs (only for a request that asked), consumed by the finish check
    drawn: TokenLogprob | None = None
    grammar: GrammarState | None = None  # a structured request's matcher (its own, also for n > 1)


def _same_dir(a: str, b: str) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def pick_device(name: str) -> torch.device:
    """auto | cpu | cuda[:N] -> the engine's device. A CUDA device becomes the current one: Triton
    launches, and torch calls that name no index, go to the current device, which is cuda:0 unless set."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ConfigError(f"device {name!r}: no CUDA device is available", param="device")
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s)", param="device")
    torch.cuda.set_device(device)
    return device


def pick_dtype(name: str, hf_config: Any) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    return DTYPES.get(str(dtype).removeprefix("torch."), torch.float32)


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        model_dir = resolve_model_dir(config.model, config.cache_dir)
        self.model_name = config.model or model_dir.name
        hf_config = load_hf_config(model_dir)
        dtype = pick_dtype(config.dtype, hf_config)
        self.device = pick_device(config.device)
        # Start-up runs three things at once: the tokenizer (mostly imports) in a thread, the adapters to
        # preload in the cache's load pool, and the base weights here (copies that release the GIL).
        tokenizer_future = load_tokenizer_in_background(model_dir)
        self.spec = ModelSpec.from_hf_config(hf_config)
        self.wake = threading.Event()  # set when an adapter finished loading (the step loop may proceed)
        self.versions = AdapterVersions()  # adapter name -> the version key new requests get
        self.adapter_cache = AdapterCache(
            AdapterSources(dict(config.adapters), config.adapter_dir, config.allow_hub),
            base_shapes(self.spec, self.model_name),
            config.max_lora_rank,
            dtype,
            num_slots=config.max_active_adapters,
            max_host_adapters=config.max_host_adapters,
            host_bytes_budget=int(config.host_cache_gib * 2**30),
            write_slot=lambda slot, weights, rank: self.device_model.live_runner().load_slot(
                slot, weights, rank
            ),
            clear_slot=lambda slot: self.device_model.live_runner().load_slot(slot, {}, 0),
            failure_ttl=config.adapter_failure_ttl,
            on_failure=self._fail_adapter_requests,
            on_ready=lambda name: self.wake.set(),
            host_rows=self.device.type == "cpu" and config.cpu_lora_rows,  # the slots keep row tables
        )
        # Adapters named on the command line (--adapter, --preload) are read and validated during start
        # (a broken one stops it, naming the cause); the first max_active_adapters go into device slots.
        preload = list(dict.fromkeys([name for name, _ in config.adapters] + list(config.preload)))
        for name in preload:
            self.adapter_cache.load(name)  # queued in the load pool, parsed while the weights load
        self.device_model = DeviceModel(
            config, model_dir, hf_config, self.spec, dtype, self.device, self.adapter_cache
        )
        self.text = TextCodec(model_dir, tokenizer_future.result(), self.adapter_cache.sources)
        self.grammars = GrammarCache(
            lambda: self.text.tokenizer,
            self.spec.vocab_size,
            self.text.eos_token_ids,
            capacity=config.structured_output_cache_size,
        )
        self.blocks = BlockAllocator(self.device_model.num_blocks, config.block_size)
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_active_adapters=config.max_active_adapters,
            blocks=self.blocks,
            residency=self.adapter_cache,
            prefill_chunk_size=config.prefill_chunk_size,
            max_wait_steps=config.max_wait_steps,
            namespace_of=self.cache_namespace if config.prefix_caching else None,
        )
        self.info = EngineInfo(
            model_name=self.model_name,
            dtype=str(dtype).removeprefix("torch."),
            device=str(self.device),
            max_model_len=config.max_model_len or self.spec.max_position_embeddings,
            kv_blocks=self.blocks.num_blocks,
            block_size=self.blocks.block_size,
            max_active_adapters=config.max_active_adapters,
            max_lora_rank=config.max_lora_rank,
            max_num_seqs=config.max_num_seqs,
            sampling_defaults=generation_defaults(model_dir) if config.generation_config == "auto" else {},
        )
        for name in preload:
            self.adapter_cache.load(name, wait=600.0)
        self.adapter_cache.install_ready()
        self.device_model.calibrate()  # CPU cost figures, timed now that start-up's other work is done
        self._tracks: dict[str, _Track] = {}
        self._ids = itertools.count()
        self.last_step_ran = False  # False: the last step had nothing to run (e.g. adapters still loading)
        # (num tokens fed, num sequences, seconds) per step when a caller sets a list here (benchmarks)
        self.step_log: list[tuple[int, int, float]] | None = None

    def _fail_adapter_requests(self, adapter: str, message: str) -> None:
        """The adapter cache's on_failure: its load failed, so requests waiting for it never could run."""
        self.scheduler.fail_adapter(adapter, message)

    def cache_namespace(self, adapter: str | None) -> str:
        """The prefix-cache namespace of K/V computed under `adapter` (None: the base model): its name and
        the digest of the weights in its device slot, so a reloaded, changed adapter never reuses blocks.
        The scheduler asks at admission, once the adapter is resident."""
        if adapter is None:
            return base_namespace(self.model_name)
        return adapter_namespace(adapter, self.adapter_cache.digest_of(adapter) or "")

    # ---- adapters and parts, as callers name them -----------------------------------------------
    def adapter_of(self, model: str | None) -> str | None:
        """The adapter that `model` names; None for the base model (None or the base model's name)."""
        return None if model is None or model == self.model_name else model

    def version_of(self, model: str | None) -> str | None:
        """The version key (adapter_cache/versions.py) new requests for `model` get; None for the base."""
        adapter = self.adapter_of(model)
        return None if adapter is None else self.versions.current(adapter)

    def update_adapter(self, name: str, path: str, timeout: float) -> str:
        """In-place update: load the PEFT directory `path` as a new version of the served adapter `name`
        and make it the one new requests get; requests already admitted or queued finish on the version
        they started with, whose slot and host copy are freed after the last of them. Returns the new
        version key (the current one when `path` is what it already serves). A new version that fails
        to load or validate raises its AdapterError and leaves the old one serving."""
        cache, sources = self.adapter_cache, self.adapter_cache.sources
        current = self.versions.current(name)
        if current in sources.named and _same_dir(sources.named[current], path):
            cache.load(current, wait=timeout)
            return current
        key = self.versions.new_key(name)
        sources.named[key] = path
        try:
            if cache.load(key, wait=timeout)["tier"] == "loading":
                raise AdapterError(
                    name, f"the new version did not load within {timeout:g} s", code="adapter_load_timeout"
                )
        except BaseException as exc:
            cache.unload(key)
            sources.named.pop(key, None)
            if isinstance(exc, AdapterError):  # say which name it was for and that nothing changed
                error = type(exc)(name, f"the update was refused, version {current!r} keeps serving: {exc.message}")
                error.code, error.status = exc.code, exc.status
                raise error from exc
            raise
        old = self.versions.switch(name, key)
        if old is not None:
            self._free_version(old)
        log.info("adapter %r updated in place: new requests get version %r", name, key)
        return key

    def forget_adapter(self, name: str) -> list[str]:
        """Drop every version of `name` but the name itself (after an unload): their slots, host copies
        and sources. Versions still finishing requests are freed when their last request ends."""
        keys = self.versions.forget(name)
        for key in keys:
            self._free_version(key)
        return keys

    def _free_version(self, key: str) -> None:
        """A retired version's last request ended: free its slot and host copy."""
        try:
            self.adapter_cache.unload(key)
        except AdapterError:  # cannot happen once nothing uses it; never let it break a step
            log.exception("freeing retired adapter version %r failed", key)
        if key != public_name(key):
            self.adapter_cache.sources.named.pop(key, None)

    def slot_of(self, model: str | None) -> int:
        """Device slot of a resident adapter (-1 for the base model); raises when it is not resident."""
        adapter = self.adapter_of(model)
        if adapter is None:
            return -1
        slot = self.adapter_cache.slot_of(adapter)
        if slot is None:
            raise AdapterNotFoundError(adapter, "adapter is not resident in a device slot")
        return slot

    @property
    def model(self) -> CausalLM | None:
        """The model on the device (None while offloaded)."""
        return self.device_model.model

    @property
    def runner(self) -> ModelRunner | None:
        return self.device_model.runner

    @property
    def tokenizer(self) -> Any | None:
        return self.text.tokenizer

    @property
    def eos_token_ids(self) -> set[int]:
        return self.text.eos_token_ids

    def encode(self, prompt: str | list[int]) -> list[int]:
        return self.text.encode(prompt)

    def chat_prompt(self, messages: list[dict[str, str]], adapter: str | None = None) -> list[int]:
        """Token ids of `messages` through the chat template (the adapter's own when it ships one)."""
        return self.text.chat_prompt(messages, self.version_of(adapter))

    def offload(self, mode: str) -> bool:
        """Idle offload (DeviceModel.offload), refused (False) while any request is admitted or waiting.
        Call it from the thread that steps; the next step with work wakes the model up."""
        released = self.device_model.offload(mode, is_idle=not self.has_work())
        if released:  # the KV cache's contents are gone with it: no cached prefix may point there
            self.scheduler.clear_prefix_cache()
        return released

    # ---- requests -----------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        adapter: str | None = None,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        grammar: Any = None,
    ) -> Request:
        """Validate and queue one request (thread-safe). Raises InvalidRequestError / AdapterError. The
        request runs on the version of its adapter that is current now, to its end. `priority` > 0 is
        background work (shadow runs), admitted only into spare capacity.

        A structured request (`params.structured`) uses `grammar` when the caller compiled it already
        (AsyncEngine does, off the step loop, with a time limit), else it compiles here, blocking."""
        params = params or SamplingParams()
        ids = self.text.encode(prompt)
        self.info.check_request(len(ids), params.max_tokens)
        if max(ids) >= self.spec.vocab_size or min(ids) < 0:
            raise InvalidRequestError(f"token ids must be in [0, {self.spec.vocab_size})", param="prompt")
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._tracks:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        state = None
        if params.structured is not None:
            if grammar is None:
                grammar = self.grammars.compile(params.structured)
            state = self.grammars.matcher(grammar, params.structured.kind)
        name = self.adapter_of(adapter)
        key = None if name is None else self.versions.acquire(name)
        try:
            error = None if key is None else self.adapter_cache.admission_error(key)
            if error is not None:
                raise error
            self._tracks[request_id] = _Track(
                make_generator(params.seed), self.text.request_text(ids, params.stop), grammar=state
            )
            request = Request(request_id, ids, params, key, priority=priority)
            self.scheduler.add(request)
        except BaseException:
            self._tracks.pop(request_id, None)
            if key is not None and self.versions.release(key):
                self._free_version(key)
            raise
        if params.structured is not None:
            self.grammars.count_request(params.structured.kind)
        return request

    def abort(self, request_id: str) -> bool:
        """Stop a request; its KV blocks are freed at the next step."""
        return self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def when_idle(self) -> bool:
        """Work for the stepping thread while no request is admitted or waiting: a CPU calibration that
        failed at start (a busy machine) is measured again (DeviceModel.retry_calibration). True when
        it did something."""
        return not self.has_work() and self.device_model.retry_calibration()

    # ---- the step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step; returns what each touched request produced (finished ones included)."""
        t0 = time.perf_counter()
        if self.device_model.offloaded is not None:
            if not self.has_work():  # an idle step leaves an offloaded model where it is
                self.last_step_ran = False
                return []
            self.device_model.wake_up()
        self.adapter_cache.install_ready()  # device slot writes happen here, between forward passes
        batch = self.scheduler.schedule()
        outputs = [self._output(r) for r in (*batch.aborted, *batch.failed)]
        self.last_step_ran = bool(batch.seqs)
        if not batch.seqs:
            return outputs
        try:
            logits = self.device_model.live_runner().run(batch.seqs)
            token_ids = self._sample(batch, logits)
            touched = self.scheduler.postprocess(batch, token_ids, self._finish_check)
        except Exception as exc:  # a failing step fails only its own requests; the engine goes on
            log.exception("step %d failed", batch.step)
            touched = self.scheduler.fail(
                batch, f"internal error in step {batch.step}: {type(exc).__name__}: {exc}"
            )
        outputs.extend(self._output(r) for r in touched)
        if self.step_log is not None:
            self.step_log.append((batch.num_tokens, len(batch.seqs), time.perf_counter() - t0))
        return outputs

    def _sample(self, batch: Batch, logits: torch.Tensor) -> list[int]:
        """The next token of every sequence that wants one (batch order); each draw's logprobs, for the
        requests that asked, wait in their track for the finish check."""
        rows = [s.request for s in batch.seqs if s.want_logits]
        tracks = [self._tracks[r.request_id] for r in rows]
        # grammar masks first: penalties, filters and the draw then only see allowed tokens
        self.grammars.apply_masks(logits, [t.grammar for t in tracks])
        sampled = sample_batch(
            logits,
            [r.params for r in rows],
            [t.generator for t in tracks],
            [(r.prompt_token_ids, r.output_token_ids) for r in rows],
        )
        for i, t in enumerate(tracks):
            logprob = sampled.logprobs[i]
            t.drawn = (
                None if logprob is None else (sampled.token_ids[i], logprob, sampled.top_logprobs[i] or [])
            )
        return sampled.token_ids

    def _finish_check(self, r: Request) -> str | None:
        """Called by the scheduler right after it appended this step's token to r (under its lock)."""
        t = self._tracks[r.request_id]
        token = r.output_token_ids[-1]
        drawn, t.drawn = t.drawn, None
        if token in self.text.eos_token_ids and not r.params.ignore_eos:
            r.output_token_ids.pop()  # EOS ends the text; it is reported as finish_reason, not as a token
            return self._end_text(t, "stop")
        t.new_token_ids.append(token)
        if drawn is not None:
            t.new_logprobs.append(drawn)
        if t.text is not None and t.text.add(token):
            return "stop"
        if t.grammar is not None:
            if not t.grammar.accept(token):  # the mask made this impossible; never guess past it
                r.error = f"token {token} does not match the request's grammar"
                return "error"
            if t.grammar.is_terminated or t.grammar.only_stop_allowed():
                return self._end_text(t, "stop")  # the grammar is complete: nothing may follow
        if len(r.output_token_ids) >= r.params.max_tokens:
            return self._end_text(t, "length")
        return None

    @staticmethod
    def _end_text(t: _Track, reason: str) -> str:
        """Release the held-back text at the end; a stop string completed by it makes the reason "stop"."""
        return "stop" if t.text is not None and t.text.finish() else reason

    def _output(self, r: Request) -> RequestOutput:
        """What `r` produced since its last output; a finished request's track goes with its last one."""
        t = self._tracks[r.request_id]
        out = RequestOutput(
            request_id=r.request_id,
            new_token_ids=t.new_token_ids,
            new_text=t.text.take() if t.text is not None else "",
            finished=r.is_finished,
            finish_reason=r.finish_reason,
            error=r.error,
            new_logprobs=t.new_logprobs if r.params.logprobs is not None else None,
            num_prompt_tokens=len(r.prompt_token_ids),
            num_output_tokens=len(r.output_token_ids),
            num_cached_tokens=r.num_cached_tokens,
            adapter_version=r.adapter,
        )
        t.new_token_ids, t.new_logprobs = [], []
        if r.is_finished:
            del self._tracks[r.request_id]
            if r.adapter is not None and self.versions.release(r.adapter):
                self._free_version(r.adapter)  # the last request of a replaced version: free its slot
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
        adapter_list = [adapters] * n if adapters is None or isinstance(adapters, str) else list(adapters)
        if sampling is None or isinstance(sampling, SamplingParams):
            params_list = [sampling or SamplingParams()] * n
        else:
            params_list = list(sampling)
        if len(adapter_list) != n or len(params_list) != n:
            raise InvalidRequestError("prompts, adapters and sampling must have the same length")
        requests = [
            self.add_request(p, a, s) for p, a, s in zip(prompts, adapter_list, params_list, strict=True)
        ]
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
                "".join(texts[r.request_id]) if self.text.tokenizer is not None else None,
                r.finish_reason or "length",
                logprobs[r.request_id] if r.params.logprobs is not None else None,
                r.error,
            )
            for r in requests
        ]
