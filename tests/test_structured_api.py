"""Structured outputs over HTTP on a real `loraplex serve` (tiny model with a tokenizer, three adapters):
the official `openai` client parses JSON-schema replies and forced tool calls, streamed tool-call deltas
reassemble to the non-streamed call, streaming equals non-streaming under greedy, the vLLM extras and
the LoRAX `response_format` (also through the official LoRAX client), each bad input's 400 naming its
param while the server keeps serving, and the metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, Field
from server_fixtures import make_world, start_server, wait_ready

pytestmark = pytest.mark.slow  # a real `loraplex serve` subprocess (integration)

BASE = "tiny-base"
MODELS = [BASE, "a0", "a1", "a2"]
MESSAGES = [{"role": "user", "content": "Name a color: red, green"}]
TICKET = {
    "type": "object",
    "properties": {
        "queue": {"enum": ["billing", "tech", "sales"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"enum": ["urgent", "vip", "refund"]}, "minItems": 1, "maxItems": 2},
        "escalate": {"type": "boolean"},
    },
    "required": ["queue", "priority", "tags", "escalate"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]},
    },
}
LORAX_PYTHON = os.environ.get("LORAPLEX_LORAX_PYTHON")


class Verdict(BaseModel):
    label: Literal["spam", "ham"]
    score: int = Field(ge=0, le=9)
    urgent: bool


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured-api")
    base, adapters = make_world(root, 3)
    args = ["--model", str(base), "--served-model-name", BASE, "--adapter-dir", str(adapters)]
    args += ["--dtype", "float32", "--max-lora-rank", "16", "--kv-cache-gib", "0.05"]
    s = start_server(args, root / "server.log")
    wait_ready(s)
    yield s
    s.terminate()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "ticket", "schema": schema, "strict": True}}


def test_openai_client_parses_json_schema_replies(client):
    for model in MODELS:
        completion = client.chat.completions.parse(
            model=model, messages=MESSAGES, response_format=Verdict, max_tokens=150, temperature=0
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (model, choice.message.content)
        assert isinstance(choice.message.parsed, Verdict), choice.message.content


def test_json_schema_stream_equals_non_stream_under_greedy(client):
    for model in MODELS:
        body = dict(model=model, messages=MESSAGES, max_tokens=150, temperature=0, response_format=_schema_format(TICKET))
        whole = client.chat.completions.create(**body)
        text = whole.choices[0].message.content
        assert whole.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), TICKET)
        chunks = list(client.chat.completions.create(**body, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def _reassemble(chunks) -> tuple[list[dict], str | None]:
    """Tool calls from streamed deltas, as a client accumulates them (by index)."""
    calls: dict[int, dict] = {}
    finish = None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        assert choice.delta.content in (None, ""), choice.delta.content
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = delta.id or call["id"]
            if delta.function is not None:
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    return [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("model", ["a1", BASE])
def test_forced_named_tool_call(client, model):
    body = dict(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[CLOCK, WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=150,
        temperature=0,
    )
    reply = client.chat.completions.create(**body)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    streamed, finish = _reassemble(client.chat.completions.create(**body, stream=True))
    assert finish == "stop"
    assert [(c["name"], c["arguments"]) for c in streamed] == [("get_weather", call.function.arguments)]
    assert streamed[0]["id"].startswith("call_")


def test_required_tool_calls_choose_among_tools(client):
    body = dict(
        model="a0",
        messages=[{"role": "user", "content": "the time in Oslo, and the weather"}],
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        parallel_tool_calls=False,  # exactly one call (greedy on a random model would list calls until max_tokens)
        max_tokens=200,
        temperature=0,
    )
    reply = client.chat.completions.create(**body)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
    streamed, finish = _reassemble(client.chat.completions.create(**body, stream=True))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in streamed] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    assert len(choice.message.tool_calls) == 1
    # sampled, parallel calls allowed: every complete call parses into arguments of its tool (a reply cut
    # by max_tokens may end in a partial call)
    complete = 0
    for seed in range(6):
        sampled = client.chat.completions.create(**{**body, "temperature": 1.0, "seed": seed, "parallel_tool_calls": True})
        reply_choice = sampled.choices[0]
        calls = reply_choice.message.tool_calls or []
        if reply_choice.finish_reason != "tool_calls":
            assert reply_choice.finish_reason == "length"
            calls = calls[:-1]
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        complete += len(calls)
    assert complete >= 3


def test_n_choices_each_follow_the_schema(client):
    reply = client.chat.completions.create(
        model="a2", messages=MESSAGES, n=4, seed=7, temperature=1.0, max_tokens=150,
        response_format=_schema_format(TICKET),
    )
    finished = [c.message.content for c in reply.choices if c.finish_reason == "stop"]
    assert len(finished) >= 3
    for text in finished:
        jsonschema.validate(json.loads(text), TICKET)


def test_completions_with_vllm_extras_and_response_format(server, client):
    cases = [
        ({"guided_regex": r"[a-c]{3}-[0-9]{2}"}, lambda t: re.fullmatch(r"[a-c]{3}-[0-9]{2}", t)),
        ({"guided_choice": ["alpha", "beta"]}, lambda t: t in ("alpha", "beta")),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        ({"structured_outputs": {"regex": "(yes|no)!"}}, lambda t: t in ("yes!", "no!")),
        ({"structured_outputs": {"grammar": 'root ::= "x" [0-9] [0-9]'}}, lambda t: re.fullmatch(r"x[0-9]{2}", t)),
        ({"guided_grammar": 'root ::= ("a" | "b") "!"'}, lambda t: t in ("a!", "b!")),
        ({"guided_json": TICKET}, lambda t: jsonschema.validate(json.loads(t), TICKET) is None),
        ({"structured_outputs": {"json": json.dumps(TICKET)}}, lambda t: jsonschema.validate(json.loads(t), TICKET) is None),
        ({"response_format": _schema_format(TICKET)}, lambda t: jsonschema.validate(json.loads(t), TICKET) is None),
    ]
    for extra, check in cases:
        for model in ("a0", BASE):
            r = httpx.post(
                server.url + "/v1/completions",
                json={"model": model, "prompt": "the quick brown fox", "max_tokens": 150, "temperature": 0, **extra},
                timeout=60,
            )
            assert r.status_code == 200, (extra, r.text)
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "stop" and check(choice["text"]), (extra, choice)
    # chat takes the vLLM extras too
    reply = client.chat.completions.create(
        model="a1", messages=MESSAGES, max_tokens=10, temperature=0, extra_body={"guided_choice": ["cat", "dog"]}
    )
    assert reply.choices[0].message.content in ("cat", "dog")


BAD = [
    ("/v1/chat/completions", {"response_format": _schema_format({"type": "intger"})}, "response_format.json_schema.schema", "intger"),
    ("/v1/chat/completions", {"response_format": _schema_format({"type": "array", "uniqueItems": True})}, "response_format.json_schema.schema", "uniqueItems"),
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema"}}, "response_format.json_schema", "required"),
    ("/v1/completions", {"guided_regex": "([a-"}, "guided_regex", "Unclosed"),
    ("/v1/completions", {"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ("/v1/completions", {"structured_outputs": {"structural_tag": "x"}}, "structured_outputs.structural_tag", "not supported"),
    ("/v1/completions", {"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice", "conflicts"),
    ("/v1/completions", {"guided_grammar": "root ::= missing_rule"}, "guided_grammar", "missing_rule"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name", "nope"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "auto"}, "tool_choice", "'auto' is not supported"),
    ("/v1/chat/completions", {"tools": [WEATHER]}, "tool_choice", "'auto' is not supported"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"if": {}}}}], "tool_choice": "required"}, "tools[0].function.parameters", "conditional"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "guided_choice": ["a"]}, "guided_choice", "tool call"),
]


@pytest.mark.parametrize("path, extra, param, words", BAD, ids=[b[2] + "-" + b[3] for b in BAD])
def test_bad_structured_inputs_get_400_naming_the_param(server, path, extra, param, words):
    body = {"model": "a0", "max_tokens": 8, **extra}
    body.update({"messages": MESSAGES} if "chat" in path else {"prompt": "hello"})
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err
    assert err["type"] == "invalid_request_error"
    ok = httpx.post(server.url + "/v1/completions", json={"model": "a0", "prompt": "hello", "max_tokens": 4}, timeout=60)
    assert ok.status_code == 200  # the server keeps serving


def _lorax_body(**parameters) -> dict:
    return {"inputs": "What is the capital of France?", "parameters": {"max_new_tokens": 150, "adapter_id": "a1", **parameters}}


def test_lorax_response_format_on_every_route(server):
    fmt = {"type": "json_object", "schema": TICKET}
    whole = httpx.post(server.url + "/generate", json=_lorax_body(response_format=fmt, details=True), timeout=60)
    assert whole.status_code == 200, whole.text
    text = whole.json()["generated_text"]
    jsonschema.validate(json.loads(text), TICKET)
    assert whole.json()["details"]["finish_reason"] == "eos_token"
    compat = httpx.post(server.url + "/", json={**_lorax_body(response_format=fmt), "stream": False}, timeout=60)
    assert compat.json()[0]["generated_text"] == text
    events = []
    with httpx.stream("POST", server.url + "/generate_stream", json=_lorax_body(response_format=fmt), timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    assert events[-1]["generated_text"] == text
    plain = httpx.post(server.url + "/generate", json=_lorax_body(response_format={"type": "json_object"}), timeout=60)
    assert plain.status_code == 200 and plain.json()["generated_text"].startswith("{")
    bad = httpx.post(server.url + "/generate", json=_lorax_body(response_format={"type": "json_object", "schema": {"type": "intger"}}), timeout=60)
    assert bad.status_code == 400 and bad.json()["param"] == "parameters.response_format.schema", bad.text


@pytest.mark.skipif(not LORAX_PYTHON, reason="set LORAPLEX_LORAX_PYTHON to a venv with lorax-client==0.6.3")
def test_official_lorax_client_response_format(server):
    script = (
        "import json, sys\n"
        "from lorax import Client\n"
        "spec = json.loads(sys.argv[1])\n"
        "r = Client(spec['url'], timeout=120).generate(spec['prompt'], adapter_id='a1', max_new_tokens=150,"
        " response_format={'type': 'json_object', 'schema': spec['schema']})\n"
        "print(json.dumps({'text': r.generated_text}))\n"
    )
    spec = {"url": server.url, "prompt": "What is the capital of France?", "schema": TICKET}
    out = subprocess.run([LORAX_PYTHON, "-c", script, json.dumps(spec)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    text = json.loads(out.stdout.strip().splitlines()[-1])["text"]
    jsonschema.validate(json.loads(text), TICKET)


def test_metrics_count_compiles_hits_and_kinds(server, client):
    for _ in range(2):  # the second is a cache hit
        client.chat.completions.create(
            model=BASE, messages=MESSAGES, max_tokens=150, temperature=0, response_format=_schema_format(TICKET)
        )
    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("loraplex_structured_output_compile_seconds_count", ())] >= 1
    assert samples[("loraplex_structured_output_compile_seconds_bucket", (("le", "+Inf"),))] >= 1
    assert samples[("loraplex_structured_output_cache_hits_total", ())] >= 1
    assert samples[("loraplex_structured_output_cache_misses_total", ())] >= 1
    assert samples[("loraplex_structured_output_requests_total", (("kind", "json_schema"),))] >= 2
