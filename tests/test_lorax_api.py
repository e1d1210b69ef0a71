"""The LoRAX / TGI routes (POST /generate, /generate_stream and the compat POST /) on a real
`loraplex serve`, over HTTP and through the official LoRAX client.

The client tests run `lorax-client==0.6.3`, unmodified, in its own venv (it pins huggingface-hub<1, which
transformers 5 refuses): set LORAPLEX_LORAX_PYTHON to that venv's python (`.ci/run` builds it):

    python3 -m venv /tmp/lorax-venv && /tmp/lorax-venv/bin/pip install lorax-client==0.6.3
    LORAPLEX_LORAX_PYTHON=/tmp/lorax-venv/bin/python pytest tests/test_lorax_api.py

Without it those tests skip; with it set, a broken venv fails them.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest
from server_fixtures import make_world, start_server, wait_ready

from loraplex.config import Config
from loraplex.engine.engine import Engine
from loraplex.scheduler.sampling_params import SamplingParams

pytestmark = pytest.mark.slow  # a real `loraplex serve` subprocess (integration)

BASE = "tiny-base"
PROMPT = "What is the capital of France?"
ADAPTER = "a1"
MAX_NEW = 10
LORAX_PYTHON = os.environ.get("LORAPLEX_LORAX_PYTHON")

# Exactly the `parameters` lorax-client 0.6.3 sends for `generate(prompt, adapter_id=...)` (its pydantic
# defaults, serialized with by_alias=True), plus the top-level `stream`.
CLIENT_DEFAULTS = {
    "adapter_id": None,
    "adapter_source": None,
    "merged_adapters": None,
    "api_token": None,
    "do_sample": False,
    "max_new_tokens": None,
    "ignore_eos_token": False,
    "repetition_penalty": None,
    "return_full_text": False,
    "stop": [],
    "seed": None,
    "temperature": None,
    "top_k": None,
    "top_p": None,
    "truncate": None,
    "typical_p": None,
    "best_of": None,
    "watermark": False,
    "details": False,
    "decoder_input_details": False,
    "return_k_alternatives": None,
    "response_format": None,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lorax")
    base, adapters = make_world(root, 3)
    return root, base, adapters


@pytest.fixture(scope="module")
def server(world):
    root, base, adapters = world
    args = ["--model", str(base), "--served-model-name", BASE, "--adapter-dir", str(adapters)]
    args += ["--dtype", "float32", "--max-lora-rank", "16", "--kv-cache-gib", "0.05"]
    s = start_server(args, root / "server.log")
    wait_ready(s)
    yield s
    s.terminate()


@pytest.fixture(scope="module")
def engine(world):
    _, base, adapters = world
    return Engine(Config(model=str(base), adapter_dir=str(adapters), dtype="float32", max_lora_rank=16))


def reference(engine, prompt, adapter=ADAPTER, max_tokens=MAX_NEW, **kw):
    (r,) = engine.generate([prompt], [adapter], SamplingParams(max_tokens=max_tokens, **kw))
    return r


def stop_of(text: str) -> str:
    """A stop string from inside `text` (not at its start), made of printable ASCII so it survives any
    client's decoding unchanged."""
    for i in range(1, len(text) - 2):
        if all(c.isascii() and c.isprintable() for c in text[i : i + 2]):
            return text[i : i + 2]
    raise AssertionError(f"no usable stop string in {text!r}")


def body(prompt=PROMPT, stream=None, **params):
    out = {"inputs": prompt, "parameters": {**CLIENT_DEFAULTS, "adapter_id": ADAPTER, "max_new_tokens": MAX_NEW, **params}}
    if stream is not None:
        out["stream"] = stream
    return out


def post(server, path, payload):
    return httpx.post(server.url + path, json=payload, timeout=60)


def events(server, path, payload):
    with httpx.stream("POST", server.url + path, json=payload, timeout=60) as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]


def assert_tgi_error(r: httpx.Response, status: int, param: str | None = None, error_type: str | None = None):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()
    assert isinstance(err["error"], str) and err["error"], err
    assert err.get("error_type") == error_type, err
    if param is not None:
        assert err["param"] == param, err
    return err


# ---- over HTTP ------------------------------------------------------------------------------------
def test_compat_route_answers_like_generate(server, engine):
    ref = reference(engine, PROMPT)
    r = post(server, "/", body(stream=False, details=True))
    assert r.status_code == 200, r.text
    (one,) = r.json()  # a JSON array of one generate response
    assert one["generated_text"] == ref.text
    assert one == post(server, "/generate", body(details=True)).json()
    d = one["details"]
    assert set(d) >= {"finish_reason", "generated_tokens", "seed", "prefill", "tokens", "prompt_tokens"}
    assert d["generated_tokens"] == len(ref.token_ids) == len(d["tokens"])
    assert [t["id"] for t in d["tokens"]] == ref.token_ids
    assert d["finish_reason"] == ("length" if len(ref.token_ids) == MAX_NEW else "eos_token")
    assert d["seed"] is None and d["prefill"] == []  # greedy; no decoder_input_details
    assert all(t["logprob"] <= 0 and t["special"] is False for t in d["tokens"])


def test_compat_route_streams_like_generate_stream(server, engine):
    ref = reference(engine, PROMPT)
    got = events(server, "/", body(stream=True))
    assert got == events(server, "/generate_stream", body())
    assert "".join(e["token"]["text"] for e in got) == ref.text
    assert all(e["generated_text"] is None and e["details"] is None for e in got[:-1])
    assert got[-1]["generated_text"] == ref.text
    assert got[-1]["details"]["generated_tokens"] == len(ref.token_ids)


def test_get_root_is_still_the_playground(server):
    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")


def test_client_defaults_and_neutral_values_are_accepted(server, engine):
    ref = reference(engine, PROMPT)
    neutral = {"best_of": 1, "typical_p": 1.0, "adapter_source": "local", "repetition_penalty": 1.0, "top_k": None}
    for extra in ({}, neutral):
        r = post(server, "/", body(stream=False, **extra))
        assert r.status_code == 200, (extra, r.text)
        assert r.json()[0]["generated_text"] == ref.text


@pytest.mark.parametrize(
    "field, value",
    [
        ("best_of", 2),
        ("watermark", True),
        ("typical_p", 0.5),
        ("decoder_input_details", True),
        ("merged_adapters", {"ids": ["a0", "a1"], "weights": [0.5, 0.5], "density": 1.0}),
        ("api_token", "hf_secret"),
        ("response_format", "json"),  # must be an object (response_format itself works: test_structured_api)
        ("adapter_source", "s3"),
        ("max_new_tokens", 0),
        ("temperature", -1.0),
        ("repetition_penalty", 0.0),
        ("truncate", 0),
        ("stop", "not-a-list-of-strings" * 20),
    ],
)
def test_unsupported_values_get_400_naming_the_param(server, field, value):
    for path in ("/", "/generate", "/generate_stream"):
        r = post(server, path, body(**{field: value}))
        assert_tgi_error(r, 400, f"parameters.{field}", "validation")


def test_bad_bodies_and_unknown_adapter(server):
    assert_tgi_error(post(server, "/", {"parameters": {}}), 400, "inputs", "validation")
    assert_tgi_error(post(server, "/", {"inputs": "hi", "stream": "yes"}), 400, "stream", "validation")
    for path in ("/", "/generate", "/generate_stream"):
        err = assert_tgi_error(post(server, path, body(adapter_id="nope")), 404, "model")
        assert "nope" in err["error"]
    r = httpx.post(server.url + "/", content=b"{broken", headers={"Content-Type": "application/json"}, timeout=10)
    assert_tgi_error(r, 400, error_type="validation")


def test_truncate_keeps_the_last_tokens(server, engine):
    ids = engine.encode(PROMPT)
    keep = len(ids) - 3
    ref = reference(engine, ids[-keep:])
    r = post(server, "/generate", body(truncate=keep, details=True))
    assert r.status_code == 200, r.text
    assert r.json()["generated_text"] == ref.text
    assert r.json()["details"]["prompt_tokens"] == keep


def test_return_k_alternatives(server, engine):
    ref = reference(engine, PROMPT, logprobs=3)
    r = post(server, "/generate", body(details=True, return_k_alternatives=3))
    tokens = r.json()["details"]["tokens"]
    for tok, (token_id, lp, top) in zip(tokens, ref.logprobs, strict=True):
        assert abs(tok["logprob"] - lp) < 1e-4
        assert tok["id"] == token_id
        assert [a["id"] for a in tok["alternative_tokens"]] == [t for t, _ in top]
        assert len(tok["alternative_tokens"]) == 3
        assert tok["alternative_tokens"][0]["logprob"] >= tok["alternative_tokens"][-1]["logprob"]


def test_stop_sequence_and_seeded_sampling(server, engine):
    ref = reference(engine, PROMPT)
    stop = stop_of(ref.text)
    r = post(server, "/generate", body(stop=[stop], details=True)).json()
    assert stop not in r["generated_text"] and ref.text.startswith(r["generated_text"])
    assert r["details"]["finish_reason"] == "stop_sequence"

    sampled = {"do_sample": True, "temperature": 0.9, "seed": 77, "details": True}
    a, b = (post(server, "/generate", body(**sampled)).json() for _ in range(2))
    assert a["generated_text"] == b["generated_text"] and a["details"]["seed"] == 77
    # Unseeded sampling reports the seed it drew; replaying that seed gives the same text.
    c = post(server, "/generate", body(do_sample=True, temperature=0.9, details=True)).json()
    assert isinstance(c["details"]["seed"], int)
    replay = post(server, "/generate", body(do_sample=True, temperature=0.9, seed=c["details"]["seed"])).json()
    assert replay["generated_text"] == c["generated_text"]


# ---- the official client ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client_results(server, engine):
    if not LORAX_PYTHON:
        pytest.skip("set LORAPLEX_LORAX_PYTHON to a venv python with lorax-client==0.6.3 (.ci/run does)")
    ref = reference(engine, PROMPT)
    spec = {
        "url": server.url,
        "adapter": ADAPTER,
        "prompt": PROMPT,
        "max_new_tokens": MAX_NEW,
        "stop": stop_of(ref.text),
        "unknown": "no-such-adapter",
    }
    script = Path(__file__).with_name("lorax_client_calls.py")
    done = subprocess.run(
        [LORAX_PYTHON, str(script), json.dumps(spec)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout), ref, spec


def test_lorax_client_version(client_results):
    done = subprocess.run(
        [LORAX_PYTHON, "-c", "from importlib.metadata import version; print(version('lorax-client'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.strip() == "0.6.3", done.stdout + done.stderr


def test_lorax_client_generate(client_results, engine):
    out, ref, _ = client_results
    assert out["generate"]["ok"]["generated_text"] == ref.text
    assert out["generate_base"]["ok"]["generated_text"] == reference(engine, PROMPT, adapter=None).text
    assert out["generate_full_text"]["ok"]["generated_text"] == PROMPT + ref.text
    details = out["generate_details"]["ok"]["details"]
    assert [t["id"] for t in details["tokens"]] == ref.token_ids
    assert details["generated_tokens"] == len(ref.token_ids)
    assert details["finish_reason"] in ("length", "eos_token")
    assert out["async"]["generate"]["ok"] == out["generate_details"]["ok"]


def test_lorax_client_generate_stream(client_results):
    out, ref, _ = client_results
    for stream in (out["generate_stream"]["ok"], out["async"]["generate_stream"]["ok"]):
        assert "".join(e["token"]["text"] for e in stream) == ref.text
        assert stream[-1]["generated_text"] == ref.text
        assert stream[-1]["details"]["generated_tokens"] == len(ref.token_ids)


def test_lorax_client_stop_and_seed(client_results):
    out, ref, spec = client_results
    stopped = out["generate_stop"]["ok"]
    assert spec["stop"] not in stopped["generated_text"] and ref.text.startswith(stopped["generated_text"])
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    first, second = (s["ok"] for s in out["sampled"])
    assert first["generated_text"] == second["generated_text"] == out["async"]["sampled"]["ok"]["generated_text"]
    assert first["details"]["seed"] == 1234
    assert "".join(e["token"]["text"] for e in out["sampled_stream"]["ok"]) == first["generated_text"]


def test_lorax_client_typed_errors(client_results):
    out, _, spec = client_results
    for key in ("unknown", "unknown_stream"):
        for result in (out[key], out["async"][key]):
            assert result.get("error") == "NotFoundError" and result["module"] == "lorax.errors", result
            assert spec["unknown"] in result["message"]
    too_long = out["too_long"]
    assert too_long.get("error") == "ValidationError" and "context length" in too_long["message"], too_long
