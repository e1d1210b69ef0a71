"""The one frozen Config, parsed once at the edge (CLI flags, LORAPLEX_* env vars) and validated here."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import ConfigError

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/@:]{0,127}$")


@dataclass(frozen=True)
class Config:
    model: str | None = None  # local HF dir or Hub id; None = the embedded default (SmolLM2-135M-Instruct)
    adapters: tuple[tuple[str, str], ...] = ()  # (name, source) pairs from --adapter NAME=SOURCE
    adapter_dir: str | None = None  # each subfolder an adapter named after it, discovered when requested
    allow_hub: bool = False  # adapter names of the form org/name[@revision] load from the Hugging Face Hub
    max_host_adapters: int = 64  # host (CPU) tier: adapters kept parsed and validated
    host_cache_gib: float = 4.0  # host tier byte budget
    adapter_failure_ttl: float = 30.0  # seconds a failed adapter load is remembered (fails fast, no re-read)
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16 (auto: the checkpoint's, float32 if unknown)
    device: str = "auto"  # auto | cpu | cuda[:N]
    max_lora_rank: int = 64
    max_active_adapters: int = 8  # device slots
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_gib: float = 1.0
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    prefill_chunk_size: int | None = None  # None: a prompt chunk is whatever the step's token budget leaves
    max_wait_steps: int = 64  # fairness: a request passed over this many steps is admitted before newer ones
    preload: tuple[str, ...] = ()  # adapter names (from adapter_dir or the Hub) loaded during start
    idle_offload_seconds: float | None = None  # release the device copies after this long idle (None: never)
    idle_offload: str = "host"  # host: keep host copies (fast wake) | drop: keep nothing (reload from disk)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}", param="dtype")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}", param="device")
        for name in ("max_lora_rank", "max_active_adapters", "max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1", param=name)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError("max_num_batched_tokens must be >= max_num_seqs", param="max_num_batched_tokens")
        if self.prefill_chunk_size is not None and self.prefill_chunk_size < 1:
            raise ConfigError("prefill_chunk_size must be >= 1", param="prefill_chunk_size")
        if self.max_host_adapters < 1 or self.host_cache_gib <= 0:
            raise ConfigError("max_host_adapters must be >= 1 and host_cache_gib > 0", param="max_host_adapters")
        if self.kv_cache_gib <= 0:
            raise ConfigError("kv_cache_gib must be > 0", param="kv_cache_gib")
        if self.idle_offload not in ("host", "drop"):
            raise ConfigError(f"idle_offload must be host or drop, got {self.idle_offload!r}", param="idle_offload")
        if self.idle_offload_seconds is not None and not self.idle_offload_seconds > 0:
            raise ConfigError("idle_offload_seconds must be > 0", param="idle_offload_seconds")
        for n in self.preload:
            if not _ADAPTER_NAME.match(n):
                raise ConfigError(f"invalid adapter name {n!r} in preload", param="preload")
        names = [n for n, _ in self.adapters]
        for n in names:
            if not _ADAPTER_NAME.match(n):
                raise ConfigError(f"invalid adapter name {n!r}", param="adapter")
        if len(set(names)) != len(names):
            raise ConfigError("adapter names must be unique", param="adapter")


def parse_adapter_flag(value: str) -> tuple[str, str]:
    """--adapter NAME=SOURCE (or just a path: its folder name is the adapter name)."""
    name, sep, source = value.partition("=")
    if not sep:
        source = value
        name = source.rstrip("/").rsplit("/", 1)[-1]
    if not name or not source:
        raise ConfigError(f"--adapter expects NAME=SOURCE, got {value!r}", param="adapter")
    return name, source
