"""Read and validate a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors).

Adapters are data, never code: safetensors only, every field and tensor checked against the base model.
The result holds, per (layer, target module), A [r, in] and B [out, r] with the PEFT scale folded into B.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import AdapterFormatError, AdapterShapeError, UnsupportedAdapterError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
# base_model.model.model.layers.3.self_attn.q_proj.lora_A[.default].weight
_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.[\w-]+)?\.weight$"
)


@dataclass(frozen=True)
class BaseShapes:
    """What an adapter must fit: target module -> (in_features, out_features), and the layer count."""

    name: str  # base model name or path, for the base_model_name_or_path check
    num_layers: int
    modules: dict[str, tuple[int, int]]


@dataclass
class LoraAdapter:
    name: str
    path: Path
    rank: int  # largest rank over its modules
    alpha: float
    use_rslora: bool
    target_modules: list[str]
    # (layer, module) -> (A [r, in], B [out, r] already multiplied by the scale)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    base_model_name_or_path: str | None = None
    # sha256 of adapter_config.json + the safetensors bytes: the prefix cache's namespace tells versions apart
    digest: str = ""

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def _pattern_value(patterns: dict, module_key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module path by regex suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?{key}$", module_key):
            return value
    return default


def read_adapter_config(name: str, path: Path) -> dict:
    if not path.is_dir():
        raise AdapterFormatError(name, f"adapter directory {path} does not exist", code="adapter_not_found")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterFormatError(name, f"missing {CONFIG_FILE} in {path}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterFormatError(name, f"cannot parse {CONFIG_FILE}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise AdapterFormatError(name, f"{CONFIG_FILE} is not a JSON object")
    return cfg


def _check_config(name: str, cfg: dict, base: BaseShapes, max_rank: int) -> None:
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise UnsupportedAdapterError(name, f"peft_type {peft_type!r} is not supported (only LORA)", param="peft_type")
    if cfg.get("use_dora"):
        raise UnsupportedAdapterError(name, "DoRA adapters (use_dora=true) are not supported", param="use_dora")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedAdapterError(name, f"bias={cfg.get('bias')!r} is not supported (only 'none')", param="bias")
    if cfg.get("modules_to_save"):
        raise UnsupportedAdapterError(
            name, f"modules_to_save={cfg['modules_to_save']!r} is not supported", param="modules_to_save"
        )
    for flag in ("use_qalora", "lora_bias"):
        if cfg.get(flag):
            raise UnsupportedAdapterError(name, f"{flag}=true is not supported", param=flag)
    r = cfg.get("r")
    if not isinstance(r, int) or r <= 0:
        raise AdapterFormatError(name, f"r must be a positive integer, got {r!r}", param="r")
    ranks = [r, *cfg.get("rank_pattern", {}).values()]
    if max(ranks) > max_rank:
        raise AdapterShapeError(
            name, f"rank {max(ranks)} is above the configured maximum --max-lora-rank {max_rank}", param="r"
        )
    if not isinstance(cfg.get("lora_alpha", 8), int | float):
        raise AdapterFormatError(name, "lora_alpha must be a number", param="lora_alpha")
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        for t in targets:
            leaf = str(t).rsplit(".", 1)[-1]
            if leaf not in base.modules:
                raise UnsupportedAdapterError(
                    name,
                    f"target module {t!r} is not supported (supported: {sorted(base.modules)})",
                    param="target_modules",
                )
    elif targets is not None and not isinstance(targets, str):
        raise AdapterFormatError(name, "target_modules must be a list or a string", param="target_modules")
    expected = cfg.get("base_model_name_or_path")
    if expected and base.name and Path(str(expected)).name != Path(base.name).name:
        log.warning("adapter %r was trained on %r; serving it on %r", name, expected, base.name)


def load_peft_adapter(
    name: str, path: Path, base: BaseShapes, max_rank: int, dtype: torch.dtype = torch.float32
) -> LoraAdapter:
    """Parse and validate one adapter directory. Raises an AdapterError subclass naming the adapter."""
    cfg = read_adapter_config(name, path)
    _check_config(name, cfg, base, max_rank)
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        if (path / PICKLE_FILE).is_file():
            raise AdapterFormatError(
                name,
                f"only {PICKLE_FILE} (a pickle) was found; loraplex loads safetensors only, since a pickle can "
                "run code. Convert it with PEFT: PeftModel.from_pretrained(...).save_pretrained(dir, "
                "safe_serialization=True)",
            )
        raise AdapterFormatError(name, f"missing {WEIGHTS_FILE} in {path}")
    digest = hashlib.sha256()
    try:
        for part in (path / CONFIG_FILE, weights_path):
            data = part.read_bytes()
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
        with safe_open(weights_path, framework="pt") as sf:
            raw = {k: sf.get_tensor(k) for k in sf.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFormatError(name, f"cannot read {WEIGHTS_FILE}: {exc}") from exc

    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = _KEY.match(key)
        if m is None:
            if "lora_embedding" in key or "embed_tokens" in key or "lm_head" in key:
                raise UnsupportedAdapterError(name, f"LoRA on embeddings / lm_head is not supported ({key})")
            if "lora_magnitude_vector" in key:
                raise UnsupportedAdapterError(name, "DoRA weights are not supported", param="use_dora")
            raise UnsupportedAdapterError(name, f"unsupported tensor {key!r} in {WEIGHTS_FILE}")
        layer, module, which = int(m.group(1)), m.group(2), m.group(3)
        if module not in base.modules:
            raise UnsupportedAdapterError(name, f"target module {module!r} (tensor {key}) is not supported")
        if layer >= base.num_layers:
            raise AdapterShapeError(name, f"tensor {key} is for layer {layer}; the base model has {base.num_layers}")
        pairs.setdefault((layer, module), {})[which] = t
    if not pairs:
        raise AdapterFormatError(name, f"{WEIGHTS_FILE} holds no LoRA tensors")

    alpha_default = float(cfg.get("lora_alpha", 8))
    use_rslora = bool(cfg.get("use_rslora", False))
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    rank = 0
    for (layer, module), ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterFormatError(name, f"layer {layer} {module}: lora_A or lora_B is missing")
        a, b = ab["A"], ab["B"]
        in_f, out_f = base.modules[module]
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape != (out_f, r):
            raise AdapterShapeError(
                name,
                f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                f"model (expected ({r}, {in_f}) and ({out_f}, {r}))",
            )
        if r > max_rank:
            raise AdapterShapeError(name, f"rank {r} is above the configured maximum --max-lora-rank {max_rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterFormatError(name, f"layer {layer} {module}: non-finite values (NaN/Inf) in the weights")
        module_key = f"model.layers.{layer}.{'mlp' if module.endswith(('gate_proj', 'up_proj', 'down_proj')) else 'self_attn'}.{module}"
        alpha = float(_pattern_value(cfg.get("alpha_pattern", {}), module_key, alpha_default))
        scale = alpha / math.sqrt(r) if use_rslora else alpha / r
        weights[(layer, module)] = (a.to(dtype), (b.float() * scale).to(dtype))
        rank = max(rank, r)
    targets = sorted({m for _, m in weights})
    return LoraAdapter(
        name=name,
        path=path,
        rank=rank,
        alpha=alpha_default,
        use_rslora=use_rslora,
        target_modules=targets,
        weights=weights,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        digest=digest.hexdigest(),
    )
