"""The cold-start paths of the loader (issue 7): config.json read without transformers' config classes,
the generic tokenizer without AutoTokenizer, weights copied from memory-mapped safetensors straight into
the LoRA-extended buffers. Each must give exactly what the slow, general path gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from server_fixtures import save_tokenizer
from tiny_models import save_tiny_model

from loraplex.engine.loader import (
    _read_config_fast,
    _rope_params,
    export_weights,
    load_hf_config,
    load_model,
    load_tokenizer,
)
from loraplex.engine.model import ModelSpec
from loraplex.errors import ModelLoadError

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast-start")
    return {arch: save_tiny_model(root / arch, arch, seed=3) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_fast_config_equals_autoconfig(models, arch):
    from transformers import AutoConfig

    fast = _read_config_fast(models[arch])
    assert fast is not None, "a complete config.json must take the fast path"
    slow = AutoConfig.from_pretrained(models[arch])
    assert ModelSpec.from_hf_config(fast) == ModelSpec.from_hf_config(slow)
    (inv_fast, scale_fast), (inv_slow, scale_slow) = _rope_params(fast), _rope_params(slow)
    assert torch.equal(inv_fast, inv_slow) and scale_fast == scale_slow
    assert str(fast.dtype).removeprefix("torch.") == str(slow.dtype).removeprefix("torch.")


def test_sparse_config_takes_class_defaults_or_falls_back(tmp_path):
    """Fields with one default in every supported class may be left out of config.json; a field whose
    default differs by architecture (mistral's window and KV heads) or a scaled RoPE sends the config
    through AutoConfig, which then gives the class's own values."""
    from transformers import AutoConfig

    src = json.loads((save_tiny_model(tmp_path / "m", "mistral") / "config.json").read_text())
    for key in ("head_dim", "hidden_act", "tie_word_embeddings"):
        src.pop(key, None)
    (tmp_path / "m" / "config.json").write_text(json.dumps(src))
    fast = _read_config_fast(tmp_path / "m")
    assert fast is not None
    assert ModelSpec.from_hf_config(fast) == ModelSpec.from_hf_config(AutoConfig.from_pretrained(tmp_path / "m"))

    for key in ("sliding_window", "num_key_value_heads"):
        sparse = {k: v for k, v in src.items() if k != key}
        (tmp_path / "m" / "config.json").write_text(json.dumps(sparse))
        assert _read_config_fast(tmp_path / "m") is None
        spec = ModelSpec.from_hf_config(load_hf_config(tmp_path / "m"))
        assert spec == ModelSpec.from_hf_config(AutoConfig.from_pretrained(tmp_path / "m"))
    assert spec.num_kv_heads == 8  # MistralConfig's default, not num_attention_heads

    scaled = dict(src, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    (tmp_path / "m" / "config.json").write_text(json.dumps(scaled))
    assert _read_config_fast(tmp_path / "m") is None
    inv, _ = _rope_params(load_hf_config(tmp_path / "m"))  # through transformers: linear scaling applied
    assert torch.allclose(inv, _rope_params(fast)[0] / 2.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied lm_head; qkv biases
def test_mmap_load_matches_the_checkpoint(models, arch):
    ref = load_file(models[arch] / "model.safetensors")
    model, spec = load_model(models[arch], torch.float32, lora_slots=(3, 8))
    exported = dict(export_weights(model, spec))
    expected = {k for k in ref if not (spec.tie_word_embeddings and k == "lm_head.weight")}
    assert set(exported) == expected
    for key in expected:
        assert torch.equal(exported[key], ref[key]), key
    lin = model.layers[1].gate_up
    assert lin.weight.data_ptr() == lin.weight_ext.data_ptr()  # W lives inside the LoRA-extended buffer
    assert not lin.lora_a.any() and not lin.lora_b.any()
    # bfloat16: the copy casts exactly like .to(bfloat16)
    model16, _ = load_model(models[arch], torch.bfloat16, lora_slots=(2, 4))
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(dict(export_weights(model16, spec))[key], ref[key].to(torch.bfloat16))


def test_rebuild_from_exported_weights_is_identical(models):
    model, spec = load_model(models["qwen3"], torch.float32, lora_slots=(2, 4))
    weights = export_weights(model, spec)
    again, _ = load_model(models["qwen3"], torch.float32, lora_slots=(2, 4), weights=weights)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_truncated_or_corrupt_safetensors_is_a_clear_error(models, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    src = models["llama"]
    (bad / "config.json").write_text((src / "config.json").read_text())
    data = (src / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or inconsistent"):
        load_model(bad, torch.float32)
    (bad / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        load_model(bad, torch.float32)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:, :3].contiguous()
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ModelLoadError, match="has shape"):
        load_model(bad, torch.float32)


def test_generic_tokenizer_fast_path_equals_autotokenizer(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    save_tokenizer(tmp_path)
    fast, auto = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert type(fast) is PreTrainedTokenizerFast or type(fast).__name__ == type(auto).__name__
    text = "hello world, how are you today? <s> Paris"
    assert fast.encode(text) == auto.encode(text)
    chat = [{"role": "user", "content": "hi"}]
    assert fast.apply_chat_template(chat, add_generation_prompt=True) == auto.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert (fast.eos_token_id, fast.bos_token_id) == (auto.eos_token_id, auto.bos_token_id)


def test_engine_start_imports_no_model_config_module(models, tmp_path):
    """The start path never imports transformers' model configuration modules (the slow part of
    `import transformers` for a cold start): checked in a fresh interpreter."""
    model_dir = models["llama"]
    save_tokenizer(model_dir)
    code = (
        "import sys\n"
        "from loraplex.config import Config\n"
        "from loraplex.engine.engine import Engine\n"
        f"e = Engine(Config(model={str(model_dir)!r}, dtype='float32'))\n"
        "assert e.tokenizer is not None\n"
        "bad = sorted(m for m in sys.modules if m.startswith('transformers.models.') or m == 'torch._dynamo')\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "IMPORTED []" in out.stdout, out.stdout
    assert Path(model_dir / "tokenizer.json").is_file()
