"""Demo adapters are written in PEFT's format: PEFT loads them key for key, and they change the output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraplex.engine.demo_adapters import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    DEMO_ADAPTERS,
    DemoAdapterSpec,
    lora_key,
    module_prefix,
    write_demo_adapters,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

SPECS = {spec.name: spec for spec in DEMO_ADAPTERS}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama; head_dim 32 != hidden / heads, so q/o shapes come from head_dim."""
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=256,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter_dirs(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    paths = write_demo_adapters(tmp_path_factory.mktemp("adapters"), base_dir)
    return {path.name: path for path in paths}


def load_base(base_dir: Path) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return model.eval()


def test_default_set_is_written_in_peft_layout(adapter_dirs: dict[str, Path]) -> None:
    assert sorted(adapter_dirs) == sorted(SPECS)
    assert {spec.r for spec in DEMO_ADAPTERS} >= {8, 16, 32}
    for path in adapter_dirs.values():
        assert sorted(p.name for p in path.iterdir()) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]


@pytest.mark.parametrize("name", sorted(SPECS))
def test_peft_loads_every_lora_tensor(name: str, base_dir: Path, adapter_dirs: dict[str, Path]) -> None:
    model = peft.PeftModel.from_pretrained(load_base(base_dir), adapter_dirs[name], adapter_name="first")
    # load_adapter exposes the load result that from_pretrained hides.
    result = model.load_adapter(adapter_dirs[name], adapter_name="second")
    assert [k for k in result.missing_keys if "lora_" in k and ".second." in k] == []
    assert result.unexpected_keys == []

    file_tensors = load_file(adapter_dirs[name] / ADAPTER_WEIGHTS_FILE)
    loaded = {
        # PEFT stores "...q_proj.lora_A.first.weight" in the module; the file drops the adapter name.
        k.replace(".first.", "."): v
        for k, v in model.state_dict().items()
        if "lora_" in k and ".first." in k
    }
    assert sorted(loaded) == sorted(file_tensors)
    for key, tensor in file_tensors.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_config_round_trips_through_peft(name: str, adapter_dirs: dict[str, Path]) -> None:
    spec = SPECS[name]
    config = peft.PeftConfig.from_pretrained(adapter_dirs[name])
    assert isinstance(config, peft.LoraConfig)
    assert config.peft_type == peft.PeftType.LORA
    assert config.task_type == "CAUSAL_LM"
    assert config.r == spec.r
    assert config.lora_alpha == spec.lora_alpha
    assert set(config.target_modules) == set(spec.target_modules)
    assert config.use_rslora == spec.use_rslora
    assert config.lora_dropout == 0.0
    assert config.bias == "none"
    assert config.fan_in_fan_out is False


@pytest.mark.parametrize("name", sorted(SPECS))
def test_adapter_changes_logits_by_its_scaled_delta(
    name: str, base_dir: Path, adapter_dirs: dict[str, Path]
) -> None:
    spec = SPECS[name]
    input_ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    base = load_base(base_dir)
    with torch.no_grad():
        base_logits = base(input_ids).logits
    model = peft.PeftModel.from_pretrained(base, adapter_dirs[name]).eval()
    with torch.no_grad():
        adapted_logits = model(input_ids).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3

    # One targeted linear checked by hand: y = W x + scale * B A x, scale alpha/r or alpha/sqrt(r).
    module_name = spec.target_modules[0]
    layer = model.base_model.model.model.layers[0]
    lora_linear = getattr(getattr(layer, module_prefix(module_name)), module_name)
    tensors = load_file(adapter_dirs[name] / ADAPTER_WEIGHTS_FILE)
    a, b = tensors[lora_key(0, module_name, "A")], tensors[lora_key(0, module_name, "B")]
    x = torch.randn(3, a.shape[1], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = lora_linear.base_layer(x) + spec.scale * (x @ a.T @ b.T)
        torch.testing.assert_close(lora_linear(x), expected, rtol=1e-5, atol=1e-5)


def test_same_seed_same_bytes_and_subset_selection(base_dir: Path, tmp_path: Path) -> None:
    first = write_demo_adapters(tmp_path / "a", base_dir, ["demo-qv"], base_model_name="tiny")
    second = write_demo_adapters(tmp_path / "b", base_dir, ["demo-qv"], base_model_name="tiny")
    assert [p.name for p in first] == ["demo-qv"]
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        assert (first[0] / name).read_bytes() == (second[0] / name).read_bytes()
    config = json.loads((first[0] / ADAPTER_CONFIG_FILE).read_text())
    assert config["base_model_name_or_path"] == "tiny"
    assert config["peft_type"] == "LORA"


def test_bfloat16_output(base_dir: Path, tmp_path: Path) -> None:
    (path,) = write_demo_adapters(tmp_path, base_dir, ["demo-attn"], dtype=torch.bfloat16)
    tensors = load_file(path / ADAPTER_WEIGHTS_FILE)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_unknown_name_is_rejected(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown demo adapters"):
        write_demo_adapters(tmp_path, base_dir, ["no-such-adapter"])


def test_shapes_without_head_dim_use_hidden_over_heads() -> None:
    from transformers import LlamaConfig

    from loraplex.engine.model import ModelSpec

    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    shapes = ModelSpec.from_hf_config(cfg).lora_shapes()
    assert ModelSpec.from_hf_config(cfg).num_layers == 30
    assert shapes["q_proj"] == (576, 576)
    assert shapes["k_proj"] == (576, 192)
    assert shapes["o_proj"] == (576, 576)
    assert shapes["down_proj"] == (1536, 576)


def test_rslora_scale() -> None:
    spec = DemoAdapterSpec(
        "x", r=16, lora_alpha=16, target_modules=("q_proj",), seed=0, b_std=0.1, use_rslora=True
    )
    assert spec.scale == pytest.approx(4.0)
    assert SPECS["demo-qv"].scale == pytest.approx(2.0)
