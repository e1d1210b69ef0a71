"""One mixed batch of many adapters (and base-only requests) equals transformers + PEFT run one by one."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from tiny_models import ADAPTERS, ARCHS, reference_greedy, save_peft_adapter, save_tiny_model

from loraplex.config import Config
from loraplex.engine.engine import Engine
from loraplex.engine.runner import StepSeq
from loraplex.kernels.cpu_plan import CostFigures
from loraplex.scheduler.sampling_params import SamplingParams

MAX_NEW = 12


@pytest.fixture(scope="module", params=ARCHS)
def arch_setup(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    base = save_tiny_model(root / "base", arch, seed=ARCHS.index(arch))
    adapters = {
        name: save_peft_adapter(base, root / name, r, alpha, targets, rs, seed=100 + i)
        for i, (name, r, alpha, targets, rs) in enumerate(ADAPTERS)
    }
    return arch, base, adapters


def _prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    lengths = [3, 17, 1, 40, 9, 25, 6, 33, 12, 2]
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("rows", [True, False], ids=["rows", "no-rows"])
def test_mixed_batch_matches_transformers_peft(arch_setup, rows):
    """rows=False takes away the CPU row tables, so the matmul strategies (grouped, stacked,
    fused-single: kernels/cpu_lora.py) serve."""
    arch, base, adapters = arch_setup
    adapter_args = tuple((n, str(p)) for n, p in adapters.items())
    engine = Engine(
        Config(model=str(base), adapters=adapter_args, dtype="float32", max_lora_rank=16, cpu_lora_rows=rows)
    )
    if engine.device.type == "cpu":  # the switch reached the model (row tables exist on CPU only)
        assert (engine.model.layers[0].qkv.lora_at is not None) == rows
    names = list(adapters)
    prompts = _prompts(384)
    # every adapter at least once, plus base-only requests (None) and the base model by its own name
    which = [*names, None, engine.model_name, names[2]]
    results = engine.generate(prompts, which, SamplingParams(max_tokens=MAX_NEW))
    for prompt, adapter, res in zip(prompts, which, results, strict=True):
        adapter_dir = adapters.get(adapter) if adapter in adapters else None
        ref, margin = reference_greedy(base, adapter_dir, prompt, MAX_NEW)
        assert margin > 1e-3, f"{arch}/{adapter}: near-tied reference logits; pick another seed"
        assert res.token_ids == ref, f"{arch} adapter={adapter} prompt_len={len(prompt)}"
        assert res.finish_reason == "length"
        if adapter_dir is not None:  # the adapter really changes this request (so equality means something)
            assert ref != reference_greedy(base, None, prompt, MAX_NEW)[0] or adapter in ("ko1",), adapter
    assert engine.blocks.num_free == engine.blocks.num_blocks  # every KV block came back


def test_prompt_logits_close_to_peft(arch_setup):
    """Logits, not only argmax: the last prompt position of a LoRA request, all adapters in one step."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    arch, base, adapters = arch_setup
    engine = Engine(
        Config(model=str(base), adapters=tuple((n, str(p)) for n, p in adapters.items()), dtype="float32", max_lora_rank=16)
    )
    prompts = _prompts(384)[: len(adapters)]
    step = []
    for prompt, name in zip(prompts, adapters, strict=True):
        blocks = engine.blocks.allocate(engine.blocks.blocks_needed(len(prompt), 0))
        step.append(StepSeq(prompt, 0, blocks, engine.slot_of(name), True))
    logits = engine.runner.run(step)
    for i, (prompt, name) in enumerate(zip(prompts, adapters, strict=True)):
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapters[name])
        with torch.no_grad():
            ref = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(logits[i], ref, atol=2e-4, rtol=1e-4, msg=f"{arch}/{name}")


def test_mistral_sliding_window_matches_transformers(tmp_path):
    """A window shorter than the prompts: prefill, chunk masks and decode all honour it."""
    base = save_tiny_model(tmp_path / "base", "mistral", seed=11, sliding_window=8)
    adapter = save_peft_adapter(base, tmp_path / "ad", 8, 16, "all-linear", False, seed=3)
    engine = Engine(Config(model=str(base), adapters=(("ad", str(adapter)),), dtype="float32", max_lora_rank=16))
    prompts = _prompts(384)[:4]
    which = ["ad", None, "ad", None]
    results = engine.generate(prompts, which, SamplingParams(max_tokens=MAX_NEW))
    for prompt, name, res in zip(prompts, which, results, strict=True):
        ref, margin = reference_greedy(base, adapter if name else None, prompt, MAX_NEW)
        assert margin > 1e-3
        assert res.token_ids == ref, f"adapter={name} prompt_len={len(prompt)}"


def test_bfloat16_cpu_paths_agree(arch_setup, monkeypatch):
    """16-bit CPU models take the oneDNN-packed base matmul and the per-token rows LoRA strategy (the
    default); the plain path (packing and row tables off: F.linear and the matmul LoRA strategies) is the
    yardstick. Against the float32 engine, the default path's logits are as close as the plain path's
    (within bf16 rounding: different summation orders round differently, neither is exact), in base-only,
    one-adapter and many-adapter steps. The per-set copies are made from the first step of an active set
    here (FUSE_AFTER_STEPS = 1): steps of one adapter alone run through its merged copy (W + B A packed),
    which rounds every merged weight to bf16 once more (as PEFT's merge_and_unload in bf16 does; these test
    adapters' B is scaled up, so B A is as large as W): within 3x the plain path's error; an adapter next
    to base-only rows runs through the fused packed copy."""
    from loraplex.kernels.cpu_lora import FusedPacked, MergedPacked

    monkeypatch.setattr("loraplex.kernels.cpu_lora.FUSE_AFTER_STEPS", 1)
    arch, base, adapters = arch_setup
    names = list(adapters)
    adapter_args = tuple((n, str(p)) for n, p in adapters.items())
    cfg = Config(model=str(base), adapters=adapter_args, dtype="bfloat16", max_lora_rank=16)
    exact = Engine(Config(model=str(base), adapters=adapter_args, dtype="float32", max_lora_rank=16))
    default = Engine(cfg)
    plain = Engine(replace(cfg, cpu_packed_linear=False, cpu_lora_rows=False))
    if default.model.layers[0].qkv.packed is None:
        pytest.skip("no oneDNN packed linear in this torch build")
    # fixed figures (test data, not this machine's): the plans must not depend on how busy the machine is
    default.model.set_cost_figures(
        CostFigures(50e-6, 10e-6, flops_per_second=1e11, copy_bytes_per_second=1e10, row_call_seconds=10e-6, row_bytes_per_second=2.5e10)
    )
    assert plain.model.layers[0].qkv.packed is None and plain.model.layers[0].qkv.lora_at is None
    assert default.model.layers[0].qkv.lora_at is not None
    prompts = _prompts(384)[:4]
    single, with_base = [names[2]] * 4, [names[1], None, names[1], None]
    for which in ([None] * 4, single, with_base, [names[0], None, names[2], names[4]]):
        for lin in default.model.lora_linears():  # the repay rule (test_lora_reference.py) would hold back a second copy
            lin.slots.fuse_seconds = 0.0
        logits = []
        for engine in (exact, default, plain):
            step = []
            for prompt, name in zip(prompts, which, strict=True):
                blocks = engine.blocks.allocate(engine.blocks.blocks_needed(len(prompt), 0))
                step.append(StepSeq(prompt, 0, blocks, engine.slot_of(name), True))
            logits.append(engine.runner.run(step))
        scale = logits[0].abs().max()
        err_default, err_plain = ((lg - logits[0]).abs().max() / scale for lg in logits[1:])
        copies = {type(lin.slots.fused) for lin in default.model.lora_linears()}
        if which in (single, with_base):
            assert (MergedPacked if which == single else FusedPacked) in copies, f"{which}: {copies}"
        assert err_plain < 0.1, f"{arch} {which}: bf16 itself is off ({err_plain:.3f})"
        if which == single:
            assert err_default <= 3 * max(err_plain, 0.01), f"{arch} {which}: {err_default:.4f} vs {err_plain:.4f}"
            continue
        assert err_default <= 1.5 * max(err_plain, 0.01), f"{arch} {which}: {err_default:.4f} vs {err_plain:.4f}"
