"""One configuration: every Config / ServerConfig field is a flag and a LORAPLEX_* variable (built from the
field list), the env var really sets the field, the flag wins, and no library module reads the environment."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from loraplex.cli import build_parser, config_from_args, server_config_from_args
from loraplex.config import Config, ServerConfig, settings
from loraplex.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("server", "engine", "scheduler", "adapter_cache", "kernels")

# A value different from the default for every field, as env text and as the parsed field value.
ENV_VALUES = {
    "model": ("/models/m", "/models/m"),
    "adapters": ("a=/x/a, b=/x/b", (("a", "/x/a"), ("b", "/x/b"))),
    "adapter_dir": ("/x", "/x"),
    "allow_hub": ("yes", True),
    "max_host_adapters": ("5", 5),
    "host_cache_gib": ("0.5", 0.5),
    "adapter_failure_ttl": ("2.5", 2.5),
    "dtype": ("bfloat16", "bfloat16"),
    "device": ("cpu", "cpu"),
    "max_lora_rank": ("8", 8),
    "max_active_adapters": ("3", 3),
    "max_num_seqs": ("7", 7),
    "max_num_batched_tokens": ("99", 99),
    "block_size": ("32", 32),
    "kv_cache_gib": ("0.25", 0.25),
    "kv_cache_memory_fraction": ("0.5", 0.5),
    "max_model_len": ("512", 512),
    "prefill_chunk_size": ("64", 64),
    "prefix_caching": ("off", False),
    "max_wait_steps": ("0", 0),
    "preload": ("p1,p2", ("p1", "p2")),
    "idle_offload_seconds": ("300", 300.0),
    "idle_offload": ("drop", "drop"),
    "structured_output_compile_timeout": ("2.5", 2.5),
    "structured_output_cache_size": ("16", 16),
    "cache_dir": ("/cache", "/cache"),
    "generation_config": ("openai", "openai"),
    "lora_backend": ("torch", "torch"),
    "cpu_packed_linear": ("0", False),
    "cpu_lora_rows": ("false", False),
    "cpu_lora_merge": ("off", False),
    "cpu_calibration": ("off", "off"),
    "host": ("0.0.0.0", "0.0.0.0"),
    "port": ("9001", 9001),
    "served_model_name": ("base", "base"),
    "api_key": ("k", "k"),
    "api_keys_file": ("/keys.json", "/keys.json"),
    "max_queue": ("12", 12),
    "routes": ("/routes.yaml", "/routes.yaml"),
    "routes_poll_seconds": ("0.5", 0.5),
    "max_body_bytes": ("2048", 2048),
    "shutdown_grace_seconds": ("5", 5.0),
    "log_level": ("debug", "debug"),
}


def _options(command: str) -> set[str]:
    (sub,) = [a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction"]
    return {o for a in sub.choices[command]._actions for o in a.option_strings}


def test_the_table_covers_every_field():
    names = [f.name for cls in (Config, ServerConfig) for f in fields(cls)]
    assert sorted(names) == sorted(ENV_VALUES)
    for cls in (Config, ServerConfig):
        for s in settings(cls):
            assert s.help and s.env == f"LORAPLEX_{s.name.upper()}"
            assert getattr(cls(), s.name) == s.default


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_config_field_is_a_flag(command):
    options = _options(command)
    classes = (Config, ServerConfig) if command == "serve" else (Config,)
    missing = [s.flag for cls in classes for s in settings(cls) if s.flag not in options]
    assert not missing
    assert "--no-cpu-packed-linear" in options and "--no-allow-hub" in options  # bools go both ways
    if command == "generate":
        assert "--host" not in options


def test_env_vars_set_every_field(monkeypatch):
    for name, (text, _) in ENV_VALUES.items():
        monkeypatch.setenv(f"LORAPLEX_{name.upper()}", text)
    args = build_parser().parse_args(["serve"])
    config, server = config_from_args(args), server_config_from_args(args)
    for name, (_, value) in ENV_VALUES.items():
        got = getattr(config if hasattr(config, name) else server, name)
        assert got == value, name


def test_flags_win_over_env_vars(monkeypatch):
    monkeypatch.setenv("LORAPLEX_MAX_NUM_SEQS", "7")
    monkeypatch.setenv("LORAPLEX_ADAPTERS", "a=/x/a")
    monkeypatch.setenv("LORAPLEX_CPU_LORA_ROWS", "0")
    monkeypatch.setenv("LORAPLEX_PORT", "9001")
    argv = ["serve", "--max-num-seqs", "3", "--adapter", "b=/y/b", "--adapter", "c=/y/c", "--cpu-lora-rows"]
    args = build_parser().parse_args([*argv, "--port", "9002"])
    config = config_from_args(args)
    assert config.max_num_seqs == 3 and config.adapters == (("b", "/y/b"), ("c", "/y/c"))
    assert config.cpu_lora_rows is True and server_config_from_args(args).port == 9002
    plain = config_from_args(build_parser().parse_args(["generate", "--prompt", "x"]))
    assert plain.adapters == (("a", "/x/a"),) and plain.cpu_lora_rows is False


def test_defaults_without_env(monkeypatch):
    for cls in (Config, ServerConfig):
        for s in settings(cls):
            monkeypatch.delenv(s.env, raising=False)
    args = build_parser().parse_args(["serve"])
    assert config_from_args(args) == Config() and server_config_from_args(args) == ServerConfig()


def test_bad_values_are_config_errors(monkeypatch):
    from loraplex.cli import main

    with pytest.raises(ConfigError, match="lora_backend"):
        Config(lora_backend="cuda")
    with pytest.raises(ConfigError, match="max_queue"):
        ServerConfig(max_queue=0)
    monkeypatch.setenv("LORAPLEX_CPU_PACKED_LINEAR", "maybe")
    assert main(["generate", "--prompt", "x"]) == 2  # "error: LORAPLEX_CPU_PACKED_LINEAR='maybe': ..."


def test_server_default_body_limit_matches_the_app():
    from loraplex.server.app import DEFAULT_MAX_BODY_BYTES

    assert ServerConfig().max_body_bytes == DEFAULT_MAX_BODY_BYTES


def test_the_library_does_not_read_the_environment():
    """Only the edge (cli.py, config.py) reads LORAPLEX_* variables; components get Config values."""
    pattern = re.compile(r"\bos\.environ\b|\bgetenv\s*\(|\bfrom\s+os\s+import\b[^\n]*\b(environ|getenv)\b")
    offenders = [
        f"{path.relative_to(ROOT)}:{i}"
        for package in LIBRARY
        for path in sorted((ROOT / package).rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders
