"""`loraplex` command line: serve (the HTTP server), generate, bench (load test), demo-adapters.

Every engine flag also reads a LORAPLEX_* environment variable (flag wins), e.g. LORAPLEX_MODEL,
LORAPLEX_DTYPE, LORAPLEX_MAX_LORA_RANK; LORAPLEX_ADAPTERS takes NAME=SOURCE pairs separated by commas.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from .config import Config, parse_adapter_flag
from .errors import LoraplexError


def _env(name: str, default=None, cast=str):
    value = os.environ.get(f"LORAPLEX_{name}")
    return default if value in (None, "") else cast(value)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags shared by every command that builds an engine (generate, serve, bench)."""
    d = Config()
    p.add_argument(
        "--model",
        default=_env("MODEL"),
        help="local HF model dir or Hub id org/name[@rev]; default: embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        metavar="NAME=SOURCE",
        help="a PEFT LoRA adapter directory, repeatable (env LORAPLEX_ADAPTERS: comma-separated)",
    )
    p.add_argument(
        "--adapter-dir",
        default=_env("ADAPTER_DIR"),
        help="a folder of adapter folders, discovered on request",
    )
    p.add_argument(
        "--allow-hub",
        action="store_true",
        default=_env("ALLOW_HUB", False, lambda v: v.lower() in ("1", "true", "yes")),
    )
    p.add_argument(
        "--max-host-adapters", type=int, default=_env("MAX_HOST_ADAPTERS", d.max_host_adapters, int)
    )
    p.add_argument("--host-cache-gib", type=float, default=_env("HOST_CACHE_GIB", d.host_cache_gib, float))
    p.add_argument(
        "--dtype", default=_env("DTYPE", d.dtype), choices=["auto", "float32", "bfloat16", "float16"]
    )
    p.add_argument("--device", default=_env("DEVICE", d.device), help="auto | cpu | cuda[:N]")
    p.add_argument("--max-lora-rank", type=int, default=_env("MAX_LORA_RANK", d.max_lora_rank, int))
    p.add_argument(
        "--max-active-adapters", type=int, default=_env("MAX_ACTIVE_ADAPTERS", d.max_active_adapters, int)
    )
    p.add_argument("--max-num-seqs", type=int, default=_env("MAX_NUM_SEQS", d.max_num_seqs, int))
    p.add_argument("--kv-cache-gib", type=float, default=_env("KV_CACHE_GIB", d.kv_cache_gib, float))
    p.add_argument(
        "--preload",
        action="append",
        default=None,
        metavar="NAME",
        help="an adapter name (from --adapter-dir or the Hub) to load during start, repeatable "
        "(env LORAPLEX_PRELOAD: comma-separated); --adapter ones always are",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    raw = args.adapter if args.adapter is not None else [a for a in _env("ADAPTERS", "").split(",") if a]
    preload = args.preload if args.preload is not None else [a for a in _env("PRELOAD", "").split(",") if a]
    return Config(
        model=args.model,
        adapters=tuple(parse_adapter_flag(a) for a in raw),
        adapter_dir=args.adapter_dir,
        allow_hub=args.allow_hub,
        max_host_adapters=args.max_host_adapters,
        host_cache_gib=args.host_cache_gib,
        dtype=args.dtype,
        device=args.device,
        max_lora_rank=args.max_lora_rank,
        max_active_adapters=args.max_active_adapters,
        max_num_seqs=args.max_num_seqs,
        kv_cache_gib=args.kv_cache_gib,
        preload=tuple(preload),
        idle_offload_seconds=getattr(args, "idle_offload_seconds", None),
        idle_offload=getattr(args, "idle_offload", "host"),
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.engine import Engine
    from .scheduler.request import SamplingParams

    config = config_from_args(args)
    names = [n for n, _ in config.adapters]
    if args.use is not None and args.use not in names:
        raise SystemExit(f"--use {args.use!r} names no --adapter (given: {names})")
    adapter = args.use if args.use is not None else (names[0] if len(names) == 1 else None)
    if adapter is None and len(names) > 1:
        raise SystemExit(f"several adapters given {names}: pick one with --use NAME")
    engine = Engine(config)
    prompt = engine.chat_prompt([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=tuple(args.stop or ()),
    )
    (result,) = engine.generate([prompt], [adapter], params)
    sys.stdout.write((result.text or "") + "\n")
    return 0


def cmd_demo_adapters(args: argparse.Namespace) -> int:
    from .adapter_cache.demo import write_demo_adapters
    from .engine.loader import resolve_model_dir

    paths = write_demo_adapters(Path(args.dir), resolve_model_dir(args.model))
    for p in paths:
        print(f"{p.name}={p}")
    return 0


def _demo_adapter_sources() -> tuple[tuple[str, str], ...]:
    """The demo adapters of the default model, written once under the cache dir."""
    from .adapter_cache.demo import DEMO_ADAPTERS, write_demo_adapters
    from .engine.default_model import default_cache_dir
    from .engine.loader import resolve_model_dir

    out = default_cache_dir() / "demo-adapters"
    names = [spec.name for spec in DEMO_ADAPTERS]
    if not all((out / n / "adapter_model.safetensors").is_file() for n in names):
        write_demo_adapters(out, resolve_model_dir(None))
    return tuple((n, str(out / n)) for n in names)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.app import create_app, serve
    from .server.auth import build_key_table

    config = config_from_args(args)  # flag mistakes fail now, before binding
    for name, value, low in (
        ("--max-queue", args.max_queue, 1),
        ("--max-body-bytes", args.max_body_bytes, 1024),
    ):
        if value is not None and value < low:
            raise SystemExit(f"{name} must be >= {low}")
    if args.shutdown_grace_seconds < 0:
        raise SystemExit("--shutdown-grace-seconds must be >= 0")
    keys = build_key_table(args.api_key, args.api_keys_file)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def build_engine():  # runs in a background thread while the server already answers /health
        from .engine.async_engine import AsyncEngine
        from .engine.engine import Engine

        cfg = config
        if cfg.model is None and not cfg.adapters and cfg.adapter_dir is None:
            cfg = replace(cfg, adapters=_demo_adapter_sources())
        return AsyncEngine(Engine(cfg))

    app = create_app(
        None,
        build_engine=build_engine,
        api_keys=keys,
        served_model_name=args.served_model_name,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
    )
    return serve(app, args.host, args.port, args.shutdown_grace_seconds, args.log_level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Many LoRA adapters on one base model.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible (and LoRAX-compatible) HTTP API")
    add_engine_args(s)
    s.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="bind address (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=_env("PORT", 8000, int))
    s.add_argument(
        "--served-model-name",
        default=_env("SERVED_MODEL_NAME"),
        help="the base model's name in the API (default: --model)",
    )
    s.add_argument(
        "--api-key", default=_env("API_KEY"), help="an admin API key (auth is off unless a key is set)"
    )
    s.add_argument(
        "--api-keys-file",
        default=_env("API_KEYS_FILE"),
        help='JSON: {KEY: {"adapters": [names or globs], "admin": bool}}',
    )
    s.add_argument(
        "--max-queue",
        type=int,
        default=_env("MAX_QUEUE", None, int),
        help="waiting requests before 429 (default: no limit)",
    )
    s.add_argument(
        "--max-body-bytes",
        type=int,
        default=_env("MAX_BODY_BYTES", 4 * 2**20, int),
        help="request body limit (413 above)",
    )
    s.add_argument(
        "--shutdown-grace-seconds",
        type=float,
        default=_env("SHUTDOWN_GRACE_SECONDS", 30.0, float),
        help="on SIGTERM, how long in-flight requests may take to finish",
    )
    s.add_argument(
        "--idle-offload-seconds",
        type=float,
        default=_env("IDLE_OFFLOAD_SECONDS", None, float),
        help="release the model's device memory after this many idle seconds; the next request "
        "brings it back (default: never)",
    )
    s.add_argument(
        "--idle-offload",
        default=_env("IDLE_OFFLOAD", "host"),
        choices=["host", "drop"],
        help="host: keep host copies of the weights and adapters (fast wake-up); drop: keep nothing",
    )
    s.add_argument(
        "--log-level", default=_env("LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"]
    )
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser("generate", help="generate text offline for one prompt (prints only the text)")
    add_engine_args(g)
    g.add_argument(
        "--use", default=None, help="which --adapter to use (default: the single one given; none: base)"
    )
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string, repeatable")
    g.set_defaults(func=cmd_generate)

    from .bench_cli import add_bench_args, cmd_bench

    b = sub.add_parser("bench", help="load-test an OpenAI-compatible server (streamed; latency and throughput)")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser(
        "demo-adapters", help="write a few seeded PEFT adapters for the (default) model into DIR"
    )
    d.add_argument("dir")
    d.add_argument("--model", default=_env("MODEL"))
    d.set_defaults(func=cmd_demo_adapters)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LoraplexError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
