"""Find and load a base model: a local Hugging Face directory, a Hub id, or the embedded default."""

from __future__ import annotations

import json
import mmap
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

from ..adapter_cache.peft_format import BaseShapes
from ..errors import InvalidRequestError, ModelLoadError
from ..safetensors_view import tensor_view
from ..scheduler.sampling_params import OPENAI_SAMPLING_DEFAULTS, SamplingParams
from .model import SUPPORTED_ARCHS, CausalLM, KernelOptions, ModelSpec

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


def resolve_model_dir(model: str | None, cache_dir: str | None = None) -> Path:
    """A local directory as is; None -> the embedded default (converted once into cache_dir,
    Config.cache_dir); otherwise a Hub id `org/name[@revision]` fetched through huggingface_hub's cache
    (honours HF_HUB_OFFLINE and HF_TOKEN)."""
    if model is None:
        from .default_model import ensure_default_model

        return ensure_default_model(cache_dir)
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


# Defaults of the transformers config classes for fields a config.json may leave out (fast path only).
_CONFIG_DEFAULTS = {"hidden_act": "silu", "tie_word_embeddings": False, "use_sliding_window": False, "rope_theta": 10000.0}
_CONFIG_REQUIRED = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
)  # fmt: skip
# Fields whose class default differs by architecture: the fast path needs them written out.
_CONFIG_REQUIRED_KEYS = {"mistral": ("sliding_window",), "qwen3": ("head_dim",)}


def load_hf_config(model_dir: Path):
    """The model's config: read straight from config.json when it is complete and uses plain RoPE (no
    transformers import: ~1.5 s of a cold start), else through transformers' AutoConfig."""
    fast = _read_config_fast(model_dir)
    if fast is not None:
        return fast
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir)
    except Exception as exc:
        raise ModelLoadError(f"cannot read config.json in {model_dir}: {exc}") from exc


def _read_config_fast(model_dir: Path) -> SimpleNamespace | None:
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("model_type") not in SUPPORTED_ARCHS:
        return None
    if any(raw.get(k) is None for k in _CONFIG_REQUIRED):
        return None
    if any(k not in raw for k in _CONFIG_REQUIRED_KEYS.get(raw["model_type"], ())):
        return None
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict) or rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
        return None
    cfg = {**_CONFIG_DEFAULTS, **raw}
    if "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    return SimpleNamespace(**cfg)


def generation_defaults(model_dir: Path) -> dict[str, float]:
    """The sampling fields (OPENAI_SAMPLING_DEFAULTS' keys) that the model's generation_config.json sets:
    what a request that leaves them out gets, as vLLM does. Its `do_sample` is not consulted (vLLM's
    rule too): the API's caller chooses greedy with temperature 0. No file: {} (plain OpenAI defaults).
    A value of the wrong type or range is a ModelLoadError naming it, not a silent fallback."""
    path = Path(model_dir) / "generation_config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    found = {k: raw[k] for k in OPENAI_SAMPLING_DEFAULTS if raw.get(k) is not None}
    for key, value in found.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelLoadError(f"{path}: {key} must be a number, got {value!r}")
    try:
        SamplingParams(**found)  # the same range checks as a request's
    except InvalidRequestError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    return found


# tokenizer_config.json classes that are plain `tokenizers` tokenizers: loaded without AutoTokenizer,
# which imports the model's config module (and through it most of transformers: ~1.5 s).
_GENERIC_TOKENIZERS = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def load_tokenizer(model_dir: Path):
    """The model's tokenizer (transformers); the generic fast class directly when that is what it is."""
    try:
        tok_cfg = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        tok_cfg = {}
    if (Path(model_dir) / "tokenizer.json").is_file() and tok_cfg.get("tokenizer_class") in _GENERIC_TOKENIZERS:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(model_dir)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def base_shapes_of(model_dir: Path) -> BaseShapes:
    """What an adapter for the model in model_dir must fit (without loading its weights)."""
    return base_shapes(ModelSpec.from_hf_config(load_hf_config(model_dir)), str(model_dir))


def base_shapes(spec: ModelSpec, name: str) -> BaseShapes:
    return BaseShapes(name, spec.num_layers, spec.lora_shapes())


def _rope_params(cfg) -> tuple[torch.Tensor, float]:
    """inv_freq and attention scaling exactly as transformers computes them for this config."""
    params = getattr(cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        return inv_freq, 1.0
    if rope_type == "dynamic":
        raise ModelLoadError("dynamic RoPE scaling is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

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


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    lora_slots: tuple[int, int] | None = None,
    weights: list[tuple[str, torch.Tensor]] | None = None,
    hf_config=None,
    kernels: KernelOptions | None = None,
) -> tuple[CausalLM, ModelSpec]:
    """Build the CausalLM for model_dir and fill it from its safetensors (fusing q|k|v and gate|up), or
    from `weights` ((checkpoint name, tensor) pairs, e.g. export_weights' host copies) when given.

    lora_slots=(num_slots, r_max) allocates the LoRA slot buffers first, so each weight is copied once,
    from the memory-mapped file straight into its final place (no intermediate tensors). hf_config: the
    model's config when the caller has read it already (load_hf_config). kernels: the kernel switches
    (Config.lora_backend, cpu_packed_linear, cpu_lora_rows; default: all on auto)."""
    cfg = hf_config if hf_config is not None else load_hf_config(model_dir)
    spec = ModelSpec.from_hf_config(cfg)
    if weights is None:
        files = _safetensors_files(model_dir)
        headers = [_read_header(f) for f in files]
        has = {k for h, _ in headers for k in h}
        tensors: Iterator[tuple[str, torch.Tensor]] | list = _iter_tensors(files, headers)
    else:
        has, tensors = {k for k, _ in weights}, weights
    biases = {
        "qkv": "model.layers.0.self_attn.q_proj.bias" in has,
        "o": "model.layers.0.self_attn.o_proj.bias" in has,
        "mlp": "model.layers.0.mlp.down_proj.bias" in has,
    }
    inv_freq, scaling = _rope_params(cfg)
    # Built uninitialized in place (no meta device round trip: its ops import torch._dynamo, ~1.5 s).
    model = CausalLM(spec, inv_freq, scaling, biases, dtype=dtype, device=device, kernels=kernels)
    model.inv_freq = inv_freq.float().to(device)
    if lora_slots is not None:
        model.allocate_lora_slots(*lora_slots, copy_weights=False)
    _fill(model, spec, tensors, device)
    if lora_slots is not None:
        model.pack()
    model.num_weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # read per decode step
    return model.eval(), spec


def _read_header(path: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, offset of the data section) of a safetensors file."""
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 * 2**20:
                raise ValueError(f"bad header length {n}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from exc
    header.pop("__metadata__", None)
    return header, 8 + n


def _iter_tensors(files: list[Path], headers: list[tuple[dict, int]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight: zero-copy views of the memory-mapped files, valid until the next
    item (the caller copies each one into place)."""
    for path, (header, data_start) in zip(files, headers, strict=True):
        size = path.stat().st_size
        with path.open("rb") as f:
            # Private copy-on-write map (frombuffer wants a writable buffer; nothing is written). It is
            # unmapped once the last view of it is gone.
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        for name, info in header.items():
            try:
                t = tensor_view(mm, info, data_start, size)
            except ValueError as exc:
                raise ModelLoadError(f"safetensors entry {name!r} in {path}: {exc}") from exc
            yield name, t


def export_weights(model: CausalLM, spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """Host (CPU) copies of the base weights under their checkpoint names (fused ones split back), for
    load_model(weights=...): the idle offload's host copy. Page-locked when CUDA is present."""
    items = [("model.embed_tokens.weight", model.embed.weight), ("model.norm.weight", model.norm.weight)]
    if not spec.tie_word_embeddings:
        items.append(("lm_head.weight", model.lm_head_weight))
    for i, layer in enumerate(model.layers):
        for name, (attr, slice_idx) in _LAYER_PARAMS.items():
            mod = getattr(layer, attr, None)
            if mod is None:  # q_norm / k_norm on a model without them
                continue
            for kind in ("weight", "bias"):
                t = getattr(mod, kind, None)
                if t is None:
                    continue
                if slice_idx is not None:
                    t = t[mod.slice_offsets[slice_idx] : mod.slice_offsets[slice_idx + 1]]
                items.append((f"model.layers.{i}.{name}.{kind}", t))
    pin = torch.cuda.is_available()
    out = []
    for key, t in items:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
        host.copy_(t.detach())
        out.append((key, host))
    return out


def _fill(model: CausalLM, spec: ModelSpec, tensors, device) -> None:
    def put(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
        if dst.shape != src.shape:
            raise ModelLoadError(f"weight {name} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)  # casts to the model dtype (same rounding as .to) and moves to its device

    filled: set[str] = set()
    expected = {"embed", "norm"} | ({"lm_head"} if not spec.tie_word_embeddings else set())
    for key, t in tensors:
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
