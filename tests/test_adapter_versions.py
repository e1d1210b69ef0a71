"""Adapter versions with the real engine on a tiny model: an in-place update while requests are in
flight (old requests finish on the old weights, new ones get the new weights, the old slot is freed
after), a failed update that keeps the old version, and shadow runs through the HTTP app whose
primaries equal their references and whose comparison figures match a case with a known answer.
References are Engine.generate of each version alone, in a separate engine."""

from __future__ import annotations

import time

import pytest
from server_fixtures import make_world
from starlette.testclient import TestClient
from tiny_models import save_peft_adapter

from loraplex.adapter_cache.versions import AdapterVersions
from loraplex.config import Config
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import Engine
from loraplex.errors import AdapterError
from loraplex.scheduler.sampling_params import SamplingParams
from loraplex.server.app import create_app

PROMPTS = ["hello world", "What is the capital of France?", "the quick brown fox", "Name a color:", "red, green"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    base, adapters = make_world(root, 2)
    new = save_peft_adapter(base, root / "legal-new", 8, 16, "all-linear", False, seed=777)
    broken = root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    return base, adapters, new, broken


def make_engine(world, adapters) -> Engine:
    base = world[0]
    return Engine(
        Config(model=str(base), adapters=tuple(adapters.items()), dtype="float32", max_lora_rank=16, max_active_adapters=4)
    )


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)


def test_versions_bookkeeping():
    v = AdapterVersions()
    assert v.acquire("x") == "x"
    key = v.new_key("x")
    assert key == "x#2" and v.current("x") == "x"
    assert v.switch("x", key) is None  # "x" still has a request: retired, not freed
    assert v.acquire("x") == "x#2" and v.retired_of("x") == ["x"]
    assert v.release("x") is True  # its last request: free it now
    assert v.release("x#2") is False and v.retired_of("x") == []
    assert v.switch("x", v.new_key("x")) == "x#2"  # idle: freed at once
    assert v.current("x") == "x#3" and v.forget("x") == ["x#3"] and v.current("x") == "x"


def test_in_place_update_keeps_in_flight_requests_on_their_version(world):
    base, adapters, new, broken = world
    ref = make_engine(world, {"old": str(adapters / "a0"), "new": str(new)})
    ref_old = [r.token_ids for r in ref.generate(PROMPTS, "old", greedy(12))]
    ref_new = [r.token_ids for r in ref.generate(PROMPTS, "new", greedy(12))]
    assert ref_old != ref_new

    engine = make_engine(world, {"legal": str(adapters / "a0")})
    tokens: dict[str, list[int]] = {}
    versions: dict[str, set[str]] = {}

    def collect(outputs):
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            versions.setdefault(out.request_id, set()).add(out.adapter_version)

    for i, p in enumerate(PROMPTS):
        engine.add_request(p, "legal", greedy(12), f"old-{i}")
    for _ in range(3):
        collect(engine.step())
    assert engine.adapter_cache.slot_of("legal") is not None

    version = engine.update_adapter("legal", str(new), timeout=60)
    assert version == "legal#2" and engine.versions.current("legal") == "legal#2"
    for i, p in enumerate(PROMPTS):
        engine.add_request(p, "legal", greedy(12), f"new-{i}")
    rows = {r["name"]: r for r in engine.adapter_cache.list()}
    assert rows["legal"]["tier"] == "device" and rows["legal"]["pinned"] > 0  # still serving the old ones
    (row,) = AsyncEngine(engine).list_adapters()
    assert (row.name, row.version, row.retiring) == ("legal", "legal#2", ("legal",))
    with pytest.raises(AdapterError, match="still finish requests") as refused:
        AsyncEngine(engine).unload_adapter("legal")  # the old version is still in use
    assert refused.value.code == "adapter_in_use"
    while engine.has_work():
        collect(engine.step())

    for i in range(len(PROMPTS)):
        assert tokens[f"old-{i}"] == ref_old[i] and versions[f"old-{i}"] == {"legal"}
        assert tokens[f"new-{i}"] == ref_new[i] and versions[f"new-{i}"] == {"legal#2"}
    rows = {r["name"]: r for r in engine.adapter_cache.list()}
    assert "legal" not in rows or rows["legal"]["tier"] == "disk"  # the old version's slot and host copy are gone
    assert rows["legal#2"]["tier"] == "device"

    with pytest.raises(AdapterError, match="cannot parse adapter_config.json") as refused:
        engine.update_adapter("legal", str(broken), timeout=60)
    assert "adapter 'legal': the update was refused, version 'legal#2' keeps serving" in refused.value.message
    assert engine.versions.current("legal") == "legal#2"  # the failed update left the new version serving
    (again,) = engine.generate([PROMPTS[0]], "legal", greedy(12))
    assert again.token_ids == ref_new[0]
    assert engine.update_adapter("legal", str(new), timeout=60) == "legal#2"  # same path: nothing new


def test_shadow_through_the_app_with_the_real_engine(world):
    """Alias `same` is shadowed by a copy of its own weights under another name (every pair must
    match) and `diff` by another adapter (the exact-match rate and length difference are those of the
    references). Every primary equals its reference."""
    base, adapters, new, broken = world
    names = {"a0": str(adapters / "a0"), "a0-copy": str(adapters / "a0"), "a1": str(adapters / "a1")}
    ref = make_engine(world, names)
    max_tokens = [1, 2, 3, 6, 9]
    refs = {
        name: [ref.generate([p], name, SamplingParams(max_tokens=m))[0] for p, m in zip(PROMPTS, max_tokens, strict=True)]
        for name in ("a0", "a1")
    }
    aengine = AsyncEngine(make_engine(world, names))
    app = create_app(aengine, served_model_name="tiny-base")
    with TestClient(app) as client:
        for alias, candidate in (("same", "a0-copy"), ("diff", "a1")):
            body = {"versions": {"a0": 1}, "shadow": {"version": candidate, "fraction": 1.0}}
            assert client.put(f"/v1/routes/{alias}", json=body).status_code == 201
            for i, (p, m) in enumerate(zip(PROMPTS, max_tokens, strict=True)):
                r = client.post("/v1/completions", json={"model": alias, "prompt": p, "max_tokens": m, "temperature": 0})
                assert r.json()["choices"][0]["text"] == refs["a0"][i].text, (alias, i)
                assert r.headers["x-loraplex-adapter-version"] == "a0"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            got = [client.get(f"/v1/routes/{a}/shadow").json()["candidates"] for a in ("same", "diff")]
            if got[0].get("a0-copy", {}).get("pairs") == 5 and got[1].get("a1", {}).get("pairs") == 5:
                break
            time.sleep(0.05)
        same, diff = got[0]["a0-copy"], got[1]["a1"]
    n = len(PROMPTS)
    assert same["exact_match_rate"] == 1.0 and same["mean_abs_length_diff_tokens"] == 0 and same["errors"] == 0
    expected_rate = sum(a.text == b.text for a, b in zip(refs["a0"], refs["a1"], strict=True)) / n
    expected_diff = sum(len(b.token_ids) - len(a.token_ids) for a, b in zip(refs["a0"], refs["a1"], strict=True)) / n
    assert diff["exact_match_rate"] == pytest.approx(expected_rate) and diff["pairs"] == n
    assert diff["mean_length_diff_tokens"] == pytest.approx(expected_diff)
