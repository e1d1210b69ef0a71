"""Aliases over HTTP, in-process against the fake engine (tests/fake_engine.py): the admin endpoints,
routing and its visibility (headers, system_fingerprint, /v1/models, per-version metrics), the
routes file's reload and its edge cases, tenant allow-lists, shadow runs and in-place updates.
The real engine behind the same routes is tested in test_adapter_versions.py and test_lifecycle_load.py."""

from __future__ import annotations

import json
import time

import pytest
from fake_engine import FakeEngine, answer
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from loraplex.server.app import create_app
from loraplex.server.auth import KeyPolicy
from loraplex.server.shadow import ShadowStats

ADMIN, SUPPORT, OTHER = "sk-admin", "sk-support", "sk-other"
ADAPTERS = {n: f"/adapters/{n}" for n in ("support-v7", "support-v8", "support-v9", "legal-v1", "ab", "ba", "ac")}
ROUTE = {"versions": {"support-v7": 90, "support-v8": 10}}


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine(adapters=dict(ADAPTERS))


def client_for(engine: FakeEngine, **kw) -> TestClient:
    return TestClient(create_app(engine, served_model_name="base", **kw), raise_server_exceptions=False)


@pytest.fixture
def client(fake):
    with client_for(fake) as c:
        yield c


def ids(text: str) -> list[int]:
    return FakeEngine().encode(text)


def put(client, alias, body, key=None):
    return client.put(f"/v1/routes/{alias}", json=body, headers=_auth(key))


def _auth(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


def complete(client, model, prompt="hello", key=None, **extra):
    headers = {**_auth(key), **extra.pop("headers", {})}
    return client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 6, **extra}, headers=headers)


def error_of(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()["error"]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached")


# ---- admin endpoints and routing ---------------------------------------------------------------------
def test_put_get_delete_and_route(client, fake):
    assert client.get("/v1/routes").json() == {"object": "list", "data": []}
    r = put(client, "support", ROUTE)
    assert r.status_code == 201 and r.json()["split"] == {"support-v7": 90.0, "support-v8": 10.0}
    assert put(client, "support", ROUTE).status_code == 200  # replacing is 200
    (listed,) = client.get("/v1/routes").json()["data"]
    assert listed == {"alias": "support", **ROUTE, "split": {"support-v7": 90.0, "support-v8": 10.0}}
    served = {}
    for i in range(60):
        r = complete(client, "support", user=f"user-{i}")
        body = r.json()
        version = r.headers["x-loraplex-adapter-version"]
        assert body["model"] == "support" and body["system_fingerprint"] == version
        assert body["choices"][0]["text"] == answer(version, ids("hello"), 6)  # really served by it
        served[f"user-{i}"] = version
    assert set(served.values()) == {"support-v7", "support-v8"}
    # sticky: the same user, and the same subject through the header, get the same version again
    for user, version in list(served.items())[:20]:
        assert complete(client, "support", user=user).headers["x-loraplex-adapter-version"] == version
        r = complete(client, "support", headers={"X-Loraplex-Subject": user})
        assert r.headers["x-loraplex-adapter-version"] == version
    # promotion is one weights change; rollback another
    assert put(client, "support", {"versions": {"support-v7": 0, "support-v8": 100}}).status_code == 200
    assert {complete(client, "support", user=u).headers["x-loraplex-adapter-version"] for u in served} == {"support-v8"}
    assert put(client, "support", {"versions": {"support-v7": 100, "support-v8": 0}}).status_code == 200
    assert {complete(client, "support", user=u).headers["x-loraplex-adapter-version"] for u in served} == {"support-v7"}
    assert client.delete("/v1/routes/support").json() == {"alias": "support", "deleted": True}
    error_of(client.delete("/v1/routes/support"), 404)
    error_of(complete(client, "support"), 404)


def test_route_to_missing_adapter_is_refused_when_set(client):
    err = error_of(put(client, "support", {"versions": {"support-v7": 50, "support-v77": 50}}), 400)
    assert err["code"] == "invalid_route" and "support-v77" in err["message"] and "unknown adapter" in err["message"]
    err = error_of(put(client, "support", {"versions": {"support-v7": 1}, "shadow": {"version": "nope", "fraction": 0.5}}), 400)
    assert "nope" in err["message"]
    err = error_of(put(client, "base", ROUTE), 400)
    assert "base model" in err["message"]
    assert put(client, "support", ROUTE).status_code == 201
    err = error_of(put(client, "support-v8", {"versions": {"support-v7": 1}}), 400)  # would hide a version
    assert "is a version in the route(s) support" in err["message"]
    err = error_of(put(client, "legal", {"versions": {"support": 1}}), 400)
    assert "'support' is an alias" in err["message"]
    assert client.delete("/v1/routes/support").status_code == 200
    error_of(put(client, "support", {"versions": {"support-v7": "a lot"}}), 400)
    error_of(client.put("/v1/routes/support", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert client.get("/v1/routes").json()["data"] == []  # nothing half-applied


def test_streaming_chat_and_lorax_say_the_version(client):
    put(client, "support", {"versions": {"support-v8": 1}})
    r = client.post("/v1/chat/completions", json={"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    assert r.headers["x-loraplex-adapter-version"] == "support-v8"
    chunks = [json.loads(x[6:]) for x in r.text.splitlines() if x.startswith("data: {")]
    assert chunks and all(c["system_fingerprint"] == "support-v8" and c["model"] == "support" for c in chunks)
    r = client.post("/v1/chat/completions", json={"model": "support", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.json()["system_fingerprint"] == "support-v8"
    r = client.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "support", "max_new_tokens": 3}})
    assert r.status_code == 200 and r.headers["x-loraplex-adapter-version"] == "support-v8"
    assert r.json()["generated_text"] == answer("support-v8", ids("hi"), 3)
    r = complete(client, "base")
    assert r.headers["x-loraplex-adapter-version"] == "base" and r.json()["system_fingerprint"] == "base"


def test_models_lists_aliases_with_their_split(client):
    put(client, "support", {**ROUTE, "shadow": {"version": "support-v9", "fraction": 0.25}})
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert cards["support"]["tier"] == "alias" and cards["support"]["split"] == {"support-v7": 90.0, "support-v8": 10.0}
    assert cards["support"]["shadow"] == {"version": "support-v9", "fraction": 0.25}
    assert cards["support-v7"]["version"] == "support-v7"
    assert client.get("/v1/models/support").json()["split"] == cards["support"]["split"]


def test_per_version_metrics(client):
    put(client, "support", {"versions": {"support-v7": 1, "support-v8": 1}})
    seen = [complete(client, "support", user=f"u{i}").headers["x-loraplex-adapter-version"] for i in range(12)]
    complete(client, "legal-v1")
    samples = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    for version in ("support-v7", "support-v8"):
        n = seen.count(version)
        assert samples[("loraplex_version_requests_total", (("model", "support"), ("status", "200"), ("version", version)))] == n
        assert samples[("loraplex_version_generation_tokens_total", (("model", "support"), ("version", version)))] == 6 * n
        assert samples[("loraplex_version_e2e_request_latency_seconds_count", (("model", "support"), ("version", version)))] == n
    assert samples[("loraplex_requests_total", (("adapter", "support"), ("endpoint", "completions"), ("status", "200")))] == 12
    assert samples[("loraplex_version_requests_total", (("model", "legal-v1"), ("status", "200"), ("version", "legal-v1")))] == 1


def test_unloading_a_routed_version_is_refused(client):
    put(client, "support", ROUTE)
    err = error_of(client.post("/v1/unload_lora_adapter", json={"lora_name": "support-v8"}), 409)
    assert err["code"] == "adapter_in_route" and "support" in err["message"]


# ---- the routes file -------------------------------------------------------------------------------
def test_routes_file_reload_and_edge_cases(fake, tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text("support:\n  versions: {support-v7: 100}\n")
    with client_for(fake, routes_file=str(path), routes_poll_seconds=0.02) as client:
        wait_for(lambda: client.get("/v1/routes").json()["data"])
        assert complete(client, "support").headers["x-loraplex-adapter-version"] == "support-v7"
        loaded = client.get("/v1/routes").json()["file"]
        assert loaded["error"] is None and loaded["path"] == str(path)

        path.write_text("support:\n  versions: {support-v8: 100}\n")  # a change is picked up
        wait_for(lambda: complete(client, "support").headers["x-loraplex-adapter-version"] == "support-v8")

        path.write_text("support: {versions: [unclosed\n")  # malformed: rejected, old routes kept
        wait_for(lambda: client.get("/v1/routes").json()["file"]["error"] is not None)
        assert "not valid YAML" in client.get("/v1/routes").json()["file"]["error"]
        assert complete(client, "support").headers["x-loraplex-adapter-version"] == "support-v8"

        path.write_text("support:\n  versions: {support-v8: 50, support-v99: 50}\n")  # a missing adapter
        wait_for(lambda: "support-v99" in (client.get("/v1/routes").json()["file"]["error"] or ""))
        error = client.get("/v1/routes").json()["file"]["error"]
        assert "version 'support-v99' cannot serve" in error and "unknown adapter" in error
        assert all(complete(client, "support", user=f"u{i}").status_code == 200 for i in range(10))

        path.write_text("support:\n  versions: {support-v7: 100}\nlegal:\n  versions: {legal-v1: 1}\n")
        wait_for(lambda: client.get("/v1/routes").json()["file"]["error"] is None)
        assert [r["alias"] for r in client.get("/v1/routes").json()["data"]] == ["legal", "support"]


def test_stickiness_holds_across_file_reloads(fake, tmp_path):
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"support": {"versions": {"support-v7": 50, "support-v8": 50}}}))
    with client_for(fake, routes_file=str(path), routes_poll_seconds=0.02) as client:
        wait_for(lambda: client.get("/v1/routes").json()["data"])
        before = {u: complete(client, "support", user=u).headers["x-loraplex-adapter-version"] for u in map(str, range(40))}
        path.write_text(json.dumps({"support": {"versions": {"support-v8": 50, "support-v7": 50}}, "legal": {"versions": {"legal-v1": 1}}}))
        wait_for(lambda: len(client.get("/v1/routes").json()["data"]) == 2)
        after = {u: complete(client, "support", user=u).headers["x-loraplex-adapter-version"] for u in before}
        assert after == before and len(set(before.values())) == 2


def test_routes_file_caught_half_written_is_not_loaded(fake, tmp_path):
    """A writer that truncates then writes (write_text) can be read in between: a content is acted on
    only when two polls in a row read it the same, so the empty in-between file never clears the routes."""
    path = tmp_path / "routes.yaml"
    path.write_text("support:\n  versions: {support-v7: 100}\n")
    with client_for(fake, routes_file=str(path), routes_poll_seconds=3600) as client:  # polls by hand below
        wait_for(lambda: client.get("/v1/routes").json()["data"])  # the first read acts at once
        state = client.app.state.loraplex
        watcher = state.routes_file
        path.write_text("")  # caught mid-write: not loaded
        assert watcher.read_if_changed(state) is None
        path.write_text("support:\n  versions: {support-v8: 100}\n")  # the writer finishes
        assert watcher.read_if_changed(state) is None  # changed since the previous poll: not yet
        table = watcher.read_if_changed(state)  # read the same twice: loaded
        assert table is not None and table.to_json()["support"]["versions"] == {"support-v8": 100}
        assert watcher.read_if_changed(state) is None and watcher.error is None


# ---- tenants ----------------------------------------------------------------------------------------
def test_tenant_allow_lists_apply_to_aliases(fake):
    keys = {ADMIN: KeyPolicy(("*",), admin=True), SUPPORT: KeyPolicy(("support",)), OTHER: KeyPolicy(("legal", "support-v8"))}
    with client_for(fake, api_keys=keys) as client:
        error_of(put(client, "support", ROUTE, key=SUPPORT), 403)
        assert put(client, "support", {**ROUTE, "shadow": {"version": "support-v9", "fraction": 0.5}}, key=ADMIN).status_code == 201
        assert put(client, "legal", {"versions": {"legal-v1": 1}}, key=ADMIN).status_code == 201
        # the alias is served, its versions by name are not (same 404 as an unknown model)
        for i in range(10):
            assert complete(client, "support", key=SUPPORT, user=f"u{i}").status_code == 200
        assert error_of(complete(client, "support-v8", key=SUPPORT), 404)["code"] == "model_not_found"
        error_of(complete(client, "legal", key=SUPPORT), 404)
        assert complete(client, "support-v8", key=OTHER).status_code == 200  # allowed by name
        error_of(complete(client, "support", key=OTHER), 404)
        # never sees other tenants' routes
        assert [r["alias"] for r in client.get("/v1/routes", headers=_auth(SUPPORT)).json()["data"]] == ["support"]
        assert "file" not in client.get("/v1/routes", headers=_auth(SUPPORT)).json()
        assert [r["alias"] for r in client.get("/v1/routes", headers=_auth(OTHER)).json()["data"]] == ["legal"]
        models = {c["id"] for c in client.get("/v1/models", headers=_auth(SUPPORT)).json()["data"]}
        assert models == {"support"}
        assert client.get("/v1/routes/support/shadow", headers=_auth(SUPPORT)).status_code == 200
        error_of(client.get("/v1/routes/support/shadow", headers=_auth(OTHER)), 404)
        error_of(client.delete("/v1/routes/legal", headers=_auth(OTHER)), 403)


# ---- shadow ------------------------------------------------------------------------------------------
def test_shadow_runs_at_background_priority_and_never_change_the_primary(fake):
    """'ab' and 'ba' answer alike in the fake (same letters), 'ac' never does: one alias shadowed by
    each gives exact-match rates of exactly 1 and 0, and the primaries equal their unshadowed answers."""
    with client_for(fake) as client:
        put(client, "same", {"versions": {"ab": 1}, "shadow": {"version": "ba", "fraction": 1.0}})
        put(client, "diff", {"versions": {"ab": 1}, "shadow": {"version": "ac", "fraction": 1.0}})
        prompts = ["hello", "what is it", "x", "a longer prompt here"]
        for alias in ("same", "diff"):
            for p in prompts:
                r = complete(client, alias, p, max_tokens=5 + len(p) % 4)
                assert r.json()["choices"][0]["text"] == answer("ab", ids(p), 5 + len(p) % 4)
        wait_for(lambda: client.get("/v1/routes/diff/shadow").json()["candidates"].get("ac", {}).get("pairs") == 4)
        wait_for(lambda: client.get("/v1/routes/same/shadow").json()["candidates"].get("ba", {}).get("pairs") == 4)
        same = client.get("/v1/routes/same/shadow").json()
        assert same["shadow"] == {"version": "ba", "fraction": 1.0}
        figures = same["candidates"]["ba"]
        assert figures["exact_match_rate"] == 1.0 and figures["mean_abs_length_diff_tokens"] == 0
        assert figures["errors"] == figures["dropped"] == 0 and figures["candidate_latency_seconds"]["p50"] > 0
        diff = client.get("/v1/routes/diff/shadow").json()["candidates"]["ac"]
        assert diff["exact_match_rate"] == 0.0 and diff["exact_matches"] == 0
        metrics = client.get("/metrics").text
        assert 'loraplex_shadow_pairs_total{alias="same",candidate="ba"} 4.0' in metrics
        assert 'loraplex_shadow_exact_matches_total{alias="diff",candidate="ac"} 0.0' in metrics
    shadow_priorities = [p for (_, adapter, _), p in zip(fake.submitted, fake.priorities, strict=True) if adapter in ("ba", "ac")]
    primary_priorities = [p for (_, adapter, _), p in zip(fake.submitted, fake.priorities, strict=True) if adapter == "ab"]
    assert shadow_priorities == [1] * 8 and primary_priorities == [0] * 8


def test_shadow_stats_figures():
    stats = ShadowStats()
    stats.add(('{"a": 1}', 5, 0.1), ('{"a": 1}', 5, 0.2))  # exact, both JSON
    stats.add(('{"a": 1}', 5, 0.1), ('{"a": 2', 7, 0.4))  # primary JSON, candidate not
    stats.add(("plain", 3, 0.1), ("other", 2, 0.3))  # not JSON
    out = stats.to_json()
    assert out["pairs"] == 3 and out["exact_matches"] == 1 and out["exact_match_rate"] == pytest.approx(1 / 3)
    assert out["mean_length_diff_tokens"] == pytest.approx((0 + 2 - 1) / 3)
    assert out["mean_abs_length_diff_tokens"] == pytest.approx((0 + 2 + 1) / 3)
    assert out["json"] == {"pairs": 2, "both_parse": 1, "both_parse_rate": 0.5}
    assert out["candidate_latency_seconds"]["mean"] == pytest.approx(0.3)
    assert out["candidate_latency_seconds"]["p50"] == pytest.approx(0.3)


# ---- in-place updates -------------------------------------------------------------------------------
def test_in_place_update_over_http(client, fake, tmp_path):
    (tmp_path / "v2").mkdir()
    (tmp_path / "broken").mkdir()
    before = complete(client, "legal-v1")
    assert before.headers["x-loraplex-adapter-version"] == "legal-v1"
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "legal-v1", "lora_path": str(tmp_path / "v2")})
    assert r.status_code == 200 and r.headers["x-loraplex-adapter-version"] == "legal-v1#2"
    after = complete(client, "legal-v1")
    assert after.headers["x-loraplex-adapter-version"] == "legal-v1#2"
    assert after.json()["choices"][0]["text"] == answer("legal-v1#2", ids("hello"), 6) != before.json()["choices"][0]["text"]
    bad = client.post("/v1/load_lora_adapter", json={"lora_name": "legal-v1", "lora_path": str(tmp_path / "broken")})
    assert bad.status_code == 422
    assert complete(client, "legal-v1").headers["x-loraplex-adapter-version"] == "legal-v1#2"  # still serving
    card = client.get("/v1/models/legal-v1").json()
    assert card["version"] == "legal-v1#2"
