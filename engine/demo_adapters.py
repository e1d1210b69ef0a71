"""Demo LoRA adapters: the trained ones shipped with the package, and seeded random ones for any base.

The trained ones (`demo_lora/`, package data) are what `loraplex serve` serves when given no model and
no adapters: small LoRAs of the embedded SmolLM2-135M-Instruct that each answer in a style you can see
(pirate talk, JSON, one sentence), made by `scripts/train_demo_adapters.py`; `demo_lora/
manifest.json` records the seed, the settings and every file's SHA-256.

The seeded random ones (`loraplex demo-adapters DIR --random`) fit any Llama-family base and are for
tests and benchmarks, when no trained adapters are at hand. PEFT itself is only a test
extra, so the format is mirrored by hand; it is what `PeftModel.save_pretrained` writes with peft 0.21:

    <name>/adapter_config.json
    <name>/adapter_model.safetensors
        base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, in]
        base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_B.weight   [out, r]
        base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

The weights are random but not inert: unlike PEFT's init, B is not zero, so each adapter changes the
model's output. A ~ N(0, 1/in) keeps A @ x at the scale of one input element; B's std is chosen per
adapter so that the delta (scale * B @ A @ x) is a modest fraction of the base projection's output:
visible in greedy text, small enough that the text stays readable.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..adapter_cache.peft_format import BaseShapes
from .loader import base_shapes_of

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES


@dataclass(frozen=True)
class DemoAdapterSpec:
    """One demo adapter. `b_std` is the std of B before the alpha/r (or alpha/sqrt(r)) scale."""

    name: str
    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    seed: int
    b_std: float
    use_rslora: bool = False

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


# Effective delta std per output element ~ scale * b_std * sqrt(r) * (input element std); the b_std values
# below were tuned on SmolLM2-135M-Instruct so that each adapter's greedy answer differs from the base's.
DEMO_ADAPTERS: tuple[DemoAdapterSpec, ...] = (
    DemoAdapterSpec("demo-qv", r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"), seed=1, b_std=0.04),
    DemoAdapterSpec("demo-attn", r=16, lora_alpha=32, target_modules=ATTENTION_MODULES, seed=2, b_std=0.02),
    DemoAdapterSpec("demo-all", r=32, lora_alpha=64, target_modules=ALL_LINEAR_MODULES, seed=3, b_std=0.01),
    DemoAdapterSpec(
        "demo-mlp-rslora",
        r=16,
        lora_alpha=16,
        target_modules=MLP_MODULES,
        seed=4,
        b_std=0.01,
        use_rslora=True,
    ),
)


def module_prefix(module: str) -> str:
    """Submodule of a Llama decoder layer that holds `module`."""
    return "self_attn" if module in ATTENTION_MODULES else "mlp"


def lora_key(layer: int, module: str, which: str) -> str:
    """PEFT's saved key, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return f"base_model.model.model.layers.{layer}.{module_prefix(module)}.{module}.lora_{which}.weight"


def adapter_config(spec: DemoAdapterSpec, base_model_name: str) -> dict:
    """The adapter_config.json PEFT writes for a plain LoRA, minus fields newer than common readers."""
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": spec.lora_alpha,
        "lora_bias": False,
        "lora_dropout": 0.0,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": spec.use_rslora,
    }


def make_lora_weights(
    spec: DemoAdapterSpec, shapes: BaseShapes, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Seeded A [r, in] and B [out, r] for every targeted linear of every layer."""
    unknown = set(spec.target_modules) - set(shapes.modules)
    if unknown:
        raise ValueError(f"{spec.name}: unknown target modules {sorted(unknown)}")
    generator = torch.Generator().manual_seed(spec.seed)
    tensors: dict[str, torch.Tensor] = {}
    # Fixed iteration order: the same seed always gives the same tensors.
    for layer in range(shapes.num_layers):
        for module in ALL_LINEAR_MODULES:
            if module not in spec.target_modules:
                continue
            in_features, out_features = shapes.modules[module]
            a = torch.randn(spec.r, in_features, generator=generator) / math.sqrt(in_features)
            b = torch.randn(out_features, spec.r, generator=generator) * spec.b_std
            tensors[lora_key(layer, module, "A")] = a.to(dtype).contiguous()
            tensors[lora_key(layer, module, "B")] = b.to(dtype).contiguous()
    return tensors


def write_lora_adapter(
    adapter_dir: Path,
    spec: DemoAdapterSpec,
    shapes: BaseShapes,
    base_model_name: str,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write one adapter folder (config + safetensors) and return it."""
    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    tensors = make_lora_weights(spec, shapes, dtype)
    save_file(tensors, str(adapter_dir / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config_text = json.dumps(adapter_config(spec, base_model_name), indent=2, sort_keys=True)
    (adapter_dir / ADAPTER_CONFIG_FILE).write_text(config_text + "\n")
    return adapter_dir


def write_demo_adapters(
    out_dir: Path,
    base_model_dir: Path,
    names: Sequence[str] | None = None,
    *,
    base_model_name: str | None = None,
    dtype: torch.dtype = torch.float32,
) -> list[Path]:
    """Write the demo adapters `names` (default: all of DEMO_ADAPTERS) for the base in `base_model_dir`.

    Each goes to `out_dir / name`. float32 by default, as PEFT saves; bfloat16 halves the files.
    `base_model_name` fills `base_model_name_or_path` (default: the base directory's absolute path).
    """
    by_name = {spec.name: spec for spec in DEMO_ADAPTERS}
    chosen = list(by_name) if names is None else list(names)
    unknown = [name for name in chosen if name not in by_name]
    if unknown:
        raise ValueError(f"unknown demo adapters {unknown}; choose from {sorted(by_name)}")
    base_model_dir = Path(base_model_dir)
    shapes = base_shapes_of(base_model_dir)
    base_name = base_model_name or str(base_model_dir.resolve())
    return [
        write_lora_adapter(Path(out_dir) / name, by_name[name], shapes, base_name, dtype) for name in chosen
    ]


TRAINED_DEMO_DIR = Path(__file__).resolve().parent / "demo_lora"
TRAINED_MANIFEST = TRAINED_DEMO_DIR / "manifest.json"


def trained_demo_manifest() -> dict:
    """demo_lora/manifest.json: how the shipped adapters were made, and each file's SHA-256."""
    return json.loads(TRAINED_MANIFEST.read_text())


def demo_adapter_sources() -> tuple[tuple[str, str], ...]:
    """(name, path) of the trained demo adapters shipped in the package: what `loraplex serve` (and the
    Ray app) serve when given no model and no adapters. Read in place; nothing is written."""
    names = sorted(trained_demo_manifest()["adapters"])
    return tuple((name, str(TRAINED_DEMO_DIR / name)) for name in names)


def copy_trained_demo_adapters(out_dir: Path) -> list[Path]:
    """Copy the shipped trained demo adapters into `out_dir / name` (to serve or edit them elsewhere)."""
    paths = []
    for name, source in demo_adapter_sources():
        target = Path(out_dir) / name
        target.mkdir(parents=True, exist_ok=True)
        for file in Path(source).iterdir():
            if file.is_file():
                shutil.copyfile(file, target / file.name)
        paths.append(target)
    return paths
