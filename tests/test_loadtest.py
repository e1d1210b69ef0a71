"""The load generator (loraplex.bench): its statistics against a tiny fake OpenAI server with known
delays and failures, its workload and bounds, the `loraplex bench` command, and a smoke run against a
real `loraplex serve`."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
from fake_openai_server import TOKEN_GAP, fake_ttft
from server_fixtures import free_port, make_world, start_server, wait_ready

from loraplex.bench import (
    BenchConfig,
    LengthSpec,
    RequestResult,
    arrival_gaps,
    build_workload,
    check_target,
    iter_workload,
    percentile,
    popularity_weights,
    run_benchmark,
    summarize,
)
from loraplex.bench.cli import main as bench_main
from loraplex.cli import main as cli_main

FAKE_SERVER = Path(__file__).with_name("fake_openai_server.py")


@pytest.fixture(scope="module")
def fake_url(tmp_path_factory):
    """The fake server in its own process (in a thread it would share the GIL with the client)."""
    port = free_port()
    log = (tmp_path_factory.mktemp("fake") / "fake.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, str(FAKE_SERVER), str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/v1/models", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    assert proc.poll() is None, "the fake server did not start"
    yield url
    proc.terminate()
    proc.wait(10)


def run(cfg: BenchConfig):
    return asyncio.run(run_benchmark(cfg))


# ---- pure statistics and workload ------------------------------------------------------------------
def test_bench_package_stays_client_side():
    """loraplex.bench load-tests from a machine without the engine: importing it (and its command)
    must pull in neither torch nor loraplex.engine. A fresh interpreter: this one has both loaded."""
    code = (
        "import sys, loraplex.bench, loraplex.bench.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('loraplex.engine')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_percentile_matches_numpy():
    rng = random.Random(0)
    for n in (1, 2, 7, 100):
        values = [rng.random() for _ in range(n)]
        for q in (0, 50, 90, 99, 100):
            assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([], 50) is None


def test_summary_of_known_results():
    results = []
    for i in range(10):  # ttft 0.1..1.0 s, then 9 gaps of 0.05 s: 10 tokens each
        r = RequestResult(index=i, model=f"m{i % 2}", start=float(i))
        chunks = [i + 0.1 * (i + 1) + 0.05 * k for k in range(10)]
        r.output_tokens = 10
        results.append(r.succeeded(chunks, chunks[-1]))
    results.append(RequestResult(index=10, model="m0", start=0.0).failed("http_404", "x"))
    results.append(RequestResult(index=11, model="m0", start=0.0).failed("timeout", "x"))
    results.append(RequestResult(index=12, model="m1", start=0.0).failed("timeout", "x"))
    s = summarize(results, duration=20.0)
    assert (s["num_requests"], s["num_ok"], s["num_errors"]) == (13, 10, 3)
    assert s["errors"] == {"http_404": 1, "timeout": 2}
    assert s["output_tokens"] == 100
    assert s["output_throughput"] == pytest.approx(100 / 20.0)
    assert s["request_throughput"] == pytest.approx(10 / 20.0)
    assert s["ttft"]["p50"] == pytest.approx(0.55)
    assert s["ttft"]["p90"] == pytest.approx(0.91)
    assert s["ttft"]["p99"] == pytest.approx(0.991)
    assert s["tpot"]["p50"] == pytest.approx(0.05)
    assert s["itl"]["p99"] == pytest.approx(0.05)
    assert s["e2e"]["p50"] == pytest.approx(0.55 + 0.45)


def test_zipf_and_uniform_popularity():
    assert popularity_weights(4, "uniform", 1.0) == [0.25] * 4
    w = popularity_weights(3, "zipf", 1.0)
    assert w == pytest.approx([1 / (1 + 1 / 2 + 1 / 3) / k for k in (1, 2, 3)])
    cfg = BenchConfig(popularity="zipf", zipf_alpha=1.2, num_requests=20000, prompt_len=LengthSpec(1, 1))
    models = [f"a{i}" for i in range(8)]
    counts = Counter(s.model for s in build_workload(cfg, models))
    expected = popularity_weights(8, "zipf", 1.2)
    for i, name in enumerate(models):
        assert counts[name] / 20000 == pytest.approx(expected[i], abs=0.01)


@pytest.mark.parametrize("arrival,cv", [("poisson", 1.0), ("gamma", 3.0), ("gamma", 0.5)])
def test_arrival_gaps_have_the_rate_and_cv(arrival, cv):
    cfg = BenchConfig(rate=5.0, arrival=arrival, cv=cv)
    gaps = np.array(arrival_gaps(cfg, random.Random(1), 40000))
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)
    assert arrival_gaps(BenchConfig(rate=math.inf), random.Random(1), 3) == [0.0] * 3


def test_workload_lengths_and_dataset(tmp_path):
    cfg = BenchConfig(
        prompt_len=LengthSpec.parse("5:9"), output_len=LengthSpec.parse("3:4"), num_requests=200
    )
    specs = build_workload(cfg, ["a"])
    assert {len(s.prompt.split()) for s in specs} == {5, 6, 7, 8, 9}
    assert {s.max_tokens for s in specs} == {3, 4}
    assert build_workload(cfg, ["a"]) == specs  # seeded
    data = tmp_path / "d.jsonl"
    data.write_text(
        '{"prompt": "hi there", "max_tokens": 7}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n'
    )
    specs = build_workload(BenchConfig(dataset=str(data), num_requests=50), ["a"])
    assert {(json.dumps(s.prompt), s.max_tokens) for s in specs} == {
        ('"hi there"', 7),
        ('[{"role": "user", "content": "yo"}]', 64),
    }
    with pytest.raises(ValueError):
        LengthSpec.parse("9:5")


def test_workload_is_made_as_it_is_taken(tmp_path):
    cfg = BenchConfig(popularity="zipf", rate=3.0, num_requests=10**6, prompt_len=LengthSpec.parse("2:6"))
    models = ["a", "b", "c"]
    first = list(itertools.islice(iter_workload(cfg, models), 50))  # (made lazily: see the closed-loop test)
    again = build_workload(replace(cfg, num_requests=50), models)
    assert first == again  # seeded: the same requests whatever the bound
    assert [s.index for s in first] == list(range(50)) and len({s.model for s in first}) == 3
    # open loop: a gap drawn per request
    assert all(b.send_at > a.send_at for a, b in itertools.pairwise(first))
    # the dataset is read and checked when the workload is made, before any request is taken
    data = tmp_path / "chat.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "yo"}]}\n')
    with pytest.raises(ValueError, match="completions endpoint"):
        iter_workload(BenchConfig(dataset=str(data), endpoint="completions"), ["a"])


@pytest.mark.parametrize(
    "url,ok",
    [
        ("http://127.0.0.1:8000", True),
        ("http://127.3.4.5:1/v1", True),
        ("http://localhost:8000", True),
        ("http://[::1]:8000", True),
        ("http://10.0.0.7:8000", False),
        ("https://api.openai.com", False),
        ("ftp://127.0.0.1", False),
    ],
)
def test_only_loopback_targets_unless_allowed(url, ok):
    if ok:
        check_target(url, False)
    else:
        with pytest.raises(ValueError):
            check_target(url, False)
    if url.startswith("http"):
        check_target(url, True)


# ---- against the fake server -----------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_latency_percentiles_and_throughput(fake_url, endpoint):
    n_tokens = 6
    cfg = BenchConfig(url=fake_url, endpoint=endpoint, models=("ok0", "ok1"), concurrency=10,
                      num_requests=50, output_len=LengthSpec(n_tokens, n_tokens), prompt_len=LengthSpec(4, 4))  # fmt: skip
    result = run(cfg)
    s = result.summary
    assert (s["num_ok"], s["num_errors"]) == (50, 0)
    assert s["output_tokens"] == 50 * n_tokens
    assert s["prompt_tokens"] == 50 * 5
    ttfts = [fake_ttft(i) for i in range(50)]
    slack = 0.03  # scheduling noise on a busy machine: measured latencies only grow
    for q in (50, 90, 99):  # p99 interpolates between the two slowest of 50: one hiccup moves it
        want = percentile(ttfts, q)
        assert want - 0.002 <= s["ttft"][f"p{q}"] <= want + (2 * slack if q == 99 else slack), (q, s["ttft"])
    assert TOKEN_GAP - 0.002 <= s["tpot"]["p50"] <= TOKEN_GAP + slack
    assert TOKEN_GAP - 0.002 <= s["itl"]["p50"] <= TOKEN_GAP + slack
    want_e2e = percentile([t + (n_tokens - 1) * TOKEN_GAP for t in ttfts], 50)
    assert want_e2e - 0.002 <= s["e2e"]["p50"] <= want_e2e + 2 * slack
    # throughput is tokens (requests) over first send -> last finish
    spans = [r.end for r in result.results], [r.start for r in result.results]
    assert s["duration_s"] == pytest.approx(max(spans[0]) - min(spans[1]))
    assert s["output_throughput"] == pytest.approx(s["output_tokens"] / s["duration_s"])
    assert s["request_throughput"] == pytest.approx(50 / s["duration_s"])
    # closed loop with 10 clients: 5 rounds of ~(ttft + 5 gaps)
    assert 0.3 < s["duration_s"] < 3.0


def test_errors_are_counted_by_kind(fake_url):
    models = ("ok0", "missing", "crash", "fails-midway", "truncated", "slow", "no-usage")
    cfg = BenchConfig(url=fake_url, models=models, concurrency=16, num_requests=60, timeout=0.6,
                      output_len=LengthSpec(3, 3), prompt_len=LengthSpec(2, 2))  # fmt: skip
    result = run(cfg)
    sent = Counter(spec.model for spec in build_workload(cfg, list(models)))
    kind = {"missing": "http_404", "crash": "http_500", "fails-midway": "stream_error",
            "truncated": "incomplete", "slow": "timeout"}  # fmt: skip
    want = Counter()
    for model, count in sent.items():
        if model in kind:
            want[kind[model]] += count
    s = result.summary
    assert s["errors"] == dict(sorted(want.items()))
    assert s["num_ok"] == sent["ok0"] + sent["no-usage"]
    # no usage chunk: the content chunks are counted instead
    assert s["output_tokens"] == 3 * s["num_ok"]
    assert all(r.output_tokens == 3 for r in result.results if r.model == "no-usage")
    failed = [r for r in result.results if r.model == "missing"]
    assert failed and "model_not_found" in failed[0].detail


def test_open_loop_is_bounded_by_duration(fake_url):
    cfg = BenchConfig(url=fake_url, models=("ok0",), rate=40.0, duration=0.5, num_requests=1000,
                      output_len=LengthSpec(2, 2), prompt_len=LengthSpec(2, 2))  # fmt: skip
    t0 = time.perf_counter()
    result = run(cfg)
    elapsed = time.perf_counter() - t0
    planned = [s for s in build_workload(cfg, ["ok0"]) if s.send_at < cfg.duration]
    assert len(result.results) == len(planned) and 5 < len(planned) < 50
    assert result.summary["num_ok"] == len(planned)
    assert elapsed < cfg.duration + 1.0
    # sends follow the schedule
    starts = sorted(r.start for r in result.results)
    offsets = [t - starts[0] for t in starts]
    assert max(abs(a - b.send_at) for a, b in zip(offsets, planned, strict=True)) < 0.1


def test_closed_loop_respects_both_bounds(fake_url):
    common = dict(url=fake_url, models=("ok0",), output_len=LengthSpec(2, 2), prompt_len=LengthSpec(2, 2))
    assert run(BenchConfig(concurrency=3, num_requests=7, **common)).summary["num_requests"] == 7
    # a duration-bounded point with a huge request bound (as benchmarks/server_adapters.py runs them) makes
    # only the requests it sends: the whole call, workload included, ends within its bounds
    t0 = time.perf_counter()
    result = run(BenchConfig(concurrency=2, num_requests=2_000_000, duration=0.4, **common))
    assert time.perf_counter() - t0 < 0.4 + 1.0
    assert 2 <= result.summary["num_requests"] < 60
    assert result.summary["duration_s"] < 0.4 + 0.6


def test_models_come_from_the_server_when_not_given(fake_url):
    result = run(BenchConfig(url=fake_url, num_adapters=2, concurrency=2, num_requests=6,
                             output_len=LengthSpec(1, 1), warmup=2))  # fmt: skip
    assert result.models == ["ok0", "ok1"]
    assert result.summary["num_ok"] == 6 and result.summary["distinct_models"] <= 2


def test_bench_command_writes_json_and_plot(fake_url, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--url", fake_url, "--model", "ok0,ok1", "--model", "ok2", "--num-adapters", "1,3",
            "--rate", "20,40", "--num-requests", "8", "--output-len", "3", "--prompt-len", "2:4",
            "--popularity", "zipf", "--out", str(out), "--no-progress", "--save-requests"]  # fmt: skip
    assert bench_main(argv) == 0
    data = json.loads(out.read_text())
    assert [(r["config"]["num_adapters"], r["config"]["rate"]) for r in data["runs"]] == [
        (1, 20.0), (1, 40.0), (3, 20.0), (3, 40.0)
    ]  # fmt: skip
    assert all(r["summary"]["num_ok"] == 8 and len(r["requests"]) == 8 for r in data["runs"])
    assert data["runs"][2]["config"]["models"] == ["ok0", "ok1", "ok2"]
    printed = capsys.readouterr().out
    assert "| out tok/s |" in printed and printed.count("rate=40") == 2
    pytest.importorskip("matplotlib")
    assert out.with_suffix(".png").stat().st_size > 1000


def test_bench_command_refuses_remote_urls_and_absent_servers(tmp_path):
    out = str(tmp_path / "x.json")
    with pytest.raises(SystemExit, match="loopback"):
        cli_main(["bench", "--url", "http://192.0.2.1:8000", "--out", out])
    with pytest.raises(SystemExit, match="ConnectError"):
        cli_main(["bench", "--url", f"http://127.0.0.1:{free_port()}", "--out", out, "--no-progress"])


# ---- smoke run against loraplex serve ---------------------------------------------------------------
def test_smoke_against_loraplex(tmp_path):
    base, adapters = make_world(tmp_path, 2)
    server = start_server(
        ["--model", str(base), "--adapter-dir", str(adapters), "--dtype", "float32",
         "--max-lora-rank", "16", "--kv-cache-gib", "0.05"],
        tmp_path / "server.log",
    )  # fmt: skip
    try:
        wait_ready(server)
        for endpoint in ("chat", "completions"):
            cfg = BenchConfig(url=server.url, endpoint=endpoint, concurrency=3, num_requests=6,
                              prompt_len=LengthSpec(6, 6), output_len=LengthSpec(8, 8), timeout=60)  # fmt: skip
            result = run(cfg)
            s = result.summary
            assert sorted(result.models) == ["a0", "a1"]
            assert (s["num_ok"], s["errors"]) == (6, {}), [r.detail for r in result.results]
            assert s["output_tokens"] == 6 * 8  # ignore_eos: exact lengths, counted from usage
            assert s["prompt_tokens"] > 0
            assert 0 < s["ttft"]["p50"] <= s["e2e"]["p50"] < 60
            assert s["output_throughput"] > 0
    finally:
        server.terminate()
