"""Adapter loading errors: each a typed exception naming the adapter and the cause."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_peft_adapter, save_tiny_model

from loraplex.adapter_cache.peft_format import BaseShapes, load_peft_adapter
from loraplex.config import Config
from loraplex.engine.engine import Engine
from loraplex.engine.loader import load_hf_config
from loraplex.engine.model import ModelSpec
from loraplex.errors import (
    AdapterError,
    AdapterFormatError,
    AdapterShapeError,
    ModelLoadError,
    UnsupportedAdapterError,
)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loading")
    base = save_tiny_model(root / "base", "llama")
    good = save_peft_adapter(base, root / "good", 8, 16, ["q_proj", "v_proj"], False, seed=1)
    spec = ModelSpec.from_hf_config(load_hf_config(base))
    return root, base, good, BaseShapes(str(base), spec.num_layers, spec.lora_shapes())


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_good_adapter_loads_with_scale_folded(setup):
    _, _, good, shapes = setup
    adapter = load_peft_adapter("good", good, shapes, max_rank=16)
    assert adapter.rank == 8 and adapter.target_modules == ["q_proj", "v_proj"]
    raw = load_file(good / "adapter_model.safetensors")
    b = raw["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"]
    torch.testing.assert_close(adapter.weights[(1, "v_proj")][1], b * (16 / 8))


@pytest.mark.parametrize(
    "case, exc, words",
    [
        ("missing_dir", AdapterFormatError, ["does not exist"]),
        ("missing_config", AdapterFormatError, ["adapter_config.json"]),
        ("missing_weights", AdapterFormatError, ["adapter_model.safetensors"]),
        ("pickle_only", AdapterFormatError, ["adapter_model.bin", "safetensors only"]),
        ("bad_json", AdapterFormatError, ["cannot parse"]),
        ("shape_mismatch", AdapterShapeError, ["do not fit the base model", "q_proj"]),
        ("rank_too_high", AdapterShapeError, ["--max-lora-rank 4"]),
        ("unsupported_target", UnsupportedAdapterError, ["embed_tokens"]),
        ("dora", UnsupportedAdapterError, ["DoRA"]),
        ("lora_bias", UnsupportedAdapterError, ["bias"]),
        ("modules_to_save", UnsupportedAdapterError, ["modules_to_save"]),
        ("nan", AdapterFormatError, ["non-finite"]),
        ("too_many_layers", AdapterShapeError, ["layer 7"]),
    ],
)
def test_loading_errors_name_adapter_and_cause(setup, case, exc, words):
    root, _, good, shapes = setup
    path = root / f"case-{case}"
    max_rank = 16
    if case != "missing_dir":
        _copy(good, path)
    weights = path / "adapter_model.safetensors"
    if case == "missing_config":
        (path / "adapter_config.json").unlink()
    elif case == "missing_weights":
        weights.unlink()
    elif case == "pickle_only":
        torch.save(load_file(weights), path / "adapter_model.bin")
        weights.unlink()
    elif case == "bad_json":
        (path / "adapter_config.json").write_text("{not json")
    elif case == "shape_mismatch":
        t = load_file(weights)
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        t[key] = torch.randn(8, 65)
        save_file(t, weights)
    elif case == "rank_too_high":
        max_rank = 4
    elif case == "unsupported_target":
        _edit_config(path, target_modules=["q_proj", "embed_tokens"])
    elif case == "dora":
        _edit_config(path, use_dora=True)
    elif case == "lora_bias":
        _edit_config(path, bias="lora_only")
    elif case == "modules_to_save":
        _edit_config(path, modules_to_save=["lm_head"])
    elif case == "nan":
        t = load_file(weights)
        key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
        t[key][0, 0] = float("nan")
        save_file(t, weights)
    elif case == "too_many_layers":
        t = load_file(weights)
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = torch.randn(8, 64)
        t["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = torch.randn(64, 8)
        save_file(t, weights)
    with pytest.raises(exc) as info:
        load_peft_adapter(f"ad-{case}", path, shapes, max_rank=max_rank)
    msg = str(info.value)
    assert f"ad-{case}" in msg and info.value.adapter == f"ad-{case}"
    for w in words:
        assert w in msg, msg


def test_engine_refuses_bad_adapter_at_start(setup):
    root, base, good, _ = setup
    bad = _copy(good, root / "engine-bad")
    _edit_config(bad, use_dora=True)
    with pytest.raises(AdapterError, match="'bad'.*DoRA"):
        Engine(Config(model=str(base), adapters=(("bad", str(bad)),), dtype="float32"))


def test_model_loading_errors(tmp_path, setup):
    _, base, _, _ = setup
    with pytest.raises(ModelLoadError, match="config.json"):
        Engine(Config(model=str(tmp_path), dtype="float32"))
    no_weights = _copy(base, tmp_path / "noweights")
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelLoadError, match="safetensors"):
        Engine(Config(model=str(no_weights), dtype="float32"))
    with pytest.raises(ModelLoadError, match="neither a local model directory"):
        Engine(Config(model="./does/not/exist", dtype="float32"))
