"""Adapter cache: sources (roots, adapter dir, Hub offline), tiers and LRU, pins, one load per cold
adapter, failure TTL, runtime control, counters. CPU only, no network; tiny llama + real PEFT adapters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from tiny_models import live_slot_state, save_peft_adapter, save_tiny_model

import loraplex.adapter_cache.cache as cache_module
from loraplex.adapter_cache.cache import AdapterCache
from loraplex.adapter_cache.peft_format import BaseShapes, load_peft_adapter
from loraplex.adapter_cache.sources import AdapterSources
from loraplex.engine.loader import load_hf_config, load_model
from loraplex.engine.model import ModelSpec, write_lora_slot
from loraplex.errors import AdapterError, AdapterFormatError, AdapterNotFoundError
from loraplex.kernels.lora_slots import row_tables

NAMES = [f"ad{i}" for i in range(8)]
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny llama, 8 PEFT adapters in an adapter directory, and the base's shapes."""
    root = tmp_path_factory.mktemp("cache")
    base = save_tiny_model(root / "base", "llama")
    adapters = root / "adapters"
    for i, name in enumerate(NAMES):
        targets = ["q_proj", "v_proj"] if i % 2 else "all-linear"
        save_peft_adapter(base, adapters / name, 4 + 2 * (i % 3), 8, targets, False, seed=i)
    spec = ModelSpec.from_hf_config(load_hf_config(base))
    return root, base, adapters, BaseShapes(str(base), spec.num_layers, spec.lora_shapes())


class FakeDevice:
    """Records slot writes instead of copying into model buffers."""

    def __init__(self) -> None:
        self.slots: dict[int, dict] = {}
        self.writes: list[int] = []
        self.clears: list[int] = []

    def write(self, slot: int, weights: dict, rank: int) -> None:
        self.slots[slot] = weights
        self.writes.append(slot)

    def clear(self, slot: int) -> None:
        self.slots.pop(slot, None)
        self.clears.append(slot)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_cache(world, adapter_dir=None, num_slots=2, max_host=3, budget=1 << 30, **kw):
    _, _, adapters, shapes = world
    sources = kw.pop("sources", None) or AdapterSources(adapter_dir=adapter_dir or adapters)
    device = FakeDevice()
    cache = AdapterCache(
        sources, shapes, 16, torch.float32, num_slots, max_host, budget, device.write, device.clear, **kw
    )
    return cache, device


def wait_until(pred, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def settle(cache: AdapterCache) -> list[str]:
    """Wait for background loads, then install what is ready (what the step thread does)."""
    wait_until(lambda: cache.stats()["loading"] == 0)
    return cache.install_ready()


def make_resident(cache: AdapterCache, name: str) -> int:
    cache.request_load(name)
    settle(cache)
    slot = cache.slot_of(name)
    assert slot is not None, cache.list()
    return slot


@pytest.fixture
def reads(monkeypatch):
    """Paths load_peft_adapter was asked to read, in order."""
    seen: list[Path] = []

    def counting(name, path, *args, **kwargs):
        seen.append(Path(path))
        return load_peft_adapter(name, path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "load_peft_adapter", counting)
    return seen


def test_lru_eviction_in_both_tiers(world, reads):
    cache, device = make_cache(world, num_slots=2, max_host=3)
    for name in NAMES:
        slot = make_resident(cache, name)
        expected = load_peft_adapter(name, world[2] / name, world[3], 16).weights[(0, "q_proj")][0]
        assert torch.equal(device.slots[slot][(0, "q_proj")][0], expected)
    assert [r["name"] for r in cache.list() if r["tier"] == "device"] == NAMES[-2:]
    assert {r["name"] for r in cache.list() if r["tier"] in ("device", "host")} == set(NAMES[-3:])
    s = cache.stats()
    assert s["loads"] == 8 and len(reads) == 8
    assert s["device"]["evictions"] == 6 and s["host"]["evictions"] == 5
    assert s["device"]["resident"] == 2 and s["host"]["resident"] == 3
    # A host hit needs no read; it evicts the least recently used slot (ad6 was touched, so ad7 goes).
    cache.slot_of("ad6")
    slot7 = cache.slot_of("ad7")
    cache.slot_of("ad6")
    assert make_resident(cache, "ad5") == slot7
    assert cache.slot_of("ad7") is None and cache.slot_of("ad6") is not None
    s = cache.stats()
    assert s["loads"] == 8 and s["host"]["hits"] == 1 and s["device"]["evictions"] == 7
    cache.request_load("ad0")
    cache.request_load("ad1")
    wait_until(lambda: cache.stats()["loading"] == 0)
    assert cache.install_ready(max_installs=1) == ["ad0"] and cache.install_ready() == ["ad1"]
    cache.close()


def test_pinned_slots_are_never_evicted(world):
    cache, device = make_cache(world, num_slots=2, max_host=8)
    slot0 = make_resident(cache, "ad0")
    cache.pin("ad0")
    for name in NAMES[1:5]:  # pressure: only the unpinned slot turns over
        make_resident(cache, name)
        assert cache.slot_of("ad0") == slot0
    cache.pin("ad4")
    cache.request_load("ad5")  # both slots pinned: it waits on host, nothing is evicted
    assert settle(cache) == [] and cache.slot_of("ad5") is None
    assert cache.list()[5]["tier"] == "host" and cache.stats()["waiting_install"] == 1
    cache.unpin("ad4")
    assert cache.install_ready() == ["ad5"] and cache.slot_of("ad4") is None
    assert cache.slot_of("ad0") == slot0
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin("ad4")
    cache.close()


def test_concurrent_requests_for_one_cold_adapter_load_once(world, monkeypatch):
    calls: list[str] = []

    def slow(name, *args, **kwargs):
        calls.append(name)
        time.sleep(0.05)  # keep the load in flight while the other threads arrive
        return load_peft_adapter(name, *args, **kwargs)

    monkeypatch.setattr(cache_module, "load_peft_adapter", slow)
    ready: list[str] = []
    cache, _ = make_cache(world, load_workers=4, on_ready=ready.append)
    barrier = threading.Barrier(8)

    def ask() -> None:
        barrier.wait()
        cache.request_load("ad3")

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert settle(cache) == ["ad3"]
    wait_until(lambda: bool(ready))
    assert calls == ["ad3"] and ready == ["ad3"] and cache.stats()["loads"] == 1
    cache.close()


def test_failure_ttl_fails_fast_then_picks_up_fixed_copy(world, tmp_path, reads):
    _, _, adapters, _ = world
    shutil.copytree(adapters / "ad1", tmp_path / "broken")
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    failures: list[tuple[str, str]] = []
    clock = Clock()
    cache, _ = make_cache(
        world,
        adapter_dir=tmp_path,
        failure_ttl=30,
        clock=clock,
        on_failure=lambda n, m: failures.append((n, m)),
    )
    cache.request_load("broken")
    wait_until(lambda: bool(failures))
    assert failures[0][0] == "broken" and "cannot parse" in failures[0][1]
    assert isinstance(cache.error_of("broken"), AdapterFormatError)
    assert isinstance(cache.admission_error("broken"), AdapterFormatError)
    assert cache.list()[0]["tier"] == "failed" and cache.stats()["load_failures"] == 1

    shutil.copy(adapters / "ad1" / "adapter_config.json", tmp_path / "broken")  # fixed on disk
    clock.now += 29
    cache.request_load("broken")  # within the TTL: reported again (from install_ready), nothing read
    assert len(failures) == 1
    assert settle(cache) == [] and len(failures) == 2 and len(reads) == 1
    with pytest.raises(AdapterFormatError):
        cache.load("broken")

    clock.now += 2  # past the TTL: the fixed copy is read
    assert cache.error_of("broken") is None
    assert make_resident(cache, "broken") is not None
    assert len(reads) == 2 and cache.stats()["loads"] == 2
    cache.close()


def test_truncated_safetensors_is_a_clear_format_error(world, tmp_path):
    _, _, adapters, _ = world
    shutil.copytree(adapters / "ad2", tmp_path / "trunc")
    weights = tmp_path / "trunc" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cache, _ = make_cache(world, adapter_dir=tmp_path)
    with pytest.raises(AdapterFormatError, match="'trunc'.*cannot read adapter_model.safetensors"):
        cache.load("trunc", wait=20)
    assert cache.slot_of("trunc") is None
    cache.close()


ESCAPES = ["../outside", "..", ".", "", "/etc", "/etc/passwd", "ok/../../outside", "ok/../ok", "./ok", "ok/",
           "~", "ok\x00", "..\\outside", "a" * 5000, "evil", "sneaky", "%2e%2e/outside", "ok/..", "-rf"]  # fmt: skip


@pytest.mark.parametrize("allow_hub", [False, True])
def test_path_escapes_never_reach_outside_the_root(world, tmp_path, reads, allow_hub):
    _, _, adapters, shapes = world
    root = tmp_path / "root"
    shutil.copytree(adapters / "ad0", root / "ok")
    shutil.copytree(adapters / "ad0", tmp_path / "outside")
    (root / "evil").symlink_to(tmp_path / "outside", target_is_directory=True)  # a folder linking out
    (root / "sneaky").mkdir()  # a folder whose weights link out
    shutil.copy(adapters / "ad0" / "adapter_config.json", root / "sneaky")
    (root / "sneaky" / "adapter_model.safetensors").symlink_to(
        tmp_path / "outside" / "adapter_model.safetensors"
    )
    downloads: list[str] = []
    sources = AdapterSources(
        adapter_dir=root, allow_hub=allow_hub, download=lambda *a, **k: downloads.append(a[0])
    )
    cache, _ = make_cache(world, sources=sources)
    for name in ESCAPES:
        with pytest.raises(AdapterNotFoundError) as info:
            sources.resolve(name)
        assert len(info.value.message) < 400
        assert not sources.known(name) and cache.admission_error(name) is not None
        cache.request_load(name)
    settle(cache)
    assert all(cache.slot_of(n) is None for n in ESCAPES)
    assert "links outside" in str(cache.error_of("evil")) and "links outside" in str(cache.error_of("sneaky"))
    assert reads == [] and downloads == []
    assert sources.resolve("ok") == (root / "ok").resolve() and sources.local_names() == ["ok"]
    cache.close()


def test_adapter_dir_discovers_folders_added_later(world, tmp_path):
    _, _, adapters, _ = world
    cache, device = make_cache(world, adapter_dir=tmp_path)
    assert not cache.known("late") and isinstance(cache.admission_error("late"), AdapterNotFoundError)
    shutil.copytree(adapters / "ad4", tmp_path / "late")
    assert cache.known("late") and cache.admission_error("late") is None
    row = cache.load("late", wait=20)
    assert row["tier"] == "host" and row["rank"] == 6
    assert cache.install_ready() == ["late"] and device.writes == [0]
    cache.close()


def test_named_sources_and_hub_refused_without_allow_hub(world):
    _, _, adapters, _ = world
    sources = AdapterSources(named={"mine": str(adapters / "ad1"), "remote": "org/name"}, allow_hub=False)
    assert sources.resolve("mine") == (adapters / "ad1").resolve()
    for name in ("org/name", "org/name@v1", "remote"):
        with pytest.raises(AdapterNotFoundError, match="--allow-hub"):
            sources.resolve(name)
    assert not sources.known("org/name") and AdapterSources(allow_hub=True).known("org/name@main")
    cache, _ = make_cache(world, sources=sources)
    with pytest.raises(AdapterNotFoundError, match="--allow-hub"):
        cache.load("org/name")
    cache.close()


HUB_SCRIPT = """
import json, sys, torch
from loraplex.adapter_cache.cache import AdapterCache
from loraplex.adapter_cache.peft_format import BaseShapes
from loraplex.adapter_cache.sources import AdapterSources
from loraplex.errors import AdapterNotFoundError
shapes = json.loads(sys.argv[1])
base = BaseShapes(shapes["name"], shapes["num_layers"], {k: tuple(v) for k, v in shapes["modules"].items()})
writes = []
cache = AdapterCache(AdapterSources(allow_hub=True), base, 16, torch.float32, 2, 4, 1 << 30,
                     lambda slot, w, r: writes.append((slot, r)))
rows = [cache.load(name, wait=30) for name in sys.argv[2:]]
installed = cache.install_ready()
try:
    cache.load("org/missing", wait=30)
    missing = None
except AdapterNotFoundError as exc:
    missing = exc.message
print(json.dumps({"rows": rows, "installed": installed, "writes": writes, "missing": missing}))
"""


def test_hub_source_from_offline_cache(world, tmp_path):
    _, _, adapters, shapes = world
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-lora"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(adapters / "ad2", repo / "snapshots" / commit)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    args = json.dumps({"name": shapes.name, "num_layers": shapes.num_layers, "modules": shapes.modules})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(HUB_SCRIPT), args, "org/tiny-lora", f"org/tiny-lora@{commit}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["tier"] for r in out["rows"]] == ["host", "host"] and out["rows"][0]["rank"] == 8
    assert out["installed"] == ["org/tiny-lora", f"org/tiny-lora@{commit}"]
    assert out["writes"] == [[0, 8], [1, 8]]
    assert "not in the local Hugging Face cache" in out["missing"] and "HF_HUB_OFFLINE" in out["missing"]


def test_runtime_control_list_and_stats(world, monkeypatch):
    gate = threading.Event()

    def gated(name, *args, **kwargs):
        if name == "ad6":
            gate.wait(20)
        return load_peft_adapter(name, *args, **kwargs)

    monkeypatch.setattr(cache_module, "load_peft_adapter", gated)
    cache, device = make_cache(world, num_slots=2, max_host=8)
    cache.load("ad0", pin=True, wait=20)
    assert cache.install_ready() == ["ad0"]
    make_resident(cache, "ad1")
    cache.pin("ad1")
    cache.pin("ad1")
    cache.load("ad2", wait=20)
    cache.request_load("ad6")  # stays loading until the gate opens
    rows = {r["name"]: r for r in cache.list()}
    assert rows["ad0"] | {"bytes": 0} == {
        "name": "ad0", "tier": "device", "slot": 0, "bytes": 0, "rank": 4, "pinned": 0, "held": True, "error": None
    }  # fmt: skip
    assert rows["ad0"]["bytes"] == load_peft_adapter("ad0", world[2] / "ad0", world[3], 16).num_bytes
    assert rows["ad1"]["tier"] == "device" and rows["ad1"]["pinned"] == 2
    assert rows["ad2"]["tier"] == "host" and rows["ad2"]["slot"] is None
    assert rows["ad6"]["tier"] == "loading" and rows["ad7"]["tier"] == "disk" and rows["ad7"]["bytes"] is None
    assert len(rows) == 8

    with pytest.raises(AdapterError, match="2 running request.*retry after they finish") as info:
        cache.unload("ad1")
    assert info.value.code == "adapter_in_use" and cache.slot_of("ad1") is not None
    cache.unpin("ad1")
    cache.unpin("ad1")
    assert cache.unload("ad1") and cache.slot_of("ad1") is None and not cache.unload("ad1")
    assert cache.install_ready() == ["ad2"] and device.clears == [1]  # freed slot zeroed, then refilled
    assert cache.unload("ad0") and cache.list()[0]["tier"] == "disk"
    gate.set()
    settle(cache)

    s = cache.stats()
    assert s["device"] == {
        "hits": 2,
        "misses": 4,
        "evictions": 0,
        "resident": 2,
        "bytes": s["device"]["bytes"],
        "slots": 2,
    }
    assert s["host"]["misses"] == 4 and s["host"]["resident"] == 2 and s["host"]["bytes"] > 0
    assert s["loads"] == 4 and s["load_failures"] == 0 and s["loading"] == 0 and s["held"] == 0
    assert s["load_seconds"]["count"] == 4 and s["load_seconds"]["p99"] >= s["load_seconds"]["p50"] > 0
    assert s["install_seconds"]["count"] == 4 and len(s["install_seconds"]["recent"]) == 4
    cache.close()


def test_writes_into_real_model_slots(world):
    _, base, adapters, shapes = world
    model, _ = load_model(base, torch.float32)
    model.allocate_lora_slots(2, 16)
    sources = AdapterSources(adapter_dir=adapters)
    cache = AdapterCache(
        sources, shapes, 16, torch.float32, 2, 4, 1 << 30, lambda s, w, r: write_lora_slot(model, s, w)
    )
    lin, i = model.lora_linear(1, "v_proj")
    slot1 = make_resident(cache, "ad1")
    a1, b1 = load_peft_adapter("ad1", adapters / "ad1", shapes, 16).weights[(1, "v_proj")]
    r = a1.shape[0]
    before = lin.lora_a[slot1].clone(), lin.lora_b[slot1].clone()
    torch.testing.assert_close(lin.lora_a[slot1, i, :r], a1)
    torch.testing.assert_close(lin.lora_b[slot1, lin.slice_offsets[i] : lin.slice_offsets[i + 1], :r], b1)
    assert lin.lora_a[slot1, i, r:].abs().sum() == 0  # smaller rank: zero-padded
    slot3 = make_resident(cache, "ad3")
    assert slot3 != slot1  # loading another adapter leaves ad1's slot untouched
    assert torch.equal(lin.lora_a[slot1], before[0]) and torch.equal(lin.lora_b[slot1], before[1])
    # The CPU row tables hold the same values as the slot buffers, for every module of every layer.
    for every in model.lora_linears():
        at, bt = row_tables(every.lora_a, every.lora_b, every.slice_offsets)
        assert torch.equal(every.lora_at, at) and all(torch.equal(x, y) for x, y in zip(every.lora_bt, bt, strict=True))
    assert lin.lora_at.any()
    cache.close()


def test_a_slot_rewritten_keeps_nothing_of_its_previous_adapter(world):
    """Every pair of the world's adapters (different ranks and targets): writing one into a slot that held
    the other leaves the same buffers and row tables as writing it into a fresh slot (lora_b and the A row
    table up to the slice ranks: tiny_models.live_slot_state)."""
    _, base, adapters, shapes = world
    loaded = {n: load_peft_adapter(n, adapters / n, shapes, 16).weights for n in NAMES[:4]}
    used, fresh = (load_model(base, torch.float32)[0] for _ in range(2))
    for model in (used, fresh):
        model.allocate_lora_slots(2, 16)
    for first in loaded:
        for second in loaded:
            if first == second:
                continue
            write_lora_slot(used, 1, loaded[first])
            write_lora_slot(used, 1, loaded[second])
            write_lora_slot(fresh, 1, loaded[second])
            for a, b in zip(live_slot_state(used), live_slot_state(fresh), strict=True):
                assert torch.equal(a, b), (first, second)
