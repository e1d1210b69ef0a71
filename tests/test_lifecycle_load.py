"""Adapter lifecycle under load on a real `loraplex serve` process: 16 concurrent streams from the
official `openai` client for 60 s each (LORAPLEX_LIFECYCLE_SECONDS shortens it for local runs; the
suite runs the full 60 s), while

  - the alias `support` moves 100/0 -> 0/100 (routes file edit, hot reload) -> 100/0 (PUT), and
  - the adapter `legal` is updated in place (POST /v1/load_lora_adapter with a new path), then an
    update with a broken adapter is refused.

Zero requests may fail, every greedy response must equal Engine.generate's for the version that
served it (the version each response names in system_fingerprint and X-Loraplex-Adapter-Version),
and the changes must be atomic: a request started after a change took effect gets the new version,
one started before it was issued the old one."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import httpx
import openai
import pytest
from server_fixtures import make_world, start_server, wait_ready
from tiny_models import save_peft_adapter

from loraplex.config import Config
from loraplex.engine.engine import Engine
from loraplex.scheduler.sampling_params import SamplingParams

pytestmark = pytest.mark.slow  # a real server under 60 s of load, twice

SECONDS = float(os.environ.get("LORAPLEX_LIFECYCLE_SECONDS", "60"))
STREAMS = 16
PROMPTS = ["hello world", "What is the capital of France?", "the quick brown fox", "Name a color:", "how are you", "red, green"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle")
    base, adapters = make_world(root, 2)
    legal_v1 = shutil.copytree(adapters / "a0", root / "legal-v1")
    legal_v2 = save_peft_adapter(base, root / "legal-v2", 8, 16, "all-linear", False, seed=4242)
    broken = root / "legal-broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    routes = root / "routes.yaml"
    routes.write_text("support:\n  versions: {a0: 100, a1: 0}\n")
    engine = Engine(
        Config(
            model=str(base),
            adapters=(("a0", str(adapters / "a0")), ("a1", str(adapters / "a1")), ("legal-v2", str(legal_v2))),
            dtype="float32",
            max_lora_rank=16,
        )
    )
    params = SamplingParams(max_tokens=MAX_TOKENS)
    refs = {name: [r.text for r in engine.generate(PROMPTS, name, params)] for name in ("a0", "a1", "legal-v2")}
    assert refs["a0"] != refs["a1"] and refs["a0"] != refs["legal-v2"]
    return root, base, adapters, legal_v1, legal_v2, broken, routes, refs


@pytest.fixture(scope="module")
def server(world):
    root, base, adapters, legal_v1, *_, routes, _ = world
    args = ["--model", str(base), "--adapter-dir", str(adapters), "--dtype", "float32", "--max-lora-rank", "16"]
    args += ["--routes", str(routes), "--routes-poll-seconds", "0.2", "--max-active-adapters", "4"]
    s = start_server(args, root / "server.log")
    try:
        wait_ready(s)
        r = httpx.post(f"{s.url}/v1/load_lora_adapter", json={"lora_name": "legal", "lora_path": str(legal_v1)}, timeout=60)
        assert r.status_code == 200, r.text
        yield s
    finally:
        s.terminate()


async def load(server, model: str, seconds: float, changes) -> list[dict]:
    """STREAMS clients sending streamed greedy completions for `seconds`; `changes` is a coroutine
    function run alongside (it gets the start time). Returns one record per request."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
    records: list[dict] = []
    t0 = time.monotonic()

    async def worker(w: int) -> None:
        i = w
        while time.monotonic() - t0 < seconds:
            prompt = i % len(PROMPTS)
            started = time.monotonic()
            record = {"prompt": prompt, "started": started, "error": None, "versions": set(), "text": ""}
            try:
                stream = await client.completions.create(
                    model=model, prompt=PROMPTS[prompt], max_tokens=MAX_TOKENS, temperature=0, stream=True, user=f"user-{i}"
                )
                async for chunk in stream:
                    record["versions"].add(chunk.system_fingerprint)
                    record["text"] += "".join(c.text for c in chunk.choices)
            except Exception as exc:  # counted: no request may fail
                record["error"] = repr(exc)
            record["ended"] = time.monotonic()
            records.append(record)
            i += STREAMS

    await asyncio.gather(*(worker(w) for w in range(STREAMS)), changes(t0))
    await client.close()
    return records


def check(records, refs_of_version, windows) -> dict[str, int]:
    """No failures; each response equals the reference of the one version that served it; `windows`
    [(from, until, version)]: requests started in [from, until) were served by `version`."""
    assert records, "no requests completed"
    failed = [r for r in records if r["error"] is not None]
    assert not failed, f"{len(failed)} of {len(records)} requests failed, e.g. {failed[0]['error']}"
    counts: dict[str, int] = {}
    for r in records:
        assert len(r["versions"]) == 1, r["versions"]
        (version,) = r["versions"]
        counts[version] = counts.get(version, 0) + 1
        assert r["text"] == refs_of_version[version][r["prompt"]], (version, r["prompt"], r["text"])
        for start, end, expected in windows:
            if start <= r["started"] < end:
                assert version == expected, (r["started"], start, end, version, expected)
    return counts


def test_weights_move_under_load(server, world):
    *_, routes, refs = world
    marks: dict[str, float] = {}

    async def changes(t0: float) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            await asyncio.sleep(SECONDS / 3 - (time.monotonic() - t0))
            marks["file_edit"] = time.monotonic()
            routes.write_text("support:\n  versions: {a0: 0, a1: 100}\n")  # through the file's hot reload
            while (await http.get("/v1/routes")).json()["data"][0]["split"] != {"a0": 0.0, "a1": 100.0}:
                await asyncio.sleep(0.01)
            marks["file_live"] = time.monotonic()
            await asyncio.sleep(SECONDS * 2 / 3 - (time.monotonic() - t0))
            marks["put_sent"] = time.monotonic()
            r = await http.put("/v1/routes/support", json={"versions": {"a0": 100, "a1": 0}})  # rollback: one call
            assert r.status_code == 200, r.text
            marks["put_done"] = time.monotonic()

    records = asyncio.run(load(server, "support", SECONDS, changes))
    windows = [
        (0.0, marks["file_edit"], "a0"),
        (marks["file_live"], marks["put_sent"], "a1"),
        (marks["put_done"], float("inf"), "a0"),
    ]
    counts = check(records, {"a0": refs["a0"], "a1": refs["a1"]}, windows)
    assert counts.get("a0", 0) > STREAMS and counts.get("a1", 0) > STREAMS, counts
    shown = httpx.get(f"{server.url}/v1/models/support", timeout=10).json()
    assert shown["split"] == {"a0": 100.0, "a1": 0.0}


def test_in_place_update_under_load(server, world):
    *_, legal_v2, broken, _, refs = world
    marks: dict[str, float] = {}

    async def changes(t0: float) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
            await asyncio.sleep(SECONDS / 3 - (time.monotonic() - t0))
            marks["update_sent"] = time.monotonic()
            r = await http.post("/v1/load_lora_adapter", json={"lora_name": "legal", "lora_path": str(legal_v2)})
            assert r.status_code == 200 and r.headers["x-loraplex-adapter-version"] == "legal#2", r.text
            marks["update_done"] = time.monotonic()
            await asyncio.sleep(SECONDS * 2 / 3 - (time.monotonic() - t0))
            r = await http.post("/v1/load_lora_adapter", json={"lora_name": "legal", "lora_path": str(broken)})
            assert r.status_code == 422 and "keeps serving" in r.json()["error"]["message"], r.text

    records = asyncio.run(load(server, "legal", SECONDS, changes))
    windows = [(0.0, marks["update_sent"], "legal"), (marks["update_done"], float("inf"), "legal#2")]
    counts = check(records, {"legal": refs["a0"], "legal#2": refs["legal-v2"]}, windows)
    assert counts.get("legal", 0) > STREAMS and counts.get("legal#2", 0) > STREAMS, counts
    card = httpx.get(f"{server.url}/v1/models/legal", timeout=10).json()
    assert card["version"] == "legal#2" and "retiring_versions" not in card  # the old slot was freed
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert 'loraplex_version_requests_total{model="legal",status="200",version="legal#2"}' in text
