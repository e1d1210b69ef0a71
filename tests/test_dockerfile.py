"""The Dockerfile (issue 7), checked offline (no Docker engine here): CUDA runtime base, non-root user,
HEALTHCHECK on /health, model cache volume, `loraplex serve` entrypoint configured by LORAPLEX_* variables
only; and the image's command line, run for real, takes its host and port from those variables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from server_fixtures import free_port, make_world

pytestmark = pytest.mark.slow  # a real `loraplex serve` subprocess (integration)

ROOT = Path(__file__).resolve().parents[1]


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def env_of(ins) -> dict[str, str]:
    env: dict[str, str] = {}
    for op, rest in ins:
        if op == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def test_base_user_healthcheck_volume_entrypoint():
    ins = instructions()
    ops = [op for op, _ in ins]
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-\S+", ins[0][1]), ins[0]
    users = [rest for op, rest in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ops.index("USER") > max(i for i, op in enumerate(ops) if op == "RUN")  # nothing runs as root after
    (health,) = [rest for op, rest in ins if op == "HEALTHCHECK"]
    assert "/health" in health and "LORAPLEX_PORT" in health
    (volume,) = [rest for op, rest in ins if op == "VOLUME"]
    assert json.loads(volume) == ["/models"]
    env = env_of(ins)
    assert env["LORAPLEX_CACHE_DIR"].startswith("/models/") and env["HF_HOME"].startswith("/models/")
    assert env["LORAPLEX_HOST"] == "0.0.0.0"
    assert [json.loads(rest) for op, rest in ins if op == "ENTRYPOINT"] == [["loraplex"]]
    assert [json.loads(rest) for op, rest in ins if op == "CMD"] == [["serve"]]  # configured by env only
    assert f"EXPOSE {env['LORAPLEX_PORT']}" in [f"{op} {rest}" for op, rest in ins]


def test_every_loraplex_variable_in_the_image_is_read_by_the_cli():
    from loraplex.config import Config, ServerConfig, settings

    read = {s.env for cls in (Config, ServerConfig) for s in settings(cls)}
    used = {k for k in env_of(instructions()) if k.startswith("LORAPLEX_")}
    assert used <= read, used - read


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("docker-cmd"), 1)


def test_the_image_command_is_configured_by_environment(world, tmp_path):
    """`loraplex serve` with no flags, as the image runs it, binds LORAPLEX_HOST:LORAPLEX_PORT and loads
    LORAPLEX_MODEL with LORAPLEX_ADAPTER_DIR and LORAPLEX_PRELOAD."""
    base, adapters = world
    port = free_port()
    env = {
        **os.environ,
        "LORAPLEX_HOST": "127.0.0.1",
        "LORAPLEX_PORT": str(port),
        "LORAPLEX_MODEL": str(base),
        "LORAPLEX_ADAPTER_DIR": str(adapters),
        "LORAPLEX_PRELOAD": "a0",
        "LORAPLEX_DTYPE": "float32",
        "LORAPLEX_MAX_LORA_RANK": "16",
    }
    log = (tmp_path / "server.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "server.log").read_text()
            time.sleep(0.1)
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
        by_id = {m["id"]: m for m in models}
        assert by_id["a0"]["resident"] is True  # preloaded from the adapter dir
        assert str(base) in by_id
    finally:
        proc.terminate()
        proc.wait(30)
