"""The one frozen Config (engine) and ServerConfig (`loraplex serve`), validated here.

Each field carries its command-line help in `metadata`; `settings()` turns a dataclass into the list
that the CLI (cli.py: one flag and one LORAPLEX_* variable per field) and Ray Serve's app args
(deploy/ray/app.py) are built from, so a new field is a flag, an env var and an app arg at once.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/@:]{0,127}$")
DTYPES = ("auto", "float32", "bfloat16", "float16")
IDLE_OFFLOAD_MODES = ("host", "drop")
LORA_BACKENDS = ("auto", "torch", "triton")
LOG_LEVELS = ("debug", "info", "warning", "error")
GENERATION_CONFIGS = ("auto", "openai")
CPU_CALIBRATIONS = ("auto", "off")  # as kernels/cpu_calibrate.MODES


def _opt(default: Any, help: str, **meta: Any) -> Any:
    """A field with its CLI metadata: help, and optionally flag (when not --field-name), metavar, choices
    and item (parses one element of a repeatable field)."""
    show = meta.pop("repr", True)
    return field(default=default, metadata={"help": help, **meta}, repr=show)


def parse_adapter_flag(value: str) -> tuple[str, str]:
    """--adapter NAME=SOURCE (or just a path: its folder name is the adapter name)."""
    name, sep, source = value.partition("=")
    if not sep:
        source = value
        name = source.rstrip("/").rsplit("/", 1)[-1]
    if not name or not source:
        raise ConfigError(f"--adapter expects NAME=SOURCE, got {value!r}", param="adapter")
    return name, source


@dataclass(frozen=True)
class Config:
    """Everything an Engine needs. Defaults are the CLI's defaults."""

    model: str | None = _opt(
        None, "local HF model dir or Hub id org/name[@rev]; default: embedded SmolLM2-135M-Instruct"
    )
    adapters: tuple[tuple[str, str], ...] = _opt(
        (),
        "a PEFT LoRA adapter directory, repeatable",
        flag="--adapter",
        metavar="NAME=SOURCE",
        item=parse_adapter_flag,
    )
    adapter_dir: str | None = _opt(None, "a folder of adapter folders, discovered on request")
    allow_hub: bool = _opt(
        False, "adapter names of the form org/name[@revision] load from the Hugging Face Hub"
    )
    max_host_adapters: int = _opt(64, "host (CPU) tier: adapters kept parsed and validated")
    host_cache_gib: float = _opt(4.0, "host tier byte budget, GiB")
    adapter_failure_ttl: float = _opt(
        30.0, "seconds a failed adapter load is remembered (it fails fast, no re-read)"
    )
    dtype: str = _opt("auto", "auto: the checkpoint's dtype (float32 if it names none)", choices=DTYPES)
    device: str = _opt("auto", "auto | cpu | cuda[:N]")
    max_lora_rank: int = _opt(64, "largest adapter rank (the device slots' size)")
    max_active_adapters: int = _opt(8, "device slots: distinct adapters in one batch")
    max_num_seqs: int = _opt(64, "sequences decoded at once")
    max_num_batched_tokens: int = _opt(2048, "tokens per step (prompt chunks and decodes together)")
    block_size: int = _opt(16, "tokens per KV cache block")
    kv_cache_gib: float | None = _opt(
        None,
        "KV cache size, GiB (default: 1 on CPU; on CUDA, --kv-cache-memory-fraction of the memory free once "
        "the model is loaded)",
    )
    kv_cache_memory_fraction: float = _opt(
        0.9,
        "CUDA without --kv-cache-gib: the share of the device memory still free after the model and its "
        "adapter slots are loaded that the KV cache takes (the rest is left for activations; at most twice "
        "what max-num-seqs sequences of max-model-len tokens fill)",
    )
    max_model_len: int | None = _opt(
        None, "prompt + output tokens per request (default: the model's max_position_embeddings)"
    )
    prefill_chunk_size: int | None = _opt(
        None, "largest prompt chunk per step (default: whatever the step's token budget leaves)"
    )
    prefix_caching: bool = _opt(
        True,
        "reuse the KV blocks of repeated prompt prefixes (per adapter and adapter version; --no-prefix-caching: off)",
    )
    max_wait_steps: int = _opt(
        64,
        "fairness: a request passed over this many steps is admitted before newer ones (0: first come, first served)",
    )
    preload: tuple[str, ...] = _opt(
        (),
        "an adapter name (from --adapter-dir or the Hub) to load during start, repeatable; --adapter ones always are",
        metavar="NAME",
    )
    idle_offload_seconds: float | None = _opt(
        None,
        "release the model's device memory after this many idle seconds; the next request brings it back "
        "(default: never)",
    )
    idle_offload: str = _opt(
        "host",
        "host: keep host copies of the weights and adapters (fast wake-up); drop: keep nothing",
        choices=IDLE_OFFLOAD_MODES,
    )
    structured_output_compile_timeout: float = _opt(
        10.0,
        "seconds a structured output's grammar may take to compile; a request whose compile runs over fails "
        "with a 400 (the compile finishes in the background and is cached)",
    )
    structured_output_cache_size: int = _opt(256, "compiled grammars kept (LRU, keyed by the canonical schema)")
    generation_config: str = _opt(
        "auto",
        "sampling defaults of a request that omits temperature, top_p, top_k, min_p or repetition_penalty: "
        "auto (the model's generation_config.json where it sets them, as vLLM) or openai (temperature 1, top_p 1)",
        choices=GENERATION_CONFIGS,
    )
    cache_dir: str | None = _opt(
        None, "where the converted default model and the CPU calibration live (default: ~/.cache/loraplex)"
    )
    # Kernel switches, mostly for A/B measurements; the engine hands them to the model (engine/model.py).
    lora_backend: str = _opt(
        "auto",
        "LoRA kernels: auto (Triton on CUDA tensors, the torch reference on CPU), or force torch or triton",
        choices=LORA_BACKENDS,
    )
    cpu_packed_linear: bool = _opt(
        True, "16-bit models on CPU: oneDNN-packed base linears (one more copy of them)"
    )
    cpu_lora_rows: bool = _opt(
        True,
        "CPU: row tables of the adapter slots for the per-token rows LoRA strategy (one more copy of the slots)",
    )
    cpu_lora_merge: bool = _opt(
        True,
        "16-bit models on CPU: while every token of the steps uses one adapter, serve them from a packed copy of "
        "the weights with that adapter merged in (no LoRA work per step; one more copy of the linears while it "
        "lives; bf16 rounding of W + BA, as PEFT's merge)",
    )
    cpu_calibration: str = _opt(
        "auto",
        "CPU: auto (time the LoRA cost model's per-machine figures at start on the model's shapes, cached in "
        "the cache dir as cpu_calibration.json) or off (no cost model: every step uses the grouped strategy)",
        choices=CPU_CALIBRATIONS,
    )

    def __post_init__(self) -> None:
        for name, allowed in (
            ("dtype", DTYPES),
            ("idle_offload", IDLE_OFFLOAD_MODES),
            ("lora_backend", LORA_BACKENDS),
            ("generation_config", GENERATION_CONFIGS),
            ("cpu_calibration", CPU_CALIBRATIONS),
        ):
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}", param=name
                )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}", param="device")
        for name in (
            "max_lora_rank",
            "max_active_adapters",
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1", param=name)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ConfigError(
                "max_num_batched_tokens must be >= max_num_seqs", param="max_num_batched_tokens"
            )
        for name in ("prefill_chunk_size", "max_model_len"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1", param=name)
        if self.max_wait_steps < 0:  # 0 is strict first-come first-served (the scheduler's rule)
            raise ConfigError("max_wait_steps must be >= 0", param="max_wait_steps")
        if self.adapter_failure_ttl < 0:
            raise ConfigError("adapter_failure_ttl must be >= 0", param="adapter_failure_ttl")
        if self.max_host_adapters < 1 or self.host_cache_gib <= 0:
            raise ConfigError(
                "max_host_adapters must be >= 1 and host_cache_gib > 0", param="max_host_adapters"
            )
        if self.structured_output_compile_timeout <= 0:
            raise ConfigError(
                "structured_output_compile_timeout must be > 0", param="structured_output_compile_timeout"
            )
        if self.structured_output_cache_size < 1:
            raise ConfigError("structured_output_cache_size must be >= 1", param="structured_output_cache_size")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise ConfigError("kv_cache_gib must be > 0", param="kv_cache_gib")
        if not 0 < self.kv_cache_memory_fraction < 1:
            raise ConfigError("kv_cache_memory_fraction must be in (0, 1)", param="kv_cache_memory_fraction")
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


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server's own settings (`loraplex serve`, and per replica behind Ray Serve)."""

    host: str = _opt("127.0.0.1", "bind address (default 127.0.0.1)")
    port: int = _opt(8000, "TCP port (default 8000)")
    served_model_name: str | None = _opt(None, "the base model's name in the API (default: --model)")
    api_key: str | None = _opt(None, "an admin API key (auth is off unless a key is set)", repr=False)
    api_keys_file: str | None = _opt(None, 'JSON: {KEY: {"adapters": [names or globs], "admin": bool}}')
    max_queue: int | None = _opt(None, "waiting requests before 429 (default: no limit)")
    routes: str | None = _opt(None, "aliases file (YAML, or JSON for .json): {ALIAS: {versions: {V: weight}, shadow?}}")
    routes_poll_seconds: float = _opt(1.0, "how often the --routes file is checked for changes")
    max_body_bytes: int = _opt(4 * 2**20, "request body limit (413 above)")
    shutdown_grace_seconds: float = _opt(30.0, "on SIGTERM, how long in-flight requests may take to finish")
    log_level: str = _opt("info", "log level of the server's messages", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be 0..65535, got {self.port}", param="port")
        if self.max_queue is not None and self.max_queue < 1:
            raise ConfigError("max_queue must be >= 1", param="max_queue")
        if self.routes_poll_seconds <= 0:
            raise ConfigError("routes_poll_seconds must be > 0", param="routes_poll_seconds")
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be >= 1024", param="max_body_bytes")
        if self.shutdown_grace_seconds < 0:
            raise ConfigError("shutdown_grace_seconds must be >= 0", param="shutdown_grace_seconds")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}", param="log_level")


@dataclass(frozen=True)
class Setting:
    """One field of Config or ServerConfig as the CLI and the Ray app args see it."""

    name: str  # the dataclass field
    flag: str  # --max-num-seqs
    env: str  # LORAPLEX_MAX_NUM_SEQS
    kind: type  # str, int, float or bool: the value's type (a repeated field's elements: str)
    repeated: bool  # a tuple: a repeatable flag, a comma-separated env var
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    item: Callable[[str], Any] | None = None  # parses one element of a repeated field


def settings(cls: type) -> list[Setting]:
    """The fields of a config dataclass (Config, ServerConfig) in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in fields(cls):
        hint = hints[f.name]
        if isinstance(hint, types.UnionType):  # X | None
            (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
        repeated = typing.get_origin(hint) is tuple
        meta = f.metadata
        out.append(
            Setting(
                name=f.name,
                flag=meta.get("flag", "--" + f.name.replace("_", "-")),
                env="LORAPLEX_" + f.name.upper(),
                kind=str if repeated else hint,
                repeated=repeated,
                default=f.default,
                help=meta["help"],
                choices=meta.get("choices"),
                metavar=meta.get("metavar"),
                item=meta.get("item"),
            )
        )
    return out


def parse_bool(value: str) -> bool:
    """An env var's truth value: 1/true/yes/on or 0/false/no/off (any case)."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected 1/true/yes/on or 0/false/no/off, got {value!r}")


def parse_text(s: Setting, text: str) -> Any:
    """A setting's value from its env var text (a repeated one: comma-separated elements)."""
    if s.repeated:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if s.kind is bool:
        return parse_bool(text)
    return s.kind(text)


_T = typing.TypeVar("_T")


def build(cls: type[_T], values: Mapping[str, Any]) -> _T:
    """cls (Config or ServerConfig) from plain values (parsed flags, YAML): a repeated field's list
    becomes a tuple of its parsed elements (--adapter strings NAME=SOURCE become pairs); unset keys keep
    their defaults. Raises ConfigError for an unknown name or a bad value."""
    by_name = {s.name: s for s in settings(cls)}
    unknown = sorted(set(values) - set(by_name))
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields {unknown}", param=unknown[0])
    kwargs = {}
    for name, value in values.items():
        s = by_name[name]
        if s.repeated and value is not None:
            if isinstance(value, str):
                value = parse_text(s, value)
            parse = s.item or (lambda v: v)
            value = tuple(parse(v) if isinstance(v, str) else tuple(v) for v in value)
        kwargs[name] = value
    return cls(**kwargs)
