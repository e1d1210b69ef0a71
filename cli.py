"""`loraplex` command line: serve (the HTTP server), generate, bench (load test), demo-adapters, calibrate.

Every Config field (and for serve every ServerConfig field) is a flag, built from the field list in
config.py; each also reads its LORAPLEX_* environment variable, the field name in capitals (the flag
wins). Repeatable flags (--adapter, --preload) read comma-separated lists, e.g. LORAPLEX_ADAPTERS=a=/x,b=/y.
This module and config.py are the only ones that read the environment: the library gets a Config.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path

from .config import Config, ServerConfig, Setting, build, parse_text, settings
from .errors import ConfigError, LoraplexError


class _Repeat(argparse.Action):
    """append, except that the first flag replaces the default (an env var's list) instead of adding to
    it: the flags win, as for every other setting."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        items = getattr(namespace, self.dest)
        items = [] if items is self.default or items is None else list(items)
        setattr(namespace, self.dest, [*items, values])


def env_default(s: Setting, environ: Mapping[str, str]) -> object:
    """The setting's LORAPLEX_* variable, parsed (unset or empty: the field's default)."""
    text = environ.get(s.env, "")
    if text == "":
        return s.default
    try:
        return parse_text(s, text)
    except ValueError as exc:
        raise ConfigError(f"{s.env}={text!r}: {exc}", param=s.name) from exc


def add_settings(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    environ: Mapping[str, str] | None = None,
    only: Iterable[str] | None = None,
) -> None:
    """One flag per field of cls (Config or ServerConfig; `only`: these fields), defaulting to its env var.
    The parsed value lands under the field's name (args.max_num_seqs)."""
    environ = os.environ if environ is None else environ
    wanted = None if only is None else set(only)
    for s in settings(cls):
        if wanted is not None and s.name not in wanted:
            continue
        env = f"env {s.env}: comma-separated" if s.repeated else f"env {s.env}"
        kw: dict = {"dest": s.name, "default": env_default(s, environ), "help": f"{s.help} ({env})"}
        if s.metavar:
            kw["metavar"] = s.metavar
        if s.repeated:
            kw["action"] = _Repeat
        elif s.kind is bool:  # --x / --no-x, so a flag can override the env var either way
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = s.kind
            if s.choices:
                kw["choices"] = s.choices
        p.add_argument(s.flag, **kw)


def add_engine_args(p: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """Flags shared by every command that builds an engine (generate, serve): every Config field."""
    add_settings(p.add_argument_group("engine"), Config, environ)


def config_from_args(args: argparse.Namespace) -> Config:
    """The Config of parsed flags (fields without a flag on this command keep their defaults)."""
    return build(Config, {s.name: getattr(args, s.name) for s in settings(Config) if hasattr(args, s.name)})


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    return build(ServerConfig, {s.name: getattr(args, s.name) for s in settings(ServerConfig)})


def cmd_generate(args: argparse.Namespace) -> int:
    from .engine.engine import Engine
    from .scheduler.sampling_params import SamplingParams

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
    from .engine.demo_adapters import copy_trained_demo_adapters, write_demo_adapters
    from .engine.loader import resolve_model_dir

    if args.random:
        paths = write_demo_adapters(Path(args.dir), resolve_model_dir(args.model, args.cache_dir))
    elif args.model is not None:
        print("error: the trained demo adapters fit only the default model; use --random with --model", file=sys.stderr)
        return 2
    else:
        paths = copy_trained_demo_adapters(Path(args.dir))
    for p in paths:
        print(f"{p.name}={p}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Measure the CPU LoRA cost model's figures for the model (kernels/cpu_calibrate.py) and print them
    with the plan they choose for representative steps on each of its LoRA linear shapes."""
    import torch

    from .engine.engine import pick_dtype
    from .engine.loader import load_hf_config, load_model, resolve_model_dir
    from .engine.model import KernelOptions
    from .engine.offload import calibrate_cpu_model
    from .kernels.cpu_calibrate import format_figures, plan_table

    config = config_from_args(args)
    model_dir = resolve_model_dir(config.model, config.cache_dir)
    hf_config = load_hf_config(model_dir)
    dtype = pick_dtype(config.dtype, hf_config)
    kernels = KernelOptions("torch", config.cpu_packed_linear, config.cpu_lora_rows, config.cpu_lora_merge)
    model, _ = load_model(
        model_dir, dtype, "cpu", (config.max_active_adapters, config.max_lora_rank), hf_config=hf_config, kernels=kernels
    )
    calibration = calibrate_cpu_model(model, "auto", config.cache_dir, use_cache=not args.no_cache)
    print(f"model: {model_dir.name}, {str(dtype).removeprefix('torch.')}, {torch.get_num_threads()} threads")
    if calibration.figures is None:
        print(f"no figures ({calibration.how}): the engine would use the grouped strategy for every step")
        return 1
    print(f"figures ({calibration.how}):")
    for part in format_figures(calibration.figures).split(", "):
        print(f"  {part}")
    linears: dict = {}  # shape -> (shape, has row tables, W unpacked: fused-single may apply)
    for lin in model.lora_linears():
        shape = lin.cost_shape()
        if shape is not None and lin.slots is not None:
            linears.setdefault(shape, (shape, lin.slots.rows is not None, lin.packed is None))
    print("\nplans (estimated us of the LoRA work beyond the base matmul):")
    print(plan_table(calibration.figures, list(linears.values()), config.cpu_lora_merge))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.app import create_app, serve
    from .server.auth import build_key_table

    config = config_from_args(args)  # flag mistakes fail now, before binding
    server = server_config_from_args(args)
    keys = build_key_table(server.api_key, server.api_keys_file)
    if server.routes is not None:  # a file that does not parse stops the start, before binding
        from .server.routes import read_routes_file

        read_routes_file(server.routes)
    logging.basicConfig(
        level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    def build_engine():  # runs in a background thread while the server already answers /health
        from .engine.async_engine import AsyncEngine
        from .engine.demo_adapters import demo_adapter_sources
        from .engine.engine import Engine

        cfg = config
        if cfg.model is None and not cfg.adapters and cfg.adapter_dir is None:
            cfg = replace(cfg, adapters=demo_adapter_sources())
        return AsyncEngine(Engine(cfg))

    app = create_app(
        None,
        build_engine=build_engine,
        api_keys=keys,
        served_model_name=server.served_model_name,
        max_queue=server.max_queue,
        max_body_bytes=server.max_body_bytes,
        routes_file=server.routes,
        routes_poll_seconds=server.routes_poll_seconds,
    )
    return serve(app, server.host, server.port, server.shutdown_grace_seconds, server.log_level)


def build_parser() -> argparse.ArgumentParser:
    """The parser; its defaults are the LORAPLEX_* variables of the environment at this call."""
    parser = argparse.ArgumentParser(prog="loraplex", description="Many LoRA adapters on one base model.")
    sub = parser.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible (and LoRAX-compatible) HTTP API")
    add_engine_args(s)
    add_settings(s.add_argument_group("server"), ServerConfig)
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

    from .bench.cli import add_bench_args, cmd_bench

    b = sub.add_parser("bench", help="load-test an OpenAI-compatible server (streamed; latency and throughput)")
    add_bench_args(b)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser(
        "demo-adapters",
        help="copy the trained demo adapters of the default model into DIR (--random: seeded random ones)",
    )
    d.add_argument("dir")
    d.add_argument(
        "--random",
        action="store_true",
        help="write seeded random adapters (demo-qv, demo-attn, demo-all, demo-mlp-rslora) for the model "
        "instead: they change its output without meaning, for tests and benchmarks",
    )
    add_settings(d, Config, only=("model", "cache_dir"))
    d.set_defaults(func=cmd_demo_adapters)

    c = sub.add_parser(
        "calibrate",
        help="measure the CPU LoRA cost model's figures for a model (default: the embedded one) and show the "
        "plans they choose for representative steps",
    )
    add_settings(
        c, Config, only=("model", "dtype", "cache_dir", "max_lora_rank", "max_active_adapters", "cpu_packed_linear", "cpu_lora_rows", "cpu_lora_merge")
    )
    c.add_argument(
        "--no-cache", action="store_true", help="measure anew; neither read nor write <cache dir>/cpu_calibration.json"
    )
    c.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # a bad LORAPLEX_* value fails here (ConfigError)
        return args.func(args)
    except LoraplexError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
