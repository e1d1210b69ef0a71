"""The Ray Serve app (deploy/ray) on a local Ray cluster: 2 replicas of the tiny model, requests routed by
adapter (multiplexing on `model`), LRU eviction past a replica's capacity, the official `openai` client
through the Ray ingress (same greedy text as the Engine), scale 2 -> 0 -> 1, and a clean shutdown.

The app is deployed from deploy/ray/serve_config.yaml (args and resources swapped for the tiny model),
the way `serve deploy` does, so the config file itself is exercised."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import httpx
import pytest
import yaml
from server_fixtures import free_port, make_world

serve = pytest.importorskip("ray.serve", reason="needs the ray extra: pip install 'loraplex[ray]'")
import ray  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from loraplex.config import Config  # noqa: E402
from loraplex.deploy.ray.app import ADAPTERS_HEADER, REPLICA_HEADER, AppArgs, _model_of, build_app  # noqa: E402

pytestmark = [
    pytest.mark.ray,
    pytest.mark.slow,  # most tests start a local Ray cluster
    # the test config's 1 s look-back window is below Ray's (deprecated) metrics_interval_s default
    pytest.mark.filterwarnings("ignore:`look_back_period_s`:FutureWarning"),
]

CONFIG_PATH = Path(__file__).resolve().parents[1] / "deploy" / "ray" / "serve_config.yaml"
APP = "loraplex"
CAPACITY = 2  # adapters per replica
NUM_ADAPTERS = 5
ENGINE = {"max_num_seqs": 8, "kv_cache_gib": 0.02, "dtype": "float32", "device": "cpu"}
PROMPT = "hello world, how are"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
MAX_TOKENS = 8


def _test_config(base: Path, adapters: Path, port: int, *, idle_s: float) -> ServeDeploySchema:
    """deploy/ray/serve_config.yaml with the tiny model, small CPU shares, 2 replicas to start with and
    `idle_s` seconds of idleness before scaling in."""
    cfg = yaml.safe_load(CONFIG_PATH.read_text())
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    cfg["proxy_location"] = "HeadOnly"
    (app,) = cfg["applications"]
    app.pop("runtime_env")
    app["args"] = {
        "model": str(base),
        "adapter_dir": str(adapters),
        "max_adapters_per_replica": CAPACITY,
        "engine": ENGINE,
    }
    deployments = {d["name"]: d for d in app["deployments"]}
    replica = deployments["LoraplexReplica"]
    replica["ray_actor_options"] = {"num_cpus": 0.5}
    replica["max_ongoing_requests"] = 16
    replica["autoscaling_config"].update(
        min_replicas=0,
        initial_replicas=2,
        max_replicas=2,
        target_ongoing_requests=4,
        upscale_delay_s=0,
        look_back_period_s=1,
        downscale_delay_s=idle_s,
        downscale_to_zero_delay_s=idle_s,
    )
    deployments["LoraplexIngress"]["ray_actor_options"] = {"num_cpus": 0.1}
    return ServeDeploySchema.model_validate(cfg)


def _replica_states() -> dict[str, int]:
    return dict(serve.status().applications[APP].deployments["LoraplexReplica"].replica_states)


def _wait(predicate, timeout: float, what: str, show=lambda: serve.status()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: {show()}")


def _session_processes(temp_dir: str) -> list:
    """Ray's daemons (raylet, gcs_server, workers...) of this test's session: their command lines name
    its temp dir."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray cluster (2 CPUs) running the loraplex app; yields a dict of what the tests need."""
    base, adapters = make_world(tmp_path_factory.mktemp("ray-world"), NUM_ADAPTERS)
    # Ray puts Unix sockets under its temp dir, and a socket path may not exceed ~107 bytes: pytest's
    # tmp paths are too long, so use a short one under /tmp (removed at the end).
    temp_dir = tempfile.mkdtemp(dir="/tmp", prefix="rt")
    saved_auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a loopback-only test cluster: no token file in ~/.ray
    port = free_port()
    try:
        ray.init(
            num_cpus=2,
            _temp_dir=temp_dir,
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            namespace="loraplex-test",
            log_to_driver=False,
        )
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        client = serve.context._get_global_client()
        client.deploy_apps(_test_config(base, adapters, port, idle_s=600), _blocking=True)
        _wait(lambda: _replica_states().get("RUNNING") == 2, 120, "2 running replicas")
        yield {
            "url": f"http://127.0.0.1:{port}",
            "base": base,
            "adapters": adapters,
            "port": port,
            "temp_dir": temp_dir,
            "client": client,
        }
    finally:
        if ray.is_initialized():  # test_shutdown_leaves_no_processes may have done it already
            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if saved_auth_mode is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = saved_auth_mode


def _describe(adapter: str, replica: str) -> dict:
    """`replica`'s describe(), routed by `adapter` as a request for it would be. Retried until the
    driver's router knows that `replica` holds `adapter` (replicas report what they hold every 0.1 s,
    and routers learn it a moment later: until then a call may go to the other replica)."""
    handle = serve.get_deployment_handle("LoraplexReplica", app_name=APP)

    def ask():
        info = handle.options(multiplexed_model_id=adapter).describe.remote().result(timeout_s=60)
        return info if info["replica"] == replica else None

    return _wait(ask, 20, f"describe() routed to replica {replica} by {adapter}")


def _complete(url: str, model: str) -> httpx.Response:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


# ---- without a cluster ------------------------------------------------------------------------------
def test_config_file_builds_the_app():
    cfg = yaml.safe_load(CONFIG_PATH.read_text())
    ServeDeploySchema.model_validate(cfg)
    (app,) = cfg["applications"]
    assert app["import_path"] == "loraplex.deploy.ray.app:build_app"
    deployments = {d["name"]: d for d in app["deployments"]}
    assert deployments["LoraplexReplica"]["autoscaling_config"]["min_replicas"] == 0
    args = AppArgs.parse(app["args"])
    config = args.config()
    assert isinstance(config, Config)
    assert config.max_host_adapters == args.max_adapters_per_replica  # multiplexing capacity = host tier
    assert config.max_active_adapters <= args.max_adapters_per_replica
    engine = app["args"]["engine"]
    assert (
        deployments["LoraplexReplica"]["max_ongoing_requests"]
        == engine["max_num_seqs"] + app["args"]["max_queue"]
    )
    build_app(app["args"])  # builds the deployment graph without a cluster
    with pytest.raises(ValueError, match="unknown loraplex app args"):
        build_app({"modle": "x"})


def test_app_args_are_the_config_and_server_fields():
    """AppArgs takes Config fields (at the top level or under engine:) and the replica's ServerConfig
    fields by name, from the same field list as `loraplex serve`; Ray's own settings are refused."""
    from loraplex.config import ServerConfig, settings
    from loraplex.deploy.ray.app import REPLICA_CONFIG_FIELDS, REPLICA_SERVER_FIELDS

    assert set(REPLICA_CONFIG_FIELDS) == {s.name for s in settings(Config)} - {"max_host_adapters"}
    assert set(REPLICA_SERVER_FIELDS) <= {s.name for s in settings(ServerConfig)}
    args = AppArgs.parse(
        {
            "adapters": ["a=/x/a"],
            "preload": ["p"],
            "cpu_lora_rows": False,
            "lora_backend": "torch",
            "engine": {"max_num_seqs": 4, "max_num_batched_tokens": 64},
            "max_queue": 3,
            "api_key": "k",
            "max_adapters_per_replica": 2,
        }
    )
    config = args.config()
    assert config.adapters == (("a", "/x/a"),) and config.preload == ("p",)
    assert (config.cpu_lora_rows, config.lora_backend, config.max_num_seqs) == (False, "torch", 4)
    assert config.max_host_adapters == 2 and config.max_active_adapters == 2
    assert args.server.max_queue == 3 and args.server.api_key == "k"
    for bad in ({"port": 1}, {"max_host_adapters": 4}, {"engine": {"modle": "x"}}, {"engine": {"host": "h"}}):
        with pytest.raises(ValueError, match="unknown loraplex app args"):
            AppArgs.parse(bad)
    with pytest.raises(ValueError, match="both"):
        AppArgs.parse({"max_num_seqs": 2, "engine": {"max_num_seqs": 4}})


def test_model_of_request_body():
    assert _model_of("/v1/completions", b'{"model": "a0", "prompt": "x"}') == "a0"
    assert _model_of("/v1/chat/completions", b'{"model": "a1"}') == "a1"
    assert _model_of("/generate", b'{"inputs": "x", "parameters": {"adapter_id": "a2"}}') == "a2"
    assert _model_of("/generate_stream", b'{"inputs": "x"}') == ""
    assert _model_of("/", b'{"inputs": "x", "parameters": {"adapter_id": "a3"}, "stream": true}') == "a3"
    assert _model_of("/v1/completions", b"not json") == ""
    assert _model_of("/v1/completions", b'{"model": 3}') == ""
    assert _model_of("/v1/completions", b"[1, 2]") == ""


# ---- on a local Ray cluster -------------------------------------------------------------------------
def test_same_adapter_same_replica_and_lru_eviction(cluster):
    url = cluster["url"]
    held: dict[str, list[str]] = {}  # replica -> adapters it holds (least recently used first), as seen
    replica_of: dict[str, set[str]] = {}
    evictions = []

    def send(name: str) -> None:
        r = _complete(url, name)
        replica = r.headers[REPLICA_HEADER]
        now = r.headers[ADAPTERS_HEADER].split(",")
        replica_of.setdefault(name, set()).add(replica)
        assert now[-1] == name and len(now) <= CAPACITY, now
        if replica in held:  # the replica's LRU: touch `name`, evict the least recent past CAPACITY
            expect = OrderedDict.fromkeys(held[replica])
            expect.pop(name, None)
            expect[name] = None
            while len(expect) > CAPACITY:
                evictions.append((replica, expect.popitem(last=False)[0]))
            assert now == list(expect), (replica, held[replica], name, now)
        held[replica] = now

    for i in range(NUM_ADAPTERS):  # more adapters than 2 replicas x CAPACITY hold
        send(f"a{i}")
        time.sleep(1.0)  # the replica reports what it holds; routers learn it within ~0.1 s
        for _ in range(2):
            send(f"a{i}")
    # Requests for an adapter already held stay on the replica holding it.
    assert all(len(replicas) == 1 for replicas in replica_of.values()), replica_of
    assert len({r for rs in replica_of.values() for r in rs}) == 2
    assert evictions, held

    # The engine of the replica that evicted dropped the adapter too.
    replica, evicted = evictions[-1]
    info = _describe(held[replica][-1], replica)
    assert info["held"] == held[replica]
    assert info["engine"][evicted] == "disk", info
    assert all(info["engine"][name] in ("host", "device") for name in held[replica]), info


def test_openai_client_matches_the_engine(cluster):
    from openai import OpenAI

    from loraplex.engine.engine import Engine
    from loraplex.scheduler.sampling_params import SamplingParams

    engine = Engine(Config(model=str(cluster["base"]), adapter_dir=str(cluster["adapters"]), **ENGINE))
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    client = OpenAI(base_url=f"{cluster['url']}/v1", api_key="unused", max_retries=0, timeout=120)
    for model in ("a0", "a3", str(cluster["base"])):
        adapter = None if model == str(cluster["base"]) else model
        (plain,) = engine.generate([PROMPT], [adapter], params)
        (chat,) = engine.generate([engine.chat_prompt(MESSAGES, adapter)], [adapter], params)

        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0)
        assert r.choices[0].text == plain.text and r.usage.completion_tokens == len(plain.token_ids)
        chunks = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.text

        c = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0
        )
        assert c.choices[0].message.content == chat.text and c.model == model
        chunks = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.text

    names = {m.id for m in client.models.list().data}
    assert {"a0", "a4", str(cluster["base"])} <= names
    with pytest.raises(Exception) as err:  # errors keep the OpenAI shape through the ingress
        client.completions.create(model="no-such-adapter", prompt=PROMPT, max_tokens=2)
    assert getattr(err.value, "status_code", None) == 404
    assert httpx.get(f"{cluster['url']}/health").status_code == 200


def test_client_gone_mid_stream_aborts_the_replicas_request(cluster):
    replica = _complete(cluster["url"], "a1").headers[REPLICA_HEADER]
    before = _describe("a1", replica)
    body = {"model": "a1", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True, "stream": True}

    def stream_on_replica() -> bool:
        # Multiplexed routing is best effort: until the ingress's router has learnt that `replica` holds
        # a1, a request may land on the other one (its abort there does not touch `replica`'s counts).
        with httpx.stream("POST", f"{cluster['url']}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            if r.headers[REPLICA_HEADER] != replica:
                return False
            next(line for line in r.iter_lines() if line.startswith("data: "))
            return True

    _wait(stream_on_replica, 30, f"a stream routed to replica {replica}")

    # Closing the connection reaches the replica's app as http.disconnect: it aborts its engine request.
    def aborted():
        info = _describe("a1", replica)
        return info["num_aborted"] == before["num_aborted"] + 1 and info["num_running"] == 0

    _wait(aborted, 20, "the request to be aborted")


def test_scales_to_zero_when_idle_and_back_on_request(cluster):
    url = cluster["url"]
    before = {_complete(url, "a0").headers[REPLICA_HEADER], _complete(url, "a1").headers[REPLICA_HEADER]}
    assert _replica_states().get("RUNNING") == 2
    # Same code and args, only the autoscaling delays change: a light config update, no restart.
    cfg = _test_config(cluster["base"], cluster["adapters"], cluster["port"], idle_s=1)
    cluster["client"].deploy_apps(cfg, _blocking=True)
    assert not {"STARTING", "UPDATING"} & set(_replica_states()), _replica_states()  # no restart
    _wait(
        lambda: not _replica_states().get("RUNNING") and not _replica_states().get("STOPPING"),
        90,
        "0 replicas",
    )
    t0 = time.monotonic()
    r = _complete(url, "a2")  # waits for a fresh replica to build its engine
    cold_start = time.monotonic() - t0
    assert r.headers[REPLICA_HEADER] not in before
    assert _replica_states().get("RUNNING") == 1
    assert cold_start < 90


def test_shutdown_leaves_no_processes(cluster):
    import psutil

    temp_dir = cluster["temp_dir"]
    assert _session_processes(temp_dir), "the check must see this session's Ray processes"
    serve.shutdown()
    ray.shutdown()

    def gone():
        left = [
            p for p in _session_processes(temp_dir) if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        ]
        daemons = [
            p for p in psutil.Process().children(recursive=True) if p.name() in ("raylet", "gcs_server")
        ]
        return not left and not daemons

    _wait(gone, 30, "Ray's processes to exit", show=lambda: _session_processes(temp_dir))
