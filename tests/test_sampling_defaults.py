"""Sampling defaults: a request that leaves out temperature / top_p gets the model's generation_config.json
values (as vLLM does), one that sets them is honoured exactly, and `--generation-config openai` restores
OpenAI's defaults. Real engine on a tiny model, real HTTP app in-process, seeded sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from server_fixtures import save_tokenizer
from starlette.testclient import TestClient
from tiny_models import save_tiny_model

from loraplex.config import Config
from loraplex.errors import ConfigError, ModelLoadError

MODEL_DEFAULTS = {"temperature": 0.7, "top_p": 0.3}
NUM_SEEDS = 6
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("sampling") / "base"
    base.mkdir()
    vocab = save_tokenizer(base)
    save_tiny_model(base, "llama", seed=3, vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    path = base / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "do_sample": True, **MODEL_DEFAULTS}))
    return base


def _client(model_dir: Path, generation_config: str) -> TestClient:
    from loraplex.engine.async_engine import AsyncEngine
    from loraplex.engine.engine import Engine
    from loraplex.server.app import create_app

    engine = AsyncEngine(
        Engine(Config(model=str(model_dir), generation_config=generation_config, kv_cache_gib=0.01))
    )
    return TestClient(create_app(engine, served_model_name="base"))


def _texts(client: TestClient, **sampling) -> list[str]:
    """One request with NUM_SEEDS choices: choice j samples with seed j."""
    body = {
        "model": "base",
        "prompt": PROMPT,
        "max_tokens": 12,
        "seed": 0,
        "n": NUM_SEEDS,
        "ignore_eos": True,
    }
    response = client.post("/v1/completions", json={**body, **sampling})
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    return [c["text"] for c in choices]


@pytest.fixture(scope="module")
def outputs(model_dir: Path) -> dict[str, list[str]]:
    with _client(model_dir, "auto") as auto:
        runs = {
            "auto_omitted": _texts(auto),
            "auto_model_values": _texts(auto, **MODEL_DEFAULTS),
            "auto_openai_values": _texts(auto, temperature=1.0, top_p=1.0),
            "auto_temperature_only": _texts(auto, temperature=1.0),
            "auto_greedy": _texts(auto, temperature=0),
        }
    with _client(model_dir, "openai") as openai:
        runs["openai_omitted"] = _texts(openai)
    return runs


def test_omitted_temperature_and_top_p_use_the_models_generation_config(outputs):
    assert outputs["auto_omitted"] == outputs["auto_model_values"]
    # ... and that is observable: OpenAI's temperature 1, top_p 1 draw differently for the same seeds.
    assert outputs["auto_omitted"] != outputs["auto_openai_values"]


def test_explicit_values_are_honoured_exactly(outputs):
    # temperature 1 and top_p 1 set in the request: exactly what the OpenAI-defaults server draws.
    assert outputs["auto_openai_values"] == outputs["openai_omitted"]
    # Only temperature set: top_p still comes from the model (0.3), so it is not OpenAI's draw.
    assert outputs["auto_temperature_only"] != outputs["auto_openai_values"]
    assert len(set(outputs["auto_greedy"])) == 1  # temperature 0 is greedy whatever the seed


def test_generation_config_flag_restores_openai_defaults(outputs):
    assert outputs["openai_omitted"] != outputs["auto_omitted"]
    assert len(set(outputs["openai_omitted"])) > 1  # temperature 1: seeds differ


def test_engine_info_reports_the_models_sampling_defaults(model_dir: Path):
    from loraplex.engine.loader import generation_defaults

    assert generation_defaults(model_dir) == MODEL_DEFAULTS
    assert generation_defaults(model_dir.parent) == {}  # no generation_config.json: OpenAI's


def test_bad_generation_config_values_are_named(tmp_path: Path):
    from loraplex.engine.loader import generation_defaults

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": "hot"}))
    with pytest.raises(ModelLoadError, match="temperature"):
        generation_defaults(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ModelLoadError, match="top_p"):
        generation_defaults(tmp_path)


def test_generation_config_setting_is_checked():
    with pytest.raises(ConfigError, match="generation_config"):
        Config(generation_config="vllm")
