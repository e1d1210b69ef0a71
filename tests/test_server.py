"""The HTTP server as users meet it: a real `loraplex serve` process (uvicorn on 127.0.0.1) with a tiny
Llama model that has a tokenizer and chat template, and 16 real PEFT adapters in an adapter dir,
driven by the official `openai` client and raw httpx. Greedy outputs are compared with
Engine.generate in this process.

Two server processes: `server` (auth on, 8 device slots for 16 adapters, small body limit) for almost
everything, and `plain_server` (no auth, --max-queue 4) for the queue limit and, last, SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_fixtures import free_port, make_world, start_server, wait_ready

from loraplex.config import Config
from loraplex.engine.engine import Engine
from loraplex.scheduler.sampling_params import SamplingParams

pytestmark = pytest.mark.slow  # a real `loraplex serve` subprocess (integration)

NUM_ADAPTERS = 16
BASE = "tiny-base"
ADMIN = "sk-admin-0123"
TENANT_A = "sk-tenant-a"  # a0, a1, a10..a15
TENANT_B = "sk-tenant-b"  # a2, a3 and the base model
MAX_BODY = 65536
PROMPTS = ["hello world", "What is the capital of France?", "the quick brown fox", "Name a color:"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    base, adapters = make_world(root, NUM_ADAPTERS)
    # a1 ships its own chat template (as a fine-tune with its own prompt format would)
    (adapters / "a1" / "chat_template.jinja").write_text(OWN_TEMPLATE)
    (adapters / "broken").mkdir()  # discovered like any adapter; its load fails (422)
    (adapters / "broken" / "adapter_config.json").write_text("{not json")
    keys = root / "keys.json"
    keys.write_text(
        json.dumps(
            {
                TENANT_A: {"adapters": ["a0", "a1", "a1?"]},
                TENANT_B: {"adapters": ["a2", "a3", BASE], "admin": False},
            }
        )
    )
    return root, base, adapters, keys


@pytest.fixture(scope="module")
def servers(world):
    """Both processes start together (their engines build in parallel); each is checked to answer
    /health at once while /ready is 503 until its engine is built."""
    root, base, adapters, keys = world
    common = [
        "--model",
        str(base),
        "--served-model-name",
        BASE,
        "--adapter-dir",
        str(adapters),
        "--dtype",
        "float32",
    ]
    common += ["--max-lora-rank", "16", "--kv-cache-gib", "0.05"]
    main = start_server(
        [
            *common,
            "--max-active-adapters",
            "8",
            "--max-body-bytes",
            str(MAX_BODY),
            "--api-keys-file",
            str(keys),
        ],
        root / "server.log",
        env={"LORAPLEX_API_KEY": ADMIN},
    )
    plain = start_server([*common, "--max-queue", "4", "--shutdown-grace-seconds", "30"], root / "plain.log")
    seen = {"main": wait_ready(main), "plain": wait_ready(plain)}
    yield main, plain, seen
    for s in (main, plain):
        s.terminate()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def plain_server(servers):
    return servers[1]


@pytest.fixture(scope="module")
def engine(world):
    _, base, adapters, _ = world
    return Engine(
        Config(
            model=str(base),
            adapter_dir=str(adapters),
            dtype="float32",
            max_lora_rank=16,
            max_active_adapters=16,
        )
    )


def reference(engine, prompts, adapters, max_tokens=12, **kw) -> list[str]:
    """Greedy texts from Engine.generate in this process (None / BASE = the base model)."""
    adapters = [None if a in (None, BASE) else a for a in adapters]
    results = engine.generate(prompts, adapters, SamplingParams(max_tokens=max_tokens, **kw))
    return [r.text for r in results]


OWN_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}[assistant]"


def chat_ids(engine, text):
    return engine.chat_prompt([{"role": "user", "content": text}])


def client(server, key=ADMIN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def post(server, path, body, key=ADMIN, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes | str):
        headers["Content-Type"] = kw.pop("content_type", "application/json")
        return httpx.post(server.url + path, content=body, headers=headers, timeout=60, **kw)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


def metrics(server) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(snapshot, name, **labels) -> float:
    return snapshot.get((name, frozenset(labels.items())), 0.0)


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "*") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param != "*":
        assert error["param"] == param, error
    return error


# ---- startup, listing --------------------------------------------------------------------------
def test_health_answers_at_once_and_ready_waits_for_the_engine(servers):
    _, _, seen = servers
    assert seen["main"] == [503, 200] and seen["plain"] == [503, 200]


def test_ready_is_503_while_loading_and_while_draining():
    from starlette.testclient import TestClient

    from loraplex.server.app import create_app

    app = create_app(None)  # no engine yet
    with TestClient(app) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/ready")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert (
            assert_openai_error(c.post("/v1/completions", json={"prompt": "x"}), 503)["code"]
            == "model_loading"
        )
        app.state.loraplex.begin_drain()
        assert c.get("/ready").json()["status"] == "draining"
        assert assert_openai_error(c.post("/v1/completions", json={"prompt": "x"}), 503)["code"] == "draining"


@pytest.mark.parametrize(
    "text",
    [
        "[1]",
        "{not json",
        '{"k": {"adapters": "a1"}}',
        '{"k": {"admin": "yes"}}',
        '{"k": {"extra": 1}}',
        '{" k": {}}',
    ],
)
def test_keys_file_mistakes_are_config_errors(tmp_path, text):
    from loraplex.errors import ConfigError
    from loraplex.server.auth import parse_keys_file

    (tmp_path / "keys.json").write_text(text)
    with pytest.raises(ConfigError):
        parse_keys_file(tmp_path / "keys.json")


def test_engine_that_fails_to_build_exits_1(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "loraplex.cli",
        "serve",
        "--model",
        str(tmp_path / "missing"),
        "--port",
        str(free_port()),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "building the engine failed" in done.stdout + done.stderr


def test_server_package_never_imports_torch():
    code = (
        "import sys, loraplex.cli, loraplex.server.app; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_models_lists_base_and_every_adapter(server):
    models = {m.id: m for m in client(server).models.list().data}
    names = {f"a{i}" for i in range(NUM_ADAPTERS)}
    assert {BASE, "broken"} | names == set(models)
    assert models[BASE].parent is None and models[BASE].resident is True
    for name in names:
        assert models[name].parent == BASE and isinstance(models[name].resident, bool)
    assert client(server).models.retrieve("a3").id == "a3"


# ---- generation equals the engine ------------------------------------------------------------------
@pytest.mark.parametrize("model", [BASE, "a0", "a5", "a9"])
def test_completions_and_chat_equal_engine_generate(server, engine, model):
    c = client(server)
    prompt = PROMPTS[1]
    (ref,) = reference(engine, [prompt], [model])
    (chat_ref,) = reference(engine, [chat_ids(engine, prompt)], [model])
    r = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == ref and r.model == model and r.id.startswith("cmpl-")
    assert 1 <= r.usage.completion_tokens <= 12
    stream = c.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == ref
    r = c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=12, temperature=0
    )
    assert r.choices[0].message.content == chat_ref and r.id.startswith("chatcmpl-")
    assert r.usage.prompt_tokens == len(chat_ids(engine, prompt))
    chunks = list(
        c.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat_ref
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == r.usage.total_tokens


def test_completion_options(server, engine):
    c = client(server)
    refs = reference(engine, PROMPTS[:2], ["a1", "a1"], max_tokens=6, ignore_eos=True)
    r = c.completions.create(
        model="a1", prompt=PROMPTS[:2], n=2, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [ch.text for ch in r.choices] == [refs[0], refs[0], refs[1], refs[1]]
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 4 * 6
    assert r.usage.prompt_tokens == sum(len(engine.encode(p)) for p in PROMPTS[:2])
    r = c.completions.create(
        model="a1", prompt=PROMPTS[0], echo=True, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == PROMPTS[0] + refs[0]
    r = c.completions.create(
        model="a1",
        prompt=PROMPTS[0],
        logprobs=2,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert (
        len(lp.tokens) == 6
        and "".join(lp.tokens) == refs[0]
        and all(1 <= len(t) <= 2 for t in lp.top_logprobs)
    )  # dict keys: equal texts merge
    r = c.chat.completions.create(
        model="a2",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    content = r.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    sampled = [
        c.completions.create(model="a1", prompt="hi", max_tokens=8, temperature=1.0, seed=s).choices[0].text
        for s in (1, 1, 2)
    ]
    assert sampled[0] == sampled[1]
    stop_ref = refs[0][2:5]
    if stop_ref:
        r = c.completions.create(model="a1", prompt=PROMPTS[0], stop=[stop_ref], max_tokens=6, temperature=0)
        assert stop_ref not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_64_concurrent_clients_over_16_adapters(server, engine):
    jobs = []  # (adapter, chat?, stream?, prompt text)
    for i in range(64):
        jobs.append((f"a{i % NUM_ADAPTERS}", i % 3 == 0, i % 2 == 0, f"{PROMPTS[i % 4]} {i}"))
    prompts = [engine.chat_prompt([{"role": "user", "content": p}], a) if chat else p for a, chat, _, p in jobs]
    refs = reference(engine, prompts, [a for a, *_ in jobs], max_tokens=10)
    before = metrics(server)

    async def one(c: openai.AsyncOpenAI, adapter, chat, stream, prompt) -> str:
        kw = dict(model=adapter, max_tokens=10, temperature=0, stream=stream)
        if chat:
            r = await c.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
            if stream:
                return "".join([ch.choices[0].delta.content or "" async for ch in r if ch.choices])
            return r.choices[0].message.content
        r = await c.completions.create(prompt=prompt, **kw)
        if stream:
            return "".join([ch.choices[0].text async for ch in r])
        return r.choices[0].text

    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=ADMIN, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(c, *job) for job in jobs))
        finally:
            await c.close()

    texts = asyncio.run(main())
    assert texts == refs
    after = metrics(server)
    # 16 adapters through 8 device slots: adapters were evicted and reloaded
    assert metric(after, "loraplex_adapter_cache_evictions_total", tier="device") > metric(
        before, "loraplex_adapter_cache_evictions_total", tier="device"
    )
    assert metric(after, "loraplex_adapters_resident", tier="device") <= 8


# ---- refusals -------------------------------------------------------------------------------------


def test_still_serving_after_bad_requests_and_broken_adapter(server, engine):
    # a broken adapter fails its own requests with the load's cause (422), nothing else
    r = post(server, "/v1/completions", {"model": "broken", "prompt": "hi", "max_tokens": 3})
    assert assert_openai_error(r, 422)["code"] == "adapter_invalid"
    r = post(server, "/v1/completions", {"model": "broken", "prompt": "hi", "stream": True})
    assert_openai_error(r, 422)
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing"), 404)
    (ref,) = reference(engine, ["hi"], ["a0"], max_tokens=5)
    assert (
        client(server)
        .completions.create(model="a0", prompt="hi", max_tokens=5, temperature=0)
        .choices[0]
        .text
        == ref
    )


def test_queue_limit_answers_429(plain_server):
    r = post(
        plain_server, "/v1/completions", {"model": BASE, "prompt": "hi", "n": 8, "max_tokens": 2}, key=None
    )
    assert_openai_error(r, 429)
    assert r.headers["retry-after"] == "1"
    r = post(
        plain_server, "/v1/completions", {"model": BASE, "prompt": "hi", "n": 2, "max_tokens": 2}, key=None
    )
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


# ---- auth ---------------------------------------------------------------------------------------
def test_auth_matrix(server):
    body = {"model": "a1", "prompt": "hi", "max_tokens": 2}
    assert_openai_error(post(server, "/v1/completions", body, key=None), 401)
    assert_openai_error(post(server, "/v1/completions", body, key="sk-wrong"), 401)
    assert_openai_error(httpx.get(f"{server.url}/v1/models"), 401)
    assert_openai_error(httpx.get(f"{server.url}/info"), 401)
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200
    assert post(server, "/v1/completions", body, key=TENANT_A).status_code == 200
    # another tenant's adapter: the very same 404 as an adapter that does not exist
    denied = post(server, "/v1/completions", {**body, "model": "a2"}, key=TENANT_A)
    unknown = post(server, "/v1/completions", {**body, "model": "zz"}, key=TENANT_A)
    assert denied.status_code == unknown.status_code == 404
    assert json.dumps(denied.json()).replace("a2", "X") == json.dumps(unknown.json()).replace("zz", "X")
    assert_openai_error(post(server, "/v1/completions", {**body, "model": BASE}, key=TENANT_A), 404)
    assert post(server, "/v1/completions", {**body, "model": BASE}, key=TENANT_B).status_code == 200
    assert post(server, "/v1/completions", {**body, "model": "a3"}, key=TENANT_B).status_code == 200
    seen_a = {m.id for m in client(server, TENANT_A).models.list().data}
    assert seen_a == {"a0", "a1", *(f"a{i}" for i in range(10, 16))}
    assert {m.id for m in client(server, TENANT_B).models.list().data} == {BASE, "a2", "a3"}
    assert_openai_error(
        httpx.get(f"{server.url}/v1/models/a2", headers={"Authorization": f"Bearer {TENANT_A}"}), 404
    )


def test_admin_load_and_unload(server, world, engine):
    _, _, adapters, _ = world
    load = {"lora_name": "extra", "lora_path": str(adapters / "a7")}
    for key in (None, TENANT_A):
        r = post(server, "/v1/load_lora_adapter", load, key=key)
        assert_openai_error(r, 401 if key is None else 403)
    assert_openai_error(post(server, "/v1/completions", {"model": "extra", "prompt": "hi"}), 404)
    r = post(server, "/v1/load_lora_adapter", load)
    assert r.status_code == 200, r.text
    (ref,) = reference(engine, ["hi"], ["a7"], max_tokens=5)
    assert (
        client(server)
        .completions.create(model="extra", prompt="hi", max_tokens=5, temperature=0)
        .choices[0]
        .text
        == ref
    )
    assert "extra" in {m.id for m in client(server).models.list().data}
    assert_openai_error(
        post(server, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/nonexistent"}),
        400,
        "lora_path",
    )
    assert_openai_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "extra"}, key=TENANT_A), 403)
    assert post(server, "/v1/unload_lora_adapter", {"lora_name": "extra"}).status_code == 200
    assert_openai_error(post(server, "/v1/completions", {"model": "extra", "prompt": "hi"}), 404)
    assert_openai_error(post(server, "/v1/unload_lora_adapter", {"lora_name": "extra"}), 404)


# ---- disconnects and metrics --------------------------------------------------------------------------
def test_client_disconnect_aborts_its_request(server):
    before = metrics(server)
    body = {"model": "a4", "prompt": "hi", "max_tokens": 500, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {ADMIN}"}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                break
    deadline = time.monotonic() + 60  # generous: CI machines can be slow; the loop exits as soon as it holds
    while time.monotonic() < deadline:
        now = metrics(server)
        aborted = metric(now, "loraplex_request_finished_total", reason="abort") - metric(
            before, "loraplex_request_finished_total", reason="abort"
        )
        if aborted == 1 and metric(now, "loraplex_kv_cache_blocks_used") == 0:
            break
        time.sleep(0.05)
    assert aborted == 1
    assert (
        metric(now, "loraplex_num_requests_running") == 0
        and metric(now, "loraplex_kv_cache_blocks_used") == 0
    )
    assert metric(now, "loraplex_requests_total", endpoint="completions", adapter="a4", status="499") >= 1


def test_metrics_move_by_the_right_amounts(server, engine):
    before = metrics(server)
    prompt = "the lazy dog"
    for _ in range(3):
        post(
            server, "/v1/completions", {"model": "a6", "prompt": prompt, "max_tokens": 5, "ignore_eos": True}
        ).raise_for_status()
    post(server, "/v1/completions", {"model": "a6", "prompt": "hi", "max_tokens": -1})
    after = metrics(server)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("loraplex_requests_total", endpoint="completions", adapter="a6", status="200") == 3
    assert delta("loraplex_requests_total", endpoint="completions", adapter="", status="400") == 1
    assert delta("loraplex_prompt_tokens_total", adapter="a6") == 3 * len(engine.encode(prompt))
    assert delta("loraplex_generation_tokens_total", adapter="a6") == 15
    assert delta("loraplex_request_finished_total", reason="length") == 3
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds"):
        assert delta(f"loraplex_{h}_count") == 3
    info = [k for k in after if k[0] == "loraplex_lora_requests_info"]
    assert info and dict(info[0][1])["max_lora"] == "8"
    assert metric(after, "loraplex_adapter_loads_total") >= NUM_ADAPTERS
    assert metric(after, "loraplex_server_ready") == 1


# ---- shutdown (last: it ends plain_server) ------------------------------------------------------------
def test_sigterm_lets_the_stream_finish_then_exits_0(plain_server):
    body = {"model": BASE, "prompt": "hi", "max_tokens": 480, "ignore_eos": True, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", f"{plain_server.url}/v1/completions", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line.startswith("data:"))
        next(lines)
        plain_server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # not accepting while it drains
            httpx.get(f"{plain_server.url}/health", timeout=2)
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][5:])["usage"]["completion_tokens"] == 480
    assert plain_server.proc.wait(30) == 0, plain_server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{plain_server.url}/health", timeout=2)


def test_adapter_with_its_own_chat_template_uses_it(server, engine):
    c = client(server)
    messages = [{"role": "user", "content": PROMPTS[2]}]
    own = engine.chat_prompt(messages, "a1")
    assert own == engine.tokenizer.encode(f"[user] {PROMPTS[2]} [assistant]", add_special_tokens=False)
    assert own != engine.chat_prompt(messages)  # the base template differs
    (ref,) = reference(engine, [own], ["a1"])
    r = c.chat.completions.create(model="a1", messages=messages, max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == len(own) and r.choices[0].message.content == ref
    r = c.chat.completions.create(model="a2", messages=messages, max_tokens=12, temperature=0)
    assert r.usage.prompt_tokens == len(engine.chat_prompt(messages))  # others keep the base template
