"""One thread builds and steps the model (AsyncEngine.run_here / launch): a model built on one thread
and stepped on another gives the process two OpenMP teams, and libgomp then sleeps at every barrier
(decode ~2x slower on a 2-core CPU, see cpu_threads.py). The server's build thread becomes the step
loop; Ray's replica launches the engine on a thread that then steps it."""

from __future__ import annotations

import asyncio
import threading

import pytest
from server_fixtures import make_world

from loraplex.config import Config
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import Engine
from loraplex.scheduler.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("step-thread"), num_adapters=1)


def _recording_factory(world, seen: dict[str, set[int]]):
    """An engine factory that notes the thread building the Engine and every thread stepping it."""
    base, adapters = world

    def make() -> Engine:
        seen["build"].add(threading.get_ident())
        engine = Engine(Config(model=str(base), adapter_dir=str(adapters), dtype="float32", max_lora_rank=16))
        step = engine.step

        def recorded_step():
            seen["step"].add(threading.get_ident())
            return step()

        engine.step = recorded_step  # type: ignore[method-assign]
        return engine

    return make


def test_server_build_thread_steps_the_model(world):
    from starlette.testclient import TestClient

    from loraplex.server.app import create_app

    seen: dict[str, set[int]] = {"build": set(), "step": set()}
    make = _recording_factory(world, seen)
    app = create_app(None, build_engine=lambda: AsyncEngine(make()))
    with TestClient(app) as c:
        for _ in range(600):
            if c.get("/ready").status_code == 200:
                break
            threading.Event().wait(0.05)
        base_name = app.state.loraplex.base_name
        r = c.post("/v1/completions", json={"model": base_name, "prompt": "hello", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    assert len(seen["build"]) == 1 and seen["step"] == seen["build"]
    assert threading.get_ident() not in seen["build"]


def test_launch_builds_and_steps_on_one_new_thread(world):
    seen: dict[str, set[int]] = {"build": set(), "step": set()}
    aengine = AsyncEngine.launch(_recording_factory(world, seen))
    try:

        async def generate() -> list[int]:
            tokens: list[int] = []
            stream = await aengine.submit(aengine.encode("hello"), None, SamplingParams(max_tokens=3, ignore_eos=True))
            async for out in stream:
                tokens += out.new_token_ids
            return tokens

        assert len(asyncio.run(generate())) == 3
    finally:
        aengine.stop()
    assert len(seen["build"]) == 1 and seen["step"] == seen["build"]
    assert threading.get_ident() not in seen["build"]


def test_launch_raises_what_building_raised(tmp_path):
    with pytest.raises(Exception, match="nowhere"):
        AsyncEngine.launch(lambda: Engine(Config(model=str(tmp_path / "nowhere"), dtype="float32")))
