"""The engine with the tiered adapter cache: more adapters than device slots and host entries, loaded on
demand from an adapter directory, still give each request exactly its transformers + PEFT tokens; a broken
adapter fails only its own requests, with the cause."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_continuous_batching import NUM_ADAPTERS, _run_arrivals, world  # noqa: F401  (module fixture)

from loraplex.config import Config
from loraplex.engine.engine import Engine
from loraplex.errors import AdapterError
from loraplex.scheduler.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def adapter_dir(world, tmp_path_factory):  # noqa: F811
    _, adapters, _, _ = world
    root = tmp_path_factory.mktemp("adapter-dir")
    for name, path in adapters.items():
        shutil.copytree(path, root / name)
    broken = root / "broken"
    shutil.copytree(adapters["a1"], broken)
    cfg = json.loads((broken / "adapter_config.json").read_text())
    cfg["r"] = 999  # over --max-lora-rank: refused at load
    (broken / "adapter_config.json").write_text(json.dumps(cfg))
    return root


def test_three_times_more_adapters_than_slots(world, adapter_dir):  # noqa: F811
    base, _, workload, refs = world
    slots = 3
    assert NUM_ADAPTERS >= 3 * slots
    engine = Engine(Config(model=str(base), adapter_dir=str(adapter_dir), dtype="float32", max_lora_rank=16,
                           max_active_adapters=slots, max_host_adapters=4))
    requests = _run_arrivals(engine, workload)
    for i, (r, ref) in enumerate(zip(requests, refs, strict=True)):
        assert r.finish_reason == "length", (i, r.error)
        assert r.output_token_ids == ref, f"request {i} adapter {r.adapter}"
    stats = engine.adapter_cache.stats()
    assert stats["device"]["evictions"] > 0 and stats["host"]["evictions"] > 0
    assert stats["loads"] >= NUM_ADAPTERS
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_broken_adapter_fails_only_its_requests(world, adapter_dir):  # noqa: F811
    base, _, workload, refs = world
    engine = Engine(Config(model=str(base), adapter_dir=str(adapter_dir), dtype="float32", max_lora_rank=16,
                           max_active_adapters=3))
    good = engine.add_request(workload[1][1], workload[1][2], SamplingParams(max_tokens=workload[1][3], ignore_eos=True))
    bad = engine.add_request([1, 2, 3], "broken", SamplingParams(max_tokens=4))
    outs = []
    for _ in range(500):
        outs += engine.step()
        if not engine.has_work():
            break
        if not engine.last_step_ran:
            engine.wake.wait(0.01)
            engine.wake.clear()
    final = {o.request_id: o for o in outs if o.finished}
    assert final[bad.request_id].finish_reason == "error"
    assert "broken" in final[bad.request_id].error and "--max-lora-rank" in final[bad.request_id].error
    assert good.finish_reason == "length" and good.output_token_ids == refs[1]
    with pytest.raises(AdapterError, match="max-lora-rank"):  # remembered: fails fast at admission now
        engine.add_request([1, 2, 3], "broken", SamplingParams(max_tokens=4))
    for name in ("../a1", "/etc", "a1/../../x"):
        with pytest.raises(AdapterError):
            engine.add_request([1, 2, 3], name, SamplingParams(max_tokens=4))
    assert torch.equal(torch.tensor(good.output_token_ids), torch.tensor(refs[1]))
