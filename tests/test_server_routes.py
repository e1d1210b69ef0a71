"""Routes, request schemas and error mapping of the HTTP server, in-process against a fake engine
(tests/fake_engine.py implements the EngineClient protocol): no subprocess, no model, milliseconds.
The real server with the real engine is tested in test_server.py and test_lorax_api.py (marked slow).
"""

from __future__ import annotations

import json

import pytest
from fake_engine import FakeEngine, answer
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from loraplex.server.app import create_app
from loraplex.server.auth import KeyPolicy

MAX_BODY = 65536
ADMIN, TENANT = "sk-admin", "sk-tenant"


@pytest.fixture
def fake() -> FakeEngine:
    return FakeEngine()


def make_client(engine: FakeEngine | None, **kw) -> TestClient:
    app = create_app(engine, max_body_bytes=MAX_BODY, served_model_name="base", **kw)
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def client(fake: FakeEngine):
    with make_client(fake) as c:  # runs the lifespan: starts and finally stops the engine
        yield c
    assert fake.started and fake.stopped


def post(client: TestClient, path: str, body, content_type: str | None = None, key: str | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes | str):
        headers["Content-Type"] = content_type or "application/json"
        return client.post(path, content=body, headers=headers)
    return client.post(path, json=body, headers=headers)


def openai_error(r, status: int, param: str | None = "*") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param != "*":
        assert error["param"] == param, error
    return error


def sse_events(r) -> list:
    assert r.status_code == 200, r.text
    lines = [line[len("data: ") :] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    return [json.loads(line) for line in lines[:-1]]


def ids(text: str) -> list[int]:
    return FakeEngine().encode(text)


# ---- OpenAI routes -----------------------------------------------------------------------------------
def test_completion(client, fake):
    r = post(client, "/v1/completions", {"model": "a0", "prompt": "hello", "max_tokens": 6})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == "a0"
    assert body["choices"][0]["text"] == answer("a0", ids("hello"), 6)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 6,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    (submitted_ids, adapter, params) = fake.submitted[-1]
    assert submitted_ids == ids("hello") and adapter == "a0" and params.max_tokens == 6
    base = post(client, "/v1/completions", {"model": "base", "prompt": "hello", "max_tokens": 3}).json()
    assert base["choices"][0]["text"] == answer(None, ids("hello"), 3) and fake.submitted[-1][1] is None


def test_streamed_completion_and_usage(client):
    body = {"model": "a1", "prompt": "hi", "max_tokens": 5, "stream": True}
    body["stream_options"] = {"include_usage": True}
    events = sse_events(post(client, "/v1/completions", body))
    text = "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert text == answer("a1", ids("hi"), 5)
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert len({e["id"] for e in events}) == 1


def test_chat_and_stop(client, fake):
    messages = [{"role": "user", "content": "name a color"}]
    r = post(client, "/v1/chat/completions", {"model": "a0", "messages": messages, "max_tokens": 8})
    prompt = fake.chat_prompt(messages)
    choice = r.json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": answer("a0", prompt, 8)}
    full = answer("a0", prompt, 8)
    stop = full[3]
    r = post(client, "/v1/chat/completions", {"model": "a0", "messages": messages, "max_tokens": 8, "stop": stop})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == full[: full.index(stop)]
    events = sse_events(
        post(client, "/v1/chat/completions", {"model": "a0", "messages": messages, "max_tokens": 8, "stream": True})
    )
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == full


def test_logprobs_shapes(client):
    r = post(client, "/v1/completions", {"model": "a0", "prompt": "hi", "max_tokens": 3, "logprobs": 2})
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert all(len(top) == 2 for top in lp["top_logprobs"])
    body = {"model": "a0", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    r = post(client, "/v1/chat/completions", {**body, "logprobs": True, "top_logprobs": 3})
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2 and all(len(c["top_logprobs"]) == 3 for c in content)


def test_models_and_status(client, fake):
    fake.loaded.add("a1")
    cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
    assert set(cards) == {"base", "a0", "a1", "broken"} and cards["broken"]["tier"] == "failed"
    assert cards["a1"]["resident"] is True and cards["a0"]["tier"] == "disk"
    assert client.get("/v1/models/a1").json()["id"] == "a1"
    openai_error(client.get("/v1/models/nope"), 404)
    info = client.get("/info").json()
    assert info["max_model_len"] == 512 and info["kv_cache_blocks"] == 64 and info["model_id"] == "base"
    status = client.get("/v1/status").json()
    assert status["kv_cache"] == {"blocks_used": 5, "blocks_total": 64}
    assert status["adapters"]["resident"] == ["a1"]
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(client.get("/metrics").text)
        for s in family.samples
        if not s.labels
    }
    assert samples["loraplex_kv_cache_blocks_used"] == 5 and samples["loraplex_device_bytes"] == 4096


# ---- errors ------------------------------------------------------------------------------------------
BAD = [
    # (case, path, body, content type, status, param)
    ("malformed json", "/v1/completions", b'{"model": ', None, 400, "body"),
    ("body not an object", "/v1/completions", b"[1, 2]", None, 400, "body"),
    (
        "wrong type",
        "/v1/completions",
        {"model": "a0", "prompt": "hi", "max_tokens": "5"},
        None,
        400,
        "max_tokens",
    ),
    (
        "float max_tokens",
        "/v1/completions",
        {"model": "a0", "prompt": "hi", "max_tokens": 2.5},
        None,
        400,
        "max_tokens",
    ),
    (
        "negative max_tokens",
        "/v1/completions",
        {"model": "a0", "prompt": "hi", "max_tokens": -1},
        None,
        400,
        "max_tokens",
    ),
    (
        "temperature range",
        "/v1/completions",
        {"model": "a0", "prompt": "hi", "temperature": 2.5},
        None,
        400,
        "temperature",
    ),
    ("n too big", "/v1/completions", {"model": "a0", "prompt": "hi", "n": 1000}, None, 400, "n"),
    (
        "too many stops",
        "/v1/completions",
        {"model": "a0", "prompt": "hi", "stop": [f"s{i}" for i in range(40)]},
        None,
        400,
        "stop",
    ),
    ("prompt too long", "/v1/completions", {"model": "a0", "prompt": [5] * 600}, None, 400, "max_tokens"),
    (
        "max_tokens over ctx",
        "/v1/chat/completions",
        {"model": "a0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000},
        None,
        400,
        "max_tokens",
    ),
    ("bad prompt type", "/v1/completions", {"model": "a0", "prompt": {"x": 1}}, None, 400, "prompt"),
    ("messages type", "/v1/chat/completions", {"model": "a0", "messages": "hi"}, None, 400, "messages"),
    (
        "bad role",
        "/v1/chat/completions",
        {"model": "a0", "messages": [{"role": "wizard", "content": "x"}]},
        None,
        400,
        "messages[0].role",
    ),
    (
        "stream type",
        "/v1/chat/completions",
        {"model": "a0", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
        None,
        400,
        "stream",
    ),
    (
        "top_logprobs alone",
        "/v1/chat/completions",
        {"model": "a0", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        None,
        400,
        "top_logprobs",
    ),
    ("NaN", "/v1/completions", b'{"model": "a0", "prompt": "hi", "temperature": NaN}', None, 400, "body"),
    ("lone surrogate", "/v1/completions", b'{"model": "a0", "prompt": "a\\ud800"}', None, 400, "prompt"),
    ("deep nesting", "/v1/completions", b"[" * 50000, None, 400, "body"),
    ("unknown model", "/v1/completions", {"model": "no-such-adapter", "prompt": "hi"}, None, 404, "model"),
    ("path-like model", "/v1/completions", {"model": "../a0", "prompt": "hi"}, None, 404, "model"),
    (
        "absolute path model",
        "/v1/chat/completions",
        {"model": "/etc/passwd", "messages": [{"role": "user", "content": "x"}]},
        None,
        404,
        "model",
    ),
    ("model type", "/v1/completions", {"model": 7, "prompt": "hi"}, None, 400, "model"),
    (
        "huge body",
        "/v1/completions",
        b'{"model": "a0", "prompt": "' + b"x" * (4 * MAX_BODY) + b'"}',
        None,
        413,
        "*",
    ),
    ("wrong content type", "/v1/completions", b'{"model": "a0", "prompt": "hi"}', "text/plain", 415, "*"),
    (
        "form content type",
        "/v1/completions",
        b"model=a0&prompt=hi",
        "application/x-www-form-urlencoded",
        415,
        "*",
    ),
]


@pytest.mark.parametrize("case, path, body, ctype, status, param", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_errors(client, case, path, body, ctype, status, param):
    openai_error(post(client, path, body, ctype), status, param)


def test_adapter_and_generation_failures(fake):
    fake.fail_generation.add("a1")
    with make_client(fake) as client:
        r = post(client, "/v1/completions", {"model": "broken", "prompt": "hi", "max_tokens": 3})
        assert openai_error(r, 422)["code"] == "adapter_invalid"
        r = post(client, "/v1/completions", {"model": "broken", "prompt": "hi", "stream": True})
        openai_error(r, 422)
        r = post(client, "/v1/completions", {"model": "a1", "prompt": "hi", "max_tokens": 3})
        assert openai_error(r, 500)["code"] == "generation_failed"
        openai_error(client.get("/v1/nothing"), 404)
        openai_error(client.delete("/v1/completions"), 405)
        assert post(client, "/v1/completions", {"model": "a0", "prompt": "hi"}).status_code == 200


def test_queue_limit_and_not_ready(fake):
    fake.waiting = 3
    with make_client(fake, max_queue=4) as client:
        r = post(client, "/v1/completions", {"model": "a0", "prompt": "hi", "n": 2})
        assert openai_error(r, 429)["code"] == "queue_full" and r.headers["retry-after"] == "1"
        assert post(client, "/v1/completions", {"model": "a0", "prompt": "hi"}).status_code == 200
    with make_client(None) as client:  # no engine yet: 503 with Retry-After, /health still 200
        assert client.get("/health").status_code == 200
        assert client.get("/ready").status_code == 503
        r = post(client, "/v1/completions", {"model": "a0", "prompt": "hi"})
        assert openai_error(r, 503)["code"] == "model_loading" and r.headers["retry-after"] == "1"


def test_auth(fake):
    keys = {ADMIN: KeyPolicy(("*",), admin=True), TENANT: KeyPolicy(("a0",))}
    with make_client(fake, api_keys=keys) as client:
        body = {"model": "a0", "prompt": "hi", "max_tokens": 2}
        openai_error(post(client, "/v1/completions", body), 401)
        openai_error(post(client, "/v1/completions", body, key="sk-wrong"), 401)
        assert post(client, "/v1/completions", body, key=TENANT).status_code == 200
        # another tenant's adapter looks exactly like an unknown one
        a1 = openai_error(post(client, "/v1/completions", {**body, "model": "a1"}, key=TENANT), 404)
        nope = openai_error(post(client, "/v1/completions", {**body, "model": "zz"}, key=TENANT), 404)
        assert a1["code"] == nope["code"] == "model_not_found"
        listed = client.get("/v1/models", headers={"Authorization": f"Bearer {TENANT}"}).json()["data"]
        assert [m["id"] for m in listed] == ["a0"]
        load = {"lora_name": "new", "lora_path": "."}
        openai_error(post(client, "/v1/load_lora_adapter", load, key=TENANT), 403)


def test_load_and_unload_adapter(client, fake, tmp_path):
    (tmp_path / "new").mkdir()
    load = {"lora_name": "new", "lora_path": str(tmp_path / "new")}
    openai_error(post(client, "/v1/completions", {"model": "new", "prompt": "hi"}), 404)
    assert post(client, "/v1/load_lora_adapter", load).status_code == 200
    assert "new" in fake.loaded and "new" in fake.registered
    assert post(client, "/v1/completions", {"model": "new", "prompt": "hi"}).status_code == 200
    assert post(client, "/v1/load_lora_adapter", load).status_code == 200  # same path again: fine
    other = {"lora_name": "new", "lora_path": str(tmp_path)}  # another path: an in-place update
    r = post(client, "/v1/load_lora_adapter", other)
    assert r.status_code == 200 and r.headers["x-loraplex-adapter-version"] == "new#2", r.text
    openai_error(post(client, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"}), 400, "lora_path")
    openai_error(post(client, "/v1/load_lora_adapter", {"lora_name": "base", "lora_path": "."}), 400, "lora_name")
    openai_error(post(client, "/v1/load_lora_adapter", {"lora_name": "../x"}), 400, "lora_name")
    fake.in_use.add("new")
    assert openai_error(post(client, "/v1/unload_lora_adapter", {"lora_name": "new"}), 409)["code"] == "adapter_in_use"
    fake.in_use.clear()
    assert post(client, "/v1/unload_lora_adapter", {"lora_name": "new"}).status_code == 200
    assert "new" not in fake.adapters
    openai_error(post(client, "/v1/unload_lora_adapter", {"lora_name": "new"}), 404, "lora_name")


# ---- LoRAX / TGI routes ------------------------------------------------------------------------------
def test_lorax_routes(client):
    body = {"inputs": "hi", "parameters": {"adapter_id": "a0", "max_new_tokens": 4, "details": True}}
    (one,) = post(client, "/", {**body, "stream": False}).json()
    assert one == post(client, "/generate", body).json()
    assert one["generated_text"] == answer("a0", ids("hi"), 4)
    assert one["details"]["finish_reason"] == "length" and one["details"]["generated_tokens"] == 4
    r = post(client, "/", {**body, "stream": True})
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events) == one["generated_text"]
    assert events[-1]["details"]["generated_tokens"] == 4
    assert client.get("/").headers["content-type"].startswith("text/html")


def test_lorax_errors_are_tgi_bodies(client):
    def tgi(r, status: int, error_type: str | None):
        assert r.status_code == status, r.text
        assert isinstance(r.json()["error"], str) and r.json().get("error_type") == error_type, r.json()
        return r.json()

    assert tgi(post(client, "/", {"inputs": "hi", "parameters": {"best_of": 3}}), 400, "validation")["param"] == "parameters.best_of"
    assert tgi(post(client, "/generate", {"inputs": "hi", "parameters": {"adapter_id": "zz"}}), 404, None)["param"] == "model"
    tgi(post(client, "/generate_stream", {"inputs": ""}), 400, "validation")
    tgi(post(client, "/generate", {"inputs": "hi", "parameters": {"adapter_id": "broken"}}), 422, None)


# ---- prefix caching ----------------------------------------------------------------------------------
def test_cached_tokens_in_usage_completions_chat_and_stream(client, fake):
    system = "you are a terse assistant for tenant zero. " * 2  # 86 characters = 86 fake tokens
    first = post(client, "/v1/completions", {"model": "a0", "prompt": system + "one", "max_tokens": 3}).json()
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    second = post(client, "/v1/completions", {"model": "a0", "prompt": system + "two", "max_tokens": 3}).json()
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": 80}  # 5 whole blocks of 16
    other = post(client, "/v1/completions", {"model": "a1", "prompt": system + "two", "max_tokens": 3}).json()
    assert other["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}  # another adapter: no reuse
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    post(client, "/v1/chat/completions", {"model": "a1", "messages": messages, "max_tokens": 2})
    messages[-1]["content"] = "hello"
    chat = post(client, "/v1/chat/completions", {"model": "a1", "messages": messages, "max_tokens": 2}).json()
    n = len(fake.chat_prompt(messages))
    assert chat["usage"]["prompt_tokens"] == n and chat["usage"]["prompt_tokens_details"]["cached_tokens"] == 96
    body = {"model": "a1", "messages": messages, "max_tokens": 2, "stream": True}
    body["stream_options"] = {"include_usage": True}
    events = sse_events(post(client, "/v1/chat/completions", body))
    assert events[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16}
    status = client.get("/v1/status").json()["prefix_cache"]
    assert status["hit_tokens"] == fake.prefix_hits and 0 < status["hit_rate"] < 1
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    assert families["loraplex_prefix_cache_hits"].samples[0].value == fake.prefix_hits
    assert families["loraplex_prefix_cache_queries"].samples[0].value == fake.prefix_queries
    assert "loraplex_prefix_cache_blocks" in families and "loraplex_prefix_cache_evictions" in families
