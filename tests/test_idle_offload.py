"""Idle offload (issue 7): after the idle period the device copies of the base model, the adapter slots
and the KV cache are gone (their tensors freed, the engine's device bytes 0), and the next request brings
them back transparently with the same greedy output; `--preload` adapters are loaded during start."""

from __future__ import annotations

import gc
import re
import time
import weakref

import httpx
import pytest
from server_fixtures import make_world, start_server, wait_ready
from tiny_models import reference_greedy

from loraplex.config import Config
from loraplex.engine.engine import Engine
from loraplex.errors import ConfigError
from loraplex.scheduler.sampling_params import SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [9, 10, 11], [12, 13, 14, 15]]
ADAPTERS = [None, "a0", "a1"]
NEW = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("offload"), 3)


def _tokens(engine: Engine) -> list[list[int]]:
    results = engine.generate(PROMPTS, ADAPTERS, SamplingParams(max_tokens=NEW, ignore_eos=True))
    return [r.token_ids for r in results]


@pytest.mark.parametrize("mode", ["host", "drop"])
def test_offload_frees_the_device_copies_and_wakes_with_the_same_tokens(world, mode):
    base, adapters = world
    engine = Engine(
        Config(model=str(base), adapter_dir=str(adapters), dtype="float32", max_lora_rank=16,
               max_active_adapters=2, preload=("a1",))
    )  # fmt: skip
    assert engine.adapter_cache.stats()["device"]["resident"] == 1  # --preload: in its slot at start
    before = _tokens(engine)
    assert before[2] == reference_greedy(base, adapters / "a1", PROMPTS[2], NEW)[0]  # transformers + PEFT
    held = [weakref.ref(t) for t in (engine.model.layers[0].qkv.weight_ext, engine.model.embed.weight,
                                     engine.model.layers[-1].down.lora_b, engine.runner.kv_caches[0][0])]  # fmt: skip
    model_ref = weakref.ref(engine.model)
    assert engine.device_model.device_bytes() > 0

    assert engine.offload(mode)
    gc.collect()
    assert model_ref() is None and all(r() is None for r in held), "device tensors still referenced"
    assert engine.device_model.device_bytes() == 0 and engine.device_model.offloaded == mode
    stats = engine.adapter_cache.stats()
    assert stats["device"]["resident"] == 0
    assert stats["host"]["resident"] == (2 if mode == "host" else 0)  # host mode keeps the host tier
    assert not engine.offload(mode)  # already offloaded
    assert engine.step() == [] and engine.device_model.offloaded == mode  # an idle step does not wake it

    assert _tokens(engine) == before
    assert engine.device_model.offloaded is None and engine.device_model.device_bytes() > 0
    assert engine.device_model.stats.num_wakeups == 1 and engine.device_model.stats.wakeup_seconds_sum > 0
    loads = engine.adapter_cache.stats()["loads"]
    assert loads == (2 if mode == "host" else 4)  # drop mode read a0 and a1 from disk again


def test_offload_is_refused_while_requests_are_admitted(world):
    base, adapters = world
    engine = Engine(Config(model=str(base), adapter_dir=str(adapters), dtype="float32", max_lora_rank=16))
    engine.add_request(PROMPTS[0], "a0", SamplingParams(max_tokens=3))
    assert not engine.offload("host") and engine.device_model.device_bytes() > 0
    while engine.has_work():
        engine.step()
    assert engine.offload("host")
    with pytest.raises(ValueError):
        engine.offload("disk")


def test_config_validates_offload_flags():
    with pytest.raises(ConfigError, match="idle_offload"):
        Config(idle_offload="swap")
    with pytest.raises(ConfigError, match="idle_offload_seconds"):
        Config(idle_offload_seconds=0)
    with pytest.raises(ConfigError, match="preload"):
        Config(preload=("../etc",))


def _metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} (\S+)$"
    m = re.search(pattern, text, re.M)
    assert m, f"{name}{labels} not in metrics"
    return float(m.group(1))


@pytest.mark.slow  # a real `loraplex serve` subprocess
@pytest.mark.parametrize("mode", ["host", "drop"])
def test_server_offloads_when_idle_and_the_next_request_wakes_it(world, tmp_path, mode):
    base, adapters = world
    server = start_server(
        ["--model", str(base), "--adapter-dir", str(adapters), "--preload", "a1", "--dtype", "float32",
         "--max-lora-rank", "16", "--idle-offload-seconds", "1", "--idle-offload", mode],
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        wait_ready(server)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert _metric(metrics, "loraplex_adapters_resident", '{tier="device"}') == 1  # preloaded
        assert _metric(metrics, "loraplex_offloaded") == 0

        def complete() -> str:
            body = {"model": "a1", "prompt": "hello world", "max_tokens": 8, "temperature": 0}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        first = complete()
        deadline = time.monotonic() + 30
        while _metric(httpx.get(f"{server.url}/metrics").text, "loraplex_offloaded") != 1:
            assert time.monotonic() < deadline, "never offloaded"
            time.sleep(0.2)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert _metric(metrics, "loraplex_device_bytes") == 0
        assert _metric(metrics, "loraplex_adapters_resident", '{tier="device"}') == 0
        assert _metric(metrics, "loraplex_adapters_resident", '{tier="host"}') == (1 if mode == "host" else 0)
        assert httpx.get(f"{server.url}/ready").status_code == 200  # offloaded is still ready: it wakes

        assert complete() == first
        metrics = httpx.get(f"{server.url}/metrics").text
        assert _metric(metrics, "loraplex_wakeups_total") == 1
        assert _metric(metrics, "loraplex_wakeup_seconds_count") == 1
        assert _metric(metrics, "loraplex_wakeup_seconds_sum") > 0
        assert _metric(metrics, "loraplex_offloaded") == 0 and _metric(metrics, "loraplex_device_bytes") > 0
    finally:
        assert server.terminate() == 0, server.log()
