"""Continuous batching with the real model code on a tiny model: requests for many adapters arriving at
different steps give exactly the tokens each gets alone from transformers + PEFT (greedy, float32),
also under KV-pool preemption and chunked prefill; abort, failing steps, seeds and the async API."""

from __future__ import annotations

import asyncio

import pytest
import torch
from tiny_models import reference_greedy, save_peft_adapter, save_tiny_model

from loraplex.config import Config
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import Engine
from loraplex.engine.runner import ModelRunner
from loraplex.errors import InvalidRequestError
from loraplex.scheduler.sampling_params import SamplingParams

TARGETS = [["q_proj", "v_proj"], "all-linear", ["o_proj", "down_proj"], ["gate_proj", "up_proj"], ["k_proj", "v_proj"]]
NUM_ADAPTERS = 10
NUM_REQUESTS = 44


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cb")
    base = save_tiny_model(root / "base", "llama", seed=5)
    adapters = {
        f"a{i}": save_peft_adapter(base, root / f"a{i}", [2, 4, 8, 16][i % 4], 8 + i, TARGETS[i % 5], i % 3 == 0, seed=50 + i)
        for i in range(NUM_ADAPTERS)
    }
    g = torch.Generator().manual_seed(20)  # a workload whose reference top-2 margins all exceed 2e-3
    workload = []  # (arrival step, prompt, adapter or None, max_tokens)
    for i in range(NUM_REQUESTS):
        n = int(torch.randint(1, 70, (1,), generator=g))
        prompt = torch.randint(0, 384, (n,), generator=g).tolist()
        adapter = None if i % 11 == 0 else f"a{i % NUM_ADAPTERS}"
        workload.append((int(torch.randint(0, 30, (1,), generator=g)), prompt, adapter, int(torch.randint(1, 20, (1,), generator=g))))
    refs = []
    for _, prompt, adapter, max_tokens in workload:
        tokens, margin = reference_greedy(base, adapters.get(adapter), prompt, max_tokens)
        assert margin > 1e-3, "near-tied reference logits: pick another seed"
        refs.append(tokens)
    return base, adapters, workload, refs


def _engine(world, **overrides) -> Engine:
    base, adapters, _, _ = world
    cfg = dict(model=str(base), adapters=tuple((n, str(p)) for n, p in adapters.items()), dtype="float32",
               max_lora_rank=16, max_active_adapters=NUM_ADAPTERS)
    cfg.update(overrides)
    return Engine(Config(**cfg))


def _kv_gib(world, num_blocks: int, block_size: int = 16) -> float:
    from loraplex.engine.loader import load_hf_config
    from loraplex.engine.model import ModelSpec

    spec = ModelSpec.from_hf_config(load_hf_config(world[0]))
    return num_blocks * ModelRunner.kv_bytes_per_block(spec, block_size, torch.float32) / 2**30


def _run_arrivals(engine: Engine, workload):
    """Add each request at its arrival step; step until everything is done. Returns the Requests."""
    requests = [None] * len(workload)
    step = 0
    while step < 10_000:
        for i, (arrival, prompt, adapter, max_tokens) in enumerate(workload):
            if arrival == step:
                requests[i] = engine.add_request(prompt, adapter, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        if step > max(w[0] for w in workload) and not engine.has_work():
            break
        engine.step()
        engine.scheduler.check()
        step += 1
    return requests


@pytest.mark.parametrize(
    "overrides, expect",
    [
        ({}, None),
        ({"kv": 14}, "preempt"),  # 14 blocks of 16 tokens for up to 44 requests: preemptions
        ({"max_num_batched_tokens": 24, "max_num_seqs": 12}, "chunk"),  # prompts up to 69 tokens: chunked
    ],
    ids=["plain", "small-kv-pool", "chunked-prefill"],
)
def test_arrivals_match_each_request_alone(world, overrides, expect):
    _, _, workload, refs = world
    overrides = dict(overrides)
    if "kv" in overrides:
        overrides["kv_cache_gib"] = _kv_gib(world, overrides.pop("kv"))
    engine = _engine(world, **overrides)
    requests = _run_arrivals(engine, workload)
    for i, (r, ref) in enumerate(zip(requests, refs, strict=True)):
        assert r.finish_reason == "length", (i, r.finish_reason, r.error)
        assert r.output_token_ids == ref, f"request {i} (adapter {r.adapter}, prompt {len(r.prompt_token_ids)})"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    if expect == "preempt":
        assert sum(r.num_preemptions for r in requests) > 0
    if expect == "chunk":
        assert max(len(w[1]) for w in workload) > 24


def test_abort_mid_stream_frees_blocks(world):
    engine = _engine(world)
    free0 = engine.blocks.num_free
    _, _, workload, _ = world
    keep = engine.add_request(workload[1][1], "a1", SamplingParams(max_tokens=12, ignore_eos=True))
    victim = engine.add_request(list(range(50)), "a2", SamplingParams(max_tokens=100, ignore_eos=True))
    outs = []
    for _ in range(4):
        outs += engine.step()
    assert victim.output_token_ids and engine.blocks.num_free < free0
    assert engine.abort(victim.request_id)
    while engine.has_work():
        outs += engine.step()
    final = {o.request_id: o for o in outs if o.finished}
    assert final[victim.request_id].finish_reason == "abort"
    assert final[keep.request_id].finish_reason == "length" and len(keep.output_token_ids) == 12
    assert engine.blocks.num_free == free0


def test_exception_in_a_step_fails_only_that_step(world, monkeypatch):
    _, _, workload, refs = world
    engine = _engine(world)
    first = [engine.add_request(workload[i][1], workload[i][2], SamplingParams(max_tokens=workload[i][3], ignore_eos=True)) for i in (0, 1)]
    real_run = engine.runner.run
    calls = {"n": 0}

    def flaky(seqs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected")
        return real_run(seqs)

    monkeypatch.setattr(engine.runner, "run", flaky)
    outs = engine.step() + engine.step()  # the second step raises
    failed = {o.request_id: o for o in outs if o.finished}
    assert {r.request_id for r in first} <= set(failed)
    assert all(o.finish_reason == "error" and "injected" in o.error for o in failed.values())
    later = [engine.add_request(workload[i][1], workload[i][2], SamplingParams(max_tokens=workload[i][3], ignore_eos=True)) for i in (2, 3)]
    while engine.has_work():
        engine.step()
    for r, i in zip(later, (2, 3), strict=True):
        assert r.finish_reason == "length" and r.output_token_ids == refs[i]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_requests_that_can_never_run_are_refused_up_front(world):
    """One rule (EngineInfo.check_request) for the engine and, through AsyncEngine, for the server:
    an empty prompt, or prompt + max_tokens over the context length or over the whole KV cache."""
    engine = _engine(world, adapters=(), max_model_len=64, kv_cache_gib=_kv_gib(world, 3))
    capacity = engine.info.kv_capacity_tokens
    assert capacity < 64
    aengine = AsyncEngine(engine)
    cases = [
        ([], 4, "prompt", None, "prompt is empty"),
        ([1] * 60, 5, "max_tokens", "context_length_exceeded", "maximum context length is 64 tokens"),
        ([1] * capacity, 1, "max_tokens", "context_length_exceeded", f"KV cache capacity ({capacity} tokens)"),
    ]

    def refusal(call, *args) -> InvalidRequestError:
        with pytest.raises(InvalidRequestError) as refused:
            call(*args)
        return refused.value

    for prompt, max_tokens, param, code, words in cases:
        for error in (
            refusal(engine.add_request, prompt, None, SamplingParams(max_tokens=max_tokens)),
            refusal(aengine.check_request, len(prompt), max_tokens),
        ):
            assert (error.param, error.code) == (param, code) and words in error.message, error
    assert not engine.has_work()
    aengine.check_request(capacity - 1, 1)  # exactly the whole cache fits


def test_seed_gives_same_sample_alone_and_in_busy_batch(world):
    engine = _engine(world)
    _, _, workload, _ = world
    params = SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    (alone,) = engine.generate([workload[5][1]], ["a3"], params)
    others = [w[1] for w in workload[:12]]
    busy = engine.generate(
        [*others, workload[5][1]],
        [*[w[2] for w in workload[:12]], "a3"],
        [*[SamplingParams(max_tokens=w[3], temperature=1.0, ignore_eos=True) for w in workload[:12]], params],
    )
    assert busy[-1].token_ids == alone.token_ids
    unseeded = engine.generate([workload[5][1]] * 3, ["a3"] * 3, SamplingParams(max_tokens=15, temperature=0.9, ignore_eos=True))
    assert len({tuple(r.token_ids) for r in unseeded}) > 1  # without a seed the draws differ


def test_async_engine_streams_concurrent_requests(world):
    _, _, workload, refs = world
    engine = _engine(world)
    aengine = AsyncEngine(engine)
    aengine.start()

    async def one(i):
        stream = await aengine.submit(workload[i][1], workload[i][2], SamplingParams(max_tokens=workload[i][3], ignore_eos=True))
        tokens, last = [], None
        async for out in stream:
            tokens += out.new_token_ids
            last = out
        return tokens, last

    async def cancelled():
        stream = await aengine.submit(list(range(40)), "a4", SamplingParams(max_tokens=200, ignore_eos=True))
        async for out in stream:
            if out.num_output_tokens >= 3:
                break  # the client goes away: the request is aborted
        await stream.aclose()

    async def main():
        results = await asyncio.gather(*(one(i) for i in range(8)), cancelled())
        for _ in range(200):  # the abort frees blocks at the next step
            if engine.blocks.num_free == engine.blocks.num_blocks:
                break
            await asyncio.sleep(0.01)
        return results

    try:
        results = asyncio.run(main())
    finally:
        aengine.stop()
    for i in range(8):
        tokens, last = results[i]
        assert tokens == refs[i] and last.finished and last.finish_reason == "length"
    assert engine.blocks.num_free == engine.blocks.num_blocks
