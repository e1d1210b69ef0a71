"""Find and load a base model: a local Hugging Face directory, a Hub id, or the embedded default."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from ..adapter_cache.peft_format import BaseShapes
from ..errors import ModelLoadError
from .model import CausalLM, ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# checkpoint name inside a layer -> (our module attribute, slice index of a fused weight or None)
_LAYER_PARAMS = {
    "self_attn.q_proj": ("qkv", 0),
    "self_attn.k_proj": ("qkv", 1),
    "self_attn.v_proj": ("qkv", 2),
    "self_attn.o_proj": ("o", 0),
    "mlp.gate_proj": ("gate_up", 0),
    "mlp.up_proj": ("gate_up", 1),
    "mlp.down_proj": ("down", 0),
    "input_layernorm": ("input_norm", None),
    "post_attention_layernorm": ("post_attn_norm", None),
    "self_attn.q_norm": ("q_norm", None),
    "self_attn.k_norm": ("k_norm", None),
}


def resolve_model_dir(model: str | None) -> Path:
    """A local directory as is; None -> the embedded default; otherwise a Hub id `org/name[@revision]`
    fetched through huggingface_hub's cache (honours HF_HUB_OFFLINE and HF_TOKEN)."""
    if model is None:
        from .default_model import ensure_default_model

        return ensure_default_model()
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return path
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"model {model!r} is neither a local model directory nor a Hub id 'org/name'")
    repo_id, _, revision = model.partition("@")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # offline, missing repo, auth...: one clear error
        raise ModelLoadError(f"cannot fetch model {model!r} from the Hugging Face Hub: {exc}") from exc
    return Path(local)


def load_hf_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise ModelLoadError(f"cannot read config.json in {model_dir}: {exc}") from exc


def base_shapes_of(model_dir: Path) -> BaseShapes:
    """What an adapter for the model in model_dir must fit (without loading its weights)."""
    return base_shapes(ModelSpec.from_hf_config(load_hf_config(model_dir)), str(model_dir))


def base_shapes(spec: ModelSpec, name: str) -> BaseShapes:
    return BaseShapes(name, spec.num_layers, spec.lora_shapes())


def _rope_params(cfg) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling exactly as transformers computes them for this config."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    if rope_type == "dynamic":
        raise ModelLoadError("dynamic RoPE scaling is not supported")
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    return inv_freq, float(scaling)


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / n for n in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors weights in {model_dir} (pickle .bin checkpoints are not loaded)")
    return files


def load_model(model_dir: Path, dtype: torch.dtype, device: torch.device | str = "cpu") -> tuple[CausalLM, ModelSpec]:
    """Build the CausalLM for model_dir and fill it from its safetensors (fusing q|k|v and gate|up)."""
    cfg = load_hf_config(model_dir)
    spec = ModelSpec.from_hf_config(cfg)
    files = _safetensors_files(model_dir)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for key in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[key] = sf.get_tensor(key)
    has = set(tensors)
    biases = {
        "qkv": "model.layers.0.self_attn.q_proj.bias" in has,
        "o": "model.layers.0.self_attn.o_proj.bias" in has,
        "mlp": "model.layers.0.mlp.down_proj.bias" in has,
    }
    inv_freq, scaling = _rope_params(cfg)
    with torch.device("meta"):
        model = CausalLM(spec, inv_freq, scaling, biases).to(dtype)
    model = model.to_empty(device=device)
    model.inv_freq = inv_freq.float().to(device)
    _fill(model, spec, tensors, dtype, device)
    model.num_weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # read per decode step
    return model.eval(), spec


def _fill(model: CausalLM, spec: ModelSpec, tensors: dict[str, torch.Tensor], dtype: torch.dtype, device) -> None:
    def put(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if dst.shape != src.shape:
            raise ModelLoadError(f"weight {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src.to(dtype))

    filled: set[str] = set()
    expected = {"embed", "norm"} | ({"lm_head"} if not spec.tie_word_embeddings else set())
    for key, t in tensors.items():
        m = _LAYER_KEY.match(key)
        if key == "model.embed_tokens.weight":
            put(model.embed.weight, t, key)
            filled.add("embed")
        elif key == "model.norm.weight":
            put(model.norm.weight, t, key)
            filled.add("norm")
        elif key == "lm_head.weight":
            if not spec.tie_word_embeddings:
                put(model.lm_head_weight, t, key)
                filled.add("lm_head")
        elif m:
            layer_idx, rest = int(m.group(1)), m.group(2)
            name, _, kind = rest.rpartition(".")
            if name not in _LAYER_PARAMS or kind not in ("weight", "bias") or layer_idx >= spec.num_layers:
                raise ModelLoadError(f"unexpected weight {key} in checkpoint")
            attr, slice_idx = _LAYER_PARAMS[name]
            mod = getattr(model.layers[layer_idx], attr)
            dst = getattr(mod, kind)
            if slice_idx is not None:
                lo, hi = mod.slice_offsets[slice_idx], mod.slice_offsets[slice_idx + 1]
                dst = dst[lo:hi]
            put(dst, t, key)
            filled.add(f"{layer_idx}.{rest}")
        elif key.startswith("model.rotary_emb"):
            continue
        else:
            raise ModelLoadError(f"unexpected weight {key} in checkpoint")
    per_layer = [n for n in _LAYER_PARAMS if spec.qk_norm or not n.endswith(("q_norm", "k_norm"))]
    expected |= {f"{i}.{n}.weight" for i in range(spec.num_layers) for n in per_layer}
    missing = expected - filled
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} weights, e.g. {sorted(missing)[:3]}")
