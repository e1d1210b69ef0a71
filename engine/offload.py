"""The engine's device side: the base model with its LoRA slots and the paged KV cache on the device,
and the idle offload that releases them (`offload`) and brings them back (`wake_up`), either from host
copies of the base weights ("host") or from the checkpoint ("drop").
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter_cache.cache import AdapterCache
from ..config import IDLE_OFFLOAD_MODES, Config
from ..kernels.cpu_calibrate import CACHE_FILE_NAME, Calibration, startup_figures
from .default_model import default_cache_dir
from .loader import export_weights, load_model
from .model import CausalLM, KernelOptions, ModelSpec
from .runner import ModelRunner

log = logging.getLogger(__name__)

# A start-up calibration that failed (a busy machine) is measured again when the engine is idle, at most
# this many times, this many seconds apart.
CALIBRATION_RETRIES = 3
CALIBRATION_RETRY_SECONDS = 30.0

HostWeights = list[tuple[str, torch.Tensor]]  # (checkpoint name, host tensor), as load_model takes them


@dataclass
class OffloadStats:
    num_offloads: int = 0
    num_wakeups: int = 0
    wakeup_seconds_sum: float = 0.0


class DeviceModel:
    """Owns what the engine holds on its device. `model` and `runner` are None while offloaded."""

    def __init__(
        self,
        config: Config,
        model_dir: Path,
        hf_config: Any,
        spec: ModelSpec,
        dtype: torch.dtype,
        device: torch.device,
        adapter_cache: AdapterCache,
    ) -> None:
        self._config, self._model_dir, self._hf_config = config, model_dir, hf_config
        self.spec, self.dtype, self.device = spec, dtype, device
        self._adapter_cache = adapter_cache
        # fixed for the engine's life (the scheduler's block pool keeps its size across offloads); sized by
        # the first _build, once the weights are on the device
        self.num_blocks = 0
        self.model: CausalLM | None = None
        self.runner: ModelRunner | None = None
        self.offloaded: str | None = None  # None while on the device, else the offload mode
        self.stats = OffloadStats()
        self._host_weights: HostWeights | None = None  # "host" mode only, while offloaded
        # CPU: the LoRA cost model's figures, calibrated once (calibrate(), once start-up's other work is
        # done) and kept across offloads
        self.calibration: Calibration | None = None
        self.calibration_tries = 0  # measurements made (start-up's and the idle retries')
        self._calibrated_at = 0.0  # time.monotonic() of the last one
        self._build(None)

    def _build(self, weights: HostWeights | None) -> None:
        """Base model with its LoRA slots and the KV cache on the device, from the checkpoint or from
        host copies of its weights."""
        cfg = self._config
        model, _ = load_model(
            self._model_dir,
            self.dtype,
            self.device,
            lora_slots=(cfg.max_active_adapters, cfg.max_lora_rank),
            weights=weights,
            hf_config=self._hf_config,
            kernels=KernelOptions(cfg.lora_backend, cfg.cpu_packed_linear, cfg.cpu_lora_rows, cfg.cpu_lora_merge),
        )
        if self.device.type == "cpu" and self.calibration is not None:
            model.set_cost_figures(self.calibration.figures)
        self.model = model
        if not self.num_blocks:
            self.num_blocks = kv_cache_blocks(cfg, self.spec, self.dtype, self.device)
        self.runner = ModelRunner(model, self.spec, self.num_blocks, cfg.block_size)

    def calibrate(self) -> None:
        """CPU: measure (or read from the cache) the LoRA cost model's figures and give them to the model.
        The engine calls it at the end of its start, after the tokenizer and the preloaded adapters, so
        the timings do not compete with that work (figures measured on a busy machine pick poor plans)."""
        model = self.model
        if self.device.type != "cpu" or self.calibration is not None or model is None:
            return
        self._measure(model)

    def retry_calibration(self) -> bool:
        """CPU, called by the engine when it is idle: when start-up's calibration failed (figures measured
        on a machine too busy to be believable: every step would run without a cost model for the
        server's life), measure again, at most CALIBRATION_RETRIES times, CALIBRATION_RETRY_SECONDS
        apart. Runs on the stepping thread (one OpenMP team), between steps. True when it measured."""
        model, cal = self.model, self.calibration
        if model is None or cal is None or cal.figures is not None or self._config.cpu_calibration != "auto":
            return False
        if self.calibration_tries > CALIBRATION_RETRIES or time.monotonic() - self._calibrated_at < CALIBRATION_RETRY_SECONDS:
            return False
        self._measure(model)
        return True

    def _measure(self, model: CausalLM) -> None:
        cfg = self._config
        self.calibration = calibrate_cpu_model(model, cfg.cpu_calibration, cfg.cache_dir)
        self.calibration_tries += 1
        self._calibrated_at = time.monotonic()
        log.info("CPU LoRA planner: %s", self.calibration.describe())
        model.set_cost_figures(self.calibration.figures)

    def live_runner(self) -> ModelRunner:
        """The runner; raises while offloaded (the engine wakes the model before it steps)."""
        if self.runner is None:
            raise RuntimeError("the model is offloaded")
        return self.runner

    def offload(self, mode: str, *, is_idle: bool) -> bool:
        """Release the device copies of the base model, the adapter slots and the KV cache. mode "host":
        keep host (CPU) copies of the base weights and the adapters' host tier, so wake_up() only copies
        back; "drop": keep nothing (weights reload from disk, adapters on demand). Returns False, doing
        nothing, unless `is_idle` (no request admitted or waiting) and the model is on the device. Call
        it from the thread that steps."""
        if mode not in IDLE_OFFLOAD_MODES:
            raise ValueError(f"offload mode must be 'host' or 'drop', not {mode!r}")
        if self.offloaded is not None or not is_idle or self.model is None:
            return False
        if mode == "host":
            self._host_weights = export_weights(self.model, self.spec)
        self._adapter_cache.release_device(drop_host=mode == "drop")
        self.model = self.runner = None
        gc.collect()  # the modules hold reference cycles: free the device memory now
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.offloaded = mode
        self.stats.num_offloads += 1
        log.info("idle: offloaded the model (%s)", mode)
        return True

    def wake_up(self) -> None:
        """Bring the offloaded model back (the engine's step calls it when work arrives)."""
        if self.offloaded is None:
            return
        t0 = time.perf_counter()
        self._build(self._host_weights)
        self._host_weights = None
        mode, self.offloaded = self.offloaded, None
        self._adapter_cache.restore_held()
        seconds = time.perf_counter() - t0
        self.stats.num_wakeups += 1
        self.stats.wakeup_seconds_sum += seconds
        log.info("woke the model up from %s offload in %.2f s", mode, seconds)

    def device_bytes(self) -> int:
        """Bytes of base weights, packed copies, adapter slots (and the CPU LoRA path's stacked and fused
        copies of them) and KV cache held on the device (CPU memory on a CPU engine); 0 while offloaded.
        Safe from other threads."""
        model, runner = self.model, self.runner  # read once: the step thread may offload meanwhile
        if model is None or runner is None:
            return 0
        tensors: list[torch.Tensor | None] = [*model.parameters(), model.lm_head_packed]
        for lin in model.lora_linears():
            tensors += [
                lin.weight_ext,
                lin.bias_ext,
                lin.lora_b,
                lin.packed,
                lin.lora_at,
                *(lin.lora_bt or []),
            ]
            if lin.slots is not None:  # the CPU LoRA path's copies of the active slots (kernels/cpu_lora.py)
                fused = lin.slots.fused
                if fused is not None:
                    tensors += [fused.packed, getattr(fused, "bias", None)]  # FusedPacked or MergedPacked
                for stack in list(lin.slots.stack_cache.values()):  # list(): one atomic read of the dict
                    tensors += [stack.a, stack.bt]
                tensors += [compact.a for compact in list(lin.slots.rows_cache.values())]
        tensors += [t for kv in runner.kv_caches for t in kv]
        return _storage_bytes(t for t in tensors if t is not None)


def calibrate_cpu_model(model: CausalLM, mode: str, cache_dir: str | None, *, use_cache: bool = True) -> Calibration:
    """The CPU LoRA cost model's figures for this model's LoRA linears (kernels/cpu_calibrate.py): mode
    "auto" (Config.cpu_calibration) measures them, or takes them from <cache dir>/cpu_calibration.json
    when a re-timing confirms them (use_cache=False: measure anew, touch no file); "off" measures nothing.
    Never raises for a measurement problem: figures None (the "grouped" plan) and the reason."""
    dtype = next(model.parameters()).dtype
    cache_file = default_cache_dir(cache_dir) / CACHE_FILE_NAME if use_cache else None
    return startup_figures(mode, model.lora_shapes(), dtype, cache_file)


def kv_cache_blocks(config: Config, spec: ModelSpec, dtype: torch.dtype, device: torch.device) -> int:
    """KV cache blocks: kv_cache_bytes over the bytes of one block. Sized from free memory, the pool is
    capped at twice what max_num_seqs sequences of max_model_len tokens fill (the rest keeps cached
    prefixes): a small model on a large GPU would otherwise get millions of blocks it never uses."""
    block_bytes = ModelRunner.kv_bytes_per_block(spec, config.block_size, dtype)
    num_blocks = kv_cache_bytes(config, device) // block_bytes
    if config.kv_cache_gib is None and device.type == "cuda":
        max_len = config.max_model_len or spec.max_position_embeddings
        num_blocks = min(num_blocks, 2 * config.max_num_seqs * -(-max_len // config.block_size))
    return max(2, num_blocks)


def kv_cache_bytes(config: Config, device: torch.device) -> int:
    """The KV cache's byte budget: --kv-cache-gib when given; else on CUDA the configured fraction of the
    device memory free now (call it after the weights and adapter slots are allocated), else 1 GiB."""
    if config.kv_cache_gib is not None:
        return int(config.kv_cache_gib * 2**30)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # blocks the allocator holds but nothing uses count as free
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * config.kv_cache_memory_fraction)
    return 2**30


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # opaque (oneDNN packed) tensors
            total += t.numel() * t.element_size()
            continue
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total
