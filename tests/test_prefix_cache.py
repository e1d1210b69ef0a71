"""Prefix caching on the real engine (tiny random llama, real PEFT adapters, float32): outputs with reused
KV blocks equal transformers + PEFT and the engine with caching off; blocks never cross adapters or
adapter versions; usage reports the cached tokens."""

from __future__ import annotations

import shutil

import pytest
import torch
from tiny_models import ADAPTERS, reference_greedy, save_peft_adapter, save_tiny_model

from loraplex.config import Config
from loraplex.engine.engine import Engine
from loraplex.engine.runner import ModelRunner
from loraplex.scheduler import prefix_cache
from loraplex.scheduler.sampling_params import SamplingParams

BLOCK = 4
MAX_NEW = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    base = save_tiny_model(root / "base", "llama", seed=5)
    adapters = {
        name: save_peft_adapter(base, root / name, r, alpha, targets, rs, seed=300 + i)
        for i, (name, r, alpha, targets, rs) in enumerate(ADAPTERS[:3])
    }
    return root, base, adapters


def _engine(world, **overrides) -> Engine:
    _, base, adapters = world
    cfg = dict(model=str(base), adapters=tuple((n, str(p)) for n, p in adapters.items()), dtype="float32",
               max_lora_rank=16, block_size=BLOCK)
    cfg.update(overrides)
    return Engine(Config(**cfg))


def _kv_gib(world, num_blocks: int) -> float:
    from loraplex.engine.loader import load_hf_config
    from loraplex.engine.model import ModelSpec

    spec = ModelSpec.from_hf_config(load_hf_config(world[1]))
    return num_blocks * ModelRunner.kv_bytes_per_block(spec, BLOCK, torch.float32) / 2**30


def _waves(world) -> list[list[tuple[list[int], str | None]]]:
    """Three waves: a shared system prompt (all adapters and the base), then the same system prompt
    with other user turns (hits within each namespace only), then each wave-1 request's next turn."""
    _, _, adapters = world
    g = torch.Generator().manual_seed(11)
    rand = lambda n: torch.randint(0, 384, (n,), generator=g).tolist()  # noqa: E731
    system = rand(22)
    which = [*adapters, None]
    wave1 = [([*system, *rand(3 + i)], a) for i, a in enumerate(which)]
    wave2 = [([*system, *rand(5 + i)], a) for i, a in enumerate(which)]
    return [wave1, wave2]


def _run(engine: Engine, wave):
    requests = [engine.add_request(p, a, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True)) for p, a in wave]
    while engine.has_work():
        engine.step()
        engine.scheduler.check()
    return requests


def _all_waves(engine: Engine, world):
    wave1, wave2 = _waves(world)
    first = _run(engine, wave1)
    second = _run(engine, wave2)
    g = torch.Generator().manual_seed(12)
    turn2 = [([*r.all_token_ids, *torch.randint(0, 384, (3,), generator=g).tolist()], r.adapter) for r in first]
    third = _run(engine, turn2)
    return first, second, third


@pytest.mark.parametrize(
    "overrides",
    [{}, {"prefill_chunk_size": 5}, {"kv": 16}],
    ids=["plain", "chunked-prefill", "small-kv-pool"],
)
def test_cached_outputs_match_transformers_peft(world, overrides):
    _, base, adapters = world
    overrides = dict(overrides)
    if "kv" in overrides:
        overrides["kv_cache_gib"] = _kv_gib(world, overrides.pop("kv"))
    engine = _engine(world, **overrides)
    waves = _all_waves(engine, world)
    for wave in waves:
        for r in wave:
            ref, margin = reference_greedy(base, adapters.get(r.adapter), r.prompt_token_ids, MAX_NEW)
            assert margin > 1e-3, "near-tied reference logits: pick another seed"
            assert r.output_token_ids == ref, f"adapter {r.adapter} prompt {len(r.prompt_token_ids)}"
    first, second, third = waves
    assert engine.blocks.num_used == 0 and engine.scheduler.prefix_hits > 0
    if "kv_cache_gib" in overrides:  # a pool this small preempts and evicts: counts vary, outputs do not
        assert any(r.num_preemptions for wave in waves for r in wave) and engine.blocks.num_evictions > 0
        return
    assert all(r.num_cached_tokens == 0 for r in first)
    assert all(r.num_cached_tokens == 20 for r in second)  # 22 shared tokens: 5 whole blocks of 4
    assert all(r.num_cached_tokens >= 24 for r in third)  # the whole first turn, output included


def test_caching_on_equals_off_on_many_mixed_requests(world):
    _, _, adapters = world
    g = torch.Generator().manual_seed(21)
    systems = [torch.randint(0, 384, (int(n),), generator=g).tolist() for n in (9, 17, 30)]
    which = [*adapters, None]
    workload = []
    for i in range(36):
        prompt = [*systems[i % 3], *torch.randint(0, 384, (int(i % 7),), generator=g).tolist()]
        workload.append((prompt, which[(i // 3) % len(which)]))
    outs = {}
    for caching in (True, False):
        engine = _engine(world, prefix_caching=caching, max_num_batched_tokens=48, max_num_seqs=12,
                         kv_cache_gib=_kv_gib(world, 400))
        requests = []
        for k in range(0, len(workload), 6):  # arrivals in groups: later ones find earlier prefixes cached
            requests += [engine.add_request(p, a, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))
                         for p, a in workload[k : k + 6]]
            for _ in range(3):
                engine.step()
                engine.scheduler.check()
        while engine.has_work():
            engine.step()
            engine.scheduler.check()
        outs[caching] = [r.output_token_ids for r in requests]
        hits = engine.scheduler.prefix_hits
        assert (hits > 0) == caching
    assert outs[True] == outs[False]


def _isolation_hits(world, tmp_path) -> tuple[int, int, int]:
    """Cached tokens of: the same prompt under a second adapter after the first; under an adapter that
    was reloaded from the same name with other weights; and again under the reloaded one."""
    _, base, adapters = world
    moving = tmp_path / "moving"
    shutil.copytree(adapters["qv8"], moving)
    engine = _engine(world, adapters=(("moving", str(moving)), ("attn4", str(adapters["attn4"]))))
    prompt = list(range(40, 70))
    _run(engine, [(prompt, "moving")])
    (other,) = _run(engine, [(prompt, "attn4")])
    engine.adapter_cache.unload("moving")
    shutil.rmtree(moving)
    save_peft_adapter(base, moving, 8, 16, ["q_proj", "v_proj"], False, seed=999)
    (reloaded,) = _run(engine, [(prompt, "moving")])
    ref, _ = reference_greedy(base, moving, prompt, MAX_NEW)
    assert reloaded.output_token_ids == ref  # the new weights computed everything
    (again,) = _run(engine, [(prompt, "moving")])
    return other.num_cached_tokens, reloaded.num_cached_tokens, again.num_cached_tokens


def test_adapters_and_adapter_versions_never_share_blocks(world, tmp_path):
    assert _isolation_hits(world, tmp_path) == (0, 0, 28)


def test_isolation_check_fails_when_the_namespace_is_left_out(world, tmp_path, monkeypatch):
    """Mutation: a key without its namespace must make the isolation test fail."""
    real = prefix_cache.block_key
    monkeypatch.setattr(prefix_cache, "block_key", lambda parent, tokens, ns: real(parent, tokens, "same"))
    with pytest.raises(AssertionError):
        test_adapters_and_adapter_versions_never_share_blocks(world, tmp_path)


def test_request_output_reports_cached_tokens(world):
    engine = _engine(world)
    prompt = list(range(100, 118))
    counts = []
    for _ in range(2):
        engine.add_request(prompt, "all16", SamplingParams(max_tokens=2, ignore_eos=True))
        outs = []
        while engine.has_work():
            outs += engine.step()
        counts.append(outs[-1].num_cached_tokens)
    assert counts == [0, 16]
    off = _engine(world, prefix_caching=False)
    assert off.scheduler.namespace_of is None


def test_idle_offload_drops_the_cached_prefixes(world):
    """The KV cache goes with an idle offload, so no key may survive it."""
    _, base, adapters = world
    engine = _engine(world)
    prompt = list(range(200, 230))
    _run(engine, [(prompt, "qv8")])
    assert engine.blocks.num_cached > 0 and engine.offload("host")
    assert engine.blocks.num_cached == 0
    (after,) = _run(engine, [(prompt, "qv8")])
    assert after.num_cached_tokens == 0
    assert after.output_token_ids == reference_greedy(base, adapters["qv8"], prompt, MAX_NEW)[0]
